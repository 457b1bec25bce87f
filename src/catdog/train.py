"""Training: one readable loop, per-epoch validation, atomic best/last checkpoints, exact resume."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from catdog import fileio
from catdog.augment import augment_batch, mix_batch, to_tensor
from catdog.config import TrainConfig
from catdog.data import ImageSet, load_folder, skip_summary, split_dir, split_indices
from catdog.model import build_model, predict_probs

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_s"]


class RunError(Exception):
    """A run folder that cannot be used as asked (exists already, nothing to resume, ...)."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda asked for, but no CUDA device is available")
    return name


def check_out_dir(out: Path, exist_ok: bool) -> None:
    """Refuse to write into a folder that already holds a run, unless asked to."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if not exist_ok and any((out / f).exists() for f in ("config.json", "last.pt", "best.pt")):
        raise RunError(f"{out} already holds a run; use --resume {out} to continue it, "
                       f"--exist-ok to overwrite it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".write-test"
    try:
        fileio.write_text(probe, "")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {out}: {e.strerror or e}") from None


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, total_steps: int):
    """Per-step learning-rate schedule: constant, one-cycle, or cosine with a 5 % linear warm-up."""
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total_steps, pct_start=0.15)
    if schedule == "cosine":
        warm = max(1, total_steps // 20)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total_steps - warm))))
    return None


def bce(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of probabilities, clipped as Keras does."""
    p = probs.clamp(1e-7, 1 - 1e-7)
    return float(F.binary_cross_entropy(p, labels.float()))


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, HISTORY_FIELDS)
    w.writeheader()
    w.writerows(history)
    fileio.write_text(path, buf.getvalue())


def write_skipped(path: Path, skipped: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["path", "reason"])
    w.writeheader()
    w.writerows(skipped)
    fileio.write_text(path, buf.getvalue())


def dataset_summary(train: ImageSet, tr_idx: np.ndarray, val_idx: np.ndarray, root: str) -> dict:
    """Counts per class and split, and the skipped files, as written to data.json."""
    counts = lambda idx: {c: int((train.labels[idx] == i).sum()) for i, c in enumerate(train.classes)}
    return {"root": str(root), "classes": train.classes, "train": counts(tr_idx), "val": counts(val_idx),
            "skipped": train.skipped}


