"""The MMR training step (Eq. 5-7) as a LightningModule.

Per batch: encode queries (role ``"query"``, ``q [B, R_q, D]``), positives and
hard negatives (role ``"candidate"``, ``[B, R_c, D]``); gather the positives of
every rank as in-batch candidates (:mod:`.distributed`); MMR loss over the
active groups.  Logs ``train/loss``, ``train/group_{r_q}x{r_c}`` and ``val/loss``.
Validation gathers the candidates like training does, so ``val/loss`` (early
stopping, ``best-*.ckpt``) is the mean of Eq. 7's per-query terms over every
held-out query, the same for ``W`` processes x batch ``B`` as for 1 x ``W*B``.

Optimisation: AdamW over the trainable parameters (Meta Tokens included; no
weight decay on 1-D parameters), linear warmup then constant or cosine decay.
With ``TrainConfig.grad_cache_chunk_size`` the step uses gradient caching
(:mod:`.grad_cache`) under manual optimisation; accumulation and clipping are
then done here with the same semantics as Lightning's.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import LossConfig, TrainConfig, check_lr_schedule
from ..groups import group_key
from ..losses import MMRLossOutput, _check_finite, mmr_loss
from .datamodule import PLACEHOLDER_ROWS
from .distributed import dist_info, failing_ranks, gather_candidates, gather_keys
from .grad_cache import grad_cache_backward
from .rng import get_rng_state, seed_rank_stream, set_rng_state

__all__ = ["MetaEmbedLightningModule", "WarmupSchedule"]

_RNG_KEY = "metaembed_rng_states"
_MID_ACCUMULATION_KEY = "metaembed_mid_accumulation"
_LOSS_WINDOW_KEY = "metaembed_train_loss_window"  # train/ metrics of the optimizer step in progress
_THREADS_KEY = "metaembed_torch_threads"  # CPU kernels split their sums by thread: another count, other last bits


class WarmupSchedule:
    """LR multiplier: linear warmup over ``warmup_steps``, then constant or cosine to 0 at ``total_steps``."""

    def __init__(self, warmup_steps: int = 0, total_steps: int | None = None, kind: str = "constant") -> None:
        check_lr_schedule(kind, total_steps, warmup_steps)
        self.warmup_steps, self.total_steps, self.kind = warmup_steps, total_steps, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))  # type: ignore[operator]
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def _schedule_shape(state: dict[str, Any]) -> dict[str, Any]:
    """A :class:`WarmupSchedule`'s state without what does not change its multipliers: a constant schedule's
    ``total_steps`` (a resume with a larger ``train.max_steps`` warned of "another LR schedule" for it)."""
    return {k: v for k, v in state.items() if not (k == "total_steps" and state.get("kind") == "constant")}


def _is_chunked(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _check_finite_on_every_rank(q: Tensor, c: Tensor, hard_neg: Tensor | None) -> None:
    """Raise on every rank when any rank's embeddings hold NaN / Inf (a collective: call it on every rank).

    :func:`~metaembed.losses.mmr_loss` checks its inputs, but a query that is NaN on one rank only
    would stop that rank while the others wait in the gradient all-reduce (with NCCL, until the
    process-group timeout).  The rank holding it raises the loss's message naming the row.
    """
    named = {"q": q, "c": c} if hard_neg is None else {"q": q, "c": c, "hard_neg": hard_neg}
    with torch.no_grad():
        ok = all(bool(torch.isfinite(t).all()) for t in named.values())
    bad = failing_ranks(ok, q.device)
    if not bad:
        return
    if dist_info()[0] in bad:
        for name, t in named.items():
            _check_finite(t, name)
    raise ValueError(f"NaN or Inf embeddings on rank(s) {bad} (see that rank's error for the row): every rank "
                     "stops here")


class MetaEmbedLightningModule(L.LightningModule):
    """Trains any model with ``forward(batch, role) -> [B, R, D]`` on the MMR loss."""

    def __init__(self, model: nn.Module, loss_cfg: LossConfig, train_cfg: TrainConfig) -> None:
        super().__init__()
        train_cfg.validate()  # chunk size, schedule, ...: fail here, not at the first step
        loss_cfg.validate()  # tau, w_g: all-zero active weights would train on a loss that is 0 (Eq. 7)
        self.model = model
        self.loss_cfg = loss_cfg
        self.train_cfg = train_cfg
        self.groups = loss_cfg.active_groups()
        self.weights = loss_cfg.active_weights()
        self.automatic_optimization = train_cfg.grad_cache_chunk_size is None
        self._rng_to_restore: dict[str, Any] | None = None
        self._rng_own = False  # the checkpoint holds this rank's own RNG state
        self._rng_pending = False  # the first training batch of this fit has not started yet
        self._saved_schedule: list[Any] | None = None  # the checkpoint's WarmupSchedule settings, on resume
        self._mid_accumulation = False  # GradCache: the last batch accumulated gradients without an optimizer step
        self._loss_window: dict[str, tuple[Any, int]] = {}  # train/ metric -> (sum, batches) of this step so far
        # weight decay is decided by each parameter's shape *now*: under FSDP (use_orig_params) the
        # optimizer is built after wrapping, when every parameter is a 1-D view of this rank's shard
        self._ndim_at_init = {name: p.ndim for name, p in model.named_parameters()}

    # ------------------------------------------------------------------ encoding and loss
    def encode_batch(self, batch: Any, role: str) -> Tensor:
        """``model(batch, role)``; a list of collated chunks is encoded chunk-wise and concatenated."""
        if _is_chunked(batch):
            return torch.cat([self.encode_unit(chunk, role) for chunk in batch])  # [B, R, D]
        return self.encode_unit(batch, role)  # [B, R, D]

    def encode_unit(self, unit: Any, role: str) -> Tensor:
        """``model(unit, role)`` for one collated unit, without the placeholder-image rows a
        :class:`~.datamodule.TripletCollator` appended to it (Appendix A). # [B, R, D]

        Those rows stay in the graph with weight 0: the vision tower they ran through takes part in the
        backward (zero gradients) as DDP without ``find_unused_parameters`` needs, and the items' rows are
        exactly what they are without placeholders.
        """
        n = int(unit.get(PLACEHOLDER_ROWS, 0)) if isinstance(unit, Mapping) else 0
        if n == 0:
            return self.model(unit, role)  # [B, R, D]
        E = self.model({k: v for k, v in unit.items() if k != PLACEHOLDER_ROWS}, role)  # [B + n, R, D]
        return E[:-n] + 0.0 * E[-n:].sum()  # [B, R, D]

    def _uses_negatives(self, batch: Mapping[str, Any]) -> bool:
        return self.loss_cfg.use_hard_negatives and batch.get("negative") is not None

    def compute_loss(self, q: Tensor, c: Tensor, hard_neg: Tensor | None, gather: bool,
                     negative_mask: Tensor | None = None, positive_key: Tensor | None = None,
                     valid: Tensor | None = None) -> MMRLossOutput:
        """MMR loss of local queries ``q [B, R_q, D]`` against ``c [B, R_c, D]`` (gathered over ranks if ``gather``).

        ``hard_neg`` is ``[B, R_c, D]``, or with ``negative_mask [B]`` the ``[N_h, R_c, D]``
        hard negatives of the queries where the mask is True (in order).  ``positive_key [B]``
        (with ``loss.mask_duplicate_candidates``): content keys of ``c``, gathered like it.
        ``valid [B]`` (bool, validation): False marks a padding row (a copy that evens out the
        ranks' shards), left out both as a query and as an in-batch candidate of every rank.
        With no valid local query the loss is 0 (and ``logits`` has 0 rows).
        """
        if dist_info()[1] > 1:
            _check_finite_on_every_rank(q, c, hard_neg)
        c_all, labels = gather_candidates(c, enabled=gather)  # [W*B, R_c, D], [B]
        keys = None
        if self.loss_cfg.mask_duplicate_candidates:
            if positive_key is None:
                raise ValueError("loss.mask_duplicate_candidates needs batch['positive_key'] (TripletCollator("
                                 "candidate_keys=True) / MetaEmbedDataModule(candidate_keys=True))")
            keys = gather_keys(positive_key.to(device=q.device, dtype=torch.long), enabled=gather)  # [W*B]
        if hard_neg is not None and negative_mask is not None:
            negative_mask = negative_mask.to(device=q.device, dtype=torch.bool)
            rows = negative_mask.nonzero().flatten()  # [N_h]
            hard_neg = hard_neg.new_zeros(q.shape[0], *hard_neg.shape[1:]).index_copy(0, rows, hard_neg)  # [B, R_c, D]
        else:
            negative_mask = None
        if valid is not None:
            valid = valid.to(device=q.device, dtype=torch.bool)  # [B]
            valid_all = gather_keys(valid.long(), enabled=gather).bool()  # [W*B], like c_all
            if not bool(valid_all.all()):
                row = valid_all.cumsum(0) - 1  # row of each kept candidate in c_all[valid_all]
                labels = row[labels[valid]]  # [B']
                c_all = c_all[valid_all]  # [N', R_c, D]
                keys = keys[valid_all] if keys is not None else None
                q = q[valid]  # [B', R_q, D]
                hard_neg = hard_neg[valid] if hard_neg is not None else None
                negative_mask = negative_mask[valid] if negative_mask is not None else None
                if q.shape[0] == 0:  # this rank's rows are all padding: no term of the mean
                    zero = q.sum().float() * 0.0
                    return MMRLossOutput(loss=zero, per_group={group_key(g): zero for g in self.groups},
                                         logits=q.new_zeros(0, c_all.shape[0]))
        return mmr_loss(q, c_all, hard_neg, groups=self.groups, tau=self.loss_cfg.tau,
                        weights=self.weights, labels=labels, hard_neg_mask=negative_mask, candidate_keys=keys,
                        query_chunk_size=self.loss_cfg.query_chunk_size)

    def batch_loss(self, batch: Mapping[str, Any], gather: bool = True) -> MMRLossOutput:
        """Encode a batch with a graph and return its MMR loss (the plain path).

        Under multi-process FSDP every rank runs the negatives' forward when any rank has
        hard negatives (see :meth:`_stand_in_negatives`).
        """
        _check_batch(batch)
        q = self.encode_batch(batch["query"], "query")  # [B, R_q, D]
        c = self.encode_batch(batch["positive"], "candidate")  # [B, R_c, D]
        mask = batch.get("negative_mask")
        stand_in = self._stand_in_negatives(batch)  # a collective under multi-process FSDP: on every rank
        if self._uses_negatives(batch):
            n = self.encode_batch(batch["negative"], "candidate")  # [N_h, R_c, D]
        elif stand_in:
            # no row of this rank's batch has a hard negative: a forward whose rows the all-False mask keeps out
            # of Eq. 6 (zero value, zero gradient), so that this rank runs the forwards of the others
            n = self.encode_batch(batch["positive"], "candidate")[:0]  # [0, R_c, D]
            mask = torch.zeros(q.shape[0], dtype=torch.bool)  # [B]
        else:
            n = None
        return self.compute_loss(q, c, n, gather=gather, negative_mask=mask, positive_key=batch.get("positive_key"),
                                 valid=batch.get("valid"))

    def _stand_in_negatives(self, batch: Mapping[str, Any]) -> bool:
        """Whether this rank, whose batch has no hard negative, must still run a negatives' forward.

        Under FSDP each forward all-gathers the sharded parameters, so every rank must run the same
        forwards (as for the placeholder images of Appendix A): a rank whose batch holds no hard negative
        while another's does would leave the others waiting in their negatives' forward.  A collective
        on every rank under multi-process FSDP (whatever its batch), ``False`` elsewhere.
        """
        if not self.loss_cfg.use_hard_negatives or not self._multi_process_fsdp():
            return False
        has = torch.tensor([float(self._uses_negatives(batch))], device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        return bool(has.item()) and not self._uses_negatives(batch)

    def _check_same_chunks(self, inputs: Sequence[tuple[str, str, list[Any]]]) -> None:
        """RuntimeError on every rank, instead of a hang, when GradCache would run unequal forwards under FSDP.

        Each chunk's forward all-gathers the sharded parameters, so every rank must encode as many query,
        positive and negative chunks as the others; hard negatives held by some rows only (original
        MMEB-train) give ranks different negative chunk counts.  A collective on every rank under
        multi-process FSDP, nothing elsewhere.
        """
        if not self._multi_process_fsdp():
            return
        counts = dict.fromkeys(("query", "positive", "negative"), 0)
        counts.update({name: len(chunks) for name, _, chunks in inputs})
        lo = torch.tensor(list(counts.values()), dtype=torch.float64, device=self.device)
        hi = lo.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            spread = {k: (int(a), int(b)) for k, a, b in zip(counts, lo.tolist(), hi.tolist()) if a != b}
            raise RuntimeError(
                f"GradCache under FSDP: the ranks would encode different numbers of chunks {spread} (min, max), "
                "and every chunk's forward all-gathers the parameters: the run would hang.  Hard negatives on "
                "some rows only cause this: use data with a negative on every row (data.negatives=list, the MoCa "
                "release), loss.use_hard_negatives=false, or no GradCache (train.grad_cache_chunk_size=null)")

    def _multi_process_fsdp(self) -> bool:
        return dist_info()[1] > 1 and fsdp_root(getattr(getattr(self._trainer, "strategy", None), "model", None)) \
            is not None

    def grad_cache_loss(
        self,
        batch: Mapping[str, Any],
        backward: Callable[[Tensor], None] = Tensor.backward,
        no_sync: Callable[[], AbstractContextManager] | None = None,
        scale: float = 1.0,
        gather: bool = True,
    ) -> MMRLossOutput:
        """GradCache path: accumulates parameter gradients of ``scale * loss``; returns the (detached) loss."""
        _check_batch(batch)
        inputs = [("query", "query", _as_chunks(batch["query"])),
                  ("positive", "candidate", _as_chunks(batch["positive"]))]
        if self._uses_negatives(batch):
            inputs.append(("negative", "candidate", _as_chunks(batch["negative"])))
        self._check_same_chunks(inputs)
        kwargs = {} if no_sync is None else {"no_sync": no_sync}
        return grad_cache_backward(
            self.encode_unit, inputs,
            lambda r: self.compute_loss(r["query"], r["positive"], r.get("negative"), gather=gather,
                                        negative_mask=batch.get("negative_mask"),
                                        positive_key=batch.get("positive_key"), valid=batch.get("valid")),
            backward=backward, scale=scale, **kwargs,
        )

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self) -> None:
        self._rng_pending = True
        self.model.train()  # backbones may be built in eval mode; Lightning keeps module modes as found
        self._set_uniform_forwards(self._multi_process_fsdp())

    def on_fit_end(self) -> None:
        self._set_uniform_forwards(False)

    def _set_uniform_forwards(self, on: bool) -> None:
        """Under multi-process FSDP every rank must run the same model passes per forward
        (:attr:`~metaembed.backbones.base.BackboneAdapter.uniform_forwards`)."""
        backbone = getattr(self.model, "backbone", None)
        if hasattr(backbone, "uniform_forwards"):
            backbone.uniform_forwards = on

    @property
    def _gather(self) -> bool:
        return self.train_cfg.gather_across_ranks

    def _log_loss(self, stage: str, out: MMRLossOutput) -> None:
        batch_size = int(out.logits.shape[0]) if out.logits is not None else 1  # B local queries
        if stage == "val":
            self._log_val_loss(out.loss.detach(), batch_size)
            return
        self._log_train(out, batch_size)

    def _log_train(self, out: MMRLossOutput, batch_size: int) -> None:
        """``train/loss`` and the per-group terms of Eq. 7, logged once per optimizer step: the mean over the
        step's ``accumulate_grad_batches`` batches and over the ranks (equal B each), i.e. the loss whose
        gradient the step applies.  (Lightning writes only an automatic step's last batch; GradCache's manual
        optimisation wrote a row for every batch.)  The window is saved in checkpoints, so a run resumed between
        two batches of a step logs what the uninterrupted run logs."""
        keys = ["loss", *out.per_group]
        values = torch.stack([out.loss.detach().float(), *(v.detach().float() for v in out.per_group.values())])
        if dist_info()[1] > 1:  # every rank holds the same window: the checkpoint (rank 0's) is the run's
            dist.all_reduce(values)
            values = values / dist_info()[1]
        for key, value in zip(keys, values.unbind()):  # tensors: no device sync per batch
            total, n = self._loss_window.get(key, (0.0, 0))
            self._loss_window[key] = (total + value, n + 1)
        if not self._step_ends_here():
            return
        for key, (total, n) in self._loss_window.items():
            self.log(f"train/{key}", total / n, batch_size=batch_size, prog_bar=key == "loss", on_step=True,
                     on_epoch=False)
        self._loss_window = {}

    def _step_ends_here(self) -> bool:
        """Whether the optimizer steps after the current training batch (the last of its accumulation window or
        of the epoch), as Lightning decides it."""
        accum = (self.trainer.accumulate_grad_batches if self.automatic_optimization
                 else self.train_cfg.accumulate_grad_batches)
        batch = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this epoch's batches so far
        return batch % accum == 0 or batch == self.trainer.num_training_batches

    def _log_val_loss(self, loss: Tensor, n: int) -> None:
        """``val/loss``: Eq. 7 averaged over this step's valid queries of *every* rank, weighted by their count.

        The sum and count are all-reduced here, so every rank logs the same value with the same batch size:
        Lightning's epoch value is then the mean over all validation queries.  (Left to ``sync_dist``, ranks
        with different query counts would have their summed batch sizes averaged -- as an integer under gloo.)
        """
        total = torch.stack([loss.float() * n, loss.new_tensor(float(n), dtype=torch.float32)])  # [sum, count]
        if dist_info()[1] > 1:
            dist.all_reduce(total)
        count = int(total[1].item())
        self.log("val/loss", total[0] / max(count, 1), batch_size=count, prog_bar=True, sync_dist=True,
                 on_step=False, on_epoch=True)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            out = self.batch_loss(batch, gather=self._gather)
            self._log_loss("train", out)
            return out.loss
        return self._manual_grad_cache_step(batch, batch_idx)

    def _manual_grad_cache_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        opt = self.optimizers()
        accum = self.train_cfg.accumulate_grad_batches
        steps_now = self._step_ends_here()
        block = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)  # DDP no_sync
        if steps_now:
            out = self.grad_cache_loss(batch, self.manual_backward, block, scale=1.0 / accum, gather=self._gather)
        else:
            with block():
                out = self.grad_cache_loss(batch, self.manual_backward, block, scale=1.0 / accum, gather=self._gather)
        self._log_loss("train", out)
        self._mid_accumulation = not steps_now
        if steps_now:
            opt.step()  # clips in on_before_optimizer_step
            opt.zero_grad()
            self.lr_schedulers().step()

    def on_validation_model_zero_grad(self) -> None:
        # Lightning frees the gradients before a validation run unless *it* is accumulating: under GradCache
        # it does not see the module's accumulation, and a validation between two batches of one optimizer
        # step (val_check_interval not a multiple of accumulate_grad_batches) dropped the earlier batches' gradients
        if not self._mid_accumulation:
            super().on_validation_model_zero_grad()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # GradCache (manual optimisation): clip where Lightning clips in the automatic path -- inside the
        # optimizer step, after a 16-mixed GradScaler has unscaled the gradients.  Clipping before opt.step()
        # clipped the *scaled* gradients, to a norm of gradient_clip_val / loss scale.
        if not self.automatic_optimization and self.train_cfg.gradient_clip_val:
            self.configure_gradient_clipping(optimizer, self.train_cfg.gradient_clip_val, "norm")

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except by norm under FSDP: through the root module's ``clip_grad_norm_``.

        Lightning's FSDP precision plugin raises for ``gradient_clip_algorithm='norm'`` (the norm
        must be taken over every rank's shard, which only the FSDP root can do), so every FSDP run
        with ``train.gradient_clip_val`` would stop at its first optimizer step.
        """
        root = fsdp_root(getattr(getattr(self._trainer, "strategy", None), "model", None))
        if root is not None and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            root.clip_grad_norm_(float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        # candidates gathered as in training: each query against the W*B of its global batch (the ranks'
        # validation shards have equal lengths and batch sizes; batch["valid"] marks their padding copies)
        out = self.batch_loss(batch, gather=self._gather)
        self._log_loss("val", out)
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        # biases and norms (1-D when the module was built) get no weight decay
        one_d = [self._ndim_at_init.get(_clean_name(n), p.ndim) < 2 for n, p in named]
        decay = [p for (_, p), flat in zip(named, one_d) if not flat]
        no_decay = [p for (_, p), flat in zip(named, one_d) if flat]
        groups = [{"params": decay, "weight_decay": self.train_cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=self.train_cfg.lr)
        total = self.train_cfg.max_steps if self.train_cfg.max_steps > 0 else None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupSchedule(self.train_cfg.warmup_steps, total, self.train_cfg.lr_schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ exact resume: RNG state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every rank's RNG state (the hook runs on all ranks)."""
        state = get_rng_state()
        _rank, world = dist_info()
        if world > 1:
            states: list[Any] = [None] * world
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint[_RNG_KEY] = states
        checkpoint[_MID_ACCUMULATION_KEY] = self._mid_accumulation
        checkpoint[_LOSS_WINDOW_KEY] = {key: (float(total), n) for key, (total, n) in self._loss_window.items()}
        checkpoint[_THREADS_KEY] = torch.get_num_threads()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._mid_accumulation = bool(checkpoint.get(_MID_ACCUMULATION_KEY, False))
        self._loss_window = dict(checkpoint.get(_LOSS_WINDOW_KEY) or {})
        saved, now = checkpoint.get(_THREADS_KEY), torch.get_num_threads()
        # the strategy's device: Lightning loads the checkpoint before it moves the model to a GPU
        device = getattr(getattr(self._trainer, "strategy", None), "root_device", self.device)
        same_world = len(checkpoint.get(_RNG_KEY) or [None]) == dist_info()[1]  # one RNG state per rank saved
        # (with another world size a resume is not bit-identical anyway: no advice about threads)
        if saved is not None and saved != now and device.type == "cpu" and same_world:
            warnings.warn(f"resuming with {now} torch threads, the checkpoint was written with {saved}: CPU kernels "
                          f"sum in another order, so the run continues exactly only up to the last bits (set "
                          f"OMP_NUM_THREADS={saved} or torch.set_num_threads({saved}) for a bit-identical resume)",
                          stacklevel=2)
        states = checkpoint.get(_RNG_KEY)
        if not states:  # written by another program, or edited: the run goes on, but not as it would have
            warnings.warn(f"the checkpoint holds no RNG states ({_RNG_KEY!r}): the resumed run continues with "
                          "fresh random streams and is not the run the checkpoint came from", stacklevel=2)
        else:
            rank, _ = dist_info()
            self._rng_own = rank < len(states)
            self._rng_to_restore = states[rank] if self._rng_own else states[0]
        # The LR schedule is this run's config (cosine to *its* max_steps): LambdaLR.load_state_dict would
        # overwrite WarmupSchedule's warmup_steps / total_steps / kind with the checkpoint's, so a run resumed
        # with a larger max_steps would train its extra steps at lr 0.  Its position (last_epoch) is restored.
        for sched in checkpoint.get("lr_schedulers") or []:
            if any(fn is not None for fn in sched.get("lr_lambdas") or []):
                self._saved_schedule = sched["lr_lambdas"]
                sched["lr_lambdas"] = [None] * len(sched["lr_lambdas"])

    def on_train_start(self) -> None:
        # After the optimizer and scheduler are restored from a checkpoint: a changed schedule, train.lr or
        # train.weight_decay applies from the resumed step on (Lightning restores the checkpoint's base LRs
        # and param groups, so the configured values were silently ignored).  A fresh run changes nothing.
        saved, self._saved_schedule = self._saved_schedule, None
        configs = self.trainer.lr_scheduler_configs
        if not configs:
            return
        sched = configs[0].scheduler
        step, changed = sched.last_epoch, False
        now = [dict(vars(fn)) for fn in getattr(sched, "lr_lambdas", [])]
        if saved is not None and [_schedule_shape(s) for s in saved] != [_schedule_shape(s) for s in now]:
            warnings.warn(f"resuming with another LR schedule than the checkpoint's ({saved[0]} -> {now[0]}): "
                          f"the configured one applies from step {step} on", stacklevel=2)
            changed = True
        lr = self.train_cfg.lr
        if any(base != lr for base in sched.base_lrs):
            warnings.warn(f"resuming with train.lr={lr} (the checkpoint's: {sched.base_lrs[0]}): it applies from "
                          f"step {step} on", stacklevel=2)
            sched.base_lrs = [lr] * len(sched.base_lrs)
            for group in sched.optimizer.param_groups:
                group["initial_lr"] = lr
            changed = True
        decay = sched.optimizer.param_groups[0]  # the first group decays; the 1-D parameters' group is 0.0
        if decay["weight_decay"] != self.train_cfg.weight_decay:
            warnings.warn(f"resuming with train.weight_decay={self.train_cfg.weight_decay} (the checkpoint's: "
                          f"{decay['weight_decay']}): it applies from step {step} on", stacklevel=2)
            decay["weight_decay"] = self.train_cfg.weight_decay
        if changed:
            for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * fn(step)
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # restore right before the first resumed step: whatever ran in between
        # (dataloader setup, sanity checks) must not shift the RNG streams
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if self._rng_pending:
            self._rng_pending = False
            rank, world = dist_info()
            if world > 1 and rank > 0 and not self._rng_own:
                # seed_everything gave every rank rank 0's stream (the same dropout masks on every rank); a
                # rank a resume adds got rank 0's saved state: each rank above 0 draws from its own stream
                seed_rank_stream(self.train_cfg.seed, rank, self.global_step)
            self._rng_own = False
        if not self.automatic_optimization:
            # Lightning writes a manual-optimisation batch's step metrics even when the batch logged none: the
            # previous step's values again, at this batch's step.  Train metrics are logged at optimizer steps only
            # (_log_train), so a batch inside an accumulation window must find none left to write.
            results = getattr(self.trainer, "_results", None)
            for result in results.values() if results is not None else ():
                meta = result.meta
                if meta.fx == "training_step" and meta.on_step and not meta.on_epoch and not result.has_reset:
                    result.reset()
        if self._mid_accumulation:
            # Lightning's logging step (the x-axis of train/ and val/ metrics, log_every_n_steps) counts every
            # manual-optimisation batch as an optimizer step; with GradCache accumulation it must count the
            # optimizer steps, as in the automatic path: a micro-batch is logged at the step it contributes to
            self._mid_accumulation = False
            self.trainer.fit_loop.epoch_loop._batches_that_stepped -= 1


def _clean_name(name: str) -> str:
    """A parameter name without the prefixes FSDP and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def fsdp_root(model: Any) -> nn.Module | None:
    """``model`` when it is an FSDP-wrapped root (e.g. ``trainer.strategy.model`` after FSDP setup), else None."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed support
        return None
    return model if isinstance(model, FullyShardedDataParallel) else None


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, Mapping) or "query" not in batch or "positive" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a training batch is a dict with 'query', 'positive' and 'negative' (or None); got {got}")


def _as_chunks(x: Any) -> list[Any]:
    return list(x) if _is_chunked(x) else [x]
