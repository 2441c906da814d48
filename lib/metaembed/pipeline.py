"""End-to-end runs: data -> train -> evaluate every budget -> tables on disk.

``train_and_evaluate(config, output_dir)`` trains one model and scores it at
every retrieval budget ``(r_q, r_c)`` from a single encoding pass.
``run_quickstart()`` does that twice with identical seed, data and steps --
MMR and NoMMR (``loss.mmr=False``, only the last group trained) -- on the
synthetic benchmark and prints both budget tables (P@1 per meta-task, IND,
OOD, Overall and NDCG@5), the comparison behind the paper's Fig. 4b.
Sizes and steps live in the packaged ``configs/quickstart.yaml``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .config import ConfigError, DataConfig, RunConfig, check_trainer_settings, dotted_overrides, load_config
from .data.records import Benchmark, DocRetrievalTask

__all__ = [
    "CONFIG_DIR",
    "check_data_source",
    "check_eval_budgets",
    "eval_budgets",
    "evaluate_model",
    "load_benchmark",
    "packaged_configs",
    "read_config",
    "resolve_config",
    "run_quickstart",
    "train_and_evaluate",
    "write_results_json",
]

log = logging.getLogger(__name__)

#: Packaged run configs, addressable by name (``--config quickstart``).
CONFIG_DIR = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the packaged configs (``configs/NAME.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """An existing file path, or the name of a packaged config (``quickstart``, ``quickstart.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if "/" not in text and "\\" not in text:
        packaged = CONFIG_DIR / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(f"config {text!r} not found (not a file, not a packaged config: {', '.join(packaged_configs())})")


def read_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """:func:`~metaembed.config.load_config`; a file that is not UTF-8 YAML is a :class:`ConfigError` naming it."""
    try:
        return load_config(path, dict(overrides or {}))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e})") from None


def load_benchmark(cfg: DataConfig, *, train: bool = True, evaluation: bool = True) -> Benchmark:
    """The benchmark ``data`` describes: the synthetic one, or local MMEB-train/-eval files.

    ``mmeb``: training triples from ``data.path`` (``split``, ``image_root``,
    ``subsets``, ``negatives``, ``negative_choice``, ``skip_missing``, ``check_images``)
    and ViDoRe-train pairs from ``data.vidore_train`` (subset ``"ViDoRe-train"``), either
    or both, capped and weighted per subset (``max_per_subset``, ``subset_weights``;
    ``max_train`` keeps a sample seeded by ``seed``), MMEB-eval tasks from ``data.eval_path``
    (``eval_tasks``, ``eval_image_root``; ``max_eval_queries`` keeps the first N
    of each task); ``data.vidore_path`` makes the ViDoRe v2 tasks (v1 when no v2
    dataset is there; capped by ``max_doc_queries`` / ``max_doc_pages``, see
    :func:`metaembed.data.vidore.cap_task`) the document tasks for NDCG@5, in place of the synthetic
    Doc-Pages tasks (NDCG@5 averages one kind of corpus).  ``train=False`` (evaluation)
    leaves the training set empty: ``data.path`` is then neither needed nor read;
    ``evaluation=False`` (training only, :func:`metaembed.training.train`) reads neither
    ``data.eval_path`` nor ``data.vidore_path`` (the synthetic tasks are generated either way).  MMEB paths
    the call would read under ``source='synthetic'`` are a :class:`ConfigError` (:func:`check_data_source`).
    """
    if not train and not evaluation:
        raise ValueError("load_benchmark: train=False and evaluation=False load nothing")
    cfg.validate()
    check_data_source(cfg, train=train, evaluation=evaluation)
    if cfg.source == "synthetic":
        bench = _synthetic(cfg if train else dataclasses.replace(cfg, n_train=0))
    else:  # mmeb (validated)
        from .data.mmeb import load_mmeb_eval

        if not train and not cfg.eval_path and not cfg.vidore_path:
            raise ConfigError("data.source='mmeb': nothing to evaluate; set data.eval_path (MMEB-eval root) "
                              "and/or data.vidore_path (ViDoRe root)")
        examples = _mmeb_train(cfg) if train else []
        if cfg.eval_path and evaluation and cfg.max_eval_queries is not None:
            log.warning("data.max_eval_queries=%d: scoring only the first %d queries of each MMEB-eval task "
                        "(null scores them all)", cfg.max_eval_queries, cfg.max_eval_queries)
        eval_tasks = (load_mmeb_eval(cfg.eval_path, cfg.eval_tasks, image_root=cfg.eval_image_root,
                                     check_images=cfg.check_images, max_queries=cfg.max_eval_queries)
                      if cfg.eval_path and evaluation else [])
        bench = Benchmark(train=examples, eval_tasks=eval_tasks)
    doc_caps = cfg.max_doc_queries is not None or cfg.max_doc_pages is not None
    if evaluation and not cfg.vidore_path and doc_caps:
        raise ConfigError(f"data.max_doc_queries={cfg.max_doc_queries!r} / data.max_doc_pages={cfg.max_doc_pages!r}"
                          " cap the ViDoRe tasks of data.vidore_path, which is not set")
    if cfg.vidore_path and evaluation:
        docs = prepare_vidore_tasks(_vidore_tasks(cfg.vidore_path, cfg.vidore_unknown_ids), cfg)
        bench = Benchmark(train=bench.train, eval_tasks=bench.eval_tasks, doc_tasks=docs)
    return bench


