"""Scoring benchmark reproducing Table 3 (paper §5) for any D, N, batch size and budgets.

For each budget ``(r_q, r_c)`` over one random unit-norm index ``[N, R_c, D]``:

* analytic FLOPs per query and index memory (:mod:`metaembed.efficiency`);
* measured scoring latency (mean, std over ``--runs`` after ``--warmup``; CUDA events on GPU,
  ``perf_counter`` on CPU) of :func:`metaembed.maxsim.maxsim` (the CUDA kernel when available)
  in BOTH meanings: one query scanning the whole index, and a batch of ``--batch-size`` queries
  amortised per query.  Table 3's 6.25 ms for (16, 64) over a 42.7 GiB index can only be the
  amortised figure: one pass over 42.7 GiB takes > 20 ms even at an A100's 2 TB/s;
* achieved bandwidth (single query: index bytes / time) and FLOP rate (batch) as fractions of
  the device's measured copy bandwidth and matmul throughput;
* the plain PyTorch reference (``maxsim_reference``, materialises ``[B, N, r_q, r_c]``) at the
  same shapes (OOM caught and reported); when the scorer is the CUDA kernel, also the chunked
  PyTorch path (``maxsim(..., backend="torch")``, never out of memory) per query over the first
  ``--torch-queries`` queries, and the kernel's speed-up over both; the Triton kernel
  (:mod:`metaembed.kernels.triton_maxsim`, wgmma on Hopper) on the batch when Triton and a GPU
  are present; on GPU a bare GEMM of the batch's shape ``[B*r_q, D] x [D, N*r_c]`` (:func:`bare_gemm`,
  the issue's "at least 0.9x the time of a bare bf16 GEMM" target) and the scorer's speed relative to it; ``maxsim_cpu`` when installed, on CPU: it runs in a
  child process (0.1.0 segfaults for D >= 512) after all other timings, on the prefix as its own
  contiguous fp32 array, so metaembed is also timed on that same input ("1q, maxsim-cpu's input");
* agreement (:func:`agreement`): max |score - fp64 reference| and the share of queries whose
  top-100 equals an fp32 reference's (``--no-agreement`` skips it).

Defaults: the paper's config (D=3584, N=100,000, batch 1,000, bf16) on GPU; a CPU-sized one
(D=256, N=4,096, batch 16) otherwise.  ``metaembed bench --json PATH`` also writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import DEFAULT_GROUPS
from .efficiency import (
    GIB,
    PAPER_BATCH,
    PAPER_D,
    PAPER_N,
    PAPER_TABLE3,
    dtype_bytes,
    fixed_or_sig,
    index_memory_bytes,
    markdown_table,
    parse_budgets,
    scoring_flops,
    sig_figures,
    write_json,
)
from .groups import format_budget, parse_budget
from .maxsim import BACKENDS, maxsim, maxsim_reference

__all__ = ["BenchConfig", "add_arguments", "default_config", "format_report", "run", "run_benchmark", "sync",
           "time_ms"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CPU_DEFAULTS = {"D": 256, "N": 4096, "batch_size": 16}
GPU_DEFAULTS = {"D": PAPER_D, "N": PAPER_N, "batch_size": PAPER_BATCH}


@dataclass
class BenchConfig:
    """What to benchmark; ``None`` sizes take the device defaults (paper config on GPU)."""

    D: int | None = None
    N: int | None = None
    batch_size: int | None = None
    budgets: list[tuple[int, int]] = field(default_factory=lambda: [tuple(b) for b in DEFAULT_GROUPS])
    dtype: str = "bfloat16"
    device: str = "auto"
    runs: int = 10
    warmup: int = 2
    seed: int = 0
    backend: str = "auto"
    reference: bool = True
    reference_limit_gib: float = 4.0  # CPU: skip the reference when it would allocate more
    maxsim_cpu: bool = True
    agreement: bool = True  # scores vs fp64 and top-k vs fp32 references (Table 3 agreement targets)
    agreement_k: int = 100
    agreement_fp64_queries: int = 8
    torch_chunked: bool | None = None  # time the chunked PyTorch path too; None: when the scorer is the kernel
    torch_queries: int = 64  # queries it is timed on (per-query figure; it is slow at the paper size)
    torch_runs: int = 3
    triton: bool | None = None  # time the Triton kernel on the batch; None: when it can run on the GPU
    triton_runs: int = 3
    gemm: bool | None = None  # time a bare GEMM of the batch's shape; None: on GPU
    gemm_runs: int = 3


def default_config(device: str) -> dict[str, int]:
    """Paper sizes on CUDA, CPU-sized ones otherwise."""
    return dict(GPU_DEFAULTS if torch.device(device).type == "cuda" else CPU_DEFAULTS)


def _resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; anything else is a ValueError.

    Only these are timed right (:func:`time_ms`: CUDA events, or ``perf_counter`` after :func:`sync`):
    on ``meta`` nothing is computed and on other accelerators ``perf_counter`` would time the launches.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N (no timing on {dev.type})")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on CPU): bracket wall-clock timings with it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> tuple[float, float | None]:
    """(mean, std) milliseconds of ``fn()`` over ``runs`` after ``warmup`` calls (std None for one run)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            # on ``device``'s stream: Event.record() without one uses the *current* device's stream,
            # which with --device cuda:N (N != current) brackets none of fn's work
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.fmean(times), (statistics.stdev(times) if len(times) > 1 else None)


