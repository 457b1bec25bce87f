"""Accuracy benchmark: the default recipe over several seeds, and an ablation judged on validation only.

Every choice is made on the validation split carved from train; the test split is evaluated once per seed of
the final recipe and is never looked at for the ablation rows.

Usage: python benchmarks/accuracy.py [--seeds 0 1 2] [--ablation [ROW ...]] [--data DIR] [--out benchmarks/accuracy.md]

Each finished run is added to a JSON file beside the Markdown (benchmarks/accuracy.json), so rows can be run in
separate invocations (even at the same time) and one table is written from all of them. Results of another recipe
are dropped. A section of the Markdown that starts with "## How the recipe was chosen" is written by hand and kept.
"""
from __future__ import annotations

import argparse
import fcntl
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

# Each ablation row takes one ingredient out of the default recipe (or adds or changes one setting).
ABLATIONS: dict[str, dict] = {
    "default recipe": {},
    "no mixup/cutmix": {"mix": 0.0},
    "no colour jitter": {"jitter": 0.0},
    "no random-resized crop": {"crop": 0.0},
    "no label smoothing": {"label_smoothing": 0.0},
    "no test-time flip": {"tta": False},
    "64 px instead of 96 px (the stem keeps stride 1: 32x32 maps, about 1.5x the compute)": {"image_size": 64},
    "with random erasing (p = 0.25)": {"erase": 0.25},
    "with EMA of weights (decay 0.998)": {"ema": 0.998},
    "fp32 instead of bf16": {"bf16": False},
    "evaluated at the training size (eval_scale 1)": {"eval_scale": 1.0},
    "no progressive resizing (180 epochs at 96 px)": {"progressive": 0.0, "epochs": 180},
    "batch 32 (lr 2e-3, 210 epochs)": {"batch_size": 32, "lr": 2e-3, "epochs": 210},
    "training images decoded at 4/3 of the image size (128 px)": {"decode_scale": 4 / 3},
    # the first 240 epochs are the recipe's own, then 5 fine-tuning epochs; best.pt among those 5
    "with fine-tuning at 112 px (245 epochs, the last 5 on whole images)": {"epochs": 245, "finetune": 0.02},
}
NOTES_HEADING = "## How the recipe was chosen"
RECIPE_KEYS = ("image_size", "eval_scale", "progressive", "epochs", "batch_size", "lr", "optimizer", "schedule",
               "weight_decay", "label_smoothing", "crop", "jitter", "erase", "mix", "ema", "tta", "bf16")


def train_one(overrides: dict, seed: int, data: str | None, test: bool) -> dict:
    """Train one recipe; returns wall time, validation accuracy (best epoch, and the mean of the last ten epochs)
    and, if asked, test metrics of the checkpoint chosen on validation."""
    with tempfile.TemporaryDirectory() as tmp:
        fields = {"seed": seed, "out": tmp, **({"data": data} if data else {}), **overrides}
        cfg = TrainConfig.for_model("resnet", **fields)
        t0 = time.perf_counter()
        summary = fit(cfg, exist_ok=True, progress=False, log=lambda m: None)
        wall = time.perf_counter() - t0
        history = summary["history"]
        best = max(history, key=lambda r: (r["val_acc"], -r["val_loss"]))
        row = {"seed": seed, "image_size": cfg.image_size, "epochs": cfg.epochs, "wall_s": round(wall, 1),
               "threads": cfg.threads or os.cpu_count(),
               "val_acc": best["val_acc"], "best_epoch": best["epoch"],
               "val_acc_last10": round(statistics.mean(r["val_acc"] for r in history[-10:]), 4)}
        if cfg.eval_size != cfg.image_size:
            row["eval_size"] = cfg.eval_size
            row["val_acc_at_train_size"] = val_accuracy_at(tmp, cfg, cfg.image_size)
        if test:
            res = evaluate(tmp, data)
            row.update(test_acc=res["accuracy"], test_auc=res["roc_auc"])
        return row


def val_accuracy_at(run: str, cfg: TrainConfig, size: int) -> float:
    """Validation accuracy of the run's chosen checkpoint with its validation images decoded at `size`."""
    import torch

    from catdog.data import load_folder, split_dir, split_indices
    from catdog.model import load_checkpoint, predict_probs

    model, meta = load_checkpoint(run)
    train = load_folder(split_dir(cfg.data, "train"), size)
    _, val_idx = split_indices(train.labels, cfg.val_fraction, cfg.seed)
    probs = predict_probs(model, train.images[val_idx], tta=cfg.tta, bf16=cfg.bf16)
    return round(float(((probs > 0.5).long() == torch.from_numpy(train.labels[val_idx])).float().mean()), 4)


def record(path: Path, recipe: dict, kind: str, key: str, row: dict) -> dict:
    """Add one result to the JSON file under a lock (other invocations may be writing); returns all results."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path, recipe)
        results[kind][key] = row
        fileio.write_text(path, json.dumps(results, indent=2))
    return results


def load_results(path: Path, recipe: dict) -> dict:
    try:
        results = json.loads(path.read_text())
        if results.get("recipe") == recipe:
            return results
    except (OSError, ValueError):
        pass
    return {"recipe": recipe, "seeds": {}, "ablation": {}}


def wall(row: dict) -> str:
    """A run's wall time, marked when it trained with fewer threads than the machine has cores (two rows at once)."""
    threads = row.get("threads", os.cpu_count())
    return f"{row['wall_s']:.0f}" + (f" ({threads} thread{'s' * (threads > 1)})" if threads < os.cpu_count() else "")


