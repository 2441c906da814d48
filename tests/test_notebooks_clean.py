"""Committed notebooks are clean: one parameters cell, no outputs, small, and they use metaembed.

Fix a failing notebook with ``make strip-notebooks``
(``python -m metaembed.reproduce strip notebooks/*.ipynb``); what stripping
cannot fix (parameters cells, imports, size) is listed by ``... check``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from metaembed.reproduce import (
    MAX_NOTEBOOK_BYTES,
    NBVAL_MARKER,
    check_notebook,
    strip_notebook,
)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_committed_notebooks_are_clean():
    # Passes vacuously while notebooks/ is empty; every notebook added later is checked here.
    problems = [p for nb in NOTEBOOKS for p in check_notebook(nb)]
    assert not problems, "unclean notebooks (run `make strip-notebooks`):\n" + "\n".join(problems)


def test_no_executed_copies_in_notebooks_folder():
    for nb in NOTEBOOKS:
        meta = nbformat.read(nb, as_version=4).metadata
        assert "papermill" not in meta, f"{nb.name} is a papermill output; commit the source notebook"


def _unguarded_saves(source: str) -> list[str]:
    """Top-level ``save_figure(fig, ...)`` calls whose figure variable the cell assigns only in a block."""
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    assigned: set[str] = set()
    bad = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and stmt.value.args \
                and getattr(stmt.value.func, "attr", getattr(stmt.value.func, "id", "")) == "save_figure":
            nodes = list(ast.walk(stmt.value.args[0]))
            callees = {id(n.func) for n in nodes if isinstance(n, ast.Call)} | \
                {id(n.value) for n in nodes if isinstance(n, ast.Attribute)}
            used = {n.id for n in nodes if isinstance(n, ast.Name) and id(n) not in callees}  # fig in finish(fig)
            if used - assigned:
                bad.append(ast.unparse(stmt.value)[:80])
        for node in ast.walk(stmt) if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else ():
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                assigned.add(node.id)
    return bad


def test_figures_are_saved_in_the_cell_block_that_draws_them():
    """A figure drawn under ``if`` is saved under it, never the previous cell's figure under a new name."""
    problems = []
    for path in NOTEBOOKS:
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                problems += [f"{path.name} cell {i + 1}: {call}" for call in _unguarded_saves(cell.source)]
    assert not problems, "save_figure of a figure drawn only inside a block:\n" + "\n".join(problems)
    assert _unguarded_saves("if x:\n    fig = f()\nplotting.save_figure(fig, 'a', d)")
    assert not _unguarded_saves("fig, ax = f()\nplotting.save_figure(finish(fig), 'a', d)")


def test_every_notebook_ends_by_removing_its_stale_outputs():
    """A hand rerun into the same folders removes what it did not write again
    (:func:`metaembed.ablations.remove_stale_outputs`): the last cell calls it with the notebook's name as the
    prefix, and every figure the notebook saves carries that prefix (so that the call removes only its own)."""
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert f'ablations.remove_stale_outputs(out, figs, prefix="{path.stem}")' in cells[-1].source, path.name
        calls = [n for c in cells for n in ast.walk(ast.parse(c.source))
                 if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "save_figure"]
        names = [ast.literal_eval(n.args[1]) for n in calls]
        assert names and all(n.startswith(path.stem + "_") for n in names), (path.name, names)


# --- the checker and the stripper themselves -------------------------------------------------


def _nb(tmp_path: Path, cells: list, name: str = "nb.ipynb") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "metaembed-reproduce", "display_name": "x", "language": "python"}
    nb.metadata["papermill"] = {"duration": 1.0}
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def _params(src: str = "steps = 10") -> nbformat.NotebookNode:
    c = nbformat.v4.new_code_cell(src)
    c.metadata["tags"] = ["parameters"]
    return c


def _executed(src: str, count: int = 1) -> nbformat.NotebookNode:
    c = nbformat.v4.new_code_cell(src)
    c.execution_count = count
    c.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    c.metadata["execution"] = {"iopub.status.busy": "2025-01-01"}
    return c


def test_clean_notebook_passes(tmp_path: Path):
    path = _nb(tmp_path, [nbformat.v4.new_markdown_cell("# t"), _params(),
                          nbformat.v4.new_code_cell("from metaembed.plotting import set_style")])
    assert check_notebook(path) == []


def test_checker_reports_every_rule(tmp_path: Path):
    path = _nb(tmp_path, [_params(), _params("seed = 0"), _executed("import numpy")])
    problems = "\n".join(check_notebook(path))
    assert "2 cells tagged 'parameters'" in problems
    assert "cell 3 has outputs" in problems and "cell 3 has an execution count" in problems
    assert "does not import metaembed" in problems
    path = _nb(tmp_path, [nbformat.v4.new_code_cell("import numpy")], "none.ipynb")
    assert "0 cells tagged 'parameters'" in "\n".join(check_notebook(path))


def test_checker_size_limit(tmp_path: Path):
    big = "# " + "x" * MAX_NOTEBOOK_BYTES
    path = _nb(tmp_path, [_params(), nbformat.v4.new_code_cell("import metaembed\n" + big)])
    assert any("KB" in p for p in check_notebook(path))


