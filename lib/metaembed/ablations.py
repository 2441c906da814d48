"""Logic the reproduction notebooks share: parameters -> configs, Table 5 methods, scaling runs.

The notebooks in ``notebooks/`` take *parameters* (``experiments/*.yaml``, papermill) and
call this module for everything that is more than a plot:

* :func:`config_from_params` maps notebook parameters (``tiny_size``, ``max_steps``, ``tau``,
  ... see :data:`PARAM_KEYS`) onto a :class:`~metaembed.config.RunConfig` built from the
  packaged ``quickstart`` config (tuned for tiny random backbones: AdamW 2e-3, short warmup,
  cosine decay); unknown parameter names raise :class:`~metaembed.config.ConfigError`.
* :func:`method_config` turns one base config into one Table 5 method (:data:`METHODS`):
  ``MetaEmbed`` (Meta Tokens + MMR), ``NoMMR`` (only the last group trained), ``single-last``,
  ``single-mean`` and ``split`` (the fixed-length ``split-(R_q,R_c)`` multi-vector baseline).
  Everything else (seed, data, steps, backbone) stays identical.
* :func:`run_methods` trains and evaluates each method (and seed) with
  :func:`metaembed.pipeline.train_and_evaluate` and returns one tidy frame with ``method`` and
  ``seed`` columns; :func:`scaling_runs` does that for several backbones (families and sizes)
  and adds ``model``, ``backbone``, ``size`` and ``params`` columns.
* :func:`method_summary`, :func:`budget_curves`, :func:`best_single_vector` and :func:`table5`
  aggregate those rows (MMEB-style: unweighted task means per meta-task, IND/OOD, Overall, and
  NDCG@k of the document tasks) into the paper's views: Table 5 with deltas to the best
  single-vector method, Fig. 4b budget curves, Fig. 3/4a per-model numbers.

Training runs write their checkpoints and per-run tables into a *work* folder
(:func:`work_dir_for`: ``<runs>/.work/<name>``, next to, not inside, the notebook's
``output_dir``), so ``metaembed reproduce``'s ``summary.md`` collects only the notebook's
own tables.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import numbers
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .checksums import sha256_file
from .config import ConfigError, RunConfig, apply_overrides, config_from_dict, dotted_overrides, load_config
from .data.records import Benchmark

__all__ = [
    "BASE_CONFIG",
    "METHODS",
    "METHOD_KEYS",
    "PARAM_KEYS",
    "SINGLE_VECTOR_METHODS",
    "best_single_vector",
    "budget_curves",
    "config_from_params",
    "count_parameters",
    "curves_vs_best_single",
    "legend_below",
    "load_benchmark",
    "load_timings",
    "method_config",
    "method_list",
    "method_summary",
    "metric_group",
    "modality_probes",
    "model_specs",
    "name_list",
    "notebook_setup",
    "override_conflicts",
    "p1_standard_error",
    "probe_items",
    "quiet",
    "random_ranking_floor",
    "rank_candidates",
    "recipe",
    "remove_stale_outputs",
    "resolve_group",
    "retrieval_figure",
    "run_methods",
    "scaling_runs",
    "scaling_table",
    "seed_list",
    "table5",
    "tau_runs",
    "tiny_efficiency",
    "tiny_models",
    "train_model",
    "work_dir_for",
]

#: Packaged config every notebook run starts from (tiny random backbones on a CPU).
BASE_CONFIG = "quickstart"

#: Notebook parameter -> dotted RunConfig key(s) (see experiments/README.md, "Parameter vocabulary").
PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "backbone": ("model.backbone",),
    "backbone_path": ("model.backbone_path",),
    "tiny_size": ("model.tiny_size",),
    "R_q": ("model.R_q",),
    "R_c": ("model.R_c",),
    "groups": ("loss.groups",),
    "tau": ("loss.tau",),
    "max_steps": ("train.max_steps",),
    "batch_size": ("train.batch_size",),
    "lr": ("train.lr",),
    "precision": ("train.precision",),
    "gradient_checkpointing": ("model.gradient_checkpointing",),
    "data_source": ("data.source",),
    "data_path": ("data.path",),
    "eval_path": ("data.eval_path",),
    "vidore_path": ("data.vidore_path",),
    "n_train": ("data.n_train",),
    "n_eval_queries": ("data.n_eval_queries",),
    "n_candidates": ("data.n_candidates",),
    "seed": ("train.seed", "model.seed", "data.seed"),
}
#: Parameters whose ``None`` means "all data": they keep the base value (only used by the synthetic source;
#: file sources are capped with ``overrides``: ``data.max_train``, ``data.max_eval_queries``).
_NONE_KEEPS_BASE = {"n_train", "n_eval_queries", "n_candidates"}

#: Table 5 methods: model pooling and whether the MMR loss trains every group.
METHODS: dict[str, dict[str, Any]] = {
    "MetaEmbed": {"pooling": "meta", "mmr": True},
    "NoMMR": {"pooling": "meta", "mmr": False},
    "single-last": {"pooling": "single-last", "mmr": False},
    "single-mean": {"pooling": "single-mean", "mmr": False},
    "split": {"pooling": "split", "mmr": False},
}
SINGLE_VECTOR_METHODS = ("single-last", "single-mean")

#: RunConfig keys :func:`method_config` sets for each method: an ``overrides`` entry for one would be reset.
METHOD_KEYS = ("model.pooling", "loss.mmr")


def override_conflicts(overrides: Iterable[str], parameters: Iterable[str]) -> list[str]:
    """Why each ``overrides`` key would silently lose or win against a notebook parameter: a key that one of
    ``parameters`` (names of :data:`PARAM_KEYS`) sets (the override won, and the run's tables reported the
    parameter's value), or one of :data:`METHOD_KEYS` (``method_config`` reset it).  Empty when none."""
    owner = {k: name for name in parameters if name in PARAM_KEYS for k in PARAM_KEYS[name]}
    out = []
    for key in overrides:
        if key in owner:
            out.append(f"{key} is set by the notebook parameter {owner[key]!r}: set {owner[key]} instead")
        elif key in METHOD_KEYS:
            out.append(f"{key} is set per method by method_config: choose the methods instead ({list(METHODS)})")
    return out


#: Keys of :func:`metric_group`: notebook metric name -> summary group of :func:`metaembed.evaluation.summarize`.
_METRIC_GROUPS = {"p@1": "Overall", "overall": "Overall", "mmeb": "Overall", "ndcg@5": "NDCG@5"}


# --------------------------------------------------------------------------- notebooks


def quiet() -> None:
    """Silence Lightning's banners, tips and checkpoint-writing progress bars (notebook output stays readable)."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - its import sets the logger levels we override here

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\..*)?")
    warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers|LitLogger|litlogger).*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- configs


def config_from_params(base: RunConfig | str | Path | None = None, *, name: str | None = None,
                       overrides: Mapping[str, Any] | None = None, **params: Any) -> RunConfig:
    """A validated :class:`RunConfig` from notebook parameters (names of :data:`PARAM_KEYS`).

    Args:
        base: a RunConfig (copied), a packaged config name or a YAML path; default the packaged
            ``quickstart`` config (lr 2e-3 with warmup and cosine decay: tiny random backbones).
        name: ``config.name``.
        overrides: dotted RunConfig keys set after ``params`` for what has no notebook parameter,
            e.g. ``{"train.grad_cache_chunk_size": 64, "data.split": "train"}`` (values are
            type-checked like YAML; paths in them are not resolved against the repository).
        **params: notebook parameters.  ``seed`` sets the train, model and data seeds;
            ``n_train`` / ``n_eval_queries`` / ``n_candidates`` = ``None`` keep the base value
            (synthetic sizes; file sources ignore them and are capped by ``data.max_train`` /
            ``data.max_eval_queries`` in ``overrides``).

    Parameters are type-checked and cast like YAML values and ``overrides`` (``lr="1e-4"`` is read
    as 1e-4; ``gradient_checkpointing="no"`` or a group ``[16, 64.5]`` raise), not stored as given.

    Notebook defaults, for the keys ``overrides`` does not set: the warmup is shortened to at most
    ``max_steps // 5`` so that very short (``--quick``) runs keep a valid cosine schedule, a
    held-out check falls within ``max_steps``, and runs write no periodic checkpoints and show no
    progress bar.  A key set in ``overrides`` (``train.progress_bar: true``, ...) is kept as given.
    A :class:`RunConfig` base (one this function built, the notebook's ``overrides`` in it) keeps
    its checkpoint and progress-bar settings, and its warmup and held-out interval unless this call
    changes ``max_steps``: applied again, the defaults reset them (``scaling_runs`` dropped
    ``backbone_scaling``'s checkpoint, progress-bar and warmup overrides that way).

    Raises:
        ConfigError: an unknown parameter name (listing the valid ones), a parameter or override
            of the wrong type, an override of a key a given parameter sets or of one of
            :data:`METHOD_KEYS` (:func:`override_conflicts`), or an invalid config.
    """
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ConfigError(f"unknown notebook parameter(s) {unknown} for a RunConfig; "
                          f"valid: {', '.join(sorted(PARAM_KEYS))}")
    if isinstance(base, RunConfig):
        cfg = copy.deepcopy(base)
    else:
        from .pipeline import resolve_config

        cfg = load_config(resolve_config(base if base is not None else BASE_CONFIG))
    dotted: dict[str, Any] = {}
    dotted_skipped = set()  # None for "all data": the base value stays, so an override may set it
    for key, value in params.items():
        if value is None and key in _NONE_KEEPS_BASE:
            dotted_skipped.add(key)
            continue
        if key == "groups" and isinstance(value, str):  # papermill -p groups '[[1,1],[4,8]]' passes the text
            raise ConfigError(f"groups must be a list of [r_q, r_c] pairs, got the string {value!r} (papermill -p "
                              f"passes lists as text: use -y 'groups: {value.strip()}' or -f params.yaml)")
        if isinstance(value, os.PathLike):  # a Path for backbone_path / data_path: the config holds str
            value = os.fspath(value)
        elif isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):  # numpy ints
            value = int(value)
        for config_key in PARAM_KEYS[key]:
            dotted[config_key] = value
    given = dotted_overrides(overrides)  # {"loss": {"mmr": False}} is loss.mmr
    conflicts = override_conflicts(given, [k for k in params if k not in dotted_skipped])
    if conflicts:
        raise ConfigError("overrides: " + "; ".join(conflicts))
    for label, values in (("notebook parameters", dotted), ("overrides", given)):
        if values:
            try:
                # validated below, after the notebook defaults are fitted to max_steps
                cfg = config_from_dict(apply_overrides(cfg.to_dict(), values), validate=False)
            except ValueError as e:
                raise ConfigError(f"{label}: {e}") from None
    tc = cfg.train
    # a RunConfig base got the defaults (and its overrides) when it was built: only a new max_steps refits them
    fresh = not isinstance(base, RunConfig)
    refit = fresh or tc.max_steps != base.train.max_steps
    if not refit:
        given = {**given, "train.warmup_steps": None, "train.val_check_interval": None}
    if not fresh:
        given = {**given, "train.checkpoint_every_n_steps": None, "train.progress_bar": None}
    if "train.warmup_steps" not in given and isinstance(tc.max_steps, int):
        tc.warmup_steps = min(tc.warmup_steps, max(0, tc.max_steps // 5))
    if "train.checkpoint_every_n_steps" not in given:
        tc.checkpoint_every_n_steps = None
    if ("train.val_check_interval" not in given and tc.val_check_interval is not None
            and isinstance(tc.max_steps, int)):  # held-out loss at least once (at the end of short runs)
        tc.val_check_interval = max(1, min(tc.val_check_interval, tc.max_steps))
    if "train.progress_bar" not in given:
        tc.progress_bar = False
    if name is not None:
        cfg.name = name
    try:
        return cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def recipe(config: RunConfig) -> dict[str, Any]:
    """The training recipe every arm of a notebook shares, for its ``key_numbers.json``: tau (Eq. 5), R_q / R_c,
    the loss groups and weights (Eq. 7), lr, batch size and steps.  Two runs of one notebook into other folders
    (another tau, another Meta Token count) wrote tables that differed only in their numbers."""
    return {"tau": config.loss.tau, "R_q": config.model.R_q, "R_c": config.model.R_c,
            "groups": [list(g) for g in config.loss.groups],
            "weights": None if config.loss.weights is None else list(config.loss.weights),
            "lr": config.train.lr, "batch_size": config.train.batch_size, "steps": config.train.max_steps}


def method_config(base: RunConfig, method: str, seed: int | None = None) -> RunConfig:
    """``base`` as one Table 5 method (:data:`METHODS`); ``seed`` sets train, model and data seeds.

    * ``MetaEmbed``: ``pooling='meta'``, MMR over every group of ``loss.groups``.
    * ``NoMMR``: the same model, only the last group ``(R_q, R_c)`` trained (``loss.mmr=False``).
    * ``single-last`` / ``single-mean``: one vector (last token / mean of the last layer),
      trained and evaluated at ``(1, 1)`` (``eval.budgets`` reset to the loss group).
    * ``split``: ``split-(R_q,R_c)``, last-layer states cut into ``R_q`` / ``R_c`` segment means,
      trained and evaluated at the full budget only (Table 5's ``split-(16, 64)``).

    Raises:
        ValueError: an unknown method.
        ConfigError: ``NoMMR`` or ``split`` with ``loss.groups`` not ending at ``(R_q, R_c)``: they
            train only the last group, so they would be reported at a budget they were not trained at.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    spec = METHODS[method]
    cfg = copy.deepcopy(base)
    cfg.model.pooling = spec["pooling"]
    cfg.loss.mmr = spec["mmr"]
    if method in ("NoMMR", "split"):
        full = (int(cfg.model.R_q), int(cfg.model.R_c))
        last = tuple(int(x) for x in cfg.loss.groups[-1]) if cfg.loss.groups else None
        if last != full:
            raise ConfigError(f"{method} is the (R_q, R_c) = {full} baseline of Table 5 but trains only the last "
                              f"loss group {last}; end loss.groups at {full} or set R_q, R_c to {last}")
    if spec["pooling"] in ("single-last", "single-mean"):
        cfg.loss.groups = [(1, 1)]
        cfg.loss.weights = None
        cfg.eval.budgets = None  # the loss group (1, 1): a base config's multi-vector budgets cannot be scored
    if spec["pooling"] == "split":
        # Only the full budget is meaningful: with a causal backbone a prefix of segments covers only the
        # first tokens (the shared instruction), so candidates tie and P@1's tie rule would count hits.
        cfg.eval.budgets = [(cfg.model.R_q, cfg.model.R_c)]
    if seed is not None:
        cfg.train.seed = cfg.model.seed = cfg.data.seed = int(seed)
    cfg.name = method if seed is None else f"{method}-seed{seed}"
    return cfg.validate()


def work_dir_for(output_dir: str | Path, clean: bool = False) -> Path:
    """Where a notebook's training runs go: ``<parent of output_dir>/.work/<name of output_dir>``.

    Outside ``output_dir`` so that the reproduction summary only collects the notebook's tables.
    ``clean=True`` empties it first (as the runner empties ``output_dir``), so no model, log or
    timing of an earlier run is mistaken for this one's.
    """
    out = Path(output_dir).resolve()
    work = out.parent / ".work" / out.name
    if clean and work.exists():
        shutil.rmtree(work)
    return work


def notebook_setup(output_dir: str | Path, figures_dir: str | Path, threads: int | None = 1,
                   resume: bool = False) -> tuple[Path, Path, Path]:
    """The first cell of every ablation notebook: quiet logs, the figure theme, wide pandas tables, folders.

    ``threads``: torch CPU threads (1 suits the tiny backbones and is unaffected by a busy machine; ``None``
    keeps torch's default, for latency measured with every core; ignored on a CUDA machine).  Creates
    ``output_dir``; empties the training-run folder (:func:`work_dir_for`) unless ``resume`` (the
    notebook's runs then continue from their checkpoints, see :func:`run_methods`).  Returns
    ``(out, figs, work)``: the tables folder, the figures folder and the training-run folder.
    """
    import warnings

    import torch

    from . import plotting

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a Jupyter without ipywidgets
    quiet()
    plotting.set_style()
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(int(threads))
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = Path(figures_dir)
    work = work_dir_for(out, clean=not resume)  # training runs (models, logs): emptied, kept out of output_dir
    _OUTPUT_SNAPSHOTS[(out.resolve(), figs.resolve())] = _output_snapshot(out, figs)
    print(f"tables -> {out.resolve()}\nfigures -> {figs.resolve()}\nruns -> {work}; "
          f"torch threads: {torch.get_num_threads()}")
    return out, figs, work


_TABLE_SUFFIXES = (".csv", ".json")
_FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
#: In ``output_dir``: ``{notebook prefix: [table names]}``, the tables each notebook's last complete run there wrote
#: (no ``.json`` suffix: neither a table of the summary nor one this module removes).
_OUTPUTS_MANIFEST = ".notebook-outputs"
# (output_dir, figures_dir) -> {file: (mtime_ns, size)} as notebook_setup found them
_OUTPUT_SNAPSHOTS: dict[tuple[Path, Path], dict[Path, tuple[int, int]]] = {}


def _output_snapshot(out: Path, figs: Path) -> dict[Path, tuple[int, int]]:
    """The files :func:`remove_stale_outputs` may remove: tables (``*.csv`` / ``*.json``) directly in ``out``
    and figures (``*.png`` / ``*.pdf`` / ``*.svg``) directly in ``figs``, with their (mtime, size)."""
    files = [p for p in out.glob("*") if p.suffix in _TABLE_SUFFIXES]
    files += [p for p in figs.glob("*") if p.suffix in _FIGURE_SUFFIXES] if figs.is_dir() else []
    return {p.resolve(): (st.st_mtime_ns, st.st_size) for p in files if p.is_file() for st in [p.stat()]}


def remove_stale_outputs(out: str | Path, figs: str | Path, prefix: str) -> list[Path]:
    """The last cell of every notebook: remove what an earlier run into the same folders left and this run
    did not write again.

    A run writes some tables and figures only for some parameters (``mmr_vs_nommr.csv`` only with NoMMR,
    Fig. 4a only with several sizes), so a rerun by hand into the same ``output_dir`` left the earlier run's
    next to its own.  Removed: the tables (``*.csv``, ``*.json``) directly in ``out`` that this notebook's last
    complete run there wrote (listed in ``out/.notebook-outputs``, which this call rewrites) and the figures
    (``*.png``, ``*.pdf``, ``*.svg``) directly in ``figs`` whose name starts with ``prefix + "_"`` (the
    notebook's own figures), that existed when :func:`notebook_setup` ran and were not rewritten since.  Other
    tables in ``out`` (a user's own, another notebook's) stay: an ``output_dir`` pointed at a used folder lost
    every ``*.csv`` / ``*.json`` in it; so does a listed table whose content is no longer what the run wrote
    (the manifest holds its sha256: a table edited by hand, or one of the same name a user put there since).
    A run that fails before this cell removes nothing, so the last complete run's outputs stay.  Returns the
    removed paths (also printed).

    Raises:
        RuntimeError: :func:`notebook_setup` was not run for these folders in this kernel (nothing to compare).
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be the notebook's figure prefix (e.g. 'mmr_ablation'), got {prefix!r}")
    out, figs = Path(out), Path(figs)
    key = (out.resolve(), figs.resolve())
    if key not in _OUTPUT_SNAPSHOTS:
        raise RuntimeError(f"notebook_setup({str(out)!r}, {str(figs)!r}) was not run in this kernel: "
                           "run the notebook from its first cell")
    before = _OUTPUT_SNAPSHOTS[key]
    now = _output_snapshot(out, figs)
    manifest_path = out / _OUTPUTS_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable: no table is known to be this notebook's
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    owned = manifest.get(prefix)
    # {name: sha256 as written}; a list of names (written before the digests were recorded): any content
    owned = owned if isinstance(owned, dict) else dict.fromkeys(map(str, owned)) if isinstance(owned, list) else {}
    owned_tables = {key[0] / str(name): digest for name, digest in owned.items()}

    def is_table(p: Path) -> bool:  # the snapshot's paths are resolved, as key[0] is
        return p.parent == key[0] and p.suffix in _TABLE_SUFFIXES

    def own(p: Path) -> bool:
        """A table this notebook's previous run wrote here (and nobody changed since), or one of this notebook's
        figures."""
        if is_table(p):
            return p in owned_tables and owned_tables[p] in (None, sha256_file(p))
        return p.name.startswith(prefix + "_")

    # the snapshot holds only out's tables and figs' figures
    stale = sorted(p for p, stamp in before.items() if now.get(p) == stamp and own(p))
    for p in stale:
        p.unlink()
    written = sorted(p for p, stamp in now.items() if before.get(p) != stamp and is_table(p))
    manifest[prefix] = {p.name: sha256_file(p) for p in written}
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print("removed stale outputs of an earlier run: " + (", ".join(p.name for p in stale) if stale else "none"))
    return stale


def metric_group(metric: str) -> str:
    """Notebook metric name (``p@1``, ``ndcg@5``, ``Overall``, ``IND``, ...) -> summary group name."""
    key = str(metric).strip().lower()
    if key in _METRIC_GROUPS:
        return _METRIC_GROUPS[key]
    if key.startswith("ndcg@"):
        return "NDCG@" + key.split("@", 1)[1]
    return str(metric)


def summary_groups(benchmark: Benchmark, config: RunConfig) -> list[str]:
    """The summary groups an evaluation of ``benchmark`` yields, in order: :func:`metaembed.evaluation.summarize`
    of one placeholder row per task (each meta-task present, IND / OOD when present, Overall, ``NDCG@k``)."""
    import warnings

    from .evaluation import DOC_META_TASK, _row, summarize

    k, budget = config.eval.ndcg_k, (1, 1)
    rows = [_row(t.name, t.meta_task, t.split, budget, "P@1", 0.0, 1) for t in benchmark.eval_tasks]
    rows += [_row(t.name, DOC_META_TASK, t.split, budget, f"NDCG@{k}", 0.0, 1) for t in benchmark.doc_tasks]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a partial MMEB set: the warning is the real evaluation's to give
        return list(summarize(pd.DataFrame(rows)).drop_duplicates("group")["group"]) if rows else []


def check_metric(metric: str, benchmark: Benchmark, config: RunConfig, name: str = "fig4b_metric") -> str:
    """:func:`metric_group` of ``metric``, checked against :func:`summary_groups` before any training: a typo
    (``ndcg5``) or NDCG without document tasks (MMEB files and no ``vidore_path``) failed in the last cell."""
    group = metric_group(metric)
    known = summary_groups(benchmark, config)
    if group not in known:
        raise ValueError(f"{name}={metric!r} (summary group {group!r}) is not what this benchmark yields: "
                         f"{known}" + (" (NDCG needs document tasks: set vidore_path)" if group.startswith("NDCG")
                                       else ""))
    return group


# --------------------------------------------------------------------------- running


def load_benchmark(config: RunConfig) -> Benchmark:
    """:func:`metaembed.pipeline.load_benchmark` of ``config.data``, with ViDoRe v1 document tasks.

    With ``data.vidore_path`` set, the document tasks (NDCG@5, Fig. 4b) are the ViDoRe v1 datasets
    found in that folder (:func:`metaembed.data.vidore.load_vidore_v1_suite` of those present, as
    the pipeline loads a v1-only folder); ViDoRe v2 folders beside them are neither loaded nor scored.
    Their instructions and caps are the pipeline's (:func:`metaembed.pipeline.prepare_vidore_tasks`).

    Raises:
        ConfigError: ``data.vidore_path`` is not a folder or holds no ViDoRe v1 dataset folder.
    """
    import dataclasses

    from .pipeline import load_benchmark as _load
    from .pipeline import prepare_vidore_tasks

    path = config.data.vidore_path
    if not path:
        return _load(config.data)
    from .data.vidore import VIDORE_V1_TASKS, load_vidore_v1_suite

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"data.vidore_path: directory not found: {path}")
    folders = {key: name.split("/", 1)[1] for key, name in VIDORE_V1_TASKS.items()}  # docvqa -> docvqa_test_subsampled
    present = [key for key, folder in folders.items() if (root / folder).is_dir()]
    if not present:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ConfigError(f"data.vidore_path={path}: no ViDoRe v1 dataset folder (the document tasks of the ablations, "
                          f"Fig. 4b, are ViDoRe v1); expected one or more of {sorted(folders.values())}; found: "
                          f"{found or 'no folders'}")
    # the rest without vidore_path (v2 folders there would be loaded, then dropped), nor what applies to its tasks:
    # the doc-task caps (an error without a vidore_path) and, unless ViDoRe-train takes them, the instructions
    rest = dataclasses.replace(config.data, vidore_path=None, max_doc_queries=None, max_doc_pages=None)
    if not rest.vidore_train:
        rest = dataclasses.replace(rest, vidore_query_instruction="", vidore_page_instruction="")
    bm = _load(rest)
    docs = prepare_vidore_tasks(load_vidore_v1_suite(root, present), config.data)
    return Benchmark(train=bm.train, eval_tasks=bm.eval_tasks, doc_tasks=docs)


def _benchmark_for(cfg: RunConfig, cache: dict[Any, Benchmark]) -> Benchmark:
    key = json.dumps(cfg.to_dict()["data"], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = load_benchmark(cfg)
    return cache[key]


def random_ranking_floor(base: RunConfig, seeds: int | Iterable[int] | None = (0,),
                         benchmark: Benchmark | None = None) -> float | None:
    """Expected NDCG@k (%) of a random ranking of the document tasks the runs of ``base`` are scored on.

    The floor of an NDCG@k budget curve, as chance P@1 is of a P@1 curve
    (:func:`metaembed.evaluation.random_ranking_level`, ``k = eval.ndcg_k``).  Over several seeds the mean
    of each seed's benchmark (a seed also selects the synthetic data), as :func:`run_methods` builds them;
    ``benchmark`` the data every run used, when one was passed to it.  None without document tasks.
    """
    from .evaluation import random_ranking_level

    cache: dict[Any, Benchmark] = {}
    bms = [benchmark] if benchmark is not None else [_benchmark_for(method_config(base, "MetaEmbed", s), cache)
                                                     for s in _seeds(seeds)]
    if not all(bm.doc_tasks for bm in bms):
        return None
    levels = [random_ranking_level(bm.doc_tasks, base.eval.ndcg_k) for bm in bms]
    return sum(levels) / len(levels)


def _seeds(seeds: int | Iterable[int] | None) -> list[int | None]:
    """``seeds`` as a list; a duplicate would train twice into one run folder and mix its rows."""
    if seeds is None:
        return [None]
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        return [int(seeds)]
    if isinstance(seeds, (str, bytes)):  # "12" would iterate as seeds 1 and 2
        raise ValueError(f"seeds must be an int or a list of ints, got {seeds!r}")
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds is empty")
    dup = sorted({s for s in out if out.count(s) > 1})
    if dup:
        raise ValueError(f"seeds {out} repeat {dup}: each seed is one run folder (<method>/seed<k>)")
    return out


def _methods(methods: Sequence[str]) -> list[str]:
    """``methods`` as a list of :data:`METHODS` names; unknown, empty or repeated is a ValueError."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}" if bad else "methods is empty")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ValueError(f"methods {methods} repeat {dup}: each method is one run folder (<method>/seed<k>)")
    return methods


def seed_list(seeds: int | Iterable[int]) -> list[int]:
    """A notebook's ``seeds`` parameter as a list: an int (``papermill -p seeds 1``) is one seed.

    Raises:
        ValueError: ``None``, an empty or repeated list, or a string (``papermill -p seeds '[0, 1]'`` passes the
            text ``'[0, 1]'``: pass lists with ``-y`` or a parameters file ``-f``).
    """
    if seeds is None:
        raise ValueError("seeds is None; pass an int or a list of ints")
    if isinstance(seeds, (str, bytes)):
        raise ValueError(f"seeds must be an int or a list of ints, got the string {seeds!r} (papermill -p passes "
                         f"lists as text: use -y 'seeds: [0, 1]' or -f params.yaml)")
    return [int(s) for s in _seeds(seeds)]  # type: ignore[arg-type]


def name_list(value: str | Sequence[str], what: str = "value") -> list[str]:
    """A notebook's list-of-names parameter (``methods``, ``tiny_sizes``, ``families``, ...) as a list: a string
    (``papermill -p tiny_sizes xs``) is one name, not its characters (``['x', 's']`` measured the ``s`` model);
    a string that reads as a list (``'[xs, s]'`` from ``-p``) is refused.

    Raises:
        ValueError: a string that reads as a list.
    """
    if isinstance(value, str):
        if value.strip().startswith("["):
            raise ValueError(f"{what} must be a name or a list of them, got the string {value!r} (papermill -p "
                             f"passes lists as text: use -y '{what}: [a, b]' or -f params.yaml)")
        return [value]
    return list(value)


def method_list(methods: str | Sequence[str]) -> list[str]:
    """A notebook's ``methods`` parameter as a list of :data:`METHODS` names (:func:`name_list`).

    Raises:
        ValueError: an unknown, empty or repeated method list, or a string that reads as a list.
    """
    return _methods(name_list(methods, "methods"))


def tau_runs(methods: Sequence[str], taus: float | Sequence[float], ref_tau_index: int = 0,
             ) -> tuple[list[float], float, list[tuple[str, float]]]:
    """The modality-gap notebook's runs: MetaEmbed at every ``tau`` of ``taus``, each other method at
    ``taus[ref_tau_index]``.  Returns ``(taus, ref_tau, runs)`` with ``runs`` a list of ``(method, tau)``.

    Raises:
        ValueError: before anything is built or trained, for a string (``papermill -p taus '[0.01, 0.1]'``
            passes text, which was split into characters), an empty list, a ``ref_tau_index`` outside
            ``taus``, or a repeated run (a repeated tau).
    """
    if isinstance(taus, (str, bytes)):
        raise ValueError(f"taus must be a number or a list of numbers, got the string {taus!r} (papermill -p "
                         "passes lists as text: use -y 'taus: [0.01, 0.1]' or -f params.yaml)")
    taus = [taus] if isinstance(taus, (int, float)) else list(taus)  # papermill -p taus 0.1: one temperature
    if not taus:
        raise ValueError("taus is empty; give at least one temperature")
    if isinstance(ref_tau_index, bool) or not isinstance(ref_tau_index, int) or not -len(taus) <= ref_tau_index < len(taus):
        raise ValueError(f"ref_tau_index={ref_tau_index!r} must index taus={taus} (0 to {len(taus) - 1})")
    ref_tau = taus[ref_tau_index]
    runs = [("MetaEmbed", t) for t in taus] + [(m, ref_tau) for m in methods if m != "MetaEmbed"]
    if len(set(runs)) < len(runs):
        raise ValueError(f"taus / methods repeat a run: {runs}")
    return taus, ref_tau, runs


def _method_configs(base: RunConfig, methods: Sequence[str], seeds: Sequence[int | None]) -> dict[tuple, RunConfig]:
    """``{(seed, method): config}``, each checked as :func:`metaembed.pipeline.train_and_evaluate` checks it
    before training (eval budgets within ``(R_q, R_c)``, trainer settings Lightning knows)."""
    from .config import check_trainer_settings
    from .pipeline import check_eval_budgets

    configs = {(seed, m): method_config(base, m, seed) for seed in seeds for m in methods}
    for cfg in configs.values():
        check_eval_budgets(cfg)
        check_trainer_settings(cfg.train)
    return configs


def run_methods(
    methods: Sequence[str],
    base_config: RunConfig,
    output_dir: str | Path,
    benchmark: Benchmark | None = None,
    seeds: int | Iterable[int] | None = (0,),
    *,
    keep_checkpoints: bool = False,
    resume: bool = False,
    verbose: bool = True,
) -> pd.DataFrame:
    """Train and evaluate every method (x seed) with otherwise identical settings.

    Args:
        methods: names of :data:`METHODS`.
        base_config: the shared config (e.g. from :func:`config_from_params`).
        output_dir: each run trains into ``<output_dir>/<method>/seed<k>`` (model, logs, tables).
        benchmark: the data every run uses; ``None`` builds it from the config per seed (a
            seed also selects the synthetic data).  Passing one uses it for every seed.
        seeds: training seeds (model, train and data seeds); ``None`` keeps the config's.
        keep_checkpoints: keep Lightning's ``checkpoints/`` (optimizer state); the final model
            in ``model/`` is always kept.
        resume: a run whose folder holds ``checkpoints/last.ckpt`` continues from it (see
            ``train.checkpoint_every_n_steps``; a finished run trains no further step and is evaluated
            again), and checkpoints are kept, so that rerunning after a crash loses at most the steps
            since the last one.  The paper-size parameter sets turn it on.

    Returns:
        Tidy rows of :func:`metaembed.evaluation.evaluate` (``task, meta_task, split, r_q, r_c,
        budget, metric, value, n_queries``) with leading ``method`` and ``seed`` columns.

    Raises:
        ValueError: before any training, for an unknown, empty or repeated method or seed list (a
            repeat would train twice into one run folder and mix its rows).
        ConfigError: before any training, when some method's config is invalid (:func:`method_config`,
            e.g. ``NoMMR`` with loss groups not ending at ``(R_q, R_c)``; eval budgets beyond the
            model's; a trainer setting Lightning does not know), not after the methods before it trained.
    """
    from .pipeline import train_and_evaluate

    methods = _methods(methods)
    seed_list = _seeds(seeds)  # checked before any training
    configs = _method_configs(base_config, methods, seed_list)
    out = Path(output_dir)
    cache: dict[Any, Benchmark] = {}
    frames = []
    for seed in seed_list:
        for method in methods:
            cfg = configs[(seed, method)]
            run_dir = out / method / f"seed{cfg.train.seed}"
            bm = benchmark if benchmark is not None else _benchmark_for(cfg, cache)
            t0 = time.perf_counter()
            last = run_dir / "checkpoints" / "last.ckpt"
            ckpt_path = str(last) if resume and last.is_file() else None
            if ckpt_path and verbose:
                print(f"{method:<12} seed {cfg.train.seed}: resuming from {last}", flush=True)
            df = train_and_evaluate(cfg, run_dir, bm, ckpt_path=ckpt_path)
            if not (keep_checkpoints or resume):
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            if verbose:
                overall = df[df["metric"] == "P@1"].groupby("budget", sort=False)["value"].mean()
                best = f"{overall.max():.1f}" if len(overall) else "-"
                print(f"{method:<12} seed {cfg.train.seed}: {time.perf_counter() - t0:5.0f} s, "
                      f"best budget P@1 {best}", flush=True)
            frames.append(df.assign(method=method, seed=cfg.train.seed))
    res = pd.concat(frames, ignore_index=True)
    lead = ["method", "seed"]
    return res[lead + [c for c in res.columns if c not in lead]]


def train_model(config: RunConfig, output_dir: str | Path, benchmark: Benchmark | None = None) -> Any:
    """Train ``config`` into ``output_dir`` without evaluating; returns the trained model (eval mode)."""
    from .training import train

    cfg = copy.deepcopy(config)
    cfg.train.output_dir = str(output_dir)
    model, _ = train(cfg, benchmark)
    shutil.rmtree(Path(output_dir) / "checkpoints", ignore_errors=True)
    return model.eval()


def load_timings(work_dir: str | Path) -> pd.DataFrame:
    """``timing.json`` of every run under ``work_dir`` -> rows ``run, train_s, eval_s, steps``."""
    rows = []
    for path in sorted(Path(work_dir).rglob("timing.json")):
        try:
            timing = json.loads(path.read_text())
            if not isinstance(timing, dict):
                raise ValueError(f"a JSON {type(timing).__name__}, not an object")
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not a timing record ({e}); delete it or rerun that run") from None
        rows.append({**timing, "run": str(path.parent.relative_to(work_dir))})  # the folder names the run
    return pd.DataFrame(rows, columns=["run", "train_s", "eval_s", "steps"])


# --------------------------------------------------------------------------- aggregation


def method_summary(df: pd.DataFrame, by: Sequence[str] = ("method", "seed")) -> pd.DataFrame:
    """:func:`metaembed.evaluation.summarize` per ``by`` group -> rows ``*by, budget, r_q, r_c, group, value, n_tasks``."""
    from .evaluation import summarize

    by = [c for c in by if c in df.columns]
    if not by:
        return summarize(df)
    frames = []
    for key, part in df.groupby(by, sort=False, dropna=False):  # a missing key (NaN seed) is a group, not dropped
        key = key if isinstance(key, tuple) else (key,)
        s = summarize(part.drop(columns=by))
        frames.append(s.assign(**dict(zip(by, key))))
    out = pd.concat(frames, ignore_index=True)
    return out[by + [c for c in out.columns if c not in by]]


def budget_curves(df: pd.DataFrame, group: str = "Overall", by: Sequence[str] = ("method", "seed")) -> pd.DataFrame:
    """One summary group (``Overall`` P@1, ``NDCG@5``, ``IND``, ...) per ``by`` and budget: tidy curve rows.

    ``df`` is the output of :func:`run_methods` / :func:`scaling_runs` (or already of
    :func:`method_summary`).  Returns ``*by, budget, r_q, r_c, metric, value`` sorted by cost.
    """
    s = df if "group" in df.columns else method_summary(df, by)
    part = s[s["group"] == group]
    if part.empty:
        raise ValueError(f"no rows for group {group!r}; available: {sorted(set(s['group']))}")
    keep = [c for c in by if c in part.columns]
    out = part[keep + ["budget", "r_q", "r_c", "value"]].assign(metric=group if group.startswith("NDCG") else "P@1")
    out["_cost"] = out["r_q"] * out["r_c"]
    out = out.sort_values([*keep, "_cost", "r_q"], kind="stable").drop(columns="_cost")
    return out.reset_index(drop=True)


def best_single_vector(df: pd.DataFrame, group: str = "Overall",
                       candidates: Sequence[str] = SINGLE_VECTOR_METHODS) -> tuple[str, float] | None:
    """``(method, score)`` of the best single-vector method on ``group`` (mean over seeds); None if absent."""
    s = df if "group" in df.columns else method_summary(df)
    part = s[(s["group"] == group) & s["method"].isin(candidates)]
    if part.empty:
        return None
    means = part.groupby("method", sort=False)["value"].mean()
    best = str(means.idxmax())
    return best, float(means[best])


def resolve_group(df: pd.DataFrame, metric: str) -> str:
    """The summary group of a notebook metric name (:func:`metric_group`), matched case-insensitively.

    ``df``: :func:`method_summary` output (or raw result rows).  ``"ndcg@5"`` -> ``"NDCG@5"``,
    ``"p@1"`` -> ``"Overall"``, ``"vqa"`` -> ``"VQA"``.

    Raises:
        ValueError: no such group in ``df`` (a misspelled metric, or a metric this run did not
            evaluate, e.g. NDCG@5 without document tasks); the message lists the available groups.
    """
    s = df if "group" in df.columns else method_summary(df)
    available = [str(g) for g in pd.unique(s["group"])]
    want = metric_group(metric)
    by_lower = {g.lower(): g for g in available}
    if want.lower() in by_lower:
        return by_lower[want.lower()]
    raise ValueError(f"metric {metric!r} (summary group {want!r}) is not in the results; available groups: "
                     f"{', '.join(available)} (or 'p@1' for Overall, 'ndcg@k' for NDCG@k)")


def curves_vs_best_single(
    df: pd.DataFrame,
    groups: str | Sequence[str],
    methods: Sequence[str] = ("MetaEmbed", "NoMMR"),
    *,
    rename: Mapping[str, str] | None = None,
    candidates: Sequence[str] = SINGLE_VECTOR_METHODS,
    by: Sequence[str] = ("method", "seed"),
) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """Budget curves of ``methods`` per group, with each group's *own* best single-vector baseline.

    For every group (a notebook metric name or summary group, resolved by :func:`resolve_group`,
    so a misspelled one raises), the best single-vector method is chosen on that group
    (:func:`best_single_vector`: mean over seeds), so a panel never labels a method "best
    single-vector" where another single-vector method scored higher.

    Returns:
        ``(curves, baselines)``: ``curves`` holds the :func:`budget_curves` rows of ``methods``
        (renamed by ``rename``, e.g. ``{"MetaEmbed": "MetaEmbed (MMR)"}``) and of each group's best
        single-vector method, with a ``group`` column; ``baselines`` maps each resolved group, in
        order, to that method's name (``None`` when the run has no single-vector method).  Pass
        ``baselines[g]`` as ``baseline=`` of :func:`metaembed.plotting.plot_budget_curves`, or the
        whole mapping as ``panel_baselines=`` of :func:`metaembed.plotting.plot_budget_facets`.
    """
    s = df if "group" in df.columns else method_summary(df, by)
    names = list(dict.fromkeys(resolve_group(s, g) for g in ([groups] if isinstance(groups, str) else groups)))
    frames, baselines = [], {}
    for g in names:
        best = best_single_vector(s, g, candidates)
        baselines[g] = best[0] if best else None
        curves = budget_curves(s, g, by)
        keep = list(methods) + ([best[0]] if best else [])
        frames.append(curves[curves["method"].isin(keep)].assign(group=g))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if rename and not out.empty:
        out["method"] = out["method"].replace(dict(rename))
    return out, baselines


def _table5_rows(methods: Sequence[str], budgets_of: Mapping[str, list[tuple[int, int]]]) -> list[tuple[str, str, tuple]]:
    """(row label, method, budget) in the paper's Table 5 order."""
    rows: list[tuple[str, str, tuple]] = []
    for m in ("single-last", "single-mean", "split"):
        if m in methods:
            b = max(budgets_of[m], key=lambda x: (x[0] * x[1], x))
            rows.append((m if m != "split" else f"split-({b[0]},{b[1]})", m, b))
    if "MetaEmbed" in methods:
        for b in budgets_of["MetaEmbed"]:
            rows.append((f"MetaEmbed ({b[0]},{b[1]})", "MetaEmbed", b))
    if "NoMMR" in methods:
        b = max(budgets_of["NoMMR"], key=lambda x: (x[0] * x[1], x))
        rows.append((f"NoMMR-({b[0]},{b[1]})", "NoMMR", b))
    return rows


def p1_standard_error(df: pd.DataFrame, group: str = "Overall", budget: tuple[int, int] | None = None) -> float:
    """Binomial standard error (percentage points) of a P@1 group score from per-task result rows.

    The group score is the unweighted mean of its tasks' P@1, so its SE is
    ``sqrt(sum_t p_t (1 - p_t) / n_t) / T`` (``n_t`` = the task's queries), averaged over seeds:
    the evaluation sampling error of **one run**, not of a mean over seeds (that is up to
    ``sqrt(n_seeds)`` smaller when each seed draws its own evaluation set, as the synthetic source
    does, and includes training variance, which :func:`table5`'s ``g sd`` shows).
    ``group``: ``Overall``, ``IND``, ``OOD`` or a meta-task name; NaN for non-P@1 groups.
    ``df`` must hold one score run: one method and model, and one budget (or pass ``budget``).

    Raises:
        ValueError: a task appears more than once per seed after the filters (several budgets,
            methods or models in ``df``), which would count each row as a task of its own.
    """
    part = df[df["metric"] == "P@1"]
    if budget is not None:
        part = part[(part["r_q"] == budget[0]) & (part["r_c"] == budget[1])]
    if group in ("IND", "OOD"):
        part = part[part["split"] == group.lower()]
    elif group != "Overall":
        from .evaluation import _META_TASK_NAMES

        names = {display: key for key, display in _META_TASK_NAMES.items()}  # "VQA" -> "vqa"
        if group not in names and group not in set(part["meta_task"]):
            return float("nan")
        part = part[part["meta_task"] == names.get(group, group)]
    if part.empty:
        return float("nan")
    keys = ["seed", "task"] if "seed" in part.columns else ["task"]
    dup = part.duplicated(keys)
    if dup.any():
        first = part[dup].iloc[0]
        budgets = sorted({(int(a), int(b)) for a, b in part[["r_q", "r_c"]].itertuples(index=False)})
        hint = (f"pass budget= one of {budgets}" if budget is None and len(budgets) > 1
                else "select one method / model's rows first")
        raise ValueError(f"task {first['task']} appears {int(part.groupby(keys).size().max())} times per seed in "
                         f"the {group} P@1 rows (several budgets, methods or models?); {hint}")
    ses = []
    for _, g in (part.groupby("seed", dropna=False) if "seed" in part.columns else [(None, part)]):
        p = g["value"].astype(float) / 100.0
        ses.append(100.0 * math.sqrt(float((p * (1 - p) / g["n_queries"].astype(float)).sum())) / len(g))
    return float(sum(ses) / len(ses))


def table5(df: pd.DataFrame, groups: Sequence[str] = ("Overall", "NDCG@5"), *, reference: str | None = None,
           decimals: int | None = 1) -> pd.DataFrame:
    """Table 5: every method trained with identical settings, with deltas to the best single-vector method.

    Rows (paper order): ``single-last``, ``single-mean``, ``split-(R_q,R_c)`` (its full budget),
    ``MetaEmbed (r_q,r_c)`` for every evaluated budget, ``NoMMR-(R_q,R_c)`` (full budget).  For
    each summary group ``g`` (``Overall`` = MMEB-style mean P@1 over tasks, ``NDCG@5`` the document
    tasks, or any meta-task / ``IND`` / ``OOD``): columns ``g`` (mean over seeds), ``Δ g`` (minus
    the reference), ``g se`` (binomial standard error of a P@1 group, :func:`p1_standard_error`,
    when ``df`` holds per-task rows) and, with several seeds, ``g sd``.

    Args:
        df: :func:`run_methods` output (or :func:`method_summary` of it).
        groups: summary groups to report; the first one picks the reference.
        reference: the method deltas are taken to; default the best single-vector method on
            ``groups[0]`` (the paper's single-last).  With no single-vector method, deltas are NaN.
        decimals: round the numbers (``None``: no rounding).

    Returns:
        ``row, method, budget, r_q, r_c, n_seeds`` and the score columns; ``attrs['reference']``
        names the reference method.
    """
    s = df if "group" in df.columns else method_summary(df)
    groups = list(groups)
    missing = [g for g in groups if g not in set(s["group"])]
    if missing:
        raise ValueError(f"groups {missing} not in the results; available: {sorted(set(s['group']))}")
    methods = list(pd.unique(s["method"]))
    budgets_of = {m: sorted({(int(a), int(b)) for a, b in s.loc[s["method"] == m, ["r_q", "r_c"]].itertuples(
        index=False)}, key=lambda x: (x[0] * x[1], x)) for m in methods}
    if reference is None:
        best = best_single_vector(s, groups[0])
        reference = best[0] if best else None
    elif reference not in methods:
        raise ValueError(f"reference method {reference!r} not in the results ({methods})")
    seeds_col = "seed" if "seed" in s.columns else None

    def cell(method: str, budget: tuple[int, int], group: str) -> tuple[float, float, int]:
        part = s[(s["method"] == method) & (s["r_q"] == budget[0]) & (s["r_c"] == budget[1]) & (s["group"] == group)]
        vals = part["value"].astype(float)
        sd = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        return (float(vals.mean()) if len(vals) else float("nan")), sd, len(vals)

    ref_budget = max(budgets_of[reference], key=lambda x: (x[0] * x[1], x)) if reference else None
    raw = df if "group" not in df.columns else None
    rows = []
    for label, method, budget in _table5_rows(methods, budgets_of):
        row: dict[str, Any] = {"row": label, "method": method, "budget": f"({budget[0]},{budget[1]})",
                               "r_q": budget[0], "r_c": budget[1]}
        n_seeds = 0
        for g in groups:
            mean, sd, n = cell(method, budget, g)
            n_seeds = max(n_seeds, n)
            ref = cell(reference, ref_budget, g)[0] if reference else float("nan")
            row[g] = mean
            row[f"Δ {g}"] = mean - ref
            row[f"{g} sd"] = sd
            if raw is not None:
                row[f"{g} se"] = p1_standard_error(raw[raw["method"] == method], g, budget)
        row["n_seeds"] = n_seeds if seeds_col else 1
        rows.append(row)
    out = pd.DataFrame(rows)
    if out["n_seeds"].max() <= 1:
        out = out.drop(columns=[f"{g} sd" for g in groups])
    out = out.drop(columns=[c for c in out.columns if c.endswith(" se") and out[c].isna().all()])
    if decimals is not None:
        num = [c for c in out.columns if c not in ("row", "method", "budget", "r_q", "r_c", "n_seeds")]
        out[num] = out[num].round(decimals) + 0.0  # + 0.0: a Δ of -0.04 rounds to -0.0, printed "-0.0"
    out.attrs["reference"] = reference
    return out


# --------------------------------------------------------------------------- scaling


def _published(name: str) -> Any | None:
    """The published backbone named ``name`` (key, alias, Hugging Face id or its last part), or None."""
    from .backbones.published import PUBLISHED, resolve

    try:
        return resolve(name)
    except KeyError:
        key = str(name).strip().lower()
        return next((b for b in PUBLISHED.values() if b.hf_id.split("/")[-1].lower() == key), None)


def model_specs(
    families: Sequence[str] = (),
    family_size: str | None = "s",
    scaling_family: str = "qwen2_5_vl",
    sizes: Sequence[str] = (),
    checkpoints: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The models of a backbone-scaling notebook, deduplicated, each a dict of config overrides.

    * every ``size`` of ``sizes``: a published backbone name with a local folder in
      ``checkpoints`` (``{name: path}`` or ``{name: {path: ..., lr: ..., batch_size: ...}}``
      for per-model overrides, e.g. Table 4's 1e-5 for 32B), else a tiny size of
      ``scaling_family``;
    * every family of ``families``: the tiny model of ``family_size``; with
      ``family_size=None``, the first ``checkpoints`` entry whose published family it is.

    Returns dicts with ``model`` (label), ``backbone``, ``size``, ``backbone_path`` (None: tiny),
    ``overrides`` (extra notebook parameters), ``in_families`` and ``in_sizes`` flags.

    Raises:
        ConfigError: no model at all, a ``checkpoints`` entry without a ``path``, an unknown per-model
            override or one of the data (``n_train``, ``seed``, ...: all
            models share one benchmark), a family without a checkpoint when
            ``family_size`` is null, or two different models with one label (e.g. two checkpoints of
            one published backbone under two names): their runs would share a folder and a name.
    """
    checkpoints = dict(checkpoints or {})
    families, sizes = name_list(families, "families"), name_list(sizes, "sizes")
    specs: dict[tuple, dict[str, Any]] = {}

    def ckpt(name: str) -> tuple[str | None, dict[str, Any]]:
        entry = checkpoints.get(name)
        if entry is None:
            return None, {}
        if isinstance(entry, Mapping):
            extra = {k: v for k, v in entry.items() if k != "path"}
            unknown = sorted(set(extra) - set(PARAM_KEYS))
            if unknown:
                raise ConfigError(f"checkpoints[{name!r}]: unknown override(s) {unknown}")
            data = sorted(k for k in extra if any(key.startswith("data.") for key in PARAM_KEYS[k]))
            if data:  # every model is scored on the notebook's one benchmark: these were dropped silently
                raise ConfigError(f"checkpoints[{name!r}]: {data} set(s) the data, which every model of the "
                                  "notebook shares (one benchmark); set them as notebook parameters")
            if entry.get("path") in (None, ""):
                raise ConfigError(f"checkpoints[{name!r}] needs a 'path' (the local checkpoint folder); got "
                                  f"{dict(entry)}")
            return str(entry["path"]), extra
        return str(entry), {}

    def add(spec: dict[str, Any], flag: str) -> None:
        key = (spec["backbone"], spec["size"], spec["backbone_path"])
        if key not in specs:
            specs[key] = {**spec, "in_families": False, "in_sizes": False}
        specs[key][flag] = True

    for size in sizes:
        path, extra = ckpt(size)
        if path is not None:
            pub = _published(size)
            add({"model": pub.variant if pub else size, "backbone": pub.family if pub else scaling_family,
                 "size": size, "backbone_path": path, "overrides": extra}, "in_sizes")
        else:
            add({"model": f"{scaling_family}-{size}", "backbone": scaling_family, "size": size,
                 "backbone_path": None, "overrides": {}}, "in_sizes")
    for fam in families:
        if family_size is not None:
            add({"model": f"{fam}-{family_size}", "backbone": fam, "size": family_size, "backbone_path": None,
                 "overrides": {}}, "in_families")
            continue
        names = [n for n in [*sizes, *checkpoints] if (p := _published(n)) is not None and p.family == fam
                 and n in checkpoints]
        if not names:
            raise ConfigError(f"family {fam!r}: family_size is null but no checkpoints entry is a published "
                              f"{fam} backbone (checkpoints: {sorted(checkpoints)})")
        path, extra = ckpt(names[0])
        pub = _published(names[0])
        add({"model": pub.variant, "backbone": fam, "size": names[0], "backbone_path": path, "overrides": extra},
            "in_families")
    out = list(specs.values())
    if not out:
        raise ConfigError("no model to train: families and sizes are both empty")
    _check_unique_models(out)
    return out


def _check_unique_models(specs: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`ConfigError` when two specs share a ``model`` label (they would share a run folder)."""
    seen: dict[str, Mapping[str, Any]] = {}
    for spec in specs:
        label = str(spec["model"])
        if label in seen:
            a, b = seen[label], spec
            raise ConfigError(f"two models are both labelled {label!r}: size {a['size']!r} "
                              f"({a.get('backbone_path') or 'tiny'}) and size {b['size']!r} "
                              f"({b.get('backbone_path') or 'tiny'}); list each backbone once")
        seen[label] = spec


def count_parameters(config: RunConfig, published: str | None = None) -> int:
    """Parameters of the model ``config`` builds.

    A checkpoint of a published backbone (``published`` names it, or the checkpoint folder is
    named like its Hugging Face id) is counted on the meta device without loading weights
    (:func:`metaembed.backbones.published.size_report`); anything else is built and counted.
    """
    from .model import MetaEmbedModel

    mc = config.model
    if mc.backbone_path is not None:
        pub = _published(published) if published else None
        pub = pub or _published(Path(str(mc.backbone_path)).name)
        if pub is not None:
            from .backbones.published import size_report

            return int(size_report(pub.name, use_peft=False)["total_params"])
    model = MetaEmbedModel.build(copy.deepcopy(mc))
    return int(sum(p.numel() for p in model.parameters()))


def scaling_runs(
    specs: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    base_config: RunConfig,
    output_dir: str | Path,
    benchmark: Benchmark | None = None,
    seeds: int | Iterable[int] | None = (0,),
    *,
    resume: bool = False,
    verbose: bool = True,
) -> pd.DataFrame:
    """:func:`run_methods` for every model of :func:`model_specs` with otherwise identical settings
    (``resume``: as there).

    Each spec sets ``model.backbone``, ``model.tiny_size`` or ``model.backbone_path`` and its
    ``overrides``; runs go to ``<output_dir>/<model>/<method>/seed<k>``.  Returns the
    :func:`run_methods` rows with ``model``, ``backbone``, ``size``, ``params``, ``in_families``
    and ``in_sizes`` columns in front.

    Raises:
        ConfigError: two specs share a ``model`` label (one run folder, rows mixed under one name).
        ConfigError, ValueError: before any training, when some model cannot be built (a tiny size
            its family lacks, e.g. a published name without a ``checkpoints`` entry) or some method's
            config is invalid, not after the models before it trained.
    """
    if not specs:
        raise ConfigError("scaling_runs needs at least one model (model_specs of non-empty families / sizes)")
    _check_unique_models(specs)
    methods = _methods(methods)
    seed_list = _seeds(seeds)
    prepared = []
    for spec in specs:  # every model's config, size and methods checked before the first training run
        params: dict[str, Any] = {"backbone": spec["backbone"], "backbone_path": spec.get("backbone_path")}
        if spec.get("backbone_path") is None:
            params["tiny_size"] = spec["size"]
        params.update(spec.get("overrides") or {})
        try:  # e.g. model.tiny_size='qwen2.5-vl-3b': a published name without a checkpoint
            cfg = config_from_params(base_config, name=str(spec["model"]), **params)
            n_params = count_parameters(cfg, published=spec["size"] if spec.get("backbone_path") else None)
        except ValueError as e:
            raise ConfigError(f"model {spec['model']!r} (size {spec['size']!r}, "
                              f"{spec.get('backbone_path') or 'tiny'}): {e}") from None
        _method_configs(cfg, methods, seed_list)
        prepared.append((spec, cfg, n_params))
    frames = []
    for spec, cfg, n_params in prepared:
        if verbose:
            print(f"== {spec['model']} ({n_params / 1e6:.2f}M parameters)", flush=True)
        df = run_methods(methods, cfg, Path(output_dir) / str(spec["model"]), benchmark, seeds, resume=resume,
                         verbose=verbose)
        frames.append(df.assign(model=spec["model"], backbone=spec["backbone"], size=spec["size"], params=n_params,
                                in_families=bool(spec.get("in_families", False)),
                                in_sizes=bool(spec.get("in_sizes", False))))
    out = pd.concat(frames, ignore_index=True)
    lead = ["model", "backbone", "size", "params", "in_families", "in_sizes"]
    return out[lead + [c for c in out.columns if c not in lead]]


def scaling_table(df: pd.DataFrame, group: str = "Overall", budget: tuple[int, int] | None = None) -> pd.DataFrame:
    """Per model: MetaEmbed at its largest (or ``budget``) budget vs the best single-vector method (Fig. 3/4a).

    Returns rows ``model, backbone, size, params, method, budget, value, gain`` (mean over seeds) where
    ``method`` is ``MetaEmbed`` (at ``budget``) or the best single-vector method's name (at ``(1,1)``);
    ``gain`` is MetaEmbed minus the best single-vector score (0 on the single-vector row).

    Raises:
        ValueError: no MetaEmbed rows at all (e.g. ``methods`` held only single-vector methods), a model
            without MetaEmbed rows (results pieced together from runs; it would drop out of Fig. 4a,
            whose gain labels then compare non-adjacent sizes), or MetaEmbed of some model was not
            evaluated at ``budget`` (names the available ones).
    """
    if "MetaEmbed" not in set(df["method"]):
        raise ValueError(f"scaling_table compares MetaEmbed with the best single-vector method, but the results hold "
                         f"no MetaEmbed rows (methods: {[str(m) for m in pd.unique(df['method'])]}); add MetaEmbed")
    lead = [c for c in ("model", "backbone", "size", "params") if c in df.columns]
    s = method_summary(df, (*lead, "method", "seed"))
    s = s[s["group"] == group]
    rows = []
    for key, part in s.groupby(lead, sort=False, dropna=False):
        key = dict(zip(lead, key if isinstance(key, tuple) else (key,)))
        best = best_single_vector(part, group)
        meta = part[part["method"] == "MetaEmbed"]
        if meta.empty:
            raise ValueError(f"model {key.get('model', key)} has no MetaEmbed rows (methods: "
                             f"{[str(m) for m in pd.unique(part['method'])]}); every model needs its MetaEmbed run")
        available = sorted({(int(a), int(c)) for a, c in meta[["r_q", "r_c"]].itertuples(index=False)},
                           key=lambda x: (x[0] * x[1], x))
        b = (int(budget[0]), int(budget[1])) if budget is not None else available[-1]
        if b not in available:
            raise ValueError(f"MetaEmbed of {key.get('model', key)} was not evaluated at budget {b}; "
                             f"available: {available}")
        mval = float(meta[(meta["r_q"] == b[0]) & (meta["r_c"] == b[1])]["value"].mean())
        gain = mval - best[1] if best else math.nan
        rows.append({**key, "method": "MetaEmbed", "budget": f"({b[0]},{b[1]})", "value": mval, "gain": gain})
        if best:
            rows.append({**key, "method": best[0], "budget": "(1,1)", "value": best[1], "gain": 0.0})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- probes


def probe_items(n: int, seed: int = 0, image_size: int = 56) -> tuple[list, list]:
    """``n`` scene images and their ``n`` captions from the synthetic Ret-T2I task (modality-gap probes).

    Returns ``(image_items, text_items)``; item ``i`` of both lists describes the same scene.
    """
    from .data.synthetic import make_benchmark

    bm = make_benchmark(n_train=0, n_eval_queries=n, n_candidates=2, image_size=image_size, seed=seed,
                        tasks=["Ret-T2I"])
    queries = bm.eval_tasks[0].queries
    return [q.candidates[0] for q in queries], [q.query for q in queries]


# --------------------------------------------------------------------------- retrieval examples


def _item_caption(item: Any, width: int = 28, lines: int = 9) -> str:
    import textwrap

    from .data.records import IMAGE_PLACEHOLDER

    text = item.text.replace(IMAGE_PLACEHOLDER, "").strip()
    wrapped = textwrap.wrap(text, width)
    return "\n".join(wrapped[:lines]) + (" ..." if len(wrapped) > lines else "")


def rank_candidates(model: Any, query: Any, budget: tuple[int, int] | None = None,
                    candidates: Sequence[Any] | None = None) -> pd.DataFrame:
    """Rank ``query``'s candidates with ``model`` at ``budget`` (default: the full ``(R_q, R_c)``).

    ``query`` is an :class:`~metaembed.data.records.EvalQuery` (positive = its first candidate) or an
    Item with explicit ``candidates``.  Returns rows ``rank`` (1 = best), ``index`` (candidate
    position), ``score`` (MaxSim), ``positive``, ``text`` and ``item``, best first.
    """
    from .maxsim import maxsim

    q_item = getattr(query, "query", query)
    cands = list(candidates if candidates is not None else query.candidates)
    q = model.encode([q_item], "query")  # [1, R_q, D]
    c = model.encode(cands, "candidate")  # [N, R_c, D]
    r_q, r_c = budget if budget is not None else (q.shape[1], c.shape[1])
    scores = maxsim(q, c, r_q, r_c)[0]  # [N]
    order = scores.argsort(descending=True, stable=True).tolist()
    return pd.DataFrame({
        "rank": range(1, len(order) + 1),
        "index": order,
        "score": [float(scores[i]) for i in order],
        "positive": [i == 0 and candidates is None for i in order],
        "text": [_item_caption(cands[i], 200).replace("\n", " ") for i in order],
        "item": [cands[i] for i in order],
    })


def retrieval_figure(queries: Sequence[Any], ranked: Sequence[pd.DataFrame], k: int = 4,
                     title: str | None = None) -> Any:
    """One row per query: the query (image and/or text) and its top-``k`` candidates with scores.

    ``ranked[i]`` is :func:`rank_candidates` of ``queries[i]``; the positive is marked with a check
    mark and a green frame, other candidates with a grey frame.
    """
    import matplotlib.pyplot as plt

    from .backbones.base import load_image
    from .plotting import method_color

    n = len(queries)
    fig, axes = plt.subplots(n, k + 1, figsize=(2.3 * (k + 1), 2.75 * n), squeeze=False)

    def show(ax: Any, item: Any, header: str, color: str, bold: bool = False, with_caption: bool = True) -> None:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        if item.image is not None:
            ax.imshow(load_image(item), interpolation="nearest")
            caption = _item_caption(item, 34, 3)
            if caption and with_caption:
                ax.set_xlabel(caption, fontsize="x-small")
        else:
            ax.set_facecolor("#f4f4f4")
            ax.text(0.5, 0.5, _item_caption(item, 22), ha="center", va="center", fontsize="small", wrap=True,
                    transform=ax.transAxes)
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_edgecolor(color)
            spine.set_linewidth(3 if bold else 1.2)
        ax.set_title(header, fontsize="small", color=color if bold else "black")

    ok = method_color("single-last")
    for i, (q, r) in enumerate(zip(queries, ranked)):
        show(axes[i, 0], getattr(q, "query", q), "query", "black", bold=True)
        spread = float(r["score"].max() - r["score"].min()) if len(r) else 0.0
        digits = 3 if spread >= 0.05 else 5
        for j in range(k):
            ax = axes[i, j + 1]
            if j >= len(r):
                ax.set_visible(False)
                continue
            row = r.iloc[j]
            mark = " ✓" if row["positive"] else ""
            show(ax, row["item"], f"#{row['rank']}  score {row['score']:.{digits}f}{mark}",
                 ok if row["positive"] else "0.6", bold=bool(row["positive"]), with_caption=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- efficiency


def tiny_models(backbones: Sequence[str], sizes: Sequence[str]) -> list[tuple[str, str]]:
    """The efficiency notebook's tiny models: the first backbone at every size, the others at ``s`` (or the first
    size); sizes a family lacks are skipped.

    Raises:
        ConfigError: no backbone or size, or a size no backbone has (a typo).
    """
    from .backbones import get_adapter_class

    def available(family: str) -> set[str]:
        return set(get_adapter_class(family).tiny_sizes)

    backbones, sizes = name_list(backbones, "tiny_backbones"), name_list(sizes, "tiny_sizes")
    if not backbones or not sizes:
        raise ConfigError(f"tiny_backbones={backbones}, tiny_sizes={sizes}: name at least one of each")
    sizes_of = {fam: available(fam) for fam in backbones}
    unknown = [s for s in sizes if not any(s in have for have in sizes_of.values())]
    if unknown:
        raise ConfigError(f"tiny_sizes {unknown}: no tiny size of {backbones}; they have "
                          f"{ {f: sorted(h) for f, h in sizes_of.items()} }")
    out: list[tuple[str, str]] = []
    for i, fam in enumerate(backbones):
        chosen = list(sizes) if i == 0 else ["s" if "s" in sizes else sizes[0]]
        out += [(fam, s) for s in chosen if s in sizes_of[fam] and (fam, s) not in out]
    return out


def tiny_efficiency(
    backbones: Sequence[str],
    sizes: Sequence[str],
    groups: Sequence[Sequence[int]],
    *,
    encode_items: int = 64,
    n_candidates: int = 2000,
    runs: int = 5,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "bfloat16",
    paper_candidates: int = 100_000,
    R_q: int | None = None,
    R_c: int | None = None,
) -> pd.DataFrame:
    """Table 3 for tiny models: encoding one query vs scoring it at each budget.

    Models: ``backbones[0]`` at every size of ``sizes``, the other backbones at ``s`` (random
    weights: cost does not depend on training).  Per model:

    * ``encode_query_ms`` / ``encode_query_std_ms``: latency of encoding **one** query on its own
      (batch 1), mean and sd over ``runs`` different queries after a warm-up, the like-for-like
      counterpart of ``score_ms`` (one query scored on its own);
    * ``encode_query_batch_ms`` / ``encode_candidate_batch_ms``: throughput cost, ms per item when
      ``encode_items`` synthetic scene images (with their instruction) are encoded in batches of
      ``encode_batch`` = min(32, ``encode_items``) as queries / candidates (best of 3 passes after a
      warm-up pass): amortized, not a latency;
    * ``score_ms`` / ``score_std_ms``: scoring one query at every budget against a random
      ``[n_candidates, R_c, D]`` index of the model's dim with :func:`metaembed.bench.run_benchmark`
      (mean, sd over ``runs`` repeats).

    Returns one row per (model, budget): ``model, backbone, size, params, D, budget, r_q, r_c,
    encode_query_ms, encode_query_std_ms, encode_batch, encode_query_batch_ms, encode_candidate_batch_ms, score_ms,
    score_std_ms, n_candidates, index_gib_measured`` (that index) and, at ``paper_candidates``,
    ``gflops_per_query`` and ``index_gib``.
    """
    import torch

    from .bench import BenchConfig, run_benchmark, sync, time_ms
    from .config import ModelConfig
    from .efficiency import GIB, dtype_bytes, index_memory_bytes, scoring_flops
    from .model import MetaEmbedModel

    budgets = [tuple(int(x) for x in g) for g in groups]
    R_q = R_q or max(b[0] for b in budgets)
    R_c = R_c or max(b[1] for b in budgets)
    images, _ = probe_items(max(1, encode_items), seed=seed + 2000)
    rows = []
    for fam, size in tiny_models(backbones, sizes):
        model = MetaEmbedModel.build(ModelConfig(backbone=fam, tiny_size=size, R_q=R_q, R_c=R_c, seed=seed))
        model = model.to(device).eval()
        n_params = int(sum(p.numel() for p in model.parameters()))
        D = int(model.embedding_dim)

        # latency: one query encoded on its own (batch 1), as a query arrives at search time;
        # each timed call encodes the next image (a different query each run)
        queries, dev = itertools.cycle(images), torch.device(device)
        single_mean, single_std = time_ms(lambda m=model: m.encode([next(queries)], "query", batch_size=1),
                                          dev, runs=max(1, runs), warmup=1)
        enc, batch = {}, min(32, len(images))  # the figure's label reads encode_batch (8 at the nbval default)
        for role in ("query", "candidate"):
            model.encode(images, role, batch_size=batch)  # warm-up (allocator, thread pools, image processing)
            times = []
            for _ in range(3):  # best of 3: the least disturbed by other work on the machine
                sync(dev)
                t0 = time.perf_counter()
                model.encode(images, role, batch_size=batch)
                sync(dev)
                times.append(time.perf_counter() - t0)
            enc[role] = min(times) * 1e3 / len(images)
        res = run_benchmark(BenchConfig(D=D, N=n_candidates, batch_size=1, budgets=budgets, dtype=dtype,
                                        device=device, runs=runs, warmup=1, seed=seed, reference=False,
                                        maxsim_cpu=False))
        for r in res["rows"]:
            rows.append({
                "model": f"{fam}-{size}", "backbone": fam, "size": size, "params": n_params, "D": D,
                "budget": r["budget"], "r_q": r["r_q"], "r_c": r["r_c"],
                "encode_query_ms": single_mean, "encode_query_std_ms": single_std, "encode_batch": batch,
                "encode_query_batch_ms": enc["query"], "encode_candidate_batch_ms": enc["candidate"],
                "score_ms": r["single_ms"], "score_std_ms": r["single_ms_std"], "n_candidates": n_candidates,
                "index_gib_measured": r["index_gib"],
                "gflops_per_query": scoring_flops(r["r_q"], r["r_c"], D, paper_candidates) / 1e9,
                "index_gib": index_memory_bytes(r["r_c"], D, paper_candidates, dtype_bytes(dtype)) / GIB,
            })
        del model
    return pd.DataFrame(rows)


def modality_probes(model: Any, images: Sequence[Any], texts: Sequence[Any],
                    groups: Sequence[Sequence[int]] | None = None, *, seed: int = 0, paired: bool = True,
                    **labels: Any) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Every modality-gap probe of one model: image vs text per role, and query vs candidate side.

    Encodes ``images`` and ``texts`` once per role (``[n, R, D]``) and returns
    ``(report, embeddings)``: the tidy :func:`metaembed.probes.gap_report` rows of image vs text
    items in the ``query`` and in the ``candidate`` role (``pair="image vs text"``), plus
    :func:`metaembed.probes.side_gap_report` of all items encoded as queries vs as candidates at
    ``groups`` (``pair="query vs candidate"``, ``role="both"``), each with ``labels`` as extra
    columns; ``embeddings[role][modality]`` holds the encodings.

    The separability probe holds every item's vectors out together: ``paired=True`` (the default,
    as :func:`probe_items` returns them) says image ``i`` and text ``i`` show one scene, and an item
    encoded as query and as candidate is one item on the side report.  Otherwise matched near-copies
    leak across folds and lower the separability (see :func:`metaembed.probes.linear_separability`).
    """
    import torch

    from .probes import gap_report, side_gap_report

    n, m = len(images), len(texts)
    if paired and n != m:
        raise ValueError(f"paired=True needs one text per image (item i of both shows one scene), got {n} images "
                         f"and {m} texts; pass paired=False for unrelated sets")
    ids_img = list(range(n))
    ids_txt = ids_img if paired else list(range(n, n + m))
    emb = {role: {"image": model.encode(list(images), role), "text": model.encode(list(texts), role)}
           for role in ("query", "candidate")}
    parts = [gap_report(emb[r]["image"], emb[r]["text"], seed=seed, groups=(ids_img, ids_txt))
             .assign(pair="image vs text", role=r) for r in ("query", "candidate")]
    both = {r: torch.cat([emb[r]["image"], emb[r]["text"]]) for r in ("query", "candidate")}
    R_q, R_c = both["query"].shape[1], both["candidate"].shape[1]
    budgets = None if groups is None else [tuple(int(x) for x in g) for g in groups if g[0] <= R_q and g[1] <= R_c]
    ids_both = ids_img + ids_txt  # row order of `both`: images, then texts
    parts.append(side_gap_report(both["query"], both["candidate"], budgets=budgets or None, seed=seed,
                                 groups=(ids_both, ids_both))
                 .assign(pair="query vs candidate", role="both"))
    report = pd.concat(parts, ignore_index=True).assign(**labels)
    return report, emb


# --------------------------------------------------------------------------- figures


def legend_below(fig: Any, title: str | None = None, ncol: int | None = None) -> Any:
    """Replace the per-axes legends of ``fig`` by one legend centred under the panels; returns ``fig``.

    Entries are collected from every visible axes (first occurrence of a label wins), so a baseline
    drawn in only some panels still gets its entry.  A presentation helper for the notebooks' multi-panel
    figures (a candidate for :mod:`metaembed.plotting`).
    """
    from .plotting import legend_entries

    seen = legend_entries(fig.axes)
    for ax in fig.axes:
        if ax.get_visible() and ax.get_legend() is not None:
            ax.get_legend().remove()
    if seen:
        fig.legend(list(seen.values()), list(seen), title=title, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=ncol or min(len(seen), 5), frameon=False)
    return fig
