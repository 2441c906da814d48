"""The newcomer's documentation stays true: every command, flag, path, config key, API name, make target
and figure that README.md / experiments/README.md /
lib/metaembed/kernels/README.md (and the recipe headers and module docstrings) cite exists."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "experiments/README.md", "lib/metaembed/kernels/README.md")
# where `metaembed <sub> ...` command lines are shown to a user
COMMAND_SOURCES = (*DOCS, "docs/CONTRACTS.md", "experiments/configs/*.yaml",
                   "lib/metaembed/configs/*.yaml", "lib/metaembed/*.py")
SECTIONS = ("model", "loss", "train", "data", "eval")
# outputs a run writes (not in a clone) and placeholders, named in backticks as paths
GENERATED = ("experiments/runs", "runs/", "checkpoints.previous/", "model.previous/", "config.previous.yaml",
             "logs.previous/", ".whl/",
             "summary.md")


def _read(rel: str) -> str:
    return (ROOT / rel).read_text()


def _sources(patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pat in patterns for p in ROOT.glob(pat)})


def _backticked(text: str) -> list[str]:
    """Inline code spans (fenced blocks removed first: their lines are checked as commands)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def _commands(text: str) -> list[list[str]]:
    """``metaembed SUB ...`` command lines, continuation lines joined, as token lists (comments dropped)."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)  # continuation lines, also inside YAML comments
    out = []
    for m in re.finditer(r"(?<![\w.-])metaembed ([a-z][a-z-]*)\b([^\n`|]*)", text):
        rest = m.group(2).split(" #")[0]
        try:
            tokens = shlex.split(rest)
        except ValueError:  # an unbalanced quote in prose
            tokens = rest.split()
        out.append([m.group(1), *tokens])
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser with its arguments (``build_parser`` adds only the named one's)."""
    from metaembed.cli import SUBCOMMANDS, build_parser

    out = {}
    for name in SUBCOMMANDS:
        parser = build_parser([name])
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        out[name] = action.choices[name]
    return out


def _option_strings(sub: argparse.ArgumentParser) -> set[str]:
    return {s for a in sub._actions for s in a.option_strings}


def test_every_documented_command_and_flag_exists():
    """``metaembed SUB --flag`` wherever a user is shown one: SUB is a subcommand and --flag one of its options."""
    subs = _subparsers()
    wrong = []
    for path in _sources(COMMAND_SOURCES):
        for sub, *tokens in _commands(path.read_text()):
            where = f"{path.relative_to(ROOT)}: metaembed {sub} {' '.join(tokens)}"
            if sub not in subs:
                if re.fullmatch(r"[a-z]+(-[a-z]+)*", sub) and tokens and tokens[0].startswith("--"):
                    wrong.append(f"{where}: no subcommand {sub!r}")
                continue
            known = _option_strings(subs[sub])
            for tok in tokens:
                flag = re.match(r"\[?(--[a-zA-Z][\w-]*)", tok)
                if flag and flag.group(1) not in known:
                    wrong.append(f"{where}: {flag.group(1)} is not an option of 'metaembed {sub}'")
    assert not wrong, "\n".join(wrong)


def _is_repo_path(span: str) -> bool:
    if re.search(r"\s|[<>*{}$~\[\]]|\.\.\.", span) or span.startswith(("/", "-", "..")):
        return False  # placeholders, globs, absolute or command fragments
    if span.startswith(GENERATED) or re.fullmatch(r"[A-Z_]+", span.split("/")[0]):
        return False  # a run's outputs; OUT_DIR/..., B/CHUNK: placeholders
    return "/" in span or bool(re.search(r"\.(py|ya?ml|md|png|sh|ipynb|toml|cuh?|safetensors)$", span))


