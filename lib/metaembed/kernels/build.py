"""Compile ``maxsim.cu`` with nvcc into a cached shared library (no CUDA build of torch needed).

Libraries live at ``<cache>/<source-hash>/<arch>/libmaxsim.so`` where ``<cache>`` is
``$METAEMBED_KERNEL_CACHE`` or ``$XDG_CACHE_HOME/metaembed/kernels`` (default
``~/.cache/metaembed/kernels``) and ``<source-hash>`` covers the source and the compiler flags,
so editing the kernel never loads a stale binary; ``libmaxsim.so.compiler`` records which compiler
built it, and a different compiler rebuilds.  ``$METAEMBED_NVCC`` picks the compiler
(else ``$CUDA_HOME/bin/nvcc``, else ``$CUDA_PATH/bin/nvcc``, else ``nvcc`` on ``PATH``).

    python -m metaembed.kernels                 # compile check for sm_80 and sm_90
    python -m metaembed.kernels --arch sm_90a --out build/kernels
    python -m metaembed.kernels --emulate       # g++ CPU emulation library (tests)

Building needs only nvcc, so it works on CPU-only CI machines.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "BuildError",
    "DEFAULT_ARCHS",
    "EMULATE_ARCH",
    "NVCC_FLAGS",
    "SOURCE",
    "build",
    "build_emulator",
    "cache_root",
    "compiler_id",
    "find_compiler",
    "find_nvcc",
    "library_path",
    "main",
    "normalize_arch",
    "source_hash",
]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "maxsim.cu"
EMULATE_HEADER = HERE / "emulate.cuh"
LIB_NAME = "libmaxsim.so"
DEFAULT_ARCHS: tuple[str, ...] = ("sm_80", "sm_90")
EMULATE_ARCH = "emulate"
NVCC_FLAGS: tuple[str, ...] = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo")
GXX_FLAGS: tuple[str, ...] = (
    "-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-x", "c++", "-DMETAEMBED_EMULATE",
)
COMPILE_TIMEOUT_S = 900

# "sm_90", "90", "compute_90a" (digits) or a compute capability "9.0", "10.0", "12.0a" (major.minor)
_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(?:(\d+)\.(\d)|(\d{2,}))([af]?)$")


class BuildError(RuntimeError):
    """The kernel library could not be compiled (compiler missing or compilation failed)."""


def normalize_arch(arch: str) -> str:
    """``"sm_90"``, ``"90"``, ``"9.0"``, ``"compute_90"`` -> ``"sm_90"``; ``"10.0"`` -> ``"sm_100"``
    (``"sm_90a"`` keeps its suffix)."""
    if not isinstance(arch, str):
        raise ValueError(f"arch must be a string such as 'sm_90', got {arch!r}")
    m = _ARCH_RE.match(arch.strip())
    if m is None:
        raise ValueError(f"arch={arch!r} is not a GPU architecture such as 'sm_80' or 'sm_90'")
    major, minor, digits, suffix = m.groups()
    num = f"{major}{minor}" if digits is None else digits  # "10.0" -> "100", like torch's sm_100
    if int(num) < 80:
        raise ValueError(f"arch={arch!r}: the kernels need sm_80 or newer (bf16 tensor cores, cp.async)")
    return f"sm_{num}{suffix}"


def source_hash(emulate: bool = False) -> str:
    """First 16 hex digits of sha256 over the kernel source(s) and compiler flags."""
    h = hashlib.sha256()
    files = (SOURCE, EMULATE_HEADER) if emulate else (SOURCE,)
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(" ".join(GXX_FLAGS if emulate else NVCC_FLAGS).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """``$METAEMBED_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/metaembed/kernels``, else ``~/.cache/...``."""
    env = os.environ.get("METAEMBED_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "metaembed" / "kernels"


def library_path(arch: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Where the library for ``arch`` (or ``"emulate"``) lives: ``<root>/<hash>/<arch>/libmaxsim.so``."""
    root = Path(out_dir) if out_dir is not None else cache_root()
    if arch == EMULATE_ARCH:
        return root / source_hash(emulate=True) / EMULATE_ARCH / "libmaxsim_emu.so"
    return root / source_hash() / normalize_arch(arch) / LIB_NAME


def find_nvcc() -> str | None:
    """Path of nvcc: ``$METAEMBED_NVCC``, ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``, then ``PATH``; ``None``
    if absent."""
    env = os.environ.get("METAEMBED_NVCC")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_cuobjdump() -> str | None:
    """Path of cuobjdump (reads a cubin's registers, stack and shared memory): beside nvcc, on ``PATH``, else
    the copy bundled in Triton's wheel; ``None`` if none.  Does not import Triton."""
    import importlib.util

    nvcc, on_path = find_nvcc(), shutil.which("cuobjdump")
    cands = [Path(nvcc).resolve().parent / "cuobjdump"] if nvcc else []
    cands += [Path(on_path)] if on_path else []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        cands.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in cands if c.is_file() and os.access(c, os.X_OK)), None)


