"""MMR training with Lightning: module, data, cross-rank gathering, GradCache, exact resume.

``train(config)`` is the one-call entry point; the pieces are
:class:`MetaEmbedLightningModule` (the step, Eq. 5-7), :class:`MetaEmbedDataModule`
(batches, 1%-per-subset validation split), :mod:`.distributed` (in-batch
candidates across ranks with gradients), :mod:`.grad_cache` and
:mod:`.sampler` (batch order as a function of ``(seed, epoch)``).
"""
from .datamodule import (
    PLACEHOLDER_ROWS,
    MetaEmbedDataModule,
    ResumableDataLoader,
    TripletCollator,
    split_train_val,
    training_split,
)
from .distributed import all_gather_with_grad, gather_candidates
from .grad_cache import grad_cache_backward
from .module import MetaEmbedLightningModule, WarmupSchedule
from .sampler import ResumableBatchSampler, consumed_batches
from .trainer import build_callbacks, build_trainer, config_to_yaml, first_step, steps_trained, train

__all__ = [
    "PLACEHOLDER_ROWS",
    "MetaEmbedDataModule",
    "MetaEmbedLightningModule",
    "ResumableBatchSampler",
    "ResumableDataLoader",
    "TripletCollator",
    "WarmupSchedule",
    "all_gather_with_grad",
    "build_callbacks",
    "build_trainer",
    "config_to_yaml",
    "consumed_batches",
    "first_step",
    "gather_candidates",
    "grad_cache_backward",
    "split_train_val",
    "steps_trained",
    "train",
    "training_split",
]