def test_every_backticked_path_exists():
    """Paths a newcomer is pointed at (relative to the repo, the document, ``lib/``, ``figures/`` or
    ``experiments/``) exist."""
    missing = []
    for rel in DOCS:
        doc_dir = (ROOT / rel).parent
        for span in _backticked(_read(rel)):
            span, _, node = span.rstrip(".,;:").partition("::")  # tests/test_x.py::test_name: a pytest node id
            if not _is_repo_path(span):
                continue
            bases = (ROOT, doc_dir, ROOT / "lib", ROOT / "figures", ROOT / "experiments")
            found = next((base / span for base in bases if (base / span).exists()), None)
            if found is None or (node and not re.search(rf"^def {re.escape(node)}\(", found.read_text(), flags=re.M)):
                missing.append(f"{rel}: `{span}{'::' + node if node else ''}`")
    assert not missing, "named in the docs but not in the repository:\n" + "\n".join(missing)


def _config_fields() -> dict[str, set[str]]:
    from metaembed.config import RunConfig

    cfg = RunConfig()
    return {s: {f.name for f in dataclasses.fields(getattr(cfg, s))} for s in SECTIONS}


def test_every_documented_config_key_exists():
    """``train.checkpoint_every_n_steps``-style keys (in backticks or after ``--set``) are RunConfig fields."""
    fields = _config_fields()
    key = r"(%s)\.([A-Za-z_]\w*)" % "|".join(SECTIONS)
    unknown = []
    for path in _sources((*DOCS, "experiments/configs/*.yaml", "lib/metaembed/configs/*.yaml")):
        text = path.read_text().replace("\\\n", " ")
        found = [re.match(key, s.strip()).groups() for s in _backticked(text)
                 if re.fullmatch(key + r"\s*([=:].*)?", s.strip())]
        found += re.findall(r"--set[ =]" + key + "=", text)
        for section, name in found:
            if name not in fields[section] and name not in ("py", "yaml", "md"):  # model.py is a file
                unknown.append(f"{path.relative_to(ROOT)}: {section}.{name}")
    assert not unknown, "config keys the docs cite but RunConfig lacks:\n" + "\n".join(unknown)


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_documented_api_name_resolves():
    """``metaembed.module.name`` references in the docs import and resolve (no renamed or removed API)."""
    names = sorted({m.group(0) for rel in (*DOCS, "docs/CONTRACTS.md")
                    for m in re.finditer(r"(?<![\w./-])metaembed(?:\.\w+)+", _read(rel))})
    assert "metaembed.config.RunConfig" in names  # the scan sees the docs' references
    broken = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            broken.append(f"{name}: {type(e).__name__}: {e}")
    assert not broken, "\n".join(broken)


def test_every_documented_make_target_exists_and_make_test_is_the_documented_command():
    targets = set(re.findall(r"^([a-z][\w-]*):", _read("Makefile"), flags=re.M))
    cited = {t for rel in DOCS for t in re.findall(r"`make ([a-z][\w-]*)`", _read(rel))}
    cited |= set(re.findall(r"^make ([a-z][\w-]*)", _read("README.md"), flags=re.M))
    assert {"test", "reproduce", "quickstart"} <= cited
    assert cited <= targets, f"make targets the docs name but the Makefile lacks: {sorted(cited - targets)}"
    recipe = re.search(r"^test: .*\n\t(.*)$", _read("Makefile"), flags=re.M).group(1)
    assert "pytest tests notebooks --nbval-lax" in recipe and "pytest tests notebooks --nbval-lax" in _read("README.md")
    assert re.search(r"^make test$", _read(".ci/run"), flags=re.M)  # CI runs what the README calls the test command


def test_figures_table_lists_exactly_the_committed_figures():
    """Each figure the README describes is in ``figures/``, and each committed figure is described."""
    readme = _read("README.md")
    section = readme.split("### Figures", 1)[1].split("\n## ", 1)[0]
    described = set(re.findall(r"^\| `([\w-]+\.png)` \|", section, flags=re.M))
    committed = {p.name for p in (ROOT / "figures").glob("*.png")}
    assert described, "no figure rows found"
    assert described == committed, f"described only: {sorted(described - committed)}; " \
                                   f"committed only: {sorted(committed - described)}"


