"""Accuracy benchmark: the default recipe over several seeds, and an ablation judged on validation only.

Every choice is made on the validation split carved from train; the test split is evaluated once per seed of
the final recipe and is never looked at for the ablation rows.

Usage: python benchmarks/accuracy.py [--seeds 0 1 2] [--ablation] [--data DIR] [--out benchmarks/accuracy.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from catdog import fileio  # noqa: E402
from catdog.config import TrainConfig  # noqa: E402
from catdog.evaluate import evaluate  # noqa: E402
from catdog.train import fit  # noqa: E402

# Each ablation row takes one ingredient out of the default recipe (or changes one setting).
ABLATIONS: dict[str, dict] = {
    "default recipe": {},
    "no mixup/cutmix": {"mix": 0.0},
    "no random erasing": {"erase": 0.0},
    "no colour jitter": {"jitter": 0.0},
    "no random-resized crop": {"crop": 0.0},
    "no label smoothing": {"label_smoothing": 0.0},
    "no test-time flip": {"tta": False},
    "64 px instead of the default size": {"image_size": 64},
    "fp32 instead of bf16": {"bf16": False},
}


def train_one(overrides: dict, seed: int, data: str | None, test: bool) -> dict:
    """Train one recipe; returns wall time, best validation accuracy and (if asked) test metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        fields = {"seed": seed, "out": tmp, **({"data": data} if data else {}), **overrides}
        cfg = TrainConfig.for_model("resnet", **fields)
        t0 = time.perf_counter()
        summary = fit(cfg, exist_ok=True, progress=False, log=lambda m: None)
        wall = time.perf_counter() - t0
        best = max(summary["history"], key=lambda r: (r["val_acc"], -r["val_loss"]))
        row = {"seed": seed, "image_size": cfg.image_size, "epochs": cfg.epochs, "wall_s": round(wall, 1),
               "val_acc": best["val_acc"], "best_epoch": best["epoch"]}
        if test:
            res = evaluate(tmp, data)
            row.update(test_acc=res["accuracy"], test_auc=res["roc_auc"])
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablation", action="store_true", help="also run the ablation rows (validation only)")
    ap.add_argument("--ablation-seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="dataset root (default: the embedded set)")
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (for a quick check)")
    ap.add_argument("--image-size", type=int, help="override the recipe's image size (for a quick check)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/accuracy.md")
    args = ap.parse_args()

    base = {k: v for k, v in (("epochs", args.epochs), ("image_size", args.image_size)) if v is not None}
    rows = []
    for seed in args.seeds:
        rows.append(train_one(base, seed, args.data, test=True))
        print(json.dumps(rows[-1]), flush=True)
    ablation = []
    if args.ablation:
        for name, overrides in ABLATIONS.items():
            if name == "default recipe":
                r = next((r for r in rows if r["seed"] == args.ablation_seed), None)
                r = r or train_one(base, args.ablation_seed, args.data, test=False)
            else:
                r = train_one({**base, **overrides}, args.ablation_seed, args.data, test=False)
            ablation.append((name, r))
            print(name, json.dumps(r), flush=True)

    cfg = TrainConfig.for_model("resnet", **base)
    acc = [r["test_acc"] for r in rows]
    lines = ["# Accuracy of the default recipe\n",
             f"Made by `python benchmarks/accuracy.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPU cores. Model `resnet`, recipe: "
             f"`{json.dumps({k: getattr(cfg, k) for k in ('image_size', 'epochs', 'batch_size', 'lr', 'optimizer', 'schedule', 'weight_decay', 'label_smoothing', 'crop', 'jitter', 'erase', 'mix', 'tta', 'bf16')})}`.\n",
             "The checkpoint is chosen on the validation split (10 % of train); the test split (624 images) is "
             "evaluated once per seed.\n",
             "| seed | image size | epochs | wall time (s) | val accuracy | test accuracy | test ROC AUC |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['seed']} | {r['image_size']} | {r['epochs']} | {r['wall_s']:.0f} | {r['val_acc']:.3f} | "
              f"{r['test_acc']:.4f} | {r['test_auc']:.4f} |" for r in rows]
    if len(acc) > 1:
        lines.append(f"\nTest accuracy: mean {statistics.mean(acc):.4f}, std {statistics.stdev(acc):.4f}, "
                     f"min {min(acc):.4f}, max {max(acc):.4f} over {len(acc)} seeds.\n")
    if ablation:
        lines += ["\n## Ablation (validation accuracy only, seed "
                  f"{args.ablation_seed}; each row changes one thing in the default recipe)\n",
                  "| variant | val accuracy | wall time (s) |", "| --- | --- | --- |"]
        lines += [f"| {name} | {r['val_acc']:.3f} | {r['wall_s']:.0f} |" for name, r in ablation]
    fileio.write_text(args.out, "\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