def prepare_vidore_tasks(tasks: Sequence[DocRetrievalTask], cfg: DataConfig) -> list[DocRetrievalTask]:
    """The loaded ViDoRe ``tasks`` as ``cfg`` scores them: with its instructions
    (``data.vidore_query_instruction`` / ``data.vidore_page_instruction``,
    :func:`metaembed.data.vidore.instruct_task`), then capped by ``data.max_doc_queries`` /
    ``data.max_doc_pages`` (:func:`metaembed.data.vidore.cap_task`, with a warning that the scores are not
    comparable with the paper's).  Shared by :func:`load_benchmark` and the ablations' v1-only loader."""
    from .data.vidore import cap_task, instruct_task

    docs = [instruct_task(t, cfg.vidore_query_instruction, cfg.vidore_page_instruction) for t in tasks]
    if cfg.max_doc_queries is not None or cfg.max_doc_pages is not None:
        log.warning("data.max_doc_queries=%s, data.max_doc_pages=%s: scoring capped ViDoRe tasks (NDCG@k over "
                    "a smaller corpus is not comparable with the paper's; null scores them all)",
                    cfg.max_doc_queries, cfg.max_doc_pages)
        docs = [cap_task(t, cfg.max_doc_queries, cfg.max_doc_pages) for t in docs]
    return docs


def check_data_source(cfg: DataConfig, *, train: bool = True, evaluation: bool = True) -> None:
    """:class:`ConfigError` when ``data.source='synthetic'`` but MMEB files to read, or MMEB-only caps, are
    given: ``data.path`` / ``data.image_root`` / ``data.max_train`` / ``data.max_per_subset`` /
    ``data.subset_weights`` / ``data.vidore_train`` /
    ``data.vidore_train_image_dir`` (``train``), ``data.eval_path`` /
    ``data.eval_image_root`` / ``data.eval_tasks`` / ``data.max_eval_queries`` (``evaluation``).

    The synthetic benchmark reads none of them: a run or an evaluation given an MMEB path without
    ``data.source=mmeb`` trained or scored the synthetic tasks instead, without a word.
    """
    if cfg.source != "synthetic":
        return
    keys = ((("path", "image_root", "max_train", "max_per_subset", "subset_weights", "vidore_train",
              "vidore_train_image_dir") if train else ())
            + (("eval_path", "eval_image_root", "eval_tasks", "max_eval_queries") if evaluation else ()))
    given = [f"data.{k}={v!r}" for k in keys if (v := getattr(cfg, k)) is not None and v != ""]
    if given:
        raise ConfigError(f"{', '.join(given)} but data.source='synthetic', which reads no MMEB files; set "
                          f"data.source=mmeb to use them (or set them to null for the synthetic benchmark: "
                          f"data.subsets, data.n_train and data.n_eval_queries size it)")


