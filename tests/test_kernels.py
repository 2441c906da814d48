"""metaembed.kernels: nvcc compile check, CPU emulation of the CUDA kernel, GPU tests (marked gpu).

Without a GPU the kernel source itself is exercised through the g++ emulation build
(``emulate.cuh``): same tiling, pipelining, padding and fused epilogue, threads run as fibers.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from metaembed import kernels
from metaembed.groups import GroupError
from metaembed.kernels.ffi import KernelError, KernelLibrary
from metaembed.kernels.selfcheck import (
    EMULATOR_CASES,
    GPU_CASES,
    Case,
    make_inputs,
    reference_scores,
    run_case,
)

kbuild = importlib.import_module("metaembed.kernels.build")  # the module (kernels.build is the function)

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
TOL = 1e-3


# ---------------------------------------------------------------------------------------------
# build / cache (no compiler needed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("sm_90", "sm_90"), ("90", "sm_90"), ("8.0", "sm_80"),
                                       ("compute_86", "sm_86"), ("sm_90a", "sm_90a")])
def test_normalize_arch(text, want):
    assert kbuild.normalize_arch(text) == want


def test_the_build_cli_runs_as_documented_without_torch_or_warnings(tmp_path):
    """``python -m metaembed.kernels`` (kernels README) compiles with the standard library alone: a machine that
    only compiles has no torch.  ``from metaembed.kernels import build`` stays the function."""
    blocker = tmp_path / "torch"  # an importable "torch" that fails, first on the path
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('torch must not be imported by the build CLI')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "lib")]),
           "METAEMBED_NVCC": str(tmp_path / "no-nvcc")}
    res = subprocess.run([sys.executable, "-W", "error", "-m", "metaembed.kernels", "--arch", "sm_90", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1 and "nvcc not found" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert kernels.build is kbuild.build and callable(kernels.build)


@pytest.mark.parametrize("bad", ["sm_70", "ampere", "", "sm_"])
def test_normalize_arch_rejects(bad):
    with pytest.raises(ValueError, match="arch"):
        kbuild.normalize_arch(bad)


@pytest.mark.parametrize("text,want", [("10.0", "sm_100"), ("12.0", "sm_120"), ("10.3", "sm_103"),
                                       ("12.0a", "sm_120a"), ("9.0a", "sm_90a"), ("7.5", None), ("sm_8", None)])
def test_normalize_arch_accepts_compute_capability_10_and_up(text, want):
    """Compute capabilities as torch / TORCH_CUDA_ARCH_LIST write them: "10.0" is sm_100 (Blackwell), as "9.0"
    is sm_90, not "not a GPU architecture"."""
    if want is None:
        with pytest.raises(ValueError, match="arch"):
            kbuild.normalize_arch(text)
    else:
        assert kbuild.normalize_arch(text) == want


def test_library_path_keyed_by_hash_and_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("METAEMBED_KERNEL_CACHE", str(tmp_path / "cache"))
    p80, p90 = kbuild.library_path("sm_80"), kbuild.library_path("sm_90")
    assert p80.parent.name == "sm_80" and p90.parent.name == "sm_90"
    assert p80.parent.parent == p90.parent.parent  # same source hash
    assert p80.parent.parent.name == kbuild.source_hash()
    assert p80.name == "libmaxsim.so" and p80.is_relative_to(tmp_path / "cache")
    assert kbuild.library_path("sm_90", tmp_path / "out").is_relative_to(tmp_path / "out")
    assert kbuild.source_hash() != kbuild.source_hash(emulate=True)


def test_build_without_nvcc_raises_build_error(tmp_path, monkeypatch):
    monkeypatch.setenv("METAEMBED_NVCC", str(tmp_path / "no-such-nvcc"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(kbuild.BuildError, match="nvcc not found"):
        kbuild.build(("sm_90",), tmp_path)


def test_a_stale_metaembed_nvcc_is_named_and_nvcc_env_flags_key_the_cache(tmp_path, monkeypatch):
    """A METAEMBED_NVCC naming no file said "put nvcc on PATH" (nvcc may be on PATH: the variable is the fault);
    NVCC_APPEND_FLAGS / NVCC_PREPEND_FLAGS, which nvcc adds to every command, were not part of the cache key, so
    a library built under NVCC_APPEND_FLAGS=-G was served to later runs (a review helper)."""
    monkeypatch.setenv("METAEMBED_NVCC", str(tmp_path / "gone" / "nvcc"))
    with pytest.raises(kbuild.BuildError, match=r"METAEMBED_NVCC='.*gone/nvcc' is not an executable \(fix or unset"):
        kbuild.build(("sm_90",), tmp_path)
    monkeypatch.delenv("NVCC_APPEND_FLAGS", raising=False)
    monkeypatch.delenv("NVCC_PREPEND_FLAGS", raising=False)
    plain = kbuild.compiler_id(sys.executable)
    for var in ("NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS"):
        monkeypatch.setenv(var, "-G")
        assert kbuild.compiler_id(sys.executable) != plain, var
        monkeypatch.delenv(var)
    assert kbuild.compiler_id(sys.executable) == plain


def test_compile_error_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'maxsim.cu(1): error: broken on purpose' >&2\nexit 2\n")
    fake.chmod(0o755)
    with pytest.raises(kbuild.BuildError, match="broken on purpose"):
        kbuild.build(("sm_80",), tmp_path / "out", nvcc=str(fake))
    assert not list((tmp_path / "out").rglob("*.so"))  # nothing half-written is left as a library


def _fake_compiler(path: Path, tag: str, *, write: bool = True) -> str:
    """A stand-in nvcc that answers ``--version`` with ``tag`` and writes ``tag`` to its ``-o`` file."""
    body = f'printf {tag} > "$out"\n' if write else ""
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "fake compiler {tag}"; exit 0; fi\n'
        'while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done\n' + body)
    path.chmod(0o755)
    return str(path)


def test_other_compiler_rebuilds_same_compiler_reuses(tmp_path):
    cc_a, cc_b = _fake_compiler(tmp_path / "nvcc_a", "A"), _fake_compiler(tmp_path / "nvcc_b", "B")
    (lib,) = kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc_a)
    assert lib.read_text() == "A"
    (again,) = kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc_b)  # e.g. an older nvcc for an older driver
    assert again == lib and lib.read_text() == "B"
    mtime = lib.stat().st_mtime_ns
    kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc_b)
    assert lib.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in lib.parent.iterdir()) == ["libmaxsim.so", "libmaxsim.so.compiler"]


def test_a_killed_builds_directory_is_removed_by_the_next_build(tmp_path):
    """A build killed outright (SIGKILL: no finally runs) left its private ``.build.*`` directory, with the
    library its compiler finished writing, in the cache for good (a review helper).  The next build removes
    those older than a compile's timeout, under the lock; a younger one may still have a compiler writing."""
    cc_a, cc_b = _fake_compiler(tmp_path / "nvcc_a", "A"), _fake_compiler(tmp_path / "nvcc_b", "B")
    (lib,) = kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc_a)
    dead, young = lib.parent / ".build.dead", lib.parent / ".build.young"
    for d in (dead, young):
        d.mkdir()
        (d / lib.name).write_text("orphan")
    old = time.time() - kbuild.COMPILE_TIMEOUT_S - 60
    os.utime(dead, (old, old))
    kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc_b)
    assert not dead.exists() and (young / lib.name).read_text() == "orphan" and lib.read_text() == "B"


def test_build_interrupted_before_its_stamp_is_rebuilt(tmp_path, monkeypatch):
    """Ctrl-C between installing B's library and B's stamp left B's library under A's stamp, and A then loaded
    it as its own; now the interrupted build leaves no stamp, and A rebuilds."""
    cc_a, cc_b = _fake_compiler(tmp_path / "nvcc_a", "A"), _fake_compiler(tmp_path / "nvcc_b", "B")
    (lib,) = kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc_a)
    replace = os.replace

    def interrupted(src, dst):
        if str(dst).endswith(".compiler"):
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(kbuild.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc_b)
    monkeypatch.setattr(kbuild.os, "replace", replace)
    assert lib.read_text() == "B" and not kbuild._is_current(lib, kbuild.compiler_id(cc_a))
    (again,) = kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc_a)
    assert again == lib and lib.read_text() == "A"


def test_a_truncated_or_altered_library_in_the_cache_is_rebuilt(tmp_path):
    """The stamp held the compiler id only, so a cut-off copy of a cached library (a full disk, an interrupted
    rsync) was loaded as it was, and the process died with SIGBUS in the loader (a review helper).  The stamp
    now holds the library's size and sha256."""
    cc = _fake_compiler(tmp_path / "nvcc", "ABCDEFGH")
    (lib,) = kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc)
    cid = kbuild.compiler_id(cc)
    assert kbuild._is_current(lib, cid)
    for damaged in ("ABCD", "ABCDEFGX"):  # truncated, then one byte altered
        lib.write_text(damaged)
        assert not kbuild._is_current(lib, cid)
        (again,) = kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc)
        assert again == lib and lib.read_text() == "ABCDEFGH" and kbuild._is_current(lib, cid)


def test_compiler_writing_nothing_is_an_error_and_installs_nothing(tmp_path):
    cc = _fake_compiler(tmp_path / "nvcc", "A", write=False)
    with pytest.raises(kbuild.BuildError, match="no library written"):
        kbuild.build(("sm_80",), tmp_path / "out", nvcc=cc)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".lock"] == []


def test_compiler_that_cannot_run_is_a_build_error(tmp_path):
    cc = tmp_path / "nvcc"
    cc.write_text("not a program")
    cc.chmod(0o644)
    with pytest.raises(kbuild.BuildError, match="cannot run the compiler"):
        kbuild.build(("sm_80",), tmp_path / "out", nvcc=str(cc))
    assert not (tmp_path / "out").exists()


def test_built_library_is_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        (lib,) = kbuild.build(("sm_80",), tmp_path / "out", nvcc=_fake_compiler(tmp_path / "nvcc", "A"))
    finally:
        os.umask(old)
    assert lib.stat().st_mode & 0o044 == 0o044  # a shared cache: other users can load it


def test_cached_build_takes_no_lock(tmp_path, monkeypatch):
    cc = _fake_compiler(tmp_path / "nvcc", "A")
    paths = kbuild.build(("sm_80", "sm_90"), tmp_path / "out", nvcc=cc)

    def no_lock(directory):
        raise AssertionError("a cache that holds the libraries must not need to be writable")

    monkeypatch.setattr(kbuild, "_locked", no_lock)
    assert kbuild.build(("sm_80", "sm_90"), tmp_path / "out", nvcc=cc) == paths


