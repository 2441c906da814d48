"""Matryoshka Multi-Vector Retrieval (MMR) loss, Eq. 4-7.

For every group ``g = (r_q, r_c)`` the InfoNCE loss of Eq. 6 scores query ``u``
against all in-batch candidates ``c`` (which may be gathered from every rank;
``labels[u]`` indexes u's positive) plus only u's own hard negative, with
``S = s^(g) / tau`` (Eq. 5); a query without a hard negative
(``hard_neg_mask[u]`` False) has no such term.  Eq. 7 sums the groups with
weights ``w_g``.

Optional, beyond the paper: ``candidate_keys`` (content keys of the in-batch
candidates) drops from u's denominator every *other* copy of u's positive.  A
batch that holds the same candidate twice (a class label shared by two
classification queries) otherwise makes it its own negative: Eq. 6 then stays near ``log 2`` for u
however well the model ranks.

The query x candidate token similarities are computed once, at the largest
group, and every group's scores are prefix slices of that one tensor.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .groups import DEFAULT_GROUPS, Budget, group_key, validate_groups

__all__ = ["MMRLossOutput", "mmr_loss"]


@dataclass
class MMRLossOutput:
    """Result of :func:`mmr_loss`.

    ``loss``: Eq. 7, ``sum_g w_g L^(g)``.  ``per_group``: unweighted ``L^(g)`` by
    group key (``"group_2x4"``), still attached to the graph.  ``logits``: the
    last group's ``S`` rows, detached, ``[B, N_c]`` plus a last column for the
    hard negative when one is given (``-inf`` where ``hard_neg_mask`` is False;
    for accuracy logging).
    """

    loss: Tensor
    per_group: dict[str, Tensor]
    logits: Tensor | None = None


_DESCRIPTIONS = {"q": "query embeddings", "c": "candidate embeddings", "hard_neg": "hard-negative embeddings"}


def _check_embeddings(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} ({_DESCRIPTIONS[name]}) must be 3-D [n, R, D], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} ({_DESCRIPTIONS[name]}) must be floating point, got {t.dtype}")


def _check_finite(t: Tensor, name: str) -> None:
    """Raise ``ValueError("NaN in query embeddings (row 3)")`` on the first bad row."""
    with torch.no_grad():
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            return
        nan = torch.isnan(t)
        kind, mask = ("NaN", nan) if bool(nan.any()) else ("Inf", bad)
        row = int(mask.flatten(1).any(dim=1).nonzero()[0, 0])
    raise ValueError(f"{kind} in {_DESCRIPTIONS[name]} (row {row})")


def _check_weights(weights: Sequence[float] | None, groups: list[Budget]) -> list[float]:
    if weights is None:
        return [1.0] * len(groups)
    if isinstance(weights, Tensor):
        weights = weights.detach().cpu().tolist()
    weights = list(weights)
    if len(weights) != len(groups):
        raise ValueError(f"weights has {len(weights)} entries for {len(groups)} groups {groups}")
    out = []
    for g, w in zip(groups, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights must be finite numbers >= 0; got {w!r} for group {g}")
        out.append(float(w))
    return out


def _check_labels(labels: Tensor | Sequence[int] | None, B: int, N_c: int, device: torch.device) -> Tensor:
    if labels is None:
        if N_c < B:
            raise ValueError(
                f"labels=None means c[:B] are the positives, but c has N_c={N_c} rows for B={B} queries; "
                "pass labels"
            )
        return torch.arange(B, device=device)
    labels = torch.as_tensor(labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if tuple(labels.shape) != (B,):
        raise ValueError(f"labels must have shape ({B},) (one per query), got {tuple(labels.shape)}")
    bad = (labels < 0) | (labels >= N_c)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must index rows of c, i.e. lie in [0, N_c={N_c}); got {int(labels[pos])} at position {pos}"
        )
    return labels.to(device=device, dtype=torch.long)


def _check_keys(keys: Tensor | Sequence[int] | None, N_c: int, device: torch.device) -> Tensor | None:
    if keys is None:
        return None
    keys = torch.as_tensor(keys)
    if keys.dtype == torch.bool or keys.is_floating_point() or keys.is_complex():
        raise TypeError(f"candidate_keys must be integers, got dtype {keys.dtype}")
    if tuple(keys.shape) != (N_c,):
        raise ValueError(f"candidate_keys must have shape ({N_c},) (one per row of c), got {tuple(keys.shape)}")
    return keys.to(device=device, dtype=torch.long)


def _group_scores(sim: Tensor, r_q: int, r_c: int) -> Tensor:
    """Eq. 4 from precomputed token similarities ``[..., R_q', (N,) R_c']`` by prefix slicing."""
    # sim: [b, r_qG, N_c, r_cG] or [b, r_qG, r_cG]; r_q on dim 1, r_c on the last dim
    return sim[:, :r_q, ..., :r_c].amax(dim=-1).sum(dim=1)  # [b, N_c] or [b]


def _duplicate_mask(keys: Tensor, labels: Tensor) -> Tensor:
    """``[b, N_c]``: True where candidate ``j`` has the key of query u's positive but is not it."""
    N_c = keys.shape[0]
    same = keys[None, :] == keys[labels][:, None]  # [b, N_c]
    return same & (torch.arange(N_c, device=keys.device)[None, :] != labels[:, None])