def markdown(results: dict, command: str, notes: str) -> str:
    rows = [results["seeds"][k] for k in sorted(results["seeds"], key=int)]
    lines = ["# Accuracy of the default recipe\n",
             "Made by `python benchmarks/accuracy.py --seeds 0 1 2` (the per-seed table) and "
             "`python benchmarks/accuracy.py --seeds --ablation ROW...` (ablation rows), which add to the same "
             f"tables; the last invocation was `{command}`. {os.cpu_count()} CPU cores. Model `resnet`, recipe: "
             f"`{json.dumps(results['recipe'])}`.\n",
             "The checkpoint is chosen on the validation split (10 % of train); the test split (624 images) is "
             "evaluated once per seed.\n",
             "Images are trained on at the image size and evaluated (validation and test) at the evaluation size; the "
             "last column is the chosen checkpoint's validation accuracy with the images at the training size "
             "instead.\n",
             "| seed | image size | eval size | epochs | wall time (s) | val accuracy | test accuracy | test ROC AUC "
             "| val accuracy at the image size |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:  # without an evaluation size the last column would repeat the val accuracy: "="
        at_train = f"{r['val_acc_at_train_size']:.3f}" if "val_acc_at_train_size" in r else "="
        lines.append(f"| {r['seed']} | {r['image_size']} | {r.get('eval_size', r['image_size'])} | {r['epochs']} | "
                     f"{wall(r)} | {r['val_acc']:.3f} | {r['test_acc']:.4f} | {r['test_auc']:.4f} | "
                     f"{at_train} |")
    acc = [r["test_acc"] for r in rows]
    if len(acc) > 1:
        lines.append(f"\nTest accuracy: mean {statistics.mean(acc):.4f}, std {statistics.stdev(acc):.4f}, "
                     f"min {min(acc):.4f}, max {max(acc):.4f} over {len(acc)} seeds.\n")
    ablation = results["ablation"]
    if ablation:
        seeds = sorted({r["seed"] for r in ablation.values()})
        lines += [f"\n## Ablation (validation accuracy only, seed {', '.join(map(str, seeds))}; each row changes one "
                  "thing in the default recipe)\n",
                  "The validation split has 200 images: one image is half a point, and differences under about 3 "
                  "points are within its noise. The mean over the last ten epochs is steadier than the best epoch.\n",
                  "| variant | best val accuracy | mean val accuracy, last 10 epochs | wall time (s) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {ablation[name]['val_acc']:.3f} | {ablation[name].get('val_acc_last10', float('nan')):.3f} | "
                  f"{wall(ablation[name])} |" for name in ABLATIONS if name in ablation]
    return "\n".join(lines) + "\n" + (f"\n\n{notes}" if notes else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the default recipe to run")
    ap.add_argument("--ablation", nargs="*", metavar="ROW", help=f"ablation rows to run (validation only; none "
                    f"named: all): {', '.join(repr(n) for n in ABLATIONS)}")
    ap.add_argument("--ablation-seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="dataset root (default: the embedded set)")
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (for a quick check)")
    ap.add_argument("--image-size", type=int, help="override the recipe's image size (for a quick check)")
    ap.add_argument("--threads", type=int, help="torch threads per run (default: all cores); 1 lets two rows run at "
                    "once on 2 cores, at about twice the wall time each")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/accuracy.md")
    args = ap.parse_args()
    rows_asked = list(ABLATIONS) if args.ablation == [] else (args.ablation or [])
    unknown = [r for r in rows_asked if r not in ABLATIONS]
    if unknown:
        ap.error(f"unknown ablation row(s) {unknown}; known: {list(ABLATIONS)}")

    # threads is no part of the recipe (RECIPE_KEYS): it changes how fast a run goes, not what it trains
    base = {k: v for k, v in (("epochs", args.epochs), ("image_size", args.image_size), ("threads", args.threads))
            if v is not None}
    cfg = TrainConfig.for_model("resnet", **base)
    recipe = {k: getattr(cfg, k) for k in RECIPE_KEYS}
    json_path = args.out.with_suffix(".json")
    results = load_results(json_path, recipe)
    for seed in args.seeds:
        row = train_one(base, seed, args.data, test=True)
        results = record(json_path, recipe, "seeds", str(seed), row)
        print(json.dumps(row), flush=True)
    for name in rows_asked:
        seed_row = results["seeds"].get(str(args.ablation_seed))
        if name == "default recipe" and seed_row:
            row = {k: v for k, v in seed_row.items() if not k.startswith("test_")}
        else:
            row = train_one({**base, **ABLATIONS[name]}, args.ablation_seed, args.data, test=False)
        results = record(json_path, recipe, "ablation", name, row)
        print(name, json.dumps(row), flush=True)

    try:
        old = args.out.read_text()
        notes = old[old.index(NOTES_HEADING):].strip() + "\n" if NOTES_HEADING in old else ""
    except OSError:
        notes = ""
    command = "python benchmarks/accuracy.py" + "".join(f" {a}" if " " not in a else f" '{a}'" for a in sys.argv[1:])
    fileio.write_text(args.out, markdown(results, command, notes))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
