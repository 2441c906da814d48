"""File checksums (sha256) of what the library saves, checked when it is loaded again.

A saved index (:mod:`metaembed.index`) and a saved model (:meth:`metaembed.model.MetaEmbedModel.save_pretrained`)
record the sha256 of their files.  A truncated file is caught by its format's own checks, but a file of the right
size with other bytes is not: a copy interrupted by ``rsync --inplace`` over an older checkpoint of the same
shape, a bit flip on disk.  Such a file loads as a different model or index, silently; its sha256 does not match.
"""
from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

__all__ = ["sha256_file", "file_digests", "changed_files"]

#: Bytes read at a time while hashing.
IO_BLOCK = 16 * 2**20
#: Files of at least this many bytes in all are checked under a progress bar.
PROGRESS_BYTES = 2**30


def sha256_file(path: str | Path, progress: tqdm | None = None) -> str:
    """Hex sha256 of the file at ``path``, read in blocks of :data:`IO_BLOCK` (each counted on ``progress``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(IO_BLOCK):
            h.update(block)
            if progress is not None:
                progress.update(len(block))
    return h.hexdigest()


def file_digests(directory: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` of every file under ``directory`` (recursively), but those named in
    ``skip`` (file names, e.g. a model card meant to be edited)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


def changed_files(directory: str | Path, digests: object, where: str, progress: bool = True) -> list[str]:
    """The files of ``digests`` (as :func:`file_digests` returned) whose sha256 under ``directory`` differs; a
    progress bar when they hold :data:`PROGRESS_BYTES` or more (a full model at real size: tens of seconds).

    ``ValueError`` (naming ``where``, the file the digests were read from) when ``digests`` is not such a
    mapping or names a path outside ``directory``; ``FileNotFoundError`` naming a listed file that is missing.
    """
    directory = Path(directory)
    if not isinstance(digests, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in digests.items()):
        raise ValueError(f"{where}: the saved sha256 checksums are not a mapping of file names to digests")
    paths = {}
    for name in digests:
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
            raise ValueError(f"{where}: the checksum entry {name[:200]!r} names no file inside {directory}")
        paths[name] = directory / rel
        if not paths[name].is_file():
            raise FileNotFoundError(f"{directory}: {paths[name]} is missing (the save wrote it; {where} lists it)")
    total = sum(p.stat().st_size for p in paths.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"sha256 of {directory.name}", leave=False,
              disable=not progress or total < PROGRESS_BYTES) as bar:
        return [name for name, path in paths.items() if sha256_file(path, bar) != digests[name].lower()]
