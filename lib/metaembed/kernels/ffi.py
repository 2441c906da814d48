"""ctypes binding of the C ABI in ``maxsim.cu`` (raw pointers, sizes, strides, a stream).

:class:`KernelLibrary` wraps one loaded ``libmaxsim.so`` (or the CPU emulation build) and
:func:`launch_maxsim` turns torch tensors into one ``metaembed_maxsim`` call: the prefix
budget ``(r_q, r_c)`` and any strides are passed through, so the index is never copied.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ABI_VERSION", "DTYPE_CODES", "ALGOS", "KernelError", "KernelLibrary", "KernelPlan", "launch_maxsim"]

#: Must equal METAEMBED_ABI_VERSION in maxsim.cu.
ABI_VERSION = 1
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Inner-product engines: auto = tensor cores for 16-bit inputs, SIMT for fp32.
ALGOS = {"auto": 0, "simt": 1, "tensor_core": 2}
TILES = (0, 16, 64)

_i64 = ctypes.c_int64
_int = ctypes.c_int
_ptr = ctypes.c_void_p


class KernelError(RuntimeError):
    """The kernel library rejected a call or a CUDA error occurred."""


@dataclass(frozen=True)
class KernelPlan:
    """Which kernel variant a call uses (``metaembed_plan``)."""

    algo: str
    tile_m: int
    tile_n: int
    vectorized: bool
    row_tiles: int
    col_tiles: int
    group_rows: int
    split: bool
    rows_per_query: int  # pq: r_q padded to a power of two (or tile_m when a query spans row tiles)
    cols_per_candidate: int  # pc: r_c padded to a power of two (or tile_n)
    col_chunks: int  # r_c > tile_n: candidate vectors processed in chunks with a running max


class KernelLibrary:
    """A loaded ``libmaxsim.so``; ``emulated`` libraries take host (CPU) pointers."""

    def __init__(self, path: str | os.PathLike, emulated: bool = False):
        self.path = Path(path)
        self.emulated = emulated
        try:
            self._lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise KernelError(f"cannot load kernel library {self.path}: {e}") from e
        lib = self._lib
        try:  # a missing symbol (another .so, e.g. a wrong $METAEMBED_KERNEL_LIB) is a KernelError, not AttributeError
            lib.metaembed_abi_version.restype = _int
            lib.metaembed_abi_version.argtypes = []
            abi = lib.metaembed_abi_version()
            if abi != ABI_VERSION:
                raise KernelError(f"{self.path} has ABI version {abi}, this binding expects {ABI_VERSION}; "
                                  "rebuild it")
            lib.metaembed_error_string.restype = ctypes.c_char_p
            lib.metaembed_error_string.argtypes = [_int]
            lib.metaembed_probe.restype = _int
            lib.metaembed_probe.argtypes = []
            lib.metaembed_plan.restype = _int
            lib.metaembed_plan.argtypes = [_int, _ptr, _ptr] + [_i64] * 11 + [_int, _int, ctypes.POINTER(_i64)]
            lib.metaembed_maxsim.restype = _int
            lib.metaembed_maxsim.argtypes = [_int, _ptr, _ptr, _ptr] + [_i64] * 12 + [_int, _int, _int, _ptr]
        except AttributeError as e:
            raise KernelError(f"{self.path} is not a metaembed kernel library ({e})") from e

    def error_string(self, code: int) -> str:
        """Human-readable message for a status code."""
        return self._lib.metaembed_error_string(int(code)).decode(errors="replace")

    def probe(self) -> None:
        """Raise :class:`KernelError` unless a CUDA device can run this library's kernels."""
        code = self._lib.metaembed_probe()
        if code != 0:
            raise KernelError(f"{self.path.name} cannot run here: {self.error_string(code)} (code {code})")

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise KernelError(f"{what} failed: {self.error_string(code)} (code {code})")

    def plan(self, queries: Tensor, candidates: Tensor, r_q: int, r_c: int, algo: str = "auto",
             tile_m: int = 0) -> KernelPlan:
        """The kernel variant :func:`launch_maxsim` would run for these arguments."""
        args = _arguments(queries, candidates, r_q, r_c, algo, tile_m)
        info = (_i64 * 11)()
        self._check(self._lib.metaembed_plan(*args["head"], *args["sizes"], *args["strides"],
                                             args["algo"], args["tile_m"], info), "metaembed_plan")
        v = list(info)
        return KernelPlan(algo={1: "simt", 2: "tensor_core"}[v[0]], tile_m=v[1], tile_n=v[2],
                          vectorized=bool(v[3]), row_tiles=v[4], col_tiles=v[5], group_rows=v[6],
                          split=bool(v[7]), rows_per_query=v[8], cols_per_candidate=v[9], col_chunks=v[10])

    def maxsim(self, queries: Tensor, candidates: Tensor, r_q: int, r_c: int, out: Tensor, *, algo: str = "auto",
               tile_m: int = 0, stream: int = 0) -> None:
        """One ``metaembed_maxsim`` call writing ``out [nq, N]`` (fp32, row-contiguous)."""
        args = _arguments(queries, candidates, r_q, r_c, algo, tile_m)
        want = "cpu" if self.emulated else "cuda"  # the pointers are dereferenced there (host code / the GPU)
        if candidates.device.type != want:
            raise ValueError(f"{'the emulation library' if self.emulated else self.path.name} takes {want} tensors, "
                             f"got {candidates.device}")
        nq, N = queries.shape[0], candidates.shape[0]
        if not isinstance(out, Tensor) or out.dtype != torch.float32 or out.dim() != 2 or tuple(out.shape) != (nq, N):
            raise ValueError(f"out must be a float32 tensor of shape [nq={nq}, N={N}], got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
        if out.device != candidates.device or (N > 1 and out.stride(1) != 1) or (nq > 1 and out.stride(0) < N):
            raise ValueError(f"out must live on {candidates.device} with unit column stride and row stride >= N "
                             f"(got {out.device}, strides {tuple(out.stride())})")
        device = -1 if self.emulated or out.device.type != "cuda" else out.device.index
        # one row: its stride is never used (torch gives a contiguous [1, N] view such as ``[N, 1].t()`` the
        # row stride 1, which the C side, needing ldo >= N, refused)
        ldo = out.stride(0) if nq > 1 else N
        code = self._lib.metaembed_maxsim(args["head"][0], args["head"][1], args["head"][2], _ptr(out.data_ptr()),
                                          *args["sizes"], *args["strides"], ldo, args["algo"],
                                          args["tile_m"], device, _ptr(stream or None))
        self._check(code, "metaembed_maxsim")


def check_operands(queries: Tensor, candidates: Tensor) -> None:
    """TypeError / ValueError unless both are 3-D tensors ``[n, R, D]`` with one ``D`` on one device."""
    for t, name in ((queries, "queries"), (candidates, "candidates")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [n, R, D], got shape {tuple(t.shape)}")
    if queries.shape[2] != candidates.shape[2]:
        raise ValueError(f"embedding dims differ: queries D={queries.shape[2]}, candidates D={candidates.shape[2]}")
    if queries.device != candidates.device:
        raise ValueError(f"queries are on {queries.device} but candidates are on {candidates.device}")


def _arguments(queries: Tensor, candidates: Tensor, r_q: int, r_c: int, algo: str, tile_m: int) -> dict:
    """Raw C arguments, checked so that no call can read outside the tensors (same D, device, dtype;
    ``1 <= r_q <= R_q``, ``1 <= r_c <= R_c``)."""
    check_operands(queries, candidates)
    for r, R, name in ((r_q, queries.shape[1], "r_q"), (r_c, candidates.shape[1], "r_c")):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= R:
            raise ValueError(f"{name}={r!r} must be an int in [1, {R}] (the stored vectors per item)")
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r}; expected one of {tuple(ALGOS)}")
    if tile_m not in TILES:
        raise ValueError(f"tile_m={tile_m!r}; expected one of {TILES} (0 = automatic)")
    if candidates.dtype not in DTYPE_CODES or queries.dtype != candidates.dtype:
        raise TypeError(f"kernel dtypes must match and be one of {list(DTYPE_CODES)}, "
                        f"got queries {queries.dtype}, candidates {candidates.dtype}")
    nq, N, D = queries.shape[0], candidates.shape[0], queries.shape[2]
    return {
        "head": (DTYPE_CODES[candidates.dtype], _ptr(queries.data_ptr() or None),
                 _ptr(candidates.data_ptr() or None)),
        "sizes": (nq, N, r_q, r_c, D),
        "strides": (*queries.stride(), *candidates.stride()),
        "algo": ALGOS[algo],
        "tile_m": tile_m,
    }


def launch_maxsim(lib: KernelLibrary, queries: Tensor, candidates: Tensor, r_q: int, r_c: int, *,
                  algo: str = "auto", tile_m: int = 0) -> Tensor:
    """Eq. 4 scores ``[nq, N]`` fp32 from one kernel call on the tensors' device (CPU if emulated).

    Arguments are assumed validated (3-D, same D and dtype, ``1 <= r_q <= R_q``, ``1 <= r_c <= R_c``).
    """
    nq, N = queries.shape[0], candidates.shape[0]
    out = torch.empty(nq, N, dtype=torch.float32, device=candidates.device)  # [nq, N]
    if nq == 0 or N == 0:
        return out
    if queries.shape[2] == 0:
        return out.zero_()
    stream = 0
    if candidates.is_cuda:
        with torch.cuda.device(candidates.device):
            stream = torch.cuda.current_stream(candidates.device).cuda_stream
    lib.maxsim(queries, candidates, r_q, r_c, out, algo=algo, tile_m=tile_m, stream=stream)
    return out