@pytest.mark.parametrize("concept", ["Meta Tokens", "MMR", "MaxSim", "(r_q, r_c)", "r_q", "groups", "budget", "tau",
                                     "index", "Precision@1", "P@1", "NDCG@5", "Modality-gap"])
def test_readme_says_where_each_concept_of_the_paper_lives(concept):
    """The 'Where each idea of the paper lives' table names a module that exists for each paper concept."""
    readme = _read("README.md")
    table = readme.split("### Where each idea of the paper lives", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|") and concept.lower() in line.lower()]
    if concept == "(r_q, r_c)":  # the budget: README's formula block names it, the groups row says where
        assert "(r_q, r_c)" in readme
        rows = [line for line in table.splitlines() if "budgets" in line]
    assert rows, f"no row for {concept!r}"
    for row in rows:
        for module in re.findall(r"`(metaembed/[\w/.]+)`", row):
            assert (ROOT / "lib" / module).exists(), f"{concept}: {module} does not exist"


#: how README.md names each registered backbone family (its backbones row and "Backbone quirks handled")
README_FAMILY_NAMES = {"qwen2_5_vl": "Qwen2.5-VL", "qwen2_vl": "Qwen2-VL", "paligemma": "PaliGemma", "mllama": "Mllama"}


def test_readme_names_every_registered_backbone_family():
    """README lists the families by hand: the backbones row of the concept table and the per-family quirks.  A family
    registered in the library (or one removed) fails here until README says how its inputs are laid out."""
    from metaembed.backbones import BACKBONES

    assert set(README_FAMILY_NAMES) == set(BACKBONES), "update README (and README_FAMILY_NAMES) for the new family"
    readme = _read("README.md")
    row = next(line for line in readme.splitlines() if line.startswith("| Backbones:"))
    quirks = readme.split("## Backbone quirks handled", 1)[1].split("\n## ", 1)[0]
    for family, name in README_FAMILY_NAMES.items():
        assert name in row, f"README's backbones row does not name {name} ({family})"
        assert re.search(rf"\*\*[^*]*{re.escape(name)}[^*]*:\*\*", quirks), \
            f"README's 'Backbone quirks handled' has no entry for {name} ({family})"
    n_words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    assert f"for all {n_words[len(BACKBONES)]} families" in quirks


def test_cli_module_docstring_names_every_subcommand():
    """``metaembed.cli``'s docstring opens with the list of subcommands: all of them, none that is gone."""
    import metaembed.cli as cli

    first = (cli.__doc__ or "").split("\n\n")[0]  # the summary paragraph
    named = set(re.findall(r"``([a-z][a-z-]*)``", first)) - {"metaembed"}
    assert named == set(cli.SUBCOMMANDS), f"docstring: {sorted(named)}; subcommands: {sorted(cli.SUBCOMMANDS)}"


def test_module_docstrings_cite_existing_names():
    """``:func:`name``` / ``:class:`name``` roles in the first docstring of each ``lib/metaembed/*.py`` resolve."""
    broken = []
    for path in sorted((ROOT / "lib" / "metaembed").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        module = "metaembed" if path.stem == "__init__" else f"metaembed.{path.stem}"
        for role, name in re.findall(r":(func|class|meth|data|mod|exc|attr):`~?([\w.]+)`", doc):
            for candidate in (name, f"{module}.{name}", f"metaembed.{name}"):
                try:
                    _resolve(candidate)
                    break
                except (ImportError, AttributeError):
                    continue
            else:
                broken.append(f"{path.name}: :{role}:`{name}`")
    assert not broken, "\n".join(broken)


def test_duplicate_positive_share_quoted_for_the_synthetic_benchmark():
    """experiments/README.md's share of in-batch copies of a positive (what ``loss.mask_duplicate_candidates``
    is about) is what the synthetic training set gives: positives with a copy in a shuffled batch of 32, and
    rows repeating an earlier row's positive (the README once quoted the second as the first)."""
    import random
    from collections import Counter

    from metaembed.data.records import item_key
    from metaembed.data.synthetic import make_benchmark

    text = " ".join(_read("experiments/README.md").split())
    m = re.search(r"about (\d+(?:\.\d+)?)% of the positives in a shuffled batch of 32 have a copy in that batch "
                  r"\((\d+(?:\.\d+)?)% of the rows repeat an earlier row's positive\)", text)
    assert m, "the sentence on in-batch copies changed: update this test with it"
    keys = [item_key(e.positive) for e in make_benchmark(n_train=4000, n_eval_queries=48, seed=0).train]
    with_copy = repeats = rows = 0
    for seed in range(3):
        order = random.Random(seed).sample(keys, len(keys))
        for i in range(0, len(order) - 31, 32):
            counts = Counter(order[i:i + 32])
            with_copy += sum(c for c in counts.values() if c > 1)
            repeats += sum(c - 1 for c in counts.values())
            rows += 32
    assert abs(100 * with_copy / rows - float(m.group(1))) < 1.0, 100 * with_copy / rows
    assert abs(100 * repeats / rows - float(m.group(2))) < 0.5, 100 * repeats / rows


def test_train_bench_eval_item_counts_quoted_in_experiments_readme():
    """experiments/README.md's item counts of ``metaembed train-bench``'s evaluation path (226 at the default
    ``--eval-queries 4``, 65 at 1; it once said "about 260") are what ``_measure_eval`` encodes."""
    from types import SimpleNamespace

    import torch

    from metaembed.train_bench import TrainBenchConfig, _measure_eval

    text = " ".join(_read("experiments/README.md").split())
    default = re.search(r"on (?:about )?(\d+) synthetic items \(4 queries per task(?: of the (\d+) synthetic tasks)?, "
                        r"`--eval-queries`\)", text)
    table = re.search(r"the evaluation path on (?:about )?(\d+) synthetic items \|", text)
    one = re.search(r"--eval-queries 1`.*? encodes the (\d+) items of the (\d+) synthetic tasks", text)
    assert default and table and one, "the train-bench sentences changed: update this test with them"

    class _Counter:  # stands in for the model: random unit vectors, R_q / R_c rows by role
        config = SimpleNamespace(max_text_length=256)

        def encode(self, items, role, batch_size=32, progress=False):
            x = torch.randn(len(items), 16 if role == "query" else 64, 8)  # [n, R, D]
            return torch.nn.functional.normalize(x, dim=-1)

    for queries, quoted, tasks in ((4, {int(default.group(1)), int(table.group(1))}, int(default.group(2) or 0)),
                                   (1, {int(one.group(1))}, int(one.group(2)))):
        cfg = TrainBenchConfig(backbone="tiny-xs", eval_queries_per_task=queries, image_size=16, progress=False)
        out = _measure_eval(_Counter(), cfg, torch.device("cpu"))
        assert quoted == {out["items_encoded"]} and tasks == out["tasks"], (queries, quoted, out)


def test_quickstart_time_provenance_names_the_commit_of_its_description():
    """The commit experiments/README.md names for the quickstart set's quoted time is the one its description
    quotes (the README kept an older commit after a rerun)."""
    text = " ".join(_read("experiments/README.md").split())
    m = re.search(r"the quickstart's (?:from|time and numbers are) ([0-9a-f]{7})", text)
    assert m, "the sentence on where the descriptions' run times come from changed: update this test with it"
    description = " ".join(_read("experiments/quickstart.yaml").split())
    quoted = re.search(r"\(commit ([0-9a-f]{7})\)", description)
    assert quoted and quoted.group(1) == m.group(1), (m.group(1), quoted and quoted.group(1))


def test_tiny_size_vocabulary_matches_the_families_sizes():
    """The ``tiny_size`` row lists every tiny size, and one that some family lacks is marked as such."""
    from metaembed.config import TINY_SIZES

    row = next(line for line in _read("experiments/README.md").splitlines() if line.startswith("| `tiny_size` |"))
    meaning = row.split("|")[2]
    everyone = set.intersection(*(set(v) for v in TINY_SIZES.values()))
    named = set(re.findall(r"`(\w+)`", meaning))
    assert named == set().union(*TINY_SIZES.values()), (named, TINY_SIZES)
    for size in sorted(named - everyone):
        assert re.search(rf"`{size}` \([^)]*only\)", meaning), f"`{size}` is not a size of every family: {TINY_SIZES}"


def test_every_documented_python_m_command_and_flag_exists():
    """``python -m metaembed.X --flag`` in the READMEs: the module runs (``--help``) and lists each flag."""
    import os
    import subprocess
    import sys

    cited: dict[str, set[str]] = {}
    for rel in DOCS:
        text = re.sub(r"\\\n\s*", " ", _read(rel))
        for m in re.finditer(r"python -m (metaembed(?:\.\w+)*)([^\n`|]*)", text):
            flags = re.findall(r"(?<!\S)(--[a-zA-Z][\w-]*)", m.group(2).split(" #")[0])
            cited.setdefault(m.group(1), set()).update(flags)
    assert {"metaembed.kernels", "metaembed.kernels.selfcheck", "metaembed.reproduce"} <= set(cited)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])}
    wrong = []
    for module, flags in sorted(cited.items()):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=60)
        if out.returncode != 0:
            wrong.append(f"python -m {module} --help: exit {out.returncode}: {out.stderr[-300:]}")
        wrong += [f"python -m {module}: no option {f}" for f in sorted(flags)
                  if not re.search(rf"{re.escape(f)}(?![\w-])", out.stdout)]
    assert not wrong, "\n".join(wrong)