def _chunk_terms(
    q: Tensor, c: Tensor, hard_neg: Tensor | None, labels: Tensor, groups: tuple[Budget, ...], tau: float,
    hard_neg_mask: Tensor | None = None, candidate_keys: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-group summed cross-entropy ``[G]`` and last-group logits for a block of queries."""
    b, _, D = q.shape
    N_c = c.shape[0]
    r_qG, r_cG = groups[-1]
    qg = q[:, :r_qG]  # [b, r_qG, D]
    cg = c[:, :r_cG]  # [N_c, r_cG, D]
    sim = (qg.reshape(-1, D) @ cg.reshape(-1, D).T).view(b, r_qG, N_c, r_cG)  # [b, r_qG, N_c, r_cG]
    hsim = None
    if hard_neg is not None:
        # each query against its OWN hard negative only
        hsim = torch.einsum("bid,bjd->bij", qg, hard_neg[:, :r_cG])  # [b, r_qG, r_cG]
    dup = _duplicate_mask(candidate_keys, labels) if candidate_keys is not None else None  # [b, N_c]
    terms = []
    logits = sim.new_empty(0)
    for r_q, r_c in groups:
        logits = _group_scores(sim, r_q, r_c) / tau  # [b, N_c]  S^(g), Eq. 5
        if dup is not None:  # other copies of u's positive are not negatives
            logits = logits.masked_fill(dup, float("-inf"))
        if hsim is not None:
            hn = _group_scores(hsim, r_q, r_c) / tau  # [b]
            if hard_neg_mask is not None:  # no hard negative: exp(-inf) = 0 removes the term from Eq. 6
                hn = hn.masked_fill(~hard_neg_mask, float("-inf"))
            logits = torch.cat([logits, hn[:, None]], dim=1)  # [b, N_c + 1]
        terms.append(F.cross_entropy(logits, labels, reduction="sum"))  # Eq. 6, summed over u
    return torch.stack(terms), logits


def mmr_loss(
    q: Tensor,
    c: Tensor,
    hard_neg: Tensor | None = None,
    groups: Sequence[Sequence[int]] = DEFAULT_GROUPS,
    tau: float = 0.03,
    weights: Sequence[float] | None = None,
    labels: Tensor | Sequence[int] | None = None,
    *,
    hard_neg_mask: Tensor | Sequence[bool] | None = None,
    candidate_keys: Tensor | Sequence[int] | None = None,
    query_chunk_size: int | None = None,
    check_finite: bool = True,
) -> MMRLossOutput:
    """MMR loss, Eq. 7: ``sum_g w_g L_NCE^(g)`` with ``L_NCE^(g)`` from Eq. 6.

    ``q [B, R_q, D]`` queries; ``c [N_c, R_c, D]`` in-batch candidates (possibly
    gathered from all ranks); ``hard_neg [B, R_c, D]`` one hard negative per
    query (optional); ``labels [B]`` index of each query's positive in ``c``
    (default ``arange(B)``).  ``weights`` are the ``w_g`` (default 1).
    ``hard_neg_mask [B]`` (bool, optional): False for queries that have no hard
    negative (their ``hard_neg`` row is ignored: neither checked nor differentiated
    through); default: all have one.
    ``candidate_keys [N_c]`` (integers, optional): content keys of ``c``; a
    candidate with the key of query u's positive, other than that positive, is
    left out of u's denominator (see the module docstring; default: every
    candidate is a negative, as in Eq. 6).  Its logit is ``-inf`` in ``logits``.
    Computed in (at least) fp32 with autocast disabled.  ``query_chunk_size``
    bounds memory by processing queries in blocks with activation
    checkpointing; value and gradients are unchanged.
    """
    _check_embeddings(q, "q")
    _check_embeddings(c, "c")
    B, R_q, D = q.shape
    N_c, R_c, D_c = c.shape
    if B == 0:
        raise ValueError("q is empty (B=0); the loss needs at least one query")
    if N_c == 0:
        raise ValueError("c is empty (N_c=0); the loss needs at least one candidate")
    if D_c != D:
        raise ValueError(f"embedding dims differ: q has D={D}, c has D={D_c}")
    if c.device != q.device:
        raise ValueError(f"q is on {q.device} but c is on {c.device}")
    if hard_neg is not None:
        _check_embeddings(hard_neg, "hard_neg")
        if tuple(hard_neg.shape) != (B, R_c, D):
            raise ValueError(
                f"hard_neg must have shape (B, R_c, D)={(B, R_c, D)} (one per query, like c), "
                f"got {tuple(hard_neg.shape)}"
            )
        if hard_neg.device != q.device:
            raise ValueError(f"q is on {q.device} but hard_neg is on {hard_neg.device}")
    if hard_neg_mask is not None:
        if hard_neg is None:
            raise ValueError("hard_neg_mask needs hard_neg")
        hard_neg_mask = torch.as_tensor(hard_neg_mask, device=q.device)
        if hard_neg_mask.dtype != torch.bool or tuple(hard_neg_mask.shape) != (B,):
            raise ValueError(f"hard_neg_mask must be a bool tensor of shape ({B},), got "
                             f"{hard_neg_mask.dtype} {tuple(hard_neg_mask.shape)}")
        # rows without a hard negative are placeholders: zero them so that whatever they hold (NaN,
        # garbage) reaches neither the finite check nor the einsum (0 * NaN = NaN gradients)
        hard_neg = torch.where(hard_neg_mask[:, None, None], hard_neg, hard_neg.new_zeros(()))  # [B, R_c, D]
    groups_v = tuple(validate_groups(groups, R_q=R_q, R_c=R_c))
    w = _check_weights(weights, list(groups_v))
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    tau = float(tau)
    labels_t = _check_labels(labels, B, N_c, q.device)
    keys_t = _check_keys(candidate_keys, N_c, q.device)
    if query_chunk_size is not None and (
        isinstance(query_chunk_size, bool) or not isinstance(query_chunk_size, int) or query_chunk_size < 1
    ):
        raise ValueError(f"query_chunk_size must be a positive int or None, got {query_chunk_size!r}")
    if check_finite:
        _check_finite(q, "q")
        _check_finite(c, "c")
        if hard_neg is not None:
            _check_finite(hard_neg, "hard_neg")

    dt = torch.promote_types(torch.float32, torch.promote_types(q.dtype, c.dtype))
    if hard_neg is not None:
        dt = torch.promote_types(dt, hard_neg.dtype)
    no_autocast = (
        torch.autocast(device_type=q.device.type, enabled=False)
        if q.device.type in ("cpu", "cuda")
        else contextlib.nullcontext()
    )
    with no_autocast:
        qf, cf = q.to(dt), c.to(dt)
        hf = hard_neg.to(dt) if hard_neg is not None else None
        step = B if query_chunk_size is None else query_chunk_size
        if step >= B:
            sums, logits = _chunk_terms(qf, cf, hf, labels_t, groups_v, tau, hard_neg_mask, keys_t)
        else:
            sums, pieces = None, []
            for a in range(0, B, step):
                hb = hf[a : a + step] if hf is not None else None
                mb = hard_neg_mask[a : a + step] if hard_neg_mask is not None else None
                s, lg = checkpoint(
                    _chunk_terms, qf[a : a + step], cf, hb, labels_t[a : a + step], groups_v, tau, mb, keys_t,
                    use_reentrant=False,
                )
                sums = s if sums is None else sums + s
                pieces.append(lg.detach())
            logits = torch.cat(pieces, dim=0)
        per_group_t = sums / B  # [G]  L_NCE^(g), Eq. 6
        loss = (per_group_t * torch.tensor(w, dtype=dt, device=q.device)).sum()  # Eq. 7
    per_group = {group_key(g): per_group_t[i] for i, g in enumerate(groups_v)}
    return MMRLossOutput(loss=loss, per_group=per_group, logits=logits.detach())
