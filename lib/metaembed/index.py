"""A nested multi-vector index searched at any retrieval budget (paper §3.2, Eq. 4, Fig. 2).

Every candidate stores its ``R_c`` Meta Embeddings (fixed count, no padding) in one
``[N, R_c, D]`` tensor (bf16 by default).  A query-time budget ``(r_q, r_c)`` scores with the
first ``r_q`` query and ``r_c`` candidate vectors of the same stored index:

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <E_q^(i), E_c^(j)>                       (Eq. 4)

Search walks the index in chunks (``metaembed.maxsim``, hence the CUDA kernel for CUDA tensors)
and keeps a running top-k, so memory stays bounded for any ``N``.  The index can be memory-mapped
from disk (larger than RAM), kept in (pinned) CPU memory and streamed to a GPU (``offload``), or
split across devices (:meth:`MultiVectorIndex.shard`).  Two-stage search retrieves ``K'``
candidates at a cheap budget and reranks them at a large one.

On disk an index is a directory with ``index.safetensors`` (``embeddings [N, R_c, D]``,
``ids [N]`` int64; ``index-<random>.safetensors`` after a save over an earlier index) and ``index.json``
(shape, dtype, the tensor file's name and sha256).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: saves into one folder are not serialized
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write
from .checksums import sha256_file
from .config import check_int
from .groups import validate_budget
from .maxsim import maxsim

__all__ = [
    "IndexCorruptedError",
    "IndexFormatError",
    "MultiVectorIndex",
    "ShardedIndex",
    "merge_topk",
]

FORMAT = "metaembed.MultiVectorIndex"
FORMAT_VERSION = 1
TENSOR_FILE = "index.safetensors"
META_FILE = "index.json"
LOCK_FILE = ".index.lock"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
#: Index bytes scored per chunk by default (bounds the [batch, chunk] scores and maxsim's work).
_CHUNK_BYTES = 64 * 2**20
#: fp32 scores per query batch x chunk by default.
_SCORE_BYTES = 256 * 2**20
#: Temporaries of the top-k tie pass at a time (rows whose k-th score ties are re-selected in groups).
_TIE_PASS_BYTES = 32 * 2**20
_IO_BLOCK = 16 * 2**20
_INT64_MAX = 2**63 - 1  # ids are stored as int64


class IndexFormatError(ValueError):
    """An index directory is missing files or its metadata is malformed."""


class IndexCorruptedError(IndexFormatError):
    """The tensor file does not match its recorded size or sha256 (truncated or modified)."""


def _dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {tuple(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype={dtype!r}; expected one of {tuple(_DTYPES.values())}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def merge_topk(scores_a: Tensor, ids_a: Tensor, scores_b: Tensor, ids_b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merge two per-row top lists ``[nq, ka]``, ``[nq, kb]`` into the top ``min(k, ka + kb)``.

    Sorted by descending score; ties keep ``a`` before ``b`` (stable sort).
    """
    k = check_int(k, "k", 0)  # a negative k sliced from the end: the top list less its last entries
    scores = torch.cat([scores_a, scores_b], dim=1)  # [nq, ka + kb]
    ids = torch.cat([ids_a, ids_b.to(ids_a.device)], dim=1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


def _default_chunk_rows(n: int, r_c: int, D: int, itemsize: int, data_device: str) -> int:
    """Candidates scored per ``maxsim`` call when ``chunk_size`` is not given.

    Data in CPU memory (on disk, or offloaded to stream to a GPU): 64 MiB of the ``[n, r_c, D]``
    prefix at a time.  Data resident on a GPU: every row in one call; the query batch alone bounds
    the ``[batch, n]`` fp32 scores.  Each chunk costs a kernel launch, a top-k and a host sync (the
    tie check), so at paper scale (N = 100,000, r_c = 64, D = 3584, bf16: 685 chunks of 64 MiB,
    each ~20 us of memory traffic on an H100) 64 MiB chunks would leave a one-query search bound by
    the host, not by the GPU's bandwidth.
    """
    if data_device != "cpu":
        return max(1, n)
    return max(1, _CHUNK_BYTES // (r_c * D * itemsize))


def _topk_stable(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of ``scores [b, n]`` per row, descending; equal scores keep the lower column first.

    ``Tensor.topk`` picks and orders tied scores arbitrarily (differently per chunk size).  One
    ``topk(k + 1)`` shows which rows have the k-th score tied outside the selection; only those
    rows are re-selected (O(n) each).  NaN ranks first, as in ``topk``.
    """
    n = scores.shape[1]
    vals, cols = scores.topk(min(k + 1, n), dim=1)  # [b, k(+1)]
    if k < n and k > 0:
        nxt, kth = vals[:, k], vals[:, k - 1]  # [b]
        tied = ((nxt == kth) | nxt.isnan()).nonzero()[:, 0]  # rows whose k-th score continues past k
        vals, cols = vals[:, :k], cols[:, :k].clone()
        # the pass over a tied row holds ~16 bytes per score (a copy, masks, a running count): rows in groups,
        # so a block whose rows all tie (duplicate documents) stays near its budget, not ~5x it
        group = max(1, _TIE_PASS_BYTES // (16 * n))
        for start in range(0, tied.numel(), group):
            rows = tied[start : start + group]
            sub, thr = scores[rows], kth[rows, None]  # [t, n], [t, 1]
            eq = (sub == thr) | (sub.isnan() & thr.isnan())
            gt = (sub > thr) | (sub.isnan() & ~thr.isnan())
            keep = gt | (eq & (eq.cumsum(1, dtype=torch.int32) <= k - gt.sum(1, keepdim=True)))  # k per row: first ties
            cols[rows] = keep.nonzero()[:, 1].view(-1, k)
    cols, perm = cols[:, :k].sort(dim=1)  # ascending columns, then a stable sort by score
    vals = scores.gather(1, cols)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def _rerank_scores(q: Tensor, cands: Tensor, r_q: int, r_c: int) -> Tensor:
    """Eq. 4 for ``q [b, R_q, D]`` against its own ``cands [b, K, R_c, D]`` -> ``[b, K]`` fp32."""
    dt = torch.promote_types(torch.float32, torch.promote_types(q.dtype, cands.dtype))
    sim = torch.einsum("bid,bkjd->bkij", q[:, :r_q].to(dt), cands[:, :, :r_c].to(dt))  # [b, K, r_q, r_c]
    return sim.amax(dim=-1).sum(dim=-1)  # [b, K]


def _numbered(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: the device is fixed when the index is made.  Kept unnumbered, a later
    change of the current GPU made every search copy the index's chunks to the new one (right results, one
    whole-index copy per search)."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


class MultiVectorIndex:
    """``[N, R_c, D]`` Meta Embedding index with budgeted, chunked, top-k search.

    ``dtype``: storage precision (bf16 default, fp16 or fp32); queries are rounded to it before
    scoring (as the CUDA kernel must: it takes one input dtype), so a search gives the same ids and
    scores on CPU and GPU; scores are fp32 (accumulated in fp32).  ``device``:
    where scoring runs and, unless ``offload``, where the index lives.  ``offload=True`` keeps
    the index in CPU memory (pinned when CUDA is available) and streams chunks to ``device``.
    """

    def __init__(self, R_c: int, D: int, dtype: torch.dtype | str = torch.bfloat16,
                 device: torch.device | str = "cpu", *, offload: bool = False, capacity: int = 0):
        self.R_c = check_int(R_c, "R_c", 1)
        self.D = check_int(D, "D", 1)
        self.dtype = _dtype(dtype)
        self.device = _numbered(torch.device(device))
        self.offload = bool(offload)
        self._pin = self.offload and self.device.type == "cuda" and torch.cuda.is_available()
        self._n = 0
        self._data = self._alloc(check_int(capacity, "capacity", 0))  # [capacity, R_c, D]
        self._ids = torch.empty(self._data.shape[0], dtype=torch.int64)  # [capacity], CPU
        self._next_id = 0
        self._mapped: Path | None = None  # the file ``_data`` is memory-mapped from (``load(mmap=True)``)

    # ---- storage -------------------------------------------------------------------------
    @property
    def memory_mapped(self) -> bool:
        """Whether the stored vectors are read from the index file (``load(mmap=True)``), not held in memory."""
        return self._mapped is not None

    @property
    def storage_device(self) -> torch.device:
        """Where the index tensor lives (CPU when offloaded or memory-mapped)."""
        return self._data.device

    def _alloc(self, capacity: int) -> Tensor:
        dev = torch.device("cpu") if self.offload else self.device
        return torch.empty(capacity, self.R_c, self.D, dtype=self.dtype, device=dev, pin_memory=self._pin)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"MultiVectorIndex(N={self._n}, R_c={self.R_c}, D={self.D}, dtype={_dtype_name(self.dtype)}, "
                f"device={self.device}, storage={self.storage_device})")

    @property
    def capacity(self) -> int:
        """Rows allocated (grows geometrically, so ``add`` is amortised O(batch))."""
        return self._data.shape[0]

    @property
    def embeddings(self) -> Tensor:
        """The stored vectors ``[N, R_c, D]`` (a view, not a copy)."""
        return self._data[: self._n]

    @property
    def ids(self) -> Tensor:
        """User ids ``[N]`` int64 (CPU), in storage order."""
        return self._ids[: self._n]

    @torch.no_grad()
    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` rows without further reallocation.

        On a memory-mapped index (:attr:`memory_mapped`) a ``capacity`` above ``N`` copies all ``N`` stored rows
        from the file into memory (RAM, or the device unless offloaded): the explicit way to make it growable.
        """
        capacity = check_int(capacity, "capacity", 0)
        if capacity <= self.capacity:
            return
        data = self._alloc(capacity)
        data[: self._n].copy_(self._data[: self._n])
        ids = torch.empty(capacity, dtype=torch.int64)
        ids[: self._n] = self._ids[: self._n]
        self._data, self._ids, self._mapped = data, ids, None

    @torch.no_grad()
    def shrink_to_fit(self) -> None:
        """Free the spare rows :meth:`add` grew into (``capacity`` -> ``N``); the copy holds both briefly."""
        if self.capacity == self._n:
            return
        data = self._alloc(self._n)  # [N, R_c, D]
        data.copy_(self._data[: self._n])
        self._data, self._ids = data, self._ids[: self._n].clone()

    @torch.no_grad()  # an index stores and scores values: autograd history would keep every score block alive
    def add(self, embeddings: Tensor, ids: Sequence[int] | Tensor | None = None) -> Tensor:
        """Append ``embeddings [n, R_c, D]`` (any float dtype/device; cast to the storage dtype).

        ``ids``: one int per row (default: consecutive integers after the largest id so far).
        Returns the ids assigned.  Storage grows geometrically (x1.5); nothing is re-concatenated.

        For a large index pass ``capacity=N`` (or call :meth:`reserve`) first: growth keeps up to half
        as many rows again as spare, and each reallocation holds the old and the new storage at once
        (the paper's 100,000 x 64 x 3584 bf16 index, 42.7 GiB, peaks near 82 GiB when grown 1,000 rows
        at a time: more than an 80 GB GPU).  :meth:`shrink_to_fit` frees the spare rows afterwards.

        A memory-mapped index (``load(..., mmap=True)``, :attr:`memory_mapped`) is read-only here: adding rows
        would silently copy the whole index from disk into memory (more than RAM for an index that is not), so
        ``add`` raises :class:`RuntimeError`; load it with ``mmap=False``, or call :meth:`reserve` first to copy
        it into memory explicitly.
        """
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if embeddings.dim() != 3 or tuple(embeddings.shape[1:]) != (self.R_c, self.D):
            raise ValueError(f"embeddings must have shape [n, R_c={self.R_c}, D={self.D}], "
                             f"got {tuple(embeddings.shape)}")
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        n = embeddings.shape[0]
        if ids is None:
            if self._next_id + n - 1 > _INT64_MAX:
                raise ValueError(f"automatic ids would pass {_INT64_MAX} (the largest id so far is "
                                 f"{self._next_id - 1}); pass ids= explicitly")
            new_ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.int64)
        else:
            new_ids = torch.as_tensor(ids).reshape(-1)
            if new_ids.numel() == 0:  # torch.as_tensor([]) is float32
                new_ids = new_ids.to(torch.int64)
            if new_ids.is_floating_point() or new_ids.dtype == torch.bool or new_ids.is_complex():
                raise TypeError(f"ids must be integers, got dtype {new_ids.dtype}")
            if new_ids.numel() != n:
                raise ValueError(f"ids has {new_ids.numel()} entries for {n} embeddings")
            signed = new_ids.dtype.is_signed
            new_ids = new_ids.to(torch.int64).cpu()
            if not signed and bool((new_ids < 0).any()):  # uint64 above 2**63 - 1 wraps to negative
                raise ValueError(f"ids must fit in int64; got unsigned ids above {2**63 - 1}")
        if n == 0:
            return new_ids
        if self._mapped is not None and self._n + n > self.capacity:
            raise RuntimeError(
                f"this index is memory-mapped from {self._mapped} ({self.memory_bytes()} bytes of vectors); adding "
                f"rows would copy all {self._n} stored rows into memory. Load it with MultiVectorIndex.load(path, "
                f"mmap=False), or call index.reserve({self._n + n}) (or more) first to copy it into memory")
        if ids is not None:
            self._check_unique(new_ids)
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings contain NaN or Inf")
        if self._n + n > self.capacity:
            self.reserve(max(self._n + n, math.ceil(self.capacity * 1.5), 1024))
        rows = self._data[self._n : self._n + n]  # [n, R_c, D]
        rows.copy_(embeddings)  # casts dtype, moves device
        narrows = torch.finfo(self.dtype).max < torch.finfo(embeddings.dtype).max  # e.g. fp32 -> fp16
        if narrows and not bool(torch.isfinite(rows).all()):  # rows past N: dropped, not stored
            raise ValueError(f"embeddings contain values that are Inf in the storage dtype {_dtype_name(self.dtype)}")
        self._ids[self._n : self._n + n] = new_ids
        self._n += n
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def _check_unique(self, new_ids: Tensor) -> None:
        """Reject ids repeated within ``new_ids`` or already stored (a search would return both rows)."""
        uniq, counts = torch.unique(new_ids, return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"ids contain duplicates: {uniq[counts > 1][:5].tolist()}")
        if self._n and int(new_ids.min()) < self._next_id:  # ids after the largest so far cannot collide
            clash = new_ids[torch.isin(new_ids, self.ids)]
            if clash.numel():
                raise ValueError(f"ids already in the index: {clash[:5].tolist()}")

    def memory_bytes(self, budget: Sequence[int] | int | None = None) -> int:
        """Bytes of the index at a budget: ``N * r_c * D * bytes`` (``r_c`` from ``(r_q, r_c)``).

        ``None`` counts all ``R_c`` vectors (what is stored); Table 3's "Index Memory" column.  A
        budget is what :meth:`search` takes (a pair, or a NumPy array / tensor of two ints); an integer
        alone (``np.int64`` too) is ``r_c``.
        """
        if budget is None:
            r_c = self.R_c
        elif not isinstance(budget, bool) and getattr(budget, "ndim", 0) == 0 and hasattr(budget, "__index__"):
            r_c = validate_budget((1, budget), 1, self.R_c)[1]
        else:
            r_c = validate_budget(budget, sys.maxsize, self.R_c)[1]  # r_q: any positive int (not stored)
        return self._n * r_c * self.D * self._data.element_size()

    def truncate(self, r_c: int) -> MultiVectorIndex:
        """A new index keeping only the first ``r_c`` vectors per candidate (§3.2 test-time scaling)."""
        r_c = validate_budget((1, r_c), 1, self.R_c)[1]
        out = MultiVectorIndex(r_c, self.D, self.dtype, self.device, offload=self.offload, capacity=self._n)
        out._data[: self._n].copy_(self._data[: self._n, :r_c])
        out._ids[: self._n] = self.ids
        out._n, out._next_id = self._n, self._next_id
        return out

    # ---- search --------------------------------------------------------------------------
    def _check_queries(self, queries: Tensor) -> None:
        if not isinstance(queries, Tensor):
            raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
        if queries.dim() != 3 or queries.shape[2] != self.D or queries.shape[1] < 1:
            raise ValueError(f"queries must have shape [nq, R_q, D={self.D}], got {tuple(queries.shape)}")
        if not queries.is_floating_point():
            raise TypeError(f"queries must be floating point, got {queries.dtype}")
        if not bool(torch.isfinite(queries).all()):  # NaN scores would rank first
            raise ValueError("queries contain NaN or Inf")
        if torch.finfo(self.dtype).max < torch.finfo(queries.dtype).max:  # scored in the storage dtype
            if not bool(torch.isfinite(queries.to(self.dtype)).all()):
                raise ValueError(f"queries contain values that are Inf in the storage dtype {_dtype_name(self.dtype)}")

    def _budget(self, queries: Tensor, budget: Sequence[int] | None, name: str = "budget") -> tuple[int, int]:
        R_q = queries.shape[1]
        b = (R_q, self.R_c) if budget is None else budget
        try:
            return validate_budget(b, R_q, self.R_c)
        except ValueError as e:
            raise type(e)(f"{name}: {e}") from None

    def _chunk_rows(self, r_c: int, chunk_size: int | None) -> int:
        if chunk_size is not None:
            return check_int(chunk_size, "chunk_size", 1)
        return _default_chunk_rows(self._n, r_c, self.D, self._data.element_size(), self._data.device.type)

    def _chunk(self, start: int, stop: int, r_c: int) -> Tensor:
        """Rows ``[start, stop)``, prefix ``r_c``, on the compute device (copied only if offloaded)."""
        view = self._data[start:stop, :r_c]  # [n, r_c, D] view
        if view.device == self.device:
            return view
        return view.to(self.device, non_blocking=self._pin)

    def _search_positions(self, queries: Tensor, r_q: int, r_c: int, k: int, batch_size: int | None,
                          chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """Exhaustive top-k: ``(scores [nq, k'], storage positions [nq, k'])`` on the compute device."""
        nq, N = queries.shape[0], self._n
        kk = min(k, N)
        chunk = self._chunk_rows(r_c, chunk_size)
        if batch_size is not None:
            qb = check_int(batch_size, "batch_size", 1)
        else:  # bound the [batch, chunk] fp32 scores
            qb = max(1, _SCORE_BYTES // (4 * min(chunk, max(N, 1))))
        out_s = torch.empty(nq, kk, dtype=torch.float32, device=self.device)
        out_p = torch.empty(nq, kk, dtype=torch.int64, device=self.device)
        if nq == 0 or kk == 0:
            return out_s, out_p
        for a in range(0, nq, qb):
            q = queries[a : a + qb, :r_q].to(self.device, self.dtype)  # [b, r_q, D], storage precision
            best_s = best_p = None
            for start in range(0, N, chunk):
                c = self._chunk(start, min(N, start + chunk), r_c)  # [n, r_c, D]
                s = maxsim(q, c, r_q, r_c).float()  # [b, n]
                top_s, top_i = _topk_stable(s, min(kk, s.shape[1]))
                pos = top_i + start
                if best_s is None:
                    best_s, best_p = top_s, pos
                else:  # earlier chunks first: ties go to the lowest position for any chunk size
                    best_s, best_p = merge_topk(best_s, best_p, top_s, pos, kk)
            out_s[a : a + q.shape[0]], out_p[a : a + q.shape[0]] = best_s, best_p
        return out_s, out_p

    def _rerank_positions(self, queries: Tensor, pos: Tensor, r_q: int, r_c: int, k: int,
                          batch_size: int | None) -> tuple[Tensor, Tensor]:
        """Score each query against its own candidate positions ``pos [nq, K]`` and keep the top k."""
        nq, K = pos.shape
        kk = min(k, K)
        out_s = torch.empty(nq, kk, dtype=torch.float32, device=self.device)
        out_p = torch.empty(nq, kk, dtype=torch.int64, device=self.device)
        if nq == 0 or kk == 0:
            return out_s, out_p
        per_query = K * (r_c * self.D + r_q * r_c) * 4  # fp32 gathered vectors + similarities
        qb = batch_size if batch_size is not None else max(1, _SCORE_BYTES // max(1, per_query))
        for a in range(0, nq, qb):
            p = pos[a : a + qb].sort(dim=1).values  # [b, K], storage order: ties keep the lowest position
            flat = p.reshape(-1).to(self._data.device)
            cands = self._data[:, :r_c].index_select(0, flat).to(self.device)  # [b*K, r_c, D], prefix only
            cands = cands.view(p.shape[0], K, r_c, self.D)
            q = queries[a : a + qb, :r_q].to(self.device, self.dtype)  # [b, r_q, D]
            s = _rerank_scores(q, cands, r_q, r_c)  # [b, K]
            top_s, top_i = _topk_stable(s, kk)
            out_s[a : a + p.shape[0]] = top_s
            out_p[a : a + p.shape[0]] = p.to(self.device).gather(1, top_i)
        return out_s, out_p

    @torch.no_grad()
    def _search_local(self, queries: Tensor, budget: Sequence[int] | None, k: int,
                      rerank: tuple[Sequence[int], int] | None, batch_size: int | None,
                      chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """Search returning ``(scores, storage positions)`` on the compute device."""
        self._check_queries(queries)
        k = check_int(k, "k", 1)
        r_q, r_c = self._budget(queries, budget)
        if rerank is None:
            return self._search_positions(queries, r_q, r_c, k, batch_size, chunk_size)
        if not isinstance(rerank, Sequence) or len(rerank) != 2:
            raise ValueError(f"rerank must be (first_budget, k_prime), got {rerank!r}")
        first, k_prime = rerank
        f_q, f_c = self._budget(queries, first, "rerank first budget")
        if f_q * f_c >= r_q * r_c:  # stage 1 scans all N at >= the exhaustive cost (Eq. 3 FLOPs per candidate)
            warnings.warn(f"two-stage search: the first budget ({f_q},{f_c}) costs at least the rerank budget "
                          f"({r_q},{r_c}) per candidate, so scanning the index with it saves nothing over an "
                          f"exhaustive ({r_q},{r_c}) search", UserWarning, stacklevel=3)
        k_prime = check_int(k_prime, "k_prime", 1)
        if k_prime < k:
            raise ValueError(f"k_prime={k_prime} must be >= k={k} (stage 1 keeps k_prime candidates for reranking)")
        _, pos = self._search_positions(queries, f_q, f_c, k_prime, batch_size, chunk_size)
        return self._rerank_positions(queries, pos, r_q, r_c, k, batch_size)

    def search(self, queries: Tensor, budget: Sequence[int] | None = None, k: int = 10, *,
               batch_size: int | None = None, chunk_size: int | None = None,
               rerank: tuple[Sequence[int], int] | None = None) -> tuple[Tensor, Tensor]:
        """Top-``k`` candidates for ``queries [nq, R_q, D]`` at ``budget = (r_q, r_c)`` (Eq. 4).

        Returns ``(scores [nq, k'], ids [nq, k'])`` on CPU, ``k' = min(k, N)``, scores fp32 and
        descending.  ``budget`` defaults to ``(R_q, R_c)``.  ``batch_size`` queries are scored at
        a time against ``chunk_size`` candidates (defaults bound memory: 256 MiB of fp32 scores per
        batch; 64 MiB of candidates per chunk from CPU memory, the whole index when it lives on the
        GPU).  ``rerank=(first, K')``: two-stage search, ``first`` budget retrieves ``K'`` candidates,
        ``budget`` reranks them.
        Equal scores are ordered by storage position (first added first), for any chunk size.
        "Equal" means bit-equal: two identical stored vectors can score a last-bit apart on CPU
        (the matmul's column position changes its rounding), so copies may come in either order.
        """
        scores, pos = self._search_local(queries, budget, k, rerank, batch_size, chunk_size)
        return scores.cpu(), self._ids[pos.cpu()]

    def two_stage_search(self, queries: Tensor, first: Sequence[int] = (1, 1), k_prime: int = 100,
                         second: Sequence[int] | None = None, k: int = 10, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Cheap budget ``first`` retrieves the top ``k_prime``; budget ``second`` (default all) reranks them."""
        return self.search(queries, second, k, rerank=(first, k_prime), **kwargs)

    def recall_vs_exhaustive(self, queries: Tensor, first: Sequence[int] = (1, 1), k_prime: int = 100,
                             second: Sequence[int] | None = None, k: int = 10, **kwargs: Any) -> float:
        """Mean fraction of the exhaustive ``second``-budget top-k that two-stage search also returns."""
        _, exact = self.search(queries, second, k, **kwargs)
        _, approx = self.two_stage_search(queries, first, k_prime, second, k, **kwargs)
        return _recall(exact, approx)

    def shard(self, devices: Sequence[torch.device | str] | None = None) -> ShardedIndex:
        """Split into contiguous shards, one per device (copies); search merges their top-k.

        ``devices`` defaults to every visible GPU (``["cpu"]`` without CUDA).
        """
        if devices is None:
            n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
            devices = [f"cuda:{i}" for i in range(n_gpu)] or ["cpu"]
        devices = [torch.device(d) for d in devices]
        if not devices:
            raise ValueError("devices must name at least one device")
        bounds = np.linspace(0, self._n, len(devices) + 1).round().astype(int)
        shards = []
        for dev, a, b in zip(devices, bounds[:-1], bounds[1:], strict=True):
            s = MultiVectorIndex(self.R_c, self.D, self.dtype, dev, offload=self.offload, capacity=int(b - a))
            if b > a:
                s.add(self._data[a:b], self._ids[a:b])
            shards.append(s)
        return ShardedIndex(shards)

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the vectors and ids (``path/index.safetensors`` on a first save) and ``path/index.json`` (their
        file's name and sha256).

        Streams in blocks, so neither a GPU nor a larger-than-RAM index is copied whole.  A save over an index
        already in ``path`` writes its vectors to a new file (``index-<random>.safetensors``, named by the new
        ``index.json``), then replaces ``index.json``, then deletes the earlier file: a save that fails or is
        killed at any point leaves one complete index, the earlier or the new one (the one file name replaced
        first left neither loadable).  What a killed save left (its vectors file, named by no ``index.json``) is
        deleted by the next save into ``path``.  Saves into one folder (two ranks) run one at a time, under a lock
        on ``path/.index.lock``; the last one is the index.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with _save_lock(path):  # saves into one folder run one at a time (two ranks saving at once broke it)
            return self._save_locked(path)

    def _save_locked(self, path: Path) -> Path:
        started = time.time()
        previous = _named_tensor_file(path)
        tmp = path / f".{TENSOR_FILE}.{uuid.uuid4().hex}.tmp"
        published: list[str] = []  # the name the vectors got
        try:
            self._write(path, previous, tmp, published)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if published and _named_tensor_file(path) != published[0]:  # index.json still names the earlier file
                (path / published[0]).unlink(missing_ok=True)
            raise
        name = published[0]
        if previous is not None and previous != name:
            (path / previous).unlink(missing_ok=True)
        _remove_leftovers(path, name, started)
        return path

    def _write(self, path: Path, previous: str | None, tmp: Path, published: list[str]) -> None:
        """:meth:`save`'s writes: the vectors through ``tmp`` to a file of ``path`` (its name appended to
        ``published``), then ``index.json``."""
        n = self._n
        emb_bytes = n * self.R_c * self.D * self._data.element_size()
        header = {
            "embeddings": {"dtype": _ST_DTYPES[self.dtype], "shape": [n, self.R_c, self.D],
                           "data_offsets": [0, emb_bytes]},
            "ids": {"dtype": "I64", "shape": [n], "data_offsets": [emb_bytes, emb_bytes + 8 * n]},
            # next_id here too: the sha256 covers this file, not index.json (whose other fields are checked
            # against this header and the file's size)
            "__metadata__": {"format": FORMAT, "version": str(FORMAT_VERSION), "next_id": str(self._next_id)},
        }
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)  # data starts 8-byte aligned
        sha = hashlib.sha256()
        with open(tmp, "wb") as fh:
            def write(b: bytes | memoryview) -> None:
                fh.write(b)
                sha.update(b)

            write(struct.pack("<Q", len(hbytes)) + hbytes)
            rows = max(1, _IO_BLOCK // max(1, self.R_c * self.D * self._data.element_size()))
            for a in range(0, n, rows):
                block = self._data[a : min(n, a + rows)].contiguous().cpu()  # never past N (capacity)
                write(block.view(torch.uint8).numpy().tobytes())
            write(self._ids[:n].contiguous().numpy().tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        published.append(_publish(tmp, path, previous))
        name = published[0]
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "R_c": self.R_c, "D": self.D,
                "dtype": _dtype_name(self.dtype), "size": n, "next_id": self._next_id,
                "tensor_file": name, "tensor_bytes": size, "sha256": sha.hexdigest()}
        atomic_write(path / META_FILE, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()), durable=True)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, device: torch.device | str = "cpu",
             offload: bool | None = None, verify: bool = True) -> MultiVectorIndex:
        """Open an index written by :meth:`save`.

        ``mmap=True`` maps the tensor file (copy-on-write, never modified): an index larger than
        RAM is searched from disk chunk by chunk.  Such an index (:attr:`memory_mapped`; not when it is
        copied to a non-CPU ``device`` without ``offload``) refuses :meth:`add`, which would copy it whole
        into memory; :meth:`reserve` does that explicitly, or load with ``mmap=False``.  ``verify`` checks
        the sha256 (one streaming read of the file); the size and the safetensors header are always checked, and
        every field of ``index.json`` against them (``next_id`` against its copy in the header, in files saved
        since it was written there).  The vectors are not scanned: :meth:`add` refuses NaN and Inf, but a file
        edited with its checksum updated can hold them.  ``device`` is the compute device; ``offload``
        (default: ``mmap``) keeps the data on CPU/disk.
        Raises :class:`IndexCorruptedError` or :class:`IndexFormatError` with the reason.
        """
        path = Path(path)
        meta = _read_meta(path)
        tfile = path / meta["tensor_file"]
        try:
            size = tfile.stat().st_size if tfile.is_file() else None
        except OSError as e:  # a name over the file system's limit, ...
            name = meta["tensor_file"][:80]
            raise IndexFormatError(f"{path / META_FILE}: tensor_file {name!r}: {e.strerror}") from None
        if size is None:
            raise IndexFormatError(f"{tfile} is missing")
        if size != meta["tensor_bytes"]:
            raise IndexCorruptedError(f"{tfile} has {size} bytes but {META_FILE} records {meta['tensor_bytes']} "
                                      f"(truncated or modified)")
        if verify:
            digest = sha256_file(tfile)
            if digest != meta["sha256"]:
                raise IndexCorruptedError(f"{tfile} sha256 {digest} does not match {META_FILE} ({meta['sha256']}); "
                                          f"the file is corrupted")
        dtype = _DTYPES[meta["dtype"]]
        n, R_c, D = meta["size"], meta["R_c"], meta["D"]
        data_start, entries = _read_header(tfile, size)
        emb, ids_e = entries.get("embeddings"), entries.get("ids")
        if (not isinstance(emb, dict) or not isinstance(ids_e, dict) or emb.get("dtype") != _ST_DTYPES[dtype]
                or emb.get("shape") != [n, R_c, D] or ids_e.get("dtype") != "I64" or ids_e.get("shape") != [n]):
            raise IndexFormatError(f"{tfile}: tensors do not match {META_FILE} (embeddings [{n}, {R_c}, {D}] "
                                   f"{meta['dtype']}, ids [{n}] int64 expected)")
        esize = torch.empty(0, dtype=dtype).element_size()
        e0, e1 = _offsets(emb, tfile, "embeddings")
        i0, i1 = _offsets(ids_e, tfile, "ids")
        if (e1 - e0 != n * R_c * D * esize or i1 - i0 != 8 * n or data_start + max(e1, i1) > size
                or (n and e0 < i1 and i0 < e1)):  # wrong sizes, past the end, or overlapping
            raise IndexCorruptedError(f"{tfile}: tensor offsets do not fit the file")
        offload = mmap if offload is None else offload
        index = cls(R_c, D, dtype, device, offload=offload)
        ids = torch.from_numpy(np.fromfile(tfile, dtype="<i8", count=n, offset=data_start + i0).copy())
        if mmap and n > 0:
            arr = np.memmap(tfile, dtype=np.uint8, mode="c", offset=data_start + e0, shape=(e1 - e0,))
            data = torch.from_numpy(arr).view(dtype).view(n, R_c, D)  # backed by the page cache
            if not offload:
                data = data.to(index.device)
        else:
            data = index._alloc(n)
            with open(tfile, "rb") as fh:
                fh.seek(data_start + e0)
                flat = data.view(-1) if data.device.type == "cpu" else torch.empty(n * R_c * D, dtype=dtype)
                fh.readinto(memoryview(flat.view(torch.uint8).numpy()))
                if data.device.type != "cpu":
                    data.copy_(flat.view(n, R_c, D))
        if n and torch.unique(ids).numel() != n:  # add() never stores one id twice; a search would return both
            raise IndexFormatError(f"{tfile}: stored ids contain duplicates")
        index._data, index._ids, index._n = data, ids, n
        index._mapped = tfile if mmap and n > 0 and data.device.type == "cpu" else None  # still the file's pages
        next_id = meta.get("next_id", int(ids.max()) + 1 if n else 0)
        if (not isinstance(next_id, int) or isinstance(next_id, bool) or not 0 <= next_id <= _INT64_MAX + 1
                or (n and next_id <= int(ids.max()))):
            raise IndexFormatError(f"{path / META_FILE}: next_id {next_id!r} must be an int above every stored id, "
                                   f"in [0, 2**63]")
        header_meta = entries.get("__metadata__")
        recorded = header_meta.get("next_id") if isinstance(header_meta, dict) else None
        if recorded is not None and "next_id" in meta and recorded != str(next_id):  # files saved before: no check
            raise IndexCorruptedError(f"{path / META_FILE}: next_id {next_id} does not match the "
                                      f"{str(recorded)[:40]!r} recorded in {tfile.name} (one of the two files is "
                                      "corrupted)")
        index._next_id = next_id
        return index


def _recall(exact: Tensor, approx: Tensor) -> float:
    """Mean over rows of |exact ∩ approx| / |exact| for id lists ``[nq, k]``."""
    if exact.numel() == 0:
        return 1.0
    if approx.shape[1] == 0:
        return 0.0
    # membership by binary search in each sorted row: O(nq k) memory (an [nq, k, k] comparison is 1 GB at
    # nq = k = 1000)
    sorted_approx = approx.sort(dim=1).values  # [nq, k']
    pos = torch.searchsorted(sorted_approx, exact.contiguous()).clamp(max=approx.shape[1] - 1)  # [nq, k]
    hits = (sorted_approx.gather(1, pos) == exact).float()  # [nq, k]
    return float(hits.mean())


def _read_meta(path: Path) -> dict:
    mfile = path / META_FILE
    if not mfile.is_file():
        raise IndexFormatError(f"{mfile} is missing; not a saved MultiVectorIndex")
    try:
        meta = json.loads(mfile.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; an int of > 4,300 digits;
        raise IndexFormatError(f"{mfile} is not valid JSON: {type(e).__name__}: {e}") from None  # deep nesting
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFormatError(f"{mfile} is not {FORMAT} metadata")
    if meta.get("version") != FORMAT_VERSION:
        raise IndexFormatError(f"{mfile}: format version {meta.get('version')!r}, expected {FORMAT_VERSION}")
    need = {"R_c": int, "D": int, "dtype": str, "size": int, "tensor_file": str, "tensor_bytes": int, "sha256": str}
    for key, typ in need.items():
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):  # JSON true is not a size
            raise IndexFormatError(f"{mfile}: field {key!r} missing or not {typ.__name__}")
    if meta["dtype"] not in _DTYPES or meta["R_c"] < 1 or meta["D"] < 1 or meta["size"] < 0:
        raise IndexFormatError(f"{mfile}: invalid dtype/R_c/D/size")
    if max(meta["size"], 1) * meta["R_c"] * meta["D"] > _INT64_MAX // 8:  # torch's strides overflowed, empty or not
        raise IndexFormatError(f"{mfile}: size x R_c x D = {meta['size']} x {meta['R_c']} x {meta['D']} is too large")
    if Path(meta["tensor_file"]).name != meta["tensor_file"]:
        raise IndexFormatError(f"{mfile}: tensor_file must be a plain file name")
    return meta


#: The names :meth:`MultiVectorIndex.save` writes vectors and temporary files under (nothing else is removed).
_SAVED_NAME = re.compile(
    r"index(-[0-9a-f]{12})?\.safetensors"  # vectors files
    r"|\.index(-[0-9a-f]{12})?\.safetensors\.[0-9a-f]{32}\.tmp|\.index\.json\.[0-9a-f]{32}\.tmp"  # temporary files
    r"|index\.(safetensors|json)\.tmp")  # the temporary files of earlier versions


def _remove_leftovers(path: Path, keep: str, before: float) -> None:
    """Delete vectors files and temporary files of saves into ``path`` that were killed (``index.json`` never
    named them) -- as large as the index each -- but ``keep`` and those written since ``before`` (a save into the
    same folder running now)."""
    for p in path.iterdir():
        try:
            if _SAVED_NAME.fullmatch(p.name) and p.name != keep and p.stat().st_mtime < before:
                p.unlink()
        except OSError:  # gone already, or not ours to delete
            pass


@contextlib.contextmanager
def _save_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path/.index.lock`` while a save writes into ``path`` (none where ``fcntl`` is missing)."""
    if fcntl is None:
        yield
        return
    with open(path / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, path: Path, previous: str | None) -> str:
    """Give the written vectors file ``tmp`` its name in ``path``: ``index.safetensors`` on a first save (unless a
    concurrent first save took it: hard links never replace a file), else a new ``index-<random>.safetensors``, never
    the name ``previous`` (the earlier index's file, still named by ``index.json``).  Returns the name."""
    if previous is None:
        try:
            os.link(tmp, path / TENSOR_FILE)
            tmp.unlink()
            return TENSOR_FILE
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            if not (path / TENSOR_FILE).exists():
                os.replace(tmp, path / TENSOR_FILE)
                return TENSOR_FILE
    name = f"index-{uuid.uuid4().hex[:12]}.safetensors"
    os.replace(tmp, path / name)
    return name


def _named_tensor_file(path: Path) -> str | None:
    """The tensor file the ``index.json`` in ``path`` names, if it is readable and names one that exists."""
    try:
        name = json.loads((path / META_FILE).read_text()).get("tensor_file")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    if not isinstance(name, str) or not name or Path(name).name != name or not (path / name).is_file():
        return None
    return name


def _offsets(entry: dict, tfile: Path, name: str) -> tuple[int, int]:
    """A header entry's ``data_offsets`` as ``(begin, end)``, checked to be ints ``0 <= begin <= end``."""
    off = entry.get("data_offsets")
    if (not isinstance(off, list) or len(off) != 2 or not all(type(o) is int for o in off)
            or not 0 <= off[0] <= off[1]):
        raise IndexCorruptedError(f"{tfile}: {name} data_offsets {off!r} are not [begin, end] byte offsets")
    return off[0], off[1]


def _read_header(tfile: Path, size: int) -> tuple[int, dict]:
    """safetensors header: (offset of the data section, tensor entries)."""
    with open(tfile, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise IndexCorruptedError(f"{tfile}: too short for a safetensors header")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(size - 8, 100 * 2**20):
            raise IndexCorruptedError(f"{tfile}: header length {hlen} does not fit the file")
        try:
            header = json.loads(fh.read(hlen))
        except (ValueError, RecursionError) as e:  # as in _read_meta
            raise IndexCorruptedError(f"{tfile}: unreadable safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise IndexCorruptedError(f"{tfile}: safetensors header is not a JSON object")
    return 8 + hlen, header


class ShardedIndex:
    """Several :class:`MultiVectorIndex` shards (e.g. one per GPU) searched as one.

    Each shard scores its own rows on its own device (CUDA launches on different devices
    overlap); the per-shard top-k lists are merged on CPU.  With ``rerank``, each shard reranks
    its own top-``K'``, so the pool is at least as large as a single index's.  Shards must hold
    distinct ids (checked here; ids added to a shard later are not re-checked).
    """

    def __init__(self, shards: Sequence[MultiVectorIndex]):
        shards = list(shards)
        if not shards:
            raise ValueError("ShardedIndex needs at least one shard")
        first = shards[0]
        for s in shards:
            if (s.R_c, s.D) != (first.R_c, first.D):
                raise ValueError(f"shards differ in (R_c, D): {(s.R_c, s.D)} vs {(first.R_c, first.D)}")
        # a search returns ids, not shards: an id held by two shards (e.g. indexes built apart, each
        # with default ids 0..n-1) could not be told apart
        uniq, counts = torch.unique(torch.cat([s.ids for s in shards]), return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"shards share ids {uniq[counts > 1][:5].tolist()}; give every shard distinct ids "
                             f"(MultiVectorIndex.add(..., ids=...)) or build them with MultiVectorIndex.shard")
        self.shards = shards
        self.R_c, self.D = first.R_c, first.D

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def memory_bytes(self, budget: Sequence[int] | int | None = None) -> int:
        """Total index bytes at a budget over all shards."""
        return sum(s.memory_bytes(budget) for s in self.shards)

    def search(self, queries: Tensor, budget: Sequence[int] | None = None, k: int = 10, *,
               batch_size: int | None = None, chunk_size: int | None = None,
               rerank: tuple[Sequence[int], int] | None = None) -> tuple[Tensor, Tensor]:
        """Like :meth:`MultiVectorIndex.search`; returns CPU ``(scores [nq, k'], ids [nq, k'])``."""
        # every shard is launched before any result is copied back, so GPU shards run concurrently
        local = [(s, *s._search_local(queries, budget, k, rerank, batch_size, chunk_size)) for s in self.shards]
        best_s = best_i = None
        for shard, sc, pos in local:
            sc, ids = sc.cpu(), shard._ids[pos.cpu()]
            if best_s is None:
                best_s, best_i = sc, ids
            else:
                best_s, best_i = merge_topk(best_s, best_i, sc, ids, k)
        return best_s, best_i

    def two_stage_search(self, queries: Tensor, first: Sequence[int] = (1, 1), k_prime: int = 100,
                         second: Sequence[int] | None = None, k: int = 10, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Two-stage search on every shard, merged."""
        return self.search(queries, second, k, rerank=(first, k_prime), **kwargs)