def measure_peaks(device: torch.device, dtype: torch.dtype, runs: int = 5) -> dict[str, Any]:
    """Measured copy bandwidth (read + write, GB/s) and matmul throughput (TFLOP/s) of ``device``.

    The copy's source buffer is filled before timing (an untouched CPU buffer reads the shared
    zero page, faster than real memory).  The matmul uses ``dtype`` on GPU (the kernel's
    tensor-core input; fp32 with TF32 off) and the dtype the CPU scoring path computes in (fp32) on CPU.
    Each is the best of ``runs`` timings after a warm-up (a peak: noise only ever makes a run slower);
    on CPU the matmul's is also the best over sizes 512, 1024 and 2048 (``matmul_n`` says which): one
    2048^3 matmul ran at a third of 512^3's rate on a shared host, and the CPU scorer, which works in
    cache-sized blocks, then reached 150-170% of that "peak".
    """

    def best_ms(fn: Callable[[], Any]) -> float:
        fn()
        return min(time_ms(fn, device, 1, 0)[0] for _ in range(runs))

    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    # the source is written first: never-touched CPU pages all map the shared zero page, whose reads
    # hit the cache and inflate the "copy bandwidth" peak (and so understate the kernel's fraction of it)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(0x5A)
    dst = torch.empty_like(src)
    ms = best_ms(lambda: dst.copy_(src))
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    tflops, best_n = 0.0, 0
    for n in (8192,) if device.type == "cuda" else (512, 1024, 2048):
        a = torch.randn(n, n, device=device).to(mm_dtype)
        b = torch.randn(n, n, device=device).to(mm_dtype)
        with _no_tf32():  # fp32 in true fp32, as the kernel computes (a caller's TF32 setting inflated the peak)
            rate = 2 * n**3 / (best_ms(lambda a=a, b=b: a @ b) * 1e-3) / 1e12
        if rate > tflops:
            tflops, best_n = rate, n
    return {
        "copy_GBps": 2 * nbytes / (ms * 1e-3) / 1e9,
        "matmul_TFLOPs": tflops,
        "matmul_dtype": str(mm_dtype).removeprefix("torch."),
        "matmul_n": best_n,
    }


