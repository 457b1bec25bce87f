"""Where the time goes: one training epoch of the seed network split into its stages, and file -> prediction
split into decoding and the forward pass, each with the levers off and on.

Usage: python benchmarks/breakdown.py [--data DIR] [--epochs 2] [--out benchmarks/breakdown.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from catdog import fileio, malloc  # noqa: E402
from catdog.augment import augment_batch, to_tensor  # noqa: E402
from catdog.data import decode_files, scan_folder, split_dir  # noqa: E402
from catdog.model import build_model, predict_probs  # noqa: E402
from catdog.predict import Classifier  # noqa: E402
from stepping import timed_step  # noqa: E402  (benchmarks/, the script's own folder)

STAGES = ("batch", "augment", "forward", "backward", "step")


def profile_epochs(images: np.ndarray, labels: np.ndarray, bf16: bool, channels_last: bool, batch: int,
                   epochs: int, fused: bool = False) -> dict:
    """Seconds per stage over the last `epochs` of epochs+1 (the first warms oneDNN up), and img/s."""
    torch.manual_seed(0)
    model = build_model("seed", images.shape[1])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3, fused=fused or None)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    t = dict.fromkeys(STAGES, 0.0)
    total = 0.0
    for epoch in range(epochs + 1):
        gen = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(len(x_all), generator=gen)
        marks = dict.fromkeys(STAGES, 0.0)
        start = time.perf_counter()
        for i in range(0, len(perm), batch):
            t0 = time.perf_counter()
            idx = perm[i:i + batch]
            x, y = to_tensor(x_all[idx]), y_all[idx].float()
            if not channels_last:
                x = x.contiguous()
            t1 = time.perf_counter()
            x = augment_batch(x, gen)
            if not channels_last:
                x = x.contiguous()
            t2 = time.perf_counter()
            t3, t4, t5 = timed_step(model, opt, x, y, bf16)
            for k, (a, b) in zip(STAGES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
                marks[k] += b - a
        if epoch:  # epoch 0 is warm-up
            total += time.perf_counter() - start
            for k in STAGES:
                t[k] += marks[k]
    return {"img_per_s": epochs * len(x_all) / total, **{k: v / total for k, v in t.items()}}


FIT_CHILD = """
import json, sys, tempfile, time
import torch
import catdog.malloc as m
if sys.argv[2] == "glibc-malloc":
    m._applied = False  # fit() then leaves glibc's thresholds as they are
elif sys.argv[2] == "keep-denormals":
    torch.set_flush_denormal = lambda on: True  # fit() then computes with denormal floats, as torch does by default
from catdog.config import TrainConfig
from catdog.train import fit
with tempfile.TemporaryDirectory() as tmp:
    cfg = TrainConfig.for_model("seed", data=sys.argv[1], out=tmp, epochs=int(sys.argv[3]), val_fraction=0.0,
                                bf16=True)  # as speed.py trains it
    h = fit(cfg, exist_ok=True, progress=False, log=lambda s: None)["history"]
print(json.dumps([r["epoch_s"] for r in h]))
"""


def profile_fit(data: Path, setting: str, epochs: int) -> list[float]:
    """Seconds per epoch, in order, of `catdog train --model seed --bf16` in a fresh process; setting is "catdog"
    (as it trains), "glibc-malloc" (malloc thresholds left alone) or "keep-denormals" (no denormal flushing)."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", FIT_CHILD, str(data), setting, str(epochs)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout
    return json.loads(out.splitlines()[-1])


def spread(values: list[float], digits: int = 2) -> str:
    """median (min–max)"""
    return f"{median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def profile_predict(paths: list[str], size: int, workers: int, decoder: str) -> dict:
    """Decode (in `workers` processes) then predict; seconds for each. decoder: "catdog" (decode_image: plain
    JPEGs through simplejpeg), "pillow-draft" (Pillow with DCT scaling, as before simplejpeg) or "pillow-full"
    (Pillow without DCT scaling: what a plain PIL open + resize costs)."""
    import catdog.data as D

    saved = D.decode_image
    if decoder != "catdog":
        def pillow(source, image_size, max_pixels=D.MAX_PIXELS):
            draft = image_size if decoder == "pillow-draft" else None
            return D.resize_square(D.open_image(source, max_pixels, draft_size=draft), image_size)
        D.decode_image = pillow
    try:
        t0 = time.perf_counter()
        arrays, _ = decode_files(paths, size, workers=workers)
        t1 = time.perf_counter()
    finally:
        D.decode_image = saved
    images = np.stack([a for a in arrays if a is not None])
    return _with_forward(images, t1 - t0)


