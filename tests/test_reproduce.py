"""The papermill runner, end to end on throwaway notebooks in a temporary repository root."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

pytest.importorskip("papermill")
pytest.importorskip("ipykernel")

from metaembed import reproduce as R

REPO = Path(__file__).resolve().parents[1]


def make_notebook(path: Path, body: str, params: str = "n = 3\nscale = 1.0\noutput_dir = '.'\nfigures_dir = '.'",
                  *, parameters_cell: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    cells = [nbformat.v4.new_markdown_cell("# throwaway")]
    if parameters_cell:
        p = nbformat.v4.new_code_cell(params)
        p.metadata["tags"] = ["parameters"]
        cells.append(p)
    cells.append(nbformat.v4.new_code_cell(body))
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


WRITE_RESULTS = """\
import csv, json, pathlib
out = pathlib.Path(output_dir)
with open(out / "results.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["budget", "p_at_1"])
    for i in range(n):
        w.writerow([f"({2**i},{4**i})", round(0.5 + 0.1 * i * scale, 4)])
(out / "meta.json").write_text(json.dumps({"n": n}))
pathlib.Path(figures_dir).mkdir(exist_ok=True)
(pathlib.Path(figures_dir) / "fig_tiny.png").write_bytes(b"png")
"""


def make_set(root: Path, name: str, notebook: str, parameters=None, quick=None, cpu=True) -> None:
    data = {"name": name, "notebook": notebook, "description": f"{name} test set", "cpu": cpu,
            "parameters": parameters if parameters is not None else {"n": 3, "scale": 1.0},
            "quick": quick if quick is not None else {"n": 2}}
    (root / "experiments").mkdir(parents=True, exist_ok=True)
    (root / "experiments" / f"{name}.yaml").write_text(yaml.safe_dump(data))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_notebook(tmp_path / "notebooks" / "tiny.ipynb", WRITE_RESULTS)
    make_set(tmp_path, "tiny", "notebooks/tiny.ipynb")
    make_set(tmp_path, "tiny_gpu", "notebooks/tiny.ipynb", cpu=False)
    return tmp_path


def test_load_parameter_sets(root: Path):
    assert [s.name for s in R.load_parameter_sets(root=root)] == ["tiny"]
    assert [s.name for s in R.load_parameter_sets(include_gpu=True, root=root)] == ["tiny", "tiny_gpu"]
    assert [s.name for s in R.load_parameter_sets(["tiny_gpu"], root=root)] == ["tiny_gpu"]  # named: always
    s = R.load_parameter_sets(["tiny"], root=root)[0]
    assert s.resolved_parameters() == {"n": 3, "scale": 1.0}
    assert s.resolved_parameters(quick=True) == {"n": 2, "scale": 1.0}
    with pytest.raises(R.ParameterSetError, match="known: tiny, tiny_gpu"):
        R.load_parameter_sets(["nope"], root=root)


def test_after_orders_sets_that_read_other_results(root: Path):
    make_set(root, "a_reader", "notebooks/tiny.ipynb")
    data = yaml.safe_load((root / "experiments" / "a_reader.yaml").read_text())
    data["after"] = ["tiny"]
    (root / "experiments" / "a_reader.yaml").write_text(yaml.safe_dump(data))
    assert [s.name for s in R.load_parameter_sets(root=root)] == ["tiny", "a_reader"]  # not alphabetical
    assert [s.name for s in R.load_parameter_sets(["a_reader", "tiny"], root=root)] == ["tiny", "a_reader"]
    assert [s.name for s in R.load_parameter_sets(["a_reader"], root=root)] == ["a_reader"]  # dep not selected
    data["name"] = "tiny"
    tiny = yaml.safe_load((root / "experiments" / "tiny.yaml").read_text())
    tiny["after"] = "a_reader"
    (root / "experiments" / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    with pytest.raises(R.ParameterSetError, match="cycle"):
        R.load_parameter_sets(root=root)



@pytest.mark.parametrize("after", [["tny"], "tny", ["tiny", "mmr_ablaton"]])
def test_after_rejects_unknown_set_names(root: Path, after):
    """A typo in 'after' is an error naming the set and the known sets, not a silently dropped ordering."""
    make_set(root, "a_reader", "notebooks/tiny.ipynb")
    data = yaml.safe_load((root / "experiments" / "a_reader.yaml").read_text())
    data["after"] = after
    (root / "experiments" / "a_reader.yaml").write_text(yaml.safe_dump(data))
    want = (r"a_reader\.yaml: 'after' names unknown parameter set\(s\) \['(tny|mmr_ablaton)'\]; "
            r"known: a_reader, tiny, tiny_gpu")
    for names in (None, ["a_reader"], ["tiny", "a_reader"]):  # a_reader selected, or every set
        with pytest.raises(R.ParameterSetError, match=want):
            R.load_parameter_sets(names, root=root)
    with pytest.warns(UserWarning, match="parameter set 'a_reader' skipped \\(not selected, and invalid\\): .*" + want):
        assert [s.name for s in R.load_parameter_sets(["tiny"], root=root)] == ["tiny"]  # others still run


@pytest.mark.parametrize("text", ["notebook: x.ipynb\nparameters: {n: 1\n", "notebook: x.ipynb\nparamters: {}\n"])
def test_an_invalid_set_blocks_only_runs_that_select_it(root: Path, text: str):
    """A set being edited (unclosed brace, misspelt key) stopped every ``metaembed reproduce``, also of the other sets:
    all sets were loaded to resolve 'after'.  Now it is an error when selected (or when none is named) and a warning
    naming it otherwise."""
    (root / "experiments" / "wip.yaml").write_text(text)
    for names in (None, ["wip"], ["tiny", "wip"]):
        with pytest.raises(R.ParameterSetError, match=r"wip\.yaml: (invalid YAML|unknown key)"):
            R.load_parameter_sets(names, root=root)
    with pytest.warns(UserWarning, match=r"parameter set 'wip' skipped \(not selected, and invalid\): .*wip\.yaml"):
        assert [s.name for s in R.load_parameter_sets(["tiny"], root=root)] == ["tiny"]
    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    with pytest.warns(UserWarning, match="'wip' skipped"):
        assert R.run(parser.parse_args(["tiny", "--quick", "--no-progress", "--root", str(root)])) == 0
    assert (root / "experiments" / "runs" / "quick" / "tiny").is_dir()

@pytest.mark.parametrize(
    "data, match",
    [
        ({"notebook": "x.ipynb", "paramters": {}}, "unknown key"),
        ({"notebook": "x.ipynb", "parameters": {"n": 1}, "quick": {"m": 1}}, "not in 'parameters'"),
        ({"notebook": "x.ipynb", "parameters": {"output_dir": "x"}}, "set by the runner"),
        ({"name": "other", "notebook": "x.ipynb"}, "must equal the file name"),
        ({"parameters": {}}, "'notebook'"),
        ({"notebook": "x.ipynb", "cpu": "yes"}, "'cpu'"),
        ({"notebook": "x.ipynb", "after": 3}, "'after'"),
    ],
)
def test_malformed_parameter_sets(tmp_path: Path, data, match):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(R.ParameterSetError, match=match):
        R.load_parameter_sets(root=tmp_path)


def test_reproduce_end_to_end(root: Path):
    results = R.reproduce(["tiny"], root=root, progress=False)
    (res,) = results
    assert res.ok and res.output_notebook == root / "experiments" / "runs" / "tiny" / "tiny.ipynb"
    assert res.output_notebook.exists()
    executed = nbformat.read(res.output_notebook, as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and str(res.output_dir.resolve()) in injected[0].source
    assert (root / "figures" / "fig_tiny.png").exists()  # full run: the repository's figures/
    summary = (root / "experiments" / "runs" / "summary.md").read_text()
    assert "## tiny" in summary and "### results.csv" in summary
    assert "| budget | p_at_1 |" in summary and "| (4,16) | 0.7 |" in summary
    assert '"n": 3' in summary  # meta.json
    assert "figures/fig_tiny.png" in summary
    status = json.loads((res.output_dir / ".reproduce.json").read_text())
    assert status["ok"] and status["parameters"] == {"n": 3, "scale": 1.0}


def test_committed_quickstart_set_runs_end_to_end_quick(tmp_path: Path):
    """A real parameter set (experiments/quickstart.yaml, --quick) through papermill into tmp_path."""
    out = tmp_path / "runs"
    (res,) = R.reproduce(["quickstart"], quick=True, out_root=out, figures_dir=tmp_path / "figs",
                         progress=False, root=REPO)
    out = out / "quick"  # --quick runs live apart from full runs
    assert res.ok and res.output_dir == out / "quickstart"
    results = pd.read_csv(res.output_dir / "results.csv")
    budgets = set(results["budget"].astype(str))
    assert len(budgets) == 5 and results["value"].between(0, 100).all()
    # the written tables are what they say: per-task rows of the quick set's size, and their summary (mutants:
    # the summary written as results.csv, one budget summarised, n_eval_queries not passed)
    from metaembed.evaluation import summarize

    assert "task" in results.columns and set(results["n_queries"]) == {8}  # quick: n_eval_queries 8
    pd.testing.assert_frame_equal(pd.read_csv(res.output_dir / "summary.csv"), summarize(results))
    assert (tmp_path / "figs" / "quickstart_budget_curve.png").stat().st_size > 10_000
    assert "## quickstart" in (out / "summary.md").read_text()
    assert (out / ".work" / "quickstart").is_dir()  # training runs stay under out_root, next to the tables


def test_a_second_set_of_one_notebook_draws_into_its_own_figures_folder(root: Path):
    """``tiny_gpu`` runs tiny.ipynb like ``tiny``: its figures (same file names) must not overwrite tiny's."""
    (res,) = R.reproduce(["tiny_gpu"], root=root, progress=False)
    assert res.figures == [root / "figures" / "tiny_gpu" / "fig_tiny.png"]
    assert not (root / "figures" / "fig_tiny.png").exists()
    (res,) = R.reproduce(["tiny"], root=root, progress=False)
    assert res.figures == [root / "figures" / "fig_tiny.png"]


def test_skip_done_keeps_finished_runs_and_reruns_changed_or_failed_ones(root: Path, capsys):
    """`reproduce --skip-done` resumes an interrupted reproduction: before it, every set always reran."""
    make_notebook(root / "notebooks" / "other.ipynb", WRITE_RESULTS.replace("fig_tiny", "fig_other"))
    make_set(root, "other", "notebooks/other.ipynb")
    first = {r.name: r for r in R.reproduce(["tiny", "other"], root=root, progress=False)}
    status = first["tiny"].output_dir / ".reproduce.json"
    stamp = status.stat().st_mtime_ns
    again = {r.name: r for r in R.reproduce(["tiny", "other"], root=root, progress=False, skip_done=True)}
    assert again["tiny"].skipped and again["other"].skipped and status.stat().st_mtime_ns == stamp
    assert "## tiny" in (root / "experiments" / "runs" / "summary.md").read_text()  # still summarised
    # another parameter, another notebook text, a failed or quick-only earlier run: rerun
    make_set(root, "tiny", "notebooks/tiny.ipynb", parameters={"n": 2, "scale": 1.0})
    make_notebook(root / "notebooks" / "other.ipynb", WRITE_RESULTS.replace("fig_tiny", "fig_other2"))
    again = {r.name: r for r in R.reproduce(["tiny", "other"], root=root, progress=False, skip_done=True)}
    assert not again["tiny"].skipped and not again["other"].skipped
    assert (root / "figures" / "fig_other2.png").exists()
    (quick,) = R.reproduce(["tiny"], quick=True, root=root, progress=False, skip_done=True)
    assert not quick.skipped  # the full run does not stand in for a quick one
    data = json.loads(status.read_text())
    status.write_text(json.dumps({**data, "ok": False}))
    (res,) = R.reproduce(["tiny"], root=root, progress=False, skip_done=True)
    assert not res.skipped and res.ok
    # a status nested past the recursion limit, or naming no notebook, raised RecursionError / KeyError while
    # deciding to skip and writing the summary (a fuzzing helper): it counts as not done, and is left out
    other_status = first["other"].output_dir / ".reproduce.json"
    for broken in ("[" * 10**5 + "]" * 10**5, json.dumps({"ok": True})):
        other_status.write_text(broken)
        (res,) = R.reproduce(["other"], root=root, progress=False, skip_done=True)
        assert not res.skipped and res.ok
        other_status.write_text(broken)
        R.reproduce(["tiny"], root=root, progress=False, skip_done=True)
        assert "## other" not in (root / "experiments" / "runs" / "summary.md").read_text()
    # the fingerprint covers the metaembed source the notebooks import
    assert R.run_fingerprint(R.load_parameter_sets(["tiny"], root=root)[0], root, False) == data["fingerprint"]
    assert R.main(["tiny", "--root", str(root), "--skip-done", "--no-progress"]) == 0
    assert "0 notebook(s) ok, 1 kept from earlier runs" in capsys.readouterr().out


def _make_reader_of_tiny(root: Path) -> None:
    """A set ``reader`` (``after: [tiny]``) whose notebook copies tiny's results.csv into its own folder."""
    make_notebook(root / "notebooks" / "reader.ipynb",
                  "import pathlib, shutil\nout = pathlib.Path(output_dir)\n"
                  "shutil.copy(out.parent / 'tiny' / 'results.csv', out / 'copied.csv')",
                  params="output_dir = '.'\nfigures_dir = '.'")
    (root / "experiments" / "reader.yaml").write_text(yaml.safe_dump(
        {"name": "reader", "notebook": "notebooks/reader.ipynb", "after": ["tiny"], "parameters": {}}))


def test_skip_done_reruns_a_set_whose_after_set_reran(root: Path):
    """--skip-done kept a set that reads another set's results (``after``, e.g. efficiency's accuracy column from
    mmr_ablation) when that set reran with other parameters: the reader's tables held the old results."""
    _make_reader_of_tiny(root)
    runs = root / "experiments" / "runs"
    R.reproduce(None, root=root, progress=False)
    kept = R.reproduce(None, root=root, progress=False, skip_done=True)
    assert [r.skipped for r in kept] == [True, True]  # nothing changed: both kept
    make_set(root, "tiny", "notebooks/tiny.ipynb", parameters={"n": 2, "scale": 1.0})
    R.reproduce(["tiny"], root=root, progress=False)  # the set read reruns alone (other results)
    summary = (runs / "summary.md").read_text()  # this invocation's run first, then the earlier one, marked
    assert "This invocation ran 1 notebook(s): 1 ok, 0 failed." in summary
    assert summary.index("| [tiny](#tiny) |") < summary.index("| [reader](#reader) (earlier run) |")
    assert summary.index("## tiny") < summary.index("## reader")
    again = {r.name: r for r in R.reproduce(None, root=root, progress=False, skip_done=True)}
    assert again["tiny"].skipped and not again["reader"].skipped
    summary = (runs / "summary.md").read_text()  # the kept run is not counted as run by this invocation
    assert "This invocation ran 1 notebook(s): 1 ok, 0 failed." in summary
    assert "| [tiny](#tiny) (earlier run) |" in summary and "| [reader](#reader) |" in summary
    assert (runs / "reader" / "copied.csv").read_text() == (runs / "tiny" / "results.csv").read_text()
    assert len((runs / "reader" / "copied.csv").read_text().strip().splitlines()) == 1 + 2


def test_reproduce_quick_uses_overrides_and_separate_figures(root: Path):
    (res,) = R.reproduce(["tiny"], quick=True, root=root, progress=False)
    rows = (res.output_dir / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # quick: n = 2
    assert (root / "experiments" / "runs" / "quick" / "figures" / "fig_tiny.png").exists()
    assert not (root / "figures").exists()


def test_quick_runs_leave_full_runs_alone(root: Path):
    runs = root / "experiments" / "runs"
    (full,) = R.reproduce(["tiny"], root=root, progress=False)
    (quick,) = R.reproduce(["tiny"], quick=True, root=root, progress=False)
    assert full.output_dir == runs / "tiny" and quick.output_dir == runs / "quick" / "tiny"
    assert len((full.output_dir / "results.csv").read_text().strip().splitlines()) == 1 + 3  # not wiped
    assert R.runs_dir(runs, quick=True) == runs / "quick" and R.runs_dir(runs) == runs
    assert "| (4,16) | 0.7 |" in (runs / "summary.md").read_text()  # full summary: the full run only
    quick_summary = (runs / "quick" / "summary.md").read_text()
    assert "## tiny" in quick_summary and "(4,16)" not in quick_summary and "| True |" in quick_summary


def test_path_parameters_resolve_against_the_repository_root(root: Path):
    """Notebooks run in notebooks/; set paths are relative to the repository root and arrive absolute."""
    make_notebook(root / "notebooks" / "paths.ipynb",
                  "import json, pathlib\npathlib.Path(output_dir, 'paths.json').write_text(json.dumps("
                  "[data_path, eval_path, cache_dir, checkpoints, label]))",
                  params="data_path = None\neval_path = None\ncache_dir = None\ncheckpoints = {}\nlabel = ''\n"
                         "output_dir = '.'\nfigures_dir = '.'")
    params = {"data_path": "data/mmeb/train", "eval_path": "/abs/eval", "cache_dir": None,
              "checkpoints": {"a": "checkpoints/A", "b": "/abs/B", "c": {"path": "ck/C", "precision": "bf16-mixed"}},
              "label": "data/not-a-path"}
    make_set(root, "paths", "notebooks/paths.ipynb", parameters=params, quick={"data_path": "data/small"})
    (res,) = R.reproduce(["paths"], root=root, progress=False)
    got = json.loads((res.output_dir / "paths.json").read_text())
    assert got == [str(root / "data/mmeb/train"), "/abs/eval", None,
                   {"a": str(root / "checkpoints/A"), "b": "/abs/B",
                    "c": {"path": str(root / "ck/C"), "precision": "bf16-mixed"}}, "data/not-a-path"]
    assert json.loads((res.output_dir / ".reproduce.json").read_text())["parameters"]["data_path"] == got[0]
    (res,) = R.reproduce(["paths"], quick=True, root=root, progress=False)
    assert json.loads((res.output_dir / "paths.json").read_text())[0] == str(root / "data/small")
    assert R.is_path_parameter("backbone_path") and R.is_path_parameter("vidore_path")
    assert not R.is_path_parameter("data_source")


def test_resolved_parameters_make_only_path_values_absolute(tmp_path: Path):
    """Which values are paths: strings (and list items) of path parameters, ``path`` / ``*_path`` entries of their
    mapping values; an empty string or null stays as it is (no path: not the repository root)."""
    ps = R.ParameterSet(name="p", notebook="notebooks/p.ipynb", parameters={
        "data_path": "", "cache_dir": None, "eval_root": ["a", "/abs/b"], "max_steps": 5,
        "checkpoints": {"m": {"adapter_path": "ck/A", "path": "ck/M", "lr": "1e-4", "dir": "x"}, "n": ""},
        "label": "data/x"}, quick={"max_steps": 2, "data_path": "data/small"})
    got = ps.resolved_parameters(root=tmp_path)
    assert got == {"data_path": "", "cache_dir": None, "eval_root": [str(tmp_path / "a"), "/abs/b"], "max_steps": 5,
                   "checkpoints": {"m": {"adapter_path": str(tmp_path / "ck/A"), "path": str(tmp_path / "ck/M"),
                                         "lr": "1e-4", "dir": "x"}, "n": ""},
                   "label": "data/x"}
    quick = ps.resolved_parameters(quick=True, root=tmp_path)
    assert quick["max_steps"] == 2 and quick["data_path"] == str(tmp_path / "data/small")
    assert ps.parameters["data_path"] == "" and ps.resolved_parameters() == ps.parameters  # not modified in place


def test_failing_notebook_names_notebook_and_cell(root: Path):
    make_notebook(root / "notebooks" / "broken.ipynb", "x = 1\nraise ValueError('boom at step ' + str(n))")
    make_set(root, "broken", "notebooks/broken.ipynb")
    with pytest.raises(R.NotebookExecutionError) as info:
        R.reproduce(["broken", "tiny"], root=root, progress=False)
    err = info.value
    msg = str(err)
    assert "notebooks/broken.ipynb" in msg and "'broken'" in msg
    assert "cell 3 of 3" in msg  # markdown, parameters, failing cell (the injected cell is not counted)
    assert "ValueError: boom at step 3" in msg
    assert err.cell_index == 2 and err.ename == "ValueError"
    assert err.output_notebook is not None and err.output_notebook.exists()
    # stopped at the first failure: tiny did not run, but the summary records the failure
    assert not (root / "experiments" / "runs" / "tiny").exists()
    summary = (root / "experiments" / "runs" / "summary.md").read_text()
    assert "**FAILED**" in summary and "boom at step 3" in summary


def test_keep_going_runs_the_rest(root: Path):
    make_notebook(root / "notebooks" / "broken.ipynb", "raise RuntimeError('nope')")
    make_set(root, "broken", "notebooks/broken.ipynb")
    with pytest.raises(R.ReproductionError) as info:
        R.reproduce(["broken", "tiny"], root=root, progress=False, keep_going=True)
    assert [r.ok for r in info.value.results] == [False, True]
    assert "1 of 2 notebook(s) failed" in str(info.value) and "RuntimeError: nope" in str(info.value)
    summary = (root / "experiments" / "runs" / "summary.md").read_text()
    assert "### results.csv" in summary and "**FAILED**" in summary
    assert "This invocation ran 2 notebook(s): 1 ok, 1 failed." in summary


def test_undeclared_parameter_is_reported_before_running(root: Path):
    make_set(root, "typo", "notebooks/tiny.ipynb", parameters={"n": 2, "scael": 3.0}, quick={})
    with pytest.raises(R.ParameterSetError, match=r"does not declare \['scael'\]"):
        R.reproduce(["typo"], root=root, progress=False)
    make_notebook(root / "notebooks" / "noparams.ipynb", "print(1)", parameters_cell=False)
    make_set(root, "noparams", "notebooks/noparams.ipynb", parameters={}, quick={})
    with pytest.raises(R.ParameterSetError, match="no cell tagged 'parameters'"):
        R.reproduce(["noparams"], root=root, progress=False)


def test_every_selected_set_is_checked_before_any_runs(root: Path):
    """A typo in a later set stops the run before the first set executes or any run folder is emptied."""
    runs = root / "experiments" / "runs"
    (runs / "tiny").mkdir(parents=True)
    (runs / "tiny" / "results.csv").write_text("kept\n")  # an earlier run's table
    make_set(root, "typo", "notebooks/tiny.ipynb", parameters={"n": 2, "scael": 3.0}, quick={})
    make_notebook(root / "notebooks" / "noparams.ipynb", "print(1)", parameters_cell=False)
    make_set(root, "z_noparams", "notebooks/noparams.ipynb", parameters={}, quick={})
    with pytest.raises(R.ParameterSetError) as info:
        R.reproduce(None, root=root, progress=False, keep_going=True)  # tiny runs first in name order
    assert "'scael'" in str(info.value) and "no cell tagged 'parameters'" in str(info.value)
    assert (runs / "tiny" / "results.csv").read_text() == "kept\n"
    assert not (runs / "tiny" / "tiny.ipynb").exists() and not (runs / "summary.md").exists()


@pytest.mark.parametrize("broken", ["conflicted", "folder"])
def test_an_unreadable_notebook_is_listed_with_the_other_mismatches(root: Path, broken: str):
    """A notebook left with merge-conflict markers (or a folder named .ipynb) ended the check in a raw
    NotJSONError / IsADirectoryError traceback (exit status 1) instead of the listed mismatches (exit status 2)."""
    nb = root / "notebooks" / "broken.ipynb"
    if broken == "folder":
        nb.mkdir(parents=True)
    else:
        nb.write_text('<<<<<<< HEAD\n{"cells": []}\n=======\n')
    make_set(root, "broken", "notebooks/broken.ipynb", parameters={}, quick={})
    make_set(root, "typo", "notebooks/tiny.ipynb", parameters={"n": 2, "scael": 3.0}, quick={})
    with pytest.raises(R.ParameterSetError) as info:
        R.reproduce(None, root=root, progress=False)
    msg = str(info.value)
    assert msg.startswith("2 parameter sets do not match their notebooks")
    assert "parameter set 'broken': cannot read notebooks/broken.ipynb: " in msg and "'scael'" in msg
    assert not (root / "experiments" / "runs").exists()  # nothing ran
    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    assert R.run(parser.parse_args(["broken", "--no-progress", "--root", str(root)])) == 2


def test_a_key_given_twice_in_a_set_is_an_error(tmp_path: Path):
    """PyYAML keeps the last of two equal keys: a second ``max_steps`` further down replaced the first silently."""
    exp = tmp_path / "experiments"
    exp.mkdir()
    (exp / "dup.yaml").write_text("notebook: x.ipynb\nparameters:\n  max_steps: 800\n  n: 1\n  max_steps: 8\n")
    with pytest.raises(R.ParameterSetError, match=r"dup\.yaml: invalid YAML: duplicate key 'max_steps' "
                                                  r"\(first given on line 3\)"):
        R.load_parameter_sets(root=tmp_path)
    (exp / "dup.yaml").write_text("notebook: x.ipynb\nnotebook: y.ipynb\n")
    with pytest.raises(R.ParameterSetError, match="duplicate key 'notebook'"):
        R.load_parameter_sets(root=tmp_path)
    # a merge key may still be overridden, and one key in two mappings is no duplicate
    (exp / "dup.yaml").write_text("notebook: x.ipynb\nparameters: &p {n: 1, m: {n: 2}}\nquick:\n  <<: *p\n  n: 3\n")
    (s,) = R.load_parameter_sets(root=tmp_path)
    assert s.parameters == {"n": 1, "m": {"n": 2}} and s.quick == {"n": 3, "m": {"n": 2}}


def test_cli_list_and_run(root: Path, capsys):
    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    assert R.run(parser.parse_args(["--list", "--root", str(root)])) == 0
    out = capsys.readouterr().out
    assert "tiny " in out and "tiny_gpu" in out and "GPU" in out
    assert R.run(parser.parse_args(["tiny", "--quick", "--no-progress", "--root", str(root)])) == 0
    assert str(Path("experiments", "runs", "quick", "summary.md")) in capsys.readouterr().out
    assert R.run(parser.parse_args(["nope", "--root", str(root)])) == 2  # a usage error, like the other subcommands
    assert "unknown parameter set" in capsys.readouterr().err
    # --list with names lists those; an unknown one is the same error (it listed every set, exit 0)
    assert R.run(parser.parse_args(["tiny_gpu", "--list", "--root", str(root)])) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("tiny_gpu ")
    assert R.run(parser.parse_args(["nope", "--list", "--root", str(root)])) == 2
    assert "unknown parameter set(s) ['nope']" in capsys.readouterr().err


def test_markdown_table():
    import pandas as pd

    md = R.markdown_table(pd.DataFrame({"a|b": [1.23456789, None], "c": ["x|y", "z"]}), max_rows=1)
    assert md.splitlines() == ["| a\\|b | c |", "|---|---|", "| 1.235 | x\\|y |", "", "_1 more row(s) not shown._"]
    md = R.markdown_table(pd.DataFrame({"a": [1.5, None, float("nan")], "c": ["x", None, "z"]}))
    assert md.splitlines()[2:] == ["| 1.5 | x |", "|  |  |", "|  | z |"]  # a missing value is an empty cell


def test_committed_parameter_sets_are_valid():
    """experiments/*.yaml parse; sets whose notebook exists match its parameters cell."""
    if not (REPO / "experiments").is_dir():
        pytest.skip("no experiments/ folder")
    sets = R.load_parameter_sets(include_gpu=True, root=REPO)
    assert sets, "experiments/ has no parameter sets"
    for s in sets:
        assert s.notebook.startswith("notebooks/") and s.notebook.endswith(".ipynb")
        assert s.description
        if (REPO / s.notebook).exists():
            R.check_parameters(s, REPO)


@pytest.mark.parametrize("where, run, after", [("parameters", "mmr_ablaton", ["tiny"]),
                                                ("quick", "tny", ["tiny"]), ("parameters", "tiny", [])])
def test_accuracy_run_must_name_a_set_it_runs_after(root: Path, where, run, after):
    """A misspelt accuracy_run ran efficiency to status ok with an all-NaN accuracy column (a review helper)."""
    make_set(root, "a_reader", "notebooks/tiny.ipynb", parameters={"n": 3, "accuracy_run": None}, quick={})
    data = yaml.safe_load((root / "experiments" / "a_reader.yaml").read_text())
    data[where]["accuracy_run"] = run
    data["after"] = after
    (root / "experiments" / "a_reader.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(R.ParameterSetError, match=rf"a_reader.yaml: {where}.accuracy_run='{run}' must name a set "
                                                  rf"in its 'after' \[.*\] .*known sets: a_reader, tiny"):
        R.load_parameter_sets(root=root)
    data[where]["accuracy_run"], data["after"] = "tiny", ["tiny"]
    (root / "experiments" / "a_reader.yaml").write_text(yaml.safe_dump(data))
    assert [s.name for s in R.load_parameter_sets(root=root)] == ["tiny", "a_reader"]


def test_efficiency_sets_read_the_accuracy_of_the_run_they_follow():
    """efficiency(_paper) takes its accuracy column from accuracy_run, which must be the set it runs after."""
    sets = {s.name: s for s in R.load_parameter_sets(include_gpu=True, root=REPO)}
    for name, run in (("efficiency", "mmr_ablation"), ("efficiency_paper", "mmr_ablation_paper")):
        assert sets[name].parameters["accuracy_run"] == run and sets[name].after == (run,)
    code = "\n".join(c.source for c in nbformat.read(REPO / "notebooks" / "efficiency.ipynb", as_version=4).cells
                     if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    assert "accuracy_run" in code and '"mmr_ablation"' not in code  # no hard-coded run name


def test_parameter_sets_of_one_notebook_share_parameter_names():
    """A notebook's parameters cell must declare the union; keeping the sets aligned keeps that list honest."""
    if not (REPO / "experiments").is_dir():
        pytest.skip("no experiments/ folder")
    by_nb: dict[str, list] = {}
    for s in R.load_parameter_sets(include_gpu=True, root=REPO):
        by_nb.setdefault(s.notebook, []).append(s)
    for nb, sets in by_nb.items():
        keys = {s.name: sorted(s.parameters) for s in sets}
        assert len({tuple(k) for k in keys.values()}) == 1, f"{nb}: parameter names differ: {keys}"


@pytest.mark.parametrize("name", ["quick", "figures", "summary.md"])
def test_reserved_set_names_are_rejected(root: Path, name: str):
    """A set named like a folder of the runs root would empty it: a full run of 'quick' deleted every quick run."""
    R.reproduce(["tiny"], quick=True, root=root, progress=False)
    make_set(root, name, "notebooks/tiny.ipynb")
    with pytest.raises(R.ParameterSetError, match=rf"'{name}' is reserved"):
        R.reproduce([name], root=root, progress=False)
    quick = root / "experiments" / "runs" / "quick"
    assert (quick / "tiny" / "results.csv").exists() and (quick / "figures" / "fig_tiny.png").exists()


TYPED_PARAMS = ("sizes = ['xs']\nlr = 1e-3\nsteps = 10\ngroups = [[1, 1], [2, 4]]\nopt = None\nflag = False\n"
                "output_dir = '.'\nfigures_dir = '.'")


@pytest.mark.parametrize(
    "parameters, quick, match",
    [
        ({"sizes": "xs"}, {}, r"parameters\.sizes = 'xs' \(str\) where the notebook's default is \['xs'\] \(list\)"),
        ({"lr": "1e-3"}, {}, r"parameters\.lr = '1e-3' \(str\)"),  # YAML 1.1 reads 1e-3 as a string
        ({"steps": 10}, {"steps": 2.5}, r"quick\.steps = 2\.5 \(float\)"),
        ({"groups": [1, 1]}, {}, r"parameters\.groups = \[1, 1\]"),
        ({"flag": 0}, {}, r"parameters\.flag = 0 \(int\)"),
    ],
)
def test_parameter_types_are_checked_before_running(root: Path, parameters, quick, match):
    """A value of another kind than the notebook's default is an error before anything runs.

    ``tiny_sizes: xs`` for ``["xs"]`` was iterated as ``["x", "s"]``: it measured size ``s`` without a word.
    """
    make_notebook(root / "notebooks" / "typed.ipynb", "print(sizes, lr, steps, groups, opt, flag)", params=TYPED_PARAMS)
    make_set(root, "typed", "notebooks/typed.ipynb", parameters=parameters, quick=quick)
    with pytest.raises(R.ParameterSetError, match=match):
        R.reproduce(["typed"], root=root, progress=False)
    assert not (root / "experiments" / "runs" / "typed").exists()


def test_an_undeclared_name_and_a_type_mismatch_are_listed_together(root: Path):
    """An undeclared parameter hid the type errors of the same set until it was fixed (one run per mistake)."""
    make_notebook(root / "notebooks" / "typed.ipynb", "print(sizes)", params=TYPED_PARAMS)
    make_set(root, "typed", "notebooks/typed.ipynb", parameters={"sizes": "xs", "stesp": 3, "steps": 1},
             quick={"steps": 2.5})
    with pytest.raises(R.ParameterSetError) as info:
        R.reproduce(["typed"], root=root, progress=False)
    msg = str(info.value)
    assert "does not declare ['stesp']" in msg and "parameters.sizes = 'xs' (str)" in msg
    assert "quick.steps = 2.5 (float)" in msg


def test_compatible_parameter_types_pass(root: Path):
    """null on either side, an int for a float and lists of the default's item kind are accepted."""
    make_notebook(root / "notebooks" / "typed.ipynb",
                  "import json, pathlib\npathlib.Path(output_dir, 'got.json').write_text(json.dumps("
                  "[sizes, lr, steps, groups, opt, flag]))", params=TYPED_PARAMS)
    params = {"sizes": ["s", "m"], "lr": 1, "steps": None, "groups": [[16, 64]], "opt": {"a": [1]}, "flag": True}
    make_set(root, "typed", "notebooks/typed.ipynb", parameters=params, quick={"sizes": []})
    (res,) = R.reproduce(["typed"], root=root, progress=False)
    assert json.loads((res.output_dir / "got.json").read_text()) == [["s", "m"], 1, None, [[16, 64]], {"a": [1]}, True]


def test_paper_sets_configure_the_papers_recipe():
    """*_paper sets -> RunConfigs with §4.1 / Appendix A's recipe (Table 4's batch and lr per model, 3,500 steps,
    tau 0.03, the five groups, LoRA r = alpha = 32 for checkpoints, bf16, gradient checkpointing, 1% held out and
    early stopping on it: without the override the notebooks' base config trained all 3,500 steps)."""
    from metaembed import ablations

    table4 = {"MetaEmbed-3B": (2048, 1e-4), "MetaEmbed-7B": (1536, 1e-4), "MetaEmbed-32B": (1536, 1e-5),
              "MetaEmbed-3B-Gemma": (2048, 1e-4), "MetaEmbed-11B": (1024, 1e-4)}
    sets = {s.name: s for s in R.load_parameter_sets(["mmr_ablation_paper", "backbone_scaling_paper"], root=REPO)}
    configs = []
    for name, s in sets.items():
        p = s.resolved_parameters(root=REPO)
        keys = {k: p[k] for k in ablations.PARAM_KEYS if k in p}
        base = ablations.config_from_params(name=name, overrides=p["overrides"], seed=p["seeds"][0], **keys)
        if name == "mmr_ablation_paper":
            assert (base.train.batch_size, base.train.lr) == table4["MetaEmbed-3B"]
            assert Path(base.model.backbone_path).name == "Qwen2.5-VL-3B-Instruct"
            configs.append(base)
            continue
        specs = ablations.model_specs(p["families"], p["family_size"], p["scaling_family"], p["sizes"], p["checkpoints"])
        assert sorted(sp["model"] for sp in specs) == sorted(table4)
        for sp in specs:
            cfg = ablations.config_from_params(base, backbone=sp["backbone"], backbone_path=sp["backbone_path"],
                                               **sp["overrides"])
            assert (cfg.train.batch_size, cfg.train.lr) == table4[sp["model"]], sp["model"]
            configs.append(cfg)
    for cfg in configs:
        assert cfg.train.max_steps == 3500 and cfg.loss.tau == 0.03 and cfg.loss.mmr
        assert [tuple(g) for g in cfg.loss.groups] == [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]
        assert cfg.model.lora in (None, True) and (cfg.model.lora_r, cfg.model.lora_alpha) == (32, 32)
        assert cfg.model.gradient_checkpointing and cfg.train.precision == "bf16-mixed"
        assert cfg.data.source == "mmeb" and cfg.loss.use_hard_negatives and cfg.data.negatives == "list"
        assert cfg.train.val_fraction == 0.01 and cfg.train.early_stopping_patience is not None
        assert cfg.train.final_weights == "best"  # the model evaluated is the lowest held-out loss one
        assert cfg.train.val_check_interval is not None
        # experiments/configs' schedule (constant lr, no warmup), not the notebooks' tiny-model cosine with warmup
        assert (cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.num_workers) == ("constant", 0, 8)


def test_check_and_strip_of_a_missing_notebook_report_it(tmp_path, capsys):
    """`python -m metaembed.reproduce check|strip missing.ipynb` ended in a FileNotFoundError traceback."""
    missing = str(tmp_path / "missing.ipynb")
    for cmd in ("check", "strip"):
        assert R.main([cmd, missing]) == 1
        assert f"{missing}: no such notebook" in capsys.readouterr().err


def test_a_typo_in_overrides_is_caught_before_anything_runs(root: Path):
    """``overrides`` keys reached the config only inside the notebook: a typo failed that set after earlier
    sets had run for minutes."""
    make_notebook(root / "notebooks" / "ov.ipynb", "pass", params="overrides = {}\noutput_dir = '.'\nfigures_dir = '.'")
    make_set(root, "ov", "notebooks/ov.ipynb", parameters={"overrides": {"train.grad_cach_chunk_size": 64}}, quick={})
    with pytest.raises(R.ParameterSetError) as info:
        R.reproduce(None, root=root, progress=False)
    assert "parameters.overrides: unknown config key(s) train.grad_cach_chunk_size" in str(info.value)
    assert not (root / "experiments" / "runs").exists()  # nothing ran
    make_set(root, "ov", "notebooks/ov.ipynb", parameters={"overrides": {"train.grad_cache_chunk_size": 64}},
             quick={"overrides": {"train.max_steps": "ten"}})
    with pytest.raises(R.ParameterSetError, match="quick.overrides: train.max_steps must be an integer"):
        R.check_parameters(R.load_parameter_sets(["ov"], root=root)[0], root)
    make_set(root, "ov", "notebooks/ov.ipynb", parameters={"overrides": {"train.grad_cache_chunk_size": 64}}, quick={})
    R.check_parameters(R.load_parameter_sets(["ov"], root=root)[0], root)  # a real key of the right type


def test_an_override_of_a_notebook_parameter_or_a_method_key_is_refused(root: Path):
    """An ``overrides`` entry for a key a notebook parameter sets won over it (the tables reported the
    parameter's lr), and one for a key method_config sets (seeds, loss.mmr) was reset per method: the run
    differed from its record either way (a review helper)."""
    from metaembed import ablations as A
    from metaembed.config import ConfigError

    make_notebook(root / "notebooks" / "ov.ipynb", "pass",
                  params="lr = 1e-3\nseeds = [0]\noverrides = {}\noutput_dir = '.'\nfigures_dir = '.'")
    for key, value, says in (("train.lr", 1e-5, "notebook parameter 'lr'"), ("data.seed", 7, "parameter 'seed'"),
                             ("loss.mmr", False, "per method by method_config")):
        make_set(root, "ov", "notebooks/ov.ipynb", parameters={"overrides": {key: value}}, quick={})
        with pytest.raises(R.ParameterSetError, match=f"parameters.overrides: {key} is set by the|{says}"):
            R.check_parameters(R.load_parameter_sets(["ov"], root=root)[0], root)
        with pytest.raises(ConfigError, match=says):  # an interactive run refuses it too
            A.config_from_params(lr=2e-3, seed=0, overrides={key: value})
    # a parameter not given (None = all data) leaves its key to overrides; other keys are unaffected
    assert A.config_from_params(n_train=None, overrides={"data.n_train": 5}).data.n_train == 5
    assert A.config_from_params(lr=2e-3, overrides={"train.grad_cache_chunk_size": 4}).train.lr == 2e-3


def test_a_yml_parameter_set_is_an_error_not_skipped(root: Path):
    (root / "experiments" / "extra.yml").write_text("name: extra\n")
    with pytest.raises(R.ParameterSetError, match=r"must end in \.yaml; rename \['extra\.yml'\]"):
        R.load_parameter_sets(root=root)


def test_cli_passes_every_option_to_reproduce_and_maps_failures_to_exit_codes(tmp_path: Path, monkeypatch, capsys):
    """`metaembed reproduce` flags reach :func:`reproduce`; a failed notebook (also under --keep-going) exits 1."""
    calls = []

    def fake(names, **kwargs):
        calls.append((names, kwargs))
        return []

    monkeypatch.setattr(R, "reproduce", fake)
    assert R.main(["a", "b", "--quick", "--keep-going", "--include-gpu", "--out-root", "out", "--figures-dir", "figs",
                   "--root", str(tmp_path), "--kernel", "k", "--timeout", "7.5", "--no-progress", "--skip-done"]) == 0
    assert calls.pop() == (["a", "b"], dict(quick=True, out_root="out", figures_dir="figs", progress=False,
                                             keep_going=True, include_gpu=True, kernel_name="k", root=tmp_path,
                                             timeout=7.5, skip_done=True))
    assert R.main(["--root", str(tmp_path)]) == 0
    assert calls.pop() == (None, dict(quick=False, out_root="experiments/runs", figures_dir=None, progress=True,
                                      keep_going=False, include_gpu=False, kernel_name=None, root=tmp_path,
                                      timeout=None, skip_done=False))
    err = R.NotebookExecutionError("boom", name="x", notebook=Path("x.ipynb"))
    for exc, code in ((err, 1), (R.ReproductionError([err], [], None), 1), (R.ParameterSetError("bad"), 2)):
        def failing(names, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(R, "reproduce", failing)
        capsys.readouterr()
        assert R.main(["--keep-going", "--root", str(tmp_path)]) == code
        assert "metaembed reproduce: error: " in capsys.readouterr().err


def test_papermill_receives_the_sets_parameters_and_the_run_folders(root: Path, monkeypatch):
    """What each notebook is executed with: its set's (quick) parameters, output_dir / figures_dir, the timeout,
    the kernel and notebooks/ as working directory (papermill itself replaced by a recorder)."""
    import papermill

    calls = []

    def record(input_path, output_path, parameters, **kwargs):
        calls.append((input_path, output_path, parameters, kwargs))
        Path(output_path).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", record)
    make_set(root, "tiny", "notebooks/tiny.ipynb", parameters={"n": 5, "scale": 2.0}, quick={"n": 1})
    (res,) = R.reproduce(["tiny_gpu"], root=root, progress=False, kernel_name="k", timeout=9.0)
    (full,) = R.reproduce(["tiny"], root=root, progress=False, kernel_name="k")
    (quick,) = R.reproduce(["tiny"], quick=True, root=root, progress=False, kernel_name="k")
    runs = root / "experiments" / "runs"
    nb = str((root / "notebooks" / "tiny.ipynb").resolve())
    assert calls[0] == (nb, str(runs / "tiny_gpu" / "tiny.ipynb"),
                        {"n": 3, "scale": 1.0, "output_dir": str(runs / "tiny_gpu"),
                         "figures_dir": str(root / "figures" / "tiny_gpu")},
                        dict(kernel_name="k", progress_bar=False, cwd=str(root / "notebooks"), execution_timeout=9.0))
    assert calls[1][2] == {"n": 5, "scale": 2.0, "output_dir": str(runs / "tiny"), "figures_dir": str(root / "figures")}
    assert calls[1][3]["execution_timeout"] is None
    assert calls[2][2] == {"n": 1, "scale": 2.0, "output_dir": str(runs / "quick" / "tiny"),
                           "figures_dir": str(runs / "quick" / "figures")}
    assert [r.parameters for r in (res, full, quick)] == [{"n": 3, "scale": 1.0}, {"n": 5, "scale": 2.0},
                                                          {"n": 1, "scale": 2.0}]


def test_a_second_reproduce_into_the_same_runs_folder_is_refused(root: Path, capsys):
    """Two reproduce runs into one runs folder (a rerun started while one runs) emptied each other's run folders:
    both reported success, with summaries missing tables (a concurrency review).  The second is refused, naming the
    process, before anything runs or is deleted; the quick runs' folder is another one."""
    (first,) = R.reproduce(["tiny"], root=root, progress=False)
    marker = first.output_dir / "results_of_the_first.csv"
    marker.write_text("x\n")
    out = root / "experiments" / "runs"
    with R._runs_folder_lock(out):
        with pytest.raises(R.RunsFolderBusyError, match=rf"another metaembed reproduce \(process {os.getpid()}@.*\) "
                                                         rf"is running into {re.escape(str(out))}; wait"):
            R.reproduce(["tiny"], root=root, progress=False)
        assert marker.is_file()
        assert R.main(["tiny", "--root", str(root), "--no-progress"]) == 1
        assert "is running into" in capsys.readouterr().err
        (quick,) = R.reproduce(["tiny"], root=root, progress=False, quick=True)
        assert quick.ok
    (again,) = R.reproduce(["tiny"], root=root, progress=False)
    assert again.ok and not marker.exists()


def test_a_rerun_empties_the_run_folder_and_lists_rewritten_figures(root: Path):
    """A table left by an earlier run of the set must not reach the new summary; a figure the rerun draws again
    (same file name) is one of its figures."""
    (first,) = R.reproduce(["tiny"], root=root, progress=False)
    (first.output_dir / "old_table.csv").write_text("budget,p_at_1\n(9,9),0.1\n")
    (again,) = R.reproduce(["tiny"], root=root, progress=False)
    assert not (again.output_dir / "old_table.csv").exists()
    assert "old_table" not in (root / "experiments" / "runs" / "summary.md").read_text()
    assert again.figures == first.figures == [root / "figures" / "fig_tiny.png"]


def test_a_rerun_removes_the_figures_of_the_previous_run_it_does_not_draw(root: Path, monkeypatch):
    """A figure the earlier run drew and the rerun (other parameters) does not stayed in figures/ beside the new
    ones; files the run did not draw are left alone."""
    body = WRITE_RESULTS + "if n > 2:\n    (pathlib.Path(figures_dir) / 'fig_big.png').write_bytes(b'big')\n"
    make_notebook(root / "notebooks" / "tiny.ipynb", body)
    (root / "figures").mkdir(exist_ok=True)
    (root / "figures" / "mine.png").write_bytes(b"not the runner's")
    (first,) = R.reproduce(["tiny"], root=root, progress=False)
    assert {p.name for p in first.figures} == {"fig_tiny.png", "fig_big.png"}
    # a rerun that fails keeps the last good run's figures (deleted before the run, they were lost with it)
    make_notebook(root / "notebooks" / "tiny.ipynb", "raise RuntimeError('broken on purpose')")
    with pytest.raises(R.ReproductionError):
        R.reproduce(["tiny"], root=root, progress=False, keep_going=True)
    assert {"fig_tiny.png", "fig_big.png"} <= {p.name for p in (root / "figures").iterdir()}
    # a run killed part-way (here interrupted): the emptied run folder was the only record of those figures, so
    # the next good run left fig_big beside its own (a crash review); the status is written before the run now
    import papermill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        R.reproduce(["tiny"], root=root, progress=False)
    monkeypatch.undo()
    status = json.loads((root / "experiments" / "runs" / "tiny" / ".reproduce.json").read_text())
    assert not status["ok"] and "did not finish" in status["error"]
    make_notebook(root / "notebooks" / "tiny.ipynb", body)
    make_set(root, "tiny", "notebooks/tiny.ipynb", parameters={"n": 2, "scale": 1.0})
    (again,) = R.reproduce(["tiny"], root=root, progress=False)  # still owns fig_big, through the failed run
    assert [p.name for p in again.figures] == ["fig_tiny.png"]
    assert sorted(p.name for p in (root / "figures").iterdir()) == ["fig_tiny.png", "mine.png"]


def test_run_fingerprint_covers_the_metaembed_source(root: Path, tmp_path: Path, monkeypatch):
    """--skip-done must rerun a set after a change of the library it imports (.py, .cu, .cuh, .yaml), not after
    another file's."""
    pkg = tmp_path / "pkg"
    (pkg / "kernels").mkdir(parents=True)
    for name in ("reproduce.py", "kernels/maxsim.cu", "kernels/maxsim.cuh", "configs.yaml", "notes.txt"):
        (pkg / name).write_text("a")
    monkeypatch.setattr(R, "__file__", str(pkg / "reproduce.py"))
    (ps,) = R.load_parameter_sets(["tiny"], root=root)
    before = R.run_fingerprint(ps, root, False)
    (pkg / "notes.txt").write_text("b")
    assert R.run_fingerprint(ps, root, False) == before
    for name in ("reproduce.py", "kernels/maxsim.cu", "kernels/maxsim.cuh", "configs.yaml"):
        (pkg / name).write_text("b")
        assert R.run_fingerprint(ps, root, False) != before, name
        (pkg / name).write_text("a")
    assert R.run_fingerprint(ps, root, False) == before
    assert R.run_fingerprint(ps, root, True) != before  # quick: other parameters


def test_the_notebook_must_declare_output_dir_and_figures_dir(root: Path):
    make_notebook(root / "notebooks" / "nodirs.ipynb", "pass", params="n = 3\nscale = 1.0\noutput_dir = '.'")
    make_set(root, "nodirs", "notebooks/nodirs.ipynb")
    with pytest.raises(R.ParameterSetError, match=r"does not declare \['figures_dir'\]"):
        R.check_parameters(R.load_parameter_sets(["nodirs"], root=root)[0], root)


def test_find_root_needs_notebooks_or_pyproject_beside_experiments(tmp_path: Path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "notebooks").mkdir()
    inner = tmp_path / "notebooks" / "scratch"
    (inner / "experiments").mkdir(parents=True)  # an experiments/ folder alone does not make a root
    assert R.find_root(inner) == tmp_path
    (inner / "pyproject.toml").write_text("")
    assert R.find_root(inner) == inner


def test_check_notebook_size_limit_and_injected_cell(tmp_path: Path):
    """A committed notebook must be smaller than 400 KB (exactly 400 KB is too big) and hold no injected cell."""
    def write(pad: int, injected: bool = False) -> Path:
        nb = nbformat.v4.new_notebook()
        p = nbformat.v4.new_code_cell("n = 1")
        p.metadata["tags"] = ["parameters"]
        nb.cells = [p, nbformat.v4.new_code_cell("import metaembed\n# " + "x" * pad)]
        if injected:
            cell = nbformat.v4.new_code_cell("n = 2")
            cell.metadata["tags"] = ["injected-parameters"]
            nb.cells.insert(1, cell)
        path = tmp_path / "nb.ipynb"
        nbformat.write(nb, path)
        return path

    base = write(0).stat().st_size
    assert R.check_notebook(write(R.MAX_NOTEBOOK_BYTES - base - 1)) == []
    path = write(R.MAX_NOTEBOOK_BYTES - base)
    assert path.stat().st_size == R.MAX_NOTEBOOK_BYTES
    assert R.check_notebook(path) == ["nb.ipynb: 400 KB >= 400 KB"]
    assert R.check_notebook(write(0, injected=True)) == [
        "nb.ipynb: contains a papermill injected-parameters cell (an executed copy?)"]


def test_skip_done_does_not_keep_a_quick_run_for_a_full_one(root: Path):
    """A set without quick overrides has one fingerprint for both kinds of run; with --out-root at the quick folder,
    a full --skip-done run finds the quick run's status: it must rerun, not keep the smoke test."""
    make_set(root, "plain", "notebooks/tiny.ipynb", quick={})
    runs = root / "experiments" / "runs"
    (quick,) = R.reproduce(["plain"], quick=True, out_root=runs, root=root, progress=False)
    assert quick.output_dir == runs / "quick" / "plain"
    (full,) = R.reproduce(["plain"], out_root=runs / "quick", root=root, progress=False, skip_done=True)
    assert not full.skipped and full.ok
    (again,) = R.reproduce(["plain"], out_root=runs / "quick", root=root, progress=False, skip_done=True)
    assert again.skipped  # now a full run of the same inputs is there


def test_named_sets_keep_the_order_given_and_a_repeated_name_runs_once(root: Path):
    """``names`` are run in the order given (``after`` permitting), not re-sorted; a repeat is one run
    (mutabl: sorted(names))."""
    assert [s.name for s in R.load_parameter_sets(["tiny_gpu", "tiny"], root=root)] == ["tiny_gpu", "tiny"]
    assert [s.name for s in R.load_parameter_sets(["tiny", "tiny_gpu", "tiny"], root=root)] == ["tiny", "tiny_gpu"]


def test_skip_done_reruns_a_reader_whose_after_set_reran_with_the_same_inputs(root: Path):
    """A set rerun with unchanged inputs (same fingerprint) still wrote new results (training is not bit-exact on
    a GPU): its readers rerun under --skip-done (mutabl: 'after' recorded as [fingerprint, ok], without 'finished')."""
    import re
    import time

    _make_reader_of_tiny(root)
    R.reproduce(None, root=root, progress=False)
    status = json.loads((root / "experiments" / "runs" / "tiny" / ".reproduce.json").read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", status["finished"])  # to the second (mutabl: %H:%M)
    time.sleep(1.1)  # 'finished' is recorded to the second
    R.reproduce(["tiny"], root=root, progress=False)  # same inputs, rerun on purpose
    again = {r.name: r for r in R.reproduce(None, root=root, progress=False, skip_done=True)}
    assert again["tiny"].skipped and not again["reader"].skipped


def test_a_rerun_into_another_figures_folder_leaves_the_first_folders_figures(root: Path, tmp_path: Path):
    """Only figures in the set's current figures folder are the previous run's to clean up: a rerun with another
    --figures-dir must not delete the figures drawn into the first one (mutabl: no is_relative_to check)."""
    other = tmp_path / "elsewhere"
    R.reproduce(["tiny"], root=root, progress=False, figures_dir=other)
    assert (other / "fig_tiny.png").exists()
    body = WRITE_RESULTS.replace("fig_tiny", "fig_renamed")
    make_notebook(root / "notebooks" / "tiny.ipynb", body)
    (again,) = R.reproduce(["tiny"], root=root, progress=False)
    assert [p.name for p in again.figures] == ["fig_renamed.png"]
    assert (other / "fig_tiny.png").exists()


def test_markdown_table_shows_sixty_rows_before_truncating():
    """summary.md shows up to 60 rows of a table (a 5-budget x 5-method x 2-seed curve table fits); the 61st is
    cut (mutabl: max_rows=50)."""
    import pandas as pd

    md = R.markdown_table(pd.DataFrame({"x": range(60)}))
    assert len(md.splitlines()) == 2 + 60 and "not shown" not in md
    md = R.markdown_table(pd.DataFrame({"x": range(61)}))
    assert md.splitlines()[-1] == "_1 more row(s) not shown._"


def test_skip_done_keeps_a_finished_quick_run(root: Path):
    """--quick --skip-done resumes an interrupted smoke test too: the status records the quick run's fingerprint
    (mutabl: fingerprint of the full parameters recorded, so a quick run never matched and always reran)."""
    (first,) = R.reproduce(["tiny"], quick=True, root=root, progress=False)
    (again,) = R.reproduce(["tiny"], quick=True, root=root, progress=False, skip_done=True)
    assert again.skipped and again.parameters == {"n": 2, "scale": 1.0}
