"""The code version recorded in every output's manifest and commit records and in every call row, so
that rows of two code versions are never mixed silently (a nightly run after an upgrade shows up).

    "<package version>+git.<commit>"   from a clean git checkout of the package
    "<package version>+src.<hash>"     otherwise: a hash of the package's source files (an installed
                                       wheel, or a checkout with uncommitted changes to the package)
"""
from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _package_version() -> str:
    try:
        return metadata.version("toolformer-ray")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _git_commit() -> str | None:
    """HEAD's commit when the package's files are exactly those of HEAD, else None."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True,
                              text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        if git("status", "--porcelain", "--", "."):
            return None  # uncommitted changes: the commit would not identify this code
        return git("rev-parse", "HEAD") or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_hash() -> str:
    """sha256 over the package's Python sources and bundled prompts (paths and contents)."""
    h = hashlib.sha256()
    files = (p for p in PACKAGE_DIR.rglob("*")
             if p.is_file() and p.suffix in (".py", ".txt",
                                             ".json") and "__pycache__" not in p.parts)
    for path in sorted(files):
        h.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> str:
    commit = _git_commit()
    version = _package_version()
    return f"{version}+git.{commit[:12]}" if commit else f"{version}+src.{source_hash()}"
