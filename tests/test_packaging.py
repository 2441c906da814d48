"""environment.yml and pyproject.toml describe the same dependencies; no torchvision anywhere."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load_toml(path: Path) -> dict:
    """``tomllib`` (Python >= 3.11) or, on the 3.10 that pyproject allows, ``tomli`` when installed."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 reads TOML with tomli")
    return tomllib.loads(path.read_text())


def _norm(spec: str) -> str:
    return spec.replace(" ", "").lower()


def test_environment_yml_matches_pyproject():
    project = _load_toml(ROOT / "pyproject.toml")["project"]
    wanted = {_norm(s) for s in project["dependencies"]} | {_norm(s) for s in project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    have = {_norm(s) for s in pip if not s.startswith("-e")}
    assert have == wanted, f"only in environment.yml: {have - wanted}; only in pyproject: {wanted - have}"


# standard-library modules newer than some Python that pyproject's requires-python admits
_STDLIB_SINCE = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}


def _unguarded_imports(tree: ast.Module) -> set[str]:
    """Modules imported at module level outside ``try`` / ``if`` (an import there fails the whole file)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_sources_import_on_the_oldest_supported_python():
    """Every lib/ and tests/ module imports on the oldest Python of ``requires-python``: a module-level
    ``import tomllib`` (3.11+) under ``>=3.10`` made pytest stop at collection there (``make test`` failed)."""
    spec = _load_toml(ROOT / "pyproject.toml")["project"]["requires-python"]
    oldest = tuple(int(x) for x in spec.removeprefix(">=").split(".")[:2])
    too_new = []
    for path in sorted([*(ROOT / "lib").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for name in _unguarded_imports(ast.parse(path.read_text())):
            since = _STDLIB_SINCE.get(name)
            if since and since > oldest:
                too_new.append(f"{path.relative_to(ROOT)}: import {name} needs Python {since}, requires-python {spec}")
    assert not too_new, "\n".join(too_new)


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_ci_compiles_the_kernel_when_nvcc_is_only_under_cuda_home(tmp_path, var):
    """.ci/run runs the kernel compile check wherever .ci/compile_kernels.sh finds nvcc ($CUDA_HOME/bin or
    $CUDA_PATH/bin too, as kernels.build.find_nvcc does, not only PATH), and a failing compile stops CI before
    the tests (a broken kernel cannot land)."""
    import os
    import shutil
    import subprocess

    tree = tmp_path / "clone"
    (tree / ".ci").mkdir(parents=True)
    for name in ("run", "compile_kernels.sh"):
        shutil.copy(ROOT / ".ci" / name, tree / ".ci" / name)
    (tree / "lib").symlink_to(ROOT / "lib")
    (tree / "Makefile").write_text("test:\n\t@echo MAKE-TEST-RAN\n")
    cuda_bin = tmp_path / "cuda" / "bin"
    cuda_bin.mkdir(parents=True)
    marker = tmp_path / "nvcc-called"
    (cuda_bin / "nvcc").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\necho 'nvcc: broken kernel' >&2\nexit 1\n")
    (cuda_bin / "nvcc").chmod(0o755)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "nvcc")))  # no nvcc on PATH
    env = {"HOME": str(tmp_path), "PATH": path, var: str(tmp_path / "cuda"), "PYTHON": sys.executable,
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", ".ci/run"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert marker.exists(), f"CI skipped the kernel compile check although ${var}/bin/nvcc exists:\n{out}"
    assert proc.returncode != 0 and "MAKE-TEST-RAN" not in out, out


def test_no_torchvision_dependency():
    text = (ROOT / "pyproject.toml").read_text() + (ROOT / "environment.yml").read_text()
    assert "torchvision" not in text


# Imported by lib/ without being declared: each arrives with the declared package named here (checked against
# that package's own requirements), or is optional (imported inside a function, for an extra feature).
_ARRIVES_WITH = {"tokenizers": "transformers", "huggingface_hub": "transformers", "nbformat": "papermill"}
_OPTIONAL = {"umap", "maxsim_cpu"}


def _requirement_name(spec: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_every_package_lib_imports_is_declared():
    """A third-party module lib/ imports is a declared dependency (or comes with one, or is optional):
    matplotlib, which plotting draws every figure with, arrived only through seaborn, so its oldest
    working version was never chosen or tested."""
    from importlib.metadata import packages_distributions, requires

    project = _load_toml(ROOT / "pyproject.toml")["project"]
    declared = {_requirement_name(s) for s in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    dists = packages_distributions()
    problems = []
    for path in sorted((ROOT / "lib").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {n.split(".")[0] for n in _unguarded_imports(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"metaembed"}:
                where = f"{path.relative_to(ROOT)}:{node.lineno} imports {top}"
                if top in _OPTIONAL:
                    if top in top_level:
                        problems.append(f"{where} at module level (optional: import it where it is used)")
                elif top in _ARRIVES_WITH:
                    parent = _ARRIVES_WITH[top]
                    if parent not in declared or top.replace("_", "-") not in {
                            _requirement_name(r) for r in requires(parent) or []}:
                        problems.append(f"{where}, which {parent} (declared: {parent in declared}) does not require")
                elif not {d.lower().replace("_", "-") for d in dists.get(top, [top])} & declared:
                    problems.append(f"{where}, from {dists.get(top, ['?'])}, not declared in pyproject.toml")
    assert not problems, "\n".join(sorted(set(problems)))

# What the GPU image (experiments/gpu_check.sh runs there with its own python3 and lib/ on PYTHONPATH)
# does not have: notebook tooling and the optional comparison packages.
_NOT_ON_GPU_IMAGE = ("nbformat", "papermill", "nbval", "nbclient", "ipykernel", "jupyter_client", "pytrec_eval",
                     "maxsim_cpu", "umap")

_BLOCKER = '''
import importlib.util, sys
BLOCK = set({names!r})
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Absent())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in BLOCK else _find_spec(name, package))
'''


def test_gpu_check_runs_without_notebook_tooling(tmp_path):
    """gpu_check.sh's modules import, and its pytest step collects, where notebook packages are absent
    (one collection error would stop the whole GPU pytest run on the GPU machine)."""
    import os
    import subprocess
    import sys

    script = (ROOT / "experiments" / "gpu_check.sh").read_text()
    assert 'grep -l "^@pytest.mark.gpu" tests/test_*.py' in script  # the selection replicated below
    gpu_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if any(line.startswith("@pytest.mark.gpu") for line in p.read_text().splitlines()))
    assert "tests/test_kernels.py" in gpu_tests
    (tmp_path / "sitecustomize.py").write_text(_BLOCKER.format(names=_NOT_ON_GPU_IMAGE))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "lib")]))
    env.pop("PYTEST_ADDOPTS", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    blocked = run("-c", "import nbformat")
    assert blocked.returncode != 0 and "No module named 'nbformat'" in blocked.stderr  # the blocker works
    imports = run("-c", "import metaembed, metaembed.bench, metaembed.train_bench, metaembed.kernels, "
                        "metaembed.kernels.selfcheck, metaembed.index, metaembed.maxsim")
    assert imports.returncode == 0, imports.stderr[-3000:]
    collect = run("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:nbval", "-m", "gpu",
                  *gpu_tests)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert "error" not in collect.stdout.lower()


def test_gpu_check_step_limits_fit_one_device_call():
    """The device tool runs one command for at most 600 s: the steps' own limits must leave room."""
    import re

    script = (ROOT / "experiments" / "gpu_check.sh").read_text()
    limits = {m[0]: int(m[1]) for m in re.findall(r"^\s*step (\w+) (\d+) ", script, flags=re.M)}
    assert {"env", "compile", "pytest_gpu", "bench", "train_bench", "sanitizer_memcheck"} <= set(limits)
    assert sum(limits.values()) <= 590, limits


def test_gpu_check_train_bench_command_is_a_valid_setting():
    """The train_bench step's own command line parses and validates (batch syntax, --pool for the plain 64,
    the eval path's image size) and asks for what its comment says: 3B, 448 px, plain 8 / 64, GradCache 128/64."""
    import argparse
    import re
    import shlex

    from metaembed.train_bench import _config_from_args, add_arguments

    script = (ROOT / "experiments" / "gpu_check.sh").read_text()
    joined = script.replace("\\\n", " ")  # continuation lines joined
    (line,) = re.findall(r'^step train_bench \d+ "\$PY" -m metaembed\.train_bench (.*)$', joined, flags=re.M)
    argv = shlex.split(line.replace('"$OUT_DIR/train_bench.json"', "out.json"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = _config_from_args(parser.parse_args(argv))
    cfg.validate()
    assert cfg.backbone == "metaembed-3b" and cfg.image_size == 448 and cfg.dtype == "bfloat16"
    assert cfg.batches == [(8, None), (64, None), (128, 64)] and cfg.steps >= 1 and cfg.eval_queries_per_task > 0
