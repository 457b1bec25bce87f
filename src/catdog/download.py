"""Fetch a dataset archive by URL, check its SHA-256, and unpack it as a folder-per-class dataset."""
from __future__ import annotations

import hashlib
import lzma
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from catdog.data import DataError, is_image_file

CHUNK = 1 << 20


def fetch(url: str, dest: Path, sha256: str | None = None, timeout: float = 60, progress: bool = False) -> str:
    """Download url to dest (via a temp file); returns the SHA-256, and refuses a file whose digest differs."""
    digest = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="download", leave=False,
                           disable=None)  # terminals only
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                bar and bar.update(len(chunk))
            bar and bar.close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {getattr(e, 'reason', None) or e}") from None
    got = digest.hexdigest()
    if sha256 and got.lower() != sha256.lower():
        tmp.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}")
    tmp.replace(dest)
    return got


def unpack(archive: Path, into: Path) -> None:
    """Unpack a .zip or .tar(.gz/.bz2/.xz) archive, refusing members that would land outside `into`."""
    try:
        _unpack(archive, into)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        # a decompressor's complaint (bad gzip or bz2 data) is an OSError without an errno; one with an errno
        # (no space left, a quota, permissions) is the disk's, and is reported as it is
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise DataError(f"{archive.name} is damaged or truncated ({type(e).__name__}: {e}); download it again") from None


def _check_room(unpacked_bytes: int, into: Path) -> None:
    """Refuse an archive that would not fit on the disk (a zip bomb, or simply too large) before unpacking it."""
    free = shutil.disk_usage(into).free
    if unpacked_bytes > free:
        raise DataError(f"the archive unpacks to {unpacked_bytes / 2**30:.1f} GiB, more than the "
                        f"{free / 2**30:.1f} GiB free in {into}")


def _unpack(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            _check_room(sum(info.file_size for info in z.infolist()), into)
            for name in z.namelist():
                target = (into / name).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise DataError(f"archive member escapes the target folder: {name}")
            z.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            _check_room(sum(m.size for m in t.getmembers()), into)
            try:
                t.extractall(into, filter="data")  # no absolute paths, no '..', no devices or links outside
            except tarfile.FilterError as e:
                raise DataError(f"unsafe archive member: {e}") from None
    else:
        raise DataError(f"{archive.name} is neither a zip nor a tar archive")


def dataset_root(folder: Path) -> Path:
    """The folder of an unpacked archive that holds the classes (or train/ and test/): wrapper folders are skipped."""
    while True:
        subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX"))]
        has_images = any(is_image_file(f) for f in folder.iterdir() if f.is_file())
        if len(subdirs) == 1 and not has_images:
            folder = subdirs[0]
        else:
            return folder


def download_dataset(url: str, out: str | Path, sha256: str | None = None, progress: bool = False) -> tuple[Path, str]:
    """Fetch, verify and unpack an archive into `out` (which must not exist yet); returns (out, sha256)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        archive = Path(tmp) / "archive"
        digest = fetch(url, archive, sha256, progress=progress)
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        unpack(archive, unpacked)
        root = dataset_root(unpacked)
        if out.exists():
            out.rmdir()
        shutil.move(str(root), str(out))  # same file system: a rename, so `out` appears whole
    return out, digest
