"""Small file helpers shared by runs, checkpoints and data sets."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "file_sha256"]


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks so large files never sit in memory whole."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Replace `path` with `data` so that a reader, or the file after a crash, is either all old or all new.

    `data` is bytes, text (written as UTF-8) or a writer called with a temporary path to fill, e.g.
    `lambda tmp: pq.write_table(table, tmp)` or `lambda tmp: torch.save(state, tmp)`. The temporary file lies next to
    `path` (same file system, so the rename is atomic) under a hidden unique name; it is fsynced, renamed over `path`
    with `os.replace`, and the directory is fsynced so the rename survives a power cut. Missing parent directories are
    created. If the writer raises, the temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name (not just the pid) so threads of one process writing the same path never share a temp file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:16]}.tmp")
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            with open(tmp, "xb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
