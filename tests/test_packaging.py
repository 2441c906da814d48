"""environment.yml and pyproject.toml describe the same dependencies; no torchvision anywhere."""
from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(spec: str) -> str:
    return spec.replace(" ", "").lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(s) for s in project["dependencies"]} | {_norm(s) for s in project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    have = {_norm(s) for s in pip if not s.startswith("-e")}
    assert have == wanted, f"only in environment.yml: {have - wanted}; only in pyproject: {wanted - have}"


def test_no_torchvision_dependency():
    text = (ROOT / "pyproject.toml").read_text() + (ROOT / "environment.yml").read_text()
    assert "torchvision" not in text


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
