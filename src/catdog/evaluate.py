"""Evaluation of a trained run on a folder-per-class set (the test split by default).

Metrics come from arrays (`compute_metrics`, pure); `evaluate` predicts a split and adds the threshold chosen on
the run's own validation split; `write_evaluation` stores metrics.json, predictions.csv and mistakes.csv.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from catdog import fileio
from catdog.data import DataError, ImageSet, load_folder, split_dir, split_indices
from catdog.model import load_checkpoint, predict_probs
from catdog.train import RunError, autocast_dtype, resolve_device

EPS = 1e-7  # probabilities are clipped as Keras does, so the loss matches history.csv's val_loss


def run_checkpoint(run: str | Path) -> Path:
    """The checkpoint a run is evaluated with: best.pt, else last.pt (or the .pt file given)."""
    run = Path(run)
    if run.is_file():
        return run
    for name in ("best.pt", "last.pt"):
        if (run / name).exists():
            return run / name
    raise RunError(f"no checkpoint (best.pt or last.pt) in {run}")


def compute_metrics(labels, probs, threshold: float = 0.5, classes: list[str] | None = None) -> dict:
    """Every metric of P(class 1) `probs` against 0/1 `labels`, predicting class 1 where probs > threshold."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    classes = list(classes or ["0", "1"])
    pred = (p > threshold).astype(np.int64)
    both = len(np.unique(y)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-class subsets warn; the values are still the defined ones
        precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
        cm = skm.confusion_matrix(y, pred, labels=[0, 1])
        cm_norm = skm.confusion_matrix(y, pred, labels=[0, 1], normalize="true")
        balanced = float(skm.balanced_accuracy_score(y, pred)) if len(y) else None
    return {
        "threshold": float(threshold),
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)) if len(y) else None,
        "balanced_accuracy": balanced,
        "loss": float(skm.log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1])) if len(y) else None,
        "roc_auc": float(skm.roc_auc_score(y, p)) if both else None,
        "average_precision": float(skm.average_precision_score(y, p)) if both else None,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        # rows are the true class, columns the predicted class, in the order of `classes`
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": np.nan_to_num(cm_norm).round(6).tolist(),
    }


def choose_threshold(labels, probs) -> tuple[float, float]:
    """The threshold with the highest accuracy (ties: the one closest to 0.5), and that accuracy.

    Accuracy only changes between consecutive distinct probabilities, so the candidates are 0.5 and the
    midpoints between them (plus one below the lowest and one above the highest).
    """
    y = np.asarray(labels, dtype=np.int64)
    u = np.unique(np.asarray(probs, dtype=np.float64))
    if len(u) == 0:
        raise ValueError("no probabilities to choose a threshold from")
    candidates = np.unique(np.concatenate([[0.5, u[0] / 2, (u[-1] + 1) / 2], (u[:-1] + u[1:]) / 2]))
    acc = np.array([skm.accuracy_score(y, np.asarray(probs) > t) for t in candidates])
    best = np.flatnonzero(acc == acc.max())
    t = candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]]
    return float(t), float(acc.max())


def validation_threshold(model, meta: dict, workers: int = 0, device: str = "cpu") -> dict:
    """Recompute the run's validation split exactly as training did, predict it, and choose a threshold there."""
    cfg = meta["config"]
    if not cfg.get("val_fraction"):
        return {"threshold": None, "reason": "the run has no validation split (val_fraction 0): "
                "only the default threshold 0.5 is reported"}
    try:
        train = load_folder(split_dir(cfg["data"], "train"), meta["image_size"], workers=workers)
    except DataError as e:  # a run moved away from its data can still be evaluated at 0.5
        return {"threshold": None, "reason": f"the run's training data cannot be read ({e}): only the default "
                "threshold 0.5 is reported"}
    _, val_idx = split_indices(train.labels, cfg["val_fraction"], cfg["seed"])
    if len(val_idx) == 0:
        return {"threshold": None, "reason": "the validation split is empty: only the default threshold 0.5 is reported"}
    y = train.labels[val_idx]
    p = predict_probs(model, train.images[val_idx], tta=meta.get("tta", False), device=device).numpy()
    t, acc = choose_threshold(y, p)
    return {"threshold": t, "n_val": int(len(val_idx)), "val_accuracy_at_threshold": acc,
            "val_accuracy_at_0.5": float(skm.accuracy_score(y, p > 0.5)),
            "reason": "maximises accuracy on the run's validation split (ties: closest to 0.5)"}