def find_compiler() -> str | None:
    """A host C++17 compiler for the emulation build (``$CXX``, ``g++``, ``c++``), or ``None``."""
    for cand in (os.environ.get("CXX"), "g++", "c++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _nvcc_command(nvcc: str, arch: str, out: Path) -> list[str]:
    num = arch[3:]
    return [nvcc, *NVCC_FLAGS, f"-gencode=arch=compute_{num},code=sm_{num}", "-o", str(out), str(SOURCE)]


def _gxx_command(cxx: str, out: Path) -> list[str]:
    return [cxx, *GXX_FLAGS, f"-I{HERE}", "-o", str(out), str(SOURCE)]


#: Environment variables nvcc reads flags from (part of :func:`compiler_id`).
_NVCC_ENV_FLAGS = ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS")


def compiler_id(compiler: str) -> str:
    """Resolved path and ``--version`` output of ``compiler``, recorded next to every library it builds.

    A library is reused only when the compiler that would build it now is the one that built it, so
    switching ``$METAEMBED_NVCC`` (e.g. to an older nvcc for an older driver) rebuilds instead of
    loading the previous compiler's binary.
    """
    try:
        res = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"cannot run the compiler {compiler}: {e}") from e
    where = shutil.which(compiler) or compiler  # a bare name ("nvcc") is a PATH lookup, not a cwd file
    # nvcc adds these to every command line: a library built under NVCC_APPEND_FLAGS=-G (a debugging session)
    # was served to later runs without it
    env = "".join(f"{v}={os.environ.get(v, '')}\n" for v in _NVCC_ENV_FLAGS)
    return f"{Path(where).resolve()}\nexit {res.returncode}\n{res.stdout.strip()}\n{env}"


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".compiler")


def _stamp_text(path: Path, cid: str) -> str:
    """What ``path``'s stamp holds: the compiler id and the library's size and sha256."""
    data = path.read_bytes()
    return f"{cid}\nlibrary {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}\n"


