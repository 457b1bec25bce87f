"""Training throughput with 1 and N processes (DDP on this machine): images per second, as a Markdown table.

    python scripts/bench_distributed.py [DATA] --epochs 3 --model seed --image-size 64 --batch-size 32 --nproc 1 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(data: str, out: Path, nproc: int, args) -> dict:
    """One `catdog train` run; its throughput from history.csv (training + validation time per epoch), at one input
    size throughout (no progressive resizing)."""
    cmd = [sys.executable, "-m", "catdog", "train", *([data] if data else []), "--out", str(out), "--model", args.model,
           "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--seed", "0", *(["--progressive", "0"] if args.model == "resnet" else []), "--no-eval", "--no-progress",
           "--exist-ok", "--nproc", str(nproc),
           *(["--threads", str(args.threads)] if args.threads else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    rows = list(csv.DictReader(open(out / "history.csv")))
    n_train = sum(json.loads((out / "data.json").read_text())["train"].values())
    epoch_s = [float(r["epoch_s"]) for r in rows]
    # the first epoch pays for warm-up (allocations, thread pools): report the steady epochs when there are some
    steady = epoch_s[1:] or epoch_s
    return {"nproc": nproc, "n_train": n_train, "img_s": n_train * len(steady) / sum(steady),
            "epoch_s": sum(steady) / len(steady), "wall_s": wall, "val_acc": rows[-1]["val_acc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=None, help="dataset (default: the embedded cats-vs-dogs set)")
    ap.add_argument("--model", default="seed")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (default: cores / processes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [train(args.data, Path(tmp) / f"run{n}", n, args) for n in args.nproc]
    print(f"{args.model}, {args.image_size}px, global batch {args.batch_size}, {args.epochs} epochs, "
          f"{results[0]['n_train']} train images, {os.cpu_count()} cores, "
          f"{args.threads or 'cores / processes'} threads per process, load {os.getloadavg()[0]:.1f}\n")
    print("| processes | img/s (train+val, steady epochs) | s/epoch | wall s (incl. start-up) | final val_acc |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['nproc']} | {r['img_s']:.0f} | {r['epoch_s']:.2f} | {r['wall_s']:.1f} | {r['val_acc']} |")


if __name__ == "__main__":
    main()