def test_unwritable_cache_is_a_build_error(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(kbuild.BuildError, match="not writable.*METAEMBED_KERNEL_CACHE"):
        kbuild.build(("sm_80",), tmp_path / "out", nvcc=_fake_compiler(tmp_path / "nvcc", "A"))



def test_interrupted_build_leaves_no_compiler_running(tmp_path):
    import signal

    cc = tmp_path / "nvcc"
    cc.write_text("#!/bin/sh\n"
                  'if [ "$1" = "--version" ]; then echo slow; exit 0; fi\n'
                  f'echo $$ > {tmp_path}/pid\nexec sleep 30\n')
    cc.chmod(0o755)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def interrupt_once_compiling():  # a Ctrl-C while the compiler runs (a fixed alarm could come before it)
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGALRM)

    old = signal.signal(signal.SIGALRM, interrupt)
    threading.Thread(target=interrupt_once_compiling, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            kbuild.build(("sm_80",), tmp_path / "out", nvcc=str(cc))
    finally:
        signal.signal(signal.SIGALRM, old)
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
    assert not list((tmp_path / "out").rglob(".build.*"))


def test_bare_compiler_name_is_looked_up_on_path(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_compiler(bindir / "nvcc", "A")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    ids = set()
    for where in (tmp_path, bindir):
        monkeypatch.chdir(where)
        ids.add(kbuild.compiler_id("nvcc"))
    assert len(ids) == 1 and str(bindir / "nvcc") in ids.pop()  # one cache entry, whatever the cwd

def test_source_hash_covers_the_flags_and_the_emulation_header(tmp_path, monkeypatch):
    """The cache key: another flag set, or an edited ``emulate.cuh``, must not load a library built before."""
    base, emu_hash = kbuild.source_hash(), kbuild.source_hash(emulate=True)
    header = tmp_path / "emulate.cuh"
    header.write_text(kbuild.EMULATE_HEADER.read_text() + "// edited\n")
    monkeypatch.setattr(kbuild, "EMULATE_HEADER", header)
    assert kbuild.source_hash(emulate=True) != emu_hash and kbuild.source_hash() == base
    monkeypatch.undo()
    monkeypatch.setattr(kbuild, "NVCC_FLAGS", (*kbuild.NVCC_FLAGS, "-G"))
    assert kbuild.source_hash() != base and kbuild.source_hash(emulate=True) == emu_hash
    monkeypatch.undo()
    monkeypatch.setattr(kbuild, "GXX_FLAGS", (*kbuild.GXX_FLAGS, "-O0"))
    assert kbuild.source_hash(emulate=True) != emu_hash and kbuild.source_hash() == base
    monkeypatch.undo()
    emu_lib = kbuild.library_path(kbuild.EMULATE_ARCH, tmp_path)
    assert emu_lib.parent.parent.name == emu_hash and emu_lib.parent.name == "emulate"


def test_cache_root_precedence(tmp_path, monkeypatch):
    """$METAEMBED_KERNEL_CACHE, else $XDG_CACHE_HOME/metaembed/kernels, else ~/.cache/metaembed/kernels."""
    monkeypatch.setenv("METAEMBED_KERNEL_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kbuild.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("METAEMBED_KERNEL_CACHE")
    assert kbuild.cache_root() == tmp_path / "xdg" / "metaembed" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kbuild.cache_root() == tmp_path / "home" / ".cache" / "metaembed" / "kernels"


def test_find_nvcc_looks_in_cuda_home_then_cuda_path(tmp_path, monkeypatch):
    """$METAEMBED_NVCC, else $CUDA_HOME/bin/nvcc, else $CUDA_PATH/bin/nvcc, else PATH."""
    homes = {}
    for var in ("CUDA_HOME", "CUDA_PATH"):
        (tmp_path / var / "bin").mkdir(parents=True)
        homes[var] = _fake_compiler(tmp_path / var / "bin" / "nvcc", var)
    monkeypatch.delenv("METAEMBED_NVCC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "CUDA_HOME"))
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "CUDA_PATH"))
    assert kbuild.find_nvcc() == homes["CUDA_HOME"]
    monkeypatch.delenv("CUDA_HOME")
    assert kbuild.find_nvcc() == homes["CUDA_PATH"]
    monkeypatch.setenv("METAEMBED_NVCC", homes["CUDA_HOME"])
    assert kbuild.find_nvcc() == homes["CUDA_HOME"]


def _counting_compiler(path: Path, *, empty: bool = False) -> str:
    """A stand-in compiler whose n-th compilation writes ``n`` (nothing with ``empty``) to its ``-o`` file
    and whose arguments are kept in ``<path>.args``."""
    count = path.with_name(path.name + ".count")
    body = ': > "$out"\n' if empty else 'printf $n > "$out"\n'
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "counting compiler"; exit 0; fi\n'
        f'echo "$@" > {path}.args\n'
        f'n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}\n'
        'while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done\n' + body)
    path.chmod(0o755)
    return str(path)


def test_build_targets_the_architecture_and_force_rebuilds(tmp_path):
    cc = _counting_compiler(tmp_path / "nvcc")
    (lib,) = kbuild.build("sm_90a", tmp_path / "out", nvcc=cc)  # one arch as a string
    assert lib.parent.name == "sm_90a" and lib.read_text() == "1"
    assert "-gencode=arch=compute_90a,code=sm_90a" in (tmp_path / "nvcc.args").read_text().split()
    assert kbuild.build(("sm_90a", "90a"), tmp_path / "out", nvcc=cc) == [lib] and lib.read_text() == "1"  # cached
    assert kbuild.build(("sm_90a",), tmp_path / "out", nvcc=cc, force=True) == [lib] and lib.read_text() == "2"
    lib.write_bytes(b"")  # an empty file is no library, whatever its stamp says
    kbuild.build(("sm_90a",), tmp_path / "out", nvcc=cc)
    assert lib.read_text() == "3"


def test_emulator_build_uses_cxx_and_force_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", _counting_compiler(tmp_path / "cxx"))
    lib = kbuild.build_emulator(tmp_path / "out")
    assert lib.read_text() == "1" and "-DMETAEMBED_EMULATE" in (tmp_path / "cxx.args").read_text().split()
    assert kbuild.build_emulator(tmp_path / "out") == lib and lib.read_text() == "1"
    assert kbuild.build_emulator(tmp_path / "out", force=True) == lib and lib.read_text() == "2"


def test_compiler_writing_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(kbuild.BuildError, match="no library written"):
        kbuild.build(("sm_80",), tmp_path / "out", nvcc=_counting_compiler(tmp_path / "nvcc", empty=True))
    assert not list((tmp_path / "out").rglob("*.so"))


def test_compiler_upgraded_in_place_rebuilds(tmp_path):
    """Same path, another ``--version`` (e.g. a CUDA toolkit upgraded in /usr/local/cuda): rebuilt."""
    cc = _fake_compiler(tmp_path / "nvcc", "A")
    (lib,) = kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc)
    _fake_compiler(tmp_path / "nvcc", "B")
    kbuild.build(("sm_90",), tmp_path / "out", nvcc=cc)
    assert lib.read_text() == "B"


def test_is_available_false_without_cuda(monkeypatch):
    if HAS_CUDA:
        pytest.skip("CUDA present")
    assert kernels.is_available() is False
    assert "cuda" in kernels.unavailable_reason().lower()
    monkeypatch.setenv("METAEMBED_DISABLE_KERNELS", "1")
    assert kernels.unavailable_reason() == "disabled by METAEMBED_DISABLE_KERNELS"


def test_foreign_library_is_a_kernel_error_and_leaves_kernels_unavailable(monkeypatch):
    """A .so without the C ABI ($METAEMBED_KERNEL_LIB pointing at the wrong file) is a KernelError, which
    is_available() turns into False and maxsim() into the torch path, not an AttributeError from ctypes."""
    import ctypes.util

    from metaembed.kernels import ops

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to load")
    with pytest.raises(KernelError, match="not a metaembed kernel library"):
        KernelLibrary(libm)
    monkeypatch.setenv("METAEMBED_KERNEL_LIB", libm)
    monkeypatch.delenv("METAEMBED_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(ops, "_libraries", {})
    monkeypatch.setattr(ops, "_failures", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the override is loaded before any device use
    assert kernels.is_available() is False
    assert "not a metaembed kernel library" in kernels.unavailable_reason()


def test_maxsim_cuda_rejects_cpu_tensors_without_emulator():
    q, c = torch.randn(1, 2, 8), torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="CUDA tensors"):
        kernels.maxsim_cuda(q, c)


# ---------------------------------------------------------------------------------------------
# nvcc compile check (CI has nvcc but no GPU): once per session, both archs in parallel
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    if kbuild.find_nvcc() is None:
        pytest.skip("nvcc not on PATH")
    out = tmp_path_factory.mktemp("kernels")
    t0 = time.perf_counter()
    paths = kbuild.build(("sm_80", "sm_90"), out)
    return paths, time.perf_counter() - t0


def test_nvcc_compiles_sm80_sm90(compiled):
    paths, seconds = compiled
    assert [p.parent.name for p in paths] == ["sm_80", "sm_90"]
    for p in paths:
        assert p.is_file() and p.read_bytes()[:4] == b"\x7fELF"
    print(f"compiled sm_80 + sm_90 in {seconds:.1f} s")


def test_compiled_library_exports_c_abi(compiled):
    paths, _ = compiled
    try:
        lib = KernelLibrary(paths[-1])  # loads without a GPU: cudart is linked statically
    except KernelError as e:
        pytest.skip(f"library does not load on this host: {e}")
    assert "bfloat16" in lib.error_string(-1)
    if not HAS_CUDA:
        with pytest.raises(KernelError, match="cannot run here"):
            lib.probe()


def test_build_is_cached(compiled):
    paths, _ = compiled
    root = paths[0].parent.parent.parent
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert kbuild.build(("sm_80", "sm_90"), root) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes  # not compiled again (no timing: a busy host is slow)


def test_compiled_kernels_fit_launch_bounds_and_only_the_multi_chunk_variants_spill(compiled):
    """Static resources of every compiled variant (no GPU): at most 128 registers (``__launch_bounds__(256, 2)``)
    and no local-memory stack, i.e. no register spills, except in the MULTI variants (r_c > 128, a second set
    of running-max accumulators), which the paper's budgets never use. A spill in the common variants would
    cost bandwidth that only a GPU benchmark would otherwise show."""
    import re

    tool = kbuild.find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's wheel)")
    paths, _ = compiled
    for lib in paths:
        out = subprocess.run([tool, "-res-usage", str(lib)], capture_output=True, text=True, check=True).stdout
        kernels = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+)", out)
        names = {name for name, _, _ in kernels}
        multi = {name for name in names if re.search(r"Lb1EEEvNS_6ParamsE$", name)}
        assert len(names) >= 16 and multi and names - multi, (lib, sorted(names))
        for name, reg, stack in kernels:
            assert int(reg) <= 128, (lib.parent.name, name, reg)
            if name not in multi:
                assert int(stack) == 0, f"{lib.parent.name}: {name} spills {stack} bytes per thread"


