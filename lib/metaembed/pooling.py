"""From last-layer hidden states to the multi-vector embedding ``[B, R, D]``.

* ``meta``: hidden states at the role's Meta Token positions (MetaEmbed, §3.2).
* ``single-last`` / ``single-mean`` / ``split``: the Table 5 baselines
  (last real token; mean over real tokens; real tokens split evenly into ``R``
  segments, each averaged).

All poolings use the attention mask, so they are independent of padding side.
They return the pooled hidden states as they are; :func:`l2_normalize` (which the
model applies next) L2-normalises them in fp32.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_real_tokens(attention_mask: Tensor, pooling: str) -> None:
    """ValueError naming the rows without a real token (all padding): nothing to pool."""
    empty = ~attention_mask.bool().any(1)  # [B]
    if bool(empty.any()):
        raise ValueError(f"{pooling} pooling: rows {torch.nonzero(empty).flatten().tolist()} are all padding "
                         f"(attention_mask all 0)")


def _check_shapes(hidden: Tensor, attention_mask: Tensor, pooling: str, input_ids: Tensor | None = None,
                  R: int | None = None) -> None:
    """ValueError unless ``hidden`` is ``[B, L, D]`` and the mask (and ids) ``[B, L]``, and ``R >= 1``.

    A mask of another batch size or length broadcast silently (one row's mask pooled every row) or
    indexed a longer ``hidden`` at positions that do not belong to the mask.
    """
    if hidden.dim() != 3:
        raise ValueError(f"{pooling} pooling: hidden must be [B, L, D], got shape {tuple(hidden.shape)}")
    for name, t in (("attention_mask", attention_mask), ("input_ids", input_ids)):
        if t is not None and tuple(t.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"{pooling} pooling: {name} has shape {tuple(t.shape)}, hidden {tuple(hidden.shape)}; "
                             f"expected [B, L] = {tuple(hidden.shape[:2])}")
    if R is not None:
        _check_R(R, pooling)


def _check_R(R: int, pooling: str) -> None:
    """ValueError unless ``R`` is an int >= 1 (``R = 0`` pooled an empty ``[B, 0, D]`` embedding)."""
    try:
        ok = not isinstance(R, bool) and operator.index(R) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{pooling} pooling: R must be an int >= 1, got {R!r}")


def _zero_padding(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``hidden`` with padding positions set to 0, whatever they held (even NaN/Inf). # [B, L, D]"""
    return hidden.masked_fill(~attention_mask.bool().unsqueeze(-1), 0)


def pool_meta(hidden: Tensor, input_ids: Tensor, attention_mask: Tensor, first_id: int, R: int) -> Tensor:
    """Hidden states at the ``R`` Meta Token ids ``first_id .. first_id+R-1`` of each row. # [B, R, D]

    Each of the ``R`` ids must occur exactly once among a row's real tokens.
    """
    _check_shapes(hidden, attention_mask, "meta", input_ids, R)
    B, L, D = hidden.shape
    input_ids = input_ids.long()  # int32 ids: scatter_add_ needs int64 indices and sources
    is_role = (input_ids >= first_id) & (input_ids < first_id + R) & attention_mask.bool()  # [B, L]
    counts = is_role.sum(1)
    if bool((counts != R).any()):
        bad = torch.nonzero(counts != R).flatten().tolist()
        raise ValueError(f"rows {bad} do not contain exactly R={R} Meta Tokens (found {counts[bad].tolist()})")
    slot = (input_ids - first_id).masked_fill(~is_role, R)  # [B, L]  Meta Token index r, R elsewhere
    per_id = torch.zeros(B, R + 1, dtype=torch.long, device=input_ids.device).scatter_add_(
        1, slot, torch.ones_like(slot))[:, :R]  # [B, R]  occurrences of each Meta Token id
    if bool((per_id != 1).any()):
        b, r = (int(x) for x in torch.nonzero(per_id != 1)[0])
        raise ValueError(f"row {b} holds Meta Token id {first_id + r} (index {r}) {int(per_id[b, r])} times; "
                         f"each of the R={R} ids must occur exactly once")
    order = input_ids.masked_fill(~is_role, first_id + R)  # sort Meta Tokens by their index
    pos = order.argsort(dim=1, stable=True)[:, :R]  # [B, R]
    return hidden.gather(1, pos.unsqueeze(-1).expand(B, R, D))


def pool_last(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Last real token of each row (``single-last``). # [B, 1, D]"""
    _check_shapes(hidden, attention_mask, "single-last")
    _check_real_tokens(attention_mask, "single-last")
    L = attention_mask.shape[1]
    idx = (attention_mask.long() * torch.arange(1, L + 1, device=attention_mask.device)).argmax(1)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].unsqueeze(1)


def pool_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens (``single-mean``), summed in fp32. # [B, 1, D] in ``hidden.dtype``

    A sum in fp16 overflows to inf for a few thousand tokens of magnitude ~30 (max 65504), and
    bf16 cannot count past 256 exactly; the sum and the count are therefore taken in fp32.
    Padding positions are zeroed, not multiplied by 0: a NaN/Inf there would survive ``* 0``.
    """
    _check_shapes(hidden, attention_mask, "single-mean")
    _check_real_tokens(attention_mask, "single-mean")
    total = _zero_padding(hidden, attention_mask).sum(1, dtype=torch.float32)  # [B, D]
    count = attention_mask.float().sum(1, keepdim=True)  # [B, 1]
    return (total / count).to(hidden.dtype).unsqueeze(1)


def split_weights(attention_mask: Tensor, R: int) -> Tensor:
    """Averaging weights ``[B, R, L]``: real tokens cut into ``R`` contiguous, near-equal segments.

    Segment ``s`` of a row with ``n`` real tokens covers ``[floor(s n / R), max(floor((s+1) n / R), floor(s n / R) + 1))``,
    so every segment has at least one token even when ``n < R``.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"split pooling: attention_mask must be [B, L], got shape {tuple(attention_mask.shape)}")
    _check_R(R, "split")
    _check_real_tokens(attention_mask, "split")
    B, L = attention_mask.shape
    W = torch.zeros(B, R, L, dtype=torch.float32, device=attention_mask.device)
    for b in range(B):
        pos = torch.nonzero(attention_mask[b]).flatten()
        n = len(pos)
        for s in range(R):
            lo = (s * n) // R
            hi = max(((s + 1) * n) // R, lo + 1)
            lo, hi = min(lo, n - 1), min(hi, n)
            W[b, s, pos[lo:hi]] = 1.0 / (hi - lo)
    return W


def pool_split(hidden: Tensor, attention_mask: Tensor, R: int) -> Tensor:
    """``split-(R_q, R_c)`` baseline: mean of each of ``R`` segments. # [B, R, D]"""
    _check_shapes(hidden, attention_mask, "split", R=R)
    W = split_weights(attention_mask, R).to(hidden.dtype)  # [B, R, L], 0 on padding
    return torch.bmm(W, _zero_padding(hidden, attention_mask))  # 0 * NaN would be NaN: padding zeroed first


def l2_normalize(x: Tensor) -> Tensor:
    """L2-normalise the last dimension in fp32 (§3.2)."""
    return F.normalize(x.float(), p=2, dim=-1)
