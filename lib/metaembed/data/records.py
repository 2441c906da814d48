"""The record schema shared by every dataset loader (synthetic, MMEB, ViDoRe).

A loader turns its source into these plain dataclasses; the model encodes
:class:`Item` objects and evaluation consumes :class:`EvalTask` /
:class:`DocRetrievalTask`.  Nothing here depends on a backbone.

Image placement: an item's text may contain the MMEB placeholder
``<|image_1|>`` (:data:`IMAGE_PLACEHOLDER`) marking where its image goes.  The
backbone adapter rewrites it into its own image token(s) and removes it when
the item has no image; an item with an image but no placeholder gets the image
first, as in the paper's input layout ``[v; t; M_q; M_c]``.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from PIL import Image

IMAGE_PLACEHOLDER = "<|image_1|>"
Role = Literal["query", "candidate"]
MetaTask = Literal["classification", "vqa", "retrieval", "grounding"]
Split = Literal["ind", "ood"]
ImageLike = Union[Image.Image, str, Path, bytes]


@dataclass(frozen=True, eq=False)
class Item:
    """One side of a retrieval pair: text, an image, or both.

    ``image`` is a PIL image, a local path or the bytes of an encoded image file (a parquet page);
    paths and bytes are decoded each time the backbone needs the pixels, so a corpus of pages is
    not held decoded in memory.
    ``uid`` optionally identifies the item so evaluation can encode repeated
    candidates once and cache embeddings on disk.  ``source`` optionally says
    where it was read from (``"corpus/test-0.parquet: row 12: field 'image'"``),
    for error messages about an image held as bytes, whose uid is a content hash.
    """

    text: str = ""
    image: ImageLike | None = None
    uid: str | None = None
    source: str | RecordSource | None = None

    def __post_init__(self) -> None:
        # text=None encoded as "" but crashed item_key (loss duplicate masking) with an AttributeError
        if not isinstance(self.text, str):
            raise TypeError(f"Item.text must be a str ('' for no text), got {type(self.text).__name__} {self.text!r}")

    @property
    def has_image(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class TrainExample:
    """A training triple (q, c+, c-) of Eq. 6; ``negative`` is the explicit hard negative."""

    query: Item
    positive: Item
    negative: Item | None = None
    task: str = ""


@dataclass
class EvalQuery:
    """An MMEB-style evaluation query scored only against its own candidates (positive at index 0)."""

    query: Item
    candidates: list[Item]
    qid: str = ""


@dataclass
class EvalTask:
    """One MMEB-style task: Precision@1 over each query's candidate list."""

    name: str
    meta_task: MetaTask
    split: Split
    queries: list[EvalQuery] = field(default_factory=list)


@dataclass
class DocRetrievalTask:
    """One ViDoRe-style task: rank the whole corpus, NDCG@k against graded qrels."""

    name: str
    queries: dict[str, Item]
    corpus: dict[str, Item]
    qrels: dict[str, dict[str, int]]
    split: Split = "ind"


@dataclass
class Benchmark:
    """Everything a run needs: training triples, held-out MMEB-style tasks and document tasks."""

    train: list[TrainExample]
    eval_tasks: list[EvalTask] = field(default_factory=list)
    doc_tasks: list[DocRetrievalTask] = field(default_factory=list)


class DataFormatError(ValueError):
    """A local dataset file does not match its published layout (base of each loader's format error)."""


def where(path: str | Path, row: int | None = None, field: str | None = None) -> str:
    """``"<path>: row <row>: field '<field>'"``: where a bad record sits, for loader error messages."""
    out = str(path)
    if row is not None:
        out += f": row {row}"
    if field is not None:
        out += f": field {field!r}"
    return out


@dataclass(frozen=True, slots=True)
class RecordSource:
    """Where an item was read from, as :func:`where` formats it, built only when a message needs it: one small
    object per item (the file's path is shared) instead of a string per item over an MMEB-train load."""

    path: str | Path
    row: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        return where(self.path, self.row, self.field)


def check_not_string(value: object, name: str, kind: str) -> None:
    """ValueError when ``value``, meant as a list of ``kind``, is one string: ``list("VizWiz")`` would be
    the names "V", "i", "z", ... (a YAML ``tasks: VizWiz`` instead of ``[VizWiz]``)."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a list of {kind}, got the string {value!r} (a list of one: [{value!r}])")


def file_stamp(path: str | Path) -> str:
    """``"<resolved path>|<size>|<mtime_ns>"``: part of a uid, so that an image file replaced on disk
    gets a new uid and a uid-keyed embedding cache never serves its old vectors (path only if missing)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return str(p)
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def item_key(item: Item, pixels: bool = True) -> int:
    """A 63-bit content key of ``item``: equal for the same text and the same image (file path or pixels).

    Marks copies of one candidate inside a training batch (``loss.mask_duplicate_candidates``).
    A path is keyed as :class:`~pathlib.Path` spells it (``a//b``, ``a/./b`` and ``Path("a/b")`` are
    one file; not resolved: no file system access).  Pixels of a palette image (modes ``P``, ``PA``)
    are palette indices, so its palette is keyed too.  ``pixels=False`` keys an in-memory image by
    mode and size only (cheap, for dataset fingerprints).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(item.text.encode("utf-8"))
    image = item.image
    if image is None:
        h.update(b"\x00none")
    elif isinstance(image, Image.Image):
        h.update(f"\x00pil|{image.mode}|{image.size}|".encode())
        if pixels:
            h.update(image.tobytes())
            if image.mode in ("P", "PA"):  # the colours live in the palette, not in tobytes()
                mode = getattr(image.palette, "mode", "")
                h.update(f"|palette|{mode}|".encode() + bytes(image.getpalette(None) or ()))  # raw: RGBA keeps alpha
    elif isinstance(image, (str, os.PathLike)):
        h.update(b"\x00path|" + str(Path(image)).encode("utf-8"))
    elif isinstance(image, bytes):  # the encoded file: equal bytes, equal image
        h.update(b"\x00bytes|" + image)
    else:  # str() of an array or tensor is a truncated repr: distinct images would share a key
        raise TypeError(f"Item.image must be a PIL image, a path or image file bytes, got {type(image).__name__}")
    return int.from_bytes(h.digest(), "little") >> 1  # fits an int64


def iter_parquet_rows(
    path: Path, required: Sequence[str], *,
    error: type[DataFormatError] = DataFormatError, batch_size: int = 4096,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_index, {column: value})`` for one parquet file's ``required`` columns (checked
    first).  An unreadable file, a missing column or data damaged
    past the footer (the file opens, a later batch fails) raise ``error`` naming the file (and row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise error(f"{path}: not a readable parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    missing = [f for f in required if f not in names]
    if missing:
        raise error(f"{path}: missing column(s) {missing}; columns present: {sorted(names)}")
    row = 0
    batches = pf.iter_batches(columns=list(required), batch_size=batch_size)
    while True:
        try:
            batch = next(batches, None)
            recs = [] if batch is None else batch.to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            raise error(f"{path}: unreadable parquet data at or after row {row} ({e})") from None
        if batch is None:
            return
        for rec in recs:
            yield row, rec
            row += 1
