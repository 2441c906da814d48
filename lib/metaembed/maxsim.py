"""Late-interaction (MaxSim) scoring under a retrieval budget (Eq. 3-4).

    s^(g)(q, c) = sum_{i <= r_q} max_{j <= r_c} <E_q^(i), E_c^(j)>

:func:`maxsim` scores every query against every candidate with bounded memory
(chunked over candidates and queries, fp32 accumulation, prefixes taken as
views so the index is never copied); :func:`maxsim_reference` is the plain
formula used as a test oracle; :func:`pairwise_maxsim` scores row ``b`` of the
queries against row ``b`` of the candidates (hard negatives).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .groups import validate_budget

__all__ = ["BACKENDS", "maxsim", "maxsim_reference", "pairwise_maxsim"]

BACKENDS = ("auto", "torch", "cuda")

#: dtypes the optional CUDA kernel is asked to handle; anything else uses torch.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: On CPU, blocks larger than this are no faster (cache), so stay below it.
_CPU_TARGET_BLOCK_BYTES = 16 * 2**20
#: Aim for roughly this many candidate columns (chunk * r_c) per matmul block.
_TARGET_COLUMNS = 1024


def _check_pair(queries: Tensor, candidates: Tensor, names: tuple[str, str]) -> None:
    """Both 3-D tensors, same embedding dim and device, real dtype."""
    qn, cn = names
    for t, name in ((queries, qn), (candidates, cn)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [n, R, D], got shape {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must have a real floating (or integer) dtype, got {t.dtype}")
    if queries.shape[-1] != candidates.shape[-1]:
        raise ValueError(
            f"embedding dims differ: {qn} has D={queries.shape[-1]}, {cn} has D={candidates.shape[-1]}"
        )
    if queries.device != candidates.device:
        raise ValueError(f"{qn} is on {queries.device} but {cn} is on {candidates.device}")


def _resolve_budget(queries: Tensor, candidates: Tensor, r_q: int | None, r_c: int | None) -> tuple[int, int]:
    """``(r_q, r_c)`` with ``None`` meaning all tokens, checked against the tensors."""
    R_q, R_c = queries.shape[1], candidates.shape[1]
    if R_q < 1 or R_c < 1:
        raise ValueError(
            f"need at least one vector per item, got queries with R_q={R_q} and candidates with R_c={R_c}"
        )
    return validate_budget((R_q if r_q is None else r_q, R_c if r_c is None else r_c), R_q, R_c)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64 (never accumulate below fp32)."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def maxsim_reference(
    queries: Tensor, candidates: Tensor, r_q: int | None = None, r_c: int | None = None
) -> Tensor:
    """Eq. 4 written plainly: ``[nq, R_q, D] x [N, R_c, D] -> [nq, N]``.

    One 4-D einsum in the inputs' (promoted) dtype, no chunking: a test oracle.
    """
    _check_pair(queries, candidates, ("queries", "candidates"))
    r_q, r_c = _resolve_budget(queries, candidates, r_q, r_c)
    dt = torch.promote_types(queries.dtype, candidates.dtype)
    q = queries[:, :r_q].to(dt)  # [nq, r_q, D]
    c = candidates[:, :r_c].to(dt)  # [N, r_c, D]
    sim = torch.einsum("aid,bjd->abij", q, c)  # [nq, N, r_q, r_c]
    return sim.amax(dim=-1).sum(dim=-1)  # [nq, N]


def pairwise_maxsim(q: Tensor, c: Tensor, r_q: int | None = None, r_c: int | None = None) -> Tensor:
    """Row-wise Eq. 4: ``s(q[b], c[b])`` for ``q [B, R_q, D]``, ``c [B, R_c, D]`` -> ``[B]``.

    Differentiable; computed in at least fp32.
    """
    _check_pair(q, c, ("q", "c"))
    if q.shape[0] != c.shape[0]:
        raise ValueError(f"q and c must have the same number of rows, got {q.shape[0]} and {c.shape[0]}")
    r_q, r_c = _resolve_budget(q, c, r_q, r_c)
    dt = _compute_dtype(q, c)
    sim = torch.einsum("bid,bjd->bij", q[:, :r_q].to(dt), c[:, :r_c].to(dt))  # [B, r_q, r_c]
    return sim.amax(dim=-1).sum(dim=-1)  # [B]


def _plan_blocks(
    nq: int, N: int, r_q: int, r_c: int, chunk_size: int | None, max_chunk_bytes: int, on_cpu: bool
) -> tuple[int, int]:
    """(queries per block, candidates per block) so ``[qb, r_q, cb, r_c]`` fp32 fits the budget."""
    pair_bytes = r_q * r_c * 4  # one (query, candidate) pair of the [qb, r_q, cb, r_c] block
    max_pairs = max(1, max_chunk_bytes // pair_bytes)
    if chunk_size is not None:
        cb = min(N, chunk_size)
        return max(1, min(nq, max_pairs // cb)), cb
    target = min(max_chunk_bytes, _CPU_TARGET_BLOCK_BYTES) if on_cpu else max_chunk_bytes
    target_pairs = max(1, target // pair_bytes)
    cb = min(N, max(1, math.ceil(_TARGET_COLUMNS / r_c)), max_pairs)
    qb = max(1, min(nq, target_pairs // cb))
    if qb == nq:  # all queries fit: widen the candidate chunk up to the target
        cb = max(cb, min(N, target_pairs // nq))
    return qb, cb


def _maxsim_torch(queries: Tensor, candidates: Tensor, r_q: int, r_c: int, qb: int, cb: int) -> Tensor:
    """Blocked ``[qb*r_q, D] @ [D, cb*r_c]`` matmuls, then amax over r_c and sum over r_q."""
    nq, N, D = queries.shape[0], candidates.shape[0], queries.shape[-1]
    dt = _compute_dtype(queries, candidates)
    out = torch.empty(nq, N, dtype=dt, device=queries.device)  # [nq, N]
    q_pre = queries[:, :r_q]  # [nq, r_q, D] view
    c_pre = candidates[:, :r_c]  # [N, r_c, D] view, the index is not copied
    for a in range(0, nq, qb):
        qf = q_pre[a : a + qb].to(dt).reshape(-1, D)  # [qb*r_q, D]
        na = qf.shape[0] // r_q
        for b in range(0, N, cb):
            cf = c_pre[b : b + cb].to(dt).reshape(-1, D)  # [cb*r_c, D], copies at most one chunk
            sim = (qf @ cf.T).view(na, r_q, -1, r_c)  # [qb, r_q, cb, r_c]
            out[a : a + na, b : b + cf.shape[0] // r_c] = sim.amax(dim=-1).sum(dim=1)  # [qb, cb]
    return out


def _try_cuda_kernel(queries: Tensor, candidates: Tensor, r_q: int, r_c: int, required: bool) -> Tensor | None:
    """Score with ``metaembed.kernels.maxsim_cuda`` when it can be used, else ``None``."""
    reason = None
    if not queries.is_cuda:
        reason = f"inputs are on {queries.device}, not CUDA"
    elif queries.dtype not in _KERNEL_DTYPES or candidates.dtype not in _KERNEL_DTYPES:
        reason = f"dtypes {queries.dtype}/{candidates.dtype} are not handled by the CUDA kernel"
    else:
        try:
            from metaembed import kernels  # optional, written separately
        except ImportError as e:
            reason = f"metaembed.kernels cannot be imported ({e})"
        else:
            if kernels.is_available():
                out = kernels.maxsim_cuda(queries, candidates, r_q, r_c)
                want = (queries.shape[0], candidates.shape[0])
                if tuple(out.shape) != want:
                    raise RuntimeError(f"kernels.maxsim_cuda returned shape {tuple(out.shape)}, expected {want}")
                return out.float()
            reason = "metaembed.kernels.is_available() is False"
    if required:
        raise RuntimeError(f"backend='cuda' requested but {reason}")
    return None


def maxsim(
    queries: Tensor,
    candidates: Tensor,
    r_q: int | None = None,
    r_c: int | None = None,
    *,
    chunk_size: int | None = None,
    max_chunk_bytes: int = 256 * 2**20,
    backend: str = "auto",
) -> Tensor:
    """Eq. 4 for all pairs: ``queries [nq, R_q, D]``, ``candidates [N, R_c, D]`` -> ``[nq, N]``.

    Uses the first ``r_q`` / ``r_c`` vectors (default: all).  The result is
    float32 (float64 if an input is float64); low-precision inputs are upcast
    chunk by chunk.  ``chunk_size`` fixes candidates per chunk; otherwise chunks
    over candidates and queries keep the ``[q_chunk, r_q, c_chunk, r_c]`` fp32
    intermediate under ``max_chunk_bytes``.  ``backend``: ``"torch"``, ``"cuda"``
    (``metaembed.kernels``, error if unusable) or ``"auto"`` (CUDA kernel for CUDA
    inputs when available, else torch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    _check_pair(queries, candidates, ("queries", "candidates"))
    r_q, r_c = _resolve_budget(queries, candidates, r_q, r_c)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be a positive int, got {max_chunk_bytes!r}")
    nq, N = queries.shape[0], candidates.shape[0]
    if nq == 0 or N == 0:
        return torch.zeros(nq, N, dtype=_compute_dtype(queries, candidates), device=queries.device)
    if backend != "torch":
        out = _try_cuda_kernel(queries, candidates, r_q, r_c, required=backend == "cuda")
        if out is not None:
            return out
    qb, cb = _plan_blocks(nq, N, r_q, r_c, chunk_size, max_chunk_bytes, on_cpu=queries.device.type == "cpu")
    return _maxsim_torch(queries, candidates, r_q, r_c, qb, cb)
