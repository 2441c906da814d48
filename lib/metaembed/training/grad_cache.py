"""Gradient caching (GradCache, Gao et al. 2021): large contrastive batches in bounded memory.

The loss of Eq. 6 couples every query with every in-batch candidate, so the
batch cannot simply be split into accumulation steps.  GradCache instead

1. encodes every chunk *without* a graph and caches the embeddings,
2. computes the loss on the cached embeddings (leaf tensors) and backprops
   it to them only (``d loss / d embeddings``, cheap),
3. re-encodes chunk by chunk *with* a graph and backprops the cached
   embedding gradients into the parameters.

The cached embeddings and their gradients are kept in (at least) fp32, so the
gradients of low-precision (fp16) embeddings do not underflow before the
loss scale of mixed precision reaches them in step 3.

Peak activation memory is one chunk per backward instead of the whole batch,
except in the last backward, which holds the last chunk of *every* input
(query, positive, negative: up to three chunks at once; size chunks for that).
Parameter gradients equal the plain path's.  Each chunk's RNG state is
replayed in step 3 so dropout masks match step 1.  ``no_sync`` (DDP) is
entered for every backward but the last, which covers the last chunk of *every* input together
so every role's parameters take part in the synchronised backward.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from .rng import get_rng_state, set_rng_state

__all__ = ["CachedInput", "grad_cache_backward"]

#: ``(name, role, chunks)``: one model input (``"query"``, ``"positive"``, ...) split in collated chunks.
CachedInput = tuple[str, str, Sequence[Any]]


def grad_cache_backward(
    encode: Callable[[Any, str], Tensor],
    inputs: Sequence[CachedInput],
    loss_fn: Callable[[dict[str, Tensor]], Any],
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    scale: float = 1.0,
) -> Any:
    """Run steps 1-3 and return ``loss_fn``'s output (its ``.loss`` detached).

    ``encode(chunk, role) -> [n, R, D]``; ``loss_fn({name: [N, R, D]}) -> out``
    with a scalar ``out.loss``; parameter gradients of ``scale * out.loss`` are
    *accumulated* into ``.grad`` through ``backward`` (e.g. Lightning's
    ``manual_backward``).
    """
    if not inputs:
        raise ValueError("grad_cache_backward needs at least one input")
    for name, _, chunks in inputs:
        if len(chunks) == 0:
            raise ValueError(f"input {name!r} has no chunks")

    # 1. graph-free encoding, remembering each chunk's RNG state
    states: dict[str, list[dict[str, Any]]] = {}
    starts: dict[str, list[int]] = {}
    cached: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, role, chunks in inputs:
            states[name], starts[name], reps, n = [], [], [], 0
            for chunk in chunks:
                states[name].append(get_rng_state())
                reps.append(encode(chunk, role))  # [n_i, R, D]
                starts[name].append(n)
                n += reps[-1].shape[0]
            rep = torch.cat(reps).detach()  # [N, R, D]
            # the cached d loss / d embeddings are held at (at least) fp32: in fp16 (16-mixed) they are
            # *unscaled* (the GradScaler only scales the step-3 backward) and small ones underflow
            if rep.is_floating_point():
                rep = rep.to(torch.promote_types(rep.dtype, torch.float32))
            cached[name] = rep.requires_grad_(True)  # [N, R, D]
    after = get_rng_state()

    # 2. loss on cached embeddings, gradients w.r.t. the embeddings only
    out = loss_fn(cached)
    names = list(cached)
    grads = dict(zip(names, torch.autograd.grad(out.loss * scale, [cached[n] for n in names])))

    # 3. re-encode with a graph and push the cached gradients into the parameters
    def surrogate(name: str, role: str, chunk: Any, i: int) -> Tensor:
        set_rng_state(states[name][i])
        rep = encode(chunk, role)  # [n_i, R, D]
        start = starts[name][i]
        return (rep * grads[name][start : start + rep.shape[0]]).sum()  # d/d rep = cached gradient

    last_terms: list[tuple[str, str, Any, int]] = []
    for name, role, chunks in inputs:
        for i, chunk in enumerate(chunks[:-1]):
            with no_sync():
                backward(surrogate(name, role, chunk, i))
        last_terms.append((name, role, chunks[-1], len(chunks) - 1))
    # one synchronised backward over the last chunk of every input
    backward(torch.stack([surrogate(*t) for t in last_terms]).sum())
    set_rng_state(after)
    out.loss = out.loss.detach()
    if isinstance(getattr(out, "per_group", None), dict):
        out.per_group = {k: v.detach() for k, v in out.per_group.items()}
    return out
