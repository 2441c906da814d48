"""Peak resident memory of one call, for tests that an operation holds its output about once (Linux only).

Not a speed or memory *target* (those are benchmark scripts): a guard that a structural property -- no
second full copy of an embedding tensor -- survives refactors.  Sizes are chosen so that one extra copy
moves the ratio well past the tests' limits.
"""
from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from typing import Any

import pytest

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_GLIBC_DEFAULT_THRESHOLD = 128 * 2**10


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_rss_growth(fn: Callable[[], Any], repeat: int = 2) -> tuple[Any, int]:
    """``(fn(), peak RSS growth in bytes while it ran)``, the smallest growth over ``repeat`` calls; skips the
    test where the kernel's high-water mark cannot be reset (``/proc/self/clear_refs``) or glibc is not the
    allocator.

    The high-water mark is the whole process's: a first call's lazy imports and thread pools, or another
    thread allocating meanwhile (left over from an earlier test), add to it.  The minimum over two calls
    keeps the structural measure (a second full copy shows in every call) without that noise.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError) as e:
        pytest.skip(f"cannot measure peak RSS here: {e}")
    # blocks >= 1 MiB are mapped and unmapped when freed, so RSS follows the live tensors
    libc.mallopt(_M_MMAP_THRESHOLD, 2**20)
    try:
        out, grew = None, None
        for _ in range(repeat):
            out = None  # the previous call's result is not part of this call's growth
            gc.collect()
            libc.malloc_trim(0)  # hand freed heap memory back first: it would hide new allocations
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            base = _status("VmRSS:")
            out = fn()
            g = _status("VmHWM:") - base
            grew = g if grew is None else min(grew, g)
        return out, grew
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
