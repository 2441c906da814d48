"""Modality-gap probes on synthetic vectors with known answers."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
import torch
from metaembed.probes import (
    centroid_gap,
    default_budgets,
    gap_report,
    linear_separability,
    mean_cross_cosine,
    mean_pairwise_cosine,
    project_2d,
    relative_modality_gap,
    side_gap_report,
)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sphere(n: int, d: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def test_identical_distributions_have_no_gap():
    a, b = sphere(400, 16, 0), sphere(400, 16, 1)
    assert centroid_gap(a, b) < 0.15  # ~ sqrt(2/n) sampling noise
    assert relative_modality_gap(a, b) < 0.15
    assert abs(linear_separability(a, b) - 0.5) < 0.1
    assert abs(mean_pairwise_cosine(a)) < 0.02  # isotropic: no cone


def test_shifted_clusters_gap_equals_shift_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8))
    shift = np.array([3.0, -4.0, 0, 0, 0, 0, 0, 0])
    # Without renormalisation the centroid gap is exactly the shift norm.
    assert centroid_gap(x, x + shift, normalize=False) == pytest.approx(5.0)
    # relative gap: same spread s on both sides -> ||shift|| / s
    s = math.sqrt(np.mean(np.sum((x - x.mean(0)) ** 2, 1)))
    assert relative_modality_gap(x, x + shift, normalize=False) == pytest.approx(5.0 / s)
    assert linear_separability(x, x + shift, normalize=False) > 0.97


def test_tight_clusters_on_the_sphere():
    rng = np.random.default_rng(0)
    e1, e2 = np.eye(32)[0], np.eye(32)[1]
    a = unit(e1 + 0.01 * rng.standard_normal((100, 32)))
    b = unit(e2 + 0.01 * rng.standard_normal((80, 32)))
    assert centroid_gap(a, b) == pytest.approx(math.sqrt(2), abs=0.01)
    assert relative_modality_gap(a, b) > 10
    assert linear_separability(a, b) == pytest.approx(1.0)
    assert mean_pairwise_cosine(a) == pytest.approx(1.0, abs=0.01)  # strong cone
    assert mean_cross_cosine(a, b) == pytest.approx(0.0, abs=0.01)


def test_mean_pairwise_cosine_excludes_diagonal():
    x = unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    sims = x @ x.T
    expected = (sims.sum() - np.trace(sims)) / 6
    assert mean_pairwise_cosine(x) == pytest.approx(expected)
    # renormalisation: scaling a row does not change cosine similarities
    assert mean_pairwise_cosine(x * np.array([[2.0], [1.0], [5.0]])) == pytest.approx(expected)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(x[:1])


def test_degenerate_relative_gap_and_errors():
    a = np.tile(np.eye(4)[0], (5, 1))
    assert relative_modality_gap(a, a) == 0.0
    assert relative_modality_gap(a, np.tile(np.eye(4)[1], (5, 1))) == math.inf
    with pytest.raises(ValueError, match="dimensions"):
        centroid_gap(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="2-D"):
        centroid_gap(np.ones((3, 4, 2)), np.ones((3, 4)))


def test_separability_balanced_for_unequal_sizes_and_deterministic():
    a, b = sphere(300, 16, 0), sphere(60, 16, 1)
    acc = linear_separability(a, b, seed=3)
    assert abs(acc - 0.5) < 0.12  # balanced accuracy: chance is 0.5, not 300/360
    assert acc == linear_separability(a, b, seed=3)


def _multivector(n: int, R: int, D: int, offset: np.ndarray | None, seed: int) -> torch.Tensor:
    """n items with R vectors; token r of every item is shifted by offset * r (later tokens more separated)."""
    x = np.random.default_rng(seed).standard_normal((n, R, D))
    if offset is not None:
        x = x + offset[None, None, :] * np.arange(R)[None, :, None]
    return torch.from_numpy(unit(x)).float()


def test_gap_report_schema_and_per_token_trend():
    D, R = 16, 8
    offset = np.zeros(D)
    offset[0] = 1.0
    img = _multivector(60, R, D, offset, 0)
    txt = _multivector(50, R, D, -offset, 1)
    df = gap_report(img, txt, cv=3)
    assert list(df.columns) == ["level", "token", "r_a", "r_b", "budget", "probe", "value"]
    assert set(df["level"]) == {"token", "budget"}
    tok = df[(df.level == "token") & (df.probe == "centroid_gap")].sort_values("token")
    assert tok["token"].tolist() == list(range(R))
    assert tok["value"].iloc[0] < 0.4 and tok["value"].iloc[-1] > 1.5  # token 0 has no shift
    assert tok["value"].is_monotonic_increasing
    bud = df[df.level == "budget"]
    assert bud["budget"].unique().tolist() == ["(1,1)", "(2,2)", "(4,4)", "(8,8)"]
    assert set(df.probe) == {"centroid_gap", "relative_gap", "separability", "mean_cos_image", "mean_cos_text",
                             "mean_cos_cross"}
    # budget (1,1) is token 0 itself
    b1 = bud[(bud.budget == "(1,1)")].set_index("probe")["value"]
    t0 = df[(df.level == "token") & (df.token == 0)].set_index("probe")["value"]
    pd.testing.assert_series_equal(b1, t0, check_names=False)
    assert df.attrs["n_a"] == 60 and df.attrs["n_b"] == 50


def test_gap_report_budget_is_renormalised_prefix_mean():
    img = _multivector(20, 4, 8, None, 0)
    txt = _multivector(20, 4, 8, None, 1)
    df = gap_report(img, txt, budgets=[3], tokens=False, separability=False)
    assert set(df.level) == {"budget"} and df.budget.unique().tolist() == ["(3,3)"]
    m = lambda x: unit(x[:, :3].numpy().astype(np.float64).mean(1))
    got = df.set_index("probe").loc["centroid_gap", "value"]
    assert got == pytest.approx(np.linalg.norm(m(img).mean(0) - m(txt).mean(0)))
    with pytest.raises(ValueError, match="does not fit"):
        gap_report(img, txt, budgets=[(5, 1)])


def test_side_gap_report_uses_paper_groups():
    q = _multivector(30, 16, 8, None, 0)
    c = _multivector(30, 64, 8, None, 1)
    df = side_gap_report(q, c, separability=False)
    assert df[df.level == "budget"].budget.unique().tolist() == ["(1,1)", "(2,4)", "(4,8)", "(8,16)", "(16,64)"]
    assert df[df.level == "token"].token.max() == 15
    assert {"mean_cos_query", "mean_cos_candidate"} <= set(df.probe)
    assert default_budgets(4, 8) == [(1, 1), (2, 4), (4, 8)]
    assert default_budgets(3, 5) == [(1, 1), (2, 4), (3, 5)]
    assert default_budgets(6) == [(1, 1), (2, 2), (4, 4), (6, 6)]


def test_single_vector_inputs_are_one_token():
    df = gap_report(sphere(10, 8, 0), sphere(10, 8, 1), separability=False)
    assert df[df.level == "budget"].budget.tolist()[0] == "(1,1)"
    assert df[df.level == "token"].token.unique().tolist() == [0]


def test_project_2d_pca():
    a = unit(np.eye(16)[0] + 0.05 * np.random.default_rng(0).standard_normal((30, 16)))
    b = unit(np.eye(16)[1] + 0.05 * np.random.default_rng(1).standard_normal((20, 16)))
    df = project_2d(np.concatenate([a, b]), ["image"] * 30 + ["text"] * 20)
    assert list(df.columns) == ["x", "y", "label"] and len(df) == 50
    assert df.attrs["method"] == "pca" and df.attrs["explained_variance_ratio"][0] > 0.8
    # first component separates the two clusters
    assert (df[df.label == "image"].x.mean() > 0) != (df[df.label == "text"].x.mean() > 0)
    with pytest.raises(ValueError, match="labels"):
        project_2d(a, ["x"])
    with pytest.raises(ValueError, match="method"):
        project_2d(a, ["x"] * 30, method="tsne")


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn is installed")
def test_project_2d_umap_missing_is_a_clear_error():
    with pytest.raises(ImportError, match="umap-learn"):
        project_2d(sphere(10, 4, 0), ["a"] * 10, method="umap")


def test_float64_tensors_keep_their_precision():
    a = np.random.default_rng(0).standard_normal((6, 5)) * 1e-3 + np.eye(5)[0]
    b = a + 1e-9  # a gap far below fp32 resolution at this scale
    assert centroid_gap(torch.from_numpy(a), torch.from_numpy(b)) == centroid_gap(a, b)


def test_vectors_without_direction_are_rejected():
    x = sphere(6, 4, 0)
    zeroed = x.copy()
    zeroed[3] = 0.0
    with pytest.raises(ValueError, match=r"1 zero or non-finite vector.*index \(3,\)"):
        mean_pairwise_cosine(zeroed)
    with pytest.raises(ValueError, match="zero or non-finite"):
        centroid_gap(x, np.where(np.arange(6)[:, None] == 0, np.nan, x))
    multi = np.stack([x, x], 1)  # [6, 2, 4]
    multi[2, 1] = 0.0
    with pytest.raises(ValueError, match=r"index \(2, 1\)"):
        gap_report(multi, np.stack([x, x], 1))
    with pytest.raises(ValueError, match="at least one item, vector"):
        gap_report(np.zeros((6, 0, 4)), np.zeros((6, 0, 4)))


@pytest.mark.parametrize("bad", ["24", ("2", "4"), (2.9, 3.7), (True, 1), (1, 2, 3)])
def test_budgets_must_be_ints(bad):
    x = np.stack([sphere(6, 4, s) for s in range(4)], 1)  # [6, 4, 4]
    with pytest.raises(ValueError, match="must be an int r or a pair of ints"):
        gap_report(x, x, budgets=[bad])
    assert not gap_report(x, x, budgets=[np.array([2, 4]), 3]).empty


@pytest.mark.parametrize("cv", [1, 0, 2.9, True, "5"])
def test_separability_rejects_bad_fold_counts(cv):
    a, b = sphere(20, 8, 0), sphere(20, 8, 1)
    with pytest.raises(ValueError, match="cv must be an int >= 2"):
        linear_separability(a, b, cv=cv)


def _correlated_cone(n: int, label: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors in a cone around e0 whose classes differ along e1 - e2 only (a shared nuisance along e1 + e2)."""
    rng = np.random.default_rng(seed)
    e = np.eye(16)
    nuisance = rng.standard_normal((n, 1))
    x = e[0] + spread * (nuisance * (e[1] + e[2]) + 0.3 * label * e[1] + 0.02 * rng.standard_normal((n, 16)))
    return unit(x)


