"""The command line: parses arguments and dispatches to the library's functions."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from catdog.config import MODELS, TrainConfig


def _train(args) -> int:
    from catdog.train import RunError, fit

    if args.resume:
        cfg_path = Path(args.resume) / "config.json"
        if not (Path(args.resume) / "last.pt").exists() or not cfg_path.exists():
            raise RunError(f"nothing to resume in {args.resume} (no config.json and last.pt)")
        cfg = TrainConfig.load(cfg_path)
    else:
        cfg = TrainConfig.for_model(
            args.model, data=args.data, out=args.out, epochs=args.epochs, image_size=args.image_size,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, val_fraction=args.val_fraction,
            threads=args.threads, workers=args.workers, bf16=args.bf16 or None, device=args.device)
    summary = fit(cfg, resume=bool(args.resume), exist_ok=args.exist_ok, progress=not args.no_progress,
                  log=lambda m: print(m, file=sys.stderr))
    print(f"run folder: {summary['out']}  ({summary['train_s']} s training)", file=sys.stderr)
    if not args.no_eval:
        from catdog.data import split_dir
        test = split_dir(cfg.data, "test")
        if test != Path(cfg.data) or Path(cfg.data, "test").is_dir():
            _print_eval(_write_eval(cfg.out, None), json_out=False)
    print(summary["out"])
    return 0


def _write_eval(run, data) -> dict:
    from catdog import fileio
    from catdog.evaluate import evaluate

    result = evaluate(run, data)
    if data is None:
        fileio.write_text(Path(run) / "results.json", json.dumps(result, indent=2))
    return result


def _print_eval(result: dict, json_out: bool) -> None:
    if json_out:
        print(json.dumps(result))
        return
    from catdog.data import skip_summary
    print(f"{result['data']}: n={result['n']}  accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
          f"roc_auc {result['roc_auc']:.4f}  ({skip_summary(result['skipped'])})", file=sys.stderr)


def _evaluate(args) -> int:
    _print_eval(_write_eval(args.run, args.data), args.json)
    return 0


def _data_check(args) -> int:
    from catdog.data import load_folder, skip_summary

    ds = load_folder(args.dir, args.image_size, cache=False, workers=args.workers, progress=not args.json)
    if args.json:
        print(json.dumps({"loaded": len(ds), "skipped": ds.skipped, "classes": ds.classes}))
    else:
        counts = ", ".join(f"{c}: {int((ds.labels == i).sum())}" for i, c in enumerate(ds.classes))
        print(f"{args.dir}: {len(ds)} images load ({counts}); {skip_summary(ds.skipped)}")
        for s in ds.skipped:
            print(f"  skipped {s['path']}: {s['reason']}")
    return 0 if len(ds) else 1


def _predict(args) -> int:
    from catdog.predict import predict_files

    n_ok, n_bad = predict_files(args.model, args.paths, fmt=args.format, out=args.out, cam_dir=args.cam,
                                threshold=args.threshold, progress=not args.no_progress)
    print(f"predicted {n_ok} image(s), {n_bad} unreadable" + (f"; rows in {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0 if n_ok else 1


def _export(args) -> int:
    from catdog.export import export_onnx

    info = export_onnx(args.run, args.out, atol=args.atol)
    print(f"checked {info['checked_images']} images: max |onnx - torch| = {info['max_abs_diff']:.2g} "
          f"<= atol {info['atol']:g}", file=sys.stderr)
    print(info["out"])
    return 0


def _serve(args) -> int:
    from catdog.serve import serve

    serve(args.run, host=args.host, port=args.port, max_bytes=int(args.max_mb * 1024 * 1024))
    return 0


def _run_error() -> type[Exception]:
    """train.RunError once catdog.train is loaded; importing it here would pull in torch for ONNX-only commands."""
    train = sys.modules.get("catdog.train")
    return train.RunError if train is not None else ValueError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="catdog", description="Train, evaluate, explain, export and serve a CNN "
                                 "image classifier (cats vs dogs by default).")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("data", nargs="?", default=None, help="dataset root (default: the embedded cats-vs-dogs set)")
    t.add_argument("--out", default="runs/train", help="run folder to create (default runs/train)")
    t.add_argument("--model", choices=MODELS, default="resnet", help="network (default resnet; seed = the seed's CNN)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--image-size", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-fraction", type=float, help="share of train held out for validation (default 0.1)")
    t.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    t.add_argument("--workers", type=int, help="image-decoding processes (default: one per core)")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AMX)")
    t.add_argument("--device", choices=("cpu", "cuda", "auto"))
    t.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last completed epoch")
    t.add_argument("--exist-ok", action="store_true", help="allow writing into a folder that holds a run")
    t.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation at the end")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="evaluate a run on a folder-per-class set (its test split by default)")
    e.add_argument("run", help="run folder (or a .pt checkpoint)")
    e.add_argument("data", nargs="?", default=None, help="dataset root or folder (default: the run's test split)")
    e.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    e.set_defaults(func=_evaluate)

    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    c = d.add_parser("check", help="list what loads and what is skipped, and why")
    c.add_argument("dir")
    c.add_argument("--json", action="store_true")
    c.add_argument("--image-size", type=int, default=64)
    c.add_argument("--workers", type=int, default=0)
    c.set_defaults(func=_data_check)

    p = sub.add_parser("predict", help="predict files, folders (recursive) or globs with a run, .pt or .onnx model")
    p.add_argument("model", help="run folder, .pt checkpoint or .onnx file")
    p.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--out", help="write the rows to this file (default: stdout)")
    p.add_argument("--cam", metavar="DIR", help="also write a class activation map overlay per image into DIR")
    p.add_argument("--threshold", type=float, default=0.5, help="P(second class) at or above which it is predicted")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    x = sub.add_parser("export", help="export a run to ONNX, checked against PyTorch")
    x.add_argument("run", help="run folder or .pt checkpoint")
    x.add_argument("--format", choices=("onnx",), default="onnx")
    x.add_argument("--out", help="output file (default: model.onnx beside the checkpoint)")
    x.add_argument("--atol", type=float, default=1e-5, help="largest allowed probability difference (default 1e-5)")
    x.set_defaults(func=_export)

    s = sub.add_parser("serve", help="HTTP API and web page for a run (FastAPI + uvicorn)")
    s.add_argument("run", help="run folder, .pt checkpoint or .onnx file")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-mb", type=float, default=10.0, help="largest accepted upload in MB (default 10)")
    s.set_defaults(func=_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    from catdog.data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, _run_error(), FileNotFoundError, ValueError) as e:
        print(f"catdog: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        run = getattr(args, "out", None) or getattr(args, "resume", None)
        msg = f"; resume with: catdog train --resume {run}" if args.command == "train" and run else ""
        print(f"catdog: interrupted{msg}", file=sys.stderr)
        return 130
