"""ViDoRe v1 and v2 visual-document retrieval tasks from local parquet files.

Both produce a :class:`DocRetrievalTask` (text queries, page-image corpus,
graded qrels) that the evaluation module ranks with MaxSim and scores with
NDCG@k; :func:`load_vidore_train` reads ViDoRe-train (``vidore/colpali_train_set``,
the v1 QA columns with a ``train`` split) as training pairs.  Column names
follow the Hugging Face datasets and the official ``illuin-tech/vidore-benchmark``
evaluators (``ViDoReEvaluatorQA`` / ``ViDoReEvaluatorBEIR``) and mteb's
``Vidore2*Retrieval`` tasks.

v1 (QA format, e.g. ``vidore/docvqa_test_subsampled``, files ``data/test-*.parquet``):
one row per page with ``query`` (null for corpus-only pages, e.g. in
``tatdqa_test`` / ``shiftproject_test`` / ``syntheticDocQA_*``), ``image``
(``{"bytes", "path"}`` struct as written by ``datasets``, or raw bytes),
``image_filename`` and optional ``answer``.  The corpus is the pages
de-duplicated by ``image_filename`` (first occurrence wins); the relevant page
of a query is its own row's page, grade 1.  Doc ids are image filenames.

v2 (BEIR format, e.g. ``vidore/esg_reports_v2``; the v1 ``vidore/*_test_beir`` copies too):
``corpus/test-*.parquet`` (``corpus-id``, ``image``), ``queries/test-*.parquet``
(``query-id``, ``query``, ``language`` in the multilingual sets: english,
french, spanish, german) and ``qrels/test-*.parquet`` (``query-id``,
``corpus-id``, ``score``, graded).  Integer ids are kept as their decimal
strings.  ``language`` filters queries (and their qrels); the corpus is shared.

Where the official evaluators differ, and what we do:

* Duplicate v1 queries: vidore-benchmark's QA evaluator drops ``None`` queries,
  de-duplicates identical query strings and keeps, for each, the page of the
  *last* row with that string (a dict built over all rows); colpali-engine's
  in-training evaluator keeps every row.  ``duplicate_queries="last"`` (default,
  comparable to the leaderboard), ``"union"`` (all those pages relevant) or
  ``"keep"`` (one query per row).  Conflicting duplicates are reported in a
  :class:`ViDoReDataWarning`.
* Duplicate v1 pages: the official evaluator scores every row and keeps the max
  score per ``image_filename``; with identical images this equals scoring the
  de-duplicated page once, which is what we do.  Rows of one ``image_filename``
  whose images differ (content hash) are counted in a :class:`ViDoReDataWarning`:
  we keep the first image, so their scores can differ from the official max over
  rows.  Every row's image is checked (the official evaluator decodes them all).
  Its max starts from 0
  (``results[query].get(filename, 0)``), so every page but the first gets
  ``max(0, score)``: negative scores tie at 0 there; we keep them (MaxSim sums of
  cosines are not negative for a trained model in practice).
* Self-retrieval: some vidore-benchmark releases score through
  ``BaseViDoReEvaluator.compute_retrieval_scores`` -> colpali-engine's
  ``CustomRetrievalEvaluator.evaluate(..., ignore_identical_ids=True)``, which
  drops a retrieved doc whose id *string* equals the query id.  With BEIR
  integer ids this removes corpus doc ``"k"`` from query ``"k"``'s ranking (an
  artefact meant for ArguAna/Quora-style corpora); mteb namespaces ids
  (``query-test-k`` / ``corpus-test-k``) and never hits it.  We never drop
  identical ids, and the evaluation must not either.
* Item uids are content hashes (page bytes, query text; a page stored as a
  file path: path, size and mtime), so pages shared by several tasks
  (``ESG_Syn`` / ``ESG_Syn_Mul``) are encoded once and a uid-keyed embedding
  cache does not serve stale vectors when the data change.
* Ties: pytrec_eval (trec_eval) ranks by score and breaks ties by doc id in
  *descending* string order (usnistgov/trec_eval#22, beir-cellar/beir#105).
  Loading does not rank; the evaluator documents its own tie rule.
* Grades <= 0: pytrec_eval gives them no NDCG gain and does not count them as
  relevant (relevance level 1), but a query judged *only* with such grades is
  still evaluated: it scores 0 and counts in the mean (mteb averages pytrec_eval's
  per-query values).  By default (``keep_nonpositive=True``) we do the same: the
  judgements are kept (no gain) and such a query scores 0, reported in a
  warning.  ``keep_nonpositive=False`` drops grades <= 0 (counted in a warning)
  and with them every query left without a positive judgement, so the mean runs
  over fewer queries and is *higher* than the official one (colpali-engine's
  custom MRR, which counts *any* qrels entry as relevant, is the reason to want
  them gone).  Non-integer scores raise (mteb silently truncates with ``int()``).
* Blank v1 queries (``""``, whitespace): the official evaluator drops only
  ``None`` and keeps a blank string as a query whose own page is relevant; we
  treat a blank query as a corpus-only page, like a null one (counted in a
  warning), so such a dataset has fewer queries here.
* Language filter (v2): we compare case-insensitively and raise on a null
  ``language``; mteb keeps rows whose ``language`` equals the name exactly, so
  ``"English"`` or null rows simply drop out there.
* Multilingual columns (``*_Mul``): one mean over all languages' queries, as
  vidore-benchmark's BEIR evaluator computes it.  mteb scores each language as
  a subset and averages the subsets; the two agree when every language has the
  same number of judged queries.
* mteb's v1 tasks keep one query per row (our ``duplicate_queries="keep"``)
  and name pages ``corpus-test-N`` in order of appearance, so exact score ties
  break differently than with filenames as doc ids.
* Duplicate qrels rows (v2): the official evaluators build a dict over the
  rows, so the last row's grade wins; we keep the last grade too and report
  the repeats (and how many changed the grade) in a warning.
* Queries without any qrels row are ignored by pytrec_eval; we drop them with a
  warning.  qrels naming unknown query/corpus ids raise, or are skipped and
  counted with ``on_unknown="skip"`` (an unknown corpus id also in a
  judgement of a query the language filter leaves out).  A skipped positive judgement of an
  unknown corpus id also leaves the ideal DCG, so NDCG is then *higher* than
  pytrec_eval's (which keeps it as relevant but never retrieved): not
  comparable with official numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from .records import (
    DataFormatError,
    DocRetrievalTask,
    Item,
    Split,
    TrainExample,
    check_not_string,
    file_stamp,
    iter_parquet_rows,
    where,
)

DuplicateQueries = Literal["last", "union", "keep"]
OnUnknown = Literal["error", "skip"]

log = logging.getLogger(__name__)

V1_FIELDS: tuple[str, ...] = ("query", "image", "image_filename")
#: Columns of ViDoRe-train (``vidore/colpali_train_set``) that :func:`load_vidore_train` reads.
TRAIN_FIELDS: tuple[str, ...] = ("query", "image")
#: ``TrainExample.task`` of ViDoRe-train pairs: its name in ``data.subset_weights`` and in the held-out split.
VIDORE_TRAIN_TASK = "ViDoRe-train"

#: The 10 ViDoRe v1 tasks (short name -> Hugging Face dataset).
VIDORE_V1_TASKS: dict[str, str] = {
    "arxivqa": "vidore/arxivqa_test_subsampled",
    "docvqa": "vidore/docvqa_test_subsampled",
    "infovqa": "vidore/infovqa_test_subsampled",
    "tabfquad": "vidore/tabfquad_test_subsampled",
    "tatdqa": "vidore/tatdqa_test",
    "shiftproject": "vidore/shiftproject_test",
    "syntheticDocQA_ai": "vidore/syntheticDocQA_artificial_intelligence_test",
    "syntheticDocQA_energy": "vidore/syntheticDocQA_energy_test",
    "syntheticDocQA_government": "vidore/syntheticDocQA_government_reports_test",
    "syntheticDocQA_healthcare": "vidore/syntheticDocQA_healthcare_industry_test",
}

#: The 7 ViDoRe v2 columns of the paper's Table 2 -> (Hugging Face dataset, query language filter).
#: ``None`` keeps every language (the "Mul" columns; ESG_Human is English-only).
VIDORE_V2_TASKS: dict[str, tuple[str, str | None]] = {
    "ESG_Human": ("vidore/esg_reports_human_labeled_v2", None),
    "Eco_Mul": ("vidore/economics_reports_v2", None),
    "Bio": ("vidore/biomedical_lectures_v2", "english"),
    "ESG_Syn": ("vidore/esg_reports_v2", "english"),
    "ESG_Syn_Mul": ("vidore/esg_reports_v2", None),
    "Bio_Mul": ("vidore/biomedical_lectures_v2", None),
    "Eco": ("vidore/economics_reports_v2", "english"),
}


class ViDoReFormatError(DataFormatError):
    """A local ViDoRe file does not match the expected layout; the message names file, row and field."""


class ViDoReDataWarning(UserWarning):
    """Rows or judgements were dropped or merged; the message says how many and why."""


# ---------------------------------------------------------------------------------------------
# file access


def _files(location: Path, split: str) -> list[Path]:
    """Parquet files of one split: ``location`` itself, or ``{split}-*.parquet`` found below it."""
    if location.is_file():
        return [location]
    if not location.is_dir():
        raise ViDoReFormatError(f"{location}: file or directory not found")
    files = sorted(set(location.rglob(f"{split}-*.parquet")) | set(location.rglob(f"{split}.parquet")))
    if not files:
        raise ViDoReFormatError(f"{location}: no '{split}-*.parquet' file below this directory")
    return files


def _iter_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    return iter_parquet_rows(path, required, error=ViDoReFormatError, batch_size=256)


def _open_image(value: Any, path: Path, row: int, field: str, decode: bool = True) -> tuple[bytes | Path, str]:
    """The encoded image of ``bytes`` / ``{"bytes", "path"}`` (or a path to an image file), decoded once here
    as a check (a file too, unless ``decode`` is false), and a content uid (hash of the bytes, or of the
    resolved path and its stamp).

    The item keeps the bytes, not a PIL image: an image opened here and decoded when encoded kept its
    decoded pixels on the item (15.5 MB per 1654x2339 page, for the whole run); and a page cut off after
    its header passed loading and stopped the evaluation, after hours of encoding, with a traceback.
    """
    data: Any = value
    ref: str | None = None
    if isinstance(value, dict):
        data, ref = value.get("bytes"), value.get("path")
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
        data = bytes(data)
        _check_image_bytes(data, path, row, field)
        return data, _bytes_uid(hashlib.sha1(data).hexdigest())
    if ref:
        p = Path(ref) if Path(ref).is_absolute() else path.parent / ref
        if p.is_file():
            if decode:  # a damaged file beside the parquet failed only when encoded, hours in (a fuzzing helper)
                try:
                    data = p.read_bytes()
                except OSError as e:
                    raise ViDoReFormatError(f"{where(path, row, field)}: cannot read image file {p} ({e})") from None
                _check_image_bytes(data, path, row, field, file=p)
            return p, "vidore/file/" + hashlib.sha1(file_stamp(p).encode()).hexdigest()[:24]
        raise ViDoReFormatError(f"{where(path, row, field)}: no image bytes and image path {ref!r} not found")
    raise ViDoReFormatError(f"{where(path, row, field)}: no image (null or empty bytes)")


def _check_image_bytes(data: bytes, path: Path, row: int, field: str, decode: bool = True,
                       file: Path | None = None) -> str:
    """The format of the image ``data`` encodes (``"png"``, ...), read whole when ``decode`` (the header alone
    passes a truncated page); a :class:`ViDoReFormatError` naming file, row and field (and the image
    ``file`` the bytes were read from) if it is not one.  PIL reports some damaged headers (a PNG's short
    IHDR, ...) as a plain ``ValueError``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if decode:
                img.load()
            return (img.format or "img").lower()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        what = "bytes are" if file is None else f"image file {file} is"
        raise ViDoReFormatError(f"{where(path, row, field)}: {what} not a readable image ({e})") from None


