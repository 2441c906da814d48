"""A Lightning Trainer configured from :class:`TrainConfig`, and the one-call ``train``.

Checkpoints go to ``<output_dir>/checkpoints`` (``last.ckpt`` every
``checkpoint_every_n_steps`` optimizer steps, plus the best ``val/loss``),
CSV logs to ``<output_dir>/logs``, the final model to ``<output_dir>/model``.
A run into a used ``output_dir`` that does not resume from one of its checkpoints (a fresh run, or one
resumed from a checkpoint elsewhere) first moves the earlier run's checkpoints, model, config and logs to
``<output_dir>/checkpoints.previous``, ``model.previous``, ``config.previous.yaml`` and ``logs.previous``.
Every checkpoint holds the run's config: a resume that changes the model is refused, one that changes how it
trains warns.
Early stopping on ``val/loss`` when ``early_stopping_patience`` is set (the
paper stops when the 1% held-out loss stops dropping, Appendix A).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from ..config import (
    ConfigError,
    DataConfig,
    RunConfig,
    TrainConfig,
    check_trainer_settings,
    config_from_dict,
    dotted_overrides,
    dump_yaml,
    short_repr,
)
from ..atomic import rename_all
from ..data.records import Benchmark
from .datamodule import MetaEmbedDataModule, training_split
from .module import MetaEmbedLightningModule, fsdp_root

__all__ = ["build_callbacks", "build_trainer", "config_to_yaml", "first_step", "fsdp_block_classes", "fsdp_strategy",
           "steps_trained", "train"]

log = logging.getLogger(__name__)


class _StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``n`` optimizer steps; for a step a validation run follows, written after it.

    Lightning writes a step checkpoint at the end of the step's batch, before the validation it runs
    after that batch: resumed from it, Lightning skips that validation (it counts it as done) while the
    checkpoint holds the early-stopping and best-checkpoint state from before it, so the resumed run
    stops later (or keeps another best model) than the uninterrupted one.  Such a step's checkpoint is
    therefore written only once the validation is over (after every other callback's
    ``on_validation_end``); a job killed during that validation resumes from the step checkpoint
    before, and replays the steps since exactly (it resumed from the first write, skipping that
    validation, when both were written).  ``state_key`` is constant, so another
    ``train.checkpoint_every_n_steps`` on resume (a free change) restores this callback's state without
    Lightning's "Please add the following callbacks" warning.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rewrite_after_validation = False

    @property
    def state_key(self) -> str:
        return "metaembed_step_checkpoint"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._rewrite_after_validation = False
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = self._every_n_train_steps
        due = n >= 1 and trainer.global_step % n == 0 and trainer.global_step != self._last_global_step_saved
        # Lightning's own test of whether a validation follows this batch (private: without it, as before, the
        # checkpoint is written now and again after a validation)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        follows = getattr(trainer.fit_loop.epoch_loop, "_should_check_val_fx", None)
        if due and fetcher is not None and follows is not None and follows(fetcher):
            self._rewrite_after_validation = True
            return
        saved_before = self._last_global_step_saved
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._rewrite_after_validation = self._last_global_step_saved != saved_before

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._rewrite_after_validation and not trainer.sanity_checking:
            self._rewrite_after_validation = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every n steps alone left last.ckpt at the last multiple of n (a run of 5 steps with n = 2 at step 4);
        # a finished run's own end is where a longer max_steps continues it (as without n, Lightning's per-epoch
        # save); an interrupted run does not get here
        super().on_train_end(trainer, pl_module)
        if self._every_n_train_steps and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _base_state_key(callback: Callback, key: str, base: type[Callback]) -> str:
    """``key`` (Lightning's state key of ``callback``: its class name, then its settings) under the name of
    ``base``, so checkpoints written with the base class and with the subclass resume into each other."""
    return base.__qualname__ + key.removeprefix(type(callback).__qualname__)


class _BestCheckpoint(ModelCheckpoint):
    """The best-``val/loss`` checkpoint, which a run resumed into another ``output_dir`` carries along.

    Lightning reloads only ``best_model_path`` when the folder changed, not the best score: the first
    validation in the new folder then counted as best however bad, and ``final_weights=best`` saved a worse
    model than an uninterrupted run (early stopping, which restores its score, disagreed).  Here the score and
    top-k state are restored and the best file is copied into the new folder, so the comparison continues and
    a later improvement deletes only that copy, never a file of the earlier run.  The best file is looked for
    next to the resumed checkpoint first: a run folder moved (or renamed, or set aside as
    ``checkpoints.previous``) keeps it there, while the path the checkpoint recorded is gone.  The state key is
    ``ModelCheckpoint``'s, so checkpoints of either class resume into the other.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resumed_from: str | None = None  # the restored checkpoint's dirpath, until the best is adopted

    @property
    def state_key(self) -> str:
        return _base_state_key(self, super().state_key, ModelCheckpoint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_from = state_dict.get("dirpath", self.dirpath)
        super().load_state_dict({**state_dict, "dirpath": self.dirpath})  # every field, not only the path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._adopt_best(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._adopt_best(trainer)  # FSDP / DeepSpeed restore the callbacks after on_fit_start

    def _adopt_best(self, trainer: L.Trainer) -> None:
        if self._resumed_from is None:
            return
        moved, self._resumed_from = self._resumed_from != self.dirpath, None
        recorded = Path(self.best_model_path) if self.best_model_path else None
        if recorded is None:
            return  # no validation before the checkpoint: nothing to carry along
        beside = Path(str(trainer.ckpt_path)).parent / recorded.name if trainer.ckpt_path else None
        # a moved or set-aside run folder keeps its best next to its checkpoints, not at the recorded path
        best = beside if beside is not None and beside.is_file() else recorded
        if not best.is_file():
            log.warning("the resumed run's best val/loss checkpoint %s is gone: the best is chosen among this "
                        "folder's validations only", recorded)
            self.best_model_score, self.best_model_path, self.best_k_models = None, "", {}
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
            return
        target = Path(self.dirpath) / best.name
        if not moved and best == recorded == target:
            return  # resumed in place: Lightning's restored state names it already
        if best.resolve() != target.resolve():
            if trainer.is_global_zero:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(best, target)
            trainer.strategy.barrier("metaembed-best-checkpoint")
        self.best_k_models = {str(target): self.best_model_score}
        self.best_model_path = self.kth_best_model_path = str(target)
        self.last_model_path = ""


class _EarlyStopping(EarlyStopping):
    """Early stopping on ``val/loss`` whose patience on resume is the configured one, and a resumed run that
    had stopped stays stopped.

    Lightning restores the checkpoint's ``patience``, so another ``train.early_stopping_patience`` on resume
    (a free change) was ignored; and a run that had stopped early, resumed as it was, trained another step
    (its stop lived only in the finished process) and overwrote its model.  The state key is
    ``EarlyStopping``'s, so checkpoints of either class resume into the other.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopped_before = False

    @property
    def state_key(self) -> str:
        return _base_state_key(self, super().state_key, EarlyStopping)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience  # the configured one: counts the checkpoint's wait_count against it
        # a stop counted a validation without improvement (wait_count >= 1): with patience 0 every checkpoint's
        # wait_count 0 is >= 0, and a run resumed before it stopped trained no further
        self._stopped_before = self.wait_count >= max(patience, 1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._stopped_before:
            self._stopped_before = False
            trainer.should_stop = True
            log.warning("the resumed run had stopped early (val/loss did not improve in its last %d validations, "
                        "train.early_stopping_patience=%d): it trains no further; raise "
                        "train.early_stopping_patience to continue it", self.wait_count, self.patience)


def build_callbacks(cfg: TrainConfig, has_val: bool) -> list[Callback]:
    """``last.ckpt`` checkpointing, best-``val/loss`` checkpointing and early stopping.

    Early stopping is checked when a validation run ends (never again at a training epoch's end, which
    would re-read a stale ``val/loss`` -- or, in a resumed run that has not validated yet, find none and
    raise).  ``last.ckpt`` comes after the best-``val/loss`` checkpoint: written after a validation, it
    holds that checkpoint's updated state.
    """
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    callbacks: list[Callback] = []
    if has_val:
        callbacks.append(_BestCheckpoint(dirpath=ckpt_dir, filename="best-step{step}", monitor="val/loss",
                                         mode="min", save_top_k=1, auto_insert_metric_name=False,
                                         save_on_train_epoch_end=False, enable_version_counter=False))
        if cfg.early_stopping_patience is not None:
            callbacks.append(_EarlyStopping(monitor="val/loss", mode="min", patience=cfg.early_stopping_patience,
                                            check_on_train_epoch_end=False))
    elif cfg.early_stopping_patience is not None:
        _check_run_stops(cfg, has_val)
        log.warning("train.early_stopping_patience=%d is ignored: there is no validation split (train.val_fraction="
                    "%s); the run trains to max_steps / max_epochs", cfg.early_stopping_patience, cfg.val_fraction)
    # a resumed run keeps writing last.ckpt in place (no last-v1.ckpt)
    callbacks.append(_StepCheckpoint(dirpath=ckpt_dir, filename="step{step}", save_last=True, save_top_k=0,
                                     every_n_train_steps=cfg.checkpoint_every_n_steps, auto_insert_metric_name=False,
                                     enable_version_counter=False))
    return callbacks


def _check_run_stops(cfg: TrainConfig, has_val: bool) -> None:
    """:class:`ConfigError` when early stopping is the run's only limit and no validation runs: ``TrainConfig``
    refuses ``val_fraction=0`` there, but a held-out split can come out empty (too few distinct pairs)."""
    if not has_val and cfg.early_stopping_patience is not None and cfg.max_steps == -1 and cfg.max_epochs == -1:
        raise ConfigError(f"train.early_stopping_patience={cfg.early_stopping_patience} is this run's only limit "
                          "(train.max_steps=-1, train.max_epochs=-1), but there is no validation split "
                          f"(train.val_fraction={cfg.val_fraction}; the held-out split is empty): the run would "
                          "never stop; set train.max_steps or train.max_epochs")


def fsdp_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of every ``transformers`` model inside ``model``: the classes its
    ``_no_split_modules`` name (decoder layers, vision blocks), as ``accelerate`` wraps them for FSDP.
    Empty for a model without any."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def fsdp_strategy(precision: str, block_classes: set[type[nn.Module]] | None = None) -> Any:
    """``strategy: fsdp``: one FSDP unit per transformer block, low-precision compute under mixed precision
    with fp32 gradient reduction and buffers.

    ``block_classes`` (:func:`fsdp_block_classes`) become the auto-wrap policy: each block's parameters
    are gathered only while it runs, so a rank holds its shard plus about one block in full (the 32B
    recipe's ~65 GB of bf16 parameters never need to be on one GPU at once).  Without them the whole
    model is one unit, gathered for the whole forward.  Lightning's own FSDP mixed-precision config
    casts buffers and the gradient all-reduce to bf16 as well: the rotary ``inv_freq`` buffers of every
    backbone would then be rounded to bf16 (shifting the pretrained position encoding) and gradients
    averaged in bf16 across ranks.  FSDP2 (and torchtune) keep buffers in fp32; so does this.
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    # "bf16" / "16" are Lightning's aliases of "bf16-mixed" / "16-mixed"
    low = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16,
           "16": torch.float16}.get(str(precision))
    kwargs: dict[str, Any] = {}
    if block_classes:
        kwargs["auto_wrap_policy"] = set(block_classes)
    if low is not None:
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=low, reduce_dtype=torch.float32,
                                                   buffer_dtype=torch.float32)
    return FSDPStrategy(**kwargs) if kwargs else "fsdp"  # full or "true" low precision: Lightning's config


_PLAIN_DDP = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")  # Lightning's DDP launchers, no find_unused suffix


def build_trainer(cfg: TrainConfig, has_val: bool = True, callbacks: Sequence[Callback] = (),
                  model: nn.Module | None = None, **overrides: Any) -> L.Trainer:
    """A Trainer for :class:`MetaEmbedLightningModule` (``overrides`` go to ``L.Trainer``).

    ``use_distributed_sampler=False``: :class:`MetaEmbedDataModule` shards its own batches.
    With gradient caching, accumulation and clipping move into the module (manual optimisation).
    ``strategy: ddp`` (or ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook``) without ``placeholder_image``
    runs with ``find_unused_parameters=True``
    (an image-less step leaves the vision tower unused on that rank).  GradCache under DDP
    needs every trainable parameter used by the last chunk of some input: without
    ``placeholder_image`` a model that trains image-only parameters is a :class:`ConfigError`; one whose
    image-only parameters are not known (no ``backbone.image_only_parameters``, or no ``model`` given) runs
    with ``find_unused_parameters=True``.
    ``strategy: fsdp`` with ``placeholder_image`` wraps each transformer block of ``model`` as its own
    FSDP unit (:func:`fsdp_strategy`); without placeholder images a rank whose batch has no image would
    skip the vision blocks' all-gathers that the other ranks wait on, so the model stays one unit.
    """
    grad_cache = cfg.grad_cache_chunk_size is not None
    strategy: Any = cfg.strategy
    if strategy in _PLAIN_DDP and not cfg.placeholder_image and (not grad_cache or not _image_params_known(model)):
        # a step whose batches hold no image leaves the vision tower without gradients on that rank (GradCache:
        # the last chunk's; a model without backbone.image_only_parameters cannot be checked, and a rank that
        # left a parameter unused hung the others until the process-group timeout)
        strategy = f"{strategy}_find_unused_parameters_true"
        log.info("strategy %s without placeholder images: using find_unused_parameters=True", cfg.strategy)
    elif strategy == "fsdp":
        blocks = fsdp_block_classes(model) if model is not None and cfg.placeholder_image else set()
        if not blocks:
            log.warning("strategy fsdp: the whole model is one FSDP unit (%s), its parameters gathered in full for "
                        "each forward", "no model given" if model is None else
                        "no transformer blocks found" if cfg.placeholder_image else "train.placeholder_image is off")
        strategy = fsdp_strategy(cfg.precision, blocks)
    kwargs: dict[str, Any] = {
        "max_steps": cfg.max_steps,
        "max_epochs": cfg.max_epochs,
        "precision": cfg.precision,
        "strategy": strategy,
        "accelerator": cfg.accelerator,
        "devices": cfg.devices,
        "num_nodes": cfg.num_nodes,
        "accumulate_grad_batches": 1 if grad_cache else cfg.accumulate_grad_batches,
        "gradient_clip_val": None if grad_cache else cfg.gradient_clip_val,
        "log_every_n_steps": cfg.log_every_n_steps,
        "enable_progress_bar": cfg.progress_bar,
        "enable_model_summary": cfg.progress_bar,
        "default_root_dir": cfg.output_dir,
        "logger": CSVLogger(cfg.output_dir, name="logs"),
        "callbacks": [*build_callbacks(cfg, has_val), *callbacks],
        "use_distributed_sampler": False,
        "num_sanity_val_steps": 0,
    }
    if not has_val:
        kwargs["limit_val_batches"] = 0
    elif cfg.val_check_interval is not None:
        kwargs.update(val_check_interval=cfg.val_check_interval, check_val_every_n_epoch=None)
    kwargs.update(overrides)
    trainer = L.Trainer(**kwargs)
    if grad_cache and not cfg.placeholder_image and model is not None and trainer.world_size > 1 \
            and not _is_fsdp(trainer.strategy):
        _check_grad_cache_ddp(model)
    if grad_cache and _is_fsdp(trainer.strategy) and trainer.world_size > 1:
        # GradCache backpropagates chunk by chunk inside one training_step (one FSDP forward): the first
        # backward reshards the parameters, and the next chunk's forward would see 1-D shards
        raise ConfigError("train.grad_cache_chunk_size is not supported with strategy fsdp on more than one "
                          "process; use strategy ddp (large batches through GradCache) or fsdp without GradCache")
    return trainer


def _image_params_known(model: nn.Module | None) -> bool:
    """Whether ``model``'s backbone lists the parameters only images reach (the metaembed adapters do)."""
    return hasattr(getattr(model, "backbone", None), "image_only_parameters")


def _check_grad_cache_ddp(model: nn.Module | None) -> None:
    """:class:`ConfigError` for GradCache under multi-process DDP without placeholder images when ``model``
    trains a parameter only images reach: a rank whose last chunk of an input has no image leaves it
    without a gradient in the one synchronised backward, and the ranks whose chunk had one wait for it
    (the run hangs until the process-group timeout, 30 min by default)."""
    if not _image_params_known(model):
        return  # build_trainer finds unused parameters instead
    trained = [n for n, p in model.backbone.image_only_parameters() if p.requires_grad]
    if trained:
        raise ConfigError(f"train.grad_cache_chunk_size under multi-process DDP needs train.placeholder_image=true "
                          f"when image-only parameters train ({len(trained)}, e.g. {trained[0]}): a rank whose "
                          "last chunk has no image leaves them without a gradient and the others wait for it")


def _is_fsdp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def config_to_yaml(config: RunConfig) -> str:
    """The run config as YAML (tuples written as lists), loadable by ``load_config`` (:func:`dump_yaml`: a string
    such as ``"09"`` is quoted, so it does not read back as a number)."""
    return dump_yaml(config.to_dict())


def train(
    config: RunConfig,
    benchmark: Benchmark | None = None,
    ckpt_path: str | None = None,
    *,
    model: nn.Module | None = None,
    callbacks: Sequence[Callback] = (),
    **trainer_overrides: Any,
) -> tuple[nn.Module, L.Trainer]:
    """Train on ``benchmark`` (default: the training data of ``config.data``; its evaluation data is not read);
    resume from ``ckpt_path``.

    ``model`` defaults to ``MetaEmbedModel.build(config.model)`` (which applies
    ``model.gradient_checkpointing``; precision comes from ``train.precision``).  Returns the
    trained model and the trainer; rank 0 writes ``<output_dir>/model`` and
    ``<output_dir>/config.yaml``.  After a multi-process FSDP run the returned model holds this
    rank's shard of the parameters only: load ``<output_dir>/model`` for the full one.
    """
    config.validate()
    check_trainer_settings(config.train)  # a misspelt precision / strategy fails here, not in L.Trainer later
    config = _with_absolute_paths(config)  # the saved configs and model then name the same files from anywhere
    tc = config.train
    saved, saved_step = _resumed_config(ckpt_path)  # before minutes of loading: a wrong file or model fails now
    changed = _check_resumed_config(saved, config, str(ckpt_path), saved_step) if saved is not None else []
    L.seed_everything(tc.seed, workers=True, verbose=False)
    if benchmark is None:
        from ..pipeline import load_benchmark

        benchmark = load_benchmark(config.data, evaluation=False)  # training reads no evaluation data
    # too little data (or no held-out split to end an unlimited run) is a ConfigError before minutes of loading
    # the backbone (the sampler checks the global batch again once the Trainer knows the world size)
    split = training_split(benchmark, tc.batch_size, tc.val_fraction, tc.seed)
    _check_run_stops(tc, has_val=bool(split[1]))
    if model is None:
        from ..model import MetaEmbedModel

        model = MetaEmbedModel.build(config.model)
    dm = MetaEmbedDataModule(
        benchmark,
        collate_fn=model.collate,
        batch_size=tc.batch_size,
        val_fraction=tc.val_fraction,
        seed=tc.seed,
        num_workers=tc.num_workers,
        use_hard_negatives=config.loss.use_hard_negatives,
        placeholder_image=model.placeholder_image() if tc.placeholder_image else None,
        chunk_size=tc.grad_cache_chunk_size,
        candidate_keys=config.loss.mask_duplicate_candidates,
        # manual (GradCache) accumulation is invisible to the Trainer; otherwise the Trainer's own
        # value (which a trainer override may change) sets the resume position
        accumulate_grad_batches=tc.accumulate_grad_batches if tc.grad_cache_chunk_size is not None else None,
        split=split,  # computed once: hashing every example's content is seconds at MMEB size
    )
    module = MetaEmbedLightningModule(model, config.loss, tc)
    trainer = build_trainer(tc, has_val=bool(dm.val_examples),
                            callbacks=[*callbacks, _RunConfigRecord(config), _StepsTrained()],
                            model=model, **trainer_overrides)
    ckpt_dir = Path(tc.output_dir) / "checkpoints"
    if trainer.is_global_zero:
        if not _resumes_in(ckpt_path, ckpt_dir):
            _set_aside_earlier_run(Path(tc.output_dir), ckpt_path)
        out = Path(tc.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # written now, so an interrupted run records what --resume must repeat; a changed resume keeps the old
        (out / "config.yaml").write_text(config_to_yaml(config))
        if changed:
            (out / f"config.step{saved_step}.yaml").write_text(config_to_yaml(config_from_dict(saved, validate=False)))
    with _one_thread_in_forked_ranks(trainer):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if tc.final_weights == "best":
        restore_best_weights(trainer)
    model.zero_grad(set_to_none=True)  # the last step's gradients are not part of the result
    with _full_parameters(trainer):  # FSDP: a collective, so every rank enters it
        if trainer.is_global_zero:
            out = Path(tc.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            if hasattr(model, "save_pretrained"):
                model.save_pretrained(out / "model")
                (out / "model" / "run_config.yaml").write_text(config_to_yaml(config))
    return model, trainer


def restore_best_weights(trainer: L.Trainer) -> Path | None:
    """Load the model weights of the run's best ``val/loss`` checkpoint into ``trainer``'s module
    (``train.final_weights='best'``); returns that checkpoint, or ``None`` (with a warning: the last
    weights stay) when no validation ran.

    Only the weights: the optimizer, schedule and RNG state stay the last step's.  Every rank loads
    (through the strategy, so a sharded FSDP module takes its shard).
    """
    best = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor == "val/loss"), None)
    path = Path(best.best_model_path) if best is not None and best.best_model_path else None
    if path is None or not path.is_file():
        log.warning("train.final_weights='best' but no val/loss checkpoint was written (no validation ran): "
                    "the model keeps the last weights")
        return None
    checkpoint = trainer.strategy.load_checkpoint(path)
    trainer.strategy.load_model_state_dict(checkpoint)
    # a run resumed into another output_dir keeps the earlier folder's best path but not its score
    score = "unknown" if best.best_model_score is None else f"{float(best.best_model_score):.6g}"
    log.info("train.final_weights='best': model weights of %s (val/loss %s, step %s; the run stopped at step %d)",
             path, score, checkpoint.get("global_step"), trainer.global_step)
    return path


def _lightning_keyword(ckpt_path: str) -> bool:
    """Whether ``ckpt_path`` is one of Lightning's names (``"last"``, ``"best"``, ``"hpc"``, ...), not a file."""
    path = Path(str(ckpt_path)).expanduser()
    return path.parent == Path() and not path.exists()


def _resumes_in(ckpt_path: str | None, ckpt_dir: Path) -> bool:
    """Whether ``fit(ckpt_path=...)`` continues the run whose checkpoints are in ``ckpt_dir``.

    Lightning's keywords (``"last"``, ``"best"``, ...) name this run's own checkpoints; a file elsewhere
    (another run's ``last.ckpt``) starts this ``output_dir`` afresh from it, so the files already in
    ``ckpt_dir`` belong to an earlier run.
    """
    if ckpt_path is None:
        return False
    if _lightning_keyword(ckpt_path):
        return True
    path = Path(str(ckpt_path)).expanduser()
    try:
        return path.resolve().parent == ckpt_dir.resolve()
    except OSError:
        return False


#: What a run writes into ``output_dir`` that describes it: set aside together (:func:`_set_aside_earlier_run`).
#: ``logs`` too: a new run's ``logs/version_<N+1>`` beside the earlier run's read as a resumed run's continuation.
_RUN_RECORD = ("checkpoints", "model", "config.yaml", "logs")


def _set_aside_earlier_run(out: Path, ckpt_path: str | None = None) -> str | None:
    """Rename an earlier run's ``checkpoints/``, ``model/``, ``config.yaml`` and ``logs/`` in ``out`` aside, before a
    run not resumed from its checkpoints; returns the suffix used (``.previous``, ``.previous-1``, ...) or ``None``.

    Left in place, a fresh run (or one resumed from another run's checkpoint) into the same ``output_dir``
    would overwrite ``last.ckpt`` but keep the earlier run's ``best-step*.ckpt`` next to its own
    (``save_top_k`` only deletes its own files), and replace the earlier run's model and config, so the moved
    checkpoints had nothing describing them.  They go to ``checkpoints.previous``, ``model.previous``,
    ``config.previous.yaml`` and ``logs.previous`` (left in ``logs/``, the new run's ``version_<N+1>`` looked like
    the earlier run resumed), with the configs a changed resume kept (``config.step<N>.previous.yaml``): one
    suffix for all.
    """
    ckpt_dir = out / "checkpoints"
    # with the configs a changed resume kept (config.step<N>.yaml): beside a new run they read as its own
    record = [*_RUN_RECORD, *sorted(p.name for p in out.glob("config.step*.yaml")
                                    if re.fullmatch(r"config\.step\d+\.yaml", p.name))]
    present = [n for n in record if (out / n).exists()]
    if (not (ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt"))) and not (out / "model").is_dir()
            and not any(out.glob("logs/version_*/metrics.csv"))):  # (a run killed before its first checkpoint)
        return None  # nothing an earlier run left (a config.yaml alone is rewritten)

    def aside(name: str, suffix: str) -> Path:
        stem, dot, ext = name.rpartition(".")
        return out / (f"{stem}{suffix}.{ext}" if dot else f"{name}{suffix}")

    suffix, n = ".previous", 0
    while any(aside(name, suffix).exists() for name in record):
        n += 1
        suffix = f".previous-{n}"
    # a rename refused part-way is undone: the earlier run is not split over two suffixes
    rename_all([(out / name, aside(name, suffix)) for name in present])
    what = (f"a run resumed from {ckpt_path}, outside {ckpt_dir}, starts this folder afresh and" if ckpt_path else
            "a fresh run (no ckpt_path)")
    log.warning("%s held an earlier run (%s); %s moved them aside with the suffix %s (to resume that run instead "
                "pass its ckpt_path, or metaembed train --resume CKPT)", out, ", ".join(present), what, suffix)
    return suffix


#: Checkpoint entry holding the RunConfig (``to_dict``) of the run that wrote it.
_RUN_CONFIG_KEY = "metaembed_run_config"
#: Model keys that define the trained weights: a resume that changes one is a ConfigError.
_RESUME_MODEL_KEYS = {f"model.{k}" for k in ("backbone", "tiny_size", "R_q", "R_c", "pooling", "layout", "lora",
                                              "lora_r", "lora_alpha", "lora_target_modules")}
#: Keys a resume may change without a word: how long the run goes, where it writes, how it is watched and
#: what is evaluated afterwards (also every ``eval.*`` key) -- not what or how it trains.
_RESUME_FREE = {"name", "model.gradient_checkpointing", "train.max_steps", "train.max_epochs", "train.output_dir",
                "train.checkpoint_every_n_steps", "train.progress_bar", "train.num_workers",
                "train.log_every_n_steps", "train.early_stopping_patience", "train.final_weights",
                "data.eval_path", "data.eval_image_root", "data.eval_tasks", "data.max_eval_queries",
                "data.vidore_path", "data.vidore_unknown_ids", "data.max_doc_queries", "data.max_doc_pages"}


_STEPS_KEY = "metaembed/steps_trained"
_START_KEY = "metaembed/first_step"


class _StepsTrained(Callback):
    """Puts the run's optimizer steps (and the step it started from) in ``callback_metrics``, which
    Lightning's in-process launchers (``ddp_fork`` / ``ddp_spawn`` / ``ddp_notebook``) send back to the
    parent, whose loop counters stay 0."""

    def __init__(self) -> None:
        self._start: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = int(trainer.global_step)  # after a checkpoint's restore: the step resumed from

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed at its max_steps never starts training (no on_train_start): 0 steps from its checkpoint's
        start = int(trainer.global_step) if self._start is None else self._start
        trainer.callback_metrics[_STEPS_KEY] = torch.tensor(trainer.global_step - start)
        trainer.callback_metrics[_START_KEY] = torch.tensor(start)


def steps_trained(trainer: L.Trainer) -> int:
    """Optimizer steps the run :func:`train` returned ``trainer`` for took in this process (a resumed run:
    those after its checkpoint's step, :func:`first_step`), also when its ranks ran in child processes
    (then ``trainer.global_step`` is 0 in this one)."""
    steps = (getattr(trainer, "callback_metrics", None) or {}).get(_STEPS_KEY)  # (a stand-in trainer may lack it)
    return int(trainer.global_step) if steps is None else int(steps)


def first_step(trainer: L.Trainer) -> int:
    """The global step the run :func:`train` returned ``trainer`` for started from: 0, or its checkpoint's."""
    start = (getattr(trainer, "callback_metrics", None) or {}).get(_START_KEY)
    return 0 if start is None else int(start)


class _RunConfigRecord(Callback):
    """Stores the run's config in every checkpoint, so a resume can be checked against it (:func:`train`)."""

    def __init__(self, config: RunConfig) -> None:
        self.record = config.to_dict()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[_RUN_CONFIG_KEY] = self.record


def _resumed_config(ckpt_path: str | None) -> tuple[dict[str, Any] | None, int | None]:
    """``(the run config stored in the checkpoint or None, its global_step)``; ``(None, None)`` for Lightning's
    keywords (``"last"``, ...).  Read before the data and the model are loaded: a file that is no checkpoint was
    a traceback minutes later.  Memory-mapped, so only the small entries are read."""
    if ckpt_path is None or _lightning_keyword(ckpt_path):  # Lightning resolves "last", "best", ...
        return None, None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume checkpoint {ckpt_path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path and zipfile.is_zipfile(p))
        raise ConfigError(f"resume checkpoint {ckpt_path}: not a checkpoint (not a torch.save archive: truncated, "
                          f"e.g. a save killed while copied across file systems, or another file); pass a "
                          f"<output_dir>/checkpoints/*.ckpt file written by metaembed train"
                          f"{f' (beside it: {short_repr(others)})' if others else ''}")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a YAML, a truncated or foreign file: say what was expected
        raise ConfigError(f"resume checkpoint {ckpt_path}: not a Lightning checkpoint written by metaembed train "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"resume checkpoint {ckpt_path}: not a Lightning checkpoint (no global_step / state_dict)")
    step, saved = ckpt["global_step"], ckpt.get(_RUN_CONFIG_KEY)
    if type(step) is not int or step < 0 or not (saved is None or isinstance(saved, dict)):  # an edited file
        raise ConfigError(f"resume checkpoint {ckpt_path}: global_step {short_repr(step)} / run config of type "
                          f"{type(saved).__name__} are not a step count and a mapping; the checkpoint is corrupt")
    return saved, step


def _check_resumed_config(saved: dict[str, Any], config: RunConfig, ckpt_path: str, step: int | None) -> list[str]:
    """Compare the config a checkpoint was written with to the resumed run's: :class:`ConfigError` for a changed
    model (:data:`_RESUME_MODEL_KEYS`); a warning naming every other changed key outside :data:`_RESUME_FREE`
    (a resume with another ``loss.tau`` mixes two runs).  Returns the changed keys warned about."""
    old, new = (dotted_overrides(json.loads(json.dumps(d))) for d in (saved, config.to_dict()))  # tuples as lists
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in _RESUME_FREE and not k.startswith("eval.")]
    model = [k for k in changed if k in _RESUME_MODEL_KEYS]
    show = lambda keys: ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)  # noqa: E731
    if model:
        raise ConfigError(f"resume checkpoint {ckpt_path} was written by another model ({show(model)}); resume with "
                          f"the checkpoint's model settings")
    if changed:
        log.warning("resuming %s (step %s) with changed settings: %s; steps up to %s trained with the checkpoint's "
                    "(kept as config.step%s.yaml next to config.yaml)", ckpt_path, step, show(changed), step, step)
    return changed