def evaluate(run: str | Path, data: str | Path | None = None, split: str = "test", workers: int = 0,
             progress: bool = False, with_arrays: bool = False, device: str = "auto") -> dict:
    """Metrics of a run's model on DATA/<split> (or DATA itself), at 0.5 and at the validation threshold.

    The top-level metrics are at threshold 0.5; "at_val_threshold" holds them at the validation threshold.
    With with_arrays, "_set" (the ImageSet) and "_probs" are added for plots and files (not JSON).
    """
    device = resolve_device(device)
    model, meta = load_checkpoint(run_checkpoint(run), device)
    if data is None and not (Path(meta["config"]["data"]) / split).is_dir() and Path(meta["config"]["data"]).is_dir():
        # the run's own set without that split is the set it trained on: scoring it would pass training images off
        # as held-out ones
        raise RunError(f"the run's data {meta['config']['data']} has no {split}/ folder, and its other images are the "
                       f"ones it trained on; give the folder to evaluate on: catdog evaluate {run} DATA")
    root = split_dir(data or meta["config"]["data"], split)
    ds = load_folder(root, meta["image_size"], workers=workers, progress=progress)
    if len(ds) == 0:
        raise RunError(f"no image in {root} could be read")
    if ds.classes != meta["classes"]:
        raise RunError(f"classes of {root} {ds.classes} differ from the model's {meta['classes']}")
    probs = predict_probs(model, ds.images, tta=meta.get("tta", False), device=device,
                          bf16=autocast_dtype(device, False) is torch.bfloat16).numpy()
    val = validation_threshold(model, meta, workers, device)
    result = {"data": str(root), "classes": ds.classes, "checkpoint": str(run_checkpoint(run)),
              **compute_metrics(ds.labels, probs, 0.5, ds.classes),
              "threshold_note": "top-level metrics use the default threshold 0.5: class "
                                f"{ds.classes[1]!r} when P({ds.classes[1]}) > 0.5",
              "val_threshold": val,
              "at_val_threshold": (compute_metrics(ds.labels, probs, val["threshold"], ds.classes)
                                   if val["threshold"] is not None else None),
              "skipped": ds.skipped}
    if with_arrays:
        result["_set"], result["_probs"] = ds, probs
    return result


def prediction_rows(ds: ImageSet, probs: np.ndarray, threshold: float = 0.5) -> list[dict]:
    """One row per image: path, true and predicted class, P(each class), correct, and its log loss."""
    c0, c1 = ds.classes
    rows = []
    for path, y, p in zip(ds.paths, ds.labels, np.asarray(probs, dtype=np.float64)):
        pred = int(p > threshold)
        p_true = min(max(p if y == 1 else 1 - p, EPS), 1 - EPS)
        rows.append({"path": path, "true": ds.classes[y], "predicted": ds.classes[pred],
                     f"prob_{c0}": round(1 - p, 6), f"prob_{c1}": round(p, 6),
                     "correct": int(pred == y), "loss": round(-float(np.log(p_true)), 6)})
    return rows


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_evaluation(run: str | Path, result: dict) -> None:
    """metrics.json, predictions.csv and mistakes.csv (worst first) into the run folder, each atomically."""
    run = Path(run)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    fileio.write_text(run / "metrics.json", json.dumps(public, indent=2))
    rows = prediction_rows(result["_set"], result["_probs"])
    fields = list(rows[0]) if rows else ["path", "true", "predicted", "correct", "loss"]
    fileio.write_text(run / "predictions.csv", _csv_text(rows, fields))
    mistakes = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["loss"])
    fileio.write_text(run / "mistakes.csv", _csv_text(mistakes, fields))