def _is_current(path: Path, cid: str) -> bool:
    """``path`` is a non-empty library built by the compiler ``cid`` identifies, byte for byte as it was
    written: a truncated copy (a full disk, a cut-off rsync of the cache) is rebuilt, not loaded (its
    loader dies with SIGBUS, before any error can be raised)."""
    try:
        return path.stat().st_size > 0 and _stamp(path).read_text() == _stamp_text(path, cid)
    except OSError:
        return False


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes do not compile the same library twice."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fh = open(directory / ".lock", "w")
    except OSError as e:
        raise BuildError(
            f"the kernel cache {directory} is not writable ({e}); set METAEMBED_KERNEL_CACHE to a writable "
            "directory or build the libraries there with the same compiler") from e
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_builds(directory: Path) -> None:
    """Delete ``.build.*`` directories older than a compile's timeout: a killed build (SIGKILL, a lost node)
    left its private directory, and often a whole library in it, for good.  Called under the cache lock,
    so no build of this cache is running; the age spares a compiler that outlived its killed parent."""
    now = time.time()
    for old in directory.glob(".build.*"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > COMPILE_TIMEOUT_S:
                shutil.rmtree(old, ignore_errors=True)


def _job(cmd_for: Callable[[Path], list[str]], final: Path, cid: str) -> tuple[list[str], Path, Path, str]:
    """A compile job writing into a fresh private directory next to ``final`` (renamed on success).

    The compiler creates the output file itself, so it gets the usual permissions (a ``mkstemp``
    file would stay 0600 and other users of a shared cache could not load it), and a compiler that
    exits 0 without writing anything leaves no file to install.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".build.", dir=final.parent)) / final.name
    return cmd_for(tmp), tmp, final, cid


def _run_all(jobs: list[tuple[list[str], Path, Path, str]], parallel: int) -> None:
    """Run compile jobs (``parallel`` at a time); each output is renamed into place on success."""
    errors: list[str] = []
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, list[str], Path, Path, str, float]] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                cmd, tmp, final, cid = pending.pop(0)
                try:
                    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                except OSError as e:
                    errors.append(f"cannot run {cmd[0]}: {e}")
                    continue
                running.append((proc, cmd, tmp, final, cid, time.monotonic()))
            if not running:
                continue
            proc, cmd, tmp, final, cid, t0 = running[0]  # stays listed until it has exited (see finally)
            try:
                output, _ = proc.communicate(timeout=max(1.0, COMPILE_TIMEOUT_S - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                errors.append(f"timed out after {COMPILE_TIMEOUT_S} s: {' '.join(cmd)}")
                continue
            finally:
                if proc.returncode is not None:
                    running.pop(0)
            if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
                what = f"exit {proc.returncode}" if proc.returncode != 0 else "exit 0 but no library written"
                errors.append(f"{what}: {' '.join(cmd)}\n{output.strip()}")
                continue
            # the old stamp goes first: interrupted between the renames, a build must leave no stamp (a rebuild),
            # never the new library under the old compiler's stamp (which that compiler would then load as its own)
            _stamp(final).unlink(missing_ok=True)
            os.replace(tmp, final)  # atomic: readers never see a half-written library
            stamp = tmp.with_name("compiler")
            stamp.write_text(_stamp_text(final, cid))
            os.replace(stamp, _stamp(final))
    finally:
        for proc, *_ in running:  # only left on an exception (e.g. Ctrl-C): do not leave compilers behind
            proc.kill()
            proc.wait()
        for _, tmp, _, _ in jobs:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    if errors:
        raise BuildError("kernel compilation failed:\n" + "\n\n".join(errors))


def build(
    archs: Sequence[str] = DEFAULT_ARCHS,
    out_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    nvcc: str | None = None,
    parallel: int | None = None,
) -> list[Path]:
    """Compile ``maxsim.cu`` for each GPU arch; returns the library paths (cached unless ``force``).

    Needs nvcc only (no GPU, no CUDA torch), so it doubles as the CI compile check.  A cached library
    is reused when the same compiler built it (see :func:`compiler_id`); a read-only cache that
    already holds them is used as is.  Raises :class:`BuildError` when nvcc is missing or cannot run,
    a compilation fails (nvcc's output included) or the cache is not writable when a build is needed.
    """
    if isinstance(archs, str):
        archs = (archs,)
    norm = list(dict.fromkeys(normalize_arch(a) for a in archs))
    if not norm:
        raise ValueError("archs must name at least one GPU architecture, e.g. ('sm_80', 'sm_90')")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        env = os.environ.get("METAEMBED_NVCC")
        if env:  # find_nvcc does not fall back past it: say so rather than "put nvcc on PATH"
            raise BuildError(f"nvcc not found: METAEMBED_NVCC={env!r} is not an executable (fix or unset it; unset, "
                             "nvcc is looked up in CUDA_HOME, CUDA_PATH and PATH)")
        raise BuildError("nvcc not found (set METAEMBED_NVCC or CUDA_HOME, or put nvcc on PATH)")
    cid = compiler_id(nvcc)
    paths = [library_path(a, out_dir) for a in norm]
    if not force and all(_is_current(p, cid) for p in paths):
        return paths  # no lock needed, so a read-only cache works
    with _locked(paths[0].parent.parent):
        jobs = [
            _job(lambda out, arch=arch: _nvcc_command(nvcc, arch, out), path, cid)
            for arch, path in zip(norm, paths, strict=True)
            if force or not _is_current(path, cid)  # checked again: another process may have built it
        ]
        _run_all(jobs, parallel if parallel is not None else min(len(jobs), os.cpu_count() or 1))
    return paths


def build_emulator(out_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Compile the CPU emulation library (``emulate.cuh``, g++) used by the tests; returns its path."""
    cxx = find_compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found for the emulation build (set CXX or install g++)")
    cid = compiler_id(cxx)
    path = library_path(EMULATE_ARCH, out_dir)
    if not force and _is_current(path, cid):
        return path
    with _locked(path.parent.parent):
        if force or not _is_current(path, cid):
            _run_all([_job(lambda out: _gxx_command(cxx, out), path, cid)], 1)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metaembed.kernels.build``: compile (check) the kernels, print paths and timings."""
    ap = argparse.ArgumentParser(prog="python -m metaembed.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", dest="archs", metavar="SM",
                    help="GPU architecture (repeatable; default: sm_80 and sm_90)")
    ap.add_argument("--out", default=None, help="output root instead of the cache")
    ap.add_argument("--force", action="store_true", help="recompile even when cached")
    ap.add_argument("--emulate", action="store_true", help="build the g++ CPU emulation library instead")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.emulate:
            paths = [build_emulator(args.out, force=args.force)]
        else:
            paths = build(tuple(args.archs or DEFAULT_ARCHS), args.out, force=args.force)
    except (BuildError, ValueError) as e:
        print(f"metaembed.kernels.build: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    print(f"built {len(paths)} librar{'y' if len(paths) == 1 else 'ies'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
