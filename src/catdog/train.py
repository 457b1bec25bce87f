"""Training: one readable loop, per-epoch validation, atomic best/last checkpoints, exact resume."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from catdog import distributed, fileio, malloc
from catdog.augment import augment_batch, flip_batch, mix_batch, to_tensor
from catdog.config import FINETUNE_LR_SHARE, RUN_FILES, RUN_MARKERS, TrainConfig
from catdog.data import ImageSet, decode_files, load_folder, skip_summary, split_dir, split_indices
from catdog.model import build_model, predict_probs, read_torch_file

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "input_px", "epoch_s"]


class RunError(Exception):
    """A run folder that cannot be used as asked (exists already, nothing to resume, ...)."""


class TrainingDiverged(ValueError):
    """The training loss stopped being a finite number (a learning rate too high for the model and data)."""


def resolve_device(name: str) -> str:
    """"cpu" or "cuda" for --device cpu|cuda|auto; auto takes CUDA when a GPU is present."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda asked for, but no CUDA device is available")
    return name


def autocast_dtype(device: str, bf16: bool) -> torch.dtype | None:
    """Mixed precision for the forward pass: always on CUDA (bfloat16, or float16 on older GPUs), on CPU only with --bf16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if bf16 else None


def _check_writable(out: Path) -> None:
    probe = out / ".write-test"
    try:
        fileio.write_text(probe, "")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {out}: {e.strerror or e}") from None


# what is left of an earlier run's evaluation when a new run starts over it (the new run makes its own, or none:
# stale ones would pass the old model's results off as its own)
STALE_RESULTS = ("best.pt", "model.onnx", "metrics.json", "results.json", "predictions.csv", "mistakes.csv",
                 "report.html")
PLOT_FILES = ("curves.png", "confusion.png", "roc.png", "pr.png", "histogram.png", "samples.png", "cams.png",
              "mistakes.png")  # what catdog.report writes into RUN/plots/ (a test keeps the two in step)


def check_out_dir(out: Path, exist_ok: bool) -> None:
    """Refuse to write into a folder that already holds a run, or files a run would overwrite, unless asked to.

    Nothing is deleted here: a new run clears the earlier run's results (clear_stale_results) only once it has
    loaded its data and written its own first files, so a re-run that fails to start leaves the old run whole."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if not exist_ok and any((out / f).exists() for f in RUN_MARKERS):
        raise RunError(f"{out} already holds a run; use --resume {out} to continue it, "
                       f"--exist-ok to overwrite it, or another --out")
    clash = [f for f in RUN_FILES if (out / f).exists()] + (["plots/"] if (out / "plots").is_dir() else [])
    if not exist_ok and clash:
        raise RunError(f"{out} is not a run folder, but a run would overwrite its {', '.join(clash)}; "
                       f"use another --out, or --exist-ok to overwrite them")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out}: {e.strerror or e}") from None
    _check_writable(out)


def clear_stale_results(out: Path) -> None:
    """Delete what an earlier run in `out` left of its evaluation (best.pt, metrics, report, catdog's plots)."""
    for name in STALE_RESULTS:
        (out / name).unlink(missing_ok=True)
    plots = out / "plots"
    if plots.is_dir() and not plots.is_symlink():
        for name in PLOT_FILES:
            (plots / name).unlink(missing_ok=True)