def _random_unit(shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen_rows: int = 4096) -> Tensor:
    """Unit-norm random rows ``shape``, generated in blocks so fp32 temporaries stay small."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    for a in range(0, shape[0], gen_rows):
        blk = torch.randn(min(gen_rows, shape[0] - a), *shape[1:], device=device)
        out[a : a + blk.shape[0]] = torch.nn.functional.normalize(blk, dim=-1)
    return out


_OOM_MESSAGES = (
    "out of memory",  # CUDA (torch.OutOfMemoryError, or a RuntimeError from an extension)
    "can't allocate memory",  # CPU: "DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."
    "cannot allocate memory",  # CPU: errno 12 (ENOMEM) text
    "cublas_status_alloc_failed",  # cuBLAS could not allocate its workspace/handle (a RuntimeError, no OOM type)
)


def _is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: CUDA OOM, or the plain RuntimeError the CPU allocator raises."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return any(m in msg for m in _OOM_MESSAGES)


def _maxsim_cpu_version() -> str | None:
    """The installed ``maxsim-cpu`` version (None when absent); it is never imported here (see below)."""
    if importlib.util.find_spec("maxsim_cpu") is None:
        return None
    try:
        return importlib.metadata.version("maxsim-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "importable"


def _backend_name(device: torch.device, backend: str, dtype: torch.dtype) -> str:
    if backend == "triton":
        return "metaembed.kernels.triton_maxsim (Triton)"
    if device.type != "cuda" or backend == "torch":
        return "metaembed.maxsim (chunked PyTorch)"
    from . import kernels

    if kernels.is_available(device):
        return "metaembed.kernels CUDA kernel"
    return f"metaembed.maxsim (chunked PyTorch; kernel unavailable: {kernels.unavailable_reason(device)})"


def run_benchmark(cfg: BenchConfig, on_row: Callable[[dict[str, Any]], None] | None = None,
                  on_start: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able dict (``config``, ``device``, ``peaks``, ``rows``).

    ``on_start(setup)`` receives everything but the rows once the device peaks are measured, and
    ``on_row(row)`` each budget's row as soon as it is measured (a run cut off by a time limit
    keeps its setting and finished rows).
    """
    device = _resolve_device(cfg.device)
    defaults = default_config(str(device))
    D = cfg.D if cfg.D is not None else defaults["D"]
    N = cfg.N if cfg.N is not None else defaults["N"]
    B = cfg.batch_size if cfg.batch_size is not None else defaults["batch_size"]
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}; expected one of {tuple(_DTYPES)}")
    if D < 1 or N < 1 or B < 1 or cfg.runs < 1 or cfg.warmup < 0 or cfg.torch_queries < 1 or cfg.torch_runs < 1 \
            or cfg.triton_runs < 1 or cfg.gemm_runs < 1:
        raise ValueError(f"need D, N, batch size, runs, torch queries/runs >= 1 and warmup >= 0 (got D={D}, N={N}, "
                         f"B={B}, runs={cfg.runs}, warmup={cfg.warmup}, torch_queries={cfg.torch_queries}, "
                         f"torch_runs={cfg.torch_runs}, triton_runs={cfg.triton_runs}, gemm_runs={cfg.gemm_runs})")
    if not cfg.budgets:
        raise ValueError("no budgets given; expected e.g. [(1, 1), (16, 64)]")
    # each a pair of ints >= 1 (GroupError, a ValueError, names the bad one): before the index and peaks, not after
    budgets = [parse_budget(format_budget(b)) for b in cfg.budgets]
    if cfg.agreement and (cfg.agreement_k < 1 or cfg.agreement_fp64_queries < 1):
        # k = 0 would report a vacuous 100% "identical top-0"; 0 fp64 queries fail after the first budget's timings
        raise ValueError(f"need agreement_k and agreement_fp64_queries >= 1 (got {cfg.agreement_k}, "
                         f"{cfg.agreement_fp64_queries}); agreement=False skips the check")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend={cfg.backend!r}; expected one of {BACKENDS}")
    if cfg.backend == "triton" and not _triton_available(device):
        raise ValueError(f"backend='triton' needs Triton on a GPU (or TRITON_INTERPRET=1 on CPU), device {device}")
    if cfg.backend == "cuda":  # fail before minutes of set-up, with the reason
        from . import kernels

        if device.type != "cuda" or not kernels.is_available(device):
            raise ValueError(f"--backend cuda needs the CUDA kernel on a GPU device, but the device is {device}"
                             + ("" if device.type != "cuda" else f" and {kernels.unavailable_reason(device)}"))
    dtype = _DTYPES[cfg.dtype]
    R_q, R_c = max(b[0] for b in budgets), max(b[1] for b in budgets)
    torch.manual_seed(cfg.seed)
    try:
        index = _random_unit((N, R_c, D), dtype, device)  # [N, R_c, D]; budgets read prefixes in place
        queries = _random_unit((B, R_q, D), dtype, device)  # [B, R_q, D]
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        gib = index_memory_bytes(R_c, D, N, dtype_bytes(cfg.dtype)) / GIB
        raise ValueError(f"the {gib:.1f} GiB index [N={N}, R_c={R_c}, D={D}] does not fit on {device}; "
                         f"lower --N or the largest r_c") from None
    peaks = measure_peaks(device, dtype)
    esize = dtype_bytes(cfg.dtype)
    paper_setting = (D, N, B, cfg.dtype) == (PAPER_D, PAPER_N, PAPER_BATCH, "bfloat16")
    mcpu_version = _maxsim_cpu_version() if device.type == "cpu" and cfg.maxsim_cpu else None
    mcpu = _MaxsimCpu(cfg.runs, cfg.warmup) if mcpu_version is not None else None
    scorer = _backend_name(device, cfg.backend, dtype)
    torch_chunked = cfg.torch_chunked if cfg.torch_chunked is not None else scorer.endswith("CUDA kernel")
    use_triton = cfg.triton if cfg.triton is not None else device.type == "cuda" and _triton_available(device)
    use_gemm = cfg.gemm if cfg.gemm is not None else device.type == "cuda"
    setup = {
        "config": {"D": D, "N": N, "batch_size": B, "dtype": cfg.dtype, "R_q": R_q, "R_c": R_c,
                   "runs": cfg.runs, "warmup": cfg.warmup, "seed": cfg.seed, "backend": cfg.backend},
        "device": {"type": device.type, "name": _device_name(device), "torch": torch.__version__,
                   "threads": torch.get_num_threads()},
        "scorer": scorer,
        "peaks": peaks,
        "maxsim_cpu": mcpu_version,
    }
    if on_start is not None:
        on_start(setup)

    def timed(fn: Callable[[], Any]) -> tuple[float, float]:
        return time_ms(fn, device, cfg.runs, cfg.warmup)

    rows = []
    try:
        for r_q, r_c in budgets:
            flops = scoring_flops(r_q, r_c, D, N)
            mem = index_memory_bytes(r_c, D, N, esize)
            row: dict[str, Any] = {"budget": format_budget((r_q, r_c)), "r_q": r_q, "r_c": r_c,
                                   "gflops_per_query": flops / 1e9, "index_gib": mem / GIB}
            s_mean, s_std = timed(lambda r_q=r_q, r_c=r_c: maxsim(queries[:1], index, r_q, r_c, backend=cfg.backend))
            b_mean, b_std = timed(lambda r_q=r_q, r_c=r_c: maxsim(queries, index, r_q, r_c, backend=cfg.backend))
            row.update(single_ms=s_mean, single_ms_std=s_std, batch_ms=b_mean, batch_ms_std=b_std,
                       per_query_ms=b_mean / B, per_query_ms_std=_over(b_std, B))
            row["single_GBps"] = mem / (s_mean * 1e-3) / 1e9
            row["single_bw_frac"] = row["single_GBps"] / peaks["copy_GBps"]
            row["batch_TFLOPs"] = B * flops / (b_mean * 1e-3) / 1e12
            row["batch_flop_frac"] = row["batch_TFLOPs"] / peaks["matmul_TFLOPs"]
            if paper_setting and (r_q, r_c) in PAPER_TABLE3:
                row["paper_ms"] = PAPER_TABLE3[(r_q, r_c)]["latency_ms"]
            row.update(_reference(cfg, device, queries, index, r_q, r_c, timed))
            if row.get("reference_ms") is not None:
                row["speedup_vs_reference"] = row["reference_ms"] / b_mean
            if torch_chunked:
                row.update(_torch_chunked(cfg, device, queries, index, r_q, r_c, row["per_query_ms"]))
            if use_gemm:
                row.update(bare_gemm(cfg, device, queries, index, r_q, r_c, b_mean, flops, peaks))
            if cfg.agreement or use_triton:
                scores = maxsim(queries, index, r_q, r_c, backend=cfg.backend)  # [B, N]
                if cfg.agreement:
                    row.update(agreement(scores, queries, index, r_q, r_c, cfg.agreement_k,
                                         cfg.agreement_fp64_queries))
                if use_triton:
                    row.update(_triton(cfg, device, queries, index, r_q, r_c, scores, flops, peaks))
                del scores
            rows.append(row)
            if on_row is not None:
                on_row(row)
        if mcpu is not None:
            # maxsim-cpu needs the prefix as its own contiguous fp32 array: time metaembed on that input too
            for row in rows:
                docs = index[:, : row["r_c"]].float().contiguous()  # [N, r_c, D]
                q1 = queries[:1, : row["r_q"]].float()  # [1, r_q, D]
                row["single_same_input_ms"], row["single_same_input_ms_std"] = timed(lambda: maxsim(q1, docs))
                del docs
            # maxsim-cpu last: its child's idle worker threads must not share the cores with metaembed's timings
            for row in rows:
                row.update(mcpu(queries, index, row["r_q"], row["r_c"]))
    finally:
        if mcpu is not None:
            mcpu.close()
    return {**setup, "rows": rows}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