def test_ci_compile_script_skips_without_nvcc(tmp_path):
    script = ROOT / ".ci" / "compile_kernels.sh"
    if shutil.which("nvcc", path="/usr/bin:/bin"):
        pytest.skip("nvcc is in /usr/bin: cannot hide it")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "METAEMBED_NVCC": "", "CUDA_HOME": ""}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "skip" in res.stdout.lower()


# ---------------------------------------------------------------------------------------------
# the kernel itself, through the g++ CPU emulation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def emu():
    if kbuild.find_compiler() is None:
        pytest.skip("no C++ compiler for the emulation build")
    return KernelLibrary(kbuild.build_emulator(), emulated=True)


@pytest.mark.parametrize("case", EMULATOR_CASES, ids=lambda c: c.name)
def test_emulated_kernel_matches_fp64_reference(emu, case):
    assert run_case(case, "cpu", emu) <= TOL


_ASAN_CASES = """
import sys
from metaembed.kernels.ffi import KernelLibrary
from metaembed.kernels.selfcheck import EMULATOR_CASES, run_case
lib = KernelLibrary(sys.argv[1], emulated=True)
bad = [(c.name, err) for c in EMULATOR_CASES if not (err := run_case(c, "cpu", lib)) <= 1e-3]
print("CASES", len(EMULATOR_CASES), "BAD", bad)
"""


