"""MMEB from local parquet files: training triples (MMEB-train) and the 36 evaluation tasks (MMEB-eval).

Nothing is downloaded; the loaders read the Hugging Face layouts of the two
datasets after they were fetched and unzipped by other means.

Training (``TIGER-Lab/MMEB-train``): ``<root>/<Subset>/original-*.parquet``
with columns ``qry, qry_image_path, pos_text, pos_image_path, neg_text,
neg_image_path``; image paths (``images/<Subset>/...``) are relative to an
image root (default ``<root>``, where ``images.zip`` unzips into ``images/``).
An empty path means "no image".  Each row becomes ``TrainExample(query,
positive, negative, task=<Subset>)``.  The MoCa / mmE5 hard-negative release
(``intfloat/mmE5-MMEB-hardneg``, used by the paper, §4.1) has the same columns but
``neg_text`` / ``neg_image_path`` hold *stringified Python lists*; they are
parsed as JSON or else with :func:`ast.literal_eval` (never ``eval``) and
one negative is picked (the first, or a random one seeded by the seed and the row's content, so copies
of a row keep one negative; an empty list means
no negative).  MoCa quirk kept on purpose: an image negative whose text is
empty borrows the positive's text (the candidate-side instruction, e.g.
``"<|image_1|>\\nRepresent the given image."``) when the positive has an image.
Where MoCa's loader (``src/dataset.py``) differs: an empty negative text borrows
the positive's text whenever every text of the row's list is the same (also for a
text-only positive, which pairs an image negative with, e.g., a caption), and
otherwise a random non-empty text of the list (unseeded, and another
negative's text, not that of the negative's own image); we never give a
negative another negative's text.  For an image positive the two disagree only
on rows whose list mixes empty and non-empty texts.  The release also holds
four subsets beyond MMEB-train's 20 (TAT-DQA, ArxivQA, InfoSeek_it2t,
InfoSeek_it2it); without a subset list they are loaded, with a warning.

Evaluation (``TIGER-Lab/MMEB-eval``): ``<root>/<Task>/test-*.parquet`` with
``qry_text, qry_img_path, tgt_text (list), tgt_img_path (list)``; the positive
is candidate 0.  Each task becomes an :class:`EvalTask` with its meta-task and
IND/OOD membership from :data:`MMEB_TASKS`.

Image placeholder: ``<|image_1|>`` is kept when the item has an image (the
backbone adapter rewrites it) and removed when it has none, the text around it
kept as written (``"<|image_1|>\\nRepresent ..."`` -> ``"\\nRepresent ..."``), as
MoCa's loader (``src/dataset.py``: ``TaskBatchDataset`` / ``EvalDataset``) does; neither it
nor VLM2Vec's strips the text.

Precision@1 and ties (VLM2Vec v1, ``eval.py`` + ``evaluation/eval_utils.py``
in TIGER-AI-Lab/VLM2Vec): embeddings are computed once per distinct
``(text, img_path)`` pair and cached in a dict keyed by that pair, each row's
candidates are scored with ``np.dot`` and the prediction is ``np.argmax`` of
the scores; a row counts as correct iff ``pred == 0``.  ``np.argmax`` returns
the *first* maximum, so a candidate tied with the positive (in practice an
exact duplicate of it, which shares its cached embedding) resolves in favour
of the positive.  ``precision_at_1(..., ties="first")`` with argmax semantics
therefore matches VLM2Vec.  To keep that property, candidates (and queries)
get a ``uid`` hashed from ``(role, text, resolved image path)``, the text taken
after the placeholder of an image-less item is dropped: identical candidates
share a uid (within and across tasks), so an encoder cache gives them
bit-identical vectors.

Sampling: ``max_per_subset`` draws a seeded random subset (VLM2Vec instead
takes the first N rows, ``split[:N]``); ``subset_weights`` multiplies a
subset's (capped) count, drawing from the capped rows only and up-sampling them
with repetition when the weight asks for more rows than the cap keeps.  :func:`held_out_split` reserves 1% of *each* subset as
the validation split (Appendix A).
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import random
import tokenize
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal


from ..config import short_repr
from .records import (
    IMAGE_PLACEHOLDER,
    DataFormatError,
    EvalQuery,
    EvalTask,
    Item,
    MetaTask,
    RecordSource,
    Split,
    TrainExample,
    check_not_string,
    file_stamp,
    item_key,
    iter_parquet_rows,
    where,
)

NegativesFormat = Literal["auto", "single", "list"]
NegativeChoice = Literal["first", "random"]

TRAIN_FIELDS: tuple[str, ...] = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
EVAL_FIELDS: tuple[str, ...] = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


class MMEBFormatError(DataFormatError):
    """A local MMEB file does not match the expected layout; the message names file, row and field."""


class MMEBDataWarning(UserWarning):
    """Rows were skipped (only when the caller asked for skipping)."""


@dataclass(frozen=True)
class MMEBTask:
    """One of the 36 MMEB tasks: eval directory name, meta-task, IND/OOD and its MMEB-train subset."""

    name: str
    meta_task: MetaTask
    split: Split
    train_subset: str | None = None  # the MMEB-train directory for IND tasks (20 of them)


_TRAIN_DIR_NAMES = {"ImageNet-1K": "ImageNet_1K"}  # the only IND task whose MMEB-train directory differs


def _tasks(meta: MetaTask, split: Split, *names: str) -> list[MMEBTask]:
    return [MMEBTask(n, meta, split, _TRAIN_DIR_NAMES.get(n, n) if split == "ind" else None) for n in names]


#: The 36 MMEB tasks (Jiang et al., 2024, Table 1; VLM2Vec ``experiments/report_score.py`` names):
#: classification 10, VQA 10, retrieval 12, grounding 4; IND = the 20 MMEB-train subsets, OOD = 16.
MMEB_TASKS: dict[str, MMEBTask] = {
    t.name: t
    for t in (
        _tasks("classification", "ind", "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")
        + _tasks("classification", "ood", "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")
        + _tasks("vqa", "ind", "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")
        + _tasks("vqa", "ood", "ScienceQA", "VizWiz", "GQA", "TextVQA")
        + _tasks(
            "retrieval", "ind",
            "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
        )
        + _tasks("retrieval", "ood", "OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ")
        + _tasks("grounding", "ind", "MSCOCO")
        + _tasks("grounding", "ood", "Visual7W-Pointing", "RefCOCO", "RefCOCO-Matching")
    )
}

#: The 20 MMEB-train subset directory names (note ``ImageNet_1K`` vs the eval task ``ImageNet-1K``).
MMEB_TRAIN_SUBSETS: tuple[str, ...] = tuple(t.train_subset for t in MMEB_TASKS.values() if t.train_subset)


# ---------------------------------------------------------------------------------------------
# file access


def _parquet_files(directory: Path, prefix: str) -> list[Path]:
    if not directory.is_dir():
        raise MMEBFormatError(f"{directory}: directory not found")
    files = sorted(set(directory.glob(f"{prefix}-*.parquet")) | set(directory.glob(f"{prefix}.parquet")))
    if not files:
        found = sorted(p.name for p in directory.glob("*.parquet"))
        raise MMEBFormatError(f"{directory}: no '{prefix}-*.parquet' file (parquet files present: {found or 'none'})")
    return files


def _iter_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_index, {field: value})`` for one parquet file, checking the columns first."""
    return iter_parquet_rows(path, fields, error=MMEBFormatError, batch_size=4096)