def _bytes_uid(sha1_hex: str) -> str:
    """The uid of a page held as image bytes: its content hash (every loader's, so shared pages share it)."""
    return "vidore/img/" + sha1_hex[:24]


def _query_uid(text: str) -> str:
    return "vidore/q/" + hashlib.sha1(text.encode()).hexdigest()[:24]


def _id(value: Any, path: Path, row: int, field: str) -> str:
    if isinstance(value, bool) or value is None:
        raise ViDoReFormatError(f"{where(path, row, field)}: expected an id, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ViDoReFormatError(f"{where(path, row, field)}: non-integer id {value!r}")
        value = int(value)
    if isinstance(value, (int, str)):
        s = str(value)
        if s.strip():
            return s
    raise ViDoReFormatError(f"{where(path, row, field)}: expected an int or string id, got {value!r}")


def _grade(value: Any, path: Path, row: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ViDoReFormatError(f"{where(path, row, 'score')}: expected a number, got {value!r}")
    if float(value) != int(value):
        raise ViDoReFormatError(f"{where(path, row, 'score')}: non-integer relevance grade {value!r}")
    return int(value)


def _warn(message: str) -> None:
    warnings.warn(message, ViDoReDataWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# v1


def load_vidore_v1(
    path: str | Path,
    name: str | None = None,
    *,
    split: str = "test",
    duplicate_queries: DuplicateQueries = "last",
    task_split: Split = "ind",
) -> DocRetrievalTask:
    """Load one ViDoRe v1 (QA-format) task from a parquet file or a dataset directory.

    ``task_split`` is the IND/OOD tag of the returned task (v1 shares sources
    with ViDoRe-train, hence ``"ind"``).  See the module docstring for how
    duplicate queries/pages and null queries are handled.
    """
    if duplicate_queries not in ("last", "union", "keep"):
        raise ValueError(f"duplicate_queries must be 'last', 'union' or 'keep', got {duplicate_queries!r}")
    location = Path(path)
    if name is None:
        name = location.stem if location.is_file() else location.name
    corpus: dict[str, Item] = {}
    rows: list[tuple[str, str]] = []  # (query text, image_filename) in file order
    empty = 0
    differing: dict[str, str] = {}  # image_filename -> first row whose image differs from the kept one
    for file in _files(location, split):
        for row, rec in _iter_rows(file, V1_FIELDS):
            fname = rec["image_filename"]
            if not isinstance(fname, str) or not fname:
                raise ViDoReFormatError(f"{where(file, row, 'image_filename')}: expected a non-empty string")
            image, uid = _open_image(rec["image"], file, row, "image")
            if fname not in corpus:
                corpus[fname] = Item(image=image, uid=uid, source=f"{where(file, row, 'image')} ({fname})")
            elif uid != corpus[fname].uid and fname not in differing:
                differing[fname] = where(file, row, "image")
            query = rec["query"]
            if query is None:
                continue
            if not isinstance(query, str):
                raise ViDoReFormatError(f"{where(file, row, 'query')}: expected a string, got {type(query).__name__}")
            if not query.strip():
                empty += 1
                continue
            rows.append((query, fname))
    if empty:
        _warn(f"ViDoRe v1 {name!r}: {empty} row(s) with an empty query string treated as corpus-only pages")
    if differing:
        first, at = next(iter(differing.items()))
        _warn(f"ViDoRe v1 {name!r}: {len(differing)} image_filename(s) appear with different images (first: "
              f"{first!r} at {at}); the first image is kept, vidore-benchmark keeps each filename's best row")
    if not rows:
        raise ViDoReFormatError(f"{location}: no query (every 'query' is null)")
    queries, qrels = _v1_queries(rows, name, duplicate_queries)
    return DocRetrievalTask(name=name, queries=queries, corpus=corpus, qrels=qrels, split=task_split)


def _v1_queries(
    rows: list[tuple[str, str]], name: str, mode: DuplicateQueries
) -> tuple[dict[str, Item], dict[str, dict[str, int]]]:
    queries: dict[str, Item] = {}
    qrels: dict[str, dict[str, int]] = {}
    if mode == "keep":
        for i, (text, fname) in enumerate(rows):
            qid = f"q{i}"
            queries[qid] = Item(text=text, uid=_query_uid(text))
            qrels[qid] = {fname: 1}
        return queries, qrels
    pages: dict[str, list[str]] = {}
    for text, fname in rows:
        pages.setdefault(text, []).append(fname)
    conflicting = sum(1 for fs in pages.values() if len(set(fs)) > 1)
    if conflicting:
        rule = "the last row's page kept (vidore-benchmark)" if mode == "last" else "all their pages relevant"
        _warn(f"ViDoRe v1 {name!r}: {conflicting} duplicated query string(s) point to different pages; {rule}")
    for i, (text, fnames) in enumerate(pages.items()):
        qid = f"q{i}"
        queries[qid] = Item(text=text, uid=_query_uid(text))
        qrels[qid] = {fnames[-1]: 1} if mode == "last" else {f: 1 for f in fnames}
    return queries, qrels


def _task_list(tasks: Sequence[str] | None, known: dict[str, Any], version: str) -> list[str]:
    """``tasks`` (``None``: all of ``known``); an empty or repeated selection is an error, not "all" / a double
    weight in the NDCG mean."""
    if tasks is None:
        return list(known)
    check_not_string(tasks, "tasks", f"ViDoRe {version} task names")
    names = list(tasks)
    if not names:
        raise ViDoReFormatError(f"empty ViDoRe {version} task list (pass tasks=None for all {len(known)})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ViDoReFormatError(f"ViDoRe {version} task(s) {dup} named more than once")
    return names


def _check_suite_kwargs(kwargs: Mapping[str, Any], fixed: Sequence[str], hint: str) -> None:
    """TypeError naming the keyword arguments a suite loader sets itself (passed on, Python's own TypeError
    said only "got multiple values for keyword argument")."""
    clash = [k for k in fixed if k in kwargs]
    if clash:
        raise TypeError(f"{clash} cannot be passed: {hint}")


def load_vidore_v1_suite(
    root: str | Path, tasks: Sequence[str] | None = None, **kwargs: Any
) -> list[DocRetrievalTask]:
    """The ten ViDoRe v1 tasks (:data:`VIDORE_V1_TASKS`) from ``<root>/<dataset name>/``.

    ``<dataset name>`` is the part after ``vidore/`` (e.g. ``docvqa_test_subsampled``); tasks are
    named by their short key.  Extra keyword arguments go to :func:`load_vidore_v1`.
    """
    _check_suite_kwargs(kwargs, ("name",), "load_vidore_v1_suite names each task by its key; load one task with "
                                           "load_vidore_v1(path, name=...)")
    root = Path(root)
    out = []
    for key in _task_list(tasks, VIDORE_V1_TASKS, "v1"):
        if key not in VIDORE_V1_TASKS:
            raise ViDoReFormatError(f"unknown ViDoRe v1 task {key!r}; known: {list(VIDORE_V1_TASKS)}")
        out.append(load_vidore_v1(root / VIDORE_V1_TASKS[key].split("/", 1)[1], name=key, **kwargs))
    return out


# ---------------------------------------------------------------------------------------------
# ViDoRe-train (the paper's second training set, §4.1)


def load_vidore_train(
    path: str | Path,
    *,
    split: str = "train",
    image_dir: str | Path | None = None,
    check_images: bool = True,
    progress: bool = True,
) -> list[TrainExample]:
    """ViDoRe-train (``vidore/colpali_train_set``) as (query text, page image) training pairs.

    Reads ``{split}-*.parquet`` below ``path`` (``data/train-000NN-of-00082.parquet``; one row per
    query: ``query``, ``image`` as written by ``datasets``, plus ``image_filename``, ``answer``,
    ``source``... which are not needed).  Each pair's page is its positive; the release has no hard
    negative, so ``negative`` is ``None`` (in-batch negatives only, Eq. 6; the paper's ViDoRe-train
    negatives come from Chen et al. 2025a).  Every pair gets ``task`` :data:`VIDORE_TRAIN_TASK`.

    The 118k pages are not held in memory: each page's bytes are written once to ``image_dir``
    (default ``<path>/.metaembed-pages``) as a file named by its content hash, and the item keeps
    the path; a later load finds the file and writes nothing.  ``check_images`` decodes every page
    it writes, and every page the release gives as a file path (a damaged page is a
    :class:`ViDoReFormatError` naming file and row here, not an error hours into training).  Page uids
    are the evaluation loaders' content hashes, so a page shared with a ViDoRe v1 task has one uid.  A row
    whose query is null or blank is skipped (counted in a :class:`ViDoReDataWarning`).
    """
    location = Path(path)
    files = _files(location, split)
    root = location if location.is_dir() else location.parent
    pages = Path(image_dir) if image_dir is not None else root / ".metaembed-pages"
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    try:
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (pa.ArrowException, OSError, ValueError):  # an unreadable file is named by the row reader below
        total = 0

    out: list[TrainExample] = []
    blank = written = 0
    with tqdm(total=total or None, desc="ViDoRe-train pages", unit="row", disable=not progress) as bar:
        for file in files:
            for row, rec in _iter_rows(file, TRAIN_FIELDS):
                bar.update()
                query = rec["query"]
                if query is not None and not isinstance(query, str):
                    raise ViDoReFormatError(f"{where(file, row, 'query')}: expected a string, got "
                                            f"{type(query).__name__}")
                if query is None or not query.strip():
                    blank += 1
                    continue
                image, uid, new = _page_file(rec["image"], file, row, pages, check_images)
                written += new
                out.append(TrainExample(query=Item(text=query, uid=_query_uid(query)),
                                        positive=Item(image=image, uid=uid, source=where(file, row, "image")),
                                        task=VIDORE_TRAIN_TASK))
    if blank:
        _warn(f"ViDoRe-train {location}: skipped {blank} row(s) with a null or blank query")
    if not out:
        raise ViDoReFormatError(f"{location}: no ViDoRe-train row with a query in {[f.name for f in files]}")
    if written:
        log.info("ViDoRe-train: wrote %d page image(s) to %s", written, pages)
    return out


def _page_file(value: Any, path: Path, row: int, pages: Path, check: bool) -> tuple[Path, str, bool]:
    """A ViDoRe-train page as an image file: ``(file, uid, written now)``.

    Bytes go to ``pages/<hash[:2]>/<hash>.<format>`` unless that file exists (written whole through a
    temporary file and a rename, so an existing file is complete); a page given as a path is used where
    it is.  The uid is :func:`_open_image`'s for the same page.
    """
    data = value.get("bytes") if isinstance(value, dict) else value
    if not (isinstance(data, (bytes, bytearray, memoryview)) and len(data)):
        # a path beside the parquet (decoded when ``check``), or a clear error
        image, uid = _open_image(value, path, row, "image", decode=check)
        return Path(image), uid, False
    data = bytes(data)
    digest = hashlib.sha1(data).hexdigest()
    uid = _bytes_uid(digest)
    folder = pages / digest[:2]
    found = sorted(folder.glob(f"{digest}.*")) if folder.is_dir() else []
    if found:
        return found[0], uid, False
    target = folder / f"{digest}.{_check_image_bytes(data, path, row, 'image', decode=check)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a name no other writer has (ranks on several hosts may share a pid): each writes its own file
        # (exclusive create, permissions from the umask) and renames it over the target, so the target is
        # always one writer's whole page
        tmp = folder / f".{digest}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as e:
        raise ViDoReFormatError(f"cannot write ViDoRe-train page images to {pages} ({e}); pass image_dir "
                                f"(data.vidore_train_image_dir) a writable folder") from None
    return target, uid, True


# ---------------------------------------------------------------------------------------------
# v2


def load_vidore_v2(
    root: str | Path,
    name: str | None = None,
    *,
    language: str | None = None,
    split: str = "test",
    on_unknown: OnUnknown = "error",
    keep_nonpositive: bool = True,
    task_split: Split = "ood",
) -> DocRetrievalTask:
    """Load one BEIR-format ViDoRe task (``corpus/``, ``queries/``, ``qrels/`` parquet splits).

    ``language`` keeps only queries whose ``language`` column equals it
    (case-insensitive); ``None`` keeps all.  See the module docstring for the
    handling of unknown ids, non-positive grades and unjudged queries.
    """
    if on_unknown not in ("error", "skip"):
        raise ValueError(f"on_unknown must be 'error' or 'skip', got {on_unknown!r}")
    root = Path(root)
    name = name or root.name
    for sub in ("corpus", "queries", "qrels"):
        if not (root / sub).is_dir():
            raise ViDoReFormatError(f"{root / sub}: directory not found (expected BEIR layout corpus/queries/qrels)")

    corpus: dict[str, Item] = {}
    for file in _files(root / "corpus", split):
        for row, rec in _iter_rows(file, ("corpus-id", "image")):
            did = _id(rec["corpus-id"], file, row, "corpus-id")
            if did in corpus:
                raise ViDoReFormatError(f"{where(file, row, 'corpus-id')}: duplicate corpus id {did!r}")
            image, uid = _open_image(rec["image"], file, row, "image")
            corpus[did] = Item(image=image, uid=uid, source=f"{where(file, row, 'image')} (corpus-id {did!r})")

    queries: dict[str, Item] = {}
    filtered_out: set[str] = set()
    want = language.lower() if language is not None else None
    for file in _files(root / "queries", split):
        required = ("query-id", "query") + (("language",) if want is not None else ())
        for row, rec in _iter_rows(file, required):
            qid = _id(rec["query-id"], file, row, "query-id")
            if qid in queries or qid in filtered_out:
                raise ViDoReFormatError(f"{where(file, row, 'query-id')}: duplicate query id {qid!r}")
            if want is not None:
                lang = rec["language"]
                if not isinstance(lang, str):
                    raise ViDoReFormatError(f"{where(file, row, 'language')}: expected a string, got {lang!r}")
                if lang.lower() != want:
                    filtered_out.add(qid)
                    continue
            text = rec["query"]
            if not isinstance(text, str) or not text.strip():
                raise ViDoReFormatError(f"{where(file, row, 'query')}: expected a non-empty string, got {text!r}")
            queries[qid] = Item(text=text, uid=_query_uid(text))
    if not queries:
        raise ViDoReFormatError(f"{root / 'queries'}: no query" + (f" with language {language!r}" if language else ""))

    qrels: dict[str, dict[str, int]] = {}
    judged: dict[tuple[str, str], int] = {}  # (query id, corpus id) -> last grade, dropped grades <= 0 included
    unknown: list[str] = []
    repeated: list[str] = []  # rows judging a pair judged before
    nonpositive = conflicting = 0
    for file in _files(root / "qrels", split):
        for row, rec in _iter_rows(file, ("query-id", "corpus-id", "score")):
            qid = _id(rec["query-id"], file, row, "query-id")
            did = _id(rec["corpus-id"], file, row, "corpus-id")
            grade = _grade(rec["score"], file, row)
            problem = None
            if did not in corpus:  # checked for every row: whether a bad file is caught must not depend on language
                problem = f"{where(file, row, 'corpus-id')}: unknown corpus id {did!r}"
            elif qid in filtered_out:
                continue
            elif qid not in queries:
                problem = f"{where(file, row, 'query-id')}: unknown query id {qid!r}"
            if problem:
                if on_unknown == "error":
                    raise ViDoReFormatError(problem + " (data.vidore_unknown_ids=skip, or load_vidore_v2(..., "
                                             "on_unknown='skip'), skips such judgements, with a warning)")
                unknown.append(problem)
                continue
            if (qid, did) in judged:  # the official evaluators keep the last row's grade (a dict built over rows)
                repeated.append(f"{where(file, row)}: ({qid!r}, {did!r})")
                conflicting += judged[(qid, did)] != grade
            judged[(qid, did)] = grade
    for (qid, did), grade in judged.items():
        if grade > 0 or keep_nonpositive:
            qrels.setdefault(qid, {})[did] = grade
        else:
            nonpositive += 1
            qrels.setdefault(qid, {})
    if unknown:
        _warn(f"ViDoRe v2 {name!r}: skipped {len(unknown)} judgement(s) with unknown ids (first: {unknown[0]}); "
              "NDCG is then not comparable with pytrec_eval (missing relevant pages leave the ideal DCG)")
    if repeated:
        _warn(f"ViDoRe v2 {name!r}: {len(repeated)} qrels row(s) judge a (query, page) pair judged before, "
              f"{conflicting} with another grade; the last row's grade is kept, as the official evaluators do "
              f"(first: {repeated[0]})")
    if nonpositive:
        _warn(f"ViDoRe v2 {name!r}: dropped {nonpositive} judgement(s) with grade <= 0")
    # pytrec_eval ignores queries without any qrels row, and scores 0 (counted) those whose rows
    # are all <= 0; without the rows <= 0 (keep_nonpositive=False) such a query is not evaluated
    judgement = "judgement" if keep_nonpositive else "positive judgement"
    unjudged = [q for q in queries if not qrels.get(q)]
    if unjudged:
        _warn(f"ViDoRe v2 {name!r}: dropped {len(unjudged)} quer(y/ies) without a {judgement} (first: {unjudged[0]!r})")
        for q in unjudged:
            queries.pop(q)
            qrels.pop(q, None)
    zero = [q for q in queries if not any(g > 0 for g in qrels[q].values())]
    if zero:
        _warn(f"ViDoRe v2 {name!r}: {len(zero)} quer(y/ies) judged only with grades <= 0 score NDCG 0 and count "
              f"in the mean, as in pytrec_eval (first: {zero[0]!r}; keep_nonpositive=False drops them)")
    if not queries:
        raise ViDoReFormatError(f"{root}: no query has a {judgement}")
    qrels = {q: qrels[q] for q in queries}
    return DocRetrievalTask(name=name, queries=queries, corpus=corpus, qrels=qrels, split=task_split)


def load_vidore_v2_suite(
    root: str | Path, tasks: Sequence[str] | None = None, **kwargs: Any
) -> list[DocRetrievalTask]:
    """The paper's seven ViDoRe v2 columns (:data:`VIDORE_V2_TASKS`) from ``<root>/<dataset name>/``.

    ``<dataset name>`` is the part after ``vidore/`` (e.g. ``esg_reports_v2``).
    Extra keyword arguments go to :func:`load_vidore_v2`.
    """
    _check_suite_kwargs(kwargs, ("name", "language"), "load_vidore_v2_suite sets each column's name and language "
                        "from VIDORE_V2_TASKS; load one dataset in another language with load_vidore_v2(path, "
                        "language=...)")
    root = Path(root)
    out = []
    for column in _task_list(tasks, VIDORE_V2_TASKS, "v2"):
        if column not in VIDORE_V2_TASKS:
            raise ViDoReFormatError(f"unknown ViDoRe v2 task {column!r}; known: {list(VIDORE_V2_TASKS)}")
        dataset, lang = VIDORE_V2_TASKS[column]
        out.append(load_vidore_v2(root / dataset.split("/", 1)[1], name=column, language=lang, **kwargs))
    return out


def cap_task(task: DocRetrievalTask, max_queries: int | None = None, max_pages: int | None = None
             ) -> DocRetrievalTask:
    """A smaller copy of ``task`` for smoke runs: its first ``max_queries`` queries (file order) with their
    qrels, and a corpus of at most ``max_pages`` pages: every page those queries judge, then the first other
    pages in corpus order as distractors.  ``None`` keeps all.  NDCG@k over a smaller corpus is higher than
    over the whole one, so a capped task's score is not comparable with the paper's.

    When the kept queries judge more than ``max_pages`` pages, all of them are kept (NDCG needs them) and
    a :class:`ViDoReDataWarning` says so.
    """
    for name, value in (("max_queries", max_queries), ("max_pages", max_pages)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"cap_task: {name} must be an integer >= 1 or None, got {value!r}")
    queries = dict(list(task.queries.items())[:max_queries])
    qrels = {q: task.qrels[q] for q in queries}
    corpus = task.corpus
    if max_pages is not None and len(corpus) > max_pages:
        judged = {d for rel in qrels.values() for d in rel if d in corpus}
        others = [d for d in corpus if d not in judged][: max(0, max_pages - len(judged))]
        keep = judged | set(others)
        corpus = {d: item for d, item in corpus.items() if d in keep}  # corpus order
        if len(judged) > max_pages:
            _warn(f"{task.name}: its first {len(queries)} queries judge {len(judged)} pages, more than "
                  f"max_pages={max_pages}: keeping all of them and no other page")
    return DocRetrievalTask(name=task.name, queries=queries, corpus=corpus, qrels=qrels, split=task.split)


def _instructed_query(item: Item, instruction: str) -> Item:
    text = instruction + item.text
    return dataclasses.replace(item, text=text, uid=_query_uid(text))


def _instructed_page(item: Item, instruction: str) -> Item:
    # the page's content hash plus the instruction's: a cached page embedding without it is never served
    uid = None if item.uid is None else f"{item.uid}/t/{hashlib.sha1(instruction.encode()).hexdigest()[:16]}"
    return dataclasses.replace(item, text=instruction, uid=uid)


def _check_instructions(query: str, page: str) -> None:
    for name, value in (("query", query), ("page", page)):
        if not isinstance(value, str):
            raise TypeError(f"the {name} instruction must be a string, got {type(value).__name__} {value!r}")


def instruct_task(task: DocRetrievalTask, query: str = "", page: str = "") -> DocRetrievalTask:
    """``task`` with ``query`` prepended to every query's text (as written: end it with a space or newline)
    and ``page`` as every page's text (the image first, then the text, unless it holds ``<|image_1|>``).

    ViDoRe items carry no instruction as loaded, while MMEB items keep their parquet's.  VLM2Vec-V2's and
    MoCa's visual-document evaluations use ``query="Find a document image that matches the given query: "``
    and ``page="Understand the content of the provided document image."``; the paper states none
    (``data.vidore_query_instruction`` / ``data.vidore_page_instruction``).  Uids change with the text, so an
    embedding cache never serves an uninstructed vector.  Empty strings return ``task`` itself.
    """
    _check_instructions(query, page)
    if not query and not page:
        return task
    queries = {q: _instructed_query(it, query) for q, it in task.queries.items()} if query else task.queries
    corpus = {d: _instructed_page(it, page) for d, it in task.corpus.items()} if page else task.corpus
    return dataclasses.replace(task, queries=queries, corpus=corpus)


def instruct_examples(examples: Sequence[TrainExample], query: str = "", page: str = "") -> list[TrainExample]:
    """ViDoRe-train pairs (:func:`load_vidore_train`) with the instructions of :func:`instruct_task`: ``query``
    prepended to each query, ``page`` as the text of each positive (and hard negative) page, so training sees
    the items evaluation scores."""
    _check_instructions(query, page)
    if not query and not page:
        return list(examples)

    def pg(item: Item | None) -> Item | None:
        return item if item is None or not page else _instructed_page(item, page)

    return [dataclasses.replace(ex, query=_instructed_query(ex.query, query) if query else ex.query,
                                positive=pg(ex.positive), negative=pg(ex.negative)) for ex in examples]
