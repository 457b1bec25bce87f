"""Evaluation of a trained run on a folder-per-class set (the test split by default)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from catdog.data import load_folder, split_dir
from catdog.model import load_checkpoint, predict_probs
from catdog.train import RunError, autocast_dtype, bce, resolve_device


def run_checkpoint(run: str | Path) -> Path:
    """The checkpoint a run is evaluated with: best.pt, else last.pt (or the .pt file given)."""
    run = Path(run)
    if run.is_file():
        return run
    for name in ("best.pt", "last.pt"):
        if (run / name).exists():
            return run / name
    raise RunError(f"no checkpoint (best.pt or last.pt) in {run}")


def evaluate(run: str | Path, data: str | Path | None = None, split: str = "test", workers: int = 0,
             progress: bool = False, device: str = "auto") -> dict:
    """Accuracy, loss and ROC AUC of a run's model on DATA/<split> (or DATA itself)."""
    device = resolve_device(device)
    model, meta = load_checkpoint(run_checkpoint(run), device)
    root = split_dir(data or meta["config"]["data"], split)
    ds = load_folder(root, meta["image_size"], workers=workers, progress=progress)
    if len(ds) == 0:
        raise RunError(f"no image in {root} could be read")
    if ds.classes != meta["classes"]:
        raise RunError(f"classes of {root} {ds.classes} differ from the model's {meta['classes']}")
    probs = predict_probs(model, ds.images, tta=meta.get("tta", False), device=device,
                          bf16=autocast_dtype(device, False) is torch.bfloat16)
    labels = torch.from_numpy(ds.labels)
    y, p = ds.labels, probs.numpy()
    result = {
        "data": str(root), "n": len(y), "classes": ds.classes,
        "accuracy": float(skm.accuracy_score(y, p > 0.5)),
        "loss": bce(probs, labels),
        "roc_auc": float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None,
        "skipped": ds.skipped,
    }
    return result
