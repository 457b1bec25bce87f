"""Inference with a trained model: a run folder, a .pt checkpoint or an exported .onnx file.

torch is imported only when a PyTorch checkpoint is loaded, so predicting with an .onnx file needs numpy, Pillow
and ONNX Runtime alone. Decoding goes through catdog.data, shared with training (same resize, same pixel limit).
"""
from __future__ import annotations

import gc
import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from catdog import malloc
from catdog.config import RUN_FILES, RUN_MARKERS, model_meta_problem
from catdog.data import MAX_PIXELS, SkipImage, decode_image, is_image_file
from catdog.store import DecodeStore

ONNX_INPUT = "image"  # float32 (B, 3, S, S), RGB, uint8 / 255, no mean/std normalisation
ONNX_OUTPUT = "probs"  # float32 (B, 2): P(classes[0]), P(classes[1]), flip averaging applied when tta is on


def onnx_input(images: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) images as the exported graph's input: float32 (B, 3, S, S) in [0, 1], C-contiguous.

    One pass into a contiguous array: `transpose().astype() / 255` kept the transposed memory order, which ONNX
    Runtime then copied again; this took 0.5 ms per batch of 64 at 64 px instead of 1.8 ms, with equal values.
    """
    x = np.empty((images.shape[0], images.shape[3], images.shape[1], images.shape[2]), np.float32)
    np.divide(images.transpose(0, 3, 1, 2), np.float32(255), out=x, dtype=np.float32)
    return x


class ModelError(ValueError):
    """A model source that cannot be loaded (missing, wrong kind of file, incomplete metadata)."""


@dataclass
class Prediction:
    """One image's result: the predicted class and the probability of each class."""

    label: str
    probabilities: dict[str, float]

    def to_dict(self) -> dict:
        return {"class": self.label, "probabilities": self.probabilities}


def resolve_model(source: str | Path) -> Path:
    """The file to load: the .pt/.onnx given, or a run folder's best.pt, last.pt, then model.onnx."""
    source = Path(source)
    if source.is_dir():
        for name in ("best.pt", "last.pt", "model.onnx"):
            if (source / name).is_file():
                return source / name
        raise ModelError(f"no model in {source} (expected best.pt, last.pt or model.onnx)")
    if not source.is_file():
        raise ModelError(f"model not found: {source}")
    if source.suffix not in (".pt", ".onnx"):
        raise ModelError(f"{source} is neither a run folder, a .pt checkpoint nor an .onnx file")
    return source


class _TorchRunner:
    """A PyTorch checkpoint; the only runner that can compute class activation maps."""

    kind = "torch"

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0, bf16: bool = False):
        import torch

        from catdog.model import load_checkpoint

        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting

        try:
            self.model, meta = load_checkpoint(path, device)
        except (KeyError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise ModelError(f"cannot load checkpoint {path}: {e}") from None
        self.device, self.meta = device, meta
        self.classes, self.image_size = list(meta["classes"]), int(meta["image_size"])
        self.tta, self.model_name = bool(meta.get("tta", False)), meta["model"]
        self.bf16, self.threads = bf16, torch.get_num_threads()
        self.torch = torch  # kept: a stream closed at interpreter exit can no longer import it

    def limit_threads(self, n: int | None) -> None:
        """Run the next forward passes on at most n threads (None: as many as loaded with)."""
        want = self.threads if n is None else max(1, min(n, self.threads))
        if self.torch.get_num_threads() != want:  # resizing OpenMP's team costs ~0.5 ms: only when the share changes
            self.torch.set_num_threads(want)

    def probs1(self, images: np.ndarray) -> np.ndarray:
        from catdog.model import predict_probs

        return predict_probs(self.model, images, tta=self.tta, device=self.device,
                             bf16=self.bf16).numpy().astype(np.float64)

    def cams(self, images: np.ndarray, class_idx: list[int], method: str = "gradcam") -> np.ndarray:
        from catdog.augment import to_tensor
        from catdog.explain import compute_cams

        maps, _, _ = compute_cams(self.model, to_tensor(images).to(self.device), method, class_idx=class_idx)
        return maps


class _OnnxRunner:
    """An exported .onnx file run by ONNX Runtime: no torch involved."""

    kind, bf16 = "onnx", False  # ONNX Runtime runs the exported graph in float32

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: one per core
        # Idle threads sleep instead of spinning, so they leave the cores to predict_stream's decoding threads:
        # from the embedded test JPEGs, 3300 img/s with 2 threads (3000 spinning, 3200 with one thread), and
        # still 6200 img/s from the decode cache (one thread: 3400).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # warnings about unused initialisers are noise here
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable or invalid graphs
            raise ModelError(f"cannot load ONNX model {path}: {e}") from None
        self.meta = meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes = json.loads(meta["classes"])
            self.image_size = int(meta["image_size"])
        except (KeyError, ValueError) as e:
            raise ModelError(f"{path} lacks catdog metadata ({e}); export it with `catdog export`") from None
        problem = model_meta_problem(self.classes, self.image_size)
        if problem:
            raise ModelError(f"cannot load ONNX model {path}: {problem}")
        self.tta, self.model_name = meta.get("tta") == "true", meta.get("model", "onnx")

    def limit_threads(self, n: int | None) -> None:
        """Nothing to do: the session's threads sleep while idle (see __init__)."""

    def probs1(self, images: np.ndarray) -> np.ndarray:
        x = onnx_input(images)  # (B, 3, S, S)
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0][:, 1].astype(np.float64)

    def cams(self, images: np.ndarray, class_idx: list[int], method: str = "gradcam") -> np.ndarray:
        raise ModelError("class activation maps need the PyTorch checkpoint (a run folder or .pt), not an .onnx file")