@pytest.mark.slow
def test_emulated_kernel_stays_inside_its_tensors_under_address_sanitizer(tmp_path):
    """The emulator checks the kernel's shared-memory accesses, not its reads of the input tensors: a read past
    them whose value the epilogue discards passes every fp64 comparison, and without a GPU compute-sanitizer
    never runs (a review helper's kernel reading queries past nq and candidates past N passed all emulator
    cases).  Here every emulator case runs in an AddressSanitizer build; torch's CPU tensors are allocated to
    their size, so a read past one lands in a guard zone.  About 2 minutes on 2 cores."""
    cxx = kbuild.find_compiler()
    asan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip() \
        if cxx else ""
    if not asan or not Path(asan).is_file():
        pytest.skip("no C++ compiler with AddressSanitizer (libasan)")
    flags = [f for f in kbuild.GXX_FLAGS if f != "-O2"] + ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    lib = tmp_path / "libmaxsim_emu_asan.so"
    subprocess.run([cxx, *flags, f"-I{kbuild.HERE}", "-o", str(lib), str(kbuild.SOURCE)], check=True,
                   capture_output=True, timeout=kbuild.COMPILE_TIMEOUT_S)
    env = {**os.environ, "LD_PRELOAD": asan, "ASAN_OPTIONS": "detect_leaks=0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _ASAN_CASES, str(lib)], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert "ERROR: AddressSanitizer" not in res.stderr, res.stderr[-4000:]
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"CASES {len(EMULATOR_CASES)} BAD []" in res.stdout, res.stdout[-2000:]


def test_emulator_cases_reach_every_compiled_kernel(emu):
    """Each kernel maxsim.cu compiles (dispatch_engine: engine x dtype x 16-byte / element loads x tile_m x
    column chunks, 40 in all) runs in EMULATOR_CASES, so in the emulation tests and under racecheck
    (``selfcheck --tiny``): a variant no case reaches is never checked, on CPU or GPU."""
    reached = set()
    for case in EMULATOR_CASES:
        if case.nq and case.N:
            q, c = make_inputs(case, "cpu")
            p = kernels.kernel_plan(q, c, case.r_q, case.r_c, algo=case.algo, tile_m=case.tile_m, library=emu)
            reached.add((case.dtype, p.algo, p.vectorized, p.tile_m, p.col_chunks > 1))
    compiled = {(dt, algo, vec, tile_m, chunked)
                for dt in ("fp32", "fp16", "bf16")
                for algo in (("simt",) if dt == "fp32" else ("simt", "tensor_core"))
                for vec in (True, False) for tile_m in (16, 64) for chunked in (False, True)}
    assert len(compiled) == 40
    assert sorted(compiled - reached) == []


def test_emulated_plan_selection(emu):
    def plan(case: Case, **kw):
        q, c = make_inputs(case, "cpu")
        return kernels.kernel_plan(q, c, case.r_q, case.r_c, library=emu, **kw)

    few = plan(Case("few", 1, 300, 16, 64, 64, 16, 64))
    assert (few.algo, few.tile_m, few.row_tiles, few.vectorized) == ("tensor_core", 16, 1, True)
    assert few.col_tiles == 150 and few.cols_per_candidate == 64  # 2 candidates per 128-column tile
    many = plan(Case("many", 100, 300, 16, 64, 64, 16, 64))
    assert (many.tile_m, many.row_tiles, many.split) == (64, 25, False)
    assert many.group_rows == 25  # 64 rows x 64 x 2 B = 8 KiB per row tile: all 25 fit one 8 MiB L2 group
    # 64 rows x 4096 x 4 B = 1 MiB per row tile: groups of 8 row tiles (group_rows is its own field, not `split`)
    raster = plan(Case("raster", 9, 3, 64, 2, 4096, 64, 2, dtype="fp32"))
    assert (raster.row_tiles, raster.group_rows, raster.split) == (9, 8, False)
    assert plan(Case("f32", 1, 3, 2, 2, 64, 2, 2, dtype="fp32")).algo == "simt"
    assert not plan(Case("oddD", 1, 3, 2, 2, 100, 2, 2)).vectorized
    assert not plan(Case("tr", 1, 3, 2, 2, 64, 2, 2, layout="transposed")).vectorized
    odd = plan(Case("odd", 1, 3, 5, 7, 64, 5, 7))
    assert (odd.rows_per_query, odd.cols_per_candidate) == (8, 8)
    big = plan(Case("big", 2, 3, 80, 200, 64, 80, 200), tile_m=64)
    assert big.split and big.col_chunks == 2
    assert plan(Case("f", 1, 3, 2, 2, 64, 2, 2), algo="simt").algo == "simt"
    # D a multiple of 8 but a data pointer or a vector stride that is not: 16-byte loads would be misaligned
    for layout in ("offset", "odd-stride", "item-stride"):
        for dt in ("bf16", "fp16", "fp32"):
            assert not plan(Case("mis", 2, 3, 2, 2, 64, 2, 2, dtype=dt, layout=layout)).vectorized
    for role in (0, 1):  # only the queries' or only the candidates' items misaligned
        q, c = make_inputs(Case("one", 2, 3, 2, 2, 64, 2, 2), "cpu")
        spaced = make_inputs(Case("mis", 2, 3, 2, 2, 64, 2, 2, layout="item-stride"), "cpu")[role]
        q, c = (spaced, c) if role == 0 else (q, spaced)
        assert not kernels.kernel_plan(q, c, 2, 2, library=emu).vectorized


def test_emulated_kernel_rejects_tensor_cores_for_fp32(emu):
    q, c = make_inputs(Case("f32", 1, 3, 2, 2, 64, 2, 2, dtype="fp32"), "cpu")
    with pytest.raises(KernelError, match="tensor cores need float16 or bfloat16"):
        kernels.maxsim_cuda(q, c, algo="tensor_core", library=emu)


def test_emulated_argument_errors(emu):
    q, c = torch.randn(2, 4, 64), torch.randn(5, 8, 64)
    with pytest.raises(GroupError, match="exceeds"):
        kernels.maxsim_cuda(q, c, 5, 8, library=emu)
    with pytest.raises(ValueError, match="embedding dims differ"):
        kernels.maxsim_cuda(q, torch.randn(5, 8, 32), library=emu)
    with pytest.raises(ValueError, match="algo"):
        kernels.maxsim_cuda(q, c, algo="fast", library=emu)
    with pytest.raises(ValueError, match="tile_m"):
        kernels.maxsim_cuda(q, c, tile_m=32, library=emu)
    with pytest.raises(TypeError, match="float64"):
        kernels.maxsim_cuda(q.double(), c, library=emu)
    with pytest.raises(ValueError, match="3-D"):
        kernels.maxsim_cuda(q[0], c, library=emu)



def test_low_level_launch_checks_its_arguments(emu):
    """``launch_maxsim`` / ``KernelLibrary.maxsim`` are exported: they must not read past the tensors."""
    from metaembed.kernels.ffi import launch_maxsim
    from metaembed.maxsim import maxsim_reference

    q, c = torch.randn(2, 4, 16), torch.randn(5, 2, 16)
    assert torch.allclose(launch_maxsim(emu, q, c, 4, 2), maxsim_reference(q, c, 4, 2).float(), atol=1e-5)
    with pytest.raises(ValueError, match=r"r_c=3 must be an int in \[1, 2\]"):
        launch_maxsim(emu, q, c, 4, 3)
    with pytest.raises(ValueError, match=r"r_q=0"):
        launch_maxsim(emu, q, c, 0, 2)
    with pytest.raises(ValueError, match="embedding dims differ"):
        launch_maxsim(emu, q, torch.randn(5, 2, 8), 4, 2)
    with pytest.raises(ValueError, match="3-D"):
        emu.maxsim(q[0], c, 1, 1, torch.empty(2, 5))
    with pytest.raises(ValueError, match=r"r_q=True must be an int"):  # a bool is not a budget
        launch_maxsim(emu, q, c, True, 2)
    # the C side reads both operands as the candidates' dtype: fp16 queries would be read as bf16 bits
    with pytest.raises(TypeError, match="dtypes must match"):
        launch_maxsim(emu, q.half(), c.bfloat16(), 4, 2)
    with pytest.raises(ValueError, match="algo='bogus'"):
        launch_maxsim(emu, q, c, 4, 2, algo="bogus")
    # a status from C is an error whatever its sign: < 0 an argument error, > 0 a cudaError_t (e.g. 700, an
    # illegal address), after which `out` holds garbage
    for code in (-1, 700):
        with pytest.raises(KernelError, match=f"launch failed: .*code {code}"):
            emu._check(code, "launch")


def test_c_entry_point_refuses_negative_strides(emu):
    """The C ABI is usable without torch (numpy, CuPy): a reversed view has a negative stride, and offset -1 marks a
    padding row inside the kernel, so its rows read as zeros and the call returned 0 with wrong scores (a review
    helper).  torch never makes negative strides; the C side now refuses them."""
    import ctypes

    from metaembed.maxsim import maxsim_reference

    q, c = torch.randn(3, 2, 8), torch.randn(4, 2, 8)  # [nq, R_q, D], [N, R_c, D]
    out = torch.full((3, 4), -7.0)
    last = ctypes.c_void_p(q[2].data_ptr())  # q[::-1] as numpy would pass it: the last query, stride -R_q*D
    for sq0 in (-16, 16):
        code = emu._lib.metaembed_maxsim(0, last if sq0 < 0 else ctypes.c_void_p(q.data_ptr()),
                                         ctypes.c_void_p(c.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                         3, 4, 2, 2, 8, sq0, 8, 1, 16, 8, 1, 4, 0, 0, -1, None)
        if sq0 < 0:
            assert code != 0 and "strides >= 0" in emu.error_string(code)
            assert out.eq(-7.0).all()  # nothing written
        else:
            assert code == 0
            torch.testing.assert_close(out, maxsim_reference(q, c, 2, 2).float(), atol=1e-5, rtol=1e-5)


def test_low_level_launch_refuses_tensors_on_the_wrong_device(emu, compiled):
    """The raw pointers are dereferenced by host code (emulation) or the GPU: tensors elsewhere are a
    ValueError, not a segfault (meta tensors: null pointers) or an illegal address (host pointers on the GPU)."""
    code = ("import torch\nfrom metaembed.kernels.build import build_emulator\n"
            "from metaembed.kernels.ffi import KernelLibrary, launch_maxsim\n"
            "lib = KernelLibrary(build_emulator(), emulated=True)\n"
            "q, c = torch.empty(2, 4, 16, device='meta'), torch.empty(5, 2, 16, device='meta')\n"
            "try:\n    launch_maxsim(lib, q, c, 4, 2)\nexcept ValueError as e:\n    print('refused:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "refused: the emulation library takes cpu tensors, got meta" in res.stdout, \
        (res.returncode, res.stdout, res.stderr)
    paths, _ = compiled
    try:
        gpu_lib = KernelLibrary(paths[-1])
    except KernelError as e:
        pytest.skip(f"library does not load on this host: {e}")
    q, c = torch.randn(2, 4, 16), torch.randn(5, 2, 16)
    with pytest.raises(ValueError, match="takes cuda tensors, got cpu"):
        gpu_lib.maxsim(q, c, 4, 2, torch.empty(2, 5))

def test_emulation_library_is_safe_to_call_from_several_threads():
    """ctypes drops the GIL, so two threads can be inside the emulator at once: its scheduler, built-in
    variables and shared memory are per thread (a single global state crashed the process).  Run in a
    subprocess so that a crash is a failure, not the end of the test session."""
    code = ("import threading, torch\nfrom metaembed import kernels\n"
            "from metaembed.kernels.build import build_emulator\nfrom metaembed.kernels.ffi import KernelLibrary\n"
            "from metaembed.kernels.selfcheck import Case, make_inputs, reference_scores\n"
            "lib = KernelLibrary(build_emulator(), emulated=True)\n"
            "q, c = make_inputs(Case('t', 4, 150, 4, 8, 128, 4, 8), 'cpu')\n"
            "ref, errs = reference_scores(q, c, 4, 8), []\n"
            "def work():\n    for _ in range(3):\n"
            "        errs.append(float((kernels.maxsim_cuda(q, c, library=lib).double() - ref).abs().max()))\n"
            "ts = [threading.Thread(target=work) for _ in range(3)]\n"
            "[t.start() for t in ts]\n[t.join() for t in ts]\nprint('max err', len(errs), max(errs))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr[-2000:])
    n, err = res.stdout.split()[-2:]
    assert n == "9" and float(err) <= TOL


def test_emulated_mixed_dtypes_cast_queries_to_index_dtype(emu):
    q, c = make_inputs(Case("m", 3, 21, 4, 8, 64, 4, 8), "cpu")  # bf16
    out = kernels.maxsim_cuda(q.float(), c, 2, 3, library=emu)  # fp32 queries are rounded to bf16
    assert (out.double() - reference_scores(q, c, 2, 3)).abs().max() <= TOL


def test_emulated_prefix_is_read_in_place(emu):
    """A budget slices the stored index through strides: the same result as a copied prefix."""
    q, c = make_inputs(Case("p", 2, 23, 8, 16, 64, 8, 16), "cpu")
    a = kernels.maxsim_cuda(q, c, 3, 5, library=emu)
    b = kernels.maxsim_cuda(q[:, :3].contiguous(), c[:, :5].contiguous(), library=emu)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_emulated_topk(emu):
    q, c = make_inputs(Case("t", 4, 150, 4, 8, 64, 4, 8), "cpu")
    scores, ids = kernels.maxsim_topk_cuda(q, c, 10, 4, 8, library=emu)
    ref = reference_scores(q, c, 4, 8)
    rs, ri = ref.topk(10, dim=1)
    assert ids.shape == (4, 10) and ids.dtype == torch.int64
    assert torch.equal(ids, ri)
    assert (scores.double() - rs).abs().max() <= TOL
    s_all, _ = kernels.maxsim_topk_cuda(q, c, 500, library=emu)
    assert s_all.shape == (4, 150)
    for bad in (0, -1, True, 2.0):  # True is an int to isinstance, not a k
        with pytest.raises(ValueError, match="k must be"):
            kernels.maxsim_topk_cuda(q, c, bad, library=emu)


def test_emulated_topk_ties_keep_the_lower_id(emu):
    """Duplicate candidates score exactly alike: the top-k keeps the lowest ids among them, in id order
    (as MultiVectorIndex.search), not the arbitrary picks of a bare torch.topk."""
    g = torch.Generator().manual_seed(0)
    dup = torch.randn(1, 2, 64, generator=g)
    c = dup.expand(300, 2, 64).contiguous()  # [300, 2, 64], all equal ...
    c[::7] = 0.1 * torch.randn(43, 2, 64, generator=g)  # ... except every 7th, which score lower
    q = dup + 0.1 * torch.randn(2, 2, 64, generator=g)  # [2, 2, 64]: the 257 duplicates tie at the top
    scores = kernels.maxsim_cuda(q, c, library=emu)  # [2, 300]
    top_s, top_i = kernels.maxsim_topk_cuda(q, c, 20, library=emu)
    for b in range(2):
        order = sorted(range(300), key=lambda n: (-scores[b, n].item(), n))[:20]  # descending, ties by id
        assert top_i[b].tolist() == order
        assert torch.equal(top_s[b], scores[b, order])
    empty_s, empty_i = kernels.maxsim_topk_cuda(q, c[:0], 5, library=emu)
    assert empty_s.shape == empty_i.shape == (2, 0)


def test_kernel_refuses_inputs_that_require_grad(emu):
    """The kernel has no backward: scores for inputs that require grad would silently carry no graph."""
    from metaembed.maxsim import maxsim_reference

    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(2, 3, 16, generator=g).requires_grad_(), torch.randn(5, 4, 16, generator=g)
    with pytest.raises(RuntimeError, match="no backward"):
        kernels.maxsim_cuda(q, c, library=emu)
    with pytest.raises(RuntimeError, match="no backward"):  # the index's side too
        kernels.maxsim_cuda(q.detach(), c.clone().requires_grad_(), library=emu)
    with torch.no_grad():  # inference: fine
        torch.testing.assert_close(kernels.maxsim_cuda(q, c, library=emu), maxsim_reference(q.detach(), c).float())


def test_emulated_split_zeroes_only_the_output_block(emu):
    """r_q > tile_m: the output is zeroed before partial sums are atomically added.  With a row stride
    ldo > N (``out`` a column slice of a larger buffer) only the [nq, N] block may be cleared: zeroing
    nq * ldo floats wipes the other columns and runs ldo - N floats past the last row."""
    nq, N, r_q, r_c = 3, 7, 40, 4
    q, c = make_inputs(Case("split-ldo", nq, N, r_q, r_c, 32, r_q, r_c, dtype="fp32"), "cpu")
    assert emu.plan(q, c, r_q, r_c, algo="simt", tile_m=16).split
    big = torch.full((nq, 2 * N + 5), 7.0)
    out = big[:, :N]  # ldo = 2N + 5
    emu.maxsim(q, c, r_q, r_c, out, algo="simt", tile_m=16)
    assert torch.equal(big[:, N:], torch.full((nq, N + 5), 7.0))
    assert (out.double() - reference_scores(q, c, r_q, r_c)).abs().max() <= TOL


def test_emulated_out_is_validated(emu):
    """``out`` is written through its raw pointer: a wrong shape, dtype, device or layout is refused."""
    q, c = torch.randn(3, 4, 32), torch.randn(7, 8, 32)
    for bad in (torch.empty(3, 6), torch.empty(3, 7, dtype=torch.float64), torch.empty(7, 3).t(),
                torch.empty(21), torch.empty(3, 7, device="meta"),
                torch.empty(3, 14)[:, ::2],  # column stride 2 (row stride 14 >= N): written as if 1
                torch.empty(20).as_strided((3, 7), (2, 1))):  # rows overlap (row stride 2 < N)
        with pytest.raises(ValueError, match="out must"):
            emu.maxsim(q, c, 4, 8, bad)
    out = torch.empty(3, 7)
    emu.maxsim(q, c, 4, 8, out)
    assert (out.double() - reference_scores(q, c, 4, 8)).abs().max() <= TOL


@pytest.mark.parametrize("dtype,algo", [(torch.float32, "simt"), (torch.bfloat16, "tensor_core"),
                                        (torch.float16, "simt")])
@pytest.mark.parametrize("r_q,r_c,tile_m", [(3, 4, 0), (3, 150, 16), (70, 3, 64)])  # padded rows, column chunks, split
def test_emulated_kernel_propagates_nan_and_inf_like_the_reference(emu, dtype, algo, r_q, r_c, tile_m):
    """A NaN inside the budget makes the score NaN (torch.amax), not a finite score from the other vectors
    (fmaxf drops NaN); a +inf element gives +-inf, not NaN from a zero padding row (0 * inf)."""
    _check_nan_and_inf("cpu", emu, dtype, algo, r_q, r_c, tile_m)


def _check_nan_and_inf(device, library, dtype, algo, r_q, r_c, tile_m):
    from metaembed.maxsim import maxsim_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, r_q, 16, generator=g).to(dtype)
    c = torch.randn(5, r_c, 16, generator=g).to(dtype)
    c[1, r_c - 1, 5] = float("nan")
    c[3, 0, 7] = float("nan")  # first vector: a NaN met first must survive the later comparisons too
    c[2, 0, 3] = float("inf")
    out = kernels.maxsim_cuda(q.to(device), c.to(device), algo=algo, tile_m=tile_m, library=library)
    out = out.double().cpu()  # [2, 5]
    ref = maxsim_reference(q.double(), c.double())
    assert torch.equal(out.isnan(), ref.isnan()) and ref[:, 1].isnan().all() and ref[:, 3].isnan().all()
    assert torch.equal(out[ref.isinf()], ref[ref.isinf()]) and ref.isinf().any()
    fin = ref.isfinite()
    assert (out[fin] - ref[fin]).abs().max() <= TOL


def _check_split_sums(device, library, dtype, algo, nq, N, r_q, repeats):
    """r_q over several row tiles (tile_m 16): each tile's partial sum is atomically added into ``out``.  A plain
    ``+=`` races between blocks on a GPU (the emulator runs blocks one after another, and compute-sanitizer's
    racecheck watches shared memory only), losing partial sums now and then: every repeat must match fp64."""
    q, c = make_inputs(Case("split-sums", nq, N, r_q, 8, 64, r_q, 8, dtype=dtype, algo=algo, tile_m=16), device)
    plan = kernels.kernel_plan(q, c, r_q, 8, algo=algo, tile_m=16, library=library)
    assert plan.split and plan.row_tiles >= r_q // 16, plan
    ref = reference_scores(q, c, r_q, 8)
    worst = max(float((kernels.maxsim_cuda(q, c, r_q, 8, algo=algo, tile_m=16, library=library).double() - ref)
                      .abs().max()) for _ in range(repeats))
    assert worst <= TOL, worst


@pytest.mark.parametrize("dtype,algo", [("fp32", "simt"), ("bf16", "tensor_core")])
def test_emulated_split_rows_add_every_partial_sum(emu, dtype, algo):
    _check_split_sums("cpu", emu, dtype, algo, nq=2, N=19, r_q=48, repeats=1)


_EMULATOR_PROBE = r"""
#include "emulate.cuh"
__global__ void copy16(const unsigned char* g, long src_off, long dst_off) {
  if (threadIdx.x == 0) emu::cp_async16(emu::dyn_smem() + dst_off, g + src_off, true);
  __syncthreads();
}
__global__ void tile(long off, unsigned ldm) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, reinterpret_cast<const __half*>(emu::dyn_smem() + off), ldm);
}
__global__ void nothing(int) {}
template <class K, class... A>
int run(K k, size_t smem, A... a) {
  emu::launch(k, dim3(2), dim3(64), smem, a...);
  return cudaGetLastError();
}
int main() {
  alignas(16) static unsigned char g[64] = {};
  std::printf("%d %d %d %d ", run(copy16, 1024, g, 0L, 0L), run(copy16, 1024, g, 4L, 0L),
              run(copy16, 1024, g, 0L, 8L), run(copy16, 1024, g, 0L, 1016L));
  std::printf("%d %d %d %d ", run(tile, 1024, 0L, 16u), run(tile, 1024, 16L, 16u), run(tile, 1024, 0L, 12u),
              run(tile, 500, 0L, 16u));
  const int a = run(nothing, 60 * 1024, 0);
  const int b = cudaFuncSetAttribute(nothing, cudaFuncAttributeMaxDynamicSharedMemorySize, 60 * 1024);
  const int c = run(nothing, 60 * 1024, 0);
  const int d = cudaFuncSetAttribute(nothing, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
  std::printf("%d %d %d %d %d\n", a, b, c, d, run(nothing, 48 * 1024, 0));
}
"""


def _run_probe(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    """Compile ``source`` (a C++ program including emulate.cuh) with the host compiler and run it."""
    cxx = kbuild.find_compiler()
    if cxx is None:
        pytest.skip("no C++ compiler for the emulation build")
    (tmp_path / "probe.cpp").write_text(source)
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wno-unknown-pragmas", f"-I{kbuild.HERE}", "-o", str(tmp_path / "probe"),
                    str(tmp_path / "probe.cpp")], check=True, capture_output=True, timeout=120)
    res = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res


def test_emulator_reports_misaligned_and_out_of_bounds_accesses_and_shared_memory_limits(tmp_path):
    """What a GPU refuses, the emulator reports as the same CUDA error (cudaGetLastError), so emulation can show
    it: a 16-byte cp.async whose source or destination is not 16-byte aligned, or a WMMA tile not 32-byte aligned
    or with a row stride that is not a multiple of 16 bytes (716, misaligned address); a copy or tile outside the
    block's dynamic shared memory (700, illegal address); a launch with more than 48 KB of it without the
    opt-in attribute, or an opt-in above 99 KB (the sm_86 / sm_89 limit) (1, invalid argument).  It used to copy
    misaligned data and run any shared-memory size, so e.g. dropping ``aligned16(c)`` from ``make_plan`` or the
    ``cudaFuncSetAttribute`` call from ``launch_tiles`` passed every emulation test and failed only on a GPU."""
    res = _run_probe(tmp_path, _EMULATOR_PROBE)
    copies, tiles, smem = res.stdout.split()[:4], res.stdout.split()[4:8], res.stdout.split()[8:]
    assert copies == ["0", "716", "716", "700"]  # aligned; source at +4; destination at +8; past the end
    assert tiles == ["0", "716", "716", "700"]  # aligned; at +16 B; ldm of 24 B; 512-byte tile in 500 B
    assert smem == ["1", "0", "0", "1", "0"]  # 60 KB refused, opted in, then runs; 100 KB opt-in refused; 48 KB


_ASYNC_PROBE = r"""
#include "emulate.cuh"
__global__ void groups(const unsigned char* g, int* seen) {
  if (threadIdx.x != 0) return;
  unsigned char* s = emu::dyn_smem();
  emu::cp_async16(s, g, true);  // group 0
  emu::cp_async_commit();
  emu::cp_async16(s + 16, g + 16, true);  // group 1
  emu::cp_async16(s + 32, g, false);  // group 1, zero-fill
  emu::cp_async_commit();
  seen[0] = s[0];
  emu::cp_async_wait(1);  // group 0 lands
  seen[1] = s[0], seen[2] = s[16], seen[3] = s[32];
  emu::cp_async_wait(0);
  seen[4] = s[16], seen[5] = s[32];
}
int main() {
  alignas(16) static unsigned char g[32];
  for (int i = 0; i < 32; ++i) g[i] = static_cast<unsigned char>(i + 1);
  static int seen[6];
  emu::launch(groups, dim3(1), dim3(32), 1024, static_cast<const unsigned char*>(g), static_cast<int*>(seen));
  std::printf("%d %d %d %d %d %d %d\n", cudaGetLastError(), seen[0], seen[1], seen[2], seen[3], seen[4], seen[5]);
}
"""


def test_emulated_async_copies_land_at_the_wait_that_retires_their_group(tmp_path):
    """The emulator copied at cp.async time and made commit / wait no-ops, so a pipeline waiting too shallowly
    (``cp_async_wait<2>`` for ``<1>`` in the main loop: reading a stage whose copy may not have landed) passed
    all 67 emulator cases, where a GPU races (a review helper).  A copy now writes poison (0xFF, NaN in every
    float format) when issued and its data at the wait that retires its group; that mutant fails 36 cases."""
    res = _run_probe(tmp_path, _ASYNC_PROBE)
    # no error; poison before any wait; group 0 landed, group 1 still poison; then group 1 (data, zero-fill)
    assert res.stdout.split() == ["0", "255", "1", "255", "255", "17", "0"]


_BARRIER_PROBE = r"""
#include "emulate.cuh"
// phase 1: thread t writes slot t; phase 2: it reads slot t + 1 (written by thread t + 1); phase 3: it
// overwrites slot t + 2 (read by thread t + 1 in phase 2).  Bit 0 / bit 1 of `sync`: the barrier after phase 1 / 2
__global__ void neighbours(int* out, int sync) {
  int* s = reinterpret_cast<int*>(emu::dyn_smem());
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = 100 + t;
  if (sync & 1) __syncthreads();
  out[t] = s[(t + 1) % n];
  if (sync & 2) __syncthreads();
  s[(t + 2) % n] = -1;
}
__global__ void divergent(int) {
  if (threadIdx.x % 2) __syncthreads();
}
int main(int argc, char**) {
  if (argc > 1) {
    emu::launch(divergent, dim3(1), dim3(8), 0, 0);
    return 0;
  }
  static int out[8];
  for (int sync : {3, 2, 1}) {
    emu::launch(neighbours, dim3(1), dim3(8), 64, out, sync);
    for (int t = 0; t < 8; ++t) std::printf("%d ", out[t]);
  }
  std::printf("\n");
}
"""


def test_emulated_threads_run_in_turn_between_barriers_and_a_diverging_barrier_aborts(tmp_path):
    """The emulator's race detection, which every emulation test of maxsim.cu relies on: the threads of a block
    run one after another up to each ``__syncthreads``, so without a barrier a thread reads a slot a
    higher-numbered thread has not written yet (shared memory starts as 0xA5 garbage) or that a
    lower-numbered thread has already overwritten; with it, every read sees the phase before.  (A race whose
    writer is the lower-numbered thread of the two passes; maxsim_kernel's tiles are written and read by
    all threads, so each of its barriers has races both ways.)  A barrier that
    only some threads reach aborts, naming the block.  Emulated lanes in lock step, or barriers as no-ops
    with the threads run in parallel, would let missing barriers pass (see
    test_emulator_catches_the_removal_of_every_barrier_the_kernel_needs)."""
    res = _run_probe(tmp_path, _BARRIER_PROBE)
    values = [int(v) for v in res.stdout.split()]
    assert values[:8] == [101, 102, 103, 104, 105, 106, 107, 100]  # both barriers: each neighbour's write
    garbage = int.from_bytes(b"\xa5" * 4, "little", signed=True)
    # no barrier after the writes: threads 0..6 read their neighbour's slot before it is written (thread 7 reads
    # slot 0, which thread 0 has written: a lower-numbered writer's missing barrier passes by luck)
    assert values[8:16] == [garbage] * 7 + [100]
    # no barrier after the reads: threads 1..7 read a slot that thread t - 1 has already overwritten
    assert values[16:] == [101] + [-1] * 7
    div = subprocess.run([str(tmp_path / "probe"), "divergent"], capture_output=True, text=True, timeout=60)
    assert div.returncode != 0
    assert "block 0: 4 threads exited while 4 wait at __syncthreads" in div.stderr, div.stderr


_MUTANT_CASES = """
import sys
from metaembed.kernels.ffi import KernelLibrary
from metaembed.kernels.selfcheck import EMULATOR_CASES, run_case

def fails(case, lib):
    try:
        return not run_case(case, "cpu", lib) <= 1e-3  # NaN fails too
    except Exception:
        return True

for path in sys.argv[1:]:
    lib = KernelLibrary(path, emulated=True)
    print(path, next((c.name for c in EMULATOR_CASES if fails(c, lib)), None))
"""


@pytest.mark.slow
def test_emulator_catches_the_removal_of_every_barrier_the_kernel_needs(tmp_path):
    """No GPU runs in CI, so the emulator is all that checks maxsim_kernel's synchronisation.  Each
    ``__syncthreads()`` and ``cp_async_wait<N>()`` of the kernel is deleted in turn, the mutant built for the
    emulator and run on EMULATOR_CASES: every deletion must fail some case, except the two that are redundant
    as the kernel stands (the ``cp_async_wait<0>()`` after the main loop and the barrier after it: the last
    iteration's wait<1> left only an empty group pending, and its trailing barrier already ordered the reads
    of the stages before the epilogue overwrites them).  About 40 s on 2 cores."""
    cxx = kbuild.find_compiler()
    if cxx is None:
        pytest.skip("no C++ compiler for the emulation build")
    lines = kbuild.SOURCE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "maxsim_kernel(Params p) {" in line)
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    syncs = [i for i in range(start, end) if re.search(r"^\s*(__syncthreads|cp_async_wait<\d+>)\(\);", lines[i])]
    # a barrier added or removed: look again at which ones are redundant
    assert len(syncs) == 7, [lines[i] for i in syncs]
    wait0 = next(i for i in syncs if "cp_async_wait<0>();" in lines[i])
    assert "__syncthreads();" in lines[wait0 + 1]
    redundant = {wait0, wait0 + 1}
    builds = {}
    for i in syncs:
        src = tmp_path / f"line{i + 1}.cu"
        src.write_text("\n".join(lines[:i] + ["// deleted: " + lines[i]] + lines[i + 1:]))
        out = tmp_path / f"line{i + 1}.so"
        builds[i] = (out, subprocess.Popen([cxx, *kbuild.GXX_FLAGS, f"-I{kbuild.HERE}", "-o", str(out), str(src)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for out, proc in builds.values():
        _, err = proc.communicate(timeout=kbuild.COMPILE_TIMEOUT_S)
        assert proc.returncode == 0, err.decode()[-2000:]
    builds[None] = (kbuild.build_emulator(), None)  # the kernel as it is (cached), which must pass: the emulator works
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _MUTANT_CASES, *(str(out) for out, _ in builds.values())],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    first_failure = dict(line.rsplit(" ", 1) for line in res.stdout.splitlines())
    assert first_failure[str(builds[None][0])] == "None", "the unmodified kernel fails in the emulator"
    missed = [f"line {i + 1}: {lines[i].strip()}" for i in syncs
              if i not in redundant and first_failure[str(builds[i][0])] == "None"]
    assert missed == [], "the emulator no longer notices these barriers missing"


def test_emulated_one_row_output_takes_any_row_stride(emu):
    """One query: ``out``'s row stride is never used.  A contiguous [1, N] view (e.g. ``[N, 1].t()``, row stride 1)
    passed the Python checks and was then refused by the C side (ldo >= N) with 'invalid sizes'."""
    q, c = make_inputs(Case("one", 1, 7, 4, 8, 32, 4, 8), "cpu")
    out = torch.empty(7, 1).t()  # [1, 7], strides (1, 1)
    assert out.is_contiguous() and out.stride(0) < 7
    emu.maxsim(q, c, 4, 8, out)
    assert (out.double() - reference_scores(q, c, 4, 8)).abs().max() <= TOL


@pytest.mark.parametrize("layout", ["padded", "transposed", "offset", "odd-stride", "item-stride"])
def test_selfcheck_layouts_are_the_documented_memory_layouts(layout):
    """Each layout holds the contiguous case's values in the memory layout it names, so that the emulation and
    GPU cases really exercise strided / misaligned inputs (a layout falling back to contiguous still passes)."""
    case = Case("l", 3, 5, 4, 6, 16, 4, 6, layout=layout)
    q, c = make_inputs(case, "cpu")
    q0, c0 = make_inputs(Case("l", 3, 5, 4, 6, 16, 4, 6), "cpu")
    assert torch.equal(q, q0) and torch.equal(c, c0)
    want = {"padded": ((7 * 24, 24, 1), (9 * 24, 24, 1)),  # (R + 3) * (D + 8), D + 8
            "transposed": ((16, 3 * 16, 1), (6, 1, 5 * 6)),  # storage [R_q, nq, D] and [D, N, R_c]
            "offset": ((4 * 16, 16, 1), (6 * 16, 16, 1)),
            "odd-stride": ((4 * 17, 17, 1), (6 * 17, 17, 1)),
            "item-stride": ((4 * 16 + 1, 16, 1), (6 * 16 + 1, 16, 1))}[layout]
    assert (q.stride(), c.stride()) == want
    if layout == "offset":  # one bf16 element past a 16-byte boundary
        assert q.data_ptr() % 16 == 2 and c.data_ptr() % 16 == 2
    assert reference_scores(q, c, 2, 3).dtype == torch.float64


def test_run_case_reports_the_largest_error(monkeypatch):
    """run_case is what every emulation and GPU case asserts on: it must report the worst entry, and refuse
    scores of another shape or dtype."""
    from metaembed.maxsim import maxsim_reference

    case = Case("err", 2, 5, 3, 4, 16, 3, 4, dtype="fp32")

    def off_by_half(q, c, r_q, r_c, **kw):
        out = maxsim_reference(q, c, r_q, r_c).float()
        out[1, 3] += 0.5
        return out

    monkeypatch.setattr(kernels, "maxsim_cuda", off_by_half)
    assert run_case(case, "cpu") == pytest.approx(0.5, abs=1e-3)
    monkeypatch.setattr(kernels, "maxsim_cuda", lambda q, c, r_q, r_c, **kw: maxsim_reference(q, c, r_q, r_c).double())
    with pytest.raises(AssertionError, match="float64, expected"):
        run_case(case, "cpu")


def test_selfcheck_exit_status_reports_failures(emu, monkeypatch, capsys):
    from metaembed.kernels import selfcheck

    monkeypatch.setattr(selfcheck, "EMULATOR_CASES", EMULATOR_CASES[:2])
    assert selfcheck.main(["--emulate"]) == 0
    assert "2/2 cases passed" in capsys.readouterr().out
    assert selfcheck.main(["--emulate", "--tol", "-1"]) == 1  # every error exceeds a negative tolerance
    assert "0/2 cases passed" in capsys.readouterr().out


def test_selfcheck_cli_emulated():
    if kbuild.find_compiler() is None:
        pytest.skip("no C++ compiler")
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-m", "metaembed.kernels.selfcheck", "--emulate"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(EMULATOR_CASES)}/{len(EMULATOR_CASES)} cases passed" in res.stdout


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_gpu_kernel_available():
    assert kernels.is_available(), kernels.unavailable_reason()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_kernel_matches_fp64_reference(case):
    assert run_case(case, "cuda") <= TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("nq,D", [(1, 3584), (1000, 128)])
def test_gpu_top100_agreement(nq, D):
    q, c = make_inputs(Case("top", nq, 5003, 16, 64, D, 16, 64), "cuda")
    scores, ids = kernels.maxsim_topk_cuda(q, c, 100, 16, 64)
    ref = reference_scores(q, c, 16, 64)
    rs, ri = ref.topk(100, dim=1)
    # same set up to near-ties: every returned id scores (in fp64) within TOL of the true 100th
    picked = ref.gather(1, ids)
    assert (picked >= rs[:, -1:] - TOL).all()
    overlap = (ids.unsqueeze(2) == ri.unsqueeze(1)).any(2).float().mean()
    assert overlap >= 0.99
    assert (scores.double() - picked).abs().max() <= TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,algo", [(torch.float32, "simt"), (torch.bfloat16, "tensor_core")])
@pytest.mark.parametrize("r_q,r_c,tile_m", [(3, 4, 0), (3, 150, 16), (70, 3, 64)])
def test_gpu_kernel_propagates_nan_and_inf_like_the_reference(dtype, algo, r_q, r_c, tile_m):
    _check_nan_and_inf("cuda", None, dtype, algo, r_q, r_c, tile_m)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,algo", [("fp32", "simt"), ("bf16", "tensor_core")])
def test_gpu_split_rows_add_every_partial_sum(dtype, algo):
    """Thousands of blocks adding into the same scores, 20 times: a lost atomic add shows as an error of a whole
    row tile's partial sum (the emulator cannot show it; see _check_split_sums)."""
    _check_split_sums("cuda", None, dtype, algo, nq=64, N=3001, r_q=256, repeats=20)


@pytest.mark.gpu
@gpu
def test_gpu_maxsim_dispatches_to_kernel(monkeypatch):
    from metaembed.maxsim import maxsim

    q, c = make_inputs(Case("d", 3, 77, 4, 8, 128, 4, 8), "cuda")
    calls = []
    real = kernels.maxsim_cuda
    monkeypatch.setattr(kernels, "maxsim_cuda", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = maxsim(q, c, 2, 3)
    assert calls and (out.double() - reference_scores(q, c, 2, 3)).abs().max() <= TOL


@pytest.mark.gpu
@gpu
def test_gpu_kernel_on_second_device_and_stream():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    q, c = make_inputs(Case("dev1", 4, 99, 4, 8, 128, 4, 8), "cuda:1")
    torch.cuda.set_device(0)
    s = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(s):
        out = kernels.maxsim_cuda(q, c)
    s.synchronize()
    assert out.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == 0  # the library restores the caller's current device
    assert (out.double() - reference_scores(q, c, 4, 8)).abs().max() <= TOL


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_gpu_compute_sanitizer(tool):
    cases = "--quick" if tool == "memcheck" else "--tiny"  # racecheck is the slowest tool
    res = subprocess.run(["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", sys.executable, "-m",
                          "metaembed.kernels.selfcheck", cases], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


def test_unavailable_reason_names_a_device_whose_architecture_cannot_be_read(monkeypatch):
    """is_available() is False for a device torch cannot describe (e.g. cuda:7 on a one-GPU machine);
    unavailable_reason() raised torch's AssertionError instead of saying why."""
    from metaembed.kernels import ops

    def no_capability(device=None):
        raise AssertionError("Invalid device id")

    monkeypatch.delenv("METAEMBED_DISABLE_KERNELS", raising=False)
    monkeypatch.delenv("METAEMBED_KERNEL_LIB", raising=False)
    monkeypatch.setattr(ops, "_failures", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_capability)
    assert kernels.is_available("cuda:7") is False
    assert kernels.unavailable_reason("cuda:7") == \
        "cannot read the architecture of CUDA device 'cuda:7': AssertionError: Invalid device id"


def test_non_tensors_and_cpu_tensors_are_clear_errors():
    """maxsim_cuda read ``.requires_grad`` before checking its operands (AttributeError on a list); kernel_plan
    asked torch.cuda about a CPU tensor (AssertionError "Torch not compiled with CUDA enabled")."""
    c = torch.randn(3, 2, 8)
    with pytest.raises(TypeError, match="queries must be a torch.Tensor"):
        kernels.maxsim_cuda([[1.0]], c)
    with pytest.raises(ValueError, match="kernel_plan needs CUDA tensors .*got cpu"):
        kernels.kernel_plan(torch.randn(1, 2, 8), c)


def test_library_is_probed_on_the_device_it_is_built_for(monkeypatch, tmp_path):
    """The library is built for ``device``'s architecture, and ``metaembed_probe`` checks the library runtime's
    current device: probing while another GPU (of another architecture) was current failed, and
    is_available(device) stayed False for good, on a machine mixing e.g. sm_80 and sm_90 GPUs."""
    import contextlib

    from metaembed.kernels import ops

    current = {"device": 0}  # the current CUDA device, as the library runtime sees it
    archs = {0: "sm_80", 1: "sm_90"}

    @contextlib.contextmanager
    def device_ctx(d):
        prev = current["device"]
        if d is not None:
            current["device"] = torch.device(d).index if not isinstance(d, int) else d
        try:
            yield
        finally:
            current["device"] = prev

    class FakeLibrary:
        def __init__(self, path):
            self.arch = Path(path).name

        def probe(self):
            if archs[current["device"]] != self.arch:
                raise KernelError(f"no kernel image for {archs[current['device']]} in a {self.arch} library")

    monkeypatch.delenv("METAEMBED_DISABLE_KERNELS", raising=False)
    monkeypatch.delenv("METAEMBED_KERNEL_LIB", raising=False)
    monkeypatch.setattr(ops, "_libraries", {})
    monkeypatch.setattr(ops, "_failures", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", device_ctx)
    monkeypatch.setattr(ops, "current_arch",
                        lambda d=None: archs[current["device"] if d is None else torch.device(d).index])
    monkeypatch.setattr(ops, "build", lambda a: [tmp_path / a[0]])
    monkeypatch.setattr(ops, "KernelLibrary", FakeLibrary)
    assert kernels.is_available(torch.device("cuda:1")), kernels.unavailable_reason(torch.device("cuda:1"))
    assert kernels.is_available(torch.device("cuda:0"))
    assert current["device"] == 0  # the caller's current device is left as it was
    # a prebuilt METAEMBED_KERNEL_LIB (here for sm_80) is probed per architecture: keyed by its path alone, the
    # first device's answer was reused for the other, whichever asked first (a review helper)
    monkeypatch.setenv("METAEMBED_KERNEL_LIB", str(tmp_path / "sm_80"))
    for order in ((0, 1), (1, 0)):
        monkeypatch.setattr(ops, "_libraries", {})
        monkeypatch.setattr(ops, "_failures", {})
        seen = {d: kernels.is_available(torch.device(f"cuda:{d}")) for d in order}
        assert seen == {0: True, 1: False}, order


def test_emulated_empty_embedding_dim_scores_zero(emu):
    """D = 0: every inner product is an empty sum, so every score is 0 (as the torch path), not the
    uninitialised output buffer nor a 'D >= 1' error from the C side."""
    from metaembed.maxsim import maxsim_reference

    q, c = torch.randn(2, 3, 0), torch.randn(4, 5, 0)
    torch.full((2, 4), 7.0)  # a freed buffer of non-zeros for the output to (likely) reuse
    out = kernels.maxsim_cuda(q, c, 2, 5, library=emu)  # [2, 4]
    assert torch.equal(out, torch.zeros(2, 4)) and torch.equal(out, maxsim_reference(q, c, 2, 5).float())


def test_current_arch_is_sm_major_minor(monkeypatch):
    from metaembed.kernels import ops

    for cap, want in (((9, 0), "sm_90"), ((8, 6), "sm_86"), ((10, 0), "sm_100"), ((12, 1), "sm_121")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, cap=cap: cap)
        assert ops.current_arch() == want


def _fake_cuda_machine(monkeypatch, ops, tmp_path, build):
    """A CUDA machine (sm_90) as ops sees it, with ``build`` as the compiler and a library that probes fine."""
    import contextlib

    probes = []

    class FakeLibrary:
        def __init__(self, path):
            self.path = path

        def probe(self):
            probes.append(self.path)

    monkeypatch.delenv("METAEMBED_DISABLE_KERNELS", raising=False)
    monkeypatch.delenv("METAEMBED_KERNEL_LIB", raising=False)
    monkeypatch.setattr(ops, "_libraries", {})
    monkeypatch.setattr(ops, "_failures", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(ops, "build", build)
    monkeypatch.setattr(ops, "KernelLibrary", FakeLibrary)
    return probes


def test_library_is_built_and_probed_once_and_a_failed_build_is_remembered(monkeypatch, tmp_path):
    """``maxsim()`` asks ``is_available()`` on every CUDA call: the loaded library is kept per architecture
    (one build, one probe), and a failed build (nvcc missing or a compile error, seconds to minutes) is
    remembered with its reason instead of re-running nvcc on every call."""
    from metaembed.kernels import ops

    builds = []

    def fake_build(archs):
        builds.append(tuple(archs))
        return [tmp_path / archs[0]]

    probes = _fake_cuda_machine(monkeypatch, ops, tmp_path, fake_build)
    assert kernels.is_available() and kernels.is_available() and kernels.unavailable_reason() is None
    assert ops.load_library() is ops.load_library()
    assert builds == [("sm_90",)] and probes == [tmp_path / "sm_90"]

    def broken_build(archs):
        builds.append(tuple(archs))
        raise kbuild.BuildError("nvcc exploded")

    builds.clear()
    probes = _fake_cuda_machine(monkeypatch, ops, tmp_path, broken_build)
    assert kernels.is_available() is False and kernels.is_available() is False
    assert kernels.unavailable_reason() == "BuildError: nvcc exploded"
    assert builds == [("sm_90",)] and probes == []


def test_disabled_kernels_are_never_built_even_with_cuda(monkeypatch, tmp_path):
    """``METAEMBED_DISABLE_KERNELS=1`` turns the kernels off on a CUDA machine: no build, no probe."""
    from metaembed.kernels import ops

    def no_build(archs):
        raise AssertionError("disabled kernels must not be built")

    probes = _fake_cuda_machine(monkeypatch, ops, tmp_path, no_build)
    for value in ("1", "true", "YES", " on "):
        monkeypatch.setenv("METAEMBED_DISABLE_KERNELS", value)
        assert kernels.is_available() is False
        assert kernels.unavailable_reason() == "disabled by METAEMBED_DISABLE_KERNELS"
    assert probes == []


# ---------------------------------------------------------------------------------------------
# mutation review (mutkern): gaps that no test above pinned
# ---------------------------------------------------------------------------------------------
def test_a_build_of_several_archs_compiles_those_not_yet_cached(tmp_path):
    """One cached architecture is not all of them: ``build(("sm_80", "sm_90"))`` after ``build(("sm_80",))`` compiles
    sm_90.  Returning early when *any* library was current handed back a path with no library behind it, and the
    CI compile check passed without compiling sm_90."""
    cc = _counting_compiler(tmp_path / "nvcc")
    (p80,) = kbuild.build(("sm_80",), tmp_path / "out", nvcc=cc)
    assert kbuild.build(("sm_80", "sm_90"), tmp_path / "out", nvcc=cc) == [p80, p80.parent.parent / "sm_90" / p80.name]
    assert p80.read_text() == "1" and (p80.parent.parent / "sm_90" / p80.name).read_text() == "2"


def test_the_build_cli_compiles_sm80_and_sm90_by_default_and_honours_arch(tmp_path, monkeypatch, capsys):
    """``python -m metaembed.kernels`` (the documented CI compile check) builds sm_80 and sm_90 unless ``--arch``
    says otherwise; a bad ``--arch`` is exit status 1 with the reason, not a traceback."""
    monkeypatch.setenv("METAEMBED_NVCC", _counting_compiler(tmp_path / "nvcc"))
    assert kbuild.DEFAULT_ARCHS == ("sm_80", "sm_90")
    assert kbuild.main(["--out", str(tmp_path / "all")]) == 0
    assert sorted(p.parent.name for p in (tmp_path / "all").rglob("libmaxsim.so")) == ["sm_80", "sm_90"]
    assert kbuild.main(["--arch", "9.0", "--out", str(tmp_path / "one")]) == 0
    assert [p.parent.name for p in (tmp_path / "one").rglob("libmaxsim.so")] == ["sm_90"]
    capsys.readouterr()
    assert kbuild.main(["--arch", "sm_70", "--out", str(tmp_path / "old")]) == 1
    assert "sm_80 or newer" in capsys.readouterr().err and not (tmp_path / "old").exists()


def test_library_path_is_the_file_build_writes_for_every_spelling_of_an_arch(tmp_path):
    """``library_path`` (exported) normalises the architecture as ``build`` does: ``"9.0"``, ``"90"`` and
    ``"sm_90"`` are one library, and an unsupported architecture is refused rather than given a path."""
    want = kbuild.library_path("sm_90", tmp_path)
    assert [kbuild.library_path(a, tmp_path) for a in ("90", "9.0", "compute_90")] == [want] * 3
    assert kbuild.build(("9.0",), tmp_path, nvcc=_counting_compiler(tmp_path / "nvcc")) == [want]
    with pytest.raises(ValueError, match="sm_80 or newer"):
        kbuild.library_path("sm_70", tmp_path)


def test_a_library_of_another_abi_version_is_refused(emu, monkeypatch):
    """A cached or ``$METAEMBED_KERNEL_LIB`` library built from another ``maxsim.cu`` (argument list changed) is a
    KernelError naming both versions, not a call with mismatched arguments."""
    from metaembed.kernels import ffi

    monkeypatch.setattr(ffi, "ABI_VERSION", ffi.ABI_VERSION + 1)
    want = rf"ABI version {ffi.ABI_VERSION - 1}, this binding expects {ffi.ABI_VERSION}"
    with pytest.raises(KernelError, match=want):
        KernelLibrary(emu.path, emulated=True)


def test_operands_on_two_devices_are_refused_before_any_pointer_is_passed(emu):
    """The kernel reads both operands through raw pointers on the candidates' device: queries elsewhere (another
    GPU, the host, a meta tensor's null pointer) must be a ValueError naming both devices, whichever side is off."""
    from metaembed.kernels.ffi import check_operands

    q, c = torch.randn(2, 3, 8), torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="queries are on meta but candidates are on cpu"):
        check_operands(q.to("meta"), c)
    with pytest.raises(ValueError, match="queries are on cpu but candidates are on meta"):
        kernels.maxsim_cuda(q, c.to("meta"), library=emu)


def test_a_gpu_older_than_sm80_leaves_the_kernels_unavailable_not_an_error(monkeypatch, tmp_path):
    """On a T4 (sm_75) or V100 (sm_70) ``load_library`` refuses the architecture with a ValueError before any
    build; ``is_available()`` must turn that into False with the reason (``metaembed.maxsim`` then takes the
    torch path) instead of letting the ValueError out of every CUDA scoring call."""
    from metaembed.kernels import ops

    def no_build(archs):
        raise AssertionError("no library is built for an architecture the kernels do not support")

    probes = _fake_cuda_machine(monkeypatch, ops, tmp_path, no_build)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert kernels.is_available() is False and kernels.is_available() is False
    assert "sm_80 or newer" in kernels.unavailable_reason() and probes == []


# ---------------------------------------------------------------------------------------------
# mutation review (mutcuda): maxsim.cu mutants that no emulator test killed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,algo", [("fp32", "simt"), ("bf16", "tensor_core")])
def test_emulated_unsplit_store_honours_the_output_row_stride(emu, dtype, algo):
    """Without a split (r_q <= tile_m) each score is stored, not atomically added, and that store must use out's row
    stride too: ``KernelLibrary.maxsim`` takes a column slice of a larger buffer (row stride > N), but only the split
    path was run with one, so a store at ``q * N + n`` (scores of row q written into rows q-1's tail / q+1's columns,
    the slice's own rows partly never written) passed every test."""
    nq, N, r_q, r_c = 3, 7, 4, 8
    q, c = make_inputs(Case("ldo", nq, N, r_q, r_c, 32, r_q, r_c, dtype=dtype), "cpu")
    assert not emu.plan(q, c, r_q, r_c, algo=algo).split
    big = torch.full((nq, 2 * N + 5), 7.0)
    out = big[:, :N]  # ldo = 2N + 5
    emu.maxsim(q, c, r_q, r_c, out, algo=algo)
    assert torch.equal(big[:, N:], torch.full((nq, N + 5), 7.0))
    assert (out.double() - reference_scores(q, c, r_q, r_c)).abs().max() <= TOL


def test_c_entry_point_refuses_each_negative_stride_and_a_row_stride_below_n(emu):
    """test_c_entry_point_refuses_negative_strides negates only the queries' item stride: accepting a negative
    vector / element stride of either operand (a reversed numpy / CuPy view read as zero rows, scores returned with
    status 0) or an ``ldo < N`` (rows of ``out`` overlapping) passed.  The operands sit in the middle of buffers
    three times their size, so a call that wrongly goes ahead reads only inside them."""
    import ctypes

    nq, N, R, D = 3, 4, 2, 8
    qbuf, cbuf = torch.randn(3 * nq * R * D), torch.randn(3 * N * R * D)
    qp = ctypes.c_void_p(qbuf.data_ptr() + nq * R * D * 4)
    cp = ctypes.c_void_p(cbuf.data_ptr() + N * R * D * 4)
    out = torch.full((nq * N + 8,), -7.0)
    good = [R * D, D, 1, R * D, D, 1]  # sq0, sq1, sq2, sc0, sc1, sc2
    for pos in range(6):
        strides = list(good)
        strides[pos] = -strides[pos]
        code = emu._lib.metaembed_maxsim(0, qp, cp, ctypes.c_void_p(out.data_ptr()), nq, N, R, R, D, *strides, N,
                                         0, 0, -1, None)
        assert code != 0 and "strides >= 0" in emu.error_string(code), f"negative stride #{pos} accepted"
    code = emu._lib.metaembed_maxsim(0, qp, cp, ctypes.c_void_p(out.data_ptr()), nq, N, R, R, D, *good, N - 1,
                                     0, 0, -1, None)
    assert code != 0 and "ldo >= N" in emu.error_string(code)
    assert out.eq(-7.0).all()  # nothing written


def test_emulated_auto_tile_is_16_rows_exactly_while_all_padded_query_rows_fit_one_tile(emu):
    """tile_m=0 takes the memory-bound plan (BM = 16, one row tile: the index is streamed once) exactly when
    nq * next_pow2(r_q) <= 16; past that, a 16-row plan has several row tiles that each stream the whole index,
    so BM = 64.  Only (1 x 16) and (100 x 16) were pinned: a bound of 32, or nq * r_q for the padded rows, passed."""
    for nq, r_q, want in ((1, 16, 16), (16, 1, 16), (4, 4, 16), (2, 8, 16), (8, 2, 16), (3, 5, 64), (5, 3, 64),
                          (17, 1, 64), (2, 9, 64), (1, 17, 64), (3, 6, 64)):
        q, c = make_inputs(Case("t", nq, 5, r_q, 2, 16, r_q, 2), "cpu")
        p = emu.plan(q, c, r_q, 2)
        assert p.tile_m == want, (nq, r_q, p)
        if want == 16:
            assert p.row_tiles == 1


def test_emulated_single_item_operand_keeps_16_byte_loads_whatever_its_item_stride(emu):
    """The item stride of an operand with one item (nq = 1: a single query, the usual search call; or N = 1) is
    never used, so it must not turn off the 16-byte cp.async path; the scores stay exact either way."""
    case = Case("one", 1, 3, 2, 2, 64, 2, 2)
    q1, _ = make_inputs(Case("one", 1, 3, 2, 2, 64, 2, 2, layout="item-stride"), "cpu")
    q, c = make_inputs(case, "cpu")
    _, c1 = make_inputs(Case("one", 1, 1, 2, 2, 64, 2, 2, layout="item-stride"), "cpu")
    assert q1.stride(0) % 8 != 0 and c1.stride(0) % 8 != 0
    for qq, cc in ((q1, c), (q, c1)):
        assert emu.plan(qq, cc, 2, 2).vectorized
        out = kernels.maxsim_cuda(qq, cc, library=emu)
        assert (out.double() - reference_scores(qq, cc, 2, 2)).abs().max() <= TOL


def test_emulated_d_slice_of_a_wider_buffer_with_aligned_strides_uses_element_loads(emu):
    """16-byte loads need D % 8 == 0 as well as 16-byte-aligned strides: a D = 98 slice of rows 104 wide has every
    stride a multiple of 8, and a 16-byte chunk straddling D would read padding elements into the dot products
    (the last chunk is all in or all out only when D % 8 == 0; fp32: D % 4; 98 is 2 mod either).
    Contiguous odd-D cases have the vector stride D and fail the stride check anyway, so dropping ``d % epc == 0``
    passed, and such a slice scored silently wrong (max error 7.7 on scores up to 53)."""
    g = torch.Generator().manual_seed(0)
    for dt in (torch.bfloat16, torch.float32):
        qb, cb = torch.randn(3, 4, 104, generator=g).to(dt), torch.randn(9, 8, 104, generator=g).to(dt)
        q, c = qb[..., :98], cb[..., :98]  # padding columns 98..103 hold non-zero values
        assert not emu.plan(q, c, 3, 5).vectorized
        out = kernels.maxsim_cuda(q, c, 3, 5, library=emu)
        ref = reference_scores(q, c, 3, 5)
        assert (out.double() - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("side", ["vector-stride", "pointer"])
def test_emulated_candidates_alone_misaligned_turn_off_16_byte_loads(emu, side):
    """Only the candidates' vector stride (odd, with an aligned item stride) or only their data pointer misaligned,
    the queries aligned: the plan must fall back to element loads.  The cases misaligned both operands (or only the
    item stride), so dropping ``ok(sc1, rc)`` or ``aligned16(c)`` from make_plan passed (on a GPU: a misaligned
    cp.async, error 716)."""
    q, c = make_inputs(Case("one", 2, 9, 4, 8, 64, 3, 5), "cpu")
    if side == "vector-stride":  # [9, 8, 65] storage: item stride 520 (a multiple of 8), vector stride 65
        c = torch.zeros(9, 8, 65, dtype=c.dtype)[..., :64].copy_(c)
        assert c.stride() == (520, 65, 1)
    else:
        c = torch.zeros(c.numel() + 1, dtype=c.dtype)[1:].view(c.shape).copy_(c)
        assert c.data_ptr() % 16 != 0 and q.data_ptr() % 16 == 0
    assert not emu.plan(q, c, 3, 5).vectorized
    out = kernels.maxsim_cuda(q, c, 3, 5, library=emu)
    assert (out.double() - reference_scores(q, c, 3, 5)).abs().max() <= TOL
