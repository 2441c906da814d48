"""The ``metaembed`` command line: ``train``, ``eval``, ``quickstart``, ``flops``, ``bench``, ``train-bench``,
``reproduce``.

Subcommands live in :data:`SUBCOMMANDS`; one provided by another module names
it (``module:`` with ``add_arguments(parser)`` and ``run(args) -> int``) and
is imported only when that subcommand runs, so a missing or broken optional
module fails that subcommand alone, with a message.

``--config`` takes a YAML path or the name of a packaged config
(``lib/metaembed/configs/NAME.yaml``); ``--set key.sub=value`` overrides any
key (values parsed as YAML 1.2 like the config files, then cast to the field's type).  Configuration
mistakes (unknown keys, mistyped values, ``--set`` into a scalar, missing
files, a config file that is not YAML, ``eval --budgets`` beyond the saved
model's ``R_q``/``R_c``, synthetic ``eval`` settings that would score training
queries, MMEB paths under ``data.source=synthetic``, a ``--backbone`` directory that does not exist,
``eval --set model.*`` (the saved model's settings apply), Lightning
``precision`` / ``accelerator`` / ``strategy`` names it does not know,
``--output`` / ``--json`` / ``--csv`` paths that cannot be written, checked
before any training or evaluation) and malformed MMEB / ViDoRe files print
``metaembed: error: ...`` without a traceback and exit with status 2.
``eval`` reads no training data: MMEB-eval (``data.eval_path``) and/or ViDoRe
(``data.vidore_path``) suffice; ``eval --json`` writes the per-task rows followed
by the summary records of the printed table (:func:`metaembed.pipeline.write_results_json`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import (ConfigError, ModelConfig, RunConfig, apply_overrides, check_trainer_settings, config_from_dict,
                     dotted_overrides, read_yaml, with_text)
from .groups import GroupError

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "main", "parse_overrides"]

PROG = "metaembed"


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its own ``add_arguments``/``run`` or a module that provides them (lazy)."""

    help: str
    module: str | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None

    def load(self) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
        """The subcommand's ``(add_arguments, run)``, importing its module only now (fast ``--help``)."""
        if self.module is None:
            assert self.add_arguments is not None and self.run is not None
            return self.add_arguments, self.run
        mod = importlib.import_module(self.module)
        return mod.add_arguments, mod.run


# ------------------------------------------------------------------------------ shared helpers
def _parse_value(text: str) -> Any:
    """The YAML value of ``text``, read as config files are (:func:`~metaembed.config.read_yaml`, YAML 1.2 plain
    scalars: ``010`` is 10, ``1:30``, ``yes`` and ``off`` stay strings); a string stays a string (``1e-4`` is cast
    by the config to the field's type: a float for ``train.lr``, but ``name=1e3`` stays ``"1e3"``, not ``"1000.0"``)."""
    return with_text(read_yaml(text), text) if text.strip() else ""


def parse_overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["train.max_steps=10", "loss.groups=[[1,1],[2,4]]"]`` -> ``{"train.max_steps": 10, ...}``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key.sub=value, got {pair!r}")
        try:
            parsed = _parse_value(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: cannot parse the value ({e.__class__.__name__})") from None
        if isinstance(parsed, dict) and not value.lstrip().startswith("{"):  # "Find a page: " in YAML
            raise ConfigError(f"--set {pair!r}: the value reads as a YAML mapping (its ': '); quote a text that "
                              f"holds one ({key}='\"...\"'), or write a mapping in braces ({{k: v}})")
        out[key] = parsed
    return dotted_overrides(out)  # loss={mmr: false} as loss.mmr: the checks of which keys are set see it


def _add_config_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, metavar="PATH|NAME",
                   help="run config YAML, or the name of a packaged config (e.g. quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=200 (repeatable)")


def _load(config: str | None, overrides: dict[str, Any], fallback: Path | None = None) -> RunConfig:
    from .pipeline import read_config, resolve_config

    if config is not None:
        return read_config(resolve_config(config), overrides)
    if fallback is not None and fallback.is_file():
        return read_config(fallback, overrides)
    return config_from_dict(apply_overrides({}, overrides))