class Classifier:
    """A trained two-class model ready for inference: `Classifier.load(RUN).predict(images)`."""

    batch_size = 64  # images per forward pass

    def __init__(self, runner, source: Path, threshold: float = 0.5, max_pixels: int = MAX_PIXELS):
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be strictly between 0 and 1, not {threshold}")
        self.runner, self.source, self.threshold, self.max_pixels = runner, source, threshold, max_pixels

    @classmethod
    def load(cls, source: str | Path, threshold: float = 0.5, device: str = "cpu", max_pixels: int = MAX_PIXELS,
             threads: int = 0, bf16: bool = False) -> "Classifier":
        """Load a run folder, a .pt checkpoint or an .onnx file (threads per inference: 0 = library default).

        bf16: PyTorch checkpoints run the forward pass under bfloat16 autocast, much faster on CPUs with AMX;
        probabilities move by up to about 0.01 (benchmarks/speed.md). ONNX models always run in float32.
        """
        path = resolve_model(source)
        if path.suffix == ".onnx":
            if bf16:
                raise ModelError("bf16 needs the PyTorch checkpoint (a run folder or .pt); ONNX models run in float32")
            runner = _OnnxRunner(path, threads)
        else:
            runner = _TorchRunner(path, device, threads, bf16)
        return cls(runner, path, threshold, max_pixels)

    @property
    def classes(self) -> list[str]:
        return self.runner.classes

    @property
    def image_size(self) -> int:
        return self.runner.image_size

    @property
    def kind(self) -> str:
        return self.runner.kind

    def info(self) -> dict:
        """What the model is: kind, architecture, classes, input size, flip averaging, threshold."""
        return {"source": str(self.source), "kind": self.kind, "model": self.runner.model_name,
                "classes": self.classes, "image_size": self.image_size, "tta": self.runner.tta,
                "precision": "bfloat16" if self.runner.bf16 else "float32",
                "threshold": self.threshold, "input": "RGB resized to image_size x image_size (bilinear), uint8 / 255"}

    def decode(self, image) -> np.ndarray:
        """One path, bytes, PIL image or (H, W, 3) uint8 array to the model's (S, S, 3) uint8 input."""
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
                raise SkipImage(f"an array image must be (H, W, 1|3|4), not {image.shape}")
            arr = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
            image = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        return decode_image(image, self.image_size, self.max_pixels)

    def probs(self, batch: np.ndarray) -> np.ndarray:
        """(N, 2) class probabilities for decoded uint8 (N, S, S, 3) images."""
        if len(batch) == 0:
            return np.zeros((0, 2))
        batch = np.ascontiguousarray(batch)
        if not batch.flags.writeable:  # arrays viewing a PIL image are read-only; torch wants to own writable memory
            batch = batch.copy()
        # small inference batches: at 64 px a batch of 256 needs ~0.6 GB of activations (the resnet, with flip averaging)
        step = self.batch_size
        p1 = np.concatenate([self.runner.probs1(batch[i:i + step]) for i in range(0, len(batch), step)])
        return np.stack([1 - p1, p1], 1)

    def to_prediction(self, probs: np.ndarray) -> Prediction:
        label = self.classes[int(probs[1] >= self.threshold)]
        return Prediction(label, {c: round(float(p), 6) for c, p in zip(self.classes, probs)})

    def predict(self, images, batch_size: int = 256) -> list[Prediction]:
        """Predictions for one image or a list of them (paths, bytes, PIL images or arrays); SkipImage if unreadable."""
        if isinstance(images, (str, Path, bytes, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        out: list[Prediction] = []
        it = iter(images)
        while chunk := list(islice(it, batch_size)):
            batch = np.stack([self.decode(im) for im in chunk])
            out += [self.to_prediction(p) for p in self.probs(batch)]
        return out

    def cams(self, batch: np.ndarray, probs: np.ndarray | None = None, method: str = "gradcam") -> np.ndarray:
        """Class activation maps (N, S, S) in [0, 1] for decoded images, each explaining its predicted class.

        The class is decided here (flip averaging, threshold), not by the single forward pass inside the CAM method.
        """
        probs = self.probs(batch) if probs is None else probs
        class_idx = [int(p[1] >= self.threshold) for p in probs]
        return self.runner.cams(np.array(batch, dtype=np.uint8, copy=True), class_idx, method)


# --- many files, streamed -------------------------------------------------------------------------------------

def iter_inputs(inputs: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """(path, problem) for every file named, found under a folder (recursively) or matched by a glob, lazily."""
    for arg in inputs:
        if os.path.isdir(arg):
            for dirpath, dirnames, filenames in os.walk(arg):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if is_image_file(Path(name)):
                        yield os.path.join(dirpath, name), None
        elif os.path.exists(arg):
            yield arg, None  # a file named explicitly is always tried, whatever its extension
        elif any(c in arg for c in "*?["):
            matched = False
            for path in glob.iglob(arg, recursive=True):
                if os.path.isfile(path):
                    matched = True
                    yield path, None
            if not matched:
                yield arg, "no file matches this pattern"
        else:
            yield arg, "no such file or folder"


def _decode_or_reason(clf: Classifier, path: str) -> tuple[np.ndarray | None, str | None]:
    try:
        return clf.decode(path), None
    except SkipImage as e:
        return None, str(e)


def predict_stream(clf: Classifier, items: Iterable[tuple[str, str | None]], chunk: int = 64, threads: int = 0,
                   cams: bool = False, store: DecodeStore | None = None) -> Iterator[dict]:
    """One row per input ({path, class, probabilities, error}), in order, holding two parts of `chunk` images.

    A thread pool (`threads`, default one per core) decodes one part ahead: libjpeg-turbo and Pillow release the
    GIL, so the next part is decoded while the network scores this one on half the cores and the caller writes
    its rows. Side by side instead of in turns, the seed network (bf16, 2 cores) went from 3300 to 4500 img/s
    over the embedded test JPEGs, and from 1650 to 2100 over the full-size ones (decoding them is the larger
    share). With a store, files decoded before are read from it, new ones are added, and parts that need no
    decoding get all the cores. torch's thread count is process-wide: the stream lowers it while it decodes and
    sets it back to the count the classifier was loaded with when it ends. With cams, readable rows carry "cam_map".
    """
    cores = os.cpu_count() or 1
    threads = threads or min(8, cores)
    spare = max(1, cores // 2)  # inference threads while the pool decodes
    it = iter(items)

    def start(part: list) -> tuple:
        """Look the part up in the store (only ever from this generator's thread) and submit the rest for decoding."""
        keys = [store.key(path) if store is not None and not problem else None for path, problem in part]
        decoded: list = [(None, problem) if problem else None for _, problem in part]
        if store is not None:
            for i, arr in enumerate(store.get(keys)):
                if arr is not None:
                    decoded[i] = (arr, None)
        todo = {i: pool.submit(_decode_or_reason, clf, part[i][0]) for i, d in enumerate(decoded) if d is None}
        return part, keys, decoded, todo

    pool = ThreadPoolExecutor(threads)
    try:
        ahead = start(first) if (first := list(islice(it, chunk))) else None
        while ahead is not None:
            part, keys, decoded, todo = ahead
            for i, future in todo.items():
                decoded[i] = future.result()
            ahead = start(nxt) if (nxt := list(islice(it, chunk))) else None
            if store is not None:
                store.put([(keys[i], decoded[i][0]) for i in todo
                           if keys[i] is not None and decoded[i][0] is not None])
            ok = [i for i, (arr, _) in enumerate(decoded) if arr is not None]
            batch = np.stack([decoded[i][0] for i in ok]) if ok else None
            decoding = ahead is not None and bool(ahead[3])  # the next part's files are being decoded
            clf.runner.limit_threads(spare if decoding else None)
            p = clf.probs(batch) if ok else None
            probs = dict(zip(ok, p)) if ok else {}
            maps = dict(zip(ok, clf.cams(batch, p))) if ok and cams else {}
            for i, (path, _) in enumerate(part):
                row = {"path": path, "class": None, "probabilities": None, "error": decoded[i][1]}
                if i in probs:
                    row.update(clf.to_prediction(probs[i]).to_dict())
                if i in maps:
                    row["cam_map"] = maps[i]
                yield row
    finally:  # also when the caller stops early: files not yet being decoded are dropped
        pool.shutdown(cancel_futures=True)
        clf.runner.limit_threads(None)


def cam_overlay_png(source, cam_map: np.ndarray, max_side: int = 320, max_pixels: int = MAX_PIXELS) -> bytes:
    """A PNG of the map blended over the image, scaled so its longer side is at most max_side."""
    import io

    from catdog.data import load_rgb
    from catdog.explain import overlay

    img = load_rgb(source, max_side, max_pixels)  # decoded as the model's input was, so a file it read shows here too
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    overlay(img, cam_map).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _one_line(text: str) -> str:
    """A file name for the table: line breaks and tabs in it shown escaped, so each row stays one line."""
    return text.translate({10: "\\n", 13: "\\r", 9: "\\t"})


class RowWriter:
    """Writes prediction rows as they come: an aligned table, CSV, or a JSON array (one object per line)."""

    def __init__(self, f, fmt: str, classes: list[str], with_cam: bool = False):
        import csv

        self.f, self.fmt, self.classes, self.with_cam, self.n = f, fmt, classes, with_cam, 0
        self.fields = ["path", "class", *[f"p_{c}" for c in classes], "error"] + (["cam"] if with_cam else [])
        if fmt == "csv":
            self.csv = csv.writer(f, lineterminator="\n")
            self.csv.writerow(self.fields)
        elif fmt == "json":
            f.write("[")
        elif fmt == "table":
            f.write("  ".join([*(f"{'P(' + c + ')':>10}" for c in classes), f"{'class':<12}", "path"]) + "\n")
        else:
            raise ValueError(f"unknown format {fmt!r} (table, csv or json)")

    def write(self, row: dict) -> None:
        probs = row["probabilities"] or {}
        if self.fmt == "csv":
            self.csv.writerow([row["path"], row["class"] or "", *[probs.get(c, "") for c in self.classes],
                               row["error"] or ""] + ([row.get("cam", "")] if self.with_cam else []))
        elif self.fmt == "json":
            keep = {k: row.get(k) for k in ("path", "class", "probabilities", "error")}
            if self.with_cam:
                keep["cam"] = row.get("cam")
            self.f.write(("\n" if self.n == 0 else ",\n") + json.dumps(keep, ensure_ascii=False))
        elif row["error"]:
            self.f.write("  ".join([*(f"{'-':>10}" for _ in self.classes), f"{'unreadable':<12}",
                                    f"{_one_line(row['path'])}  ({row['error']})"]) + "\n")
        else:
            self.f.write("  ".join([*(f"{probs[c]:>10.4f}" for c in self.classes), f"{row['class']:<12}",
                                    _one_line(row["path"])]) + "\n")
        self.n += 1

    def close(self) -> None:
        if self.fmt == "json":
            self.f.write("\n]\n" if self.n else "]\n")


def tune_process_for_streaming() -> None:
    """Process-wide settings `catdog predict` makes after loading its model, for the rest of the process.

    - Everything alive now (torch, the model) is frozen out of the garbage collector's full collections, each of
      which walked it for ~55 ms: over the 624 embedded test files one came after 400 files, and the first
      prediction pass took 0.22 s instead of 0.17 s.
    - glibc keeps freed memory (catdog/malloc.py, as in training): the forward pass allocates and frees the same
      activation buffers batch after batch, and with the default thresholds faults them in again each time; the
      seed network's bf16 pass over the 624 test images took 0.22 s on one core, 0.10 s with them raised.
    """
    gc.freeze()
    malloc.keep_freed_memory()


def check_rows_out(out: Path, inputs: list[str]) -> None:
    """Refuse an --out for prediction rows that would replace something the user made: a folder, an image, a
    model, a run's records, or a file named as an input."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    if not out.exists():
        return
    named = {os.path.realpath(a) for a in inputs if os.path.isfile(a)}
    in_a_run = any((out.parent / m).exists() for m in RUN_MARKERS if m != out.name)
    if (is_image_file(out) or out.suffix.lower() in (".pt", ".onnx") or os.path.realpath(out) in named
            or (out.name in RUN_MARKERS + RUN_FILES and in_a_run)):
        raise ValueError(f"--out {out} would overwrite an image, a model or a run's file; give the rows a file "
                         f"of their own (e.g. predictions.csv)")


def predict_files(source: str | Path, inputs: list[str], fmt: str = "table", out: str | Path | None = None,
                  cam_dir: str | Path | None = None, threshold: float = 0.5, progress: bool = True,
                  chunk: int = 64, cache: bool = True, bf16: bool = False) -> tuple[int, int]:
    """Predict every image the inputs name, writing rows as they come; returns (read, unreadable) counts.

    With cache, decoded inputs are kept in the decode store (catdog.store), so files seen before are not decoded again.
    """
    import contextlib
    import re
    import sys

    from tqdm import tqdm

    from catdog import fileio

    clf = Classifier.load(source, threshold, bf16=bf16)
    tune_process_for_streaming()
    if cam_dir is not None and clf.kind != "torch":
        raise ModelError("--cam needs the PyTorch checkpoint (a run folder or .pt), not an .onnx file")
    if out is not None:
        check_rows_out(Path(out), inputs)
    if cam_dir is not None and Path(cam_dir).exists() and not Path(cam_dir).is_dir():
        raise ValueError(f"--cam {cam_dir} is a file; give a folder for the CAM overlays")
    counts = [0, 0]
    sink = fileio.atomic_open(out, "w") if out is not None else contextlib.nullcontext(sys.stdout)
    with sink as f:
        writer = RowWriter(f, fmt, clf.classes, with_cam=cam_dir is not None)
        bar = tqdm(unit="img", desc="predict", file=sys.stderr, disable=None if progress else True, leave=False)
        store = DecodeStore(clf.image_size, clf.max_pixels) if cache else None
        for row in predict_stream(clf, iter_inputs(inputs), chunk=chunk, cams=cam_dir is not None, store=store):
            counts[row["error"] is not None] += 1
            if "cam_map" in row:
                stem = fileio.cut_name(re.sub(r"[^\w.-]+", "_", Path(row["path"]).stem)[:80], 200)
                cam_path = Path(cam_dir) / f"{sum(counts):06d}-{stem}.png"
                try:
                    fileio.write_bytes(cam_path, cam_overlay_png(row["path"], row.pop("cam_map")))
                    row["cam"] = str(cam_path)
                except SkipImage as e:  # changed on disk since it was decoded
                    row["error"] = f"cam: {e}"
            writer.write(row)
            bar.update()
        writer.close()
        bar.close()
        if store is not None:
            store.close()
    return counts[0], counts[1]