MATMUL_WORKSPACE_PER_THREAD = 8 << 20  # CPU GEMM packing buffers (measured ~5 MiB per thread in fp32)
MATMUL_WORKSPACE_CUDA = 64 << 20  # cuBLAS workspace (up to 32 MiB on Hopper)


def reference_bytes(queries: Tensor, index: Tensor, r_q: int, r_c: int) -> int:
    """Upper bound of what ``maxsim_reference(queries, index, r_q, r_c)`` allocates, in bytes.

    It computes in the inputs' promoted dtype (no upcast when both are already in it): the
    similarities ``[B, N, r_q, r_c]`` once (the einsum's matmul output, a view after it), the max
    over ``r_c`` ``[B, N, r_q]``, the scores ``[B, N]``, and the contiguous copy the einsum's
    matmul takes of a budget prefix that is not contiguous (``[B, r_q, D]`` when ``r_q < R_q``,
    ``[N, r_c, D]`` when ``r_c < R_c``) or of an input not already in the promoted dtype; plus
    the matmul's workspace (:data:`MATMUL_WORKSPACE_PER_THREAD` per CPU thread: fp32 CPU GEMMs pack
    ~5 MiB per thread; :data:`MATMUL_WORKSPACE_CUDA` on GPU).
    """
    (B, R_q, D), (N, R_c) = queries.shape, index.shape[:2]
    dt = torch.promote_types(queries.dtype, index.dtype)
    copies = (B * r_q * D if r_q < R_q or queries.dtype != dt else 0) + \
             (N * r_c * D if r_c < R_c or index.dtype != dt else 0)
    workspace = (MATMUL_WORKSPACE_CUDA if index.device.type == "cuda"
                 else MATMUL_WORKSPACE_PER_THREAD * torch.get_num_threads())
    return (B * N * r_q * r_c + B * N * r_q + B * N + copies) * dt.itemsize + workspace


def _reference(cfg: BenchConfig, device: torch.device, queries: Tensor, index: Tensor, r_q: int, r_c: int,
               timed: Callable) -> dict[str, Any]:
    """Time ``maxsim_reference`` on the batch; report OOM or skip above the CPU limit
    (its allocation estimated by :func:`reference_bytes`)."""
    if not cfg.reference:
        return {"reference_ms": None, "reference_status": "disabled"}
    need = reference_bytes(queries, index, r_q, r_c)
    if device.type == "cpu" and need > cfg.reference_limit_gib * GIB:
        return {"reference_ms": None, "reference_status": f"skipped (needs ~{need / GIB:.1f} GiB)"}
    try:
        mean, std = timed(lambda: maxsim_reference(queries, index, r_q, r_c))
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"reference_ms": None, "reference_status": f"OOM (needs ~{need / GIB:.1f} GiB)"}
    return {"reference_ms": mean, "reference_ms_std": std, "reference_status": "ok"}


def _torch_chunked(cfg: BenchConfig, device: torch.device, queries: Tensor, index: Tensor, r_q: int, r_c: int,
                   per_query_ms: float) -> dict[str, Any]:
    """Per-query time of the chunked PyTorch path over the first ``cfg.torch_queries`` queries
    (``cfg.torch_runs`` runs after one warm-up) and the scorer's speed-up over it."""
    nt = min(queries.shape[0], cfg.torch_queries)
    q = queries[:nt]  # [nt, R_q, D]
    mean, std = time_ms(lambda: maxsim(q, index, r_q, r_c, backend="torch"), device, cfg.torch_runs, 1)
    return {"torch_chunked_queries": nt, "torch_chunked_per_query_ms": mean / nt,
            "torch_chunked_per_query_ms_std": _over(std, nt), "speedup_vs_torch_chunked": mean / nt / per_query_ms}


