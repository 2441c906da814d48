"""Training triples (q, c+, c-) as Lightning batches, with a per-subset validation split.

A batch is ``{"query": Q, "positive": P, "negative": N or None}`` where each
entry is the model's collated input (``model.collate(items, role)``) -- or,
with ``chunk_size`` set (gradient caching), a list of collated chunks.  When
only some examples have a hard negative, ``N`` holds those (in batch order)
and ``"negative_mask"`` (bool ``[B]``) says which queries they belong to.
With ``candidate_keys``, ``"positive_key"`` (int64 ``[B]``, :func:`item_key`)
marks positives that are the same candidate.  Validation batches add ``"valid"``
(bool ``[B]``): False for the copies that pad the ranks' shards to equal length.

Placeholder images (Appendix A): under FSDP every rank must run the vision
tower in every forward or the ranks hang.  With ``placeholder_image`` given,
a collated unit (one role's batch or chunk) in which *no* item has an image
gets one extra item, the placeholder image alone, collated after its items, and
``unit[PLACEHOLDER_ROWS] = 1``; units that already contain an image are left
alone.  The training module drops that row's embedding (keeping it in the graph
with weight 0, so the vision tower's parameters take part in every backward):
the items' own inputs never change, so the loss and gradients are those
without placeholders, whatever the chunking (GradCache) or the split over
ranks.  The paper attaches the placeholder to the image-less samples
themselves, which changes them, and how depends on which samples share a unit.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..config import ConfigError
from ..data.mmeb import held_out_split
from ..data.records import Benchmark, Item, Role, TrainExample, item_key
from .sampler import ResumableBatchSampler, consumed_batches

__all__ = ["PLACEHOLDER_ROWS", "MetaEmbedDataModule", "ResumableDataLoader", "TripletCollator", "split_train_val",
           "training_split"]

log = logging.getLogger(__name__)

Collate = Callable[[Sequence[Item], Role], Any]
#: Key of a collated unit: how many placeholder-image rows (Appendix A) follow its items.
PLACEHOLDER_ROWS = "placeholder_rows"


def split_train_val(
    examples: Sequence[TrainExample], val_fraction: float = 0.01, seed: int = 0
) -> tuple[list[TrainExample], list[TrainExample]]:
    """Hold out ``val_fraction`` of every subset (Appendix A): :func:`metaembed.data.mmeb.held_out_split`."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return held_out_split(examples, val_fraction, seed)


