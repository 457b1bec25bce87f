"""Folder-per-class datasets: scan, decode robustly, resize, cache, split."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from catdog import config, fileio

IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Pillow reads only these formats here, whatever a file is named: some others (ICO, ICNS) decode their pixels
# while opening, before the pixel count can be checked
OPEN_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF")  # JPEG includes MPO (camera pairs)
MAX_PIXELS = 50_000_000  # images larger than this are refused unread (decompression bombs)
MAX_JPEG_BYTES = 64 << 20  # larger JPEG files go to Pillow, which reads them in pieces
CACHE_VERSION = 4  # bump when decoding changes, so old caches are not reused

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
Image.MAX_IMAGE_PIXELS = None  # we check the pixel count ourselves, with a clear reason


class DataError(Exception):
    """A dataset folder that cannot be used at all (missing, no classes, no images)."""


class SkipImage(Exception):
    """One file that cannot be used; the message is the reason shown to the user."""


@dataclass
class ImageSet:
    """Decoded images of one split, resized, as uint8 (N, S, S, 3)."""

    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64, index into classes
    paths: list[str]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)  # [{"path": ..., "reason": ...}]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], [self.paths[i] for i in idx], self.classes, self.skipped)


# --- decoding ---------------------------------------------------------------------------------------------

def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.array(img, dtype=np.float32)  # a copy, scaled in place: a 50-megapixel image is 200 MB here
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr *= 255.0
        elif img.mode != "F" and (img.mode.startswith("I;16") or arr.max(initial=0) > 255):
            arr /= 257.0  # 16-bit range to 8-bit
        img = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open a path, bytes or file object as an upright RGB image, or raise SkipImage with the reason."""
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source) or source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise SkipImage("empty file")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        _check_regular_file(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(source, formats=OPEN_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise SkipImage(f"too many pixels ({w}x{h} > {max_pixels:,}): possible decompression bomb")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # decode at 1/2, 1/4 or 1/8 scale: much faster
            img.load()
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # a broken EXIF block should not cost the image
                pass
            return _to_rgb(img)
    except SkipImage:
        raise
    except UnidentifiedImageError:
        raise SkipImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise SkipImage(f"possible decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipImage(f"truncated or corrupt image: {e}") from None
    except MemoryError:
        raise SkipImage("too large to decode in the memory available") from None
    except Exception as e:  # a format plugin failing its own way (NotImplementedError, struct.error, ...)
        raise SkipImage(f"cannot decode: {type(e).__name__}: {e}") from None


def _check_regular_file(path) -> None:
    """SkipImage unless `path` is a non-empty regular file: a FIFO or device named *.jpg would block or never end."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SkipImage(f"cannot read file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SkipImage("not a regular file")
    if st.st_size == 0:
        raise SkipImage("empty file")


def _plain_jpeg(data: bytes) -> bool:
    """A JPEG whose headers hold nothing Pillow acts on besides the pixels: no APP1 block (EXIF or XMP, either of
    which can carry an orientation) and no multi-picture index (an MPO file, which Pillow decodes at full size)."""
    if data[:2] != b"\xff\xd8":
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False  # not a marker where one belongs: let Pillow judge the file
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the headers are over
            return True
        if marker == 0xE1 or (marker == 0xE2 and data[i + 4:i + 8] == b"MPF\0"):
            return False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def _decode_jpeg_scaled(data: bytes, image_size: int, max_pixels: int) -> np.ndarray | None:
    """libjpeg-turbo through simplejpeg, at the DCT scale Pillow's draft mode picks, so the pixels are the ones
    `open_image` gives; None where that path does not apply (EXIF, CMYK, damage, too many pixels), for Pillow to
    decode or to explain. It skips Pillow's per-file parsing: a third of the time of a small JPEG."""
    if not _plain_jpeg(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        # CMYK needs Pillow's conversion; under 8 px a side libjpeg-turbo may pick a 7/8 scale of the same size
        if colorspace not in ("YCbCr", "Gray") or min(w, h) < 8 or w * h > max_pixels:
            return None
        scale = min(w // image_size, h // image_size)
        scale = next((s for s in (8, 4, 2) if scale >= s), 1)
        size = (-(-h // scale), -(-w // scale))
        arr = simplejpeg.decode_jpeg(data, "RGB", min_height=size[0], min_width=size[1], strict=True)
    except (ValueError, RuntimeError):  # strict: a damaged file raises, and Pillow reports why
        return None
    return arr if arr.shape == (*size, 3) else None


def resize_square(img: Image.Image, image_size: int) -> np.ndarray:
    """The model's (S, S, 3) uint8 input: bilinear, without keeping the aspect ratio (as the seed)."""
    return np.asarray(img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0), np.uint8)


def decode_image(source, image_size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image to a (S, S, 3) uint8 array, resized without keeping the aspect ratio (as the seed)."""
    return resize_square(load_rgb(source, image_size, max_pixels), image_size)


def load_rgb(source, min_side: int, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An upright RGB image, decoded at the smallest JPEG scale that keeps both sides at least min_side.

    Plain JPEGs go through libjpeg-turbo; the rest, and what it declines, through Pillow (`open_image`).
    """
    if isinstance(source, (str, Path)):
        _check_regular_file(source)
        try:
            with open(source, "rb") as f:
                if f.read(2) == b"\xff\xd8" and os.fstat(f.fileno()).st_size <= MAX_JPEG_BYTES:
                    f.seek(0)
                    source = f.read()  # read once: Pillow gets these bytes when the fast path declines
        except OSError as e:
            raise SkipImage(f"cannot read file: {e.strerror or e}") from None
    arr = _decode_jpeg_scaled(bytes(source), min_side, max_pixels) if isinstance(source, (bytes, bytearray)) else None
    return Image.fromarray(arr) if arr is not None else open_image(source, max_pixels, draft_size=min_side)


def _decode_many(args: tuple[list[str], int, int]) -> list[tuple[np.ndarray | None, str | None]]:
    paths, image_size, max_pixels = args
    out = []
    for p in paths:
        try:
            out.append((decode_image(p, image_size, max_pixels), None))
        except SkipImage as e:
            out.append((None, str(e)))
    return out


def _leave_ctrl_c_to_the_parent() -> None:
    """In a decoding worker: ignore Ctrl-C, which the whole process group receives; the parent stops the pool and
    reports the interrupt once, instead of every worker printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_files(paths: list[str], image_size: int, workers: int = 0, max_pixels: int = MAX_PIXELS,
                 progress: bool = False) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode many files, in parallel worker processes when it pays; returns (arrays, reasons)."""
    workers = workers or (os.cpu_count() or 1)
    chunk = 64
    chunks = [(paths[i:i + chunk], image_size, max_pixels) for i in range(0, len(paths), chunk)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), desc="decode", unit="img", leave=False, disable=None)  # terminals only
    results: list[tuple[np.ndarray | None, str | None]] = []
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers, initializer=_leave_ctrl_c_to_the_parent) as pool:
            for part in pool.map(_decode_many, chunks):
                results.extend(part)
                bar and bar.update(len(part))
    else:
        for c in chunks:
            part = _decode_many(c)
            results.extend(part)
            bar and bar.update(len(part))
    bar and bar.close()
    return [r[0] for r in results], [r[1] for r in results]


# --- scanning ---------------------------------------------------------------------------------------------

def is_image_file(path: Path) -> bool:
    """An image by extension, not hidden."""
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def scan_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names) and (path, label) pairs of every image file under them."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"no class sub-folders in {root} (expected {root}/<class>/<image files>)")
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            items += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if is_image_file(Path(f))]
    if not items:
        raise DataError(f"no image files in the class folders of {root}")
    return classes, items


def split_dir(root: str | Path, split: str) -> Path:
    """The folder of a split: ROOT/<split> when it exists, else ROOT itself (a plain folder-per-class set)."""
    root = Path(root)
    if (root / split).is_dir():
        return root / split
    if not root.is_dir():
        embedded = root == config.default_data_dir() and not os.environ.get("CATDOG_DATA")
        raise DataError(f"dataset folder not found: {root}" + (
            " (the embedded set comes with a source checkout, installed with `make` or `pip install -e`; "
            "otherwise give DATA or set $CATDOG_DATA)" if embedded else ""))
    return root


def default_cache_dir() -> Path:
    return Path(os.environ.get("CATDOG_CACHE") or Path.home() / ".cache" / "catdog")


def _cache_key(root: Path, items: list[tuple[str, int]], classes: list[str], image_size: int) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, image_size, classes]).encode())
    for path, label in items:
        try:
            size, mtime = (st := os.stat(path)).st_size, st.st_mtime_ns
        except OSError:  # a dangling link or a file just removed: decoding reports it, the key only has to be stable
            size, mtime = -1, -1
        # surrogateescape: a name that is not valid UTF-8 hashes as its own bytes
        h.update(f"{os.path.relpath(path, root)}\0{label}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def load_folder(root: str | Path, image_size: int = 64, cache: bool | str | Path = True, workers: int = 0,
                progress: bool = False, max_pixels: int = MAX_PIXELS) -> ImageSet:
    """Decode every image of a folder-per-class set once; later calls read the cached arrays."""
    root = Path(root)
    classes, items = scan_folder(root)
    cache_file = None
    if cache:
        cache_dir = default_cache_dir() if cache is True else Path(cache)
        cache_file = cache_dir / f"{_cache_key(root, items, classes, image_size)}-{image_size}px.npz"
        if cache_file.exists():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    # the key matched the same files in the same order (relative to the root): the paths are
                    # those of this scan, so a set reached by another path or moved keeps its own paths
                    paths = [items[i][0] for i in meta["keep"]]
                    skipped = [{"path": items[i][0], "reason": r} for i, r in meta["skipped_at"]]
                    return ImageSet(z["images"], z["labels"], paths, meta["classes"], skipped)
            except Exception:
                pass  # a damaged cache (or one written by an older version) is rebuilt
    paths = [p for p, _ in items]
    arrays, reasons = decode_files(paths, image_size, workers, max_pixels, progress)
    keep = [i for i, a in enumerate(arrays) if a is not None]
    images = np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, image_size, image_size, 3), np.uint8)
    labels = np.array([items[i][1] for i in keep], dtype=np.int64)
    skipped = [{"path": paths[i], "reason": reasons[i]} for i, a in enumerate(arrays) if a is None]
    data = ImageSet(images, labels, [paths[i] for i in keep], classes, skipped)
    if cache_file is not None:
        try:
            meta = json.dumps({"keep": keep, "skipped_at": [[i, reasons[i]] for i, a in enumerate(arrays) if a is None],
                               "classes": classes})
            with fileio.atomic_open(cache_file, "wb", private=True) as f:
                np.savez(f, images=images, labels=labels, meta=np.array(meta))
        except OSError:
            pass  # a read-only cache folder only costs speed
    return data


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded (train, validation) split of indices; fraction 0 gives no validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def skip_summary(skipped: list[dict]) -> str:
    """One line: how many files were skipped, by reason."""
    if not skipped:
        return "no files skipped"
    kinds: dict[str, int] = {}
    for s in skipped:
        kind = s["reason"].split(":")[0].split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return f"skipped {len(skipped)} file(s): " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