def _check_writable(path: str | Path, flag: str, *, directory: bool) -> None:
    """:class:`ConfigError` naming ``flag`` when ``path`` cannot be written (a directory where a file goes,
    a file where a directory goes or in the way of one, no write access), checked before any work is done;
    nothing is created."""
    target = Path(path)
    if target.exists():
        if directory != target.is_dir():
            raise ConfigError(f"{flag}: {target} is {'not ' if directory else ''}a directory")
        if not os.access(target, os.W_OK):
            raise ConfigError(f"{flag}: {target} is not writable")
        return
    base = target.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{flag}: cannot create {target}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: cannot create {target}: {base} is not writable")


def _refuse_empty(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """:class:`ConfigError` when any flag of ``parser`` got an empty value (``--backbone "$CKPT"`` with ``CKPT``
    unset). No flag means anything empty, and an empty one was read as not given: ``train`` fell back to a tiny
    random model, the synthetic data or the config's folder, ``quickstart`` wrote into the working directory."""
    for action in parser._actions:
        value = getattr(args, action.dest, None) if action.option_strings else None
        values = value if isinstance(value, list) else [value]  # nargs="+" and repeated flags
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise ConfigError(f"{action.option_strings[-1]} is empty (an unset shell variable?); leave the flag "
                              f"out for its default")


# ------------------------------------------------------------------------------ train
def _train_arguments(p: argparse.ArgumentParser) -> None:
    _add_config_arguments(p, required=True)
    p.add_argument("--backbone", metavar="PATH", help="local backbone checkpoint (sets model.backbone_path)")
    p.add_argument("--data", metavar="PATH", help="MMEB-train root (sets data.path and data.source=mmeb)")
    p.add_argument("--output", metavar="DIR", help="output directory (sets train.output_dir)")
    p.add_argument("--resume", metavar="CKPT", help="resume from a Lightning checkpoint (e.g. DIR/checkpoints/last.ckpt)")


def _train_run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    flags: dict[str, Any] = {}
    if args.backbone:
        flags["model.backbone_path"] = args.backbone
    if args.data:
        if overrides.get("data.source", "mmeb") != "mmeb":
            raise ConfigError(f"--data reads MMEB-train, but --set data.source={overrides['data.source']!r}")
        flags["data.path"] = args.data
        flags["data.source"] = "mmeb"
    if args.output:
        flags["train.output_dir"] = args.output
    for key in flags:  # the flags are applied last: a later --set of their section must not undo them
        overrides.pop(key, None)
    config = _load(args.config, {**overrides, **flags})
    check_trainer_settings(config.train)  # a misspelt precision / strategy failed in L.Trainer after the build
    from .pipeline import check_eval_budgets

    check_eval_budgets(config)  # saved with the model: every later `metaembed eval` of it would fail
    if args.resume and not Path(args.resume).is_file():
        hint = ""
        if Path(args.resume).is_dir():  # a run folder or its checkpoints/ folder: name the file resume wants
            for cand in (Path(args.resume) / "checkpoints" / "last.ckpt", Path(args.resume) / "last.ckpt"):
                if cand.is_file():
                    hint = f"; {args.resume} is a folder: did you mean --resume {cand}?"
                    break
            else:
                hint = f"; {args.resume} is a folder, --resume takes a checkpoint file (DIR/checkpoints/last.ckpt)"
        raise ConfigError(f"--resume: checkpoint not found: {args.resume}{hint}")
    backbone = config.model.backbone_path
    if backbone and not Path(backbone).is_dir():  # found only after the training data were loaded
        raise ConfigError(f"--backbone / model.backbone_path: checkpoint directory not found: {backbone}")
    _check_writable(config.train.output_dir, "--output / train.output_dir", directory=True)
    from .training import first_step, steps_trained, train

    args._checkpoint_dir = Path(config.train.output_dir) / "checkpoints"  # named if the run is terminated
    _, trainer = train(config, ckpt_path=args.resume)
    if trainer.is_global_zero:
        out = Path(config.train.output_dir)
        n, start = steps_trained(trainer), first_step(trainer)
        span = f" (steps {start} -> {start + n}, resumed)" if start else ""
        steps = f"{n} step" if n == 1 else f"{n} steps"
        print(f"trained {steps}{span}; model: {out / 'model'}; checkpoints: {out / 'checkpoints'}")
    return 0


# ------------------------------------------------------------------------------ eval
def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a saved model: a save_pretrained folder, e.g. DIR/model of a train run")
    p.add_argument("--config", metavar="PATH|NAME",
                   help="run config YAML or packaged config name (default: the model's run_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.eval_path=/data/MMEB-eval (repeatable; not "
                        "model.*: the model settings come from the saved model)")
    p.add_argument("--budgets", metavar="RQ,RC", nargs="+",  # quoted ("1,1 4,8") or not (1,1 4,8), as flops
                   help='budgets to score, e.g. "1,1 2,4 16,64" (default: eval.budgets, else the loss groups the '
                        "model was trained with (its run_config.yaml; --set loss.groups to choose others); "
                        "a split model: its (R_q, R_c) only)")
    p.add_argument("--json", metavar="PATH",
                   help='write the results as a JSON list: the per-task rows, then the printed table\'s means as '
                        'records {"summary": GROUP, "budget", "r_q", "r_c", "value", "n_tasks"}, GROUP each '
                        "meta-task, IND, OOD, Overall (P@1 means) and NDCG@k (the document tasks' mean: ViDoRe with "
                        "data.vidore_path)")
    p.add_argument("--csv", metavar="PATH", help="write the per-task result rows as CSV")
    p.add_argument("--backbone", metavar="PATH",
                   help="base checkpoint of a LoRA model (default: the model.backbone_path it was trained with)")
    p.add_argument("--skip-base-check", action="store_true",
                   help="load a LoRA model onto --backbone even if it differs from the fingerprint saved with it")
    p.add_argument("--skip-verify", action="store_true",
                   help="load the saved model's files even if they differ from the sha256 recorded at its save "
                        "(e.g. a config edited by hand)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars while the tasks are encoded (shown when stderr is a terminal)")


def _check_budgets(config: RunConfig, model_dir: Path) -> None:
    """Raise :class:`ConfigError` unless every ``eval.budgets`` entry fits the saved model's ``(R_q, R_c)``
    (``None``: the loss groups, clipped to the model; an empty list is an error)."""
    from .pipeline import check_eval_budgets

    try:
        check_eval_budgets(config)
    except ConfigError as e:
        raise ConfigError(f"--budgets / {e}; model: {model_dir}") from None


def _model_dir(path: str) -> Path:
    """``--model``: a saved model directory (:class:`ConfigError` naming what is there instead)."""
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise ConfigError(f"--model: directory not found: {model_dir}")
    from .model import CONFIG_FILE

    if not (model_dir / CONFIG_FILE).is_file():
        hint = (f"; it looks like a training run folder: did you mean {model_dir / 'model'}?"
                if (model_dir / "model" / CONFIG_FILE).is_file() else "")
        raise ConfigError(f"--model: {model_dir} is not a saved MetaEmbed model (no {CONFIG_FILE}){hint}")
    return model_dir


def _saved_model_config(model_dir: Path) -> ModelConfig | None:
    """The ``model`` settings (``R_q``, ``R_c``, ``pooling``) saved in ``model_dir``'s ``metaembed_config.json``,
    read without loading any weights; ``None`` when that file cannot be read (``from_pretrained`` names why)."""
    import json

    from .model import CONFIG_FILE

    try:
        info = json.loads((model_dir / CONFIG_FILE).read_text())
        return config_from_dict({"model": info["model"]}, validate=False).model
    except (OSError, ValueError, TypeError, KeyError, RecursionError):  # ConfigError is a ValueError
        return None


#: Synthetic data keys whose change draws other evaluation queries than the ones held out of training.
_SPLIT_KEYS = ("seed", "n_candidates")


def _check_synthetic_split(config: RunConfig, model_dir: Path) -> None:
    """:class:`ConfigError` when synthetic evaluation could score queries the model was trained on.

    Training skips the evaluation queries of its own ``make_benchmark`` call
    only.  The evaluation queries of a task are a pure function of ``seed`` and
    ``n_candidates`` (which drives the random draws), and a smaller
    ``n_eval_queries`` gives the first queries of a larger one; ``n_train`` and
    ``image_size`` (rendering only) do not change which queries are drawn.  An
    added in-domain task was not held out (:func:`metaembed.data.synthetic.tasks_not_held_out`);
    out-of-domain tasks use compositions training never shows.
    """
    from .data.synthetic import synthetic_sizes

    saved = model_dir / "run_config.yaml"
    if config.data.source != "synthetic" or not saved.is_file():
        return
    from .pipeline import read_config

    trained = read_config(saved).data
    if trained.source != "synthetic":
        return
    why = f"the model in {model_dir} was trained with {saved}'s data section"
    for key in _SPLIT_KEYS:
        old, new = getattr(trained, key), getattr(config.data, key)
        if old != new:
            raise ConfigError(f"data.{key}={new!r} differs from the trained data.{key}={old!r}: {why}, and other "
                              f"synthetic evaluation queries may be training queries; evaluate with "
                              f"data.{key}={old!r}")
    old_n, new_n = synthetic_sizes(trained)[1], synthetic_sizes(config.data)[1]
    if new_n > old_n:
        raise ConfigError(f"data.n_eval_queries={new_n} exceeds the trained {old_n}: {why}, which held out only "
                          f"the first {old_n} evaluation queries of each task; the others may be training queries "
                          f"(use data.n_eval_queries <= {old_n}, or retrain)")
    if trained.subsets is not None:
        from .data.synthetic import list_tasks, tasks_not_held_out

        known = list(list_tasks()["name"])
        used = config.data.subsets if config.data.subsets is not None else known
        extra = tasks_not_held_out([t for t in trained.subsets if t in known], [t for t in used if t in known])
        if extra:
            raise ConfigError(f"data.subsets adds task(s) {extra} to the trained data.subsets "
                              f"{list(trained.subsets)}: {why}, whose training triples skipped only the selected "
                              f"tasks' evaluation queries and scenes, so theirs may be training queries; leave "
                              f"them out or retrain")


def _eval_config(config: str | None, overrides: dict[str, Any], model_dir: Path,
                 saved_model: ModelConfig | None) -> RunConfig:
    """The run config ``eval`` scores with: ``--config`` (default: the model's ``run_config.yaml``) and ``--set``,
    checked against the saved model, not against the ``model`` section of ``--config``.

    When the model's settings (``metaembed_config.json``) can be read and either a ``run_config.yaml`` lies next
    to it or ``--set loss.groups`` is given, they replace the config's ``model`` section before it is validated,
    and the loss groups (Eq. 4-7; the default budgets) are the ones the model was trained with (its
    ``run_config.yaml``) unless ``--set loss.groups`` names others.  With another run's ``--config`` the budgets
    were that run's groups clipped to this model (a trained group, even (R_q, R_c), left unscored without a word)
    and ``--set loss.groups`` was refused against that run's R_q / R_c.  A model saved without a
    ``run_config.yaml`` keeps the config's groups that fit it (:func:`metaembed.pipeline.eval_budgets`).
    """
    from .pipeline import read_config

    saved = model_dir / "run_config.yaml"
    user = dotted_overrides(overrides)
    explicit = "loss.groups" in user
    fixed: dict[str, Any] = {}
    if saved_model is not None and (explicit or saved.is_file()):
        fixed["model"] = dataclasses.asdict(saved_model)
        if not explicit and config is not None:  # without --config the groups are run_config.yaml's already
            fixed["loss.groups"] = [list(g) for g in read_config(saved).loss.groups]
    if (explicit or "loss.groups" in fixed) and "loss.weights" not in user:
        # w_g (Eq. 7) weights only the training loss: the config's weights, one per *its* groups, refused
        # the new groups ("loss.weights has 5 entries for 2 groups"), for every recipe that sets them
        fixed["loss.weights"] = None
    return _load(config, {**fixed, **overrides}, fallback=saved)


def _eval_run(args: argparse.Namespace) -> int:
    from .groups import parse_budget

    model_dir = _model_dir(args.model)
    if args.csv:  # --json: checked by main() for every subcommand
        _check_writable(args.csv, "--csv", directory=False)
    overrides = parse_overrides(args.overrides)
    model_keys = [k for k in overrides if k.split(".", 1)[0] == "model"]
    if model_keys:  # config.model is replaced by the saved model's below: they were dropped silently
        from .model import CONFIG_FILE

        raise ConfigError(f"--set {', '.join(model_keys)}: eval takes the model settings from the saved model "
                          f"({model_dir / CONFIG_FILE}), not from the run config; --backbone relocates a LoRA "
                          f"model's base checkpoint, --budgets chooses (r_q, r_c)")
    if args.budgets is not None:  # ";" is an empty list (an error below), not the defaults; "" is refused by main
        try:
            text = " ".join(args.budgets)
            overrides["eval.budgets"] = [list(parse_budget(b)) for b in text.replace(";", " ").split()]
        except GroupError as e:
            raise GroupError(f"--budgets: {e}") from None
    saved_model = _saved_model_config(model_dir)
    config = _eval_config(args.config, overrides, model_dir, saved_model)
    _check_synthetic_split(config, model_dir)
    from .pipeline import check_data_source

    check_data_source(config.data, train=False)  # an MMEB-eval path under data.source=synthetic: before the model
    if saved_model is not None:  # --budgets beyond the saved R_q / R_c: before the weights load (minutes)
        config.model = saved_model
        _check_budgets(config, model_dir)
    from .evaluation import budget_table, budget_table_title, results_to_csv, summarize
    from .model import MetaEmbedModel
    from .pipeline import evaluate_model, load_benchmark, write_results_json

    # the data first: a missing eval_path or a malformed file fails before the weights load (minutes at real size)
    benchmark = load_benchmark(config.data, train=False)
    model = MetaEmbedModel.from_pretrained(model_dir, backbone_path=args.backbone,
                                           check_base=not args.skip_base_check, verify=not args.skip_verify)
    config.model = model.config  # R_q, R_c and pooling come from the saved model
    if saved_model is None:  # its settings could not be read before loading: check them now
        _check_budgets(config, model_dir)
    progress = not args.no_progress and sys.stderr.isatty()  # bars: encoding a real benchmark takes hours
    df = evaluate_model(model, benchmark, config, progress=progress)
    import pandas as pd

    summary = summarize(df)  # once: the table and the JSON (it warns about a partial MMEB-eval)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        table = budget_table(summary)
        print(budget_table_title(config.eval.ndcg_k, table))
        print(table.to_string())
    if args.json:
        print(f"wrote {write_results_json(df, args.json, summary)}")
    if args.csv:
        print(f"wrote {results_to_csv(df, args.csv)}")
    return 0


# ------------------------------------------------------------------------------ quickstart
def _quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="runs/quickstart", metavar="DIR", help="output directory (default: %(default)s)")
    p.add_argument("--config", default="quickstart", metavar="PATH|NAME", help="run config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")