@pytest.mark.parametrize("spread", [0.1, 0.001])
def test_separability_does_not_depend_on_the_cone_spread(spread):
    """Two linearly separable sets score ~1 however tight the cone (the tiny models' near-collapsed embeddings)."""
    a, b = _correlated_cone(100, +1, spread, 0), _correlated_cone(100, -1, spread, 1)
    assert linear_separability(a, b) > 0.95  # was 0.65 / 0.62: C=1 on raw features ~ a class-mean-difference rule


def test_separability_of_unequal_sets_in_a_tight_cone():
    """With unequal set sizes the classifier must not fall back to always predicting the larger set."""
    rng = np.random.default_rng(0)
    e = np.eye(32)
    a = unit(e[0] + 0.01 * rng.standard_normal((200, 32)) + 0.03 * e[1])
    b = unit(e[0] + 0.01 * rng.standard_normal((40, 32)) - 0.03 * e[1])  # 6 sigma apart along e1
    assert linear_separability(a, b) > 0.95  # was 0.5


def test_unnormalised_probes_reject_non_finite_values():
    """normalize=False skips renormalisation, not validation: NaN / inf is an error, not a NaN gap."""
    a = np.array([[np.nan, 1.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.eye(2)[[0, 1, 0]]
    for probe in (centroid_gap, relative_modality_gap):
        with pytest.raises(ValueError, match=r"a has non-finite values \(first at index \(0, 0\)\)"):
            probe(a, b, normalize=False)
    with pytest.raises(ValueError, match="non-finite"):
        centroid_gap(b, np.where(a == 1.0, np.inf, b), normalize=False)
    with pytest.raises(ValueError, match="non-finite"):
        linear_separability(a, b, cv=2, normalize=False)
    assert centroid_gap(np.zeros((2, 2)), b[:2], normalize=False) == pytest.approx(math.sqrt(0.5))  # zeros are fine


def test_budget_mean_without_direction_is_a_clear_error():
    """An item whose first r vectors cancel has no budget vector: the error names the side and the budget."""
    x = np.stack([sphere(6, 4, 0), sphere(6, 4, 1)], 1)  # [6, 2, 4]
    x[4, 1] = -x[4, 0]
    with pytest.raises(ValueError, match=r"image \(mean of the first 2 vectors of each item\).*index \(4,\)"):
        gap_report(x, np.stack([sphere(6, 4, 2), sphere(6, 4, 3)], 1), budgets=[2], tokens=False)


def test_separability_of_identical_sets_is_chance():
    """A vector in both sets: its copy in the training folds gave the held-out row's other label away,
    and two identical sets scored 0.26 (far below chance) instead of 0.5."""
    x = sphere(50, 8, 0)
    assert linear_separability(x, x) == pytest.approx(0.5, abs=1e-12)
    assert linear_separability(np.ones((10, 4)), np.ones((10, 4))) == 0.5  # one vector in both sets
    a, b = _rows_sorted(sphere(30, 8, 1)), _rows_sorted(sphere(30, 8, 2))  # the probe's own row order
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"))
    old = cross_val_score(clf, np.concatenate([a, b]), np.repeat([0, 1], 30), scoring="balanced_accuracy",
                          cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()
    assert linear_separability(a, b) == pytest.approx(old, abs=1e-12)  # no shared vector: split as before
    with pytest.raises(ValueError, match="single distinct vector"):
        linear_separability(np.repeat(x[:1], 5, 0), x[:5])


def test_separability_holds_copies_within_a_set_out_together():
    """Copies within one set (one text encoded several times, a repeated class label) leaked their label through
    the training folds when the sets shared no vector: 20 vectors repeated 5 times against 100 of the same
    distribution scored 0.77, and one vector shared with the other set dropped that to 0.455."""
    pool = sphere(200, 32, 0)
    a, b = np.repeat(pool[:20], 5, axis=0), pool[20:120]  # one distribution
    score = linear_separability(a, b)
    assert score < 0.6  # 0.545; chance is 0.5
    b_shared = b.copy()
    b_shared[0] = a[0]
    assert abs(linear_separability(a, b_shared) - score) < 0.1
    # copies of one vector the other set lacks: one group, which grouped folds cannot hold out; plain folds (a point
    # against a cloud), as before (a review of this change found it raising instead)
    assert linear_separability(np.repeat(pool[:1], 20, 0), pool[100:120]) > 0.9


def test_grouped_separability_does_not_depend_on_the_scikit_learn_version(monkeypatch):
    """Before scikit-learn 1.8, StratifiedGroupKFold(shuffle=True) shuffled the groups' class counts but not
    the groups' ids, so its folds were not stratified: sets sharing vectors scored 0.676 with the declared
    minimum scikit-learn 1.3 and 0.672 with 1.9.  That splitter is emulated here (it gives scikit-learn
    1.3.0's folds exactly); the score must not change."""
    import sklearn.model_selection as ms
    from sklearn.utils import check_random_state

    class PreOneEightSplitter(ms.StratifiedGroupKFold):
        def _iter_test_indices(self, X, y, groups):
            ids = np.unique(groups, return_inverse=True)[1].reshape(-1)
            if not self.shuffle:
                yield from super()._iter_test_indices(X, y, groups)
                return
            rename = np.argsort(check_random_state(self.random_state).permutation(ids.max() + 1))
            for test in ms.StratifiedGroupKFold(self.n_splits)._iter_test_indices(X, y, rename[ids]):
                chosen = set(rename[ids][test].tolist())  # the right counts, applied to the unshuffled ids
                yield [i for i, g in enumerate(ids) if g in chosen]

    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 16))
    b = np.concatenate([a[:10], rng.normal(size=(40, 16)) + 0.3])  # 10 shared vectors: grouped folds
    now = linear_separability(a, b, seed=1)
    monkeypatch.setattr(ms, "StratifiedGroupKFold", PreOneEightSplitter)
    assert linear_separability(a, b, seed=1) == now


def test_half_precision_tensors_and_mismatched_or_empty_inputs():
    """bfloat16 / float16 encoder outputs are read (NumPy has no bfloat16); a dimension mismatch in either
    order and an empty set are clear errors, not a broadcasting message or a NaN mean."""
    a, b = sphere(20, 8, 0), sphere(20, 8, 1)
    for dtype in (torch.bfloat16, torch.float16):
        ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
        want = centroid_gap(ta.double().numpy(), tb.double().numpy())
        assert centroid_gap(ta, tb) == want
    for x, y in ((np.ones((3, 4)), np.ones((3, 5))), (np.ones((3, 5)), np.ones((3, 4)))):
        with pytest.raises(ValueError, match="embedding dimensions differ"):
            centroid_gap(x, y)
    with pytest.raises(ValueError, match="b is empty"):
        centroid_gap(a, np.zeros((0, 8)))


def test_separability_of_paired_sets_holds_each_item_out_whole():
    """Paired near-copies (an image and its caption, one item as query and as candidate) leak like shared
    vectors: b[i]'s copy of a[i] in the training folds, with the other label, pulls a[i] to the wrong side.
    Two indistinguishable sets of near-copies scored 0.25 (below chance), and paired sets with a real gap
    0.42 where unpaired ones score 0.6; with ``groups`` naming the items every pair stays in one fold.  (The
    noise had sphere()'s seed, so ``near`` was ``x`` rescaled: copies, which the probe now recognises.)"""
    rng = np.random.default_rng(10)
    x = sphere(50, 8, 0)
    near = x + 1e-4 * rng.standard_normal(x.shape)
    items = (np.arange(50), np.arange(50))
    assert linear_separability(x, near) < 0.35  # the leak, without item ids (0.31; chance is 0.5)
    assert abs(linear_separability(x, near, groups=items) - 0.5) < 0.05
    assert linear_separability(x, near, groups=([f"s{i}" for i in range(50)], [f"s{i}" for i in range(50)])) == \
        linear_separability(x, near, groups=items)  # ids are labels: ints or strings
    # shared vectors still merge across items: b holds a's vectors in reverse, each under another item id
    assert linear_separability(x, x[::-1], groups=items) == pytest.approx(0.5, abs=1e-12)
    # gap_report passes the ids on, to the token and the budget rows
    multi = np.stack([x, sphere(50, 8, 1)], 1)  # [50, 2, 8]
    near_multi = unit(multi + 1e-4 * rng.standard_normal(multi.shape))
    rep = gap_report(multi, near_multi, groups=items, cv=3)
    sep = rep[rep.probe == "separability"]["value"]
    assert len(sep) == 4 and (abs(sep - 0.5) < 0.1).all()
    side = side_gap_report(multi, near_multi, budgets=[(1, 1)], groups=items, tokens=False, cv=3)
    assert abs(side.set_index("probe").loc["separability", "value"] - 0.5) < 0.1


@pytest.mark.parametrize("groups, message", [
    ((np.arange(5), np.arange(6)), r"groups for b must have shape \(5,\)"),
    (np.arange(10), "groups must be a pair"),
    ((np.arange(5.0), np.arange(5.0)), "int or str item ids"),
    ((np.zeros(5, int), np.zeros(5, int)), "single distinct vector or item"),
])
def test_separability_groups_are_checked(groups, message):
    a, b = sphere(5, 4, 0), sphere(5, 4, 1)
    with pytest.raises(ValueError, match=message):
        linear_separability(a, b, groups=groups)
    with pytest.raises(ValueError, match=message):
        gap_report(a, b, groups=groups, cv=2)


def test_grouped_folds_fit_the_set_with_fewer_distinct_vectors():
    """Grouped folds are lowered to the distinct vectors (items) of *each* set: b, 3 distinct vectors repeated 4
    times, gets 3 folds at cv=5 as at cv=3 (5 folds would leave test folds without b); a b that repeats one vector a
    also holds is refused with the clear message (not scikit-learn's one-class error)."""
    a = sphere(20, 8, 0)
    b = np.repeat(unit(sphere(3, 8, 1) + 1.0), 4, axis=0)
    assert linear_separability(a, b, cv=5) == linear_separability(a, b, cv=3)
    with pytest.raises(ValueError, match="single distinct vector"):
        linear_separability(a, np.repeat(a[:1], 4, axis=0))


def test_reports_check_groups_even_without_the_separability_probe():
    """Malformed ``groups`` are an error before any probe runs, also when the probe that uses them is off."""
    a, b = sphere(5, 4, 0), sphere(5, 4, 1)
    for report in (gap_report, side_gap_report):
        with pytest.raises(ValueError, match=r"groups for b must have shape \(5,\)"):
            report(a, b, separability=False, groups=(np.arange(5), np.arange(6)))


def test_relative_gap_pools_both_spreads_and_cosines_use_directions():
    """relative gap = gap / sqrt((s_a² + s_b²) / 2) with each set's own spread; the cosine probes renormalise
    their inputs even when normalize=False skips it for the gaps."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 6))
    b = 3.0 * rng.standard_normal((100, 6)) + 1.0  # three times the spread of a
    spread = lambda x: math.sqrt(np.mean(np.sum((x - x.mean(0)) ** 2, 1)))
    gap = np.linalg.norm(a.mean(0) - b.mean(0))
    want = gap / math.sqrt((spread(a) ** 2 + spread(b) ** 2) / 2)
    assert relative_modality_gap(a, b, normalize=False) == pytest.approx(want)
    assert relative_modality_gap(b, a, normalize=False) == pytest.approx(want)
    x, y = sphere(30, 6, 1), sphere(20, 6, 2)
    scale = rng.uniform(0.5, 4.0, (30, 1))
    assert mean_pairwise_cosine(x * scale, normalize=False) == pytest.approx(mean_pairwise_cosine(x))
    assert mean_cross_cosine(x * scale, 3 * y) == pytest.approx(float(np.mean(x @ y.T)))


def test_separability_weights_classes_and_fits_the_folds_to_the_smaller_set():
    """Balanced class weights: without them a 10:1 overlap scores 0.64 (the minority set is mostly
    predicted as the majority) instead of 0.82.  cv is lowered to the smaller set's size, whichever it is."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 4))
    b = rng.standard_normal((30, 4)) + np.array([1.5, 0, 0, 0])
    assert linear_separability(a, b, normalize=False) > 0.75
    assert linear_separability(a, b[:3], normalize=False) == linear_separability(a, b[:3], cv=3, normalize=False)
    assert linear_separability(b[:3], a, normalize=False) == linear_separability(b[:3], a, cv=3, normalize=False)
    with pytest.raises(ValueError, match="at least 2 vectors per set"):
        linear_separability(a, b[:1], normalize=False)


def _rows_sorted(x):
    """``x``'s rows in the order linear_separability puts them in before drawing folds (lexicographic)."""
    return x[np.lexsort(x.T[::-1])]


def test_separability_depends_on_the_sets_not_their_order():
    """The folds were drawn over the rows in the order given: the same two 32-vector sets with the same seed
    scored 0.70-0.80 as their rows were permuted (0.62-0.75 with item groups), at the notebook's probe size
    (a review helper).  Rows are now put in a fixed order first."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(32, 16)) + 0.3, rng.normal(size=(32, 16))
    ids = np.arange(32)
    plain, grouped = set(), set()
    for t in range(5):
        p = rng.permutation(32) if t else np.arange(32)
        plain.add(linear_separability(a[p], b[p], seed=0))
        grouped.add(linear_separability(a[p], b[p], seed=0, groups=(ids[p], ids[p])))
        assert linear_separability(a[p], b[p], seed=0, groups=(ids[p], ids[::-1][p])) == \
            linear_separability(a, b, seed=0, groups=(ids, ids[::-1]))  # ids travel with their rows
    assert len(plain) == 1 and len(grouped) == 1


def _sklearn_scores(a, b, splitter, groups=None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"))
    X, y = np.concatenate([a, b]), np.repeat([0, 1], [len(a), len(b)])
    return cross_val_score(clf, X, y, groups=groups, cv=splitter, scoring="balanced_accuracy").mean()


def test_separability_folds_follow_the_seed():
    """The seed shuffles the folds in both branches: the grouped one is scikit-learn >= 1.8's
    StratifiedGroupKFold(shuffle=True, random_state=seed) (see the version test above)."""
    import sklearn
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    rng = np.random.default_rng(0)
    a, b = _rows_sorted(rng.normal(size=(40, 6))), _rows_sorted(rng.normal(size=(24, 6)) + 0.4)  # the probe's order
    scores = {s: linear_separability(a, b, seed=s, normalize=False) for s in (0, 1, 2)}
    assert len(set(scores.values())) > 1
    assert scores[2] == pytest.approx(_sklearn_scores(a, b, StratifiedKFold(5, shuffle=True, random_state=2)))
    shared = _rows_sorted(np.concatenate([a[:8], b]))  # 8 vectors in both sets: grouped folds
    grouped = {s: linear_separability(a, shared, seed=s, normalize=False) for s in (0, 1, 2)}
    assert len(set(grouped.values())) > 1
    if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8):
        ids = np.unique(np.concatenate([a, shared]), axis=0, return_inverse=True)[1].reshape(-1)
        want = _sklearn_scores(a, shared, StratifiedGroupKFold(5, shuffle=True, random_state=2), ids)
        assert grouped[2] == pytest.approx(want, abs=1e-12)


def test_default_budgets_fit_both_sides():
    """Unequal R on the two sides: the paper's groups that fit both, never an (r, r) beyond the smaller side."""
    assert default_budgets(4, 4) == [(1, 1), (2, 4), (4, 4)]  # (4, 8) needs 8 vectors on side b
    img, txt = _multivector(12, 4, 8, None, 0), _multivector(12, 2, 8, None, 1)
    rep = gap_report(img, txt, separability=False)
    assert rep[rep.level == "budget"].budget.unique().tolist() == ["(1,1)", "(4,2)"]
    q, c = _multivector(12, 8, 8, None, 0), _multivector(12, 8, 8, None, 1)  # R_q = R_c: still the paper's groups
    side = side_gap_report(q, c, separability=False, tokens=False)
    assert side.budget.unique().tolist() == ["(1,1)", "(2,4)", "(4,8)", "(8,8)"]
    for bad in (0, (1, 0), (1, 3)):
        with pytest.raises(ValueError, match="does not fit"):
            gap_report(img, txt, budgets=[bad], separability=False)


def test_reports_pass_the_seed_and_folds_to_the_separability_probe():
    rng = np.random.default_rng(0)
    img = unit(rng.normal(size=(30, 2, 6)) + 0.3)
    txt = unit(rng.normal(size=(24, 2, 6)))
    for report in (gap_report, side_gap_report):
        rep = report(img, txt, budgets=[(1, 1)], seed=3, cv=4)
        got = rep[(rep.level == "token") & (rep.probe == "separability")].set_index("token")["value"]
        for r in (0, 1):
            assert got[r] == linear_separability(img[:, r], txt[:, r], seed=3, cv=4)
        assert got[0] != linear_separability(img[:, 0], txt[:, 0], seed=0, cv=4)  # the seed matters here


def test_a_single_item_has_no_cone_probe():
    """One image item: gaps and the cross cosine are defined, its mean pairwise cosine is not (no row)."""
    rep = gap_report(sphere(1, 8, 0), sphere(5, 8, 1), separability=False)
    assert set(rep.probe) == {"centroid_gap", "relative_gap", "mean_cos_text", "mean_cos_cross"}
    rep = gap_report(sphere(5, 8, 0), sphere(1, 8, 1), separability=False)
    assert set(rep.probe) == {"centroid_gap", "relative_gap", "mean_cos_image", "mean_cos_cross"}


def test_report_values_are_the_probe_functions_on_the_renormalised_prefix_means():
    """Every budget / token row of side_gap_report is the named probe of the renormalised prefix means
    of the unit vectors (``[n, R, D] -> [n, D]``) at that row's own (r_q, r_c): no probe swapped, no set used twice."""
    rng = np.random.default_rng(3)
    Q, C = rng.standard_normal((12, 2, 6)), rng.standard_normal((9, 4, 6)) + 0.3

    def prefix(x, r):
        return unit(unit(x)[:, :r].mean(1))

    rep = side_gap_report(Q, C, budgets=[(1, 2), (2, 4)], separability=False)
    for (r_q, r_c), part in rep[rep["level"] == "budget"].groupby(["r_a", "r_b"]):
        q, c = prefix(Q, r_q), prefix(C, r_c)
        want = {"centroid_gap": centroid_gap(q, c), "relative_gap": relative_modality_gap(q, c),
                "mean_cos_query": mean_pairwise_cosine(q), "mean_cos_candidate": mean_pairwise_cosine(c),
                "mean_cos_cross": mean_cross_cosine(q, c)}
        got = dict(zip(part["probe"], part["value"]))
        assert got.keys() == want.keys()
        for probe, value in want.items():
            assert got[probe] == pytest.approx(value, abs=1e-9), (r_q, r_c, probe)
    token = rep[(rep["level"] == "token") & (rep["token"] == 1)]
    got = dict(zip(token["probe"], token["value"]))
    assert got["mean_cos_cross"] == pytest.approx(mean_cross_cosine(unit(Q)[:, 1], unit(C)[:, 1]), abs=1e-9)


def test_project_2d_is_pca_of_the_given_rows():
    """normalize=False projects the rows as given (first and second principal components as x, y); the method
    name is case-insensitive."""
    from sklearn.decomposition import PCA

    X = np.random.default_rng(4).standard_normal((25, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1]) + 2.0
    df = project_2d(X, ["v"] * 25, method="PCA", normalize=False)
    xy = PCA(n_components=2, random_state=0).fit_transform(X)
    np.testing.assert_allclose(df[["x", "y"]].to_numpy(), xy, atol=1e-9)
    assert df.attrs["method"] == "pca"


def test_separability_treats_rescaled_copies_as_copies():
    """A set and its rescaled (or raw vs normalised) self are the same unit vectors: exact equality missed the
    copies that renormalising leaves one rounding step apart, and their leak across folds scored 0.13-0.23
    instead of 0.5 (a review helper; gap_report's budget rows did the same)."""
    from metaembed.probes import linear_separability

    X = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    for other in (X * (1 + 1e-7), 3 * X, X / 7):
        assert linear_separability(X, other) == 0.5
    normalised = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert linear_separability(X, normalised) == 0.5


def test_separability_of_one_vector_against_others_is_the_same_with_groups():
    """Copies of one vector the other set lacks get plain folds; with ``groups`` naming each vector (what the
    modality report passes) the copies merged into one group and grouped folds raised (a review helper)."""
    from metaembed.probes import linear_separability

    rng = np.random.default_rng(1)
    one, other = np.repeat(rng.normal(size=(1, 16)), 6, axis=0), rng.normal(size=(6, 16))
    assert linear_separability(one, other, groups=(range(6), range(6, 12))) == linear_separability(one, other)
