"""MMEB-style Precision@1 and ViDoRe-style NDCG@k under retrieval budgets (§4.1, §4.3).

An *encoder* is any callable ``encode(items, role) -> Tensor[n, R, D]``
(float32, L2-normalised rows; ``role`` is ``"query"`` or ``"candidate"``),
e.g. ``MetaEmbedModel.encode``.  Evaluation encodes every unique item **once**
with all its Meta Embeddings and scores each budget ``(r_q, r_c)`` by MaxSim on
the prefixes (:func:`metaembed.maxsim.maxsim`), so a budget sweep costs one
encoding pass.

* Items are deduplicated by ``uid`` (falling back to object identity) across
  all tasks of a call (a uid seen with two different texts, or with and without
  an image, raises: one would get the other's embedding); an optional
  ``cache_dir`` keeps uid-keyed embeddings on disk (one shard per task, role
  and batch, with each uid's content signature), so an interrupted or repeated
  evaluation re-encodes nothing already stored.  Embeddings of different
  encoders never mix: each ``cache_key`` (for a model, its
  :meth:`~metaembed.model.MetaEmbedModel.fingerprint` of config, weights and
  library versions) gets its own sub-folder, so one ``cache_dir`` can serve
  many checkpoints.
* MMEB tasks: each query is scored only against its own candidate list, the
  positive at index 0 (:func:`precision_at_1`).
* Document tasks: each query ranks the whole corpus (:func:`ndcg_at_k`, the
  semantics of trec_eval's ``ndcg_cut``).

Results are tidy DataFrames with columns :data:`RESULT_COLUMNS`;
:func:`summarize` / :func:`budget_table` aggregate them MMEB-style.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .atomic import atomic_write
from .config import TIE_MODES
from .data.records import Benchmark, DocRetrievalTask, EvalTask, Item
from .groups import format_budget, validate_budget
from .maxsim import maxsim

__all__ = [
    "RESULT_COLUMNS",
    "TIE_MODES",
    "TiedPositiveWarning",
    "EmbeddingMemoryWarning",
    "Encoder",
    "budget_table",
    "budget_table_title",
    "evaluate",
    "evaluate_doc_retrieval",
    "evaluate_mmeb",
    "ndcg_at_k",
    "precision_at_1",
    "random_ndcg_at_k",
    "random_ranking_level",
    "json_records",
    "results_to_csv",
    "results_to_json",
    "summarize",
    "tied_with_positive",
]

#: ``encode(items, role) -> Tensor[n, R, D]`` float32, L2-normalised.
Encoder = Callable[[Sequence[Item], str], Tensor]

RESULT_COLUMNS = ["task", "meta_task", "split", "r_q", "r_c", "budget", "metric", "value", "n_queries"]
DOC_META_TASK = "document"
_META_TASK_NAMES = {"classification": "Classification", "vqa": "VQA", "retrieval": "Retrieval",
                    "grounding": "Grounding"}


class TiedPositiveWarning(UserWarning):
    """Some queries' positive ties the best other candidate exactly; P@1 then depends on ``ties``."""


class EmbeddingMemoryWarning(UserWarning):
    """An evaluation without an embedding cache will hold more embeddings in RAM than half the machine has."""


# --------------------------------------------------------------------------- metrics
def tied_with_positive(scores: Tensor) -> Tensor:
    """``[nq]`` bool: the positive (index 0) ties the best other candidate of ``scores [nq, n_cand]`` exactly."""
    if scores.shape[1] < 2:
        return torch.zeros(scores.shape[0], dtype=torch.bool)
    return scores[:, 0] == scores[:, 1:].amax(dim=1)


def precision_at_1(scores: Tensor, ties: str = "first") -> Tensor:
    """Per-query Precision@1 for ``scores [nq, n_cand]`` with the positive at index 0 -> ``[nq]``.

    Ties between the positive and the best distractor:

    * ``"first"`` (default) reproduces the VLM2Vec / MMEB evaluator, which takes
      ``np.argmax`` over the scores and counts a hit when it is 0; argmax returns
      the first maximum, so a tie with the positive counts as a **hit**.
    * ``"pessimistic"``: any tie is a miss (hit only if strictly best).
    * ``"expected"``: ``1 / #tied`` -- the expected hit rate of a random tie-break.
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties={ties!r}; expected one of {TIE_MODES}")
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor [nq, n_cand], got {getattr(scores, 'shape', type(scores))}")
    if scores.shape[1] < 1:
        raise ValueError("scores has no candidates (n_cand = 0)")
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores).all(dim=1)).flatten().tolist()
        raise ValueError(f"scores contain NaN/inf for query rows {bad[:10]}")
    scores = scores.double()
    pos = scores[:, 0]  # [nq]
    if scores.shape[1] == 1:
        return torch.ones_like(pos)
    best_other = scores[:, 1:].amax(dim=1)  # [nq]
    if ties == "first":
        return (pos >= best_other).double()
    if ties == "pessimistic":
        return (pos > best_other).double()
    n_tied = (scores[:, 1:] == pos[:, None]).sum(dim=1)  # [nq]
    return torch.where(pos >= best_other, 1.0 / (1.0 + n_tied.double()), torch.zeros_like(pos))


def ndcg_at_k(scores: Tensor, qrels: Sequence[dict[int, int]], k: int = 5) -> Tensor:
    """Per-query NDCG@k for ``scores [nq, N_docs]`` and graded ``qrels[i] = {doc index: grade}`` -> ``[nq]``.

    Same numbers as trec_eval / pytrec_eval ``ndcg_cut_k``:

    * gain = grade (linear), discount ``1 / log2(rank + 1)``, ranks from 1;
      grades <= 0 contribute nothing;
    * ideal DCG from **all** judged grades of the query (top k of them), whether
      retrieved or not;
    * ranking by score descending, ties broken by doc id **descending** (trec_eval
      compares docno strings in reverse); here the doc index plays the docno, so
      index order must match the docno order (``evaluate_doc_retrieval`` sorts
      doc ids for that);
    * a query whose judgements are all <= 0 scores 0.0 (trec_eval counts it as 0);
      a query with no judgement at all is NaN (trec_eval skips it): drop it
      before averaging;
    * scores are rounded to fp32 first, as trec_eval stores them (a C ``float``): fp64 scores that differ
      only past fp32 precision tie there, and here.
    """
    k = _check_k(k)
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor [nq, N_docs], got {getattr(scores, 'shape', type(scores))}")
    nq, n_docs = scores.shape
    if len(qrels) != nq:
        raise ValueError(f"qrels has {len(qrels)} entries for {nq} score rows")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN/inf")
    s = scores.detach().float().double().cpu().numpy()  # [nq, N_docs], trec_eval's fp32 values
    if not np.isfinite(s).all():
        raise ValueError("scores exceed the fp32 range trec_eval stores them in")
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]
    doc_ids = np.arange(n_docs)
    out = torch.empty(nq, dtype=torch.float64)
    for i, rel in enumerate(qrels):
        judged = _gains_and_idcg(i, rel, n_docs, discount)
        if judged is None or judged[1] == 0.0:
            out[i] = float("nan") if judged is None else 0.0
            continue
        order = np.lexsort((-doc_ids, -s[i]))[:k]  # score desc, then doc index desc
        g = np.array([max(float(rel.get(int(d), 0)), 0.0) for d in order])
        out[i] = float((g * discount[: len(g)]).sum()) / judged[1]
    return out


def _gains_and_idcg(i: int, rel: dict[int, int], n_docs: int, discount: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Query ``i``'s positive grades and ideal DCG@k (``k = len(discount)``) from all its judgements; None without
    any.  ValueError for a doc index outside ``0..n_docs-1``."""
    for d in rel:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d < n_docs:
            raise ValueError(f"qrels[{i}] refers to doc index {d!r}; valid indices are 0..{n_docs - 1}")
    if not rel:
        return None
    gains = np.asarray([float(g) for g in rel.values() if g > 0])
    ideal = np.sort(gains)[::-1][: len(discount)]
    return gains, float((ideal * discount[: len(ideal)]).sum())