def _quickstart_run(args: argparse.Namespace) -> int:
    from .pipeline import run_quickstart

    _check_writable(args.output, "--output", directory=True)
    run_quickstart(args.config, args.output, parse_overrides(args.overrides))
    return 0


#: name -> subcommand; other modules' subcommands are imported only when run.
SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("train a model (MMR loss) from a run config", None, _train_arguments, _train_run),
    "eval": Subcommand("evaluate a saved model at retrieval budgets", None, _eval_arguments, _eval_run),
    "quickstart": Subcommand("train MMR and NoMMR on the synthetic benchmark and print budget tables", None,
                             _quickstart_arguments, _quickstart_run),
    "flops": Subcommand("FLOPs / index-size / scoring-cost estimates (Table 3)", "metaembed.efficiency"),
    "bench": Subcommand("MaxSim scoring latency benchmark", "metaembed.bench"),
    "train-bench": Subcommand("training step time, tokens/s and peak memory at real model size",
                              "metaembed.train_bench"),
    "reproduce": Subcommand("run the reproduction notebooks (experiments/*.yaml)", "metaembed.reproduce"),
}


def _selected(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` gets its (possibly imported) arguments."""
    parser = argparse.ArgumentParser(prog=PROG, description="MetaEmbed: Meta Tokens + Matryoshka Multi-Vector Retrieval")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = _selected(argv)
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name != chosen:
            continue
        try:
            add_arguments, run = cmd.load()
        except Exception as e:  # noqa: BLE001  optional module missing or broken: only this subcommand fails
            p.set_defaults(_run=_unavailable(name, cmd.module, e), _lenient=True)
            continue
        add_arguments(p)
        p.set_defaults(_run=run, _parser=p)  # _parser: errors of its arguments print its usage line
    return parser


def _unavailable(name: str, module: str | None, error: Exception) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"{PROG} {name}: unavailable: cannot import {module} ({type(error).__name__}: {error})",
              file=sys.stderr)
        return 1

    return run


def _data_errors() -> tuple[type[Exception], ...]:
    """Missing or misplaced files (a file where a directory goes and the reverse), the loaders' format
    errors, items the backbone cannot encode (an image missing or corrupt once
    ``data.check_images=false`` skipped the load-time check) and checkpoints of the wrong family
    (imported only once an exception is being handled)."""
    from .backbones.base import CheckpointError, InputError
    from .data.records import DataFormatError

    return (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, DataFormatError,
            CheckpointError, InputError)


def _terminated() -> tuple[type[BaseException], ...]:
    """Lightning's ``SIGTERMException``: a ``SystemExit`` without a code, so a preempted or killed ``train``
    exited 0 (and ``train && eval`` went on without a model)."""
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:  # pragma: no cover - lightning is a dependency
        return ()
    return (SIGTERMException,)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metaembed`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_lenient", False):
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _refuse_empty(args, getattr(args, "_parser", parser))
        json_path = getattr(args, "json", None)  # eval, flops, bench, train-bench: before any work is done
        if isinstance(json_path, str) and json_path != "-":
            _check_writable(json_path, "--json", directory=False)
        return int(args._run(args) or 0)
    except (ConfigError, GroupError) as e:  # unknown keys, bad values or budgets, bad --set, missing files
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except _data_errors() as e:  # unreadable or malformed MMEB / ViDoRe files, missing files
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _terminated():
        print(f"{PROG}: terminated (SIGTERM) before the command finished{_resume_hint(args)}", file=sys.stderr)
        return 143


def _resume_hint(args: argparse.Namespace) -> str:
    """After a terminated ``train``: the newest checkpoint it can resume from, or that none was written (the
    message named ``checkpoints/last.ckpt`` also where ``train.checkpoint_every_n_steps`` was unset and no
    validation had run, so no checkpoint existed)."""
    ckpt_dir = getattr(args, "_checkpoint_dir", None)
    if ckpt_dir is None:  # not a training command, or stopped before its run started
        return ""
    ckpts = sorted(Path(ckpt_dir).glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    if ckpts:
        return f"; resume from its newest checkpoint with --resume {ckpts[-1]}"
    return (f"; no checkpoint was written in {ckpt_dir} to resume from (train.checkpoint_every_n_steps writes "
            f"last.ckpt every n optimizer steps; a validation writes the best val/loss)")


if __name__ == "__main__":
    raise SystemExit(main())