def bare_gemm(cfg: BenchConfig, device: torch.device, queries: Tensor, index: Tensor, r_q: int, r_c: int,
              batch_ms: float, flops: float, peaks: dict[str, Any], out_bytes: int = 1 << 30) -> dict[str, Any]:
    """A bare GEMM of the batch's shape, ``[B*r_q, D] x [D, N*r_c]`` (the FLOPs of Eq. 4 without its
    max / sum), timed like the scorer (``cfg.gemm_runs`` runs after one warm-up) in the matmul dtype
    of :func:`measure_peaks`; and the scorer's speed relative to it (``gemm_ms / batch_ms``: the issue
    asks for >= 0.9).  The candidate operand is the index prefix as one ``[N*r_c, D]`` matrix (a view
    when ``r_c = R_c``, else a copy made before timing); the output, which a scorer never stores, is
    written in column blocks of at most ``out_bytes`` into one reused buffer.
    """
    B, D = queries.shape[0], queries.shape[2]
    N = index.shape[0]
    mm_dtype = queries.dtype if device.type == "cuda" else torch.float32
    try:
        a = queries[:, :r_q].to(mm_dtype).reshape(B * r_q, D)  # [B*r_q, D]
        b = index[:, :r_c].to(mm_dtype).reshape(N * r_c, D)  # [N*r_c, D]: a view when r_c = R_c (same dtype)
        cols = max(1, min(N * r_c, out_bytes // (B * r_q * mm_dtype.itemsize)))
        out = torch.empty(B * r_q, cols, dtype=mm_dtype, device=device)  # [B*r_q, cols]
        tail = N * r_c % cols
        out_tail = torch.empty(B * r_q, tail, dtype=mm_dtype, device=device) if tail else None

        def gemm() -> None:
            for s in range(0, N * r_c, cols):
                e = min(s + cols, N * r_c)
                torch.mm(a, b[s:e].t(), out=out if e - s == cols else out_tail)

        with _no_tf32():  # fp32 GEMMs in true fp32, as the scorer and measure_peaks
            gemm()  # warm-up
            mean, std = time_ms(gemm, device, cfg.gemm_runs, 0)
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"gemm_status": "OOM"}
    tflops = B * flops / (mean * 1e-3) / 1e12
    return {"gemm_status": "ok", "gemm_dtype": str(mm_dtype).removeprefix("torch."), "gemm_batch_ms": mean,
            "gemm_batch_ms_std": std, "gemm_TFLOPs": tflops, "gemm_flop_frac": tflops / peaks["matmul_TFLOPs"],
            "speed_vs_gemm": mean / batch_ms}


def _triton_available(device: torch.device) -> bool:
    from .kernels import triton_maxsim

    return triton_maxsim.is_available(device)


def _triton(cfg: BenchConfig, device: torch.device, queries: Tensor, index: Tensor, r_q: int, r_c: int,
            scores: Tensor, flops: float, peaks: dict[str, Any]) -> dict[str, Any]:
    """The Triton kernel on the batch (``cfg.triton_runs`` runs after one warm-up, which compiles it):
    time, FLOP rate and its largest difference from the scorer's ``scores``."""
    B = queries.shape[0]
    try:
        out = maxsim(queries, index, r_q, r_c, backend="triton")  # [B, N]; also the warm-up
        mean, std = time_ms(lambda: maxsim(queries, index, r_q, r_c, backend="triton"), device, cfg.triton_runs, 0)
    except Exception as e:  # noqa: BLE001  a budget beyond its tile, or Triton's compiler: report, go on
        return {"triton_status": f"error: {type(e).__name__}: {str(e)[:200]}"}
    tflops = B * flops / (mean * 1e-3) / 1e12
    return {"triton_status": "ok", "triton_batch_ms": mean, "triton_batch_ms_std": std,
            "triton_per_query_ms": mean / B, "triton_TFLOPs": tflops,
            "triton_flop_frac": tflops / peaks["matmul_TFLOPs"],
            "triton_max_abs_diff": float((out - scores.float()).abs().max())}


def _blocked_reference(queries: Tensor, index: Tensor, r_q: int, r_c: int, dtype: torch.dtype,
                       block_bytes: int = 1 << 30) -> Tensor:
    """``maxsim_reference`` in ``dtype`` over blocks of ``n`` candidates, each block's similarities
    ``[nq, n, r_q, r_c]`` plus its upcast candidates ``[n, r_c, D]`` within ``block_bytes``."""
    nq, N, D = queries.shape[0], index.shape[0], index.shape[-1]
    q = queries[:, :r_q].to(dtype)  # [nq, r_q, D]
    per_candidate = (nq * r_q * r_c + r_c * D) * (torch.finfo(dtype).bits // 8)
    n = max(1, block_bytes // per_candidate)
    out = torch.empty(nq, N, dtype=dtype, device=queries.device)  # [nq, N]
    for b in range(0, N, n):
        out[:, b : b + n] = maxsim_reference(q, index[b : b + n, :r_c].to(dtype))
    return out


def agreement(scores: Tensor, queries: Tensor, index: Tensor, r_q: int, r_c: int, k: int = 100,
              fp64_queries: int = 8, tie_tol: float = 1e-5) -> dict[str, Any]:
    """The agreement targets: max |score - fp64 reference| over the first ``fp64_queries`` queries,
    and the fraction of queries whose top-``k`` ids (as a set) equal those of an fp32 reference;
    also that fraction when ids swapped across the k-th place within ``tie_tol`` (in the reference's
    scores) count as equal: two correct fp32 summation orders can swap such near-ties.  With
    ``k >= N`` every top-k is the whole index, so the fractions are None (not a vacuous 100%).

    Both references score the same (already rounded) inputs with the plain Eq. 4 formula
    (:func:`maxsim_reference`, in blocks of candidates), so only the scorer's arithmetic is judged.
    """
    n64 = min(fp64_queries, queries.shape[0])
    ref64 = _blocked_reference(queries[:n64], index, r_q, r_c, torch.float64)  # [n64, N]
    err = float((scores[:n64].double() - ref64).abs().max())
    del ref64
    head = {"agree_max_abs_err_fp64": err, "agree_fp64_queries": n64, "agree_tie_tol": tie_tol,
            "agree_queries": int(queries.shape[0])}
    if k >= index.shape[0]:
        return {**head, "agree_k": k, "agree_topk_identical_frac": None, "agree_topk_up_to_ties_frac": None}
    with _no_tf32():
        ref32 = _blocked_reference(queries, index, r_q, r_c, torch.float32)  # [B, N]
    ids = scores.float().topk(k, dim=1).indices.sort(dim=1).values  # [B, k]
    ref_top = ref32.topk(k, dim=1)
    identical = (ids == ref_top.indices.sort(dim=1).values).all(dim=1)  # [B]
    # near-ties: a swapped id whose reference score is within tie_tol of the reference's k-th score
    kth = ref_top.values[:, -1:]  # [B, 1]
    up_to_ties = (ref32.gather(1, ids) >= kth - tie_tol).all(dim=1)  # [B]
    return {**head, "agree_k": k, "agree_topk_identical_frac": float(identical.float().mean()),
            "agree_topk_up_to_ties_frac": float(up_to_ties.float().mean())}


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """fp32 matmuls in true fp32 (TF32 off) inside the block; restores the previous setting."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _maxsim_cpu_child(qs: list[Any], docs: Any, runs: int, warmup: int) -> dict[str, Any]:
    """In a child process: time ``maxsim_cpu.maxsim_scores(query [r_q, D], docs [N, r_c, D]) -> [N]``."""
    import maxsim_cpu

    cpu = torch.device("cpu")
    s_mean, s_std = time_ms(lambda: maxsim_cpu.maxsim_scores(qs[0], docs), cpu, runs, warmup)
    b_mean, _ = time_ms(lambda: [maxsim_cpu.maxsim_scores(q, docs) for q in qs], cpu, runs, warmup)
    return {"maxsim_cpu_single_ms": s_mean, "maxsim_cpu_single_ms_std": s_std,
            "maxsim_cpu_per_query_ms": b_mean / len(qs), "maxsim_cpu_status": "ok"}


class _MaxsimCpu:
    """Runs maxsim-cpu in a spawned child process: a crash of the extension (0.1.0 segfaults for
    D >= 512) is reported in the table instead of killing the benchmark (or a Jupyter kernel)."""

    def __init__(self, runs: int, warmup: int) -> None:
        self.runs, self.warmup = runs, warmup
        self.pool: ProcessPoolExecutor | None = None
        self.crashed: str | None = None

    def __call__(self, queries: Tensor, index: Tensor, r_q: int, r_c: int) -> dict[str, Any]:
        if self.crashed is not None:
            return {"maxsim_cpu_status": self.crashed}
        docs = index[:, :r_c].float().contiguous().numpy()
        qs = [q.float().contiguous().numpy() for q in queries[:, :r_q]]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self.pool.submit(_maxsim_cpu_child, qs, docs, self.runs, self.warmup).result()
        except BrokenProcessPool:
            self.crashed = "crashed"
            self.close()
            return {"maxsim_cpu_status": self.crashed}
        except Exception as e:  # noqa: BLE001  third-party: report, do not fail the benchmark
            return {"maxsim_cpu_status": f"error: {type(e).__name__}: {e}"}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _over(std: float | None, n: int) -> float | None:
    """A batch's std per item (None, one timed run, stays None)."""
    return None if std is None else std / n


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    """``mean ± std`` with ``digits`` decimals, more for a mean below 1 so it keeps 3 significant digits
    (a GPU's per-query 0.00024 ms is not "0.0002 ± 0.0000"); only the mean when there is no spread (one run)."""
    if mean is None:
        return "-"
    if 0 < abs(mean) < 1:
        digits = max(digits, 2 - math.floor(math.log10(abs(mean))))
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


_FRACTIONS = ("single_bw_frac", "batch_flop_frac", "gemm_flop_frac", "triton_flop_frac")


def format_report(result: dict[str, Any]) -> str:
    """Markdown report: setting, measured device peaks and the Table 3-style table."""
    c, d, p = result["config"], result["device"], result["peaks"]
    B = c["batch_size"]
    paper = (c["D"], c["N"], B, c["dtype"]) == (PAPER_D, PAPER_N, PAPER_BATCH, "bfloat16")  # else not Table 3's
    lines = [
        f"## Scoring benchmark ({'Table 3 setting: ' if paper else ''}D={c['D']}, N={c['N']:,}, batch {B:,}, "
        f"{c['dtype']} index, R=({c['R_q']},{c['R_c']}))",
        "",
        f"- device: {d['type']} ({d['name']}), torch {d['torch']}, {d['threads']} threads; scorer: {result['scorer']}",
        f"- measured copy bandwidth (read+write): {p['copy_GBps']:.1f} GB/s; "
        f"{p['matmul_dtype']} matmul ({p['matmul_n']}^3): {p['matmul_TFLOPs']:.3f} TFLOP/s",
        f"- latency: mean ± std over {c['runs']} runs after {c['warmup']} warm-up; '1 query' scans the whole "
        f"index for one query, 'per query' is the batch time / {B}",
        "",
    ]
    rows = result["rows"]
    has_paper = any("paper_ms" in r for r in rows)
    has_mcpu = any("maxsim_cpu_status" in r for r in rows)
    cols = ["budget", "GFLOPs/query", "index GiB", "1 query (ms)", f"batch of {B} (ms)", "per query (ms)"]
    cols += ["1q GB/s (% copy BW)", "batch TFLOP/s (% matmul)", "PyTorch ref, batch (ms)"]
    has_speedup = any("speedup_vs_reference" in r for r in rows) and result["scorer"].endswith("CUDA kernel")
    has_chunked = any("torch_chunked_per_query_ms" in r for r in rows)
    if has_speedup:
        cols += ["× vs ref"]
    if has_chunked:
        nt = next(r["torch_chunked_queries"] for r in rows if "torch_chunked_queries" in r)
        chunked_col = f"chunked PyTorch per query ({nt} q, ms)"
        cols += [chunked_col, "× vs chunked"]
    has_triton = any("triton_status" in r for r in rows)
    if has_triton:
        cols += ["Triton per query (ms)", "Triton TFLOP/s (% matmul)", "Triton max |diff|"]
    has_gemm = any("gemm_status" in r for r in rows)
    if has_gemm:
        cols += ["bare GEMM, batch (ms)", "speed vs bare GEMM"]
    if has_mcpu:
        cols += ["1q, maxsim-cpu's input (ms)", "maxsim-cpu 1q (ms)", "maxsim-cpu per query (ms)"]
    if has_paper:
        cols += ["paper (ms)"]
    table = []
    for r in rows:
        t = {
            "budget": r["budget"],
            "GFLOPs/query": fixed_or_sig(r["gflops_per_query"]),
            "index GiB": fixed_or_sig(r["index_gib"]),
            "1 query (ms)": _pm(r["single_ms"], r["single_ms_std"], 3),
            f"batch of {B} (ms)": _pm(r["batch_ms"], r["batch_ms_std"], 2),
            "per query (ms)": _pm(r["per_query_ms"], r["per_query_ms_std"], 4),
            "1q GB/s (% copy BW)": f"{sig_figures(r['single_GBps'])} ({100 * r['single_bw_frac']:.0f}%)",
            "batch TFLOP/s (% matmul)": f"{sig_figures(r['batch_TFLOPs'])} ({100 * r['batch_flop_frac']:.0f}%)",
            "PyTorch ref, batch (ms)": (_pm(r["reference_ms"], r.get("reference_ms_std"), 2)
                                        if r.get("reference_ms") is not None else r["reference_status"]),
        }
        if has_speedup:
            t["× vs ref"] = f"{r['speedup_vs_reference']:.1f}" if "speedup_vs_reference" in r else "-"
        if has_chunked:
            t[chunked_col] = _pm(r["torch_chunked_per_query_ms"], r["torch_chunked_per_query_ms_std"], 4)
            t["× vs chunked"] = f"{r['speedup_vs_torch_chunked']:.1f}"
        if has_triton:
            ok = r.get("triton_status") == "ok"
            t["Triton per query (ms)"] = (_pm(r["triton_per_query_ms"], _over(r["triton_batch_ms_std"], B), 4) if ok
                                          else r.get("triton_status", "-"))
            t["Triton TFLOP/s (% matmul)"] = (f"{sig_figures(r['triton_TFLOPs'])} ({100 * r['triton_flop_frac']:.0f}%)"
                                              if ok else "-")
            t["Triton max |diff|"] = f"{r['triton_max_abs_diff']:.1e}" if ok else "-"
        if has_gemm:
            ok = r.get("gemm_status") == "ok"
            t["bare GEMM, batch (ms)"] = (_pm(r["gemm_batch_ms"], r["gemm_batch_ms_std"], 2) if ok
                                          else r.get("gemm_status", "-"))
            t["speed vs bare GEMM"] = f"{r['speed_vs_gemm']:.2f}" if ok else "-"
        if has_mcpu:
            ok = r.get("maxsim_cpu_status") == "ok"
            t["1q, maxsim-cpu's input (ms)"] = _pm(r["single_same_input_ms"], r["single_same_input_ms_std"], 3)
            t["maxsim-cpu 1q (ms)"] = (_pm(r["maxsim_cpu_single_ms"], r["maxsim_cpu_single_ms_std"], 3) if ok
                                       else r.get("maxsim_cpu_status", "-"))
            t["maxsim-cpu per query (ms)"] = f"{r['maxsim_cpu_per_query_ms']:.4f}" if ok else "-"
        if has_paper:
            t["paper (ms)"] = f"{r['paper_ms']:.2f}" if "paper_ms" in r else "-"
        table.append(t)
    lines.append(markdown_table(table, cols))
    over = sorted({k for r in rows for k in _FRACTIONS if (r.get(k) or 0) > 1})
    if over:
        lines += ["", f"Fractions above 100% ({', '.join(over)}): the scorer outran the measured peak, a single copy "
                      "or matmul shape that this device beats on others (CPU caches, a busy host); read them as "
                      "relative, not as a fraction of the hardware's limit."]
    if has_gemm:
        lines += ["", "'bare GEMM': [B*r_q, D] x [D, N*r_c] alone (no max / sum) on the same batch; 'speed vs bare GEMM' "
                      "is its time / the scorer's batch time (target >= 0.9 at (16,64), >= 256 queries)."]
    if any("agree_topk_identical_frac" in r for r in rows):
        r0 = next(r for r in rows if "agree_k" in r)
        lines += ["", f"Agreement (targets: max |score - fp64 ref| <= 1e-3 for unit-norm inputs; identical top-"
                      f"{r0['agree_k']} for >= 99.9% of queries vs an fp32 ref):", ""]
        agree = [{"budget": r["budget"],
                  f"max abs err vs fp64 ({r['agree_fp64_queries']} queries)": f"{r['agree_max_abs_err_fp64']:.2e}",
                  f"top-{r['agree_k']} identical to fp32 ref ({r['agree_queries']} queries)":
                      _pct(r["agree_topk_identical_frac"]),
                  f"identical up to ties <= {r['agree_tie_tol']:g}": _pct(r["agree_topk_up_to_ties_frac"])}
                 for r in rows if "agree_k" in r]
        lines.append(markdown_table(agree, list(agree[0])))
    if result.get("maxsim_cpu") is None and d["type"] == "cpu":
        lines += ["", "(maxsim-cpu not importable: `pip install maxsim-cpu` to add it to the comparison)"]
    return "\n".join(lines)


def _pct(frac: float | None) -> str:
    return "n/a (k >= N: the top-k is the whole index)" if frac is None else f"{100 * frac:.1f}%"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``metaembed bench``."""
    parser.add_argument("--D", type=int, default=None,
                        help=f"embedding dim (default: {GPU_DEFAULTS['D']} on GPU, {CPU_DEFAULTS['D']} on CPU)")
    parser.add_argument("--N", type=int, default=None,
                        help=f"candidates (default: {GPU_DEFAULTS['N']} on GPU, {CPU_DEFAULTS['N']} on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, dest="batch_size",
                        help=f"scoring batch of queries (default: {GPU_DEFAULTS['batch_size']} on GPU, "
                             f"{CPU_DEFAULTS['batch_size']} on CPU)")
    parser.add_argument("--budgets", nargs="+", default=None, metavar="RQ,RC",
                        help='budgets, e.g. "1,1 2,4 4,8 8,16 16,64" (default: the paper\'s groups)')
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="index/query dtype")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cuda"),
                        help="metaembed.maxsim backend (cuda: require the kernel)")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain PyTorch reference")
    parser.add_argument("--reference-limit-gib", type=float, default=4.0,
                        help="CPU: skip the reference when it would allocate more (default 4)")
    parser.add_argument("--no-agreement", action="store_true",
                        help="skip the agreement check (scores vs fp64, top-100 vs fp32 references)")
    parser.add_argument("--no-triton", action="store_true", help="GPU: skip the Triton kernel's timings")
    parser.add_argument("--no-gemm", action="store_true",
                        help="GPU: skip the bare GEMM of the batch's shape (the scorer's speed relative to it)")
    parser.add_argument("--torch-queries", type=int, default=64, dest="torch_queries",
                        help="GPU: queries the chunked PyTorch path is timed on (per-query figure; default 64)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the results as JSON ('-': stdout, after the report)")


def run(args: argparse.Namespace) -> int:
    """Run ``metaembed bench``; prints the markdown report."""
    try:
        cfg = BenchConfig(
            D=args.D, N=args.N, batch_size=args.batch_size,
            budgets=parse_budgets(args.budgets) if args.budgets else [tuple(b) for b in DEFAULT_GROUPS],
            dtype=args.dtype, device=args.device, runs=args.runs, warmup=args.warmup, seed=args.seed,
            backend=args.backend, reference=not args.no_reference, reference_limit_gib=args.reference_limit_gib,
            agreement=not args.no_agreement, torch_queries=args.torch_queries,
            triton=False if args.no_triton else None, gemm=False if args.no_gemm else None,
        )
        so_far: dict[str, Any] = {"complete": False, "rows": []}

        def partial(row: dict[str, Any]) -> None:
            print(f"[bench] row: {json.dumps(row)}", file=sys.stderr, flush=True)
            so_far["rows"].append(row)
            if args.json and args.json != "-":  # a run cut short by a time limit still leaves its finished rows
                write_json(so_far, args.json)  # (not on stdout: one JSON document there, after the report)

        def start(setup: dict[str, Any]) -> None:
            so_far.update(setup)
            if args.json and args.json != "-":
                write_json(so_far, args.json)

        result = run_benchmark(cfg, on_row=partial, on_start=start)
    except (ValueError, TypeError) as e:
        print(f"metaembed bench: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        write_json({"complete": True, **result}, args.json)
    return 0


if __name__ == "__main__":  # python -m metaembed.bench == metaembed bench
    from .cli import main

    raise SystemExit(main(["bench", *sys.argv[1:]]))
