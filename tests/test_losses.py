"""MMR loss (metaembed.losses), Eq. 4-7, checked against a per-pair Python loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaembed.groups import DEFAULT_GROUPS, GroupError
from metaembed.losses import MMRLossOutput, mmr_loss
from metaembed.maxsim import pairwise_maxsim


def _emb(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1).requires_grad_()


def naive_mmr(q, c, hard_neg, groups, tau, weights=None, labels=None, keys=None):
    """Eq. 4-7 written with loops over u, v, i, j (no vectorisation, no log-sum-exp).

    ``keys``: candidates other than u's positive with its key are left out of u's denominator.
    """
    B, N_c = q.shape[0], c.shape[0]
    labels = list(range(B)) if labels is None else [int(x) for x in labels]
    weights = [1.0] * len(groups) if weights is None else weights

    def s(qu, cv, r_q, r_c):  # Eq. 4
        total = 0.0
        for i in range(r_q):
            total = total + torch.stack([torch.dot(qu[i], cv[j]) for j in range(r_c)]).max()
        return total

    per_group, final = [], 0.0
    for (r_q, r_c), w in zip(groups, weights):
        L = 0.0
        for u in range(B):
            S = [s(q[u], c[v], r_q, r_c) / tau for v in range(N_c)]  # Eq. 5
            pos = labels[u]
            num = torch.exp(S[pos])
            negatives = [v for v in range(N_c) if v != pos and (keys is None or keys[v] != keys[pos])]
            den = num + sum((torch.exp(S[v]) for v in negatives), torch.zeros((), dtype=q.dtype))
            if hard_neg is not None:
                den = den + torch.exp(s(q[u], hard_neg[u], r_q, r_c) / tau)
            L = L - torch.log(num / den)  # Eq. 6
        L = L / B
        per_group.append(L)
        final = final + w * L  # Eq. 7
    return final, per_group


CASES = {
    # name: (B, N_c extra rows, R_q, R_c, D, groups, use hard_neg, labels offset, weights, query_chunk_size)
    "basic": (3, 0, 4, 6, 5, [(1, 2), (2, 4), (4, 6)], False, False, None, None),
    "basic_hn": (3, 0, 4, 6, 5, [(1, 2), (2, 4), (4, 6)], True, False, None, None),
    "B1_R1": (1, 0, 1, 1, 3, [(1, 1)], False, False, None, None),
    "B1_R1_hn": (1, 0, 1, 1, 3, [(1, 1)], True, False, None, None),
    "B1_extra_cands_hn": (1, 2, 2, 3, 4, [(1, 1), (2, 3)], True, False, None, None),
    "groups_below_R": (2, 0, 4, 8, 3, [(1, 2), (2, 3)], True, False, None, None),
    "rank1_of_2": (3, 3, 3, 4, 4, [(1, 1), (3, 4)], True, True, None, None),
    "rank1_of_2_no_hn": (3, 3, 3, 4, 4, [(1, 2), (2, 4)], False, True, None, None),
    "weights": (3, 0, 2, 4, 3, [(1, 2), (2, 4)], True, False, [0.25, 3.0], None),
    "chunked": (5, 2, 3, 4, 3, [(1, 1), (2, 2), (3, 4)], True, True, [1.0, 0.5, 2.0], 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_naive_loop_value_and_gradients(name):
    B, extra, R_q, R_c, D, groups, use_hn, offset, weights, qcs = CASES[name]
    tau = 0.05
    q = _emb(B, R_q, D, seed=1)
    c = _emb(B + extra, R_c, D, seed=2)  # with offset: rows [0, extra) are "other rank" candidates
    hn = _emb(B, R_c, D, seed=3) if use_hn else None
    labels = torch.arange(B) + extra if offset else (None if extra == 0 else torch.arange(B))
    out = mmr_loss(q, c, hn, groups=groups, tau=tau, weights=weights, labels=labels, query_chunk_size=qcs)
    ref, ref_groups = naive_mmr(q, c, hn, groups, tau, weights, labels)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    for (r_q, r_c), L in zip(groups, ref_groups):
        torch.testing.assert_close(out.per_group[f"group_{r_q}x{r_c}"], L, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (q, c, hn) if t is not None]
    got = torch.autograd.grad(out.loss, inputs, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, allow_unused=True)
    for t, a, b in zip(("q", "c", "hard_neg"), got, want):
        assert (a is None) == (b is None), t
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, t=t: f"grad wrt {t}: {m}")


def test_output_structure_and_logits():
    B, tau = 4, 0.03
    q, c, hn = _emb(B, 16, 8, seed=4), _emb(B, 64, 8, seed=5), _emb(B, 64, 8, seed=6)
    out = mmr_loss(q, c, hn, tau=tau)
    assert isinstance(out, MMRLossOutput)
    assert list(out.per_group) == ["group_1x1", "group_2x4", "group_4x8", "group_8x16", "group_16x64"]
    assert out.loss.dtype == torch.float64 and out.loss.shape == ()
    assert out.logits.shape == (B, B + 1) and not out.logits.requires_grad
    # last group's logits: candidates, then each query's own hard negative
    with torch.no_grad():
        full = torch.einsum("uid,vjd->uvij", q, c).amax(-1).sum(-1) / tau
        torch.testing.assert_close(out.logits[:, :B], full)
        torch.testing.assert_close(out.logits[:, B], pairwise_maxsim(q, hn) / tau)


def test_labels_default_is_arange():
    q, c = _emb(3, 2, 4, seed=7), _emb(5, 4, 4, seed=8)
    a = mmr_loss(q, c, groups=[(1, 2), (2, 4)], labels=None).loss
    b = mmr_loss(q, c, groups=[(1, 2), (2, 4)], labels=torch.arange(3)).loss
    d = mmr_loss(q, c, groups=[(1, 2), (2, 4)], labels=[2, 3, 4]).loss
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, d)


def test_nommr_is_the_last_group_term():
    q, c, hn = _emb(4, 8, 6, seed=9), _emb(4, 16, 6, seed=10), _emb(4, 16, 6, seed=11)
    groups = [(1, 1), (2, 4), (8, 16)]
    full = mmr_loss(q, c, hn, groups=groups)
    nommr = mmr_loss(q, c, hn, groups=groups[-1:])
    torch.testing.assert_close(nommr.loss, full.per_group["group_8x16"])
    assert list(nommr.per_group) == ["group_8x16"]
    torch.testing.assert_close(full.loss, sum(full.per_group.values()))
    assert full.loss > nommr.loss


def test_weights_scale_terms():
    q, c, hn = _emb(3, 4, 5, seed=12), _emb(3, 8, 5, seed=13), _emb(3, 8, 5, seed=14)
    groups = [(1, 2), (2, 4), (4, 8)]
    base = mmr_loss(q, c, hn, groups=groups)
    w = [0.0, 2.0, 0.5]
    out = mmr_loss(q, c, hn, groups=groups, weights=w)
    expected = sum(wg * base.per_group[k] for wg, k in zip(w, base.per_group))
    torch.testing.assert_close(out.loss, expected)
    for k in base.per_group:  # per_group stays unweighted
        torch.testing.assert_close(out.per_group[k], base.per_group[k])
    # a zero weight removes the group's gradient: only group 1 touches nothing beyond token 0
    g = torch.autograd.grad(mmr_loss(q, c, groups=groups, weights=[1.0, 0.0, 0.0]).loss, q)[0]
    assert g[:, 0].abs().sum() > 0 and g[:, 1:].abs().sum() == 0


def test_hard_negative_is_used_and_only_for_its_own_query():
    q, c, hn = _emb(4, 4, 6, seed=15), _emb(4, 8, 6, seed=16), _emb(4, 8, 6, seed=17)
    groups = [(2, 4), (4, 8)]
    without = mmr_loss(q, c, None, groups=groups)
    with_hn = mmr_loss(q, c, hn, groups=groups)
    assert with_hn.loss > without.loss  # an extra positive term in every denominator
    # making query 1's hard negative a copy of its positive raises only row 1's hard-negative logit
    hn2 = hn.detach().clone()
    hn2[1] = c[1].detach()
    out2 = mmr_loss(q, c, hn2, groups=groups)
    changed = (out2.logits != with_hn.logits).any(dim=1)
    assert changed.tolist() == [False, True, False, False]
    torch.testing.assert_close(out2.logits[1, -1], out2.logits[1, 1])
    # gradient wrt hard_neg[v] comes only from query v: other queries' hard negatives are never scored
    qd = q.detach()
    hn_g = hn.detach().clone().requires_grad_()
    loss_q0 = mmr_loss(qd[:1], c.detach(), hn_g[:1], groups=groups, labels=[0]).loss
    full_g = torch.autograd.grad(mmr_loss(qd, c.detach(), hn_g, groups=groups).loss, hn_g)[0]
    g0 = torch.autograd.grad(loss_q0, hn_g)[0]
    torch.testing.assert_close(full_g[0], g0[0] / 4)  # 1/B averaging


@pytest.mark.parametrize("chunk", [None, 2])
def test_hard_neg_mask_drops_only_the_missing_terms(chunk):
    """Queries without a hard negative (mask False) keep Eq. 6 without its last term; the others keep theirs."""
    B, groups = 5, [(1, 2), (2, 4), (4, 8)]
    q, c, hn = _emb(B, 4, 5, seed=40), _emb(B, 8, 5, seed=41), _emb(B, 8, 5, seed=42)
    mask = torch.tensor([True, False, True, False, False])
    out = mmr_loss(q, c, hn, groups=groups, hard_neg_mask=mask, query_chunk_size=chunk)
    # per-query terms are independent given the candidates: sum the B = 1 losses
    ref = sum(mmr_loss(q[u : u + 1], c, hn[u : u + 1] if mask[u] else None, groups=groups, labels=[u]).loss
              for u in range(B)) / B
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.loss, (q, c, hn)), torch.autograd.grad(ref, (q, c, hn))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.isinf(out.logits[~mask, -1]).all() and torch.isfinite(out.logits[mask]).all()
    full = mmr_loss(q, c, hn, groups=groups, hard_neg_mask=torch.ones(B, dtype=torch.bool))
    torch.testing.assert_close(full.loss, mmr_loss(q, c, hn, groups=groups).loss)
    with pytest.raises(ValueError, match="hard_neg_mask"):
        mmr_loss(q, c, None, groups=groups, hard_neg_mask=mask)
    with pytest.raises(ValueError, match="hard_neg_mask"):
        mmr_loss(q, c, hn, groups=groups, hard_neg_mask=mask[:3])


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 1e30])
def test_masked_hard_neg_rows_are_neither_checked_nor_differentiated(chunk, junk):
    """A row whose query has no hard negative (mask False) is a placeholder: its content never matters."""
    B, groups = 4, [(1, 2), (2, 4), (4, 8)]
    q, c, hn = _emb(B, 4, 5, seed=50), _emb(B, 8, 5, seed=51), _emb(B, 8, 5, seed=52)
    mask = torch.tensor([True, False, True, False])
    bad = hn.detach().clone()
    bad[~mask] = junk
    bad.requires_grad_(True)
    ref = mmr_loss(q, c, hn, groups=groups, hard_neg_mask=mask, query_chunk_size=chunk)
    g_ref = torch.autograd.grad(ref.loss, (q, c, hn))
    for check in (True, False):
        out = mmr_loss(q, c, bad, groups=groups, hard_neg_mask=mask, query_chunk_size=chunk, check_finite=check)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
        g = torch.autograd.grad(out.loss, (q, c, bad))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (g[2][~mask] == 0).all()
    bad2 = hn.detach().clone()
    bad2[2] = float("nan")  # a row that IS used is still checked
    with pytest.raises(ValueError, match=r"NaN .*row 2"):
        mmr_loss(q, c, bad2, groups=groups, hard_neg_mask=mask)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_query_chunking_is_exact(chunk):
    q, c, hn = _emb(7, 4, 5, seed=18), _emb(9, 8, 5, seed=19), _emb(7, 8, 5, seed=20)
    labels = torch.tensor([2, 3, 4, 5, 6, 7, 8])
    groups = [(1, 2), (2, 4), (4, 8)]
    ref = mmr_loss(q, c, hn, groups=groups, labels=labels)
    out = mmr_loss(q, c, hn, groups=groups, labels=labels, query_chunk_size=chunk)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logits, ref.logits)
    for a, b in zip(torch.autograd.grad(out.loss, (q, c, hn)), torch.autograd.grad(ref.loss, (q, c, hn))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("hn", [False, True], ids=["no-hn", "hn"])
def test_candidate_keys_drop_other_copies_of_the_positive(chunk, hn):
    """Rows 0/3 and 1/4/5 of c are the same candidate: a query whose positive is one of them does not
    count the others as negatives; the loop reference (naive_mmr) leaves them out of the denominator."""
    q, c, h = _emb(5, 3, 4, seed=30), _emb(7, 4, 4, seed=31), _emb(5, 4, 4, seed=32)
    h = h if hn else None
    labels = torch.tensor([0, 1, 2, 3, 6])
    keys = torch.tensor([10, 11, 12, 10, 11, 11, 13])
    groups = [(1, 1), (2, 2), (3, 4)]
    out = mmr_loss(q, c, h, groups=groups, labels=labels, candidate_keys=keys, query_chunk_size=chunk)
    ref, ref_groups = naive_mmr(q, c, h, groups, 0.03, labels=labels, keys=keys.tolist())
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.stack(list(out.per_group.values())), torch.stack(ref_groups))
    wrt = (q, c) if h is None else (q, c, h)
    for a, b in zip(torch.autograd.grad(out.loss, wrt), torch.autograd.grad(ref, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert out.logits[0, 3] == float("-inf") and out.logits[1, 4] == out.logits[1, 5] == float("-inf")
    assert torch.isfinite(out.logits[2, :7]).all()  # no copy of its positive: every candidate counts
    plain = mmr_loss(q, c, h, groups=groups, labels=labels)
    assert plain.loss > out.loss  # Eq. 6 as written counts the copies as negatives
    distinct = mmr_loss(q, c, h, groups=groups, labels=labels, candidate_keys=torch.arange(7))
    torch.testing.assert_close(distinct.loss, plain.loss, rtol=0, atol=0)


def test_bad_candidate_keys():
    q, c = _emb(2, 1, 3, seed=33), _emb(3, 1, 3, seed=34)
    with pytest.raises(ValueError, match=r"candidate_keys must have shape \(3,\)"):
        mmr_loss(q, c, groups=[(1, 1)], candidate_keys=[1, 2])
    with pytest.raises(TypeError, match="candidate_keys must be integers"):
        mmr_loss(q, c, groups=[(1, 1)], candidate_keys=[1.0, 2.0, 3.0])


def test_single_vector_baseline_is_infonce():
    B, tau = 5, 0.05
    q, c, hn = _emb(B, 1, 8, seed=21), _emb(B, 1, 8, seed=22), _emb(B, 1, 8, seed=23)
    out = mmr_loss(q, c, hn, groups=[(1, 1)], tau=tau)
    logits = torch.cat([q[:, 0] @ c[:, 0].T, (q[:, 0] * hn[:, 0]).sum(-1, keepdim=True)], dim=1) / tau
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.arange(B)))
    with pytest.raises(GroupError, match="exceeds the trained token counts R_q=1, R_c=1"):
        mmr_loss(q, c, groups=DEFAULT_GROUPS)


def test_bf16_inputs_use_fp32_and_ignore_autocast():
    q, c, hn = _emb(4, 4, 16, seed=24), _emb(4, 8, 16, seed=25), _emb(4, 8, 16, seed=26)
    qb, cb, hb = (t.detach().bfloat16().requires_grad_() for t in (q, c, hn))
    groups = [(1, 2), (4, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mmr_loss(qb, cb, hb, groups=groups)
    assert out.loss.dtype == torch.float32
    exact = mmr_loss(qb.detach().double(), cb.detach().double(), hb.detach().double(), groups=groups).loss
    torch.testing.assert_close(out.loss.double(), exact, rtol=1e-5, atol=1e-5)
    gq = torch.autograd.grad(out.loss, qb)[0]
    assert gq.dtype == torch.bfloat16 and gq.abs().sum() > 0


def test_float32_default_groups_run():
    q, c, hn = (t.detach().float() for t in (_emb(6, 16, 32, seed=27), _emb(6, 64, 32, seed=28), _emb(6, 64, 32, seed=29)))
    out = mmr_loss(q, c, hn)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    ref = mmr_loss(q.double(), c.double(), hn.double())
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-4, atol=1e-4)


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture
def qc():
    return _emb(4, 4, 6, seed=30).detach(), _emb(6, 8, 6, seed=31).detach(), _emb(4, 8, 6, seed=32).detach()


@pytest.mark.parametrize(
    "groups, msg",
    [
        ([(2, 4), (2, 8)], r"strictly nested: \(2, 4\) followed by \(2, 8\)"),
        ([(1, 1), (8, 8)], r"last group \(8, 8\) exceeds the trained token counts R_q=4, R_c=8"),
        ([], "at least one"),
        ([(0, 1)], ">= 1"),
    ],
)
def test_bad_groups(qc, groups, msg):
    q, c, hn = qc
    with pytest.raises(GroupError, match=msg):
        mmr_loss(q, c, hn, groups=groups)


@pytest.mark.parametrize(
    "which, value, msg",
    [
        ("q", float("nan"), r"NaN in query embeddings \(row 3\)"),
        ("c", float("inf"), r"Inf in candidate embeddings \(row 3\)"),
        ("hard_neg", float("nan"), r"NaN in hard-negative embeddings \(row 3\)"),
        ("c", -float("inf"), r"Inf in candidate embeddings \(row 3\)"),
    ],
)
def test_non_finite_inputs_raise(qc, which, value, msg):
    t = dict(zip(("q", "c", "hard_neg"), (x.clone() for x in qc)))
    t[which][3, 1, 2] = value
    with pytest.raises(ValueError, match=msg):
        mmr_loss(t["q"], t["c"], t["hard_neg"], groups=[(1, 2), (4, 8)])


@pytest.mark.parametrize(
    "labels, err, msg",
    [
        ([0, 1, 2, 6], ValueError, r"lie in \[0, N_c=6\); got 6 at position 3"),
        ([0, -1, 2, 3], ValueError, r"got -1 at position 1"),
        ([0, 1, 2], ValueError, r"labels must have shape \(4,\)"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "labels must be integers"),
    ],
)
def test_bad_labels(qc, labels, err, msg):
    q, c, hn = qc
    with pytest.raises(err, match=msg):
        mmr_loss(q, c, hn, groups=[(1, 2)], labels=labels)


def test_default_labels_need_enough_candidates(qc):
    q, c, hn = qc
    with pytest.raises(ValueError, match=r"N_c=3 rows for B=4 queries; pass labels"):
        mmr_loss(q, c[:3], hn, groups=[(1, 2)])


def test_bad_arguments(qc):
    q, c, hn = qc
    g = [(1, 2), (4, 8)]
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        mmr_loss(q, c, hn, groups=g, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        mmr_loss(q, c, hn, groups=g, tau=float("nan"))
    with pytest.raises(ValueError, match="weights has 1 entries for 2 groups"):
        mmr_loss(q, c, hn, groups=g, weights=[1.0])
    with pytest.raises(ValueError, match=r"weights must be finite numbers >= 0; got -1.0 for group \(4, 8\)"):
        mmr_loss(q, c, hn, groups=g, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="q has D=6, c has D=5"):
        mmr_loss(q, c[..., :5], groups=g)
    with pytest.raises(ValueError, match=r"hard_neg must have shape \(B, R_c, D\)=\(4, 8, 6\)"):
        mmr_loss(q, c, hn[:3], groups=g)
    with pytest.raises(ValueError, match="hard_neg must have shape"):
        mmr_loss(q, c, c, groups=g)  # hard negatives of every candidate, not one per query
    with pytest.raises(ValueError, match=r"q \(query embeddings\) must be 3-D"):
        mmr_loss(q[0], c, groups=g)
    with pytest.raises(TypeError, match="must be floating point"):
        mmr_loss(q.long(), c, groups=g)
    with pytest.raises(ValueError, match="B=0"):
        mmr_loss(q[:0], c, groups=g)
    with pytest.raises(ValueError, match="query_chunk_size"):
        mmr_loss(q, c, hn, groups=g, query_chunk_size=0)
    with pytest.raises(ValueError, match="q is on cpu but c is on meta"):
        mmr_loss(q, c.to("meta"), groups=g)


def test_hard_negatives_with_fewer_vectors_than_the_candidates_raise(qc):
    """hard_neg must match c's [R_c, D]: a hard negative with fewer vectors was silently scored on its prefix
    (fewer tokens in the MaxSim than every in-batch candidate), a wrong Eq. 6 denominator."""
    q, c, hn = qc
    with pytest.raises(ValueError, match=r"hard_neg must have shape \(B, R_c, D\)"):
        mmr_loss(q, c, hn[:, :-1], groups=[(1, 2), (4, 8)])


def test_a_non_bool_hard_neg_mask_and_the_first_bad_row_are_reported(qc):
    """An int 0/1 mask is refused by name (not a torch error from ``~mask``); a NaN names the first bad row."""
    q, c, hn = qc
    with pytest.raises(ValueError, match="hard_neg_mask must be a bool tensor"):
        mmr_loss(q, c, hn, groups=[(1, 2)], hard_neg_mask=torch.tensor([1, 0, 1, 1]))
    bad = q.detach().clone()
    bad[1, 0, 0] = bad[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in query embeddings \(row 1\)"):
        mmr_loss(bad, c, hn, groups=[(1, 2)])
