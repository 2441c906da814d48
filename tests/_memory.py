"""Peak resident memory of one call, for tests that an operation holds its output about once (Linux only).

Not a speed or memory *target* (those are benchmark scripts): a guard that a structural property -- no
second full copy of an embedding tensor -- survives refactors.  Sizes are chosen so that one extra copy
moves the ratio well past the tests' limits.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
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


_CHILD = """
import importlib, json, sys
import pytest, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
module, function = sys.argv[3].split(":")
try:
    grew = getattr(importlib.import_module(module), function)(*json.loads(sys.argv[4]))
except pytest.skip.Exception as e:
    print("SKIP", e)
else:
    print("GREW", int(grew))
"""


def peak_rss_growth_in_fresh_process(target: str, *args: Any, threads: int = 2) -> int:
    """Peak RSS growth (bytes) that ``target`` -- ``"test_module:function"``, a function of a module in tests/
    that measures with :func:`peak_rss_growth` (and checks its results) -- returns when run in a fresh
    interpreter at ``threads`` torch threads; skips the test when the child skips.

    In the test process the growth depends on the host and on the tests that ran before: glibc reuses free
    heap chunks earlier tests left before it maps new blocks (84-126 MiB instead of 40 for one test), and
    torch's CPU kernels hold per-thread buffers (CI's many-core runner failed a test measured in-process).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", _CHILD, here, str(threads), target, json.dumps(list(args))],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, f"{target} failed in its own process:\n{run.stderr[-3000:]}"
    kind, _, value = run.stdout.strip().splitlines()[-1].partition(" ")
    if kind == "SKIP":
        pytest.skip(value)
    return int(value)