def _with_forward(images: np.ndarray, decode_s: float) -> dict:
    """Time the seed network's forward pass over decoded images, in float32 and in bf16 (`catdog predict --bf16`);
    with the decoding time, the img/s of decoding then the float32 pass."""
    torch.manual_seed(0)
    model = build_model("seed", images.shape[1]).eval()
    batch = Classifier.batch_size  # as `catdog predict` runs it
    malloc.keep_freed_memory()  # as `catdog predict` does (tune_process_for_streaming)
    times = {}
    for bf16 in (False, True):
        predict_probs(model, images[:batch], batch_size=batch, bf16=bf16)  # warm-up
        t0 = time.perf_counter()
        predict_probs(model, images, batch_size=batch, bf16=bf16)
        times[bf16] = time.perf_counter() - t0
    return {"decode_s": decode_s, "forward_s": times[False], "forward_bf16_s": times[True],
            "img_per_s": len(images) / (decode_s + times[False])}


def profile_cached(paths: list[str], size: int) -> dict:
    """The same, with the decoded arrays read from a filled decode store instead of the JPEG files."""
    import tempfile

    from catdog.store import DecodeStore

    with tempfile.TemporaryDirectory() as tmp:
        store = DecodeStore(size, path=Path(tmp, "decoded.sqlite"))
        keys = [store.key(p) for p in paths]
        arrays, _ = decode_files(paths, size)
        store.put([(k, a) for k, a in zip(keys, arrays) if a is not None])
        store.close()
        t0 = time.perf_counter()
        store = DecodeStore(size, path=Path(tmp, "decoded.sqlite"))
        images = np.stack(store.get([store.key(p) for p in paths]))
        t1 = time.perf_counter()
        store.close()
    return _with_forward(images, t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "data/cats_and_dogs")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each training variant; the median is shown")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/breakdown.md")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    _, items = scan_folder(split_dir(args.data, "train"))
    arrays, _ = decode_files([p for p, _ in items], 64)
    keep = [i for i, a in enumerate(arrays) if a is not None]
    images = np.stack([arrays[i] for i in keep])
    labels = np.array([items[i][1] for i in keep])
    lines = [f"# Profile: where the time goes\n", f"Made by `python benchmarks/breakdown.py --data {args.data}` "
             f"({os.cpu_count()} CPU cores, {len(images)} training images at 64 px, seed network). Shares of the "
             "wall time of an epoch, after one warm-up epoch; img/s is the median (min–max) of "
             f"{args.repeats} runs of {args.epochs} epochs.\n",
             "| variant | img/s | " + " | ".join(STAGES) + " |", "| --- | --- | " + " | ".join("---" for _ in STAGES) + " |"]
    for name, kw in (("fp32, NCHW, batch 32 (the plain PyTorch loop)", dict(bf16=False, channels_last=False, batch=32)),
                     ("fp32, channels-last, batch 32", dict(bf16=False, channels_last=True, batch=32)),
                     ("bf16 autocast, channels-last, batch 32", dict(bf16=True, channels_last=True, batch=32)),
                     ("bf16 autocast, channels-last, batch 64", dict(bf16=True, channels_last=True, batch=64)),
                     ("bf16 autocast, channels-last, batch 32, fused Adam (catdog's --bf16)",
                      dict(bf16=True, channels_last=True, batch=32, fused=True))):
        runs = sorted((profile_epochs(images, labels, epochs=args.epochs, **kw) for _ in range(args.repeats)),
                      key=lambda r: r["img_per_s"])
        r = runs[len(runs) // 2]  # the median run
        lines.append(f"| {name} | {r['img_per_s']:.0f} ({runs[0]['img_per_s']:.0f}–{runs[-1]['img_per_s']:.0f}) | "
                     + " | ".join(f"{r[k]:.0%}" for k in STAGES) + " |")
        print(lines[-1], flush=True)

    lines += ["\n## An epoch inside `catdog train` (seed network, bf16, all training images, checkpoint each epoch)\n",
              "Each run is a fresh process training 6 epochs; seconds per epoch are the median over epochs 2-6 of "
              f"each run, then the median (min–max) over {args.repeats} runs, alternating the two settings. "
              "glibc's defaults return freed memory to the system, so each step faults its buffers in again "
              "(`catdog/malloc.py`).\n",
              "| malloc thresholds | s per epoch | img/s |", "| --- | --- | --- |"]
    fits = {"glibc-malloc": [], "catdog": []}
    for _ in range(args.repeats):
        for kind in fits:
            fits[kind].append(median(profile_fit(args.data, kind, 6)[1:]))
    for kind, times in fits.items():
        lines.append(f"| {'glibc default' if kind == 'glibc-malloc' else 'raised (catdog train)'} | {spread(times)} "
                     f"| {len(images) / median(times):.0f} |")
        print(lines[-1], flush=True)

    lines += ["\n## Denormal floats over a whole `catdog train --model seed --bf16` (25 epochs)\n",
              "Adam's first moment of a weight whose gradient stays zero (behind a dead ReLU) shrinks by 0.9 every "
              "step and becomes a denormal float after about 700 steps (epoch 11 here); the CPU computes with those "
              "far slower. catdog flushes them to zero while it trains. Fresh processes, alternating, "
              f"{args.repeats} each; median (min–max) over runs of each run's median epoch time.\n",
              "| denormals | s per epoch, epochs 2-10 | s per epoch, epochs 12-25 | sum of epoch times (s) |",
              "| --- | --- | --- | --- |"]
    runs = {"keep-denormals": [], "catdog": []}
    for _ in range(args.repeats):
        for kind in runs:
            runs[kind].append(profile_fit(args.data, kind, 25))
    for kind, hs in runs.items():
        name = "computed with (torch default)" if kind == "keep-denormals" else "flushed to zero (catdog train)"
        lines.append(f"| {name} | {spread([median(h[1:10]) for h in hs])} | {spread([median(h[11:]) for h in hs])} "
                     f"| {spread([sum(h) for h in hs], 1)} |")
        print(lines[-1], flush=True)

    _, test_items = scan_folder(split_dir(args.data, "test"))
    paths = [p for p, _ in test_items]
    lines += ["\n## File → prediction over the test folder\n",
              "Decoding, then the seed network's forward pass (batches of 64, all cores) over the decoded images; "
              "img/s counts decoding plus the float32 pass, one after the other.\n",
              "| variant | decode (s) | forward (s) | forward, bf16 (s) | img/s |", "| --- | --- | --- | --- | --- |"]
    for name, kw in (("Pillow, full JPEG decode, 1 process", dict(workers=1, decoder="pillow-full")),
                     ("Pillow, draft mode (DCT scaling), 1 process", dict(workers=1, decoder="pillow-draft")),
                     ("catdog: simplejpeg with DCT scaling, 1 process", dict(workers=1, decoder="catdog")),
                     (f"catdog: simplejpeg with DCT scaling, {os.cpu_count()} processes",
                      dict(workers=0, decoder="catdog"))):
        r = profile_predict(paths, 64, **kw)
        lines.append(f"| {name} | {r['decode_s']:.2f} | {r['forward_s']:.3f} | {r['forward_bf16_s']:.3f} | "
                     f"{r['img_per_s']:.0f} |")
        print(lines[-1], flush=True)
    r = profile_cached(paths, 64)
    lines.append(f"| decode cache hit (`catdog predict` of files seen before) | {r['decode_s']:.2f} | "
                 f"{r['forward_s']:.3f} | {r['forward_bf16_s']:.3f} | {r['img_per_s']:.0f} |")
    fileio.write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