def test_strip_notebook(tmp_path: Path):
    injected = nbformat.v4.new_code_cell("steps = 2")
    injected.metadata["tags"] = ["injected-parameters"]
    kept = _executed(f"{NBVAL_MARKER}\nimport metaembed\nprint('hello')", count=3)
    path = _nb(tmp_path, [_params(), injected, _executed("import metaembed\nx = 1", count=2), kept])
    assert check_notebook(path)
    assert strip_notebook(path) is True
    assert check_notebook(path) == []
    nb = nbformat.read(path, as_version=4)
    assert len(nb.cells) == 3  # injected-parameters cell dropped
    assert nb.cells[1].outputs == [] and nb.cells[1].execution_count is None
    assert nb.cells[1].metadata == {}
    assert nb.cells[2].outputs and nb.cells[2].outputs[0]["text"] == "hello\n"  # NBVAL_CHECK_OUTPUT kept
    assert nb.cells[0].metadata == {"tags": ["parameters"]}
    assert set(nb.metadata) == {"kernelspec", "language_info"} and nb.metadata.kernelspec.name == "python3"
    before = path.read_bytes()
    assert strip_notebook(path) is False  # idempotent
    assert path.read_bytes() == before


@pytest.mark.parametrize("src", ["import metaembed", "from metaembed import probes", "  from metaembed.plotting import x"])
def test_import_detection(tmp_path: Path, src: str):
    path = _nb(tmp_path, [_params(), nbformat.v4.new_code_cell(src)])
    assert check_notebook(path) == []


def test_strip_and_check_command_line(tmp_path: Path, capsys):
    from metaembed.reproduce import main

    fixable = _nb(tmp_path, [_params(), _executed("import metaembed")], "fixable.ipynb")
    assert main(["strip", str(fixable)]) == 0
    assert "stripped" in capsys.readouterr().out
    assert main(["check", str(fixable)]) == 0
    broken = _nb(tmp_path, [nbformat.v4.new_code_cell("import numpy")], "broken.ipynb")
    assert main(["check", str(tmp_path / "*.ipynb")]) == 1  # globs are expanded
    err = capsys.readouterr().err
    assert "broken.ipynb: 0 cells tagged 'parameters'" in err and "fixable" not in err
    assert main(["strip", str(tmp_path / "none" / "*.ipynb")]) == 0  # no notebooks: nothing to do
    assert broken.exists()


def _parameter_defaults(path: Path) -> dict:
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {t.id: ast.literal_eval(s.value) for s in ast.parse(cell.source).body if isinstance(s, ast.Assign)
            for t in s.targets if isinstance(t, ast.Name)}


def test_notebook_defaults_read_no_other_notebooks_results():
    """Under nbval (defaults) a notebook must not read another notebook's run folder: efficiency's
    ``accuracy_run = "mmr_ablation"`` read ``nbval/mmr_ablation`` left by an earlier session (efficiency runs
    first), so its table depended on what ran before.  The parameter sets name the run instead."""
    stems = {p.stem for p in NOTEBOOKS}

    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from strings(x)
        elif isinstance(v, dict):
            for x in v.values():
                yield from strings(x)

    problems = [f"{p.name}: {k} = {v!r}" for p in NOTEBOOKS for k, v in _parameter_defaults(p).items()
                if any(s in stems - {p.stem} for s in strings(v))]
    assert not problems, "parameters-cell defaults naming another notebook's run:\n" + "\n".join(problems)


def test_quickstart_text_states_the_measured_budget_curve():
    """The quickstart's markdown quotes the Overall P@1 range that experiments/quickstart.yaml records.

    It said "about 24 % ... about equally at every budget" and "this tiny random model does not show"
    budget gains while its own committed figure (and the set) rose from 23.5 at (1,1) to 28.4 at (16,64).
    """
    desc = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())["description"]
    measured = re.search(r"Overall P@1 (\d+\.\d) at \(1,1\) (down|up) to (\d+\.\d) at \(16,64\)", " ".join(desc.split()))
    assert measured, "experiments/quickstart.yaml no longer records the Overall P@1 at (1,1) and (16,64)"
    # "14.0 to 15.8 from (1,1) to (16,64)" described a curve that fell from 15.8 to 14.0 (a review helper)
    assert measured[2] == ("down" if float(measured[1]) > float(measured[3]) else "up"), measured[0]
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    text = " ".join(" ".join(c.source for c in nb.cells if c.cell_type == "markdown").split())
    assert measured[0] in text


def test_data_size_parameters_are_read_from_the_config_not_the_parameter():
    """``n_candidates: null`` (documented: "the base's") is resolved by config_from_params; a notebook that used
    the raw parameter later (a chance line) crashed after every model had trained (a review helper)."""
    from metaembed.ablations import _NONE_KEEPS_BASE

    raw = []
    for nb in NOTEBOOKS:
        for cell in nbformat.read(nb, as_version=4).cells:
            if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
                continue
            for name in _NONE_KEEPS_BASE:  # allowed: passing it on as name=name
                uses = re.findall(rf"(?<![\w.]){name}\b(?!\s*=(?!=))", cell.source)  # not a keyword's name
                passed = re.findall(rf"(?<![\w.]){name}={name}\b", cell.source)
                if len(uses) > len(passed):
                    raw.append(f"{nb.name}: {name} used directly: {cell.source.splitlines()[0][:60]}")
    assert not raw, raw
