"""Side-by-side speed benchmark: catdog vs the Keras seed (seed_keras.py), alternating, repeated, on one machine.

Measures, per dataset folder (DATA/{train,test}/<class>/):
  1. training the seed network for E epochs: img/s, wall time, test accuracy / ROC AUC, peak RSS;
  2. file -> prediction throughput over the test folder (decode + preprocess + forward): catdog with PyTorch
     and with ONNX Runtime vs Keras `predict` on `image_dataset_from_directory`;
  3. single-image latency (p50/p99) of catdog's in-process predict.
Each system runs in its own process (peak RSS from wait4); the two alternate, `--repeats` times each.
Writes a Markdown table (median, min, max) and a JSON file with every raw measurement.

Usage: python benchmarks/speed.py [--data DIR ...] [--repeats 3] [--epochs 25]
       [--keras-python benchmarks/.venv-keras/bin/python] [--seed-keras ../shared/anchors/seed_keras.py]
       [--out benchmarks/speed.md] [--json benchmarks/speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> tuple[dict, float]:
    """Run a child that prints one JSON line last; returns (that JSON, peak RSS in MiB of the child)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"timed out: {' '.join(cmd)}")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read()
        out.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return json.loads(lines[-1]), usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


# --- the catdog side, run as child processes of this script --------------------------------------------------

def child_train(data: str, out: str, epochs: int, batch_size: int, bf16: bool, seed: int) -> dict:
    """Train the seed network as seed_keras.py does (all train images, no validation), then evaluate test.

    The clock starts after the imports and includes decoding the images, as seed_keras.py's does.
    """
    t_imp = time.perf_counter()
    from catdog.config import TrainConfig
    from catdog.evaluate import evaluate
    from catdog.train import fit

    t0 = time.perf_counter()
    cfg = TrainConfig.for_model("seed", data=data, out=out, epochs=epochs, batch_size=batch_size, bf16=bf16,
                                val_fraction=0.0, seed=seed)
    summary = fit(cfg, exist_ok=True, progress=False, log=lambda m: None)
    train_s = time.perf_counter() - t0
    n = sum(json.loads(Path(out, "data.json").read_text())["train"].values())
    res = evaluate(out, data)
    return {"train_s": train_s, "train_img_per_s": epochs * n / train_s, "acc": res["accuracy"],
            "auc": res["roc_auc"], "loop_s": summary["train_s"], "import_s": t0 - t_imp}


def child_predict(model: str, folder: str, engine: str, latency_n: int, bf16: bool) -> dict:
    """Files -> probabilities over a folder through `catdog predict`'s streaming path, twice: first with an empty
    decode cache (every file decoded, and stored), then as a later `catdog predict` of the same files would run,
    reading the cache, as `catdog predict` runs; with bf16, PyTorch runs as
    `catdog predict --bf16` does, and its probabilities are compared with float32's. Then single-image latency."""
    import numpy as np

    from catdog.predict import Classifier, iter_inputs, predict_stream, tune_process_for_streaming
    from catdog.store import DecodeStore

    bf16 = bf16 and engine == "torch"
    clf = Classifier.load(model, bf16=bf16)
    tune_process_for_streaming()  # as `catdog predict` does after loading the model
    paths = [p for p, _ in iter_inputs([folder])]
    clf.predict(paths[:8])  # warm-up: first-call allocations are not throughput
    img_per_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("cold", "warm"):
            store = DecodeStore(clf.image_size, path=Path(tmp, "decoded.sqlite"))  # as a new process opens it
            t0 = time.perf_counter()
            rows = list(predict_stream(clf, ((p, None) for p in paths), store=store))
            img_per_s[kind] = len(rows) / (time.perf_counter() - t0)
            store.close()
            assert all(r["error"] is None for r in rows)
    lat = []
    for p in paths[:latency_n]:
        t = time.perf_counter()
        clf.predict([p])
        lat.append((time.perf_counter() - t) * 1000)
    res = {"engine": engine, "n": len(rows), "predict_img_per_s": img_per_s["cold"],
           "cached_img_per_s": img_per_s["warm"], "p50_ms": float(np.percentile(lat, 50)),
           "p99_ms": float(np.percentile(lat, 99))}
    if bf16:
        fp32 = Classifier.load(model).predict(paths)
        res["bf16_max_abs_diff"] = max(abs(r["probabilities"][c] - f.probabilities[c])
                                       for r, f in zip(rows, fp32) for c in clf.classes)
        res["bf16_labels_changed"] = sum(r["class"] != f.label for r, f in zip(rows, fp32))
    return res