def _synthetic(cfg: DataConfig) -> Benchmark:
    from .data.synthetic import benchmark_from_config

    try:
        return benchmark_from_config(cfg)
    except ValueError as e:  # sizes, task names, candidate counts the generator cannot serve
        raise ConfigError(f"data (synthetic): {e}") from None


def _mmeb_train(cfg: DataConfig) -> list:
    """MMEB-train triples of ``cfg`` plus ViDoRe-train pairs (``data.vidore_train``), capped and weighted per
    subset (ViDoRe-train is the subset ``"ViDoRe-train"``); all, or a ``data.seed``-seeded sample of
    ``data.max_train``."""
    from .data.mmeb import load_mmeb_train, mix_subsets
    from .data.records import DataFormatError

    if not cfg.path and not cfg.vidore_train:
        raise ConfigError("data.source='mmeb' needs data.path (the MMEB-train root; --data PATH) and/or "
                          "data.vidore_train (the ViDoRe-train root)")
    where = " + ".join(p for p in (cfg.path, cfg.vidore_train) if p)
    train = []
    try:
        if cfg.path:
            train += load_mmeb_train(cfg.path, cfg.subsets, image_root=cfg.image_root, split=cfg.split,
                                     negatives=cfg.negatives, negative_choice=cfg.negative_choice,
                                     skip_missing=cfg.skip_missing, check_images=cfg.check_images, seed=cfg.seed)
        if cfg.vidore_train:
            from .data.vidore import instruct_examples, load_vidore_train

            train += instruct_examples(load_vidore_train(cfg.vidore_train, image_dir=cfg.vidore_train_image_dir,
                                                         check_images=cfg.check_images),
                                       cfg.vidore_query_instruction, cfg.vidore_page_instruction)
        if cfg.max_per_subset is not None or cfg.subset_weights:
            train = mix_subsets(train, max_per_subset=cfg.max_per_subset, subset_weights=cfg.subset_weights,
                                seed=cfg.seed)
    except DataFormatError:
        raise
    except ValueError as e:  # e.g. data.subset_weights naming a subset that was not loaded
        raise ConfigError(f"data (training data {where}): {e}") from None
    if cfg.max_train is not None:
        if cfg.max_train > len(train):
            log.warning("data.max_train=%d but %s holds %d training triples (after subsets / max_per_subset / "
                        "subset_weights): using all of them", cfg.max_train, where, len(train))
        elif cfg.max_train < len(train):
            import torch

            gen = torch.Generator().manual_seed(cfg.seed)
            keep = sorted(torch.randperm(len(train), generator=gen)[: cfg.max_train].tolist())
            log.info("data.max_train=%d: a sample (data.seed=%d) of the %d training triples",
                     cfg.max_train, cfg.seed, len(train))
            train = [train[i] for i in keep]
    with_neg = sum(ex.negative is not None for ex in train)
    log.info("%d of %d training triples carry a hard negative", with_neg, len(train))
    if train and not with_neg:
        log.warning("no training triple has a hard negative (data.split=%r, data.negatives=%r): the "
                    "loss sees in-batch negatives only; the paper's (§4.1) come from the MoCa / mmE5 "
                    "release (data.split=train, data.negatives=list)", cfg.split, cfg.negatives)
    return train


