"""MaxSim (Eq. 4) as a Triton kernel: an alternative many-queries path to ``maxsim.cu``.

    score[q, n] = sum_{i < r_q} max_{j < r_c} <Q[q, i], C[n, j]>      Q [nq, R_q, D], C [N, R_c, D]

Same plan as the CUDA C++ kernel -- one GEMM ``[nq*r_q, D] x [D, N*r_c]`` whose epilogue takes
the max over ``r_c`` and the sum over ``r_q``, rows padded per query to ``PQ = next_pow2(r_q)``
and columns per candidate to ``PC = next_pow2(r_c)``, prefixes read through strides -- but the
GEMM is ``tl.dot``, which Triton lowers to Hopper's asynchronous warpgroup MMA (wgmma) on sm_90
and to ``mma.sync`` before.  ``maxsim.cu`` uses WMMA (``mma.sync``) everywhere; this path exists
so the many-queries target can be measured against both (``metaembed bench`` times it when
Triton and a GPU are present).  It is never chosen by ``backend="auto"``.

Without a GPU the same kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set
before the first call) on CPU tensors; the tests do this with fp16/fp32 inputs (the interpreter
mis-reads bf16).  Limits: ``next_pow2(r_q) <= 256`` and ``next_pow2(r_c) <= 256``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["is_available", "maxsim_triton", "compile_for", "MAX_PAD", "SHARED_MEMORY_LIMIT"]

#: Largest padded budget (``next_pow2(r_q)``, ``next_pow2(r_c)``) one tile holds.
MAX_PAD = 256
#: Programs per launch: a 1-D grid of at most 2**31 - 1 blocks, and the kernel's program ids are int32.
#: Larger problems (e.g. 10^5 queries x 10^6 candidates at (16, 64): 6.25e9 tiles) run as several launches.
_MAX_PROGRAMS = 2**31 - 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available(device: torch.device | str | None = None) -> bool:
    """Triton is importable and can run on ``device`` (a CUDA device, or CPU under the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _interpret() if dev.type == "cpu" else dev.type == "cuda" and torch.cuda.is_available()


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool) -> Any:
    """The jitted kernel (built lazily: importing metaembed never imports Triton).  ``interpret``
    only keys the cache: Triton reads ``TRITON_INTERPRET`` when the function is decorated."""
    import triton
    import triton.language as tl

    @triton.jit
    def maxsim_kernel(q_ptr, c_ptr, out_ptr, nq, N, r_q, r_c, D, sq0, sq1, sq2, sc0, sc1, sc2, ldo,
                      PQ: tl.constexpr, PC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
        QPT: tl.constexpr = BLOCK_M // PQ  # queries per row tile
        CPT: tl.constexpr = BLOCK_N // PC  # candidates per column tile
        pid = tl.program_id(0)
        num_m = tl.cdiv(nq, QPT)
        num_n = tl.cdiv(N, CPT)
        # grouped order: GROUP_M row tiles sweep the column tiles together (candidate tiles reused from L2)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows_in_group
        pid_n = (pid % per_group) // rows_in_group

        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        q_idx = pid_m * QPT + rows // PQ  # [BLOCK_M] query of each row
        i_idx = rows % PQ  # its vector
        n_idx = pid_n * CPT + cols // PC  # [BLOCK_N] candidate of each column
        j_idx = cols % PC
        row_ok = (q_idx < nq) & (i_idx < r_q)
        col_ok = (n_idx < N) & (j_idx < r_c)
        a_rows = q_ptr + q_idx.to(tl.int64) * sq0 + i_idx.to(tl.int64) * sq1  # [BLOCK_M] pointers
        b_cols = c_ptr + n_idx.to(tl.int64) * sc0 + j_idx.to(tl.int64) * sc1  # [BLOCK_N]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D
            a = tl.load(a_rows[:, None] + k[None, :].to(tl.int64) * sq2, mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(b_cols[None, :] + k[:, None].to(tl.int64) * sc2, mask=col_ok[None, :] & k_ok[:, None],
                        other=0.0)  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # epilogue: max over the PC columns of a candidate (padded columns -> -inf; a NaN similarity makes
        # it NaN, as torch.amax, where tl.max would drop it), sum over the r_q real rows of a query (the
        # zero padding rows are left out: 0 * inf = NaN); the [nq, N, r_q, r_c] similarities never leave the tile
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        sims = tl.reshape(acc, (BLOCK_M, CPT, PC))
        best = tl.max(sims, axis=2)  # [BLOCK_M, CPT]
        best = tl.where(tl.max((sims != sims).to(tl.int32), axis=2) > 0, float("nan"), best)
        best = tl.where((i_idx < r_q)[:, None], best, 0.0)
        score = tl.sum(tl.reshape(best, (QPT, PQ, CPT)), axis=1)  # [QPT, CPT]
        oq = pid_m * QPT + tl.arange(0, QPT)
        on = pid_n * CPT + tl.arange(0, CPT)
        tl.store(out_ptr + oq[:, None].to(tl.int64) * ldo + on[None, :], score,
                 mask=(oq[:, None] < nq) & (on[None, :] < N))

    return maxsim_kernel


def _config(pq: int, pc: int, dtype: torch.dtype, interpret: bool) -> dict[str, int]:
    """Tile sizes: 128 x 128 (or one padded query / candidate per tile), BLOCK_K 64 (32 for fp32);
    small tiles under the interpreter, which runs them in numpy.

    A tile larger than 128 x 128 (a padded budget of 256) halves BLOCK_K, so its pipelined operand
    buffers fit the 99 KiB of shared memory a block gets on sm_86 / sm_89 (with BLOCK_K 64, 256 x 256
    needed 128 KiB and could not launch there); :func:`compile_for` measures this without a GPU."""
    if interpret:
        return {"BLOCK_M": max(16, pq), "BLOCK_N": max(16, pc), "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 1}
    block_m, block_n = max(128, pq), max(128, pc)
    block_k = 32 if dtype == torch.float32 else 64
    if block_m * block_n > 128 * 128:
        block_k //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": 8,
            "num_stages": 3}


def maxsim_triton(queries: Tensor, candidates: Tensor, r_q: int | None = None, r_c: int | None = None) -> Tensor:
    """Eq. 4 for all pairs with the Triton kernel: ``[nq, R_q, D] x [N, R_c, D] -> [nq, N]`` fp32.

    Inputs bf16 / fp16 / fp32 (queries are cast to the candidates' dtype), any strides; fp32
    accumulation (fp32 inputs in true fp32, no TF32).  Raises ``RuntimeError`` when Triton cannot
    run on the inputs' device or when inputs require grad (grad mode on: the kernel has no
    backward, its scores would carry no graph) and ``ValueError`` for budgets beyond :data:`MAX_PAD`.
    """
    from ..maxsim import _check_pair, _resolve_budget

    _check_pair(queries, candidates, ("queries", "candidates"))
    if torch.is_grad_enabled() and (queries.requires_grad or candidates.requires_grad):
        raise RuntimeError("maxsim_triton has no backward but the inputs require grad; use metaembed.maxsim "
                           "(differentiable torch path) or score under torch.no_grad()")
    r_q, r_c = _resolve_budget(queries, candidates, r_q, r_c)
    if not is_available(queries.device):
        raise RuntimeError(f"Triton cannot run on {queries.device} (not installed, no CUDA, or CPU without "
                           "TRITON_INTERPRET=1)")
    if candidates.dtype not in _DTYPES:
        raise TypeError(f"candidates dtype {candidates.dtype} not handled (expected one of {_DTYPES})")
    pq, pc = _next_pow2(r_q), _next_pow2(r_c)
    if pq > MAX_PAD or pc > MAX_PAD:
        raise ValueError(f"budget ({r_q}, {r_c}) pads to ({pq}, {pc}); the Triton kernel holds at most {MAX_PAD}")
    q = queries if queries.dtype == candidates.dtype else queries.to(candidates.dtype)
    nq, N, D = q.shape[0], candidates.shape[0], q.shape[2]
    out = torch.empty(nq, N, dtype=torch.float32, device=q.device)  # [nq, N]
    if nq == 0 or N == 0:
        return out
    interpret = _interpret()
    cfg = _config(pq, pc, candidates.dtype, interpret)
    qpt, cpt = cfg["BLOCK_M"] // pq, cfg["BLOCK_N"] // pc
    tiles_m, tiles_n = -(-nq // qpt), -(-N // cpt)
    # one launch per block of at most _MAX_PROGRAMS tiles (Triton passes the grid as a C int: a larger one was an
    # OverflowError); each writes its own [queries, candidates] block of ``out`` through its row stride
    step_m = min(tiles_m, _MAX_PROGRAMS)
    step_n = max(1, min(tiles_n, _MAX_PROGRAMS // step_m))
    precision = "ieee" if candidates.dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        for tm in range(0, tiles_m, step_m):
            qs = q[tm * qpt : (tm + step_m) * qpt]  # [nq', R_q, D] view
            for tn in range(0, tiles_n, step_n):
                cs = candidates[tn * cpt : (tn + step_n) * cpt]  # [N', R_c, D] view
                o = out[tm * qpt : tm * qpt + qs.shape[0], tn * cpt : tn * cpt + cs.shape[0]]  # [nq', N'] view
                grid = (-(-qs.shape[0] // qpt) * -(-cs.shape[0] // cpt),)
                _kernel(interpret)[grid](qs, cs, o, qs.shape[0], cs.shape[0], r_q, r_c, D, *qs.stride(),
                                         *cs.stride(), o.stride(0), PQ=pq, PC=pc, PRECISION=precision, **cfg)
    return out


# ---- compile check without a GPU -------------------------------------------------------------

#: Shared memory one block may use (bytes, opt-in maximum) per compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def compile_for(arch: int, r_q: int, r_c: int, dtype: torch.dtype = torch.bfloat16) -> Any:
    """Compile the kernel ahead of time for ``sm_<arch>`` at budget ``(r_q, r_c)``; no GPU needed.

    Uses the tile sizes a launch would use and the specialisation Triton's launcher gives the usual
    arguments (16-byte aligned pointers, ``D`` and outer strides; unit stride along ``D`` as a
    constant), so the result's ``metadata.shared`` (bytes of shared memory per block) and ``asm``
    (``ttgir``, ``ptx``, ``cubin``) are those of a real launch.  Needs Triton with its bundled
    ``ptxas``, in a process where ``TRITON_INTERPRET`` is unset: Triton sets up its language for one
    mode when it is imported (``python -m metaembed.kernels.triton_maxsim`` runs this check).
    """
    if _interpret():
        raise RuntimeError("compile_for needs a process without TRITON_INTERPRET (Triton's language is set up "
                           "for the interpreter at import); run `python -m metaembed.kernels.triton_maxsim`")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if dtype not in _DTYPES:
        raise TypeError(f"dtype {dtype} not handled (expected one of {_DTYPES})")
    pq, pc = _next_pow2(r_q), _next_pow2(r_c)
    if pq > MAX_PAD or pc > MAX_PAD:
        raise ValueError(f"budget ({r_q}, {r_c}) pads to ({pq}, {pc}); the Triton kernel holds at most {MAX_PAD}")
    cfg = _config(pq, pc, dtype, interpret=False)
    kernel = _kernel(False)
    names = kernel.arg_names
    signature = {n: "i32" for n in names}  # nq, N, r_q, r_c, ldo: any value
    signature.update(q_ptr=_TRITON_PTR[dtype], c_ptr=_TRITON_PTR[dtype], out_ptr="*fp32")
    constexprs = {"sq2": 1, "sc2": 1, "PQ": pq, "PC": pc, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                  "BLOCK_K": cfg["BLOCK_K"], "GROUP_M": cfg["GROUP_M"],
                  "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
    signature.update({n: "constexpr" for n in constexprs})
    aligned = ("q_ptr", "c_ptr", "out_ptr", "D", "sq0", "sq1", "sc0", "sc1")  # D = 3584, 4096, ...: multiples of 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def _stack_bytes(cubin: bytes) -> int | None:
    """Per-thread stack frame of a cubin (register spills land there), from cuobjdump (``None`` without one)."""
    import subprocess
    import tempfile

    from .build import find_cuobjdump

    tool = find_cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    stacks = [int(w.split(":")[1]) for w in out.split() if w.startswith("STACK:")]
    return max(stacks) if stacks else None


def main(argv: list[str] | None = None) -> int:
    """Compile check: the kernel for each ``--arch`` at padded budgets up to :data:`MAX_PAD`, in bf16
    and fp32; prints shared memory against the architecture's limit; exit 1 when one does not compile
    or does not fit."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m metaembed.kernels.triton_maxsim", description=main.__doc__)
    ap.add_argument("--arch", type=int, action="append", dest="archs", choices=sorted(SHARED_MEMORY_LIMIT),
                    help="compute capability as an integer, e.g. 90 (repeatable; default 80, 86, 90)")
    ap.add_argument("--budget", action="append", dest="budgets", metavar="R_Q,R_C",
                    help="budget to compile (repeatable; default 16,64 256,128 128,256 256,256)")
    args = ap.parse_args(argv)
    archs = args.archs or [80, 86, 90]
    budgets = [tuple(int(x) for x in b.split(",")) for b in args.budgets or ["16,64", "256,128", "128,256", "256,256"]]
    failed = 0
    print("| sm | budget | dtype | tile (M x N x K) | shared KiB | limit KiB | stack B/thread |")
    print("|---|---|---|---|---|---|---|")
    for arch in archs:
        for r_q, r_c in budgets:
            for dtype in (torch.bfloat16, torch.float32):
                cfg = _config(_next_pow2(r_q), _next_pow2(r_c), dtype, interpret=False)
                tile = f"{cfg['BLOCK_M']} x {cfg['BLOCK_N']} x {cfg['BLOCK_K']}"
                limit = SHARED_MEMORY_LIMIT[arch]
                try:
                    compiled = compile_for(arch, r_q, r_c, dtype)
                except Exception as e:  # noqa: BLE001 - reported per row, counted as a failure
                    failed += 1
                    print(f"| {arch} | ({r_q}, {r_c}) | {str(dtype)[6:]} | {tile} | FAILED: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]} | {limit / 1024:.0f} | |")
                    continue
                shared = compiled.metadata.shared
                stack = _stack_bytes(compiled.asm["cubin"])
                mark = "" if shared <= limit else " (too large)"
                failed += shared > limit
                print(f"| {arch} | ({r_q}, {r_c}) | {str(dtype)[6:]} | {tile} | {shared / 1024:.0f}{mark} | "
                      f"{limit / 1024:.0f} | {'n/a' if stack is None else stack} |", flush=True)
    print(f"triton_maxsim: {'FAILED ' + str(failed) if failed else 'all compiled and fit'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
