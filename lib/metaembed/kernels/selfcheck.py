"""Correctness check of the MaxSim kernel against an fp64 reference (Eq. 4), GPU or CPU emulation.

    python -m metaembed.kernels.selfcheck                 # GPU: all cases (edge shapes, D up to 4096)
    python -m metaembed.kernels.selfcheck --quick         # GPU: small cases (for compute-sanitizer)
    python -m metaembed.kernels.selfcheck --tiny          # GPU: the emulator's cases (every code path, tiny)
    python -m metaembed.kernels.selfcheck --emulate       # no GPU: g++ emulation of the same kernel
    compute-sanitizer --tool memcheck  python -m metaembed.kernels.selfcheck --quick
    compute-sanitizer --tool racecheck --kernel-name kns=maxsim_kernel python -m metaembed.kernels.selfcheck --tiny

The reference scores the *same* (bf16/fp16-rounded) inputs in float64, so the tolerance
(default ``1e-3`` absolute for unit-norm vectors) measures only the kernel's accumulation error.
Exit status 0 when every case passes.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Case", "EMULATOR_CASES", "GPU_CASES", "QUICK_CASES", "VARIANT_CASES", "make_inputs", "reference_scores",
           "run_case", "main"]

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One kernel call: sizes, budget, dtype, engine/tile and memory layout of the inputs."""

    name: str
    nq: int
    N: int
    R_q: int
    R_c: int
    D: int
    r_q: int
    r_c: int
    dtype: str = "bf16"
    algo: str = "auto"
    tile_m: int = 0
    #: contiguous | padded (row strides > D) | transposed (non-unit D stride) | offset (data pointer one element
    #: past a 16-byte boundary) | odd-stride (vector stride D + 1) | item-stride (items R * D + 1 elements apart,
    #: vectors D apart from an aligned start): the last four need element loads
    layout: str = "contiguous"


#: One case per kernel that ``maxsim.cu`` compiles (``dispatch_engine``): engine x dtype x loads
#: (16-byte ``cp.async`` for D = 72, element loads for D = 70) x ``tile_m`` x column chunks
#: (``r_c = 129 > 128``: running max), 40 in all; two k-slices or more, N not a multiple of a tile.
VARIANT_CASES: tuple[Case, ...] = tuple(
    Case(f"kernel-{dt}-{algo}-{'vec' if D == 72 else 'scalar'}-m{tile_m}-{'chunked' if chunked else 'single'}",
         5, 7, 3, 130 if chunked else 6, D, 3, 129 if chunked else 5, dtype=dt, algo=algo, tile_m=tile_m)
    for dt in ("fp32", "fp16", "bf16")
    for algo in (("simt",) if dt == "fp32" else ("simt", "tensor_core"))
    for D in (72, 70)
    for tile_m in (16, 64)
    for chunked in (False, True)
)