def random_ndcg_at_k(qrels: Sequence[dict[int, int]], n_docs: int, k: int = 5) -> Tensor:
    """Expected NDCG@k of a uniformly random ranking of ``n_docs`` documents, per query -> ``[nq]``.

    The floor a document-task NDCG@k curve is read against (the analogue of chance P@1).  Exact, by
    linearity: every document is equally likely at each rank, so the expected gain at rank ``r`` is the
    mean gain ``sum(grades > 0) / n_docs`` and ``E[NDCG@k] = (sum gains / n_docs) * sum_{r <= min(k, n_docs)}
    1 / log2(r + 1) / IDCG@k``, with :func:`ndcg_at_k`'s gains, ideal DCG and conventions (0.0 for a query
    judged only <= 0, NaN for one without judgements).
    """
    k = _check_k(k)
    if isinstance(n_docs, bool) or not isinstance(n_docs, numbers.Integral) or n_docs < 1:
        raise ValueError(f"n_docs must be a positive int, got {n_docs!r}")
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]
    out = torch.empty(len(qrels), dtype=torch.float64)
    for i, rel in enumerate(qrels):
        judged = _gains_and_idcg(i, rel, n_docs, discount)
        if judged is None or judged[1] == 0.0:
            out[i] = float("nan") if judged is None else 0.0
            continue
        gains, idcg = judged
        out[i] = float(gains.sum() / n_docs * discount[: min(k, n_docs)].sum()) / idcg
    return out


def random_ranking_level(tasks: Sequence[DocRetrievalTask], k: int = 5) -> float:
    """Expected NDCG@k (%) of random rankings, averaged as the ``NDCG@k`` summary group is.

    Per task the mean of :func:`random_ndcg_at_k` over its judged queries, then the unweighted mean over
    ``tasks`` (:func:`summarize`): the level a ranker that ignores the content scores on average.
    """
    if not tasks:
        raise ValueError("random_ranking_level needs at least one document task")
    levels = []
    for task in tasks:
        doc_ids, _, qrels = _prepare_doc_task(task)
        levels.append(100.0 * float(random_ndcg_at_k(qrels, len(doc_ids), k).mean()))
    return float(np.mean(levels))


# --------------------------------------------------------------------------- encoding
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"


def _content(item: Item) -> tuple[str, bool]:
    """What one uid must always stand for, as far as can be told without reading pixels: ``(text, has
    image)``.  Image paths are not compared (one page may be stored in two files under one content uid)."""
    return item.text, item.image is not None


def _describe(item: Item) -> str:
    return f"text {item.text[:60]!r} {'with' if item.image is not None else 'without'} an image"