def _vidore_tasks(root: str, unknown_ids: str = "error") -> list:
    from .data.vidore import (
        VIDORE_V1_TASKS,
        VIDORE_V2_TASKS,
        load_vidore_v1_suite,
        load_vidore_v2_suite,
    )

    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"data.vidore_path: directory not found: {root}")
    has = sorted(p.name for p in base.iterdir() if p.is_dir())
    v2_dirs = {k: name.split("/", 1)[1] for k, (name, _) in VIDORE_V2_TASKS.items()}
    v1_dirs = {k: name.split("/", 1)[1] for k, name in VIDORE_V1_TASKS.items()}
    v2 = [k for k, d in v2_dirs.items() if d in has]
    v1 = [k for k, d in v1_dirs.items() if d in has]
    if v2:
        if v1:
            log.warning("data.vidore_path=%s holds ViDoRe v2 and v1 dataset folders: scoring v2 (%s), skipping v1 "
                        "(%s); point data.vidore_path at a folder with v1 folders only to score v1",
                        root, ", ".join(dict.fromkeys(v2_dirs[k] for k in v2)), ", ".join(v1_dirs[k] for k in v1))
        _warn_partial_vidore(root, "v2", v2, v2_dirs)
        return load_vidore_v2_suite(root, v2, on_unknown=unknown_ids)
    if v1:
        _warn_partial_vidore(root, "v1", v1, v1_dirs)
        return load_vidore_v1_suite(root, v1)
    raise ConfigError(f"data.vidore_path={root}: no ViDoRe v1/v2 dataset folder found; expected folders named "
                      f"after the Hugging Face datasets, v2: {sorted(set(v2_dirs.values()))}, v1: "
                      f"{sorted(set(v1_dirs.values()))}; found: {has or 'no folders'}")


def _warn_partial_vidore(root: str, version: str, found: list[str], dirs: dict[str, str]) -> None:
    """Warn (:class:`~metaembed.data.vidore.ViDoReDataWarning`) when ``data.vidore_path`` holds only some of the
    suite's dataset folders: the NDCG@k mean then covers fewer tasks than the paper's (a missing or misnamed
    folder used to drop out silently)."""
    from .data.vidore import ViDoReDataWarning

    if len(found) < len(dirs):
        missing = sorted({d for k, d in dirs.items() if k not in found})
        warnings.warn(f"data.vidore_path={root}: scoring {len(found)} of the {len(dirs)} ViDoRe {version} tasks "
                      f"({', '.join(found)}), so the NDCG@k mean covers only these (not comparable with the "
                      f"paper's); missing dataset folders: {missing}", ViDoReDataWarning, stacklevel=3)


def eval_budgets(config: RunConfig) -> list[tuple[int, int]]:
    """``eval.budgets``, else every loss group (all of them, also for NoMMR), clipped to the model's R.

    ``split`` pooling defaults to its full budget ``(R_q, R_c)`` only (Table 5's ``split-(R_q,R_c)``): its
    vectors are segment means in token order, so a prefix covers only the first tokens (the shared
    instruction), candidates tie, and P@1's tie rule (positive first) would count hits.
    """
    if config.eval.budgets is not None:
        return [tuple(int(x) for x in b) for b in config.eval.budgets]  # type: ignore[misc]
    R_q, R_c = config.model_vector_counts()
    if config.model.pooling == "split":
        return [(R_q, R_c)]
    budgets = [tuple(int(x) for x in g) for g in config.loss.groups]
    return [b for b in budgets if b[0] <= R_q and b[1] <= R_c] or [(R_q, R_c)]  # type: ignore[misc]


def check_eval_budgets(config: RunConfig) -> None:
    """:class:`ConfigError` unless every ``eval.budgets`` entry fits the model's ``(R_q, R_c)`` (Eq. 4:
    ``r_q <= R_q``, ``r_c <= R_c``); checked before training, not after it."""
    from .groups import GroupError, validate_budget

    if config.eval.budgets is not None and not list(config.eval.budgets):
        raise ConfigError("eval.budgets is empty; null scores the loss groups")
    R_q, R_c = config.model_vector_counts()
    for budget in config.eval.budgets or []:
        try:
            validate_budget(budget, R_q, R_c)
        except GroupError as e:
            raise ConfigError(f"eval.budgets: {e} (model.pooling {config.model.pooling!r})") from None


