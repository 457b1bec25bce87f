"""Peak memory of `catdog predict` over many files: does it stay flat as the count grows?

    python benchmarks/predict_memory.py MODEL [--counts 10000 100000] [--dir /tmp/catdog-many]

Writes COUNT tiny 8x8 PNGs (folders of 1000) once per count, runs `catdog predict MODEL DIR --format csv --out ...`
in a fresh process for each, and prints its peak resident memory (ru_maxrss) and wall time.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MEASURE = ("import resource, sys\nfrom catdog.cli import main\nrc = main(sys.argv[1:])\n"
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)\n")


def tiny_pngs(root: Path, n: int, per_folder: int = 1000) -> None:
    """n copies of one 8x8 PNG under root/partNNN/, per_folder to a folder."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    for i in range(n):
        d = root / f"part{i // per_folder:03d}"
        if i % per_folder == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.png").write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="run folder, .pt or .onnx")
    ap.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "catdog-many"))
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    for n in args.counts:
        root = Path(args.dir) / str(n)
        if not root.exists():
            tiny_pngs(root, n)
        out = Path(args.dir) / f"{n}.csv"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", MEASURE, "predict", args.model, str(root), "--format", "csv",
                               "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        peak_mb = int(proc.stderr.split("MAXRSS_KB")[1].split()[0]) / 1024
        rows = sum(1 for _ in open(out)) - 1
        print(f"{n:>8} files: {rows} rows, peak RSS {peak_mb:.1f} MB, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