def _content_sig(item: Item) -> int:
    """A 63-bit hash of :func:`_content`, stored next to each cached embedding."""
    digest = hashlib.blake2b(repr(_content(item)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


CACHE_FORMAT = 1
CACHE_MANIFEST = "encoder.json"


def cache_folder(cache_dir: str | os.PathLike, cache_key: str) -> Path:
    """Where ``cache_dir`` keeps the embeddings of the encoder named ``cache_key``."""
    return Path(cache_dir) / ("enc-" + hashlib.sha256(cache_key.encode()).hexdigest()[:16])


def _resolve_cache_key(encode: Encoder, cache_key: str | None) -> str:
    """``cache_key``, else the encoder's ``fingerprint()`` (a bound ``MetaEmbedModel.encode`` has one)."""
    if cache_key is not None:
        if not isinstance(cache_key, str) or not cache_key.strip():
            raise ValueError(f"cache_key must be a non-empty str, got {cache_key!r}")
        return cache_key
    for owner in (getattr(encode, "__self__", None), encode):
        fingerprint = getattr(owner, "fingerprint", None)
        if callable(fingerprint):
            return str(fingerprint())
    raise ValueError(
        "cache_dir needs a cache_key naming the encoder (checkpoint and settings), e.g. "
        "cache_key='my-model-step-1000', unless encode is MetaEmbedModel.encode (keyed by its fingerprint()); "
        "without one the cache cannot tell two encoders apart and would serve one model's embeddings to another"
    )


class _EmbeddingStore:
    """Encodes each unique item once per role; optionally persists uid-keyed shards.

    On disk: ``<cache_dir>/<digest of cache_key>/{encoder.json, query/*.pt, candidate/*.pt}``.
    With a cache, every uid-keyed embedding is held as a memory-mapped row of its shard, not
    in RAM: at the paper's R_c = 64, D = 3,584 one candidate is 0.9 MB in fp32, and a whole
    MMEB-eval run kept in memory would need on the order of 100 GB.  Without a cache the memo holds
    each encoded row once (views of the tensor it was written into, or of a batch's copy).  An MMEB task never
    stacks all its candidates (each chunk of queries stacks the ones it scores, at most
    :data:`MMEB_STACK_BYTES` at a time); a document task stacks its corpus once.
    """

    def __init__(self, encode: Encoder, batch_size: int, cache_dir: str | os.PathLike | None, progress: bool,
                 cache_key: str | None = None, budgets: list[tuple[int, int]] | None = None,
                 expected: Mapping[str, int] | None = None):
        if not callable(encode):
            raise TypeError(f"encode must be callable encode(items, role) -> Tensor, got {type(encode).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.encode = encode
        self.batch_size = batch_size
        self.progress = progress
        self.budgets = budgets  # checked against R_q / R_c as soon as the first embedding of a role is seen
        self.memo: dict[str, dict[Hashable, Tensor]] = {"query": {}, "candidate": {}}
        self.sig: dict[str, dict[Hashable, int]] = {"query": {}, "candidate": {}}  # uid key -> _content_sig
        self.shape: dict[str, tuple[int, int] | None] = {"query": None, "candidate": None}
        self.cache_dir: Path | None = None
        self._alive: list[Item] = []  # keeps identity-keyed items alive so ids are not reused
        self.expected = dict(expected or {})  # role -> unique items the whole evaluation encodes
        self._projected: dict[str, int] = {}  # role -> bytes those rows take in the memo
        self._memory_warned = False
        if cache_dir is not None:
            self.cache_dir = self._open_cache(Path(cache_dir), _resolve_cache_key(encode, cache_key))
            for role in self.memo:
                self._load(role)

    # -- cache
    @staticmethod
    def _open_cache(root: Path, key: str) -> Path:
        """The sub-folder of ``root`` that belongs to ``key`` (created with its manifest on first use)."""
        if any((root / role).is_dir() for role in ("query", "candidate")):
            warnings.warn(f"{root} holds embedding shards without an encoder key (an older metaembed cache); "
                          "they are ignored", stacklevel=3)
        folder = cache_folder(root, key)
        manifest = folder / CACHE_MANIFEST
        if manifest.exists():
            try:
                info = json.loads(manifest.read_text())
                if not isinstance(info, dict):
                    raise ValueError(f"a JSON {type(info).__name__}, not an object")
            except (OSError, ValueError, RecursionError) as e:
                raise RuntimeError(f"cannot read embedding cache manifest {manifest}: {e}; delete {folder}") from e
            if info.get("format") != CACHE_FORMAT or info.get("cache_key") != key:
                raise RuntimeError(f"embedding cache {folder} was written for cache_key {info.get('cache_key')!r} "
                                   f"(format {info.get('format')!r}), not {key!r}; delete it")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, lambda f: f.write((json.dumps({"format": CACHE_FORMAT, "cache_key": key},
                                                                  indent=2) + "\n").encode()))
        return folder

    def _load(self, role: str) -> None:
        folder = self.cache_dir / role
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.pt")):
            try:
                shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                uids, emb = shard["uids"], shard["embeddings"]
            except Exception as e:  # any unreadable shard: report which file
                raise RuntimeError(f"cannot read embedding cache shard {path}: {e}; delete it to re-encode") from e
            sigs = shard.get("sigs")  # absent in shards written before content signatures were stored
            # every shard is written float32 (a float16 / int / bool shard was cast, and changed the metrics)
            if (not isinstance(emb, Tensor) or emb.dim() != 3 or emb.dtype != torch.float32
                    or not isinstance(uids, list) or emb.shape[0] != len(uids)
                    or not all(isinstance(u, str) for u in uids)
                    or (sigs is not None and not (isinstance(sigs, list) and len(sigs) == len(uids)
                                                  and all(type(g) is int for g in sigs)))):
                raise RuntimeError(f"embedding cache shard {path} is malformed; delete it to re-encode")
            if not torch.isfinite(emb).all():
                raise RuntimeError(f"embedding cache shard {path} holds NaN or Inf values; delete it to re-encode")
            self._check_shape(role, emb, f"cache shard {path}")
            for uid, row in zip(uids, emb):
                self.memo[role][("uid", uid)] = row
            for uid, sig in zip(uids, sigs or ()):
                self.sig[role][("uid", uid)] = sig

    def _save(self, role: str, label: str, uids: list[str], emb: Tensor, sigs: list[int]) -> Tensor:
        """Write a shard (uids, their content signatures, embeddings); returns its embeddings memory-mapped
        from the file (the RAM copy can go)."""
        folder = self.cache_dir / role
        folder.mkdir(parents=True, exist_ok=True)
        # a name no other writer picks (several evaluations may share one cache), ordered by write time
        path = folder / f"{_safe(label)}-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.pt"
        atomic_write(path, lambda f: torch.save({"uids": list(uids), "embeddings": emb.contiguous(),
                                                  "sigs": list(sigs)}, f))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["embeddings"]

    # -- encoding
    def _check_shape(self, role: str, emb: Tensor, where: str) -> None:
        shape = (int(emb.shape[1]), int(emb.shape[2]))
        if self.shape[role] is None:
            self.shape[role] = shape
            self._check_budgets_fit(role, where)
            self._check_memory(role, shape[0] * shape[1] * emb.element_size())
        elif self.shape[role] != shape:
            raise ValueError(
                f"{role} embeddings from {where} have [R, D] = {list(shape)} but earlier ones had "
                f"{list(self.shape[role])}; one cache_key must name one model (its cache: {self.cache_dir})"
            )

    def _check_memory(self, role: str, row_bytes: int) -> None:
        """Warn (:class:`EmbeddingMemoryWarning`, at the first batch of a role) when, without a cache, the memo
        will hold more than half the machine's RAM: every row stays in memory for the whole evaluation, and an
        MMEB-eval run at the paper's R_c = 64, D = 3,584 is on the order of 100 GB.  A run that would be
        killed hours later for memory is told now how to avoid it."""
        if self.cache_dir is not None or role not in self.expected or self._memory_warned:
            return
        self._projected[role] = self.expected[role] * row_bytes
        total, ram = sum(self._projected.values()), _ram_bytes()
        if ram and total > ram / 2:
            self._memory_warned = True
            counts = " and ".join(f"{self.expected[r]:,} {r}" for r in self._projected)
            warnings.warn(f"this evaluation will hold about {total / 2**30:.1f} GiB of embeddings in RAM ({counts} "
                          f"items so far, [R, D] rows of {row_bytes / 2**20:.2f} MiB for the {role}s), more than "
                          f"half of this machine's {ram / 2**30:.0f} GiB; set eval.cache_dir (metaembed eval "
                          "--set eval.cache_dir=DIR) to keep them on disk, memory-mapped, which also lets an "
                          "interrupted evaluation resume", EmbeddingMemoryWarning, stacklevel=5)

    def _check_budgets_fit(self, role: str, where: str) -> None:
        """Raise at the first batch (not after a whole task is encoded) when a budget asks for more vectors
        of ``role`` than the embeddings have."""
        side, name = (0, "R_q") if role == "query" else (1, "R_c")
        R = self.shape[role][0]
        for b in self.budgets or ():
            if b[side] > R:
                raise ValueError(f"{where} gives {role} embeddings with {name} = {R} vectors; budget {b} asks for "
                                 f"{b[side]} and cannot be scored")

    def _key(self, item: Item) -> Hashable:
        if not isinstance(item, Item):
            raise TypeError(f"expected an Item, got {type(item).__name__}")
        if item.uid is None:
            self._alive.append(item)
        return _item_key(item)

    def _collision(self, role: str, uid: Hashable, item: Item, other: str) -> ValueError:
        return ValueError(
            f"{role} uid {uid!r} names two different items: {other}, and {_describe(item)}. A uid must "
            "identify one item's content (text and image), or one item's embedding is used for the other; "
            "make the uids content-derived (or leave them None)")

    def embed(self, items: Sequence[Item], role: str, label: str) -> tuple[Tensor, list[int]]:
        """Unique embeddings ``[U, R, D]`` for ``items`` and each item's row in them.

        Raises if one uid names items of different content (text, image), in this call, an earlier one
        or the cache: it would silently get the other item's embedding.  Rows encoded here are written straight
        into the ``[U, R, D]`` tensor (rows an earlier call encoded are copied in).  When the memo keeps every
        row of it (no row known from an earlier call or memory-mapped from the cache), it keeps views of it:
        the one copy in memory; otherwise it keeps its own copies, so the result is freed with the caller's."""
        return self._embed(items, role, label, stack=True)

    def embed_rows(self, items: Sequence[Item], role: str, label: str) -> tuple[list[Tensor], list[int]]:
        """Like :meth:`embed`, but the ``U`` unique embeddings ``[R, D]`` as the memo holds them (memory-mapped
        rows of the cache, or in memory), not copied into one tensor: the caller stacks the rows it needs."""
        return self._embed(items, role, label, stack=False)

    def _embed(self, items: Sequence[Item], role: str, label: str, stack: bool) -> tuple[Tensor | list[Tensor],
                                                                                        list[int]]:
        keys = [self._key(it) for it in items]
        unique: dict[Hashable, int] = {}
        first: list[Item] = []
        for key, it in zip(keys, items):
            if key not in unique:
                unique[key] = len(unique)
                first.append(it)
            elif key[0] == "uid":
                seen = first[unique[key]]
                if it is not seen and _content(it) != _content(seen):
                    raise self._collision(role, key[1], it, _describe(seen))
        known = self.sig[role]
        sigs: dict[Hashable, int] = {}
        for key, it in zip(unique, first):
            if key[0] == "uid":
                sigs[key] = sig = _content_sig(it)
                if known.setdefault(key, sig) != sig:
                    cache = "" if self.cache_dir is None else f" or stored in the embedding cache {self.cache_dir}"
                    raise self._collision(role, key[1], it, f"an item encoded earlier (by an earlier task{cache})")
        memo = self.memo[role]
        todo = [(j, key, it) for j, (key, it) in enumerate(zip(unique, first)) if key not in memo]
        known_rows = [(j, key) for j, key in enumerate(unique) if key in memo]  # copied into emb at the end
        # rows encoded here go into one tensor allocated once R, D are known: [U, R, D] (stack=True; the result),
        # else [len(todo), R, D] when they stay in memory (no cache) -- never a pile of per-batch copies
        into_one = stack or self.cache_dir is None
        # the memo may keep views of the result only when it keeps all of it: rows copied in from the memo, or
        # replaced below by the cache's memory-mapped rows, would stay alive (a duplicate, or in RAM) as long as
        # the memo does -- one whole [U, R, D] per call.  Else it keeps its own copies of the rows it holds.
        views = not stack or (not known_rows and (self.cache_dir is None or all(k[0] == "id" for _, k, _ in todo)))
        dest: Tensor | None = None
        bar = tqdm(total=len(todo), desc=f"encode {label} ({role})", disable=not self.progress or not todo,
                   leave=False)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            batch = [it for _, _, it in chunk]
            out = self.encode(batch, role)
            if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != len(batch):
                raise ValueError(
                    f"encode(..., role={role!r}) for task {label} returned "
                    f"{getattr(out, 'shape', type(out).__name__)}; expected a tensor [{len(batch)}, R, D]"
                )
            # the memo keeps copies (into emb, or of the batch): the encoder may reuse (overwrite) the tensor it
            # returned, and a view would keep a larger base (e.g. untruncated vectors) alive for the memo
            out = out.detach().to("cpu", torch.float32, copy=not into_one)  # [b, R, D]
            if not torch.isfinite(out).all():
                raise ValueError(f"encode(..., role={role!r}) for task {label} returned NaN/inf embeddings")
            self._check_shape(role, out, f"the encoder (task {label})")
            if into_one:
                if dest is None:
                    dest = torch.empty(len(unique) if stack else len(todo), *self.shape[role])
                pos = [j for j, _, _ in chunk] if stack else list(range(start, start + len(chunk)))  # increasing
                if pos[-1] - pos[0] + 1 == len(pos):  # contiguous (nothing in between was memoised)
                    rows = dest[pos[0] : pos[-1] + 1]  # [b, R, D] view
                    rows.copy_(out)
                else:
                    dest[pos] = out
                    rows = [dest[p] for p in pos]  # views
                if not views and (self.cache_dir is None or any(k[0] == "id" for _, k, _ in chunk)):
                    rows = out.clone(memory_format=torch.contiguous_format)  # [b, R, D], held by the memo
            else:
                rows = out
            for (_, key, _), row in zip(chunk, rows):
                memo[key] = row
            if self.cache_dir is not None:
                cached = [(key[1], i) for i, (_, key, _) in enumerate(chunk) if key[0] == "uid"]
                if cached:
                    whole = len(cached) == len(chunk) and _owns_storage(out)  # else a copy of the cached rows
                    mapped = self._save(role, label, [u for u, _ in cached],
                                        out if whole else out[[i for _, i in cached]],
                                        [sigs[("uid", u)] for u, _ in cached])
                    for (uid, _), row in zip(cached, mapped):
                        memo[("uid", uid)] = row
            bar.update(len(batch))
        bar.close()
        if not stack:
            return [memo[key] for key in unique], [unique[key] for key in keys]
        if not unique:
            R, D = self.shape[role] or (1, 1)
            return torch.empty(0, R, D), []
        emb = dest if dest is not None else torch.empty(len(unique), *self.shape[role])  # [U, R, D]
        for j, key in known_rows:
            emb[j] = memo[key]
        return emb, [unique[key] for key in keys]


def _owns_storage(t: Tensor) -> bool:
    """Whether ``t`` is all of its storage (``torch.save`` writes a view's whole base)."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


# --------------------------------------------------------------------------- budgets
def _parse_budgets(budgets: Iterable[Sequence[int]] | None) -> list[tuple[int, int]] | None:
    if budgets is None:
        return None
    if isinstance(budgets, (str, bytes)):
        raise TypeError(f"budgets must be a list of (r_q, r_c) pairs, got {budgets!r}")
    out: list[tuple[int, int]] = []
    for b in budgets:
        try:
            pair = validate_budget(b, 10**9, 10**9)  # shape check only; ranges checked once R is known
        except ValueError as e:
            raise ValueError(f"invalid budget {b!r}: {e}") from None
        if pair not in out:
            out.append(pair)
    if not out:
        raise ValueError("budgets is empty; pass None to score only the full (R_q, R_c)")
    return out


def _check_budgets(budgets: list[tuple[int, int]] | None, R_q: int, R_c: int, label: str) -> list[tuple[int, int]]:
    if budgets is None:
        return [(R_q, R_c)]
    for b in budgets:
        try:
            validate_budget(b, R_q, R_c)
        except ValueError as e:
            raise ValueError(f"task {label}: budget {b} cannot be scored: {e}") from None
    return budgets


def _row(name, meta_task, split, budget, metric, value, n) -> dict:
    return {"task": name, "meta_task": meta_task, "split": split, "r_q": budget[0], "r_c": budget[1],
            "budget": format_budget(budget), "metric": metric, "value": value, "n_queries": n}


# --------------------------------------------------------------------------- MMEB
def _check_unique_names(tasks: Sequence[EvalTask | DocRetrievalTask], kind: str) -> None:
    """Raise when two tasks share a name: their rows would collide (summarize() refuses them) only after
    every task was encoded."""
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1}, key=str)
    if dup:
        raise ValueError(f"{kind} task name(s) {dup} appear more than once; each task must be named once")


def _check_eval_task(task: EvalTask) -> None:
    """Raise unless ``task`` is an :class:`EvalTask` split ``"ind"`` / ``"ood"`` with queries that all have
    candidates (another split, e.g. ``"IND"``, would count in Overall but silently in neither IND nor OOD)."""
    if not isinstance(task, EvalTask):
        raise TypeError(f"expected EvalTask, got {type(task).__name__}")
    if task.split not in ("ind", "ood"):
        raise ValueError(f"task {task.name}: split {task.split!r} is not 'ind' or 'ood' (the IND / OOD means of "
                         "summarize() would leave it out while Overall counts it)")
    if not task.queries:
        raise ValueError(f"task {task.name} has no queries")
    for i, q in enumerate(task.queries):
        if not q.candidates:
            raise ValueError(f"task {task.name}: query {q.qid or i!r} has an empty candidate list")


# Bytes of candidate embeddings an MMEB chunk of queries stacks at once.  64 queries with 1,000 distinct
# candidates each are 64,000 rows: 58 GB in fp32 at the paper's R_c = 64, D = 3,584 (:func:`_query_chunks`).
MMEB_STACK_BYTES = 1 << 30


def _query_chunks(per_query: Sequence[Sequence[int]], query_chunk: int, block: int
                  ) -> Iterator[tuple[list[int], set[int]]]:
    """Consecutive chunks of at most ``query_chunk`` queries whose candidates (``per_query``: row ids) number at
    most ``block`` together, so that each chunk's are scored in one stack, with those row ids; a query with more
    candidates than ``block`` is a chunk of its own (its rows are then stacked in balanced blocks)."""
    chunk: list[int] = []
    union: set[int] = set()
    for i, rows in enumerate(per_query):
        grown = union.union(rows)
        if chunk and (len(chunk) == query_chunk or len(grown) > block):
            yield chunk, union
            chunk, grown = [], set(rows)
        chunk.append(i)
        union = grown
    if chunk:
        yield chunk, union


def _mmeb(tasks: Sequence[EvalTask], store: _EmbeddingStore, budgets, ties: str, progress: bool,
          query_chunk: int = 64) -> list[dict]:
    if ties not in TIE_MODES:
        raise ValueError(f"ties={ties!r}; expected one of {TIE_MODES}")
    tasks = list(tasks)
    for task in tasks:  # every task checked before any encoding: a bad last task fails in seconds, not hours
        _check_eval_task(task)
    _check_unique_names(tasks, "MMEB")
    rows: list[dict] = []
    tied: dict[tuple[str, tuple[int, int]], int] = {}  # (task, budget) -> queries whose positive ties the best other
    for task in tqdm(tasks, desc="MMEB tasks", disable=not progress):
        # the unique rows as held (memory-mapped with a cache), never stacked whole: a chunk of queries stacks
        # only the candidates it scores (a task's candidates alone can exceed RAM at the paper's R_c, D)
        Q, q_rows = store.embed_rows([q.query for q in task.queries], "query", task.name)  # Uq x [R_q, D]
        flat = [c for q in task.queries for c in q.candidates]
        C, c_rows = store.embed_rows(flat, "candidate", task.name)  # Uc x [R_c, D]
        task_budgets = _check_budgets(budgets, Q[0].shape[0], C[0].shape[0], task.name)
        offsets = np.cumsum([0] + [len(q.candidates) for q in task.queries])
        block = max(1, MMEB_STACK_BYTES // (C[0].numel() * C[0].element_size()))  # candidate rows per stack
        per_query = [c_rows[offsets[i] : offsets[i + 1]] for i in range(len(task.queries))]
        hits = {b: torch.empty(len(task.queries), dtype=torch.float64) for b in task_budgets}
        for idx, chunk_rows in _query_chunks(per_query, query_chunk, block):
            union = sorted(chunk_rows)
            col = {r: j for j, r in enumerate(union)}
            q_emb = torch.stack([Q[q_rows[i]] for i in idx])  # [b, R_q, D]
            scores: dict[tuple[int, int], list[Tensor]] = {b: [] for b in task_budgets}
            # one stack, unless one query has more than `block` candidates: then balanced blocks (a one-row last
            # block would take another matmul path, and exact ties of identical candidates could split)
            n_blocks = -(-len(union) // block)
            bounds = [len(union) * k // n_blocks for k in range(n_blocks + 1)]
            for u, v in zip(bounds, bounds[1:]):
                c_emb = torch.stack([C[r] for r in union[u:v]])  # [<= block, R_c, D]
                for b in task_budgets:
                    scores[b].append(maxsim(q_emb, c_emb, b[0], b[1]))  # [b, <= block]
            for b in task_budgets:
                s = torch.cat(scores[b], dim=1)  # [b, |U|]
                by_len: dict[int, list[tuple[int, Tensor]]] = {}
                for j, i in enumerate(idx):
                    sc = s[j, [col[r] for r in per_query[i]]]  # [n_cand_i]
                    _tie_copies_of_the_positive(sc, per_query[i], C, b[1])
                    by_len.setdefault(len(sc), []).append((i, sc))
                for group in by_len.values():
                    S = torch.stack([sc for _, sc in group])  # [g, n_cand]
                    hits[b][[i for i, _ in group]] = precision_at_1(S, ties=ties)  # [g]
                    n = int(tied_with_positive(S).sum())
                    if n:
                        tied[(task.name, b)] = tied.get((task.name, b), 0) + n
        for b in task_budgets:
            rows.append(_row(task.name, task.meta_task, task.split, b, "P@1",
                             100.0 * float(hits[b].mean()), len(task.queries)))
    if tied:
        _warn_ties(tied, {t.name: len(t.queries) for t in tasks}, ties)
    return rows


def _tie_copies_of_the_positive(scores: Tensor, rows: Sequence[int], C: Sequence[Tensor], r_c: int) -> None:
    """Give every candidate whose first ``r_c`` vectors equal the positive's (``rows[0]``) exactly the positive's
    score, in place (``scores [n_cand]``, positive first).

    Eq. 4 gives such a candidate the positive's score, but a CPU matmul can round identical columns differently by
    position (1-2 ulp in products of few rows whose column count is not a multiple of 16, measured with torch 2.13
    on x86), which would hide the tie from ``eval.ties`` and the tie warning.  Only candidates within rounding
    distance of the positive are compared (cheap).
    """
    near = (scores - scores[0]).abs() <= 1e-4 * (scores[0].abs() + 1.0)  # [n_cand]
    near[0] = False
    for k in near.nonzero().flatten().tolist():
        if rows[k] != rows[0] and torch.equal(C[rows[k]][:r_c], C[rows[0]][:r_c]):
            scores[k] = scores[0]


def _warn_ties(tied: dict[tuple[str, tuple[int, int]], int], n_queries: dict[str, int], ties: str) -> None:
    """One :class:`TiedPositiveWarning` naming the (task, budget) pairs with exact ties at the top."""
    worst = sorted(tied.items(), key=lambda kv: -kv[1] / n_queries[kv[0][0]])
    shown = ", ".join(f"{t} {format_budget(b)}: {n}/{n_queries[t]}" for (t, b), n in worst[:5])
    more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
    counted = {"first": "hits (VLM2Vec's argmax rule: a model that scores every candidate alike gets 100%)",
               "pessimistic": "misses", "expected": "1 / (number tied)"}[ties]
    warnings.warn(f"the positive ties the best other candidate exactly for some queries ({shown}{more}); "
                  f"ties={ties!r} counts them as {counted}. Duplicate candidates or collapsed embeddings cause "
                  "this; eval.ties chooses the rule", TiedPositiveWarning, stacklevel=3)


def _ram_bytes() -> int | None:
    """Physical memory of this machine (None where ``os.sysconf`` cannot say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _item_key(item: Item) -> Hashable:
    """An item's identity for encoding once: its uid, or the object itself without one."""
    return ("uid", item.uid) if item.uid is not None else ("id", id(item))


def _expected_items(mmeb: Sequence[EvalTask] = (), docs: Sequence[tuple[DocRetrievalTask, list, list, list]] = ()
                    ) -> dict[str, int]:
    """Unique query and candidate items (by uid, or identity without one) the MMEB tasks and the prepared
    document tasks (:func:`_prepare_docs`: their judged queries) will encode."""
    keys: dict[str, set] = {"query": set(), "candidate": set()}
    for task in mmeb:
        for q in task.queries:
            keys["query"].add(_item_key(q.query))
            keys["candidate"].update(_item_key(c) for c in q.candidates)
    for task, doc_ids, qids, _ in docs:
        keys["query"].update(_item_key(task.queries[q]) for q in qids)
        keys["candidate"].update(_item_key(task.corpus[d]) for d in doc_ids)
    return {role: len(k) for role, k in keys.items()}


def evaluate_mmeb(
    tasks: Sequence[EvalTask],
    encode: Encoder,
    budgets: Sequence[Sequence[int]] | None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    ties: str = "first",
    cache_key: str | None = None,
) -> pd.DataFrame:
    """Precision@1 (%) of every MMEB-style task at every budget -> tidy rows (:data:`RESULT_COLUMNS`).

    Each query is scored against its own candidates (positive first); ``ties``
    as in :func:`precision_at_1`, where a candidate whose first ``r_c`` vectors
    equal the positive's ties it exactly, whatever the matmul's rounding by
    position.  ``budgets=None`` scores only the full
    ``(R_q, R_c)`` the encoder produced.  ``cache_dir`` keeps embeddings on disk
    under ``cache_key`` (default: ``encode``'s owner's ``fingerprint()``; a plain
    callable must name itself), so an interrupted run resumes.
    """
    tasks = list(tasks)
    parsed = _parse_budgets(budgets)
    store = _EmbeddingStore(encode, batch_size, cache_dir, progress, cache_key, parsed, _expected_items(tasks))
    return pd.DataFrame(_mmeb(tasks, store, parsed, ties, progress), columns=RESULT_COLUMNS)


# --------------------------------------------------------------------------- documents
def _int_grade(g: object, task: str, qid: Hashable, did: Hashable) -> int:
    """A qrels grade as an int (trec_eval grades are integers); a fractional or non-numeric one raises
    instead of being truncated by ``int()`` (0.5 would silently become 0, "not relevant")."""
    if isinstance(g, (bool, np.bool_)) or not isinstance(g, (int, float, np.integer, np.floating)) \
            or not np.isfinite(g) or float(g) != int(g):
        raise ValueError(f"document task {task}: qrels grade {g!r} of query {qid!r}, doc {did!r} is not an integer "
                         "(graded relevance is an int, as in trec_eval)")
    return int(g)


def _check_k(k: int) -> int:
    """``k`` as a Python int (numpy integers accepted); ValueError unless it is an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _prepare_doc_task(task: DocRetrievalTask) -> tuple[list, list, list[dict[int, int]]]:
    """Check ``task`` -> (doc ids in docno order, judged query ids, their qrels keyed by doc index)."""
    if not isinstance(task, DocRetrievalTask):
        raise TypeError(f"expected DocRetrievalTask, got {type(task).__name__}")
    if not task.corpus:
        raise ValueError(f"document task {task.name} has an empty corpus")
    for qid, rel in task.qrels.items():
        if qid not in task.queries:
            raise ValueError(f"document task {task.name}: qrels refer to unknown query id {qid!r}")
        unknown = [d for d in rel if d not in task.corpus]
        if unknown:
            raise ValueError(f"document task {task.name}: qrels of query {qid!r} refer to unknown doc ids "
                             f"{unknown[:5]}")
    # index order = docno order (trec_eval's tie-break compares id *strings*: "10" < "9")
    doc_ids = sorted(task.corpus, key=str)
    if len({str(d) for d in doc_ids}) != len(doc_ids):
        raise ValueError(f"document task {task.name}: corpus ids {doc_ids[:5]}... are not distinct as strings "
                         "(trec_eval compares doc ids as strings)")
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    # like trec_eval, queries without any judgement are not evaluated
    qids = [q for q in task.queries if task.qrels.get(q)]
    if not qids:
        raise ValueError(f"document task {task.name}: no query has relevance judgements")
    qrels = [{doc_index[d]: _int_grade(g, task.name, q, d) for d, g in task.qrels[q].items()} for q in qids]
    return doc_ids, qids, qrels


def _prepare_docs(tasks: Sequence[DocRetrievalTask], k: int) -> list[tuple[DocRetrievalTask, list, list, list]]:
    """Every task checked and prepared (:func:`_prepare_doc_task`) before anything is encoded."""
    _check_k(k)
    prepared = [(task, *_prepare_doc_task(task)) for task in tasks]
    _check_unique_names(tasks, "document")
    return prepared


def _docs(prepared: list[tuple[DocRetrievalTask, list, list, list]], store: _EmbeddingStore, budgets, k: int,
          progress: bool) -> list[dict]:
    rows: list[dict] = []
    for task, doc_ids, qids, qrels in tqdm(prepared, desc="document tasks", disable=not progress):
        Q, q_rows = store.embed([task.queries[q] for q in qids], "query", task.name)
        D, d_rows = store.embed([task.corpus[d] for d in doc_ids], "candidate", task.name)
        task_budgets = _check_budgets(budgets, Q.shape[1], D.shape[1], task.name)
        # [nq, R_q, D_emb], [N_docs, R_c, D_emb]: one row per item, indexed (copied) only when items repeat
        if q_rows != list(range(Q.shape[0])):
            Q = Q[q_rows]
        if d_rows != list(range(D.shape[0])):
            D = D[d_rows]
        for b in task_budgets:
            s = maxsim(Q, D, b[0], b[1])  # [nq, N_docs]
            nd = ndcg_at_k(s, qrels, k=k)  # [nq]
            rows.append(_row(task.name, DOC_META_TASK, task.split, b, f"NDCG@{k}",
                             100.0 * float(nd.mean()), len(qids)))
    return rows


def evaluate_doc_retrieval(
    tasks: Sequence[DocRetrievalTask],
    encode: Encoder,
    budgets: Sequence[Sequence[int]] | None,
    k: int = 5,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    cache_key: str | None = None,
) -> pd.DataFrame:
    """NDCG@k (%) of every document task at every budget, each query ranking the whole corpus.

    Queries without judgements are skipped (as trec_eval does); ``n_queries``
    counts the evaluated ones.  Qrels naming unknown query/doc ids raise.
    ``cache_dir`` / ``cache_key`` as in :func:`evaluate_mmeb`.
    """
    prepared = _prepare_docs(tasks, k)
    parsed = _parse_budgets(budgets)
    store = _EmbeddingStore(encode, batch_size, cache_dir, progress, cache_key, parsed,
                            _expected_items(docs=prepared))
    return pd.DataFrame(_docs(prepared, store, parsed, k, progress), columns=RESULT_COLUMNS)


def evaluate(
    benchmark: Benchmark,
    encode: Encoder,
    budgets: Sequence[Sequence[int]] | None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    ties: str = "first",
    k: int = 5,
    cache_key: str | None = None,
) -> pd.DataFrame:
    """Evaluate a whole :class:`Benchmark` (MMEB-style and document tasks, one shared encoding pass).

    ``cache_dir`` / ``cache_key`` as in :func:`evaluate_mmeb`.
    """
    if not benchmark.eval_tasks and not benchmark.doc_tasks:
        raise ValueError("the benchmark has no evaluation tasks")
    docs = _prepare_docs(benchmark.doc_tasks, k)  # bad document tasks fail before the MMEB tasks are encoded
    parsed = _parse_budgets(budgets)
    store = _EmbeddingStore(encode, batch_size, cache_dir, progress, cache_key, parsed,
                            _expected_items(benchmark.eval_tasks, docs))
    # _mmeb checks ties and every MMEB task before it encodes anything
    rows = _mmeb(benchmark.eval_tasks, store, parsed, ties, progress) + _docs(docs, store, parsed, k, progress)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


# --------------------------------------------------------------------------- reporting
def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per budget, unweighted means over tasks: each meta-task, IND, OOD, Overall (P@1) and NDCG@k.

    Returns tidy rows ``budget, r_q, r_c, group, value, n_tasks``; ``Overall`` is the
    MMEB average (mean over all P@1 tasks), ``NDCG@k`` the mean over document tasks.
    A missing (NaN) or infinite ``value`` raises: a mean would skip it while ``n_tasks`` counted it.

    Warns (:class:`metaembed.data.mmeb.MMEBDataWarning`) when the P@1 tasks are MMEB tasks but not
    all 36 of :data:`~metaembed.data.mmeb.MMEB_TASKS` at some budget: the meta-task, IND, OOD and
    Overall means then cover only those and are not comparable with the paper's (``n_tasks`` says
    how many each mean covers).
    """
    missing = set(RESULT_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"results lack columns {sorted(missing)}; expected the output of evaluate()")
    dup = df.duplicated(["task", "r_q", "r_c", "metric"])
    if dup.any():
        first = df[dup].iloc[0]
        raise ValueError(f"task {first['task']} appears twice at budget {first['budget']} ({first['metric']})")
    values = pd.to_numeric(df["value"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(values).all():
        bad = df[~np.isfinite(values)].iloc[0]
        raise ValueError(f"task {bad['task']} has value {bad['value']} at budget {bad['budget']} ({bad['metric']}); "
                         "every value must be a finite number")
    _warn_partial_mmeb(df)
    out: list[dict] = []
    for (r_q, r_c), g in sorted(df.groupby(["r_q", "r_c"]), key=lambda kv: kv[0]):
        head = {"budget": format_budget((int(r_q), int(r_c))), "r_q": int(r_q), "r_c": int(r_c)}

        def add(name: str, part: pd.DataFrame, head: dict = head) -> None:
            if len(part):
                out.append({**head, "group": name, "value": float(part["value"].mean()), "n_tasks": len(part)})

        p1 = g[g["metric"] == "P@1"]
        for mt, name in _META_TASK_NAMES.items():
            add(name, p1[p1["meta_task"] == mt])
        for mt in sorted(set(p1["meta_task"]) - set(_META_TASK_NAMES)):
            add(str(mt), p1[p1["meta_task"] == mt])
        add("IND", p1[p1["split"] == "ind"])
        add("OOD", p1[p1["split"] == "ood"])
        add("Overall", p1)
        for metric in sorted(m for m in set(g["metric"]) if m != "P@1"):
            add(metric, g[g["metric"] == metric])
    return pd.DataFrame(out, columns=["budget", "r_q", "r_c", "group", "value", "n_tasks"])


def _warn_partial_mmeb(df: pd.DataFrame) -> None:
    """Warn when the P@1 rows are MMEB tasks but fewer than all of them at some budget."""
    from .data.mmeb import MMEB_TASKS, MMEBDataWarning, partial_coverage

    p1 = df[df["metric"] == "P@1"]
    names = set(p1["task"])
    if not names or not names <= set(MMEB_TASKS):
        return  # no P@1 rows, or not MMEB (e.g. the synthetic benchmark)
    fewest = min((set(g["task"]) for _, g in p1.groupby(["r_q", "r_c"])), key=len)  # the least covered budget
    if len(fewest) < len(MMEB_TASKS):
        warnings.warn(f"results cover {partial_coverage(len(fewest), fewest)} (not comparable with the paper's)",
                      MMEBDataWarning, stacklevel=3)


def budget_table_title(ndcg_k: int = 5, table: pd.DataFrame | None = None) -> str:
    """What :func:`budget_table`'s values are, for a line above it; given the ``table``, only what it holds
    (an MMEB-only evaluation has no NDCG@k column, a ViDoRe-only one no P@1 columns)."""
    cols = [str(c) for c in table.columns] if table is not None else None
    parts = []
    if cols is None or any(not c.startswith("NDCG@") for c in cols):
        parts.append("P@1 (%) per meta-task / IND / OOD / Overall")
    if cols is None or any(c.startswith("NDCG@") for c in cols):
        parts.append(f"NDCG@{ndcg_k} (%)")
    return " and ".join(parts or ["no scores"]) + " per budget (r_q, r_c)"


def budget_table(df: pd.DataFrame, decimals: int = 1) -> pd.DataFrame:
    """Wide table: one row per budget, columns meta-tasks, IND, OOD, Overall, NDCG@k (values in %).

    Accepts the output of :func:`evaluate` (or of :func:`summarize`).
    """
    summary = df if "group" in df.columns else summarize(df)
    if summary.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(summary["group"]))
    preferred = [*_META_TASK_NAMES.values(), "IND", "OOD", "Overall"]
    columns = [c for c in preferred if c in order] + [c for c in order if c not in preferred]
    budgets = list(dict.fromkeys(summary.sort_values(["r_q", "r_c"])["budget"]))
    table = summary.pivot(index="budget", columns="group", values="value").reindex(index=budgets, columns=columns)
    table.index.name = "budget (r_q,r_c)"
    table.columns.name = None
    return table.round(decimals)


def results_to_json(df: pd.DataFrame, path: str | os.PathLike, extra: Sequence[dict] = ()) -> Path:
    """Write result rows as a JSON list of records, then the ``extra`` records (parent folders created), through
    a temporary file like :func:`results_to_csv`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_records(df) + list(extra), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))  # a full disk left an earlier results file truncated
    return path


def results_to_csv(df: pd.DataFrame, path: str | os.PathLike, index: bool = False) -> Path:
    """Write ``df`` as CSV (parent folders created) through a temporary file, so a write that fails (a full
    disk) leaves an earlier file of that name whole; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: df.to_csv(f, index=index))
    return path


def json_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """``df`` as JSON-ready records with floats unrounded (pandas' ``to_json`` rounds to 10 decimals, so the JSON
    and the CSV of one result differed), NumPy scalars as Python ones and NaN / inf as ``None``."""
    def value(v: Any) -> Any:
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return list(v) if isinstance(v, tuple) else v

    return [{str(k): value(v) for k, v in rec.items()} for rec in df.to_dict("records")]
