"""In-batch candidates gathered across ranks, with gradients (Eq. 6 over the global batch).

Each rank encodes its local queries ``q [B, R_q, D]``, positives ``c [B, R_c, D]``
and hard negatives ``[B, R_c, D]``.  The in-batch candidates of Eq. 6 are the
positives of *all* ranks, so every rank scores its queries against
``c_all [W*B, R_c, D]`` and query ``b`` on rank ``k`` has its positive at
``k*B + b``.  Hard negatives stay local: each query only sees its own.

The gather must be differentiable *both ways*: the gradient that rank ``j``'s
loss sends into rank ``k``'s candidates has to reach rank ``k``.
:class:`_GatherWithGrad` sums the gathered gradient over ranks (all-reduce)
and hands each rank its slice, so after DDP averages parameter gradients the
result equals the gradient of the mean loss over the concatenated global batch.
Gathering with plain ``dist.all_gather`` and putting the local tensor back
keeps only the local loss's terms -- the classic multi-GPU contrastive-loss bug.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_with_grad", "dist_info", "failing_ranks", "gather_candidates", "gather_keys"]


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x [B, ...]`` from every rank into ``[W*B, ...]`` (rank order), differentiably.

    Every rank must pass the same shape; a mismatch raises ``ValueError``
    (use equal per-rank batches, e.g. ``drop_last``).
    """
    _rank, world = dist_info()
    if world == 1:
        return x
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            "all_gather_with_grad needs the same tensor shape on every rank, got "
            f"{[tuple(s.tolist()) for s in shapes]}; use equal per-rank batch sizes (drop_last)"
        )
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """``[B, ...] -> [W*B, ...]``; backward: sum the gathered gradient over ranks, keep this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = dist_info()
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss scored these candidates
        start, end = ctx.rows
        return grad[start:end]


def gather_candidates(c: Tensor, enabled: bool = True) -> tuple[Tensor, Tensor]:
    """In-batch candidates of every rank and the labels of this rank's queries.

    ``c [B, R_c, D]`` -> ``(c_all [W*B, R_c, D], labels [B])`` with
    ``labels = arange(B) + rank * B`` (query ``b``'s positive in ``c_all``).
    With ``enabled=False`` (or one process) the batch stays local.
    """
    B = c.shape[0]
    rank, world = dist_info()
    if not enabled or world == 1:
        return c, torch.arange(B, device=c.device)
    return all_gather_with_grad(c), torch.arange(B, device=c.device) + rank * B


def gather_keys(keys: Tensor, enabled: bool = True) -> Tensor:
    """Candidate keys ``[B]`` of every rank, ``[W*B]`` in the order of :func:`gather_candidates` (no gradient)."""
    _rank, world = dist_info()
    if not enabled or world == 1:
        return keys
    parts = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts)


def failing_ranks(ok: bool, device: torch.device | str = "cpu") -> list[int]:
    """The ranks whose ``ok`` is False, the same list on every rank (``[]`` or ``[0]`` in one process).

    A collective: every rank must call it.  An error raised on one rank only leaves the others
    waiting in the next collective (with NCCL, until the process-group timeout); with this every
    rank can raise together.
    """
    rank, world = dist_info()
    if world == 1:
        return [] if ok else [0]
    flags = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(flags, torch.tensor([int(bool(ok))], dtype=torch.long, device=device))
    return [r for r, f in enumerate(flags) if not bool(f.item())]