def training_split(
    data: Benchmark | Sequence[TrainExample], batch_size: int, val_fraction: float = 0.01, seed: int = 0,
    world_size: int = 1,
) -> tuple[list[TrainExample], list[TrainExample]]:
    """``(train, val)`` of :func:`split_train_val`, checked: :class:`ConfigError` when there is no training
    example or the training split cannot fill one global batch (``batch_size * world_size``).

    Cheap (no model needed): :func:`metaembed.training.train` calls it before building the backbone.
    """
    examples = list(data.train if isinstance(data, Benchmark) else data)
    if not examples:
        raise ConfigError("no training examples (data.n_train, data.max_train, data.max_per_subset or "
                          "data.subset_weights left none)")
    bad = [type(ex).__name__ for ex in examples if not isinstance(ex, TrainExample)]
    if bad:
        raise TypeError(f"training data must be TrainExample records, got {sorted(set(bad))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    train, val = split_train_val(examples, val_fraction, seed)
    _check_fills(len(train), len(val), batch_size, world_size)
    return train, val


def _given_split(
    data: Benchmark | Sequence[TrainExample], split: tuple[Sequence[TrainExample], Sequence[TrainExample]],
    batch_size: int,
) -> tuple[list[TrainExample], list[TrainExample]]:
    """``split`` as lists, after checking that it partitions ``data``'s examples (the same objects, as
    :func:`training_split` returns them) and fills one batch."""
    if not (isinstance(split, tuple) and len(split) == 2):
        raise TypeError(f"split must be the (train, val) pair training_split returns, got {type(split).__name__}")
    train, val = list(split[0]), list(split[1])
    examples = data.train if isinstance(data, Benchmark) else data
    if len(train) + len(val) != len(examples) or {id(e) for e in train} | {id(e) for e in val} != {
            id(e) for e in examples}:
        raise ValueError(f"split holds {len(train)} + {len(val)} examples that are not the {len(examples)} of data; "
                         "pass the (train, val) that training_split(data, ...) returned")
    _check_fills(len(train), len(val), batch_size, 1)
    return train, val


def _check_fills(n_train: int, n_val: int, batch_size: int, world: int) -> None:
    """:class:`ConfigError` unless ``n_train`` examples fill one global batch (``batch_size * world``)."""
    need = batch_size * world
    if n_train < need:
        held = f" ({n_val} more held out for validation)" if n_val else ""
        raise ConfigError(f"{n_train} training examples{held} cannot fill one global batch of "
                          f"train.batch_size={batch_size} x world_size={world} = {need}")


def _batches_per_epoch(sampler_len: int, limit: int | float | None) -> int:
    """Batches the trainer takes from one epoch of the sampler under ``limit_train_batches``.

    Lightning stops an epoch after ``min(len, limit)`` batches (int) or
    ``int(len * limit)`` (float); the sampler still starts a new permutation
    next epoch, so the resume position must count epochs of this length.
    """
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return sampler_len
    n = min(sampler_len, int(limit)) if isinstance(limit, int) else int(sampler_len * float(limit))
    if n < 1:
        raise ValueError(f"limit_train_batches={limit} leaves no training batch in an epoch of {sampler_len}")
    return n


def _batches_done_in_epoch(trainer: Any, per_epoch: int) -> int:
    """Batches of the current epoch the trainer's epoch loop counts as done when it next runs.

    ``per_epoch`` means that epoch is over (the loop closes it without drawing a batch) and the
    next batch drawn is the first of the next epoch: a checkpoint written at a validation run
    after the epoch's last batch or in ``on_train_epoch_end``, or a reload at an epoch start
    (``reload_dataloaders_every_n_epochs``).  Lightning may create a loader iterator it never
    draws from in these cases; the sampler does not count it (see
    :meth:`ResumableBatchSampler.__iter__`).  Mirrors Lightning's restart logic
    (``_TrainingEpochLoop.reset`` / ``on_run_start``); 0 without loop state.
    """
    fit = getattr(trainer, "fit_loop", None)
    loop = getattr(fit, "epoch_loop", None)
    if loop is None:
        return 0
    if not loop.restarting:  # no unfinished epoch restored: the next epoch starts at batch 0
        return per_epoch if trainer.current_epoch > 0 and not getattr(fit, "is_resuming", False) else 0
    progress = loop.batch_progress
    done, total = int(progress.current.completed), progress.total
    if total.started == total.ready == total.processed == total.completed + 1:
        # written in on_train_batch_end, before the batch counted as completed: Lightning completes
        # it on restart and rolls over to the next epoch after the epoch's last batch
        done += 1
        if done >= per_epoch:
            return 0
    return done


def _restored_epoch(trainer: Any, per_epoch: int) -> int | None:
    """The epoch the restored trainer's next batch belongs to, when it restored an unfinished epoch
    (``None`` otherwise): ``current_epoch``, or the next one when the checkpoint was written at the end of
    the epoch's last batch (Lightning completes that batch and rolls over; :func:`_batches_done_in_epoch`)."""
    fit = getattr(trainer, "fit_loop", None)
    loop = getattr(fit, "epoch_loop", None)
    if loop is None or not loop.restarting:
        return None
    progress = loop.batch_progress
    total = progress.total
    last = total.started == total.ready == total.processed == total.completed + 1 and (
        int(progress.current.completed) + 1 >= per_epoch)
    return int(trainer.current_epoch) + int(last)


def _written_at_fit_end(trainer: Any) -> bool:
    """Whether the restored checkpoint is the one written when ``fit`` ended (on ``max_steps``), not during
    an epoch: Lightning then counts the epoch it was in as completed (``current_epoch`` one higher for
    each such end, so it no longer names the data's epoch) while its epoch loop restarts in that epoch,
    after its batches (a resume with a longer ``max_steps`` continues them, or draws once more from a
    finished one).  A checkpoint written during an epoch has it started but not completed."""
    fit = getattr(trainer, "fit_loop", None)
    epochs, loop = getattr(fit, "epoch_progress", None), getattr(fit, "epoch_loop", None)
    if epochs is None or loop is None or not loop.restarting:
        return False
    e = epochs.current
    return e.started >= 1 and e.started == e.processed == e.completed


class TripletCollator:
    """Collate ``TrainExample`` lists into ``{"query", "positive", "negative"}`` (picklable for workers).

    ``negative`` is ``None`` unless ``use_negatives`` and some example has one; if
    only some do, it collates those and ``negative_mask [B]`` marks their queries
    (Eq. 6: each query's own hard negative, where it has one).  ``candidate_keys``
    adds ``positive_key [B]``, the content key of each positive.
    """

    def __init__(
        self,
        collate_fn: Collate,
        use_negatives: bool = True,
        chunk_size: int | None = None,
        placeholder_image: Any | None = None,
        candidate_keys: bool = False,
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.collate_fn = collate_fn
        self.use_negatives = use_negatives
        self.chunk_size = chunk_size
        self.placeholder_image = placeholder_image
        self.candidate_keys = candidate_keys

    def _unit(self, items: Sequence[Item], role: Role) -> Any:
        if self.placeholder_image is None or any(it.has_image for it in items):
            return self.collate_fn(items, role)
        unit = self.collate_fn([*items, Item(text="", image=self.placeholder_image)], role)
        if not isinstance(unit, dict):
            raise TypeError(f"placeholder images need a collate_fn that returns a dict, got {type(unit).__name__}")
        unit[PLACEHOLDER_ROWS] = torch.tensor(1)
        return unit

    def _collate(self, items: Sequence[Item], role: Role) -> Any:
        if self.chunk_size is None:
            return self._unit(items, role)
        return [self._unit(items[i : i + self.chunk_size], role) for i in range(0, len(items), self.chunk_size)]

    def __call__(self, examples: Sequence[TrainExample]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        has_neg = [ex.negative is not None for ex in examples]
        negatives = [ex.negative for ex in examples if ex.negative is not None]
        use_neg = self.use_negatives and bool(negatives)
        batch = {
            "query": self._collate([ex.query for ex in examples], "query"),
            "positive": self._collate([ex.positive for ex in examples], "candidate"),
            "negative": self._collate(negatives, "candidate") if use_neg else None,  # type: ignore[arg-type]
        }
        if use_neg and not all(has_neg):
            batch["negative_mask"] = torch.tensor(has_neg)  # [B]
        if self.candidate_keys:
            batch["positive_key"] = torch.tensor([item_key(ex.positive) for ex in examples], dtype=torch.long)  # [B]
        return batch


class _PaddedExamples(Dataset):
    """``examples`` padded to ``size`` rows with copies of the first ones; item ``i`` is ``(example, i < n)``."""

    def __init__(self, examples: Sequence[TrainExample], size: int) -> None:
        self.examples, self.size = examples, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[TrainExample, bool]:
        return self.examples[i % len(self.examples)], i < len(self.examples)


class _ValidationCollator:
    """A :class:`TripletCollator` batch of ``(example, real)`` pairs, plus ``"valid"`` (bool ``[B]``):
    False for the padding copies, which ``val/loss`` leaves out (picklable for workers)."""

    def __init__(self, collator: TripletCollator) -> None:
        self.collator = collator

    def __call__(self, pairs: Sequence[tuple[TrainExample, bool]]) -> dict[str, Any]:
        batch = self.collator([ex for ex, _ in pairs])
        batch["valid"] = torch.tensor([bool(real) for _, real in pairs], dtype=torch.bool)  # [B]
        return batch


def examples_digest(examples: Sequence[TrainExample]) -> str:
    """Fingerprint of training examples in order: task, texts and image references (paths; in-memory
    images by mode and size, not pixels).  Cheap; it tells another dataset or held-out split apart."""
    h = hashlib.blake2b(digest_size=12)
    for ex in examples:
        keys = [-1 if it is None else item_key(it, pixels=False) for it in (ex.query, ex.positive, ex.negative)]
        h.update(f"{keys}|{ex.task}\x00".encode())
    return h.hexdigest()


class ResumableDataLoader(DataLoader):
    """A DataLoader whose batch order is a :class:`ResumableBatchSampler`.

    It is *stateful* for Lightning: the checkpoint records what the order
    depends on (the sampler's settings and ``data_digest``, a fingerprint of the
    training examples), and a resume with different data, held-out split or
    global batch (``batch_size * world_size``) warns that the continuation cannot be exact.
    """

    def __init__(self, *args: Any, data_digest: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_digest = data_digest

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(self.batch_sampler.state_dict())  # type: ignore[union-attr]
        if self.data_digest is not None:
            state["data"] = self.data_digest
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Warn when the restored run's global batches differ from the checkpoint's.

        The order is a function of the examples, ``seed`` and the *global* batch
        ``batch_size * num_replicas`` (:mod:`.sampler`): ``W`` ranks x ``B`` resumed as
        ``W'`` x ``B'`` with ``W*B == W'*B'`` sees the same examples per optimizer step, so the
        same gathered in-batch negatives; only how they are split over ranks changes (logged).
        """
        now = self.state_dict()
        old_order, new_order = _global_order(state), _global_order(now)
        changed = {k: (old_order[k], new_order[k]) for k in old_order.keys() & new_order.keys()
                   if old_order[k] != new_order[k]}
        if "data" in changed:
            warnings.warn("resuming on different training examples than the checkpoint's (the data, its order "
                          "or the held-out validation split changed); the resume is not exact", stacklevel=2)
        elif changed:
            warnings.warn(f"resuming with a different batch order ({state} -> {now}); the resume is not exact",
                          stacklevel=2)
        elif (state.get("batch_size"), state.get("num_replicas")) != (now.get("batch_size"), now.get("num_replicas")):
            log.info("resuming on %s rank(s) x batch %s, the checkpoint's %s x %s: the same global batches of %s "
                     "examples (and gathered in-batch negatives); per-rank random streams (dropout) and the order "
                     "of floating-point reductions differ, and with train.gather_across_ranks=false so do the "
                     "in-batch negatives", now.get("num_replicas"), now.get("batch_size"), state.get("num_replicas"),
                     state.get("batch_size"), new_order.get("global_batch"))


def _global_order(state: dict[str, Any]) -> dict[str, Any]:
    """The fields of a :meth:`ResumableDataLoader.state_dict` that fix the global batch sequence."""
    order = {k: v for k, v in state.items() if k not in ("batch_size", "num_replicas")}
    if "batch_size" in state:
        order["global_batch"] = state["batch_size"] * state.get("num_replicas", 1)
    return order


class MetaEmbedDataModule(L.LightningDataModule):
    """Training triples with a 1%-per-subset validation split (Appendix A).

    ``data`` is a :class:`Benchmark` (its ``train``) or a sequence of
    :class:`TrainExample`.  The module shards batches itself (see
    :mod:`metaembed.training.sampler`): build the Trainer with
    ``use_distributed_sampler=False`` (``build_trainer`` does).  On resume the
    position inside the epoch is recomputed from the restored ``global_step`` and
    batch count (see :meth:`_resume_position`).  No training example, or fewer
    than one (global) batch after the validation split, is a :class:`ConfigError`
    raised before training starts.  ``split`` is the ``(train, val)`` that
    :func:`training_split` already returned for these arguments
    (:func:`metaembed.training.train` checks it before building the model and passes it
    here rather than hashing every example a second time); ``None`` computes it.
    """

    def __init__(
        self,
        data: Benchmark | Sequence[TrainExample],
        collate_fn: Collate,
        batch_size: int = 16,
        val_fraction: float = 0.01,
        seed: int = 0,
        num_workers: int = 0,
        use_hard_negatives: bool = True,
        placeholder_image: Any | None = None,
        chunk_size: int | None = None,
        accumulate_grad_batches: int | None = None,
        candidate_keys: bool = False,
        split: tuple[Sequence[TrainExample], Sequence[TrainExample]] | None = None,
    ) -> None:
        super().__init__()
        if split is None:
            self.train_examples, self.val_examples = training_split(data, batch_size, val_fraction, seed)
        else:
            self.train_examples, self.val_examples = _given_split(data, split, batch_size)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.accumulate_grad_batches = accumulate_grad_batches  # None: the trainer's (manual accumulation: pass it)
        self.collator = TripletCollator(collate_fn, use_hard_negatives, chunk_size, placeholder_image, candidate_keys)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "collate_fn": self.collator,
            "num_workers": self.num_workers,
            "persistent_workers": False,
            "generator": torch.Generator().manual_seed(int(self.seed)),
        }

    def train_sampler(self) -> ResumableBatchSampler:
        """This rank's sampler, positioned after the batches the restored trainer already consumed."""
        rank, world = self._world()
        _check_fills(len(self.train_examples), len(self.val_examples), self.batch_size, world)
        sampler = ResumableBatchSampler(len(self.train_examples), self.batch_size, self.seed, world, rank)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            epoch, skip = self._resume_position(trainer, len(sampler))
            if (epoch, skip) != (0, 0):
                sampler.seek(epoch, skip)
                log.info("resuming data order at epoch %d, batch %d", epoch, skip)
        return sampler

    def _resume_position(self, trainer: Any, sampler_len: int) -> tuple[int, int]:
        """``(epoch, batch)`` of the next training batch for the restored ``trainer``.

        The optimizer steps (``global_step``) fix the position at the last step boundary.  A
        checkpoint written mid-accumulation (e.g. ``best-*.ckpt`` at a validation run when
        ``val_check_interval`` is not a multiple of ``accumulate_grad_batches``) is ahead of it
        by up to ``accumulate - 1`` batches; Lightning resumes its ``batch_idx`` from its
        restored batch count, so the data continues from there too.  When the two disagree (a
        resume with another ``accumulate_grad_batches``) the restored epoch and batch count win, with a warning.
        """
        if trainer.global_step == 0 and not getattr(getattr(trainer, "fit_loop", None), "restarting", False):
            return 0, 0  # a fresh run
        per_epoch = _batches_per_epoch(sampler_len, trainer.limit_train_batches)
        done = _batches_done_in_epoch(trainer, per_epoch)
        accumulate = self.accumulate_grad_batches or trainer.accumulate_grad_batches
        epoch, skip = divmod(consumed_batches(trainer.global_step, per_epoch, accumulate), per_epoch)
        if _written_at_fit_end(trainer):
            # a finished run continued: fit ended on a step boundary, so global_step gives the data's position;
            # Lightning's epoch loop continues after its `done` batches of the epoch it stopped in
            if done == skip < per_epoch:
                return epoch, skip
            if skip == 0 and done == per_epoch and epoch > 0:
                # stopped with the epoch's last batch: Lightning draws once more from that finished epoch, so
                # it gets an empty iterator (the sampler's whole epoch skipped, past any limit_train_batches),
                # closes the epoch, and the next epoch starts at its first batch
                return epoch - 1, sampler_len
            warnings.warn(f"resuming a finished run whose global_step={trainer.global_step} at "
                          f"accumulate_grad_batches={accumulate} and {per_epoch} batch(es) per epoch is not where "
                          f"Lightning's batch count ({done} in its last epoch) stopped: train.batch_size, the "
                          "world size, accumulate_grad_batches or limit_train_batches changed? The data continues "
                          "after the steps' batches (counted in the new batches, not in examples seen), and the "
                          "epoch may end early", stacklevel=2)
            return epoch, skip
        restored = _restored_epoch(trainer, per_epoch)
        if restored in (None, epoch) and skip <= done < min(skip + accumulate, per_epoch):
            if done > skip:
                log.warning("resuming mid-accumulation: the gradients of the %d batch(es) already accumulated for "
                            "optimizer step %d are not in the checkpoint; that step uses the remaining batches only",
                            done - skip, trainer.global_step + 1)
            return epoch, done  # at or after the last step boundary, inside its accumulation window
        if restored is not None and done < per_epoch and (restored, done) != (epoch, skip):
            # the step count no longer matches the batch count (accumulate_grad_batches changed since the
            # checkpoint): Lightning continues its restored epoch after its restored batch count, so the data
            # does too; the global_step position skipped (or repeated) batches, and Lightning ended its epoch
            # on the next sampler epoch's batches
            warnings.warn(f"resuming with accumulate_grad_batches={accumulate}, but the checkpoint's global_step="
                          f"{trainer.global_step} does not match its {done} batch(es) trained in epoch {restored} "
                          "(train.batch_size, the world size, accumulate_grad_batches or limit_train_batches "
                          "changed?): the data continues after those batches, counted in the new batches, not in "
                          "examples seen; the optimizer steps differ from the interrupted run's", stacklevel=2)
            return restored, done
        return epoch, skip

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_examples, batch_sampler=self.train_sampler(),
                                   data_digest=self.train_digest, **self._loader_kwargs())

    @functools.cached_property
    def train_digest(self) -> str:
        """:func:`examples_digest` of the training split: hashed once, not at every loader (re)build."""
        return examples_digest(self.train_examples)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_examples:
            return []
        rank, world = self._world()
        # Every rank must run the same number of validation steps: under FSDP each one all-gathers the
        # parameters (and under DDP the first one broadcasts the buffers), so one extra batch on some
        # rank hangs the run; the module also gathers the candidates, which needs equal batch sizes.
        # Like Lightning's own sampler, pad the shards to equal length by repeating the first examples
        # (at most world - 1 repeats; one process sees the split unchanged), but mark the copies
        # (batch["valid"]) so that val/loss leaves them out.  Rank k takes examples k, k + W, ...: the
        # ranks' t-th batches together hold examples [t*W*B, (t+1)*W*B), one process's t-th batch of W*B.
        size = math.ceil(len(self.val_examples) / world) * world
        data = _PaddedExamples(self.val_examples, size)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        kwargs = {**self._loader_kwargs(), "collate_fn": _ValidationCollator(self.collator)}
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, **kwargs)