#: Small enough for the CPU emulation (each runs in well under a second there): edge shapes plus
#: :data:`VARIANT_CASES`, so that every compiled kernel runs (``--tiny``: under racecheck too).
EMULATOR_CASES: tuple[Case, ...] = (
    Case("bf16-few-queries", 2, 37, 4, 8, 64, 3, 5),
    Case("fp32-simt", 3, 37, 4, 8, 64, 3, 5, dtype="fp32"),
    Case("fp16-many-queries", 9, 21, 8, 16, 128, 8, 16, dtype="fp16"),
    Case("budget-1x1", 1, 130, 1, 1, 64, 1, 1),
    Case("budget-1x1-of-16x64", 3, 40, 16, 64, 32, 1, 1),
    Case("rc-over-tile", 3, 5, 2, 200, 32, 2, 150),
    Case("rq-split-simt", 2, 6, 70, 3, 40, 70, 2, dtype="fp32", algo="simt", tile_m=16),
    Case("rq-split-tc", 1, 5, 80, 2, 64, 80, 2, tile_m=64),
    Case("odd-D-scalar", 4, 33, 5, 7, 100, 5, 7),
    Case("fp32-odd-D", 2, 19, 3, 4, 30, 3, 4, dtype="fp32"),
    Case("padded-strides", 3, 29, 6, 12, 64, 5, 9, layout="padded"),
    Case("transposed", 3, 29, 6, 12, 48, 6, 12, layout="transposed"),
    Case("fp16-simt-forced", 2, 17, 4, 4, 64, 4, 3, dtype="fp16", algo="simt"),
    Case("bf16-tile64-forced", 1, 17, 2, 4, 64, 2, 4, tile_m=64),
    Case("multi-k-slices", 2, 20, 4, 8, 256, 4, 8),
    Case("fp32-multi-k-slices-many", 6, 11, 8, 4, 100, 8, 4, dtype="fp32"),
    Case("empty-index", 3, 0, 4, 8, 64, 4, 8),
    Case("no-queries", 0, 10, 4, 8, 64, 4, 8),
    # D a multiple of 8 but a pointer or a stride that is not: 16-byte loads would be misaligned (the
    # emulator reports a misaligned cp.async / WMMA address as the GPU does)
    Case("offset-pointer", 3, 29, 4, 8, 64, 3, 5, layout="offset"),
    Case("fp32-offset-pointer", 3, 29, 4, 8, 64, 3, 5, dtype="fp32", layout="offset"),
    Case("odd-vector-stride", 3, 29, 4, 8, 64, 3, 5, layout="odd-stride"),
    Case("odd-item-stride", 3, 29, 4, 8, 64, 3, 5, layout="item-stride"),
    Case("fp32-odd-item-stride", 3, 29, 4, 8, 64, 3, 5, dtype="fp32", layout="item-stride"),
    Case("D1", 3, 9, 2, 3, 1, 2, 3),
    Case("rc-256-two-full-chunks", 2, 3, 2, 256, 16, 2, 256),
    Case("rq-65-split-one-row-left", 2, 3, 65, 2, 16, 65, 2, tile_m=64),
    # 64 rows x D x 4 B = 1 MiB per row tile: 9 row tiles rasterised in L2 groups of 8 and 1, over 3 column
    # tiles (with one, a wrong row / column mapping in the partial last group gave the same scores)
    Case("raster-groups", 9, 129, 64, 2, 4096, 64, 2, dtype="fp32"),
) + VARIANT_CASES

#: GPU: the issue's edge shapes (N not a multiple of any tile, D in {64, 128, 2048, 3584, 4096}, nq 1 / 1000).
GPU_CASES: tuple[Case, ...] = EMULATOR_CASES + tuple(
    Case(f"D{D}-nq{nq}-{rq}x{rc}", nq, 1003, 16, 64, D, rq, rc)
    for D in (64, 128, 2048, 3584, 4096)
    for nq in (1, 1000)
    for rq, rc in ((16, 64), (1, 1))
) + (
    Case("fp32-D4096-nq1000", 1000, 301, 16, 64, 4096, 16, 64, dtype="fp32"),
    Case("fp16-D3584-nq1", 1, 2049, 16, 64, 3584, 8, 16, dtype="fp16"),
    Case("transposed-D3584", 7, 300, 16, 64, 3584, 4, 8, layout="transposed"),
    Case("padded-D2048-nq1000", 1000, 257, 16, 64, 2048, 16, 64, layout="padded"),
    Case("N1", 5, 1, 16, 64, 128, 16, 64),
)

#: A subset for compute-sanitizer runs (memcheck/racecheck are ~100x slower).
QUICK_CASES: tuple[Case, ...] = EMULATOR_CASES + (
    Case("quick-D3584-nq1", 1, 301, 16, 64, 3584, 16, 64),
    Case("quick-D2048-nq64", 64, 129, 16, 64, 2048, 16, 64),
)