def evaluate_model(model: Any, benchmark: Benchmark, config: RunConfig, cache_dir: str | Path | None = None,
                   progress: bool = False) -> pd.DataFrame:
    """Encode the benchmark once with ``model.encode``, ``eval.batch_size`` items per forward, and score every
    budget (tidy rows).  An embedding cache (``cache_dir`` or ``eval.cache_dir``) is keyed by the model's
    ``fingerprint()``."""
    from .evaluation import evaluate

    cache_dir = cache_dir if cache_dir is not None else config.eval.cache_dir
    encode = model.encode
    if "batch_size" in inspect.signature(encode).parameters:
        # MetaEmbedModel.encode's own batch_size (32) split every eval.batch_size batch into forwards of 32
        encode = functools.partial(encode, batch_size=config.eval.batch_size)
    fingerprint = getattr(model, "fingerprint", None)
    cache_key = str(fingerprint()) if cache_dir is not None and callable(fingerprint) else None
    return evaluate(benchmark, encode, eval_budgets(config), batch_size=config.eval.batch_size,
                    cache_dir=cache_dir, progress=progress, k=config.eval.ndcg_k, ties=config.eval.ties,
                    cache_key=cache_key)


#: The key that marks a summary record of :func:`write_results_json` (and names its group).
SUMMARY_KEY = "summary"


def write_results_json(df: pd.DataFrame, path: str | Path, summary: pd.DataFrame | None = None) -> Path:
    """Write the per-task rows of ``df`` (:func:`~metaembed.evaluation.evaluate`) as a JSON list, then the summary.

    The list starts with every row of ``df`` as :func:`~metaembed.evaluation.results_to_json` writes it; one
    record per budget and summary group follows (``summary`` of :func:`~metaembed.evaluation.summarize`,
    computed when not given): ``{"summary": group, "budget", "r_q", "r_c", "value", "n_tasks"}`` with group
    each meta-task, ``IND``, ``OOD``, ``Overall`` (unweighted means of P@1 over tasks) and ``NDCG@k`` (the mean
    over the document tasks: ViDoRe with ``data.vidore_path``), the numbers of the printed budget table unrounded.
    Summary records carry no ``task`` or ``metric``: select the per-task rows by ``"summary" not in row``.
    """
    from .evaluation import json_records, results_to_json, summarize

    summary = summarize(df) if summary is None else summary
    groups = json_records(summary.rename(columns={"group": SUMMARY_KEY}))
    return results_to_json(df, path, extra=[{SUMMARY_KEY: g.pop(SUMMARY_KEY), **g} for g in groups])


def _write_tables(df: pd.DataFrame, out: Path) -> None:
    from .evaluation import budget_table, results_to_csv, results_to_json

    results_to_csv(df, out / "results.csv")
    results_to_json(df, out / "results.json")
    if "run" in df.columns:
        for run, part in df.groupby("run", sort=False):
            results_to_csv(budget_table(part.drop(columns="run")), out / f"budget_table_{run}.csv", index=True)
    else:
        results_to_csv(budget_table(df), out / "budget_table.csv", index=True)


