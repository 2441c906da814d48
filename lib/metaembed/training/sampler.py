"""Batch order as a pure function of ``(seed, epoch)``, resumable mid-epoch.

Every epoch draws one global permutation from ``seed`` and ``epoch``, cuts it
into global batches of ``batch_size * world_size`` and gives rank ``k`` the
``k``-th slice of each.  So a 2-rank run with batch ``B`` sees exactly the
global batches of a 1-rank run with batch ``2B`` (rank order = concatenation
order), and the position after ``n`` batches is ``divmod(n, len(sampler))``.

Resuming: :meth:`ResumableBatchSampler.resume` takes the number of batches
already consumed (recomputed from the restored ``global_step`` by
:func:`consumed_batches`, and from the trainer's restored batch count for a
checkpoint written mid-accumulation -- never from what was prefetched) and the
next iteration starts there.  The sampler counts its own epochs, one per
iterator that is drawn from (an iterator created and dropped unused, as a
multi-worker DataLoader and Lightning's epoch start do, is not counted), so the
batch sequence is the same whatever epoch number the trainer assigns after a
restart and whatever ``num_workers`` is.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler", "consumed_batches"]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's index batches; drops the last incomplete global batch.

    ``len(self)`` is the number of batches per epoch (the same on every rank).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for num_replicas={num_replicas}")
        global_batch = batch_size * num_replicas
        if num_samples < global_batch:
            raise ValueError(
                f"{num_samples} training examples cannot fill one global batch of "
                f"batch_size={batch_size} x world_size={num_replicas} = {global_batch}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self._epoch = 0  # epoch of the next iter()
        self._skip = 0  # batches to skip in that epoch

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.num_replicas)

    @property
    def epoch(self) -> int:
        """The epoch the next iterator drawn from yields."""
        return self._epoch

    def resume(self, consumed: int) -> None:
        """Continue after ``consumed`` batches (counted from the start of training, per rank)."""
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        self.seek(*divmod(consumed, len(self)))

    def seek(self, epoch: int, skip: int = 0) -> None:
        """Make the next iterator drawn from yield epoch ``epoch`` from its batch ``skip`` on.

        For epochs the trainer cuts short (``limit_train_batches``), where the
        position is not ``divmod(consumed, len(self))``.  ``skip = len(self)``: the
        next iterator drawn from is empty and the one after yields epoch ``epoch + 1``.
        """
        if epoch < 0 or not 0 <= skip <= len(self):
            raise ValueError(f"cannot seek to epoch {epoch}, batch {skip} (epochs have {len(self)} batches)")
        self._epoch, self._skip = int(epoch), int(skip)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (deterministic in ``seed``, ``epoch``, rank)."""
        if self.shuffle:
            perm = torch.randperm(self.num_samples, generator=_epoch_generator(self.seed, epoch)).tolist()
        else:
            perm = list(range(self.num_samples))
        B, G = self.batch_size, self.batch_size * self.num_replicas
        return [perm[t * G + self.rank * B : t * G + (self.rank + 1) * B] for t in range(len(self))]

    def __iter__(self) -> Iterator[list[int]]:
        # The epoch advances on the first ``next()``, not on ``iter()``: a multi-worker DataLoader
        # iterator calls ``iter()`` twice when it starts (``_BaseDataLoaderIter.__init__`` and
        # ``_reset``) and discards the first iterator unused, which would skip an epoch.
        def batches() -> Iterator[list[int]]:
            epoch, skip = self._epoch, self._skip
            self._epoch, self._skip = epoch + 1, 0
            yield from self.epoch_batches(epoch)[skip:]

        return batches()

    def state_dict(self) -> dict[str, int]:
        """What the batch order depends on (checked on resume)."""
        return {"num_samples": self.num_samples, "batch_size": self.batch_size,
                "seed": int(self.seed), "num_replicas": self.num_replicas}


def consumed_batches(global_step: int, batches_per_epoch: int, accumulate_grad_batches: int = 1) -> int:
    """Batches consumed after ``global_step`` optimizer steps.

    An epoch of ``L`` batches takes ``ceil(L / accumulate)`` steps (the trainer
    steps on a partial accumulation at the end of an epoch).  Exact for
    checkpoints written at optimizer-step boundaries.
    """
    if global_step < 0 or batches_per_epoch < 1 or accumulate_grad_batches < 1:
        raise ValueError(f"consumed_batches needs global_step >= 0, batches_per_epoch >= 1 and "
                         f"accumulate_grad_batches >= 1; got {global_step}, {batches_per_epoch}, "
                         f"{accumulate_grad_batches}")
    steps_per_epoch = math.ceil(batches_per_epoch / accumulate_grad_batches)
    epochs, rem = divmod(global_step, steps_per_epoch)
    return epochs * batches_per_epoch + min(rem * accumulate_grad_batches, batches_per_epoch)