def make_inputs(case: Case, device: torch.device | str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Unit-norm ``queries [nq, R_q, D]`` and ``candidates [N, R_c, D]`` in the case's dtype and layout.

    Drawn in fp32 on ``device`` itself (a GPU case's ~10^9 values would take minutes on a CPU).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    dt = _DT[case.dtype]

    def unit(*shape: int) -> Tensor:
        x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=-1).to(dt)

    q, c = unit(case.nq, case.R_q, case.D), unit(case.N, case.R_c, case.D)
    if case.layout == "padded":  # rows live inside larger buffers: strides (R+3)*(D+8), D+8
        qb = torch.zeros(case.nq, case.R_q + 3, case.D + 8, dtype=dt, device=device)
        cb = torch.zeros(case.N, case.R_c + 3, case.D + 8, dtype=dt, device=device)
        qb[:, : case.R_q, : case.D] = q
        cb[:, : case.R_c, : case.D] = c
        q, c = qb[:, : case.R_q, : case.D], cb[:, : case.R_c, : case.D]
    elif case.layout == "transposed":  # queries [R_q, nq, D] storage; candidates [D, N, R_c] storage
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
        c = c.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    elif case.layout == "offset":  # contiguous from one element past the (aligned) start of the allocation
        q = torch.zeros(q.numel() + 1, dtype=dt, device=device)[1:].view(q.shape).copy_(q)
        c = torch.zeros(c.numel() + 1, dtype=dt, device=device)[1:].view(c.shape).copy_(c)
    elif case.layout == "odd-stride":  # vectors D + 1 elements apart
        qb = torch.zeros(case.nq, case.R_q, case.D + 1, dtype=dt, device=device)
        cb = torch.zeros(case.N, case.R_c, case.D + 1, dtype=dt, device=device)
        qb[..., : case.D] = q
        cb[..., : case.D] = c
        q, c = qb[..., : case.D], cb[..., : case.D]
    elif case.layout == "item-stride":  # only the item stride is odd: every item but the first is misaligned
        def spaced(x: Tensor) -> Tensor:
            n, R, D = x.shape
            buf = torch.zeros(n * (R * D + 1) + 1, dtype=dt, device=device)
            return buf.as_strided((n, R, D), (R * D + 1, D, 1)).copy_(x)

        q, c = spaced(q), spaced(c)
    elif case.layout != "contiguous":
        raise ValueError(f"unknown layout {case.layout!r}")
    return q, c


def reference_scores(queries: Tensor, candidates: Tensor, r_q: int, r_c: int) -> Tensor:
    """fp64 Eq. 4 on the given (already rounded) inputs, chunked to bound memory; ``[nq, N]``."""
    from metaembed.maxsim import maxsim

    return maxsim(queries.double(), candidates.double(), r_q, r_c, backend="torch")


def run_case(case: Case, device: torch.device | str, library=None, seed: int = 0) -> float:
    """Max |kernel - reference| for ``case`` (0.0 for empty outputs)."""
    from . import maxsim_cuda

    q, c = make_inputs(case, device, seed)
    out = maxsim_cuda(q, c, case.r_q, case.r_c, algo=case.algo, tile_m=case.tile_m, library=library)
    if tuple(out.shape) != (case.nq, case.N) or out.dtype != torch.float32:
        raise AssertionError(f"{case.name}: got {tuple(out.shape)} {out.dtype}, expected ({case.nq}, {case.N}) float32")
    if out.numel() == 0:
        return 0.0
    ref = reference_scores(q, c, case.r_q, case.r_c)
    return float((out.double() - ref).abs().max())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases; print one line each; non-zero exit on any failure."""
    ap = argparse.ArgumentParser(prog="python -m metaembed.kernels.selfcheck", description=__doc__.split("\n")[0])
    ap.add_argument("--emulate", action="store_true", help="CPU emulation build (no GPU needed)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small cases only (compute-sanitizer memcheck)")
    size.add_argument("--tiny", action="store_true",
                      help="the emulator's tiny cases, which reach every code path (compute-sanitizer racecheck)")
    ap.add_argument("--tol", type=float, default=1e-3, help="max abs error (unit-norm inputs)")
    args = ap.parse_args(argv)
    if args.emulate:
        from .build import build_emulator
        from .ffi import KernelLibrary

        library, device, cases = KernelLibrary(build_emulator(), emulated=True), torch.device("cpu"), EMULATOR_CASES
    else:
        from . import is_available, unavailable_reason

        if not is_available():
            print(f"CUDA kernels unavailable: {unavailable_reason()}", file=sys.stderr)
            return 2
        library, device = None, torch.device("cuda")
        cases = EMULATOR_CASES if args.tiny else QUICK_CASES if args.quick else GPU_CASES
    failed = 0
    for case in cases:
        t0 = time.perf_counter()
        err = run_case(case, device, library)
        ok = err <= args.tol
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case.name:42s} max|diff|={err:.2e} ({time.perf_counter() - t0:.2f} s)")
    print(f"{len(cases) - failed}/{len(cases)} cases passed (tol {args.tol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