def _absolute(path: str | None) -> str | None:
    """``path`` made absolute (against the working directory) when it exists there; else unchanged."""
    if not path:
        return path
    p = Path(path).expanduser()
    return os.path.abspath(p) if not p.is_absolute() and p.exists() else path


def _with_absolute_paths(config: RunConfig) -> RunConfig:
    """A copy of ``config`` whose existing relative data paths, ``data.vidore_train_image_dir`` and
    ``model.backbone_path`` are absolute."""
    saved = copy.deepcopy(config)
    for key in DataConfig.PATH_KEYS:
        setattr(saved.data, key, _absolute(getattr(saved.data, key)))
    if saved.data.vidore_train_image_dir:  # written by the run, so absolute whether or not it exists yet
        saved.data.vidore_train_image_dir = os.path.abspath(Path(saved.data.vidore_train_image_dir).expanduser())
    saved.model.backbone_path = _absolute(saved.model.backbone_path)
    return saved


@contextlib.contextmanager
def _one_thread_in_forked_ranks(trainer: L.Trainer):
    """Ranks started by ``fork`` (``strategy: ddp_fork`` / ``ddp_notebook``) run torch with one intra-op
    thread.  libgomp is not fork-safe: once this process has used OpenMP (any torch CPU op), a forked child
    that opens a multi-thread region waits forever -- and Lightning gives each child
    ``len(sched_getaffinity) // ranks`` threads, a hang (not an error) on any host with 4 or more CPUs.
    The parent's thread count and ``OMP_NUM_THREADS`` are restored when training ends."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if getattr(launcher, "_start_method", None) != "fork" or trainer.world_size < 2:
        yield
        return
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    if threads > 1 or omp not in (None, "1"):
        log.warning("a fork-started strategy (ddp_fork / ddp_notebook): each rank runs torch with 1 thread (libgomp "
                    "hangs a forked process's thread pool); use strategy ddp or ddp_spawn for multi-threaded CPU ranks")
    os.environ["OMP_NUM_THREADS"] = "1"  # Lightning then leaves the children's count alone ...
    torch.set_num_threads(1)  # ... and they inherit this one
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _full_parameters(trainer: L.Trainer) -> AbstractContextManager:
    """Under FSDP, the model's full parameters on rank 0 (CPU) while the final model is saved.

    After ``fit`` an FSDP model (``use_orig_params=True``, Lightning's default) holds only this
    rank's flat shard: its parameters are 1-D slices or empty, so saving them directly writes a
    broken model.  Elsewhere a no-op.
    """
    root = fsdp_root(getattr(trainer.strategy, "model", None))
    if root is None:
        return contextlib.nullcontext()
    return type(root).summon_full_params(root, writeback=False, rank0_only=True, offload_to_cpu=True)