def _as_str(value: Any, path: Path, row: int, field: str, *, allow_none: bool = False) -> str:
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise MMEBFormatError(f"{where(path, row, field)}: expected a string, got {type(value).__name__}")
    return value


class _MissingImage(Exception):
    pass


def _resolve_image(rel: str, image_root: Path, check: bool, path: Path, row: int, field: str) -> Path | None:
    if not rel:
        return None
    full = Path(rel) if Path(rel).is_absolute() else image_root / rel
    if check and not full.is_file():
        raise _MissingImage(f"{where(path, row, field)}: image {rel!r} not found (looked for {full}; image paths "
                            f"are read relative to the image root {image_root}: set data.image_root (MMEB-train) or "
                            "data.eval_image_root (MMEB-eval) to the folder holding the unzipped images/)")
    return full


def _strip_placeholder(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "") if IMAGE_PLACEHOLDER in text else text


def _item(text: str, image: Path | None, uid: str | None = None, source: RecordSource | None = None) -> Item:
    """An :class:`Item`; the ``<|image_1|>`` placeholder is dropped when there is no image.  ``source`` (the
    parquet row of its image) is kept only with an image: a corrupt or unusable image file then names its row."""
    return Item(text=text if image is not None else _strip_placeholder(text), image=image, uid=uid,
                source=source if image is not None else None)


