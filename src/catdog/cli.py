"""The command line: parses arguments and dispatches to the library's functions."""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from catdog import __version__
from catdog.config import MODELS, TrainConfig


def _launch_torchrun(args, cfg: TrainConfig) -> int:
    """Re-run this same command as args.nproc processes under torchrun; seeing WORLD_SIZE, they train."""
    from catdog import distributed

    from catdog.data import split_dir
    from catdog.train import check_out_dir

    # what can be checked before any process starts is reported here, once
    distributed.check_batch(cfg.batch_size, args.nproc)
    split_dir(cfg.data, "train")
    if not args.resume:
        check_out_dir(Path(cfg.out), args.exist_ok)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")
           or str(max(1, (os.cpu_count() or 1) // args.nproc))}
    proc = subprocess.Popen(distributed.torchrun_command(args.nproc, args.argv), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # Ctrl-C reached torchrun too: let it stop its workers, so last.pt is left whole
        return 130  # rank 0 has said how to resume


# A resumed run keeps the recipe in its config.json: every train flag is refused with --resume except these, which
# say how it runs (not what it trains) or what the command does around the training.
RESUME_MAY_CHANGE = ("threads", "workers", "device")
RESUME_OPTIONS = ("command", "func", "resume", "nproc", "exist_ok", "no_eval", "no_progress")
FLAG_NAMES = {"data": "DATA", "bf16": "--bf16/--no-bf16"}  # the others are --name-with-dashes


def _check_test_classes(data: str) -> None:
    """Before any epoch: the test split that will be evaluated after training has the training split's classes."""
    from catdog.data import scan_folder, split_dir
    from catdog.report import has_test_split
    from catdog.train import RunError

    if has_test_split(data):
        train, test = scan_folder(split_dir(data, "train"))[0], scan_folder(Path(data, "test"))[0]
        if train != test:
            raise RunError(f"the test split's classes {test} differ from the training split's {train}: rename the "
                           f"folders to match, or train with --no-eval")


def _train(args) -> int:
    from catdog.train import RunError, fit

    if args.resume:
        cfg_path = Path(args.resume) / "config.json"
        if not (Path(args.resume) / "last.pt").exists() or not cfg_path.exists():
            raise RunError(f"nothing to resume in {args.resume} (no config.json and last.pt)")
        defaults = vars(build_parser().parse_args(["train"]))
        given = [FLAG_NAMES.get(k, "--" + k.replace("_", "-")) for k, v in defaults.items()
                 if k not in RESUME_MAY_CHANGE + RESUME_OPTIONS and getattr(args, k) != v]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with --resume: a resumed run keeps the recipe "
                             f"in {cfg_path} (only {', '.join('--' + k for k in RESUME_MAY_CHANGE)} may change)")
        resumed = TrainConfig.load(cfg_path)
        # the folder named is the run, wherever it was made from or moved to since
        resources = {k: getattr(args, k) for k in RESUME_MAY_CHANGE if getattr(args, k) is not None}
        cfg = dataclasses.replace(resumed, out=str(args.resume), **resources)
    else:
        cfg = TrainConfig.for_model(
            args.model, data=args.data, out=args.out, epochs=args.epochs, image_size=args.image_size,
            eval_scale=args.eval_scale, progressive=args.progressive, decode_scale=args.decode_scale,
            finetune=args.finetune,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, val_fraction=args.val_fraction,
            threads=args.threads, workers=args.workers, bf16=args.bf16, device=args.device)
    if args.nproc is not None and args.nproc < 1:
        raise ValueError("--nproc must be at least 1")
    if not args.no_eval and not args.resume:
        _check_test_classes(cfg.data)
    if (args.nproc or 1) > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args, cfg)
    summary = fit(cfg, resume=bool(args.resume), exist_ok=args.exist_ok, progress=not args.no_progress,
                  log=lambda m: print(m, file=sys.stderr))
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports and evaluates the run
    print(f"run folder: {summary['out']}  ({summary['train_s']} s training)", file=sys.stderr)
    if not args.no_eval:
        from catdog.report import has_test_split
        if has_test_split(cfg.data):
            _print_eval(_write_eval(cfg.out, None), json_out=False)  # also writes metrics, plots, report.html
            print(f"report: {Path(cfg.out) / 'report.html'}", file=sys.stderr)
    print(summary["out"])
    return 0


def _write_eval(run, data, device: str = "auto") -> dict:
    from catdog.evaluate import evaluate
    from catdog.report import evaluate_run

    if data is None and Path(run).is_dir():
        return evaluate_run(run, device=device)  # results.json, metrics.json, predictions/mistakes.csv, plots/, report.html
    return evaluate(run, data, device=device)


def _print_eval(result: dict, json_out: bool) -> None:
    if result.get("not_saved"):
        print(f"catdog: warning: {result['not_saved']}", file=sys.stderr)
    if json_out:
        print(json.dumps(result))
        return
    from catdog.data import skip_summary
    f = lambda v: "n/a" if v is None else f"{v:.4f}"
    print(f"{result['data']}: n={result['n']}  accuracy {f(result['accuracy'])}  loss {f(result['loss'])}  "
          f"roc_auc {f(result['roc_auc'])}  ap {f(result.get('average_precision'))}  "
          f"({skip_summary(result['skipped'])})", file=sys.stderr)
    at, vt = result.get("at_val_threshold"), result.get("val_threshold") or {}
    if at:
        print(f"  at the validation threshold {at['threshold']:.3f}: accuracy {f(at['accuracy'])}  "
              f"balanced accuracy {f(at['balanced_accuracy'])}", file=sys.stderr)
    elif vt.get("reason"):
        print(f"  {vt['reason']}", file=sys.stderr)


def _evaluate(args) -> int:
    result = _write_eval(args.run, args.data, args.device)
    _print_eval(result, args.json)
    return 1 if result.get("not_saved") else 0


def _explain(args) -> int:
    from catdog.explain import explain_files

    result = explain_files(args.run, args.images, args.out, args.method, args.layer)
    for f in result["failed"]:
        print(f"catdog: skipped {f['path']}: {f['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        for w in result["written"]:
            print(f"{w['out']}  ({w['path']}: {w['predicted']}, map for {w['explained']}, {args.method} at {result['layer']})")
    if not result["written"]:
        raise ValueError(f"no image could be explained ({len(result['failed'])} unreadable)")
    return 0


def _report(args) -> int:
    from catdog.report import evaluate_run, has_test_split, load_json, write_report
    from catdog.train import RunError

    run = Path(args.run)
    cfg = load_json(run / "config.json")
    if cfg is None:
        raise RunError(f"not a run folder (no config.json): {run}")
    if (args.evaluate or not (run / "metrics.json").exists()) and has_test_split(cfg["data"]):
        evaluate_run(run)
    else:
        if args.evaluate:
            print(f"catdog: {cfg['data']} has no test split to evaluate; the report shows what the run has",
                  file=sys.stderr)
        write_report(run)
    print(run / "report.html")
    return 0


def _data_download(args) -> int:
    from catdog.data import load_folder, skip_summary, split_dir
    from catdog.download import download_dataset

    out, digest = download_dataset(args.url, args.out, args.sha256, progress=sys.stderr.isatty())
    print(f"sha256 {digest}" + ("" if args.sha256 else " (pass --sha256 to verify it next time)"), file=sys.stderr)
    for split in ("train", "test"):
        if (out / split).is_dir() or split == "train":
            ds = load_folder(split_dir(out, split), 64, cache=False, progress=False)
            print(f"{split_dir(out, split)}: {len(ds)} images, classes {ds.classes}; {skip_summary(ds.skipped)}",
                  file=sys.stderr)
    print(out)
    return 0


def _data_check(args) -> int:
    from catdog.data import load_folder, skip_summary

    # a dataset root (DIR/train, DIR/test) is checked split by split, as train and evaluate will read it
    splits = [name for name in ("train", "test") if (Path(args.dir) / name).is_dir()]
    splits = splits if "train" in splits else []  # without train/, training reads the whole folder
    folders = [(name, Path(args.dir) / name) for name in splits] or [(None, Path(args.dir))]
    sets = {name: load_folder(folder, args.image_size, cache=False, workers=args.workers, progress=not args.json)
            for name, folder in folders}
    if args.json:
        info = {name: {"loaded": len(ds), "skipped": ds.skipped, "classes": ds.classes} for name, ds in sets.items()}
        print(json.dumps(info[None] if None in info else {
            "loaded": sum(len(ds) for ds in sets.values()), "skipped": [s for ds in sets.values() for s in ds.skipped],
            "classes": sets[splits[0]].classes, "splits": info}))
    else:
        for name, folder in folders:
            ds = sets[name]
            counts = ", ".join(f"{c}: {int((ds.labels == i).sum())}" for i, c in enumerate(ds.classes))
            print(f"{folder}: {len(ds)} images load ({counts}); {skip_summary(ds.skipped)}")
            for s in ds.skipped:
                print(f"  skipped {s['path']}: {s['reason']}")
    if len({tuple(ds.classes) for ds in sets.values()}) > 1:
        print("catdog: warning: the splits have different classes: "
              + "; ".join(f"{name}: {', '.join(ds.classes)}" for name, ds in sets.items()), file=sys.stderr)
    return 0 if all(len(ds) for ds in sets.values()) else 1


def _predict(args) -> int:
    from catdog.predict import predict_files

    n_ok, n_bad = predict_files(args.model, args.paths, fmt=args.format, out=args.out, cam_dir=args.cam,
                                threshold=args.threshold, progress=not args.no_progress, cache=not args.no_cache,
                                bf16=args.bf16)
    print(f"predicted {n_ok} image(s), {n_bad} unreadable" + (f"; rows in {args.out}" if args.out else ""),
          file=sys.stderr)
    if not n_ok + n_bad:
        from catdog.data import IMAGE_EXTS

        print(f"catdog: no image file under {', '.join(args.paths)} (folders are searched for "
              f"{' '.join(sorted(IMAGE_EXTS))})", file=sys.stderr)
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


def _int_in(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi], else a usage error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not between {lo} and {hi}")
        return value
    return parse


def _positive_float(hi: float):
    """An argparse type: a number above 0 and at most hi (nan and inf refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is not above 0 and at most {hi:g}")
        return value
    return parse


def _run_error() -> type[Exception]:
    """train.RunError once catdog.train is loaded; importing it here would pull in torch for ONNX-only commands."""
    train = sys.modules.get("catdog.train")
    return train.RunError if train is not None else ValueError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="catdog", description="Train, evaluate, explain, export and serve a CNN "
                                 "image classifier (cats vs dogs by default).")
    ap.add_argument("--version", action="version", version=f"catdog {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("data", nargs="?", default=None, help="dataset root (default: the embedded cats-vs-dogs set)")
    t.add_argument("--out", default="runs/train", help="run folder to create (default runs/train)")
    t.add_argument("--model", choices=MODELS, default="resnet", help="network (default resnet; seed = the seed's CNN)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--image-size", type=int, help="training input size (default: the model's recipe)")
    t.add_argument("--eval-scale", type=float,
                   help="validate and predict at image-size x this (default: the model's recipe; 1 for seed)")
    t.add_argument("--progressive", type=float,
                   help="start training at image-size x this and grow to image-size (default: the model's recipe; "
                        "0 = off)")
    t.add_argument("--decode-scale", type=float,
                   help="decode training images at image-size x this; random crops resample from that "
                        "(default: the model's recipe; 1 for seed)")
    t.add_argument("--finetune", type=float, metavar="SHARE",
                   help="this share of the epochs, at the end, fine-tunes on whole images at the evaluation size, "
                        "flipped only (default: the model's recipe; 0 = off)")
    t.add_argument("--batch-size", type=int,
                   help="global batch: images per step over all processes (each takes batch/nproc)")
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=_int_in(0, 2**31 - 1), default=0)
    t.add_argument("--val-fraction", type=float, help="share of train held out for validation (default 0.1)")
    t.add_argument("--threads", type=_int_in(0, 1024), help="torch threads (default: all cores)")
    t.add_argument("--workers", type=_int_in(0, 256), help="image-decoding processes (default: one per core)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (fast on CPUs with AMX; default: the model's recipe, on for resnet)")
    t.add_argument("--device", choices=("cpu", "cuda", "auto"),
                   help="auto (default): CUDA with mixed precision when a GPU is present, else CPU")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (DDP, launched through torchrun)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last completed epoch")
    t.add_argument("--exist-ok", action="store_true", help="allow writing into a folder that holds a run")
    t.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation at the end")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="evaluate a run on a folder-per-class set (its test split by default)")
    e.add_argument("run", help="run folder (or a .pt checkpoint)")
    e.add_argument("data", nargs="?", default=None, help="dataset root or folder (default: the run's test split)")
    e.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    e.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="auto (default): CUDA with mixed precision when a GPU is present, else CPU")
    e.set_defaults(func=_evaluate)

    x = sub.add_parser("explain", help="class activation maps: a heatmap over each image of what drove the prediction")
    x.add_argument("run", help="run folder (or a .pt checkpoint)")
    x.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    x.add_argument("--out", required=True, help="folder for the overlay PNGs")
    x.add_argument("--method", choices=("gradcam", "gradcampp", "layercam", "scorecam", "cam"), default="gradcam")
    x.add_argument("--layer", help="target layer name (default: found automatically)")
    x.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    x.set_defaults(func=_explain)

    r = sub.add_parser("report", help="write RUN/report.html (evaluating the run first if it has not been)")
    r.add_argument("run", help="run folder")
    r.add_argument("--evaluate", action="store_true", help="re-evaluate the test split even if metrics.json exists")
    r.set_defaults(func=_report)

    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    c = d.add_parser("check", help="list what loads and what is skipped, and why")
    c.add_argument("dir")
    c.add_argument("--json", action="store_true")
    c.add_argument("--image-size", type=_int_in(16, 1024), default=64)
    c.add_argument("--workers", type=_int_in(0, 256), default=0)
    c.set_defaults(func=_data_check)
    g = d.add_parser("download", help="fetch a dataset archive (.zip/.tar.*) by URL and unpack it as DIR/<class>/")
    g.add_argument("url")
    g.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    g.add_argument("--sha256", help="expected SHA-256 of the archive; a mismatch is refused")
    g.set_defaults(func=_data_download)

    p = sub.add_parser("predict", help="predict files, folders (recursive) or globs with a run, .pt or .onnx model")
    p.add_argument("model", help="run folder, .pt checkpoint or .onnx file")
    p.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--out", help="write the rows to this file (default: stdout)")
    p.add_argument("--cam", metavar="DIR", help="also write a class activation map overlay per image into DIR")
    p.add_argument("--threshold", type=float, default=0.5, help="P(second class) at or above which it is predicted")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-cache", action="store_true",
                   help="decode every file, without reading or adding to the decode cache (~/.cache/catdog)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for a PyTorch model: faster on CPUs with AMX, probabilities within ~0.01")
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
    s.add_argument("--port", type=_int_in(0, 65535), default=8000)
    s.add_argument("--max-mb", type=_positive_float(1024), default=10.0, help="largest accepted upload in MB (default 10)")
    s.set_defaults(func=_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    from catdog.data import DataError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc re-runs under torchrun
    if isinstance(sys.stdout, io.TextIOWrapper):
        # a file name that is not valid UTF-8 is printed as its own bytes (Python holds them as surrogate escapes)
        sys.stdout.reconfigure(errors="surrogateescape")
    rank = os.environ.get("RANK", "0")
    # a bad argument fails every rank alike under torchrun: rank 0 alone says so; anything else each rank says
    say = (lambda m: print(m, file=sys.stderr)) if rank == "0" else (lambda m: None)
    say_any = lambda m: print(m if rank == "0" else f"[rank {rank}] {m}", file=sys.stderr)
    started = time.time()
    def internal_error(e: Exception) -> int:  # a bug: one line, and the traceback when asked for
        if os.environ.get("CATDOG_DEBUG"):
            raise e
        say_any(f"catdog: internal error: {type(e).__name__}: {e} (set CATDOG_DEBUG=1 for the traceback)")
        return 1

    try:
        return args.func(args)
    except UnicodeError as e:  # a ValueError, but never a user's bad input here: a bug
        return internal_error(e)
    except (DataError, _run_error(), FileNotFoundError, ValueError) as e:
        say(f"catdog: error: {e}")
        return 2
    except BrokenPipeError:  # the reader of stdout left (`catdog predict ... | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit stays quiet
        return 141
    except OSError as e:  # a path that cannot be made, read or written (a file where a folder should be, ...)
        say_any(f"catdog: error: {e.strerror}: {e.filename}" if e.strerror and e.filename else f"catdog: error: {e}")
        return 2
    except KeyboardInterrupt:
        run = getattr(args, "resume", None) or getattr(args, "out", None)
        last = os.path.join(run, "last.pt") if args.command == "train" and run else None
        # resumable: this run saved something (an earlier run's last.pt in an --exist-ok folder is not this run)
        resumable = last and os.path.exists(last) and (args.resume or os.path.getmtime(last) >= started)
        say("catdog: interrupted" + (f"; resume with: catdog train --resume {run}" if resumable else ""))
        return 130
    except Exception as e:
        return internal_error(e)
