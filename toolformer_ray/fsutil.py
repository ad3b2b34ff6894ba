"""Small file-system helpers shared by storage, models, the corpus reader, the index and
fine-tuning."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

_BLOCK = 1 << 22


def is_local(target) -> bool:
    """A local path: an fsspec file system, or a URI / path string without a remote scheme."""
    if isinstance(target, (str, os.PathLike)):
        text = os.fspath(target)
        return "://" not in text or text.startswith("file://")
    if isinstance(target, LocalFileSystem):
        return True
    protocols = target.protocol if isinstance(target.protocol, tuple) else (target.protocol,)
    return "file" in protocols or "local" in protocols


def local_abs(uri: str) -> str:
    """A local URI ("file://..." or a path, "~" expanded) as an absolute path."""
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def sha256_file(path, fs=None, h=None):
    """Feed a file (local, or on `fs`) into `h` (a new sha256 if None) block by block; returns
    `h`."""
    h = h or hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h


def publish_dir(tmp: Path, target: Path, replace: bool = False,
                marker: str = "revision.json") -> None:
    """Rename a finished temporary directory into place; a concurrent writer that got there first
    wins (its directory holds `marker`)."""
    if replace and target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / marker).is_file():
            raise
