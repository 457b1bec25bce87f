"""Atomic file writes: a temp file in the same folder, fsync, then rename, so no reader sees half a file."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator


TEMP_SUFFIX = ".catdog.tmp"  # what a killed writer leaves behind; only files named so are ever cleaned up


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def cut_name(name: str, max_bytes: int) -> str:
    """`name` cut to at most max_bytes bytes as the file system stores it, never inside a character."""
    raw = os.fsencode(name)
    if len(raw) <= max_bytes:
        return name
    cut = raw[:max_bytes]
    while cut:
        try:
            cut.decode("utf-8")
            break
        except UnicodeDecodeError as e:
            if e.start < len(cut) - 3:  # a bad byte well inside (a name that was never UTF-8): keep it as it is
                break
            cut = cut[:e.start]  # a character cut at the end
    return os.fsdecode(cut)


def _temp_prefix(name: str) -> str:
    """'.NAME.' with NAME cut so the temp file's name stays within the usual 255-byte limit."""
    return f".{cut_name(name, 200)}."


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", private: bool = False) -> Iterator[IO]:
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed.

    The file gets the permissions a plain open() would give it: those of the file it replaces, else 0666 less the
    umask (mkstemp's own 0600 would hide exports and reports from other users); `private` keeps it 0600 (caches of
    decoded photos). Text is UTF-8; characters that stand for undecodable bytes in file names (surrogate escapes)
    are written back as those bytes.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # mkdir's own message names only the file in the way
        raise NotADirectoryError(errno.ENOTDIR, f"a file is in the way of {path}", str(path.parent)) from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=TEMP_SUFFIX)
    try:
        if not private:
            try:
                perms = stat.S_IMODE(os.stat(path).st_mode) & 0o777  # no setuid/setgid/sticky bits
            except OSError:
                perms = 0o666 & ~UMASK
            with contextlib.suppress(OSError, AttributeError):  # file systems without modes (FAT), no fchmod
                os.fchmod(fd, perms)
        text = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
        with os.fdopen(fd, mode, **({} if "b" in mode else text)) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write a binary file."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def torch_save(obj, path: str | Path) -> None:
    """Atomically write a torch checkpoint."""
    import torch

    with atomic_open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's zip writer hides a failed write (a full disk) behind its own error: raise the real one
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