def _call_args(text: str, start: int) -> str:
    """The argument text of the call whose ``(`` is at ``text[start]`` (brackets balanced)."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "([{"
        depth -= text[i] in ")]}"
        if depth == 0:
            return text[start + 1:i]
    raise ValueError(f"unbalanced call at {text[start - 30:start + 30]!r}")


def _top_level_args(text: str) -> list[str]:
    """Argument names of ``f(a[B, D], b{k: v}, c=None)``: split at commas outside brackets, name = leading word."""
    args, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            args.append(cur)
            cur = ""
        else:
            cur += ch
    args.append(cur)
    return [m.group(0) for a in args if (m := re.match(r"\w+", a.strip()))]


def test_contracts_signatures_match_the_code():
    """docs/CONTRACTS.md's ``Record(fields)`` / ``MMRLossOutput(fields)`` list exactly the dataclass fields, its
    ``metaembed.module.func(args)`` list the leading parameters in order, and the loss section names every
    keyword-only parameter of ``mmr_loss`` and no keyword it lacks (it once listed ``MMRLossOutput(loss,
    per_group)`` without ``logits``, and neither ``candidate_keys`` nor ``query_chunk_size``)."""
    import inspect

    from metaembed.data import records
    from metaembed.losses import MMRLossOutput, mmr_loss

    text = _read("docs/CONTRACTS.md")
    wrong = []
    classes = {name: obj for name, obj in vars(records).items()
               if dataclasses.is_dataclass(obj) and obj.__module__ == records.__name__}
    classes["MMRLossOutput"] = MMRLossOutput
    checked = set()
    for m in re.finditer(r"(?<![\w.])([A-Z]\w+)\(", text):
        if m.group(1) in classes:
            args = _call_args(text, m.end() - 1)
            checked.add(m.group(1))
            fields = [f.name for f in dataclasses.fields(classes[m.group(1)])]
            if _top_level_args(args) != fields:
                wrong.append(f"{m.group(1)}({args}): fields are {fields}")
    assert {"Item", "Benchmark", "MMRLossOutput"} <= checked, checked
    section = text.split("## Records", 1)[1].split("\n## ", 1)[0]
    wrong += [f"Records: {name} is not a dataclass of metaembed.data.records"
              for name in re.findall(r"`([A-Z]\w+)\(", section) if name not in classes]
    for m in re.finditer(r"`(metaembed(?:\.\w+)+)\(", text):
        dotted, args = m.group(1), _call_args(text, m.end() - 1)
        params = list(inspect.signature(_resolve(dotted)).parameters)
        named = _top_level_args(args)
        if params[:len(named)] != named:
            wrong.append(f"{dotted}({', '.join(named)}): parameters are {params}")
    loss = text.split("## Loss", 1)[1].split("\n## ", 1)[0]
    keywords = re.findall(r"`(\w+)(?:\[[^`]*\])?`", loss)
    loss_params = set(inspect.signature(mmr_loss).parameters)
    wrong += [f"mmr_loss has no keyword {k!r}" for k in re.findall(r"[Kk]eyword `(\w+)", loss) if k not in loss_params]
    kw_only = {n for n, p in inspect.signature(mmr_loss).parameters.items() if p.kind is p.KEYWORD_ONLY}
    wrong += [f"docs/CONTRACTS.md does not name mmr_loss's keyword {k!r}"
              for k in sorted(kw_only - set(keywords) - {"check_finite"})]  # check_finite: a debugging switch
    assert not wrong, "\n".join(wrong)


def test_readme_documents_training_and_evaluating_on_the_real_benchmarks():
    """Issue 5: ``metaembed train --config experiments/configs/metaembed-3b.yaml --backbone ... --data ...`` and
    ``metaembed eval`` on MMEB-eval and ViDoRe are documented commands (the README once showed only a synthetic
    ``eval``, and none naming ``data.eval_path`` / ``data.vidore_path``)."""
    commands = _commands(_read("README.md"))
    train = [c for c in commands if c[0] == "train" and "experiments/configs/metaembed-3b.yaml" in c]
    assert any("--backbone" in c and "--data" in c for c in train), train
    evals = [" ".join(c) for c in commands if c[0] == "eval"]
    assert any("data.source=mmeb" in c and "data.eval_path=" in c and "data.vidore_path=" in c for c in evals), evals


def test_quickstart_output_in_the_readme_is_one_printed_table_per_model():
    """The README's quickstart output ("as printed") shows each table with its header, and its IND / OOD / Overall
    columns are the task means its meta-task columns imply (12 synthetic P@1 tasks: Overall is the mean over
    tasks), so numbers from two runs cannot be mixed in one table (the NoMMR table once lacked its header)."""
    from metaembed.data.synthetic import list_tasks

    tasks = list_tasks()
    tasks = tasks[tasks["meta_task"].isin(["classification", "vqa", "retrieval", "grounding"])]
    per_meta = tasks["meta_task"].value_counts()
    per_split = tasks["split"].value_counts()
    block = _read("README.md").split("## Quickstart result", 1)[1].split("```", 2)[1]
    tables = re.split(r"^(?=\w+: P@1 \(%\))", block, flags=re.M)[1:]
    assert [t.split(":")[0] for t in tables] == ["MMR", "NoMMR"]
    columns = ["Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall", "NDCG@5"]
    for table in tables:
        lines = table.strip().splitlines()
        assert lines[1].split() == columns and lines[2].strip() == "budget (r_q,r_c)", lines[:3]
        for row in lines[3:]:
            cls, vqa, ret, grd, ind, ood, overall, _ = map(float, row.split()[1:])
            by_meta = (per_meta["classification"] * cls + per_meta["vqa"] * vqa + per_meta["retrieval"] * ret
                       + per_meta["grounding"] * grd) / len(tasks)
            by_split = (per_split["ind"] * ind + per_split["ood"] * ood) / len(tasks)
            assert abs(by_meta - overall) < 0.15 and abs(by_split - overall) < 0.15, (row, by_meta, by_split)


def test_the_readme_library_example_runs_as_written(tmp_path, monkeypatch):
    """README's "Using the library" block, copied as is, runs (a newcomer's first try; a review helper found it
    needed a checkpoint folder and an image that the repository does not have), and its shape comments hold."""
    text = _read("README.md")
    block = re.search(r"```python\n(.*?)```", text[text.index("## Using the library"):], re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it writes cat.png and my_index/ into the working directory
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert tuple(scope["Q"].shape[:2]) == (1, 16) and tuple(scope["C"].shape[:2]) == (2, 64)
    assert tuple(scope["scores"].shape) == (1, 2) and (tmp_path / "my_index").is_dir()