def _is_empty(item: Item) -> bool:
    """True when an item has no image and no text left once the placeholder is dropped."""
    return item.image is None and not item.text.strip()


def _uid(role: str, text: str, image: Path | None) -> str:
    """Content id: identical (text, image file) pairs share it, across tasks too.

    The image part is the resolved path with the file's size and mtime (:func:`file_stamp`), so a
    replaced image gets a new uid and a cached embedding of the old one is not reused.
    """
    stamp = file_stamp(image) if image is not None else ""
    digest = hashlib.sha1(f"{text}\x00{stamp}".encode()).hexdigest()[:24]
    return f"mmeb/{role}/{digest}"


def _eval_item(role: str, text: str, image: Path | None, source: RecordSource) -> Item:
    """An evaluation :class:`Item` whose uid hashes what the encoder sees (the text after the placeholder
    is dropped), so ``"<|image_1|> yes"`` and ``"yes"`` without an image are one item with one uid.
    ``source`` is the row where the item was first seen."""
    item = _item(text, image, source=source)
    return Item(text=item.text, image=image, uid=_uid(role, item.text, image), source=item.source)


# ---------------------------------------------------------------------------------------------
# hard negatives


def parse_negative_field(value: Any, fmt: NegativesFormat = "auto", where: str = "") -> list[str]:
    """Turn a ``neg_text`` / ``neg_image_path`` cell into a list of strings.

    ``fmt="single"``: the cell is one string (original MMEB-train); ``"list"``:
    a stringified list (MoCa / mmE5 hard negatives); ``"auto"``: a string that
    looks like ``[...]`` is parsed as a list, anything else is one string.
    A list is read as JSON when it is valid JSON (``json.dumps`` writes an emoji
    as the surrogate pair ``"\\ud83d\\ude00"``, which Python's literal syntax
    would read as two lone surrogates), else as a Python literal
    (:func:`ast.literal_eval`, as ``str(list)`` writes it); never ``eval``.
    A native list column is accepted in every mode.
    """
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_neg_element(v, where) for v in value]
    if not isinstance(value, str):
        raise MMEBFormatError(f"{where}: expected a string or list, got {type(value).__name__}")
    stripped = value.strip()
    looks_like_list = stripped.startswith("[") and stripped.endswith("]")
    if fmt == "single" or (fmt == "auto" and not looks_like_list) or not stripped:
        return [value]  # a blank cell in "list" mode too: "no text" / "no image" beside the other field's list
    if fmt not in ("auto", "list"):
        raise ValueError(f"negatives format must be 'auto', 'single' or 'list', got {fmt!r}")
    parsed: Any
    try:  # JSON first: Python's literal syntax reads JSON's surrogate pairs and "\/" escapes differently
        parsed = json.loads(stripped)
    except (ValueError, MemoryError, RecursionError):
        try:
            parsed = _literal_list(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            raise MMEBFormatError(
                f"{where}: cannot parse {value[:80]!r} as a list of strings"
                + (" (pass negatives='single' if these cells are plain text)" if fmt == "auto" else "")
            ) from None
    if not isinstance(parsed, (list, tuple)):
        raise MMEBFormatError(f"{where}: expected a list, parsed a {type(parsed).__name__}")
    return [_neg_element(v, where) for v in parsed]


def _literal_list(text: str) -> Any:
    """:func:`ast.literal_eval`, refusing adjacent string literals.

    Python joins ``['a' 'b']`` (a missing comma) into one string, which would
    silently merge two hard negatives into one; such a cell is a format error.
    """
    try:
        tokens = [t.type for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in _LAYOUT_TOKENS]
    except tokenize.TokenError as e:
        raise SyntaxError(str(e)) from None
    if any(a == b == tokenize.STRING for a, b in zip(tokens, tokens[1:])):
        raise ValueError("adjacent string literals (a missing comma?)")
    return ast.literal_eval(text)


_LAYOUT_TOKENS = frozenset({tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.COMMENT, tokenize.ENDMARKER})


def _neg_element(v: Any, where: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise MMEBFormatError(f"{where}: list element {short_repr(v)} is not a string")  # may be megabytes long
    return v


def _negative_pairs(texts: list[str], images: list[str], where: str) -> list[tuple[str, str]]:
    """Align negative texts and image paths; drop entries that have neither (placeholder-only or blank
    text without an image counts as no text)."""
    texts = [t if t.strip() else "" for t in texts]  # a blank cell or element is "no text" / "no image"
    images = [i if i.strip() else "" for i in images]
    if len(texts) != len(images):
        if all(t == "" for t in texts) and len(texts) <= 1:
            texts = [""] * len(images)
        elif all(i == "" for i in images) and len(images) <= 1:
            images = [""] * len(texts)
        else:
            raise MMEBFormatError(f"{where}: neg_text has {len(texts)} entries but neg_image_path has {len(images)}")
    return [(t, i) for t, i in zip(texts, images) if i or _strip_placeholder(t).strip()]


# ---------------------------------------------------------------------------------------------
# training


def _subset_dirs(root: Path, subsets: Sequence[str] | None, split: str) -> list[str]:
    if not root.is_dir():
        raise MMEBFormatError(f"{root}: MMEB root directory not found")
    check_not_string(subsets, "subsets", "subset directory names")
    if subsets is not None:
        if not subsets:
            raise MMEBFormatError(f"{root}: empty subset list")
        for s in subsets:
            if not (root / s).is_dir():
                raise MMEBFormatError(f"{root / s}: subset directory not found")
        dup = sorted({s for s in subsets if list(subsets).count(s) > 1})
        if dup:
            raise MMEBFormatError(
                f"{root}: subset(s) {dup} named more than once (use subset_weights to up-sample a subset)"
            )
        return list(subsets)
    found = sorted(
        d.name for d in root.iterdir()
        if d.is_dir() and (any(d.glob(f"{split}-*.parquet")) or (d / f"{split}.parquet").exists())
    )
    if not found:
        prefixes = sorted({f.name.split("-")[0].removesuffix(".parquet") for d in root.iterdir() if d.is_dir()
                           for f in d.glob("*.parquet")})
        hint = (f"; its subset directories hold {', '.join(repr(p + '-*.parquet') for p in prefixes)} "
                "(choose one with data.split)" if prefixes else "")
        raise MMEBFormatError(f"{root}: no subset directory with '{split}-*.parquet' files{hint}")
    missing = [s for s in MMEB_TRAIN_SUBSETS if s not in found]
    if len(missing) < len(MMEB_TRAIN_SUBSETS) and missing:  # an MMEB-train folder lacking some of its 20 subsets
        warnings.warn(f"{root}: loading {len(MMEB_TRAIN_SUBSETS) - len(missing)} of the {len(MMEB_TRAIN_SUBSETS)} "
                      f"MMEB-train subsets; missing (no '{split}-*.parquet' files): {missing} (name the subsets "
                      "to train on to silence this)", MMEBDataWarning, stacklevel=3)
    extra = [s for s in found if s not in MMEB_TRAIN_SUBSETS]
    if extra and len(missing) < len(MMEB_TRAIN_SUBSETS):  # e.g. the mmE5 / MoCa release's 4 added subsets
        warnings.warn(f"{root}: also loading {len(extra)} subset folder(s) that are not among the 20 MMEB-train "
                      f"subsets: {extra} (the hard-negative release intfloat/mmE5-MMEB-hardneg adds TAT-DQA, "
                      "ArxivQA, InfoSeek_it2t and InfoSeek_it2it; the paper, §4.1, trains on MMEB-train alone): "
                      "name data.subsets to choose (experiments/configs list the 20)", MMEBDataWarning, stacklevel=3)
    return found


def load_mmeb_train(
    root: str | Path,
    subsets: Sequence[str] | None = None,
    *,
    image_root: str | Path | None = None,
    split: str = "original",
    negatives: NegativesFormat = "auto",
    negative_choice: NegativeChoice = "first",
    skip_missing: bool = False,
    check_images: bool = True,
    max_per_subset: int | None = None,
    subset_weights: Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[TrainExample]:
    """Read MMEB-train style parquet files into :class:`TrainExample` triples.

    ``subsets=None`` loads every directory of ``root`` holding ``{split}-*.parquet``
    files, warning (:class:`MMEBDataWarning`) when some but not all of the 20
    :data:`MMEB_TRAIN_SUBSETS` are among them.  Missing images raise
    :class:`MMEBFormatError` naming file, row and field, unless ``skip_missing=True``
    (the row is skipped and counted in an :class:`MMEBDataWarning`); a subset whose
    files hold no row at all raises.
    ``max_per_subset`` / ``subset_weights`` are applied with :func:`mix_subsets`
    (deterministic by ``seed``).
    """
    if negative_choice not in ("first", "random"):
        raise ValueError(f"negative_choice must be 'first' or 'random', got {negative_choice!r}")
    if negatives not in ("auto", "single", "list"):
        raise ValueError(f"negatives must be 'auto', 'single' or 'list', got {negatives!r}")
    root = Path(root)
    img_root = Path(image_root) if image_root is not None else root
    out: list[TrainExample] = []
    for subset in _subset_dirs(root, subsets, split):
        skipped: list[str] = []
        files = _parquet_files(root / subset, split)
        n_rows = 0
        for path in files:
            for row, rec in _iter_rows(path, TRAIN_FIELDS):
                n_rows += 1
                try:
                    ex = _train_example(rec, subset, path, row, img_root, check_images, negatives, negative_choice, seed)
                except _MissingImage as e:
                    if not skip_missing:
                        raise MMEBFormatError(str(e)) from None
                    skipped.append(str(e))
                    continue
                out.append(ex)
        if not n_rows:  # a subset that silently contributed nothing would shift the mixture unnoticed
            raise MMEBFormatError(f"{root / subset}: subset has no rows in {[p.name for p in files]}")
        if skipped:
            warnings.warn(
                f"MMEB-train subset {subset!r}: skipped {len(skipped)} row(s) with missing images "
                f"(first: {skipped[0]})",
                MMEBDataWarning,
                stacklevel=2,
            )
    if max_per_subset is not None or subset_weights:
        out = mix_subsets(out, max_per_subset=max_per_subset, subset_weights=subset_weights, seed=seed)
    return out


def _train_example(
    rec: dict[str, Any],
    subset: str,
    path: Path,
    row: int,
    img_root: Path,
    check: bool,
    negatives: NegativesFormat,
    choice: NegativeChoice,
    seed: int,
) -> TrainExample:
    q_text = _as_str(rec["qry"], path, row, "qry")
    q_img = _resolve_image(_as_str(rec["qry_image_path"], path, row, "qry_image_path", allow_none=True),
                           img_root, check, path, row, "qry_image_path")
    p_text = _as_str(rec["pos_text"], path, row, "pos_text", allow_none=True)
    p_img = _resolve_image(_as_str(rec["pos_image_path"], path, row, "pos_image_path", allow_none=True),
                           img_root, check, path, row, "pos_image_path")
    query = _item(q_text, q_img, source=RecordSource(path, row, "qry_image_path"))
    positive = _item(p_text, p_img, source=RecordSource(path, row, "pos_image_path"))
    if _is_empty(query):
        raise MMEBFormatError(f"{where(path, row, 'qry')}: query has neither text nor image")
    if _is_empty(positive):
        raise MMEBFormatError(f"{where(path, row, 'pos_text')}: positive has neither text nor image")

    texts = parse_negative_field(rec["neg_text"], negatives, where(path, row, "neg_text"))
    images = parse_negative_field(rec["neg_image_path"], negatives, where(path, row, "neg_image_path"))
    pairs = _negative_pairs(texts, images, where(path, row, "neg_text/neg_image_path"))
    negative: Item | None = None
    if pairs:
        if choice == "first" or len(pairs) == 1:
            n_text, n_path = pairs[0]
        else:
            # seeded by the row's content, not its place: a row held twice (in one file or two) keeps one negative,
            # so its copies stay copies for held_out_split (file and row number gave them different ones)
            cells = json.dumps([rec[f] for f in TRAIN_FIELDS], default=str, ensure_ascii=False)
            digest = hashlib.sha1(cells.encode()).hexdigest()
            n_text, n_path = random.Random(f"{seed}:{subset}:{digest}").choice(pairs)
        n_img = _resolve_image(n_path, img_root, check, path, row, "neg_image_path")
        if not n_text and n_img is not None and p_img is not None:
            n_text = p_text  # MoCa: image-only negatives borrow the candidate-side instruction
        negative = _item(n_text, n_img, source=RecordSource(path, row, "neg_image_path"))
    return TrainExample(query=query, positive=positive, negative=negative, task=subset)


def _group_by_task(examples: Sequence[TrainExample]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.task, []).append(i)
    return groups


def mix_subsets(
    examples: Sequence[TrainExample],
    *,
    max_per_subset: int | None = None,
    subset_weights: Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[TrainExample]:
    """Cap and re-weight subsets (``TrainExample.task``), deterministically by ``seed``.

    The cap draws the subset's pool: ``min(n, max_per_subset)`` of its rows,
    a random sample from the subset's own generator seeded by ``(seed, subset)``
    (all rows without a cap).  The subset then keeps ``len(pool) * weight``
    examples rounded half up (``floor(x + 0.5)`` on the weight as written, in
    exact arithmetic: 2.5 -> 3 and 45 * 0.7 -> 32, not Python's ``round`` to
    even; weight 1 when absent from ``subset_weights``): whole
    passes over the pool in original order, then the remainder drawn from the
    pool without replacement (a prefix of the same random order, so a smaller
    weight keeps a subset of a larger one's rows) and kept in original order.
    Rows beyond the cap are never used, whatever the weight (with a weight above
    1 they were: cap 5 of 10 rows at weight 3 drew 15 examples from all 10).
    Subsets appear in first-seen order.  A weight naming an unknown subset raises
    (typos never fall back silently).
    """
    if max_per_subset is not None and max_per_subset < 0:
        raise ValueError(f"max_per_subset must be >= 0, got {max_per_subset}")
    groups = _group_by_task(examples)
    weights = dict(subset_weights or {})
    unknown = sorted(set(weights) - set(groups))
    if unknown:
        raise ValueError(f"subset_weights names unknown subset(s) {unknown}; loaded subsets: {sorted(groups)}")
    out: list[TrainExample] = []
    for task, idx in groups.items():
        w = float(weights.get(task, 1.0))
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"subset_weights[{task!r}] must be a finite number >= 0, got {w}")
        n = len(idx)
        c = n if max_per_subset is None else min(n, max_per_subset)  # the pool's size
        target = math.floor(c * Fraction(repr(w)) + Fraction(1, 2))  # exact: 45 * 0.7 is 31.499999... in floats
        if target == 0:
            continue
        order = list(range(n))
        random.Random(f"{seed}:mix:{task}").shuffle(order)
        chosen = sorted(order[:c]) * (target // c) + sorted(order[: target % c])  # pool passes, then a prefix
        out.extend(examples[idx[j]] for j in chosen)
    return out


def _subset_seed(seed: int, task: str) -> int:
    """A 63-bit generator seed for one subset: stable across processes (not ``hash()``)."""
    digest = hashlib.blake2b(f"{int(seed)}:heldout:{task}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _pair_key(ex: TrainExample, cache: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """:func:`item_key` of query and positive: equal for copies of one pair, whatever their negatives."""
    key = cache.get(id(ex))
    if key is None:
        key = cache[id(ex)] = (item_key(ex.query), item_key(ex.positive))
    return key


def held_out_split(
    examples: Sequence[TrainExample], fraction: float = 0.01, seed: int = 0
) -> tuple[list[TrainExample], list[TrainExample]]:
    """Split off ``fraction`` of *each* subset (``TrainExample.task``) as validation (Appendix A: 1%).

    The one implementation of the split: training (``MetaEmbedDataModule`` via
    ``split_train_val``) uses exactly this function, so a validation set made
    here was never trained on.  A subset with at least two distinct examples
    gives ``max(1, round(fraction * n))`` of them (and keeps at least one for
    training); smaller subsets stay in training.  Copies of one (query, positive)
    pair -- the same object (up-sampled by :func:`mix_subsets`), a source file
    holding a row twice, or one pair with several hard negatives (text and image
    path or pixels, :func:`item_key`) -- stay on one side, and the fraction
    counts distinct pairs: a validation pair is never trained on with another
    negative.  Deterministic in ``seed``; the original order is
    kept in both halves.  Each subset draws from its own generator seeded by
    ``(seed, subset)``, so a subset's split does not change when other subsets
    are added, dropped, capped or re-weighted.  Training splits the examples it
    trains on, after ``max_per_subset`` / ``subset_weights`` / ``max_train``: a
    subset's own cap or weight does change its held-out examples, and so does
    any change of the mixture under ``data.max_train`` (one sample over all
    subsets: it changes which rows of every subset are kept).
    """
    import torch

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    groups = _group_by_task(examples)
    held: set[int] = set()
    keys: dict[int, tuple[int, int]] = {}  # id(example) -> pair key (up-sampled copies hashed once)
    if fraction > 0:
        for task in sorted(groups):
            copies: dict[tuple[int, int], list[int]] = {}  # pair key -> its positions
            for i in groups[task]:
                copies.setdefault(_pair_key(examples[i], keys), []).append(i)
            distinct = list(copies.values())
            if len(distinct) < 2:
                continue
            n_val = min(len(distinct) - 1, max(1, round(fraction * len(distinct))))
            g = torch.Generator().manual_seed(_subset_seed(seed, task))
            pick = torch.randperm(len(distinct), generator=g)[:n_val].tolist()
            held.update(i for p in pick for i in distinct[p])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    val = [ex for i, ex in enumerate(examples) if i in held]
    return train, val


# ---------------------------------------------------------------------------------------------
# evaluation


def partial_coverage(n: int, present: Iterable[str]) -> str:
    """``"<n> of the 36 MMEB-eval tasks, so ... means cover only these; missing: [...]"``: the warning text
    shared by the loader and the summaries when fewer than all of :data:`MMEB_TASKS` are evaluated."""
    missing = [t for t in MMEB_TASKS if t not in set(present)]
    return (f"{n} of the {len(MMEB_TASKS)} MMEB-eval tasks, so per-meta-task, IND, OOD and Overall means cover "
            f"only these; missing: {missing}")


#: ``(role, text cell, image path cell) -> Item``: MMEB-eval lists up to 1000 candidates per query and
#: repeats them across queries, so each distinct one is built (image checked, stamped, hashed) once and
#: shared by every query listing it (an Item per cell took ~0.9 KB and ~37 us: tens of GB and tens of
#: minutes for the 36 tasks).
_ItemMemo = dict[tuple[str, str, str], Item]


def load_mmeb_eval(
    root: str | Path,
    tasks: Sequence[str] | None = None,
    *,
    image_root: str | Path | None = None,
    split: str = "test",
    check_images: bool = True,
    max_queries: int | None = None,
) -> list[EvalTask]:
    """Read MMEB-eval style parquet files into :class:`EvalTask` objects (positive = candidate 0).

    ``tasks=None`` loads every task of :data:`MMEB_TASKS` present under ``root``
    (table order); an explicitly named task must exist and be named once.  ``max_queries`` keeps
    the first N rows of a task (for smoke runs).  Image paths are relative to
    ``image_root`` (default ``root``).  Identical ``(text, image path)`` cells give one shared
    :class:`Item` (in every query and task listing them).
    """
    if max_queries is not None and (isinstance(max_queries, bool) or int(max_queries) != max_queries or max_queries < 1):
        raise ValueError(f"max_queries must be a positive integer or None, got {max_queries!r}")
    root = Path(root)
    if not root.is_dir():
        raise MMEBFormatError(f"{root}: MMEB-eval root directory not found")
    img_root = Path(image_root) if image_root is not None else root
    if tasks is None:
        names = [n for n in MMEB_TASKS if (root / n).is_dir()]
        # folders holding eval parquet files under a name that is not a task (e.g. "MSCOCO-t2i")
        strays = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in MMEB_TASKS
                        and (any(p.glob(f"{split}-*.parquet")) or (p / f"{split}.parquet").is_file()))
        if not names:
            raise MMEBFormatError(f"{root}: none of the 36 MMEB task directories found"
                                  + (f" (folders with {split} parquet files: {strays})" if strays else ""))
        if strays or len(names) < len(MMEB_TASKS):
            warnings.warn(f"{root}: loading {partial_coverage(len(names), names)}"
                          + (f"; folders not named as a task (ignored): {strays}" if strays else ""),
                          MMEBDataWarning, stacklevel=2)
    else:
        check_not_string(tasks, "tasks", "MMEB task names")
        names = list(tasks)
        if not names:
            raise MMEBFormatError(f"{root}: empty task list (tasks=None, data.eval_tasks: null, loads every task present)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:  # a task counted twice would weigh double in the meta-task, IND/OOD and Overall means
            raise MMEBFormatError(f"{root}: task(s) {dup} named more than once")
        for n in names:
            if n not in MMEB_TASKS:
                raise MMEBFormatError(f"unknown MMEB task {n!r}; known tasks: {list(MMEB_TASKS)}")
            if not (root / n).is_dir():
                raise MMEBFormatError(f"{root / n}: task directory not found")
    seen: _ItemMemo = {}  # one Item per distinct (role, text, image path) across all tasks
    return [_load_eval_task(root, MMEB_TASKS[n], img_root, split, check_images, max_queries, seen) for n in names]


def _load_eval_task(
    root: Path, info: MMEBTask, img_root: Path, split: str, check: bool, max_queries: int | None,
    seen: _ItemMemo,
) -> EvalTask:
    queries: list[EvalQuery] = []
    for path in _parquet_files(root / info.name, split):
        for row, rec in _iter_rows(path, EVAL_FIELDS):
            if max_queries is not None and len(queries) >= max_queries:
                break
            queries.append(_eval_query(rec, info.name, path, row, img_root, check, f"{info.name}:{len(queries)}",
                                       seen))
    if not queries:
        raise MMEBFormatError(f"{root / info.name}: task has no rows")
    return EvalTask(name=info.name, meta_task=info.meta_task, split=info.split, queries=queries)


def _list_field(value: Any, path: Path, row: int, field: str) -> list[str]:
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise MMEBFormatError(f"{where(path, row, field)}: expected a list, got {type(value).__name__}")
    return [_as_str(v, path, row, field, allow_none=True) for v in value]


def _image(rel: str, img_root: Path, check: bool, path: Path, row: int, field: str) -> Path | None:
    try:
        return _resolve_image(rel, img_root, check, path, row, field)
    except _MissingImage as e:
        raise MMEBFormatError(str(e)) from None


def _shared_item(
    seen: _ItemMemo, role: str, text: str, rel: str, img_root: Path, check: bool, path: Path, row: int, field: str
) -> Item:
    """The evaluation :class:`Item` of one ``(text, image path)`` cell pair, built on its first sight."""
    item = seen.get((role, text, rel))
    if item is None:
        item = _eval_item(role, text, _image(rel, img_root, check, path, row, field), RecordSource(path, row, field))
        if _is_empty(item):
            what = "query" if role == "q" else "a candidate"
            raise MMEBFormatError(f"{where(path, row, 'qry_text' if role == 'q' else 'tgt_text')}: "
                                  f"{what} has neither text nor image")
        seen[(role, text, rel)] = item
    return item


def _eval_query(
    rec: dict[str, Any], task: str, path: Path, row: int, img_root: Path, check: bool, qid: str, seen: _ItemMemo
) -> EvalQuery:
    q_text = _as_str(rec["qry_text"], path, row, "qry_text", allow_none=True)
    q_rel = _as_str(rec["qry_img_path"], path, row, "qry_img_path", allow_none=True)
    query = _shared_item(seen, "q", q_text, q_rel, img_root, check, path, row, "qry_img_path")
    texts = _list_field(rec["tgt_text"], path, row, "tgt_text")
    rels = _list_field(rec["tgt_img_path"], path, row, "tgt_img_path")
    if not texts:
        raise MMEBFormatError(f"{where(path, row, 'tgt_text')}: empty candidate list")
    if len(texts) != len(rels):
        raise MMEBFormatError(
            f"{where(path, row, 'tgt_img_path')}: {len(rels)} image paths for {len(texts)} candidate texts"
        )
    candidates = [_shared_item(seen, "c", text, rel, img_root, check, path, row, "tgt_img_path")
                  for text, rel in zip(texts, rels)]
    return EvalQuery(query=query, candidates=candidates, qid=qid)
