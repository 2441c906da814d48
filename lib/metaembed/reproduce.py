"""Reproduce the notebooks' results with papermill: ``metaembed reproduce``.

Each reproduction run is a *parameter set*, one YAML file in ``experiments/``::

    name: mmr_ablation                    # = the file's stem
    notebook: notebooks/mmr_ablation.ipynb
    description: MMR on vs off, P@1 per budget (Table 5, Fig. 4b)
    cpu: true                             # false: needs a GPU, only run when named or --include-gpu
    parameters: {max_steps: 200, ...}     # passed to the notebook's `parameters` cell
    quick: {max_steps: 20}                # overrides applied with --quick

:func:`reproduce` first checks every selected set against its notebook's
``parameters`` cell, then executes each with papermill into
``experiments/runs/<name>/<notebook>.ipynb`` (git-ignored; ``--quick`` runs go
to ``experiments/runs/quick/<name>/``), passing the set's parameters plus
``output_dir`` (that run folder, absolute) and ``figures_dir`` (absolute).
Path parameters (named ``*_path``, ``*_dir``, ``*_root``, or ``checkpoints``)
are written relative to the repository root and passed as absolute paths, since
notebooks execute in ``notebooks/``.  Each notebook writes its tables
(``*.csv``) and numbers (``*.json``) into ``output_dir`` and its figures into
``figures_dir`` (``figures/``, or ``figures/<set name>/`` for a set not named after
its notebook, e.g. ``mmr_ablation_paper``: the figure file names are the
notebook's); the runner then writes ``summary.md`` next to the run folders,
collecting every table.

A failing notebook raises :class:`NotebookExecutionError`, whose message names
the parameter set, the notebook, the failing cell (its position in the source
notebook and its ``In [n]`` in the executed copy) and the exception; with
``keep_going`` the other sets still run and a :class:`ReproductionError`
listing every failure is raised at the end.

Notebooks run on a kernel of the *current* Python interpreter: a temporary
kernelspec is put first on ``JUPYTER_PATH`` for the duration of the run, so no
``ipykernel install`` is needed (``ipykernel`` must be importable).  Pass
``kernel_name`` to use an installed kernelspec instead.

Notebook hygiene: :func:`strip_notebook` removes outputs, execution counts and
papermill/Jupyter metadata from committed notebooks (keeping the outputs of
cells marked ``# NBVAL_CHECK_OUTPUT``), and :func:`check_notebook` lists what
still violates the rules (one ``parameters`` cell, imports metaembed, < 400 KB).
``python -m metaembed.reproduce strip notebooks/*.ipynb`` / ``... check ...``
run them from the command line.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write
from .config import ConfigError, RunConfig, apply_overrides, config_from_dict, dotted_overrides, read_yaml

__all__ = [
    "MAX_NOTEBOOK_BYTES",
    "NBVAL_MARKER",
    "NotebookExecutionError",
    "ParameterSet",
    "ParameterSetError",
    "ReproductionError",
    "RunsFolderBusyError",
    "RunResult",
    "add_arguments",
    "check_notebook",
    "check_parameters",
    "find_root",
    "is_path_parameter",
    "load_parameter_sets",
    "main",
    "markdown_table",
    "reproduce",
    "run",
    "run_fingerprint",
    "runs_dir",
    "strip_notebook",
    "write_summary",
]

#: Code cells containing this marker keep their outputs (nbval checks them).
NBVAL_MARKER = "# NBVAL_CHECK_OUTPUT"
#: Size limit of a committed notebook.
MAX_NOTEBOOK_BYTES = 400 * 1024
#: Parameters every notebook receives from the runner (and must declare in its parameters cell).
INJECTED_PARAMETERS = ("output_dir", "figures_dir")
#: Parameters named ``*<suffix>`` hold file-system paths, relative to the repository root in a set.
PATH_SUFFIXES = ("_path", "_dir", "_root")
#: Path parameters whose names do not say so (``checkpoints``: published name -> checkpoint folder).
PATH_PARAMETERS = ("checkpoints",)
#: Subfolder of ``out_root`` that holds ``--quick`` runs (run folders, summary, figures).
QUICK_SUBDIR = "quick"

_SET_KEYS = {"name", "notebook", "parameters", "quick", "cpu", "description", "after"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Names a set cannot take: its run folder ``<out_root>/<name>`` would be the quick-runs folder, the quick
#: figures folder or the summary file, and emptying it before the run would delete them.
_RESERVED_NAMES = (QUICK_SUBDIR, "figures", "summary.md")
_STATUS_FILE = ".reproduce.json"
_LOCK_FILE = ".reproduce.lock"
_KERNEL_NAME = "metaembed-reproduce"


class ParameterSetError(ValueError):
    """An ``experiments/*.yaml`` parameter set is malformed, unknown or does not match its notebook."""


class NotebookExecutionError(RuntimeError):
    """A notebook failed while being executed; the message names the notebook and the failing cell."""

    def __init__(
        self,
        message: str,
        *,
        name: str,
        notebook: Path,
        output_notebook: Path | None = None,
        cell_index: int | None = None,
        exec_count: int | None = None,
        ename: str | None = None,
        evalue: str | None = None,
    ) -> None:
        super().__init__(message)
        self.name = name
        self.notebook = notebook
        self.output_notebook = output_notebook
        self.cell_index = cell_index  # 0-based index in the source notebook (all cell types)
        self.exec_count = exec_count  # In [n] of the executed notebook
        self.ename = ename
        self.evalue = evalue


class RunsFolderBusyError(RuntimeError):
    """Another ``reproduce`` is running into the same runs folder (its run folders would be emptied under it)."""


class ReproductionError(RuntimeError):
    """One or more notebooks failed under ``keep_going``; ``.failures`` and ``.results`` hold the details."""

    def __init__(self, failures: list[NotebookExecutionError], results: list[RunResult], summary: Path | None):
        lines = [f"{len(failures)} of {len(results)} notebook(s) failed:"] + [f"  - {f}" for f in failures]
        if summary is not None:
            lines.append(f"summary: {summary}")
        super().__init__("\n".join(lines))
        self.failures = failures
        self.results = results
        self.summary = summary


@dataclasses.dataclass
class ParameterSet:
    """One reproduction run: a notebook and the parameters it is executed with."""

    name: str
    notebook: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    quick: dict[str, Any] = dataclasses.field(default_factory=dict)
    cpu: bool = True
    description: str = ""
    path: Path | None = None  # the YAML file
    after: tuple[str, ...] = ()  # sets that run first when selected together (their results are read)

    def resolved_parameters(self, quick: bool = False, root: Path | None = None) -> dict[str, Any]:
        """``parameters`` with the ``quick`` overrides applied when ``quick``.

        With ``root``, relative paths in path parameters (:func:`is_path_parameter`)
        become absolute paths under ``root`` (notebooks run with ``notebooks/`` as
        their working directory, so a relative path would resolve there).
        """
        params = dict(self.parameters)
        if quick:
            params.update(self.quick)
        if root is not None:
            params = {k: _absolute_paths(v, root) if is_path_parameter(k) else v for k, v in params.items()}
        return params


def is_path_parameter(name: str) -> bool:
    """Whether a set's parameter holds paths: named ``*_path``, ``*_dir``, ``*_root``, or in :data:`PATH_PARAMETERS`."""
    return name.endswith(PATH_SUFFIXES) or name in PATH_PARAMETERS


def _absolute_paths(value: Any, root: Path) -> Any:
    """Relative path strings in ``value`` made absolute under ``root``.

    Paths: a string, the strings of a list, a mapping's string values and, in a
    mapping's mapping values (``{path: ..., lr: ...}``), the ``path`` / ``*_path`` entries.
    """
    if isinstance(value, str):
        return value if not value or Path(value).is_absolute() else str(root / value)
    if isinstance(value, (list, tuple)):
        return [_absolute_paths(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _absolute_paths(v, root) if not isinstance(v, dict) else
                {k2: _absolute_paths(v2, root) if k2 == "path" or is_path_parameter(str(k2)) else v2
                 for k2, v2 in v.items()}
                for k, v in value.items()}
    return value  # None (no path), numbers


@dataclasses.dataclass
class RunResult:
    """Outcome of one executed parameter set."""

    name: str
    notebook: Path
    output_notebook: Path
    output_dir: Path
    ok: bool
    seconds: float
    quick: bool
    parameters: dict[str, Any]
    error: NotebookExecutionError | None = None
    figures: list[Path] = dataclasses.field(default_factory=list)
    skipped: bool = False  # ``skip_done``: an earlier run of the same inputs was kept, nothing executed


# --------------------------------------------------------------------------- parameter sets


def find_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The repository root: the first of ``start`` (default: cwd) and its parents holding ``experiments/``.

    Falls back to the checkout this module is installed from (editable installs).
    """
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "experiments").is_dir() and ((d / "notebooks").is_dir() or (d / "pyproject.toml").exists()):
            return d
    pkg_root = Path(__file__).resolve().parents[2]
    if (pkg_root / "experiments").is_dir():
        return pkg_root
    raise ParameterSetError(f"no experiments/ folder found in {here} or its parents; pass root=")


def _load_set(path: Path) -> ParameterSet:
    try:
        data = read_yaml(path.read_text()) or {}  # a key given twice is an error
    except yaml.YAMLError as e:
        raise ParameterSetError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParameterSetError(f"{path}: top level must be a mapping")
    unknown = sorted(set(data) - _SET_KEYS)
    if unknown:
        raise ParameterSetError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(_SET_KEYS)}")
    name = data.get("name", path.stem)
    if name != path.stem:
        raise ParameterSetError(f"{path}: name {name!r} must equal the file name {path.stem!r}")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ParameterSetError(f"{path}: invalid name {name!r}")
    if name in _RESERVED_NAMES:
        raise ParameterSetError(f"{path}: {name!r} is reserved (a folder or file of experiments/runs/); "
                                f"reserved: {list(_RESERVED_NAMES)}")
    if not isinstance(data.get("notebook"), str):
        raise ParameterSetError(f"{path}: 'notebook' (path of the .ipynb, relative to the repository root) is required")
    params = data.get("parameters") or {}
    quick = data.get("quick") or {}
    for key, value in (("parameters", params), ("quick", quick)):
        if not isinstance(value, dict):
            raise ParameterSetError(f"{path}: {key!r} must be a mapping")
    reserved = sorted(set(params) & set(INJECTED_PARAMETERS))
    if reserved:
        raise ParameterSetError(f"{path}: parameters {reserved} are set by the runner, remove them")
    stray = sorted(set(quick) - set(params))
    if stray:
        raise ParameterSetError(f"{path}: quick overrides {stray} are not in 'parameters' (typo?)")
    cpu = data.get("cpu", True)
    if not isinstance(cpu, bool):
        raise ParameterSetError(f"{path}: 'cpu' must be true or false")
    after = data.get("after") or []
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise ParameterSetError(f"{path}: 'after' must be a set name or a list of set names")
    return ParameterSet(
        name=name, notebook=data["notebook"], parameters=params, quick=quick, cpu=cpu,
        description=str(data.get("description") or "").strip(), path=path, after=tuple(after),
    )


def _run_order(selected: list[ParameterSet]) -> list[ParameterSet]:
    """Stable topological order: a set runs after the selected sets named in its ``after``."""
    pending = {s.name: s for s in selected}
    done: list[ParameterSet] = []
    while pending:
        ready = next((s for s in pending.values() if not set(s.after) & pending.keys()), None)
        if ready is None:
            raise ParameterSetError(f"'after' dependencies form a cycle among: {', '.join(pending)}")
        done.append(pending.pop(ready.name))
    return done


def _check_references(s: ParameterSet, known: Sequence[str]) -> None:
    """The set names ``s`` refers to (``after``, ``accuracy_run``) exist and are consistent."""
    unknown = [a for a in s.after if a not in known]
    if unknown:  # a typo in 'after' would silently drop the ordering (and the results it reads)
        raise ParameterSetError(f"{s.path or s.name}: 'after' names unknown parameter set(s) {unknown}; "
                                f"known: {', '.join(known)}")
    for where, values in (("parameters", s.parameters), ("quick", s.quick)):
        run = values.get("accuracy_run")  # efficiency's accuracy_run: a typo left its accuracy column empty
        if run is not None and run not in s.after:
            raise ParameterSetError(f"{s.path or s.name}: {where}.accuracy_run={run!r} must name a set in its "
                                    f"'after' {list(s.after)} (the run whose results it reads); known sets: "
                                    f"{', '.join(known)}")


def load_parameter_sets(
    names: Sequence[str] | None = None,
    include_gpu: bool = False,
    *,
    experiments_dir: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> list[ParameterSet]:
    """Load ``experiments/*.yaml`` parameter sets, sorted by name (then by their ``after`` keys).

    Args:
        names: the sets to load, in this order (``after`` keys permitting); ``None``/empty: every CPU set
            (``cpu: true``), plus GPU sets with ``include_gpu``.  A named set is
            always loaded, GPU or not.  Unknown names raise, listing the known ones.
        include_gpu: also select ``cpu: false`` sets when ``names`` is empty.
        experiments_dir: default ``<root>/experiments``.
        root: repository root (default :func:`find_root`).
    """
    exp = Path(experiments_dir) if experiments_dir is not None else Path(root or find_root()) / "experiments"
    if not exp.is_dir():
        raise ParameterSetError(f"experiments folder not found: {exp}")
    stray = sorted(p.name for p in exp.glob("*.yml"))
    if stray:  # only *.yaml is read: a .yml set would be skipped without a word
        raise ParameterSetError(f"{exp}: parameter sets must end in .yaml; rename {stray}")
    paths = {p.stem: p for p in sorted(exp.glob("*.yaml"))}
    if names:
        missing = [n for n in names if n not in paths]
        if missing:
            raise ParameterSetError(f"unknown parameter set(s) {missing}; "
                                    f"known: {', '.join(sorted(paths)) or '(none)'}")
    sets: dict[str, ParameterSet] = {}
    for stem, path in paths.items():
        try:
            s = _load_set(path)
            _check_references(s, sorted(paths))
        except ParameterSetError as e:
            if not names or stem in names:
                raise
            # a set being edited must not block running the others; it is still checked (and named) here
            warnings.warn(f"parameter set {stem!r} skipped (not selected, and invalid): {e}", stacklevel=2)
            continue
        sets[s.name] = s
    if names:
        return _run_order([sets[n] for n in dict.fromkeys(names)])
    return _run_order([s for s in sets.values() if s.cpu or include_gpu])


def _declared_parameters(notebook: Path) -> dict[str, Any] | None:
    """Names declared in the notebook's ``parameters`` cell (None when it has none)."""
    import nbformat
    import papermill

    nb = nbformat.read(notebook, as_version=4)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        return None
    return papermill.inspect_notebook(str(notebook))


def check_parameters(ps: ParameterSet, root: Path) -> None:
    """Raise :class:`ParameterSetError` unless the notebook exists and declares every parameter the set passes,
    each (and each ``quick`` override) of the kind of the notebook's default (:func:`_compatible`), and every
    dotted key of an ``overrides`` parameter is a :class:`~metaembed.config.RunConfig` field of its type.

    A YAML scalar where the notebook expects a list (``tiny_sizes: xs``) would otherwise be iterated
    character by character, and ``1e-3`` (a string in YAML 1.1) would reach the notebook as text.
    """
    nb = root / ps.notebook
    if not nb.exists():
        raise ParameterSetError(f"parameter set {ps.name!r}: notebook {ps.notebook} not found under {root}")
    try:
        declared = _declared_parameters(nb)
    except Exception as e:  # noqa: BLE001 - a conflicted or truncated .ipynb, a folder: name the set and file
        raise ParameterSetError(f"parameter set {ps.name!r}: cannot read {ps.notebook}: {type(e).__name__}: {e}") \
            from None
    if declared is None:
        raise ParameterSetError(f"parameter set {ps.name!r}: {ps.notebook} has no cell tagged 'parameters'")
    problems = []  # undeclared names and type mismatches, all listed at once
    missing = sorted((set(ps.parameters) | set(INJECTED_PARAMETERS)) - set(declared))
    if missing:
        problems.append(f"{ps.notebook}'s parameters cell does not declare {missing}; it declares "
                        f"{sorted(declared)}")
    wrong = []
    for where, values in (("parameters", ps.parameters), ("quick", ps.quick)):
        for key, value in values.items():
            default = _literal_default(declared[key].get("default")) if key in declared else _NOT_LITERAL
            if default is not _NOT_LITERAL and not _compatible(value, default):
                wrong.append(f"{where}.{key} = {value!r} ({_kind(value)}) where the notebook's default is "
                             f"{default!r} ({_kind(default)})")
    if wrong:
        problems.append(f"type mismatch with {ps.notebook}'s parameters cell: " + "; ".join(wrong))
    if problems:
        raise ParameterSetError(f"parameter set {ps.name!r} ({ps.path}): " + "; ".join(problems))
    for where, values in (("parameters", ps.parameters), ("quick", ps.quick)):
        overrides = values.get("overrides")
        if isinstance(overrides, dict) and overrides:  # a typo here failed only once that notebook ran
            try:
                config_from_dict(apply_overrides(RunConfig().to_dict(), dict(overrides)), validate=False)
            except ConfigError as e:
                raise ParameterSetError(f"parameter set {ps.name!r} ({ps.path}): {where}.overrides: {e}") from None
            from .ablations import override_conflicts

            # the notebook passes its parameters to config_from_params (a `seeds` list as seed=seeds[0]), which
            # refuses these too, but only once the notebook runs
            names = set(declared) | ({"seed"} if "seeds" in declared else set())
            conflicts = override_conflicts(dotted_overrides(overrides), names)
            if conflicts:
                raise ParameterSetError(f"parameter set {ps.name!r} ({ps.path}): {where}.overrides: "
                                        + "; ".join(conflicts))


_NOT_LITERAL = object()


def _literal_default(source: Any) -> Any:
    """The value of a parameters-cell default (papermill gives its source text); ``_NOT_LITERAL`` if not a literal."""
    try:
        return ast.literal_eval(str(source))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NOT_LITERAL


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _compatible(value: Any, default: Any) -> bool:
    """Whether a set's ``value`` can stand in for the notebook ``default``: same kind (``null`` on either side
    matches anything, an int may stand for a float); a list's items are checked against the default's items
    when those all have one kind (``groups: [1, 1]`` for ``[[1, 1], ...]`` is an error, as is ``xs`` for ``["xs"]``).
    """
    if value is None or default is None:
        return True
    kv, kd = _kind(value), _kind(default)
    if kd == "float" and kv == "int":
        return True
    if kv != kd:
        return False
    if kd == "list" and default and value:
        kinds = {_kind(d) for d in default}
        if len(kinds) == 1:
            return all(_compatible(v, default[0]) for v in value)
    return True


# --------------------------------------------------------------------------- execution


@contextlib.contextmanager
def _current_interpreter_kernel() -> Iterator[str]:
    """A kernelspec for ``sys.executable``, first on ``JUPYTER_PATH`` while the context is open."""
    with tempfile.TemporaryDirectory(prefix="metaembed-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / _KERNEL_NAME
        display = f"Python {sys.version_info.major}.{sys.version_info.minor} (metaembed reproduce)"
        try:  # ipykernel's own spec for this interpreter (argv[0] = sys.executable, encryption metadata)
            from ipykernel.kernelspec import write_kernel_spec

            # log_level: silence the kernel app's own start-up warnings (user code output is unaffected)
            write_kernel_spec(spec_dir, overrides={"display_name": display},
                              extra_arguments=["--IPKernelApp.log_level=ERROR"])
        except ImportError as e:
            raise NotebookExecutionError(
                "running notebooks needs ipykernel in this interpreter (pip install ipykernel), "
                "or pass kernel_name= / --kernel NAME of an installed kernelspec",
                name="", notebook=Path(),
            ) from e
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join([tmp] + ([old] if old else []))
        try:
            yield _KERNEL_NAME
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def _source_cell_index(output_notebook: Path, cell_index: int) -> int:
    """Map papermill's cell index (executed notebook, before its error cells) to the source notebook's."""
    import nbformat
    from papermill.execute import ERROR_MARKER_TAG

    try:
        nb = nbformat.read(output_notebook, as_version=4)
    except Exception:  # noqa: BLE001 - best effort: keep papermill's index
        return cell_index
    cells = [c for c in nb.cells if ERROR_MARKER_TAG not in c.get("metadata", {}).get("tags", [])]
    injected = sum(
        1 for c in cells[:cell_index] if "injected-parameters" in c.get("metadata", {}).get("tags", [])
    )
    return cell_index - injected


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()[:120]
    return ""


def _execution_error(ps: ParameterSet, notebook: Path, output_nb: Path, exc: BaseException) -> NotebookExecutionError:
    from papermill.exceptions import PapermillExecutionError

    where = f"parameter set {ps.name!r}: notebook {ps.notebook}"
    if isinstance(exc, PapermillExecutionError):
        idx = _source_cell_index(output_nb, exc.cell_index)
        n_cells = None
        with contextlib.suppress(Exception):
            import nbformat

            n_cells = len(nbformat.read(notebook, as_version=4).cells)
        of = f" of {n_cells}" if n_cells else ""
        evalue = str(exc.evalue)
        msg = (
            f"{where} failed in cell {idx + 1}{of} (In [{exc.exec_count}] of the executed notebook): "
            f"{exc.ename}: {evalue}\n"
            f"    cell starts with: {_first_line(exc.source)}\n"
            f"    executed notebook with the traceback: {output_nb}"
        )
        return NotebookExecutionError(
            msg, name=ps.name, notebook=notebook, output_notebook=output_nb, cell_index=idx,
            exec_count=exc.exec_count, ename=exc.ename, evalue=evalue,
        )
    ename = type(exc).__name__
    msg = f"{where} could not be executed: {ename}: {exc}"
    if output_nb.exists():
        msg += f"\n    partial executed notebook: {output_nb}"
    return NotebookExecutionError(msg, name=ps.name, notebook=notebook, output_notebook=output_nb, ename=ename,
                                  evalue=str(exc))


def _snapshot(folder: Path) -> dict[Path, int]:
    if not folder.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _changed_files(folder: Path, before: dict[Path, int]) -> list[Path]:
    """Files of ``folder`` that are new or were rewritten since ``before`` (the notebook's figures)."""
    return sorted(p for p, t in _snapshot(folder).items() if before.get(p) != t)


def run_fingerprint(ps: ParameterSet, root: Path, quick: bool) -> str:
    """SHA-256 of what a run's output depends on: the notebook file, the resolved parameters and the source of
    the ``metaembed`` package (its ``.py``, ``.cu``, ``.cuh`` and packaged config files).  Data files and
    installed dependencies are not included."""
    h = hashlib.sha256()
    h.update((root / ps.notebook).read_bytes())
    h.update(json.dumps(ps.resolved_parameters(quick, root), sort_keys=True, default=str).encode())
    package = Path(__file__).resolve().parent
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".cu", ".cuh", ".yaml") and p.is_file()):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _read_status(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's status record, or ``None`` when it is missing or unreadable (truncated, edited, nested
    past the recursion limit, not a JSON object): the run then counts as not done."""
    try:
        status = json.loads((run_dir / _STATUS_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return status if isinstance(status, dict) else None


def _dependency_runs(ps: ParameterSet, out_root: Path) -> dict[str, list[Any] | None]:
    """The runs in ``out_root`` of the sets ``ps`` reads (its ``after``): name -> ``[fingerprint, finished, ok]``
    of that run's status (``None``: no run there), recorded with ``ps``'s run to tell whether they changed since."""
    runs: dict[str, list[Any] | None] = {}
    for name in ps.after:
        status = _read_status(out_root / name)
        runs[name] = ([status.get("fingerprint"), status.get("finished"), status.get("ok")]
                      if isinstance(status, dict) else None)
    return runs


def _finished_run(ps: ParameterSet, root: Path, out_root: Path, quick: bool) -> RunResult | None:
    """The earlier run of ``ps`` in ``out_root`` if it succeeded with the same :func:`run_fingerprint` and read
    the same runs of its ``after`` sets (a set rerun since, e.g. with other parameters, reruns its readers)."""
    run_dir = out_root / ps.name
    status = _read_status(run_dir)
    if not (isinstance(status, dict) and status.get("ok") is True and status.get("quick") == quick
            and status.get("fingerprint") == run_fingerprint(ps, root, quick)
            and status.get("after", {}) == _dependency_runs(ps, out_root)):
        return None
    notebook = (root / ps.notebook).resolve()
    return RunResult(name=ps.name, notebook=notebook, output_notebook=run_dir / notebook.name, output_dir=run_dir,
                     ok=True, seconds=float(status.get("seconds", 0.0)), quick=quick,
                     parameters=ps.resolved_parameters(quick, root),
                     figures=[Path(f) for f in status.get("figures", [])], skipped=True)


def _run_one(
    ps: ParameterSet, root: Path, out_root: Path, figures_dir: Path, quick: bool, kernel_name: str,
    timeout: float | None,
) -> RunResult:
    import papermill

    notebook = (root / ps.notebook).resolve()
    run_dir = out_root / ps.name
    figures_dir = set_figures_dir(figures_dir, ps)
    previous_figures = _previous_figures(run_dir, figures_dir)
    if run_dir.exists():  # stale tables from an earlier run must not reach the summary
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    output_nb = run_dir / notebook.name
    parameters = ps.resolved_parameters(quick, root)
    params = {**parameters, "output_dir": str(run_dir.resolve()), "figures_dir": str(figures_dir.resolve())}
    figures_before = _snapshot(figures_dir)
    fingerprint = run_fingerprint(ps, root, quick)  # of the inputs as they were when the run started
    after = _dependency_runs(ps, out_root)  # the runs whose results it reads
    # written first: a run killed part-way still records the figures the last good run drew (this run's
    # fresh run_dir has no other record of them), so the next successful run removes those it does not redraw
    _write_status(run_dir, ps, quick, parameters, fingerprint, after, previous_figures,
                  seconds=0.0, error="interrupted: the run started but did not finish", figures=[])
    t0 = time.time()
    error: NotebookExecutionError | None = None
    try:
        papermill.execute_notebook(
            str(notebook), str(output_nb), parameters=params, kernel_name=kernel_name, progress_bar=False,
            cwd=str(notebook.parent), execution_timeout=timeout,
        )
    except Exception as e:  # noqa: BLE001 - any execution failure is reported with the notebook's name
        error = _execution_error(ps, notebook, output_nb, e)
    seconds = time.time() - t0
    result = RunResult(
        name=ps.name, notebook=notebook, output_notebook=output_nb, output_dir=run_dir, ok=error is None,
        seconds=seconds, quick=quick, parameters=parameters, error=error,
        figures=_changed_files(figures_dir, figures_before),
    )
    if result.ok:  # a failed run leaves the last good run's figures in place
        for path in previous_figures - {p.resolve() for p in result.figures}:
            path.unlink(missing_ok=True)
    _write_status(run_dir, ps, quick, result.parameters, fingerprint, after,
                  set() if result.ok else previous_figures, seconds=seconds,
                  error=str(error) if error else None, figures=result.figures)
    return result


def _write_status(run_dir: Path, ps: ParameterSet, quick: bool, parameters: dict, fingerprint: str, after: Any,
                  kept_figures: set[Path], *, seconds: float, error: str | None, figures: Sequence[Path]) -> None:
    """Record a run in ``run_dir``'s status file (``ok`` when ``error`` is None), through a temporary file."""
    status = {
        "name": ps.name, "notebook": ps.notebook, "description": ps.description, "ok": error is None,
        "seconds": round(seconds, 1), "quick": quick, "parameters": parameters,
        "error": error, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "figures": [str(p) for p in figures], "fingerprint": fingerprint, "after": after,
        # a failed run leaves the last good run's figures: the next successful run still owns (and cleans) them
        "kept_figures": sorted(str(p) for p in kept_figures),
    }
    text = json.dumps(status, indent=1, default=str)
    atomic_write(run_dir / _STATUS_FILE, lambda f: f.write(text.encode()))


def _previous_figures(run_dir: Path, figures_dir: Path) -> set[Path]:
    """The figures the set's previous run (``run_dir``'s status) drew in ``figures_dir``.  A successful rerun
    deletes those it does not draw again: one that no longer draws a figure (one model: no Fig. 4a) left the old
    one beside the new figures, from other parameters."""
    status = _read_status(run_dir)
    if status is None:
        return set()
    figures = [f for key in ("figures", "kept_figures") if isinstance(status.get(key), list) for f in status[key]]
    folder = figures_dir.resolve()
    paths = {Path(str(f)).resolve() for f in figures}
    return {p for p in paths if p.is_relative_to(folder) and p.is_file()}  # only this set's folder


def set_figures_dir(figures_dir: Path, ps: ParameterSet) -> Path:
    """Where set ``ps`` draws: ``figures_dir`` for the set named after its notebook (``mmr_ablation``),
    ``figures_dir/<set name>`` for any other set of that notebook (``mmr_ablation_paper``), whose figures
    carry the same file names and would overwrite the first set's."""
    return figures_dir if ps.name == Path(ps.notebook).stem else figures_dir / ps.name


def _resolve(root: Path, p: str | os.PathLike[str]) -> Path:
    p = Path(p)
    return p if p.is_absolute() else root / p


def runs_dir(out_root: str | os.PathLike[str], quick: bool = False) -> Path:
    """Where runs go: ``out_root`` for full runs, ``<out_root>/quick`` for ``--quick`` runs.

    Quick runs never share (and so never empty) the run folders of full runs.
    """
    return Path(out_root) / QUICK_SUBDIR if quick else Path(out_root)


def _check_all(sets: Sequence[ParameterSet], root: Path) -> None:
    """:func:`check_parameters` for every set; one :class:`ParameterSetError` listing every problem."""
    problems = []
    for ps in sets:
        try:
            check_parameters(ps, root)
        except ParameterSetError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise ParameterSetError(problems[0])
    if problems:
        raise ParameterSetError(f"{len(problems)} parameter sets do not match their notebooks:\n"
                                + "\n".join(f"  - {p}" for p in problems))


@contextlib.contextmanager
def _runs_folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.reproduce.lock`` for a whole :func:`reproduce`; :class:`RunsFolderBusyError` naming the process
    that holds it, at once (two runs into one folder emptied each other's run folders and wrote summaries
    missing tables, while both reported success)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: not serialized
        yield
        return
    with open(out / _LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise RunsFolderBusyError(
                f"another metaembed reproduce (process {holder}) is running into {out}; wait for it to finish, or "
                "pass another --out-root") from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}@{socket.gethostname()}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def reproduce(
    names: Sequence[str] | None = None,
    quick: bool = False,
    out_root: str | os.PathLike[str] = "experiments/runs",
    figures_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    *,
    keep_going: bool = False,
    include_gpu: bool = False,
    kernel_name: str | None = None,
    root: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    skip_done: bool = False,
) -> list[RunResult]:
    """Execute parameter sets with papermill and write ``<out_root>/summary.md``.

    Every selected set is checked against its notebook (:func:`check_parameters`)
    before the first one runs; a mismatch raises :class:`ParameterSetError` and
    nothing runs or is deleted.  A second ``reproduce`` into the same runs folder while
    one runs raises :class:`RunsFolderBusyError` before anything runs.

    Args:
        names: parameter sets to run (default: all CPU sets; see :func:`load_parameter_sets`).
        quick: apply each set's ``quick`` overrides (smoke test); runs, summary and
            figures then go to ``<out_root>/quick/`` (:func:`runs_dir`), so a smoke
            test never empties a full run's folder.
        out_root: where ``<name>/<notebook>.ipynb`` and the notebook's tables go
            (relative paths are relative to ``root``).
        figures_dir: passed to the notebooks; default ``figures`` for full runs and
            ``<out_root>/quick/figures`` for ``quick`` runs, so a smoke test never
            overwrites the committed full-run figures.
        progress: tqdm progress bar over notebooks.
        keep_going: run the remaining sets after a failure; a :class:`ReproductionError`
            listing all failures is raised at the end.  Without it the first failure
            raises :class:`NotebookExecutionError` (after the summary is written).
        include_gpu: with ``names`` empty, also run GPU (``cpu: false``) sets.
        kernel_name: an installed Jupyter kernelspec; default: the current interpreter.
        root: repository root (default :func:`find_root`).
        timeout: per-cell execution timeout in seconds (default none).
        skip_done: keep, instead of rerunning, a set whose earlier run in ``out_root`` succeeded with the same
            notebook, parameters and ``metaembed`` source (:func:`run_fingerprint`) and read the same runs of
            its ``after`` sets (one rerun since reruns it): resumes an interrupted reproduction.  Its folder
            and figures stay as they are; ``summary.md`` lists it as an earlier run.

    Returns:
        One :class:`RunResult` per selected set (``skipped=True`` for those kept under ``skip_done``).
    """
    from tqdm.auto import tqdm

    root_p = Path(root).resolve() if root is not None else find_root()
    sets = load_parameter_sets(names, include_gpu, root=root_p)
    _check_all(sets, root_p)  # before anything runs, or any run folder is emptied
    out = _resolve(root_p, runs_dir(out_root, quick))
    figs = _resolve(root_p, figures_dir if figures_dir is not None else (out / "figures" if quick else "figures"))
    out.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    failures: list[NotebookExecutionError] = []
    kernel_ctx = contextlib.nullcontext(kernel_name) if kernel_name else _current_interpreter_kernel()
    with _runs_folder_lock(out), kernel_ctx as kname:
        bar = tqdm(sets, desc="reproduce", unit="notebook", disable=not progress, file=sys.stderr)
        for ps in bar:
            bar.set_postfix_str(ps.name)
            done = _finished_run(ps, root_p, out, quick) if skip_done else None
            if done is not None:
                results.append(done)
                if progress:
                    bar.write(f"kept   {ps.name} (an earlier run of the same inputs)", file=sys.stderr)
                continue
            res = _run_one(ps, root_p, out, figs, quick, kname, timeout)
            results.append(res)
            if progress:
                bar.write(f"{'ok    ' if res.ok else 'FAILED'} {ps.name} ({res.seconds:.0f} s)", file=sys.stderr)
            if res.error is not None:
                failures.append(res.error)
                if not keep_going:
                    break
        bar.close()
        summary = write_summary(out, [r for r in results if not r.skipped], root=root_p)
    if failures:
        if not keep_going:
            raise failures[0]
        raise ReproductionError(failures, results, summary)
    return results


# --------------------------------------------------------------------------- summary


def _fmt_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: Any, max_rows: int = 60) -> str:
    """A GitHub-markdown table of a DataFrame (no ``tabulate`` needed); long frames are truncated."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in df.head(max_rows).itertuples(index=False):
        lines.append("| " + " | ".join(_fmt_cell(v) for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n_{len(df) - max_rows} more row(s) not shown._")
    return "\n".join(lines)


def _rel(p: Path, base: Path) -> str:
    try:
        return os.path.relpath(p, base)
    except ValueError:
        return str(p)


def write_summary(out_root: str | os.PathLike[str], results: Sequence[RunResult] = (), *,
                  root: Path | None = None) -> Path:
    """Write ``<out_root>/summary.md``: status, parameters and every ``*.csv``/``*.json`` of each run folder.

    Runs of this invocation (``results``) come first; other run folders under
    ``out_root`` left by earlier invocations are included too, marked as such.
    """
    import pandas as pd

    out = Path(out_root)
    current = {r.name for r in results}
    statuses = []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and (p / _STATUS_FILE).exists()):
        st = _read_status(d)
        if st is not None and isinstance(st.get("name"), str) and isinstance(st.get("notebook"), str):
            statuses.append((d, st))
    order = {r.name: i for i, r in enumerate(results)}
    statuses.sort(key=lambda t: (t[1]["name"] not in current, order.get(t[1]["name"], 0), t[1]["name"]))
    lines = ["# Reproduction summary", ""]
    n_ok = sum(r.ok for r in results)
    lines += [f"This invocation ran {len(results)} notebook(s): {n_ok} ok, {len(results) - n_ok} failed.", ""]
    lines += ["| run | notebook | status | quick | time (s) |", "|---|---|---|---|---|"]
    for d, st in statuses:
        status = "ok" if st.get("ok") else "**FAILED**"
        earlier = "" if st["name"] in current else " (earlier run)"
        lines.append(f"| [{st['name']}](#{st['name'].lower()}){earlier} | {st['notebook']} | {status} | "
                     f"{st.get('quick')} | {st.get('seconds')} |")
    for d, st in statuses:
        lines += ["", f"## {st['name']}", ""]
        if st.get("description"):
            lines += [st["description"], ""]
        nb = d / Path(st["notebook"]).name
        lines.append(f"Executed notebook: `{_rel(nb, out)}`; finished {st.get('finished')}, "
                     f"{st.get('seconds')} s{', --quick' if st.get('quick') else ''}.")
        params = ", ".join(f"`{k}={v!r}`" for k, v in (st.get("parameters") or {}).items())
        if params:
            lines += ["", f"Parameters: {params}"]
        if st.get("error"):
            lines += ["", "```text", str(st["error"]), "```"]
        if st.get("figures"):
            base = root if root is not None else out
            lines += ["", "Figures: " + ", ".join(f"`{_rel(Path(f), base)}`" for f in st["figures"])]
        for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != _STATUS_FILE
                        and p.suffix in (".csv", ".json")):
            lines += ["", f"### {_rel(f, d)}", ""]
            try:
                if f.suffix == ".csv":
                    lines.append(markdown_table(pd.read_csv(f)))
                else:
                    text = f.read_text()
                    if len(text) > 4000:
                        text = text[:4000] + "\n... (truncated)"
                    lines += ["```json", text.rstrip(), "```"]
            except Exception as e:  # noqa: BLE001 - an unreadable table must not hide the others
                lines.append(f"_could not read {f.name}: {type(e).__name__}: {e}_")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- notebook hygiene

_KEEP_CELL_METADATA = ("tags",)


def _has_marker(cell: Any) -> bool:
    return cell.get("cell_type") == "code" and NBVAL_MARKER in cell.get("source", "")


def strip_notebook(path: str | os.PathLike[str], *, write: bool = True) -> bool:
    """Clean a committed notebook in place; returns whether it changed.

    Removes outputs and execution counts (except on cells containing
    ``# NBVAL_CHECK_OUTPUT``), papermill's injected-parameters and error cells,
    cell metadata other than ``tags`` and notebook metadata other than the
    kernelspec and the language name.  What cannot be fixed automatically
    (parameters cells, imports, size) is reported by :func:`check_notebook`.
    """
    import nbformat
    from papermill.execute import ERROR_MARKER_TAG

    path = Path(path)
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=4)
    cells = []
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags or ERROR_MARKER_TAG in tags:
            continue
        cell.metadata = nbformat.NotebookNode(
            {k: v for k, v in cell.get("metadata", {}).items() if k in _KEEP_CELL_METADATA and v}
        )
        if cell.cell_type == "code" and not _has_marker(cell):
            cell.outputs = []
            cell.execution_count = None
        cells.append(cell)
    nb.cells = cells
    nb.metadata = nbformat.NotebookNode(
        {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
    )
    after = nbformat.writes(nb) + "\n"
    if after == before:
        return False
    if write:
        path.write_text(after, encoding="utf-8")
    return True


def check_notebook(path: str | os.PathLike[str]) -> list[str]:
    """Rule violations of a committed notebook (empty list: clean).

    Rules: exactly one cell tagged ``parameters``; no outputs or execution
    counts except on cells containing ``# NBVAL_CHECK_OUTPUT``; no papermill
    injected-parameters cell; smaller than 400 KB; imports metaembed.
    """
    import nbformat

    path = Path(path)
    if not path.is_file():
        return [f"{path}: no such notebook"]
    problems: list[str] = []
    size = path.stat().st_size
    if size >= MAX_NOTEBOOK_BYTES:
        problems.append(f"{path.name}: {size / 1024:.0f} KB >= {MAX_NOTEBOOK_BYTES // 1024} KB")
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as e:  # noqa: BLE001
        return problems + [f"{path.name}: not a valid notebook: {type(e).__name__}: {e}"]
    tags = [c.get("metadata", {}).get("tags", []) for c in nb.cells]
    n_params = sum("parameters" in t for t in tags)
    if n_params != 1:
        problems.append(f"{path.name}: {n_params} cells tagged 'parameters' (need exactly 1)")
    if any("injected-parameters" in t for t in tags):
        problems.append(f"{path.name}: contains a papermill injected-parameters cell (an executed copy?)")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or _has_marker(cell):
            continue
        if cell.get("outputs"):
            problems.append(f"{path.name}: cell {i + 1} has outputs (strip it or mark it {NBVAL_MARKER!r})")
        if cell.get("execution_count") is not None:
            problems.append(f"{path.name}: cell {i + 1} has an execution count")
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    if not re.search(r"^\s*(import metaembed\b|from metaembed(\.\w+)* import )", code, re.MULTILINE):
        problems.append(f"{path.name}: does not import metaembed (notebooks call the library for all logic)")
    return problems


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``metaembed reproduce``."""
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="parameter sets (experiments/NAME.yaml) to run; default: every CPU set")
    parser.add_argument("--quick", action="store_true",
                        help="apply each set's quick overrides (smoke test); runs go to <out-root>/quick/")
    parser.add_argument("--list", action="store_true", help="list the parameter sets and exit")
    parser.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    parser.add_argument("--include-gpu", action="store_true", help="with no NAMEs, also run GPU (cpu: false) sets")
    parser.add_argument("--out-root", default="experiments/runs", help="executed notebooks and tables (default: %(default)s)")
    parser.add_argument("--figures-dir", default=None,
                        help="figures folder (default: figures/, or <out-root>/quick/figures with --quick)")
    parser.add_argument("--root", default=None, help="repository root (default: found from the current folder)")
    parser.add_argument("--kernel", default=None, help="Jupyter kernelspec name (default: the current interpreter)")
    parser.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--skip-done", action="store_true",
                        help="keep each set whose earlier run succeeded with the same notebook, parameters and "
                             "metaembed source, after the same runs of its 'after' sets (resume an interrupted "
                             "reproduction)")


def _list_sets(root: Path | None, names: Sequence[str] | None = None) -> int:
    """Print the parameter sets (``names`` only, when given: an unknown one raises, as for a run)."""
    sets = load_parameter_sets(names or None, include_gpu=True, root=root)
    width = max((len(s.name) for s in sets), default=4)
    for s in sets:
        kind = "cpu" if s.cpu else "GPU"
        first = " ".join(s.description.split())
        if len(first) > 100:
            first = first[:97] + "..."
        print(f"{s.name:<{width}}  {kind}  {s.notebook:<34}  {first}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``metaembed reproduce``; returns the exit status (2: an unknown or malformed parameter
    set, 1: a notebook failed)."""
    try:
        root = Path(args.root).resolve() if args.root else None
        if args.list:
            return _list_sets(root, args.names)
        results = reproduce(
            args.names or None, quick=args.quick, out_root=args.out_root, figures_dir=args.figures_dir,
            progress=not args.no_progress, keep_going=args.keep_going, include_gpu=args.include_gpu,
            kernel_name=args.kernel, root=root, timeout=args.timeout, skip_done=args.skip_done,
        )
    except (ParameterSetError, NotebookExecutionError, ReproductionError, RunsFolderBusyError) as e:
        print(f"metaembed reproduce: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ParameterSetError) else 1  # 2: a usage mistake, as every metaembed subcommand
    if results:
        out = _resolve(root or find_root(), runs_dir(args.out_root, args.quick))
        kept = sum(r.skipped for r in results)
        print(f"{len(results) - kept} notebook(s) ok{f', {kept} kept from earlier runs' if kept else ''}; "
              f"summary: {out / 'summary.md'}")
    else:
        print("no parameter sets selected")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metaembed.reproduce [strip|check PATHS... | reproduce arguments]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("strip", "check"):
        cmd, patterns = argv[0], argv[1:]
        paths: list[str] = []
        if not patterns:
            paths = [str(p) for p in sorted((find_root() / "notebooks").glob("*.ipynb"))]
        for pat in patterns:  # an unexpanded shell glob (no notebooks yet) matches nothing
            matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
            paths += matches
        if not paths:
            print("no notebooks to check", file=sys.stderr)
        problems: list[str] = []
        for p in paths:
            if cmd == "strip" and Path(p).is_file() and strip_notebook(p):  # a missing one: check_notebook says so
                print(f"stripped {p}")
            problems += check_notebook(p)
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    parser = argparse.ArgumentParser(prog="python -m metaembed.reproduce", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