@contextlib.contextmanager
def lock_run_dir(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUT/.lock while the block runs, so a concurrent run into OUT refuses."""
    if fcntl is None:  # no advisory locks on this platform: concurrent runs are not detected
        yield
        return
    try:
        f = open(out / ".lock", "a")  # never written: only its lock matters, and it stays for the next run
    except OSError as e:
        raise RunError(f"cannot write to {out}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunError(f"{out} is in use by another catdog train that is still running; "
                       f"wait for it to end, or use another --out") from None
    try:
        yield
    finally:
        f.close()  # releases the lock, also when the process dies


def _remove_if_unused(out: Path) -> None:
    """Remove a run folder this run created when it holds nothing but its lock file."""
    with contextlib.suppress(OSError):
        if all(entry.name == ".lock" for entry in out.iterdir()):
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()


def check_out_outside_data(out: Path, data: Path) -> None:
    """Refuse a run folder that is the dataset or sits among its class folders: it would become a class, or mix
    the run's files with the photos."""
    out, data = Path(os.path.abspath(out)), Path(os.path.abspath(data))
    class_roots = [data / "train", data / "test"] if (data / "train").is_dir() else [data]
    if out == data or any(out == r or r in out.parents for r in class_roots):
        raise RunError(f"--out {out} is inside the dataset {data}; give the run a folder outside it")


def claim_run_dir(out: Path, resume: bool, exist_ok: bool, held: contextlib.ExitStack) -> None:
    """Lock `out` for this run (kept in `held`), refuse an existing run unless asked, drop a killed run's temp files."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out}: {e.strerror or e}") from None
    if created:  # after the lock is let go: a run that failed before writing anything leaves no folder behind
        held.callback(_remove_if_unused, out)
    held.enter_context(lock_run_dir(out))
    if resume:
        _check_writable(out)
    else:
        check_out_dir(out, exist_ok)
    for tmp in out.glob(f".*{fileio.TEMP_SUFFIX}"):  # half-written by a killed run (catdog's temp files only);
        tmp.unlink(missing_ok=True)                    # nobody else writes here while we hold the lock


@contextlib.contextmanager
def saving(out: Path, kept: str) -> Iterator[None]:
    """Turn a failed write (disk full, folder made read-only) into a clear error saying what the run folder keeps."""
    try:
        yield
    except OSError as e:
        raise RunError(f"cannot write to {out}: {e.strerror or e}; {kept}") from None


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


def finetune_lr(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of a fine-tuning step (0-based, of `total`): a 10 % linear warm-up to the peak learning
    rate x FINETUNE_LR_SHARE, then cosine decay to zero. It follows from the step alone, so a resume needs no state."""
    warm = max(1, total // 10)
    peak = cfg.lr * FINETUNE_LR_SHARE
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


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


def eval_images(cfg: TrainConfig, paths: list[str], role: str = "validation") -> np.ndarray:
    """The given files (decoded once already, at the decode size) decoded at cfg.eval_size, in the order given;
    role names them in the error."""
    arrays, reasons = decode_files(paths, cfg.eval_size, workers=cfg.workers)
    failed = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if failed:  # changed on disk since the first decode
        raise RunError(f"{len(failed)} {role} image(s) could not be decoded at {cfg.eval_size} px: "
                       f"{failed[0][0]} ({failed[0][1]})")
    return np.stack(arrays)


def source_images(images: torch.Tensor, side: int, previous: torch.Tensor | None) -> torch.Tensor:
    """The decoded training images (N, S, S, 3) uint8 at the given side: themselves, or resized with antialiasing
    (the random crops then sample an image about as fine as their output, not one that would alias); previous
    is returned when it already has that side."""
    if images.shape[1] == side:
        return images
    if previous is not None and previous.shape[1] == side:
        return previous
    nchw = images.permute(0, 3, 1, 2)
    return F.interpolate(nchw, size=(side, side), mode="bilinear", antialias=True).permute(0, 2, 3, 1).contiguous()


def dataset_summary(train: ImageSet, tr_idx: np.ndarray, val_idx: np.ndarray, root: str) -> dict:
    """Counts per class and split, and the skipped files, as written to data.json."""
    counts = lambda idx: {c: int((train.labels[idx] == i).sum()) for i, c in enumerate(train.classes)}
    # the images, in order, with their labels: a resumed run checks it still trains on the same ones
    files = hashlib.sha256("".join(f"{os.path.relpath(p, root)}\0{y}\n" for p, y in zip(train.paths, train.labels))
                           .encode("utf-8", "surrogateescape")).hexdigest()
    return {"root": str(root), "classes": train.classes, "train": counts(tr_idx), "val": counts(val_idx),
            "skipped": train.skipped, "files_sha256": files}


def check_same_data(out: Path, now: dict) -> None:
    """Refuse to resume on a dataset that changed since the run started (data.json): the split would move images
    between training and validation, and the epochs left would not be those of an uninterrupted run."""
    try:
        then = json.loads((out / "data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no record to compare with (a run folder from before data.json, or a damaged one)
    keys = ["classes", "train", "val"] + (["files_sha256"] if "files_sha256" in then else [])
    changed = [k for k in keys if then.get(k) != now[k]]
    if changed:
        detail = "the image files" if changed == ["files_sha256"] else (
            f"train {then.get('train')} / val {then.get('val')} then, train {now['train']} / val {now['val']} now")
        raise RunError(f"the dataset changed since {out} started ({detail}); resuming would train on other images "
                       f"than the first epochs did: start a new run instead (another --out, or --exist-ok)")


def fit(cfg: TrainConfig, resume: bool = False, exist_ok: bool = False, progress: bool = True,
        log=print) -> dict:
    """Train cfg.model on cfg.data into the run folder cfg.out; returns a summary of the run.

    Under torchrun (WORLD_SIZE > 1) every process calls this: each trains on its shard of every epoch with
    DistributedDataParallel, metrics are summed over all of them, and rank 0 alone logs and writes files.
    """
    ranks = distributed.ranks_from_env()
    if not ranks.main:
        log, progress = (lambda m: None), False
    # config.json names the data absolutely: evaluate, report and resume may run from another folder
    cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
    distributed.check_batch(cfg.batch_size, ranks.world)
    with distributed.process_group(ranks, resolve_device(cfg.device)) as device, contextlib.ExitStack() as held:
        # Adam's first moment of a weight whose gradient is zero (behind a dead ReLU) shrinks by beta1 every
        # step and, after about 700 steps, becomes a denormal float, which the CPU handles in slow microcode:
        # seed-network epochs went from 0.75 to 0.95 s after epoch 11, when 440,000 of its 800,000 dense-layer
        # moments were denormal. Flushing them to zero keeps the later epochs as fast. The setting is per thread
        # and new threads inherit it, so it is made before training starts its thread pool and kept for the rest
        # of the process (values under 1.2e-38 read as zero, as malloc.py's setting also stays).
        torch.set_flush_denormal(True)
        return _fit(cfg, ranks, device, held, resume, exist_ok, progress, log)


def _fit(cfg: TrainConfig, ranks: distributed.Ranks, device: str, held: contextlib.ExitStack, resume: bool,
         exist_ok: bool, progress: bool, log) -> dict:
    out = Path(cfg.out)
    torch.set_num_threads(distributed.threads_per_rank(cfg.threads, ranks))
    malloc.keep_freed_memory()  # about a quarter less time per seed-network epoch on CPU (catdog/malloc.py)
    amp = autocast_dtype(device, cfg.bf16)  # None: full float32

    # 1) rank 0 claims the run folder: a lock held to the end, so a concurrent run into it refuses
    check_out_outside_data(out, Path(cfg.data))
    distributed.leaders_first(ranks, ranks.main, lambda: claim_run_dir(out, resume, exist_ok, held))

    # 2) data: decoded once (by the first process of each node, filling the cache the others then read),
    #    train split into train/validation, stratified and seeded
    train_root = split_dir(cfg.data, "train")
    load = lambda: load_folder(train_root, cfg.decode_size, workers=cfg.workers, progress=progress)
    data = distributed.leaders_first(ranks, ranks.local_rank == 0, load)
    if data is None:
        data = load()
    if len(data) == 0:
        raise RunError(f"no image in {train_root} could be read ({skip_summary(data.skipped)})")
    if len(data.classes) != 2:
        raise RunError(f"catdog trains two-class models; {train_root} has {len(data.classes)} "
                       f"{'class' if len(data.classes) == 1 else 'classes'}: {data.classes}")
    empty = [c for i, c in enumerate(data.classes) if not (data.labels == i).any()]
    if empty:
        raise RunError(f"no image of class {empty[0]!r} in {train_root / empty[0]} could be read "
                       f"({skip_summary(data.skipped)})")
    tr_idx, val_idx = split_indices(data.labels, cfg.val_fraction, cfg.seed)
    x_train, y_train = torch.from_numpy(data.images[tr_idx]), torch.from_numpy(data.labels[tr_idx])
    x_val, y_val = data.images[val_idx], torch.from_numpy(data.labels[val_idx])
    if cfg.eval_size != cfg.decode_size and len(val_idx) and ranks.main:
        # validation sees what inference will: the same files, decoded at the evaluation size
        x_val = eval_images(cfg, [data.paths[i] for i in val_idx])
    if resume:  # every process: one that stopped here alone would leave the others waiting
        check_same_data(out, dataset_summary(data, tr_idx, val_idx, cfg.data))
    log(f"data: {len(tr_idx)} train / {len(val_idx)} val images, classes {data.classes}; {skip_summary(data.skipped)}")

    # 3) model, optimiser and schedule, all seeded; with several processes DDP averages their gradients.
    #    cfg.batch_size is the global batch: each process takes its share of every step
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.image_size).to(device).to(memory_format=torch.channels_last)
    net = model
    if ranks.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.local_rank] if device.startswith("cuda") else None)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # weight decay on conv/linear weights only: decaying norm scales and biases only fights the normalisation
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    # the fused kernel updates all parameters in one pass: about a fifth faster per step than the default
    # (foreach) implementation for the seed network on 2 CPU cores (benchmarks/breakdown.md)
    opt = opt_cls([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                  lr=cfg.lr, fused=device.split(":")[0] in ("cpu", "cuda"))
    n = len(tr_idx)
    batch = cfg.batch_size // ranks.world  # per process
    steps_per_epoch = math.ceil(math.ceil(n / ranks.world) / batch)
    sched = make_scheduler(opt, cfg.schedule, cfg.main_epochs * steps_per_epoch)  # fine-tuning has its own
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)  # float16 gradients need scaling
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
                                                  use_buffers=True)
    if ranks.active:
        log(f"distributed: {ranks.world} processes ({torch.distributed.get_backend()}), global batch "
            f"{cfg.batch_size} = {batch} per process, {steps_per_epoch} steps per epoch")
    history, best, start_epoch = [], None, 1
    if resume:
        last = read_torch_file(out / "last.pt", device)
        model.load_state_dict(last["train_state_dict"])
        opt.load_state_dict(last["optimizer"])
        if sched is not None:
            sched.load_state_dict(last["scheduler"])
        if last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        if ema is not None:
            ema.load_state_dict(last["ema"])
        history, best, start_epoch = last["history"], last["best"], last["epoch"] + 1
        log(f"resuming {out} after epoch {last['epoch']}/{cfg.epochs}")
        if last.get("world_size", 1) != ranks.world:
            log(f"note: the run was trained with {last.get('world_size', 1)} process(es), it goes on with "
                f"{ranks.world}: it continues, but not bit for bit as it would have")

    # image_size is the input size at inference (validation, evaluate, predict, export); the network is built
    # for train_size (the resnet's stem stride depends on it)
    meta = {"model": cfg.model, "image_size": cfg.eval_size, "train_size": cfg.image_size, "classes": data.classes,
            "tta": cfg.tta, "config": dataclasses.asdict(cfg)}

    def save_last(epoch: int, weights: dict, samples: int) -> None:
        fileio.torch_save({**weights, "train_state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict() if sched else None, "scaler": scaler.state_dict(),
                           "ema": ema.state_dict() if ema is not None else None, "history": history, "best": best,
                           "world_size": ranks.world, "global_batch": cfg.batch_size,
                           "steps_per_epoch": steps_per_epoch, "samples_per_epoch": samples}, out / "last.pt")

    if not resume and ranks.main:
        # the run folder is complete from the start: last.pt at epoch 0 makes even a first-epoch crash resumable
        with saving(out, "the run could not start"):
            if exist_ok:  # over an earlier run (the folder is ours under the lock): its results are not this run's
                clear_stale_results(out)
            fileio.write_text(out / "config.json", cfg.to_json())
            fileio.write_text(out / "data.json", json.dumps(dataset_summary(data, tr_idx, val_idx, cfg.data), indent=2))
            write_skipped(out / "skipped.csv", data.skipped)
            write_history(out / "history.csv", history)
            save_last(0, {**meta, "epoch": 0, "val_acc": "", "state_dict": model.state_dict()}, 0)

    aug = cfg.augmentation
    saved = start_epoch - 1
    source = fine_source = None
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            # 4) one pass over the training split. The epoch's generator fixes the order (one permutation; each
            #    process trains on its slice), then augmentation and dropout follow (seed, epoch, rank); so a
            #    resumed run repeats exactly what an uninterrupted one does
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            order, real = distributed.shard(perm, ranks.rank, ranks.world)  # (ceil(n / world),)
            if ranks.rank:  # rank 0 goes on with the shared stream, so one process trains as it always has
                gen.manual_seed(distributed.rank_seed(cfg.seed, epoch, ranks.rank))
            torch.manual_seed(distributed.rank_seed(cfg.seed, epoch, ranks.rank))
            net.train()
            size = cfg.train_size_at(epoch)  # the image size, or smaller in early epochs with progressive resizing
            fine = cfg.is_finetune(epoch)  # the last epochs: whole images at the evaluation size, flipped only
            if fine:
                if fine_source is None:
                    fine_source = (torch.from_numpy(eval_images(cfg, [data.paths[i] for i in tr_idx], "training"))
                                   if cfg.eval_size != cfg.decode_size else x_train)
                if epoch == cfg.main_epochs + 1:
                    # a fresh start, which a resume repeats: Adam's moments, and the checkpoint is chosen among the
                    # fine-tuning epochs only (an earlier one would win by noise, never adapted to the evaluation size)
                    opt.state.clear()
                    best = None
            else:
                source = source_images(x_train, cfg.source_size_at(size), source)
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(range(0, len(order), batch), desc=f"epoch {epoch}/{cfg.epochs}" + (" fine-tune" * fine),
                       unit="batch", disable=None if progress else True, leave=False)  # None: terminals only
            for step, i in enumerate(bar):
                idx, keep = order[i:i + batch], real[i:i + batch].to(device)
                y = y_train[idx].float().to(device)
                target = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
                if fine:
                    x = to_tensor(fine_source[idx])  # channels-last already
                    x = (flip_batch(x, gen) if cfg.flip else x).to(device)
                    lr = finetune_lr(cfg, (epoch - cfg.main_epochs - 1) * steps_per_epoch + step,
                                     cfg.finetune_epochs * steps_per_epoch)
                    for g in opt.param_groups:
                        g["lr"] = lr
                else:
                    x = augment_batch(to_tensor(source[idx]), gen, **aug, size=size).to(device)  # (B, 3, S, S)
                    if cfg.mix > 0 and torch.rand(1, generator=gen).item() < cfg.mix:
                        x, target = mix_batch(x, target, gen)
                with torch.autocast(device_type=device.split(":")[0], dtype=amp or torch.bfloat16,
                                    enabled=amp is not None):
                    logits = net(x).float().squeeze(1)  # (B,)
                losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (B,)
                loss = losses.mean()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if sched is not None and not fine:
                    sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                # metrics count each sample once: the repeats that even out the shards are left out
                loss_sum += float(losses.detach()[keep].sum())
                correct += int(((logits > 0).float() == y)[keep].sum())
                seen += int(keep.sum())
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", acc=f"{correct / max(seen, 1):.4f}")
            bar.close()
            loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen], ranks, device)
            if not math.isfinite(loss_sum):  # the weights are NaN or infinite now: nothing of this epoch is saved
                raise TrainingDiverged(f"training diverged in epoch {epoch}: the loss is {loss_sum / seen}; "
                                       f"{out / 'last.pt'} holds epoch {saved}. Start again with a lower --lr "
                                       f"(this run: {cfg.lr:g})")

            # 5) validation, on rank 0, on the held-out part of train; it alone picks the best checkpoint
            scored = ema.module if ema is not None else model
            row = {"epoch": epoch, "train_loss": round(loss_sum / seen, 5), "train_acc": round(correct / seen, 5),
                   "val_loss": "", "val_acc": "", "lr": f"{opt.param_groups[0]['lr']:.3g}", "input_px": size}
            if ranks.main and len(val_idx):
                probs = predict_probs(scored, x_val, tta=cfg.tta, device=device, bf16=amp is torch.bfloat16)
                row["val_loss"] = round(bce(probs, y_val), 5)
                row["val_acc"] = round(float(((probs > 0.5).long() == y_val).float().mean()), 5)
            row["epoch_s"] = round(time.perf_counter() - t0, 2)
            row = distributed.broadcast(row, ranks)  # every rank keeps the same history, so the same best
            history.append(row)
            score = (row["val_acc"], -row["val_loss"]) if len(val_idx) else (epoch, 0)
            is_best = best is None or tuple(score) > tuple(best)

            # 6) checkpoints, by rank 0: best (weights only) and last (everything needed to resume), each
            #    temp file + rename, so a crash at any point leaves every file whole
            weights = {**meta, "epoch": epoch, "val_acc": row["val_acc"], "state_dict": scored.state_dict()}
            if is_best:
                best = list(score)
            if ranks.main:
                with saving(out, f"its files are complete as of epoch {saved}; make room, then continue with: "
                                 f"catdog train --resume {out}"):
                    # without validation "best" is simply the latest epoch: best.pt is written once, at the end
                    # (until then evaluate and predict read last.pt), instead of a second file every epoch
                    if is_best and (len(val_idx) or epoch == cfg.epochs):
                        fileio.torch_save(weights, out / "best.pt")
                    save_last(epoch, weights, int(seen))
                    write_history(out / "history.csv", history)
            distributed.barrier(ranks)
            saved = epoch
            log(f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                + (f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}  " if len(val_idx) else "")
                + f"{row['epoch_s']:.1f}s" + ("  *best" if is_best else ""))
    except KeyboardInterrupt:
        log(f"interrupted: {out / 'last.pt'} holds epoch {saved}/{cfg.epochs}")
        raise

    return {"out": str(out), "epochs": cfg.epochs, "history": history, "classes": data.classes,
            "world_size": ranks.world, "train_s": round(sum(float(r["epoch_s"]) for r in history), 1)}
