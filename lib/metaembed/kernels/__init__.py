"""CUDA kernels for MetaEmbed scoring (Eq. 3-4), compiled with nvcc and loaded with ctypes.

* :func:`maxsim_cuda` — ``[nq, R_q, D] x [N, R_c, D] -> [nq, N]`` fp32 for any budget ``(r_q, r_c)``;
  :func:`maxsim_topk_cuda` adds a top-k pass.
* :func:`is_available` — CUDA device present and the library builds/loads for its architecture.
* :func:`build` — compile check for given architectures (works without a GPU; needs nvcc).

Importing this package is cheap: it compiles nothing and imports torch only when an op is first
used, so ``python -m metaembed.kernels`` (the build CLI) runs on machines without torch.  The first
:func:`is_available` / :func:`maxsim_cuda` call builds the library (seconds, cached).
See ``README.md`` in this folder.
"""
from __future__ import annotations

import importlib
from typing import Any

# Eager and torch-free.  Binding the function here also makes ``metaembed.kernels.build`` the
# function (the submodule stays reachable as sys.modules["metaembed.kernels.build"]).
from .build import DEFAULT_ARCHS, BuildError, build, build_emulator, cache_root, find_nvcc, library_path

_EXPORTS = {
    "KernelError": "ffi",
    "KernelLibrary": "ffi",
    "KernelPlan": "ffi",
    "launch_maxsim": "ffi",
    "current_arch": "ops",
    "is_available": "ops",
    "kernel_plan": "ops",
    "load_library": "ops",
    "maxsim_cuda": "ops",
    "maxsim_topk_cuda": "ops",
    "unavailable_reason": "ops",
}

__all__ = [
    "DEFAULT_ARCHS",
    "BuildError",
    "KernelError",
    "KernelLibrary",
    "KernelPlan",
    "build",
    "build_emulator",
    "cache_root",
    "current_arch",
    "find_nvcc",
    "is_available",
    "kernel_plan",
    "launch_maxsim",
    "library_path",
    "load_library",
    "maxsim_cuda",
    "maxsim_topk_cuda",
    "unavailable_reason",
]


def __getattr__(name: str) -> Any:  # PEP 562: lazy, so the build CLI needs no torch
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
