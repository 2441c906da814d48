"""Writes that a crash, a full disk or a refused rename cannot leave half done.

:func:`atomic_write` writes a file through a private temporary file in its folder and renames it into place, so
readers and concurrent writers never see it half written.  :func:`rename_all` renames several entries as one step:
a rename that fails undoes those before it.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "rename_all"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], durable: bool = False) -> None:
    """Write ``path`` by ``write(f)`` into ``.<name>.<random>.tmp`` beside it, then rename; an interrupted write
    leaves the earlier file whole (and removes the temporary file unless the process was killed).  ``durable``
    flushes it to disk (``fsync``) before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # umask permissions (a cache may be shared)
    try:
        with open(tmp, "xb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rename_all(moves: Sequence[tuple[Path, Path]]) -> None:
    """Rename each ``(source, target)`` in order; when one fails (EPERM, EBUSY, ENOSPC on some file systems), undo
    the renames before it and re-raise."""
    done: list[tuple[Path, Path]] = []
    try:
        for source, target in moves:
            source.rename(target)
            done.append((source, target))
    except BaseException:
        for source, target in reversed(done):
            target.rename(source)
        raise
