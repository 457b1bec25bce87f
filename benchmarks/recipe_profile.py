"""Where an epoch of the default recipe goes: the resnet's training step at each input size of its progressive
schedule split into augmentation, forward, backward and optimiser step, plus the per-epoch validation and
checkpoint, and the operators that take the time at the full training size.

The recipe's accuracy is bought with epochs inside a fixed wall-time budget, so this is the table to read before
trying to make an epoch cheaper.

Usage: python benchmarks/recipe_profile.py [--data DIR] [--steps 12] [--out benchmarks/recipe_profile.md]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from catdog import fileio, malloc  # noqa: E402
from catdog.augment import augment_batch, flip_batch, mix_batch, to_tensor  # noqa: E402
from catdog.config import TrainConfig  # noqa: E402
from catdog.data import load_folder, split_dir, split_indices  # noqa: E402
from catdog.model import build_model, predict_probs  # noqa: E402
from catdog.train import eval_images  # noqa: E402
from stepping import timed_step  # noqa: E402  (benchmarks/, the script's own folder)

STAGES = ("augment", "forward", "backward", "step")


def timed_steps(model, opt, x_train, y_train, cfg: TrainConfig, size: int, steps: int, fine: bool = False) -> dict:
    """Median seconds per stage of one training step at `size` px, as fit() runs it (bf16 autocast, channels-last,
    the recipe's augmentation; every batch mixed, the recipe's worst case, when it mixes at all). fine: a
    fine-tuning step, on x_train decoded at that size, flipped only."""
    gen = torch.Generator().manual_seed(size)
    marks = {k: [] for k in STAGES}
    for i in range(steps + 2):  # the first two warm oneDNN up for this size
        idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
        t0 = time.perf_counter()
        target = y_train[idx].float() * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
        if fine:
            x = flip_batch(to_tensor(x_train[idx]), gen)
        else:
            x = augment_batch(to_tensor(x_train[idx]), gen, **cfg.augmentation, size=size)
        if cfg.mix > 0 and not fine:
            x, target = mix_batch(x, target, gen)
        t1 = time.perf_counter()
        t2, t3, t4 = timed_step(model, opt, x, target, cfg.bf16)
        if i >= 2:
            for k, a, b in zip(STAGES, (t0, t1, t2, t3), (t1, t2, t3, t4)):
                marks[k].append(b - a)
    return {k: median(v) for k, v in marks.items()}


def top_operators(model, opt, x_train, y_train, cfg: TrainConfig, size: int, n: int = 10) -> list[tuple[str, float]]:
    """The operators with the most self CPU time over 5 training steps at `size` px: (name, share of the total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_steps(model, opt, x_train, y_train, cfg, size, 3)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [(e.key, e.self_cpu_time_total / total) for e in top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="dataset root (default: the embedded set)")
    ap.add_argument("--steps", type=int, default=12, help="timed training steps per input size (median)")
    ap.add_argument("--image-size", type=int, help="override the recipe's image size (for a quick check)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/recipe_profile.md")
    args = ap.parse_args()

    cfg = TrainConfig.for_model("resnet", **({"data": args.data} if args.data else {}),
                                **({"image_size": args.image_size} if args.image_size else {}))
    torch.set_num_threads(os.cpu_count())
    malloc.keep_freed_memory()  # as fit() does
    data = load_folder(split_dir(cfg.data, "train"), cfg.image_size, progress=False)
    tr_idx, val_idx = split_indices(data.labels, cfg.val_fraction, cfg.seed)
    x_train, y_train = torch.from_numpy(data.images[tr_idx]), torch.from_numpy(data.labels[tr_idx])
    x_val = eval_images(cfg, [data.paths[i] for i in val_idx])
    steps_per_epoch = math.ceil(len(tr_idx) / cfg.batch_size)
    # (input px, fine-tuning?) -> epochs
    epochs_at = Counter((cfg.train_size_at(e), cfg.is_finetune(e)) for e in range(1, cfg.epochs + 1))
    x_fine = (torch.from_numpy(eval_images(cfg, [data.paths[i] for i in tr_idx], "training"))
              if cfg.finetune_epochs else None)

    torch.manual_seed(0)
    model = build_model("resnet", cfg.image_size).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.weight_decay, fused=True)
    per_size = {(s, fine): timed_steps(model, opt, x_fine if fine else x_train, y_train, cfg, s, args.steps, fine)
                for s, fine in sorted(epochs_at)}
    ops = top_operators(model, opt, x_train, y_train, cfg, cfg.image_size)

    val = []
    for _ in range(3):
        t = time.perf_counter()
        predict_probs(model, x_val, tta=cfg.tta, bf16=cfg.bf16)
        val.append(time.perf_counter() - t)
    ckpt = []
    state = {"state_dict": model.state_dict(), "train_state_dict": model.state_dict(), "optimizer": opt.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            t = time.perf_counter()
            fileio.torch_save(state, Path(tmp, "last.pt"))
            ckpt.append(time.perf_counter() - t)
    val_s, ckpt_s = median(val), median(ckpt)

    lines = ["# Where an epoch of the default recipe goes\n",
             f"Made by `python benchmarks/recipe_profile.py`: {os.cpu_count()} CPU cores, {torch.get_num_threads()} "
             f"torch threads, nothing else running. The `resnet` recipe trains {cfg.epochs} epochs of "
             f"{len(tr_idx)} images ({steps_per_epoch} steps of {cfg.batch_size}), bf16 autocast "
             f"{'on' if cfg.bf16 else 'off'}, channels-last, at the input sizes of its progressive schedule"
             + (f", then {cfg.finetune_epochs} fine-tuning epochs on whole images at {cfg.eval_size} px (flip only, "
                "no mixing)" if cfg.finetune_epochs else "") + ". Each "
             f"stage is the median over {args.steps} steps"
             + (f" (every batch mixed, the worst case: the recipe mixes {cfg.mix:.0%} of them)" if cfg.mix else "")
             + f", in milliseconds per step; an epoch is that times {steps_per_epoch}.\n",
             "| input px | epochs at it | augment | forward | backward | optimiser step | step total | epoch (s) | "
             "share of training |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    epoch_s = {s: sum(t.values()) * steps_per_epoch for s, t in per_size.items()}
    train_s = sum(epochs_at[s] * epoch_s[s] for s in per_size)
    for (s, fine), t in per_size.items():
        lines.append(f"| {s}{' (fine-tuning)' if fine else ''} | {epochs_at[s, fine]} | "
                     + " | ".join(f"{t[k] * 1e3:.1f}" for k in STAGES)
                     + f" | {sum(t.values()) * 1e3:.1f} | {epoch_s[s, fine]:.2f} | "
                     f"{epochs_at[s, fine] * epoch_s[s, fine] / train_s:.0%} |")
    other = cfg.epochs * (val_s + ckpt_s)
    lines += ["",
              f"Every epoch also validates ({len(val_idx)} images at {cfg.eval_size} px"
              f"{', each with its mirror image' if cfg.tta else ''}): {val_s * 1e3:.0f} ms, and writes `last.pt` "
              f"(weights, optimiser state; temp file, fsync, rename): {ckpt_s * 1e3:.0f} ms.",
              f"Over the {cfg.epochs} epochs: training steps {train_s:.0f} s, validation and checkpoints "
              f"{other:.0f} s ({other / (train_s + other):.0%}), {train_s + other:.0f} s in all (the per-seed "
              "table of `benchmarks/accuracy.md` has the measured wall times).\n",
              f"## Operators at {cfg.image_size} px (self CPU time over 5 training steps, torch.profiler)\n",
              "| operator | share |", "| --- | --- |"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in ops]
    fileio.write_text(args.out, "\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