def train_and_evaluate(config: RunConfig, output_dir: str | Path, benchmark: Benchmark | None = None,
                       ckpt_path: str | None = None, progress: bool = False) -> pd.DataFrame:
    """Train ``config`` into ``output_dir`` and evaluate it at every budget.

    Writes ``results.csv``/``results.json``/``budget_table.csv`` next to the
    model; returns the result rows (empty on non-zero ranks of a DDP or FSDP run; after multi-process
    FSDP rank 0 scores the full model ``train`` saved, since its own holds one shard).  A benchmark
    with nothing to evaluate, ``eval.budgets`` beyond the model's ``(R_q, R_c)`` or a
    ``train.precision`` / ``accelerator`` / ``strategy`` Lightning does not know raise
    :class:`ConfigError` before training.
    """
    from .training import first_step, steps_trained, train

    config = copy.deepcopy(config)
    config.train.output_dir = str(output_dir)
    check_eval_budgets(config)
    check_trainer_settings(config.train)
    if benchmark is None:
        benchmark = load_benchmark(config.data)
    if not benchmark.eval_tasks and not benchmark.doc_tasks:
        raise ConfigError(f"{config.name}: nothing to evaluate after training; set data.eval_path (MMEB-eval "
                          "root) and/or data.vidore_path (ViDoRe root)")
    start = time.perf_counter()
    model, trainer = train(config, benchmark, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return pd.DataFrame()
    from lightning.pytorch.strategies import FSDPStrategy

    if trainer.world_size > 1 and isinstance(trainer.strategy, FSDPStrategy):
        # after a multi-process FSDP fit each rank holds only its shard of the parameters: score the full
        # model that train() gathered and saved
        from .model import MetaEmbedModel

        model = MetaEmbedModel.from_pretrained(Path(output_dir) / "model", device=trainer.strategy.root_device)
    trained = time.perf_counter()
    cache = Path(config.eval.cache_dir) / config.name if config.eval.cache_dir else None
    df = evaluate_model(model, benchmark, config, cache_dir=cache, progress=progress)
    _write_tables(df, Path(output_dir))
    timing = {"train_s": round(trained - start, 1), "eval_s": round(time.perf_counter() - trained, 1),
              "steps": steps_trained(trainer), "first_step": first_step(trainer)}  # steps: in train_s
    (Path(output_dir) / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    log.info("%s: %s", config.name, timing)
    return df


def run_quickstart(
    config_path: str | Path = "quickstart",
    output_dir: str | Path = "runs/quickstart",
    overrides: Mapping[str, Any] | None = None,
    runs: Sequence[tuple[str, bool]] = (("MMR", True), ("NoMMR", False)),
    verbose: bool = True,
) -> pd.DataFrame:
    """Train MMR and NoMMR with identical seed/data/steps, evaluate every budget, print and save tables.

    ``overrides`` maps dotted keys (``train.max_steps``) or sections (``{"train": {...}}``) to values.  Writes
    ``<output_dir>/{MMR,NoMMR}/`` (model, logs, per-run tables) and
    ``<output_dir>/results.{csv,json}``, ``budget_table_<run>.csv``; returns all
    result rows with a leading ``run`` column.
    """
    from .evaluation import budget_table, budget_table_title

    overrides = dotted_overrides(overrides)  # {"loss": {"mmr": False}} too: the check below reads dotted keys
    fixed = sorted({"name", "loss.mmr", "train.output_dir"} & set(overrides))
    if fixed:  # each run sets them (output_dir: <output_dir>/<run>); an override was ignored without a word
        raise ConfigError(f"quickstart sets {', '.join(fixed)} itself for each run (MMR / NoMMR); choose the "
                          "folder with output_dir (--output), or use `metaembed train` for a single run")
    base = read_config(resolve_config(config_path), overrides)
    check_trainer_settings(base.train)  # before the benchmark is built, not in L.Trainer after it
    out = Path(output_dir)
    start = time.perf_counter()
    benchmark = load_benchmark(base.data)  # built once: both runs see the same data
    frames = []
    for name, mmr in runs:
        cfg = copy.deepcopy(base)
        cfg.loss.mmr = mmr
        cfg.name = name
        cfg.validate()
        df = train_and_evaluate(cfg, out / name, benchmark)
        frames.append(df.assign(run=name)[["run", *df.columns]])
    results = pd.concat(frames, ignore_index=True)
    _write_tables(results, out)
    if verbose:
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            for name, _ in runs:
                table = budget_table(results[results["run"] == name].drop(columns="run"))
                print(f"\n{name}: {budget_table_title(base.eval.ndcg_k, table)}")
                print(table.to_string())
        print(f"\nquickstart done in {time.perf_counter() - start:.0f}s; results in {out}")
    return results
