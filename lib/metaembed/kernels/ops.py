"""Public CUDA scoring ops: Eq. 4 MaxSim on the GPU and its top-k, built and loaded on first use.

``is_available()`` is True when torch sees a CUDA device and ``libmaxsim.so`` for its architecture
builds (or is cached) and loads.  ``$METAEMBED_KERNEL_LIB`` points at a prebuilt library instead;
``$METAEMBED_DISABLE_KERNELS=1`` turns the kernels off (``metaembed.maxsim`` then uses PyTorch).
"""
from __future__ import annotations

import os
import threading

import torch
from torch import Tensor

from ..groups import validate_budget
from .build import BuildError, build, normalize_arch
from .ffi import ALGOS, DTYPE_CODES, KernelError, KernelLibrary, KernelPlan, check_operands, launch_maxsim

__all__ = [
    "current_arch",
    "is_available",
    "kernel_plan",
    "load_library",
    "maxsim_cuda",
    "maxsim_topk_cuda",
    "unavailable_reason",
]

_lock = threading.Lock()
_libraries: dict[str, KernelLibrary] = {}
_failures: dict[str, str] = {}


def current_arch(device: torch.device | int | None = None) -> str:
    """``"sm_XY"`` of a CUDA device (default: the current one)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _library_key(device: torch.device | int | None) -> str:
    """What a loaded library (or its failure) is remembered by: the architecture of ``device``, also for a
    prebuilt ``$METAEMBED_KERNEL_LIB`` (built for one architecture: probed on one GPU of a machine mixing
    architectures, its answer was reused for the others)."""
    override = os.environ.get("METAEMBED_KERNEL_LIB")
    if not override:
        return current_arch(device)
    try:
        return f"{override}@{current_arch(device)}"
    except (RuntimeError, AssertionError, ValueError):  # the architecture cannot be read: the library's probe says why
        return override


def load_library(device: torch.device | int | None = None) -> KernelLibrary:
    """The kernel library for ``device``'s architecture, compiling it with nvcc on first use.

    Raises :class:`~metaembed.kernels.build.BuildError` (no nvcc / compile error) or
    :class:`~metaembed.kernels.ffi.KernelError` (cannot load or run on this device).
    """
    override = os.environ.get("METAEMBED_KERNEL_LIB")
    key = _library_key(device)
    with _lock:
        if key in _libraries:
            return _libraries[key]
        if override:
            lib = KernelLibrary(override)
        else:
            (path,) = build((normalize_arch(key),))
            lib = KernelLibrary(path)
        # probe on ``device``, whose architecture the library is built for: the library runtime probes its
        # current device, so on a machine mixing GPU architectures a probe on another GPU failed and ruled the
        # kernels out for ``device`` for good
        with torch.cuda.device(device):
            lib.probe()
        _libraries[key] = lib
        return lib


def _disabled() -> bool:
    return os.environ.get("METAEMBED_DISABLE_KERNELS", "").strip().lower() in {"1", "true", "yes", "on"}


def is_available(device: torch.device | int | None = None) -> bool:
    """True when the CUDA kernels can run on ``device`` (builds the library once if needed)."""
    if _disabled() or not torch.cuda.is_available():
        return False
    try:
        key = _library_key(device)
    except (RuntimeError, AssertionError, ValueError):
        return False
    if key in _failures:
        return False
    try:
        load_library(device)
    except (BuildError, KernelError, ValueError, OSError) as e:
        _failures[key] = f"{type(e).__name__}: {e}"
        return False
    return True


def unavailable_reason(device: torch.device | int | None = None) -> str | None:
    """Why :func:`is_available` is False (``None`` when the kernels are usable)."""
    if _disabled():
        return "disabled by METAEMBED_DISABLE_KERNELS"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    try:  # is_available() is False for a device whose architecture cannot be read: say so, do not raise
        key = _library_key(device)
    except (RuntimeError, AssertionError, ValueError) as e:
        return f"cannot read the architecture of CUDA device {device!r}: {type(e).__name__}: {e}"
    if is_available(device):
        return None
    return _failures.get(key, "unknown")


def _prepare(queries: Tensor, candidates: Tensor, r_q: int | None, r_c: int | None) -> tuple[Tensor, int, int]:
    """Validate shapes/dtypes/budget; returns queries in the index dtype and the resolved budget."""
    check_operands(queries, candidates)
    for t, name in ((queries, "queries"), (candidates, "candidates")):
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported; expected one of {list(DTYPE_CODES)}")
    R_q, R_c = queries.shape[1], candidates.shape[1]
    r_q, r_c = validate_budget((R_q if r_q is None else r_q, R_c if r_c is None else r_c), R_q, R_c)
    if queries.dtype != candidates.dtype:  # the index dtype wins; queries are small
        queries = queries.to(candidates.dtype)
    return queries, r_q, r_c


def maxsim_cuda(queries: Tensor, candidates: Tensor, r_q: int | None = None, r_c: int | None = None, *,
                algo: str = "auto", tile_m: int = 0, library: KernelLibrary | None = None) -> Tensor:
    """Eq. 4 on the GPU: ``queries [nq, R_q, D]``, ``candidates [N, R_c, D]`` -> scores ``[nq, N]`` fp32.

    bf16 / fp16 / fp32 inputs, any strides (the prefix ``[:, :r_c]`` is read in place), fp32
    accumulation.  Queries are cast to the candidates' dtype when they differ.  ``algo``:
    ``"auto"`` (tensor cores for 16-bit inputs, SIMT for fp32), ``"simt"`` or ``"tensor_core"``;
    ``tile_m`` 0 (auto), 16 (few queries, streams the index once) or 64 (many queries).
    ``library``: a specific loaded library, e.g. the CPU emulation build (then CPU tensors).
    The kernel has no backward: inputs that require grad (grad mode on) are an error, not
    scores without an autograd graph (:func:`metaembed.maxsim` takes the torch path for them).
    """
    check_operands(queries, candidates)  # a TypeError for non-tensors, before reading .requires_grad
    if torch.is_grad_enabled() and (queries.requires_grad or candidates.requires_grad):
        raise RuntimeError("maxsim_cuda has no backward but the inputs require grad; use metaembed.maxsim "
                           "(differentiable torch path) or score under torch.no_grad()")
    queries, r_q, r_c = _prepare(queries, candidates, r_q, r_c)
    emulated = library is not None and library.emulated
    if emulated and candidates.device.type != "cpu":
        raise ValueError(f"the emulation library takes CPU tensors, got {candidates.device}")
    if not emulated and not candidates.is_cuda:
        raise ValueError(f"maxsim_cuda needs CUDA tensors, got {candidates.device}")
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r}; expected one of {tuple(ALGOS)}")
    lib = library if library is not None else load_library(candidates.device)
    return launch_maxsim(lib, queries, candidates, r_q, r_c, algo=algo, tile_m=tile_m)


def maxsim_topk_cuda(queries: Tensor, candidates: Tensor, k: int, r_q: int | None = None,
                     r_c: int | None = None, **kwargs) -> tuple[Tensor, Tensor]:
    """Top-``k`` candidates per query: ``(scores [nq, k'], ids [nq, k'])``, ``k' = min(k, N)``.

    Scores come from :func:`maxsim_cuda`; the selection is a separate pass (sorted, descending;
    equal scores keep the lower id, as :meth:`MultiVectorIndex.search`, where a bare ``torch.topk``
    picks and orders ties arbitrarily).  ``ids`` are row positions in ``candidates`` (int64).
    """
    from ..index import _topk_stable

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    scores = maxsim_cuda(queries, candidates, r_q, r_c, **kwargs)  # [nq, N]
    return _topk_stable(scores, min(k, scores.shape[1]))  # ([nq, k'], [nq, k'])


def kernel_plan(queries: Tensor, candidates: Tensor, r_q: int | None = None, r_c: int | None = None, *,
                algo: str = "auto", tile_m: int = 0, library: KernelLibrary | None = None) -> KernelPlan:
    """Which kernel variant (engine, tile, vectorised loads, grid) a call would use."""
    queries, r_q, r_c = _prepare(queries, candidates, r_q, r_c)
    if library is None and not candidates.is_cuda:  # load_library would ask torch.cuda about a CPU tensor
        raise ValueError(f"kernel_plan needs CUDA tensors (or an emulation library), got {candidates.device}")
    lib = library if library is not None else load_library(candidates.device)
    return lib.plan(queries, candidates, r_q, r_c, algo=algo, tile_m=tile_m)
