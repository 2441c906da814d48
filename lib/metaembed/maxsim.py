"""Late-interaction (MaxSim) scoring under a retrieval budget (Eq. 3-4).

    s^(g)(q, c) = sum_{i <= r_q} max_{j <= r_c} <E_q^(i), E_c^(j)>

:func:`maxsim` scores every query against every candidate with bounded memory
(chunked over candidates and queries, fp32 accumulation, prefixes taken as
views so the index is never copied); :func:`maxsim_reference` is the plain
formula used as a test oracle; :func:`pairwise_maxsim` scores row ``b`` of the
queries against row ``b`` of the candidates (hard negatives).
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F
from torch import Tensor

from .groups import validate_budget

__all__ = ["BACKENDS", "maxsim", "maxsim_reference", "pairwise_maxsim"]

BACKENDS = ("auto", "torch", "cuda", "triton")

#: dtypes the optional CUDA kernel is asked to handle; anything else uses torch.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: GPU (torch fallback): aim for roughly this many candidate columns (chunk * r_c) per matmul.
_TARGET_COLUMNS = 1024
#: CPU block sizes, tuned on 2 shared cores (1 MiB L2 each) at D=128..256: bytes of one
#: candidate chunk (copied into a cache-resident buffer, reused by every query block), query
#: rows (q_block * r_q) per matmul, and the largest fp32 score block per worker.
_CPU_CHUNK_BYTES = 2 * 2**20
_CPU_BLOCK_ROWS = 256
_CPU_TARGET_BLOCK_BYTES = 1 * 2**20
#: Query blocks with fewer rows than this use ``[rows, D] @ [D, cols]`` (faster for tiny M).
_SMALL_M = 16
#: Small query blocks reduce runs of at most this many scores with ``max_pool1d`` (vectorised
#: over the runs) instead of ``amax`` over a short last axis.
_POOL_MAX_RC = 32
#: Convert all queries once (shared by the candidate chunks and workers) up to this many bytes.
_Q_CACHE_BYTES = 64 * 2**20
#: CPU: split the work over ``torch.get_num_threads()`` single-threaded workers above this
#: much work (multiply-adds + 16 x candidate elements read, ~1 ms on one core); below it the
#: thread start-up is not repaid.
_CPU_PARALLEL_MIN_WORK = 5 * 10**7


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

    One 4-D einsum in the inputs' (promoted) dtype, no chunking: a test oracle.  Integer inputs are
    computed in int64 (exact; int8 products wrapped around in int8).
    """
    _check_pair(queries, candidates, ("queries", "candidates"))
    r_q, r_c = _resolve_budget(queries, candidates, r_q, r_c)
    dt = torch.promote_types(queries.dtype, candidates.dtype)
    if not dt.is_floating_point:
        dt = torch.int64
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
    nq: int, N: int, r_q: int, r_c: int, chunk_size: int | None, max_chunk_bytes: int, on_cpu: bool,
    D: int = 256, itemsize: int = 4,
) -> tuple[int, int]:
    """(queries per block, candidates per block) so ``[qb, r_q, cb, r_c]`` fits the budget.

    ``itemsize``: bytes per element of the compute dtype (4 for fp32, 8 when an input is fp64).

    Independent of the thread count (the blocks fix the matmul shapes, hence the bits); on CPU
    the budget is shared by capping the workers of :func:`_maxsim_torch` (one block each).
    """
    pair_bytes = r_q * r_c * itemsize  # one (query, candidate) pair of the [qb, r_q, cb, r_c] block
    max_pairs = max(1, max_chunk_bytes // pair_bytes)
    if chunk_size is not None:
        cb = min(N, chunk_size)
        return max(1, min(nq, max_pairs // cb)), cb
    if not on_cpu:
        # the chunk's compute-dtype copy [cb * r_c, D] counts against the budget too: sized by r_q * r_c
        # alone, a one-query plan at D = 3584, (16, 64) copied 65,536 candidates (a 60 GB fp32 copy)
        max_rows = max(1, max_chunk_bytes // (r_c * D * itemsize))
        cb = min(N, max(1, math.ceil(_TARGET_COLUMNS / r_c)), max_pairs, max_rows)
        qb = max(1, min(nq, max_pairs // cb))
        if qb == nq:  # all queries fit: widen the candidate chunk up to the budget
            cb = max(cb, min(N, max_pairs // nq, max_rows))
        return qb, cb
    cb = min(N, max(1, _CPU_CHUNK_BYTES // (r_c * D * itemsize)))
    qb = min(nq, max(1, _CPU_BLOCK_ROWS // r_q))
    target_pairs = max(1, _CPU_TARGET_BLOCK_BYTES // pair_bytes)
    cb = max(1, min(cb, target_pairs // qb, max_pairs))
    qb = max(1, min(qb, max_pairs // cb))
    return qb, cb


def _cpu_threads() -> int:
    return max(1, torch.get_num_threads())


def _score_range(
    q_pre: Tensor, c_pre: Tensor, out: Tensor, r_q: int, r_c: int, qb: int, cb: int,
    a_range: tuple[int, int], b_range: tuple[int, int], q_blocks: dict[int, Tensor] | None,
) -> None:
    """Write ``out[a0:a1, b0:b1]``: candidate chunks (outer) x query blocks (inner).

    Each chunk is copied once (upcast if needed) into a reused contiguous ``[cb*r_c, D]``
    buffer (a cache-resident matmul operand) and scored against every query block.  Small
    query blocks (``qb*r_q < _SMALL_M``) use ``[qb*r_q, D] @ [D, cb*r_c]``; larger ones
    ``[cb*r_c, D] @ [D, r_q*qb]`` with token-major queries, so that both reductions run over
    a middle axis.  Intermediates are reused buffers of at most ``cb*r_c*qb*r_q`` elements,
    and their views are built once per block shape (the loop is a handful of ops per block).
    """
    D, dt, dev = q_pre.shape[-1], out.dtype, out.device
    (a0, a1), (b0, b1) = a_range, b_range
    # orientation from the block size, not this range: a worker holding only a short last block
    # must read the shared ``q_blocks`` in the layout they were built with (and give the same bits)
    small = qb * r_q < _SMALL_M
    cb = min(cb, b1 - b0)
    m_max = min(qb, a1 - a0) * r_q
    # r_c == 1: the matmul reads the rows in place (a strided [N, D] view; copying them is
    # slower).  r_c > 1: copy, even a contiguous prefix, since small-M matmuls streaming
    # from memory run far below the copy + cache-resident-operand speed.
    c_rows = c_pre.view(-1, D) if r_c == 1 and c_pre.dtype == dt else None
    pool = small and 1 < r_c <= _POOL_MAX_RC
    c_buf = torch.empty(cb * r_c, D, dtype=dt, device=dev) if c_rows is None else None
    sim_buf = torch.empty(cb * r_c * m_max, dtype=dt, device=dev)
    max_buf = torch.empty(cb * m_max, dtype=dt, device=dev) if r_q > 1 and r_c > 1 else None
    out_t = out.T  # [N, nq] view
    a_starts = range(a0, a1, qb)
    if q_blocks is None:
        q_mats = None
    else:
        q_mats = [q_blocks[a] if small else q_blocks[a].T for a in a_starts]
    views: dict[tuple[int, int], tuple] = {}

    def block_views(n: int, m: int) -> tuple:
        """(sim as the matmul output, the tensor to reduce, amax output or None) for n x m."""
        sim = sim_buf[: n * r_c * m]
        qa = m // r_q
        if small:  # sim [qa*r_q, n*r_c]
            mm_out = sim.view(m, n * r_c)
            if r_c == 1:
                return mm_out, sim.view(qa, r_q, n), None
            if pool:
                return mm_out, sim.view(1, m, n * r_c), None
            if r_q == 1:
                return mm_out, sim.view(qa, n, r_c), None
            return mm_out, sim.view(qa, r_q, n, r_c), max_buf[: m * n].view(qa, r_q, n)
        mm_out = sim.view(n * r_c, m)  # sim [n*r_c, r_q*qa]
        if r_c == 1:
            return mm_out, sim.view(n, r_q, qa), None
        if r_q == 1:
            return mm_out, sim.view(n, r_c, qa), None
        return mm_out, sim.view(n, r_c, m), max_buf[: n * m].view(n, m)

    for b in range(b0, b1, cb):
        n = min(cb, b1 - b)
        if c_rows is not None:
            cf = c_rows[b : b + n]  # [n, D] view
        else:
            cf = c_buf[: n * r_c] if n < cb else c_buf  # [n*r_c, D]
            cf.view(n, r_c, D).copy_(c_pre[b : b + n])
        cf_t = cf.T
        for k, a in enumerate(a_starts):
            if q_mats is not None:
                qm = q_mats[k]
            else:
                qm = _query_block(q_pre, a, qb, dt, small)
                qm = qm if small else qm.T
            m = qm.shape[0] if small else qm.shape[1]  # qa * r_q
            key = (n, m)
            v = views.get(key)
            if v is None:
                v = views[key] = block_views(n, m)
            mm_out, red, mx = v
            qa = m // r_q
            if small:
                torch.mm(qm, cf_t, out=mm_out)  # [qa*r_q, n*r_c]
                dst = out[a : a + qa, b : b + n]  # [qa, n]
                if r_c == 1:
                    torch.sum(red, dim=1, out=dst)
                elif pool:  # max over each run of r_c columns; faster than amax for short runs
                    mx = F.max_pool1d(red, r_c, r_c)  # [1, qa*r_q, n]
                    torch.sum(mx.view(qa, r_q, n), dim=1, out=dst)
                elif r_q == 1:
                    torch.amax(red, dim=-1, out=dst)
                else:
                    torch.sum(torch.amax(red, dim=-1, out=mx), dim=1, out=dst)
            else:
                torch.mm(cf, qm, out=mm_out)  # [n*r_c, r_q*qa]
                dst = out_t[b : b + n, a : a + qa]  # [n, qa]
                if r_c == 1:
                    torch.sum(red, dim=1, out=dst)
                elif r_q == 1:
                    torch.amax(red, dim=1, out=dst)
                else:
                    torch.sum(torch.amax(red, dim=1, out=mx).view(n, r_q, qa), dim=1, out=dst)


def _query_block(q_pre: Tensor, a: int, qb: int, dt: torch.dtype, small: bool) -> Tensor:
    """Queries ``a:a+qb`` as ``[qa*r_q, D]`` (query-major, small blocks) or ``[r_q*qa, D]``."""
    blk = q_pre[a : a + qb].to(dt)
    return (blk if small else blk.transpose(0, 1)).reshape(-1, q_pre.shape[-1])


def _split(n_units: int, workers: int) -> list[tuple[int, int]]:
    return [(n_units * w // workers, n_units * (w + 1) // workers) for w in range(workers)]


def _maxsim_torch(queries: Tensor, candidates: Tensor, r_q: int, r_c: int, qb: int, cb: int,
                  max_workers: int | None = None) -> Tensor:
    """Blocked matmuls + amax over r_c + sum over r_q (see :func:`_score_range`).

    On CPU, enough work is split (at chunk / query-block boundaries, so results do not depend
    on the split) over ``torch.get_num_threads()`` workers (at most ``max_workers``: one
    ``[qb, r_q, cb, r_c]`` block each) -- helper threads (this one waits),
    each running single-threaded ops on its own range and buffers.  Independent workers keep
    both cores busy on small per-chunk ops and, unlike one parallel region per op, do not stall
    at a barrier whenever a shared core is busy elsewhere.
    """
    if torch.is_grad_enabled() and (queries.requires_grad or candidates.requires_grad):
        return _maxsim_autograd(queries, candidates, r_q, r_c, qb, cb)
    # values only: views of inputs that require grad still do under no_grad, and grad mode is per
    # thread (on in the helpers), where ``mm(out=)`` would then refuse them
    queries, candidates = queries.detach(), candidates.detach()
    nq, N, D = queries.shape[0], candidates.shape[0], queries.shape[-1]
    dt = _compute_dtype(queries, candidates)
    out = torch.empty(nq, N, dtype=dt, device=queries.device)  # [nq, N]
    q_pre = queries[:, :r_q]  # [nq, r_q, D] view
    c_pre = candidates[:, :r_c]  # [N, r_c, D] view, the index is not copied
    qb, cb = min(qb, nq), min(cb, N)
    small = qb * r_q < _SMALL_M
    q_blocks = None
    if nq * r_q * D * 4 <= _Q_CACHE_BYTES:
        q_blocks = {a: _query_block(q_pre, a, qb, dt, small) for a in range(0, nq, qb)}
    n_chunks, n_qblocks = -(-N // cb), -(-nq // qb)
    threads = _cpu_threads() if queries.device.type == "cpu" else 1
    work = nq * r_q * N * r_c * D + 16 * N * r_c * D
    workers = min(threads, max(n_chunks, n_qblocks)) if work >= _CPU_PARALLEL_MIN_WORK else 1
    workers = max(1, min(workers, max_workers or workers))
    args = (q_pre, c_pre, out, r_q, r_c, qb, cb)
    if threads <= 1:
        _score_range(*args, (0, nq), (0, N), q_blocks)
        return out
    if workers <= 1:
        ranges = [((0, nq), (0, N))]
    elif n_chunks >= workers:  # split the candidates (usual case)
        ranges = [((0, nq), (min(N, u0 * cb), min(N, u1 * cb))) for u0, u1 in _split(n_chunks, workers)]
    else:  # few candidates, many query blocks
        ranges = [((min(nq, u0 * qb), min(nq, u1 * qb)), (0, N)) for u0, u1 in _split(n_qblocks, workers)]
    _run_single_threaded_workers([(*args, ar, br, q_blocks) for ar, br in ranges])
    return out


def _maxsim_autograd(queries: Tensor, candidates: Tensor, r_q: int, r_c: int, qb: int, cb: int) -> Tensor:
    """Differentiable blocked form (no ``out=`` buffers) for inputs that require grad."""
    nq, N, D = queries.shape[0], candidates.shape[0], queries.shape[-1]
    dt = _compute_dtype(queries, candidates)
    out = torch.empty(nq, N, dtype=dt, device=queries.device)  # [nq, N]
    q_pre, c_pre = queries[:, :r_q], candidates[:, :r_c]
    for a in range(0, nq, qb):
        qf = q_pre[a : a + qb].to(dt).reshape(-1, D)  # [qa*r_q, D]
        qa = qf.shape[0] // r_q
        for b in range(0, N, cb):
            cf = c_pre[b : b + cb].to(dt).reshape(-1, D)  # [n*r_c, D]
            sim = (qf @ cf.T).view(qa, r_q, -1, r_c)  # [qa, r_q, n, r_c]
            out[a : a + qa, b : b + cf.shape[0] // r_c] = sim.amax(dim=-1).sum(dim=1)
    return out


_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, size, pool)


def _single_threaded() -> None:
    """Helper thread initializer: single-threaded torch ops (OpenMP / MKL) in this thread."""
    torch.get_num_threads()  # initialise first: a thread's first parallel op resets it to the default
    torch.set_num_threads(1)


def _helper_pool(size: int) -> ThreadPoolExecutor:
    """A persistent pool of single-threaded helpers (starting threads per call costs ~1 ms on a busy host).

    Re-created after ``fork`` (its threads do not survive it) or when more helpers are needed.
    A replaced pool is not shut down: a concurrent caller may still be about to submit to it;
    its idle threads exit once it is garbage collected.  ``torch.set_num_threads(1)`` in a
    helper also sets the count that threads initialising later inherit, so every helper is
    started here and that default is then put back to the caller's count (a thread that first
    uses torch in this short window, not during every scoring call, inherits one thread).
    """
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < size:
            default = torch.get_num_threads()
            pool = ThreadPoolExecutor(size, thread_name_prefix="metaembed-maxsim", initializer=_single_threaded)
            barrier = threading.Barrier(size, timeout=60)  # one task per helper: all of them start now
            wait([pool.submit(barrier.wait) for _ in range(size)])
            torch.set_num_threads(default)  # the caller's own count is unchanged
            _pool = (os.getpid(), size, pool)
        return _pool[2]


def _forget_pool_after_fork() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _run_single_threaded_workers(jobs: list[tuple]) -> None:
    """``_score_range(*job)`` for every job, concurrently, each job on one single-threaded helper.

    This thread only waits: ``torch.set_num_threads(1)`` here would also set the default that
    threads initialising later inherit, so any thread that first used torch during the call
    (e.g. a new request thread beside a search) would keep one thread for good.  The helpers run in
    the caller's inference mode (a per-thread setting): outside it they may not write an output made in it.
    """
    pool = _helper_pool(len(jobs))
    inference = torch.is_inference_mode_enabled()  # per thread: ``out`` made under it is an inference tensor

    def run(job: tuple) -> None:
        with torch.inference_mode(inference):
            _score_range(*job)

    futures = [pool.submit(run, job) for job in jobs]
    wait(futures)
    for f in futures:
        f.result()  # re-raise a helper's exception


def _cuda_kernels(queries: Tensor, candidates: Tensor) -> tuple[types.ModuleType | None, str | None]:
    """(``metaembed.kernels``, None) when its CUDA kernel can score these inputs, else (None, why not)."""
    if not queries.is_cuda:
        return None, f"inputs are on {queries.device}, not CUDA"
    if queries.dtype not in _KERNEL_DTYPES or candidates.dtype not in _KERNEL_DTYPES:
        return None, f"dtypes {queries.dtype}/{candidates.dtype} are not handled by the CUDA kernel"
    try:
        kernels = importlib.import_module("metaembed.kernels")  # honours sys.modules, unlike `from metaembed import`
    except ImportError as e:
        return None, f"metaembed.kernels cannot be imported ({e})"
    if not kernels.is_available(candidates.device):  # built for this device's architecture
        return None, "metaembed.kernels.is_available() is False"
    return kernels, None


def _try_cuda_kernel(queries: Tensor, candidates: Tensor, r_q: int, r_c: int, required: bool) -> Tensor | None:
    """Score with ``metaembed.kernels.maxsim_cuda`` when it can be used, else ``None``."""
    kernels, reason = _cuda_kernels(queries, candidates)
    if kernels is not None:
        out = kernels.maxsim_cuda(queries, candidates, r_q, r_c)
        want = (queries.shape[0], candidates.shape[0])
        if tuple(out.shape) != want:
            raise RuntimeError(f"kernels.maxsim_cuda returned shape {tuple(out.shape)}, expected {want}")
        return out.float()
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
    (fp64 for fp64 inputs) intermediate under ``max_chunk_bytes``.  Inputs that
    require grad (grad mode on) take the differentiable torch path on every device:
    the kernels have no backward, so ``backend="cuda"`` / ``"triton"`` then raise.
    ``backend``: ``"torch"``, ``"cuda"``
    (``metaembed.kernels``, error if unusable), ``"triton"`` (the Triton kernel,
    :mod:`metaembed.kernels.triton_maxsim`, error if unusable; never chosen by
    ``"auto"``) or ``"auto"`` (CUDA kernel for CUDA inputs when available, else torch).  The kernel takes one input dtype: queries whose
    dtype differs from the candidates' are cast to it first (fp32 queries against a bf16
    index are rounded to bf16), whereas the torch path upcasts both; cast the queries to
    the index dtype for the same scores on every device (:class:`MultiVectorIndex` does).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    _check_pair(queries, candidates, ("queries", "candidates"))
    r_q, r_c = _resolve_budget(queries, candidates, r_q, r_c)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be a positive int, got {max_chunk_bytes!r}")
    nq, N, D = queries.shape[0], candidates.shape[0], queries.shape[-1]
    dt = _compute_dtype(queries, candidates)
    needs_grad = torch.is_grad_enabled() and (queries.requires_grad or candidates.requires_grad)
    if needs_grad and backend in ("cuda", "triton"):
        raise RuntimeError(f"backend={backend!r} has no backward but the inputs require grad; use "
                           "backend='torch' or 'auto', or score under torch.no_grad()")
    if nq == 0 or N == 0 or D == 0:  # D == 0: every dot product, hence every score, is 0 (as the reference)
        # a requested kernel that cannot run is an error for every shape, not only non-empty ones
        if backend == "cuda" and (reason := _cuda_kernels(queries, candidates)[1]) is not None:
            raise RuntimeError(f"backend='cuda' requested but {reason}")
        if backend == "triton":
            from .kernels.triton_maxsim import is_available

            if not is_available(queries.device):
                raise RuntimeError(f"Triton cannot run on {queries.device} (not installed, no CUDA, or CPU without "
                                   "TRITON_INTERPRET=1)")
        return torch.zeros(nq, N, dtype=dt, device=queries.device)
    if backend == "triton":
        from .kernels.triton_maxsim import maxsim_triton

        return maxsim_triton(queries, candidates, r_q, r_c)
    if backend != "torch" and not needs_grad:  # the kernel's scores would carry no autograd graph
        out = _try_cuda_kernel(queries, candidates, r_q, r_c, required=backend == "cuda")
        if out is not None:
            return out
    on_cpu = queries.device.type == "cpu"
    qb, cb = _plan_blocks(nq, N, r_q, r_c, chunk_size, max_chunk_bytes, on_cpu=on_cpu, D=D, itemsize=dt.itemsize)
    if not on_cpu:
        return _maxsim_torch(queries, candidates, r_q, r_c, qb, cb)
    block_bytes = min(qb, nq) * r_q * min(cb, N) * r_c * dt.itemsize  # [qb, r_q, cb, r_c] per worker
    return _maxsim_torch(queries, candidates, r_q, r_c, qb, cb, max_workers=max(1, max_chunk_bytes // block_bytes))


class _CallableModule(types.ModuleType):
    """``metaembed.maxsim`` names both this module and its function.

    ``import metaembed.maxsim`` rebinds the package attribute to the module, which
    would shadow the top-level ``metaembed.maxsim(...)`` function; making the module
    callable keeps ``metaembed.maxsim(q, c, r_q, r_c)`` working in every import order.
    """

    def __call__(self, *args, **kwargs) -> Tensor:
        return maxsim(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
