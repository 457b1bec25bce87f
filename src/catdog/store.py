"""Decoded model inputs of files seen before, so predicting the same files again skips JPEG decoding.

On two CPU cores, decoding a JPEG costs several times more than the seed network's forward pass. The store keeps
each file's resized uint8 array in one SQLite file in the cache folder (`~/.cache/catdog` or `$CATDOG_CACHE`).
An entry is keyed by the file's absolute path, size and modification time, and by the input size and pixel limit,
so an edited or replaced file is decoded again. Unreadable files are never stored: they are retried every time.

The store only ever costs speed: a read-only folder, a locked or damaged database turns it off with a warning.
"""
from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import numpy as np

from catdog.data import CACHE_VERSION, MAX_PIXELS, default_cache_dir

STORE_NAME = "decoded.sqlite"


class DecodeStore:
    """`get` the arrays of the files it has, `put` the ones just decoded; one instance per thread."""

    def __init__(self, image_size: int, max_pixels: int = MAX_PIXELS, path: str | Path | None = None,
                 warn=lambda m: print(m, file=sys.stderr)):
        self.shape = (image_size, image_size, 3)
        self.tag = f"v{CACHE_VERSION}:{image_size}px:{max_pixels}"
        self.path = Path(path) if path is not None else default_cache_dir() / STORE_NAME
        self.warn, self.db = warn, None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=5)
            self.db.execute("PRAGMA journal_mode=WAL")  # readers do not wait for a writer
            self.db.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last commit on power loss is fine
            self.db.execute("CREATE TABLE IF NOT EXISTS decoded (key TEXT PRIMARY KEY, pixels BLOB NOT NULL)")
        except (sqlite3.Error, OSError) as e:
            self._off(e)

    def _off(self, error: Exception) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
        if self.warn:
            self.warn(f"warning: decode cache {self.path} not used ({error}); images are decoded each time")
        self.db, self.warn = None, None

    @property
    def active(self) -> bool:
        return self.db is not None

    def key(self, path: str) -> str | None:
        """The file's entry name, or None when it cannot be stat'ed (decoding will then report why)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        name = os.path.abspath(path)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a name that is not valid UTF-8 (SQLite text must be): its bytes in hex
            name = "bytes:" + os.fsencode(name).hex()
        return f"{self.tag}\0{name}\0{st.st_size}\0{st.st_mtime_ns}"

    def get(self, keys: list[str | None]) -> list[np.ndarray | None]:
        """The stored array for each key, None where there is none."""
        wanted = [k for k in keys if k is not None]
        if self.db is None or not wanted:
            return [None] * len(keys)
        found: dict[str, np.ndarray] = {}
        size = int(np.prod(self.shape))
        try:
            for i in range(0, len(wanted), 500):  # SQLite limits the number of parameters in one statement
                part = wanted[i:i + 500]
                rows = self.db.execute(f"SELECT key, pixels FROM decoded WHERE key IN ({','.join('?' * len(part))})",
                                       part).fetchall()
                for k, blob in rows:
                    if len(blob) == size:  # anything else is not ours: decode again
                        found[k] = np.frombuffer(blob, np.uint8).reshape(self.shape)
        except sqlite3.Error as e:
            self._off(e)
        return [found.get(k) if k is not None else None for k in keys]

    def put(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store freshly decoded arrays (key, (S, S, 3) uint8)."""
        if self.db is None or not items:
            return
        try:
            with self.db:  # one transaction
                self.db.executemany("INSERT OR REPLACE INTO decoded (key, pixels) VALUES (?, ?)",
                                    [(k, np.ascontiguousarray(a, np.uint8).tobytes()) for k, a in items
                                     if a.shape == self.shape])
        except sqlite3.Error as e:
            self._off(e)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