# --- orchestration -----------------------------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def bench_dataset(data: Path, args, log) -> dict:
    py = sys.executable
    raw: dict[str, list] = {"keras": [], "catdog_train": [], "catdog_torch": [], "catdog_onnx": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            if args.keras_python and Path(args.seed_keras).exists():
                res, rss = run_measured([args.keras_python, args.seed_keras, str(data / "train"), str(data / "test")],
                                        env={"EPOCHS": str(args.epochs), "SEED": str(rep)})
                test = next(v for k, v in res.items() if isinstance(v, dict))
                raw["keras"].append({**res, **{f"test_{k}": v for k, v in test.items()}, "rss_mib": rss})
                log(f"  keras  rep {rep}: {res['train_img_per_s']} img/s train, acc {test['acc']}, "
                    f"{test['predict_img_per_s']} img/s predict, {rss:.0f} MiB")
            run = Path(tmp, f"run{rep}")
            cache = Path(tmp, f"cache{rep}")  # a cold cache each time: decoding is part of the measurement
            res, rss = run_measured([py, __file__, "--child-train", str(data), str(run), "--epochs", str(args.epochs), "--seed", str(rep),
                                     "--batch-size", str(args.batch_size), "--precision", args.precision],
                                    env={"CATDOG_CACHE": str(cache)})
            raw["catdog_train"].append({**res, "rss_mib": rss})
            log(f"  catdog rep {rep}: {res['train_img_per_s']:.0f} img/s train, acc {res['acc']:.4f}, {rss:.0f} MiB")
            onnx = Path(tmp, f"run{rep}.onnx")
            subprocess.run([py, "-m", "catdog", "export", str(run), "--format", "onnx", "--out", str(onnx)],
                           check=True, capture_output=True, stdin=subprocess.DEVNULL)
            for engine, model in (("torch", run), ("onnx", onnx)):
                res, rss = run_measured([py, __file__, "--child-predict", str(model), str(data / "test"), engine,
                                         "--latency-n", str(args.latency_n), "--precision", args.precision],
                                        env={"CATDOG_CACHE": str(cache)})
                raw[f"catdog_{engine}"].append({**res, "rss_mib": rss})
                log(f"  catdog {engine}: {res['predict_img_per_s']:.0f} img/s predict, {res['cached_img_per_s']:.0f} cached, "
                    f"p50 {res['p50_ms']:.1f} ms, "
                    f"{rss:.0f} MiB")
    return raw


def summarise(raw: dict) -> dict:
    s = {}
    if raw["keras"]:
        s["keras_train_img_per_s"] = stats([r["train_img_per_s"] for r in raw["keras"]])
        s["keras_train_s"] = stats([r["train_s"] for r in raw["keras"]])
        s["keras_acc"] = stats([r["test_acc"] for r in raw["keras"]])
        s["keras_predict_img_per_s"] = stats([r["test_predict_img_per_s"] for r in raw["keras"]])
        s["keras_rss_mib"] = stats([r["rss_mib"] for r in raw["keras"]])
    t = raw["catdog_train"]
    s["catdog_train_img_per_s"] = stats([r["train_img_per_s"] for r in t])
    s["catdog_train_s"] = stats([r["train_s"] for r in t])
    s["catdog_acc"] = stats([r["acc"] for r in t])
    s["catdog_train_rss_mib"] = stats([r["rss_mib"] for r in t])
    for engine in ("torch", "onnx"):
        rows = raw[f"catdog_{engine}"]
        s[f"catdog_{engine}_predict_img_per_s"] = stats([r["predict_img_per_s"] for r in rows])
        s[f"catdog_{engine}_cached_img_per_s"] = stats([r["cached_img_per_s"] for r in rows])
        s[f"catdog_{engine}_p50_ms"] = stats([r["p50_ms"] for r in rows])
        s[f"catdog_{engine}_p99_ms"] = stats([r["p99_ms"] for r in rows])
        s[f"catdog_{engine}_rss_mib"] = stats([r["rss_mib"] for r in rows])
    if all("bf16_max_abs_diff" in r for r in raw["catdog_torch"]):
        s["bf16_max_abs_diff"] = max(r["bf16_max_abs_diff"] for r in raw["catdog_torch"])
        s["bf16_labels_changed"] = max(r["bf16_labels_changed"] for r in raw["catdog_torch"])
    if raw["keras"]:
        s["ratio_train"] = s["catdog_train_img_per_s"]["median"] / s["keras_train_img_per_s"]["median"]
        for engine in ("torch", "onnx"):
            for kind in ("predict", "cached"):
                s[f"ratio_{kind}_{engine}"] = (s[f"catdog_{engine}_{kind}_img_per_s"]["median"]
                                               / s["keras_predict_img_per_s"]["median"])
    return s


def markdown(results: dict, args) -> str:
    lines = [f"# Speed: catdog vs the Keras seed, side by side\n",
             f"Made by `python benchmarks/speed.py` ({args.repeats} alternating repeats each, seed network, "
             f"{args.epochs} epochs, batch {args.batch_size}, catdog {'bf16 autocast' if args.bf16 else 'fp32'}, "
             f"{os.cpu_count()} CPU cores). Figures: median (min–max).\n",
             "Training time runs from after the imports to the end of the last epoch on both sides, decoding "
             "the images included; repeat k trains with seed k on both sides. File → prediction lists the files "
             "first on both sides, then times decoding, resizing and the forward pass; catdog's first pass starts "
             "from an empty decode cache (and fills it), the \"same files again\" rows are a second pass over the "
             "same files, read from that cache, as a later `catdog predict` of the folder runs. catdog predicts as "
             "`catdog predict` does: a thread per core decodes the next 64 files while the model scores the current "
             "ones on half the cores.\n"]
    for name, s in results.items():
        lines += [f"\n## {name}\n", "| measure | Keras seed | catdog | catdog / Keras |", "| --- | --- | --- | --- |"]
        k = lambda key, d=1: fmt(s[key], d) if key in s else "n/a"
        r = lambda key: f"{s[key]:.2f}x" if key in s else "n/a"
        lines += [
            f"| training img/s | {k('keras_train_img_per_s', 0)} | {k('catdog_train_img_per_s', 0)} | {r('ratio_train')} |",
            f"| training wall time (s) | {k('keras_train_s')} | {k('catdog_train_s')} | |",
            f"| test accuracy after training | {k('keras_acc', 4)} | {k('catdog_acc', 4)} | |",
            f"| file → prediction img/s, PyTorch | {k('keras_predict_img_per_s', 0)} | {k('catdog_torch_predict_img_per_s', 0)} | {r('ratio_predict_torch')} |",
            f"| file → prediction img/s, ONNX Runtime | {k('keras_predict_img_per_s', 0)} | {k('catdog_onnx_predict_img_per_s', 0)} | {r('ratio_predict_onnx')} |",
            f"| same files again (decode cache), PyTorch | {k('keras_predict_img_per_s', 0)} | {k('catdog_torch_cached_img_per_s', 0)} | {r('ratio_cached_torch')} |",
            f"| same files again (decode cache), ONNX Runtime | {k('keras_predict_img_per_s', 0)} | {k('catdog_onnx_cached_img_per_s', 0)} | {r('ratio_cached_onnx')} |",
            f"| single-image latency p50 / p99 (ms), PyTorch | | {k('catdog_torch_p50_ms', 2)} / {k('catdog_torch_p99_ms', 2)} | |",
            f"| single-image latency p50 / p99 (ms), ONNX | | {k('catdog_onnx_p50_ms', 2)} / {k('catdog_onnx_p99_ms', 2)} | |",
            f"| peak RSS training (MiB) | {k('keras_rss_mib', 0)} | {k('catdog_train_rss_mib', 0)} | |",
            f"| peak RSS predict (MiB), PyTorch / ONNX | | {k('catdog_torch_rss_mib', 0)} / {k('catdog_onnx_rss_mib', 0)} | |",
        ]
        if "bf16_max_abs_diff" in s:
            lines.append(f"\nPyTorch predicts with `--bf16`: its probabilities differ from float32's by "
                         f"{s['bf16_max_abs_diff']:.1e} at most, and {s['bf16_labels_changed']} of the test images "
                         f"change class (worst repeat).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="catdog's precision, training and PyTorch predict (bf16 autocast pays on CPUs with AMX)")
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="(child) catdog's training seed; repeat k uses seed k")
    ap.add_argument("--keras-python", default=str(REPO / "benchmarks/.venv-keras/bin/python"))
    ap.add_argument("--seed-keras", default=str(REPO.parent / "shared/anchors/seed_keras.py"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/speed.md")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks/speed.json")
    ap.add_argument("--profile", type=Path, default=REPO / "benchmarks/breakdown.md",
                    help="profile to append to the report (written by benchmarks/breakdown.py)")
    ap.add_argument("--child-train", nargs=2, metavar=("DATA", "RUN"))
    ap.add_argument("--child-predict", nargs=3, metavar=("MODEL", "FOLDER", "ENGINE"))
    args = ap.parse_args()
    args.bf16 = args.precision == "bf16"

    if args.child_train:
        print(json.dumps(child_train(*args.child_train, args.epochs, args.batch_size, args.bf16, args.seed)))
        return
    if args.child_predict:
        print(json.dumps(child_predict(*args.child_predict, args.latency_n, args.bf16)))
        return

    if not Path(args.keras_python).exists():
        print(f"note: no Keras interpreter at {args.keras_python}: catdog side only", file=sys.stderr)
        args.keras_python = None
    datasets = args.data or [p for p in (REPO.parent / "shared/data/cats_and_dogs", REPO / "data/cats_and_dogs")
                             if p.is_dir()]
    results, raw = {}, {}
    for data in datasets:
        print(f"{data}:", file=sys.stderr, flush=True)
        raw[str(data)] = bench_dataset(data, args, lambda m: print(m, file=sys.stderr, flush=True))
        results[str(data)] = summarise(raw[str(data)])
    from catdog import fileio
    fileio.write_text(args.json, json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "summary": results, "raw": raw}, indent=2))
    text = markdown(results, args)
    if args.profile.exists():  # the profile of benchmarks/breakdown.py, which `make bench` runs first
        body = args.profile.read_text().split("\n", 1)[1].replace("\n## ", "\n### ")
        text += f"\n## Where the time goes (from `{args.profile.relative_to(REPO) if args.profile.is_relative_to(REPO) else args.profile}`)\n{body}"
    fileio.write_text(args.out, text)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