def fit(cfg: TrainConfig, resume: bool = False, exist_ok: bool = False, progress: bool = True,
        log=print) -> dict:
    """Train cfg.model on cfg.data into the run folder cfg.out; returns a summary of the run."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    if not resume:
        check_out_dir(out, exist_ok)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)

    # 1) data: decode once (cached), split train into train/validation, stratified and seeded
    train_root = split_dir(cfg.data, "train")
    data = load_folder(train_root, cfg.image_size, workers=cfg.workers, progress=progress)
    if len(data) == 0:
        raise RunError(f"no image in {train_root} could be read ({skip_summary(data.skipped)})")
    if len(data.classes) != 2:
        raise RunError(f"catdog trains two-class models; {train_root} has {len(data.classes)} classes: {data.classes}")
    tr_idx, val_idx = split_indices(data.labels, cfg.val_fraction, cfg.seed)
    x_train, y_train = torch.from_numpy(data.images[tr_idx]), torch.from_numpy(data.labels[tr_idx])
    x_val, y_val = data.images[val_idx], torch.from_numpy(data.labels[val_idx])
    log(f"data: {len(tr_idx)} train / {len(val_idx)} val images, classes {data.classes}; {skip_summary(data.skipped)}")

    # 2) model, optimiser and schedule, all seeded
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.image_size).to(device).to(memory_format=torch.channels_last)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # weight decay on conv/linear weights only: decaying norm scales and biases only fights the normalisation
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = opt_cls([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                  lr=cfg.lr)
    steps_per_epoch = math.ceil(len(tr_idx) / cfg.batch_size)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs * steps_per_epoch)
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
                                                  use_buffers=True)
    history, best, start_epoch = [], None, 1
    if resume:
        last = torch.load(out / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(last["train_state_dict"])
        opt.load_state_dict(last["optimizer"])
        if sched is not None:
            sched.load_state_dict(last["scheduler"])
        if ema is not None:
            ema.load_state_dict(last["ema"])
        history, best, start_epoch = last["history"], last["best"], last["epoch"] + 1
        log(f"resuming {out} after epoch {last['epoch']}/{cfg.epochs}")
    else:
        fileio.write_text(out / "config.json", cfg.to_json())
        fileio.write_text(out / "data.json", json.dumps(dataset_summary(data, tr_idx, val_idx, cfg.data), indent=2))
        write_skipped(out / "skipped.csv", data.skipped)

    meta = {"model": cfg.model, "image_size": cfg.image_size, "classes": data.classes, "tta": cfg.tta,
            "config": dataclasses.asdict(cfg)}
    aug = dict(shear=cfg.shear, zoom=cfg.zoom, flip=cfg.flip, crop=cfg.crop, jitter=cfg.jitter, erase=cfg.erase)
    n = len(tr_idx)
    for epoch in range(start_epoch, cfg.epochs + 1):
        # 3) one pass over the training split; the epoch's generator fixes order, augmentation and dropout,
        #    so a resumed run repeats exactly what an uninterrupted one does
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        model.train()
        loss_sum, correct = 0.0, 0
        bar = tqdm(range(0, n, cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   disable=not progress, leave=False)
        for i in bar:
            idx = perm[i:i + cfg.batch_size]
            x = augment_batch(to_tensor(x_train[idx]), gen, **aug).to(device)  # (B, 3, S, S)
            y = y_train[idx].float().to(device)
            target = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            if cfg.mix > 0 and torch.rand(1, generator=gen).item() < cfg.mix:
                x, target = mix_batch(x, target, gen)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x).float().squeeze(1)  # (B,)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item() * len(idx)
            correct += int(((logits > 0).float() == y).sum())
            bar.set_postfix(loss=f"{loss_sum / min(i + cfg.batch_size, n):.4f}",
                            acc=f"{correct / min(i + cfg.batch_size, n):.4f}")
        bar.close()

        # 4) validation on the held-out part of train; it alone picks the best checkpoint
        scored = ema.module if ema is not None else model
        row = {"epoch": epoch, "train_loss": round(loss_sum / n, 5), "train_acc": round(correct / n, 5),
               "val_loss": "", "val_acc": "", "lr": f"{opt.param_groups[0]['lr']:.3g}"}
        if len(val_idx):
            probs = predict_probs(scored, x_val, tta=cfg.tta, device=device, bf16=cfg.bf16)
            row["val_loss"] = round(bce(probs, y_val), 5)
            row["val_acc"] = round(float(((probs > 0.5).long() == y_val).float().mean()), 5)
        row["epoch_s"] = round(time.perf_counter() - t0, 2)
        history.append(row)
        score = (row["val_acc"], -row["val_loss"]) if len(val_idx) else (epoch, 0)
        is_best = best is None or tuple(score) > tuple(best)

        # 5) checkpoints: best (weights only) and last (everything needed to resume), each temp file + rename
        weights = {**meta, "epoch": epoch, "val_acc": row["val_acc"], "state_dict": scored.state_dict()}
        if is_best:
            best = list(score)
            fileio.torch_save(weights, out / "best.pt")
        fileio.torch_save({**weights, "train_state_dict": model.state_dict(),
                           "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
                           "ema": ema.state_dict() if ema is not None else None, "history": history,
                           "best": best}, out / "last.pt")
        write_history(out / "history.csv", history)
        log(f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            + (f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}  " if len(val_idx) else "")
            + f"{row['epoch_s']:.1f}s" + ("  *best" if is_best else ""))

    return {"out": str(out), "epochs": cfg.epochs, "history": history, "classes": data.classes,
            "train_s": round(sum(float(r["epoch_s"]) for r in history), 1)}
