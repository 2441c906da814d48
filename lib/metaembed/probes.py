"""Modality-gap probes for Meta Embeddings (Liang et al., 2022, "Mind the Gap").

Liang et al. observe that the image and text embeddings of a contrastively
trained model occupy two separate cones of the unit sphere ("modality gap"),
measure the gap as the distance between the two modality centroids, and relate
it to the "cone effect" (embeddings of one modality have a high mean pairwise
cosine similarity).  This module computes those quantities, plus a linear
separability probe, for every Meta Token index and every retrieval budget of a
MetaEmbed encoder.

Every probe works on **L2-normalised** vectors: inputs are renormalised row by
row (``normalize=True``, the default; this is idempotent for encoder outputs,
which are already unit vectors), so the numbers are comparable across models
and budgets.  Inputs may be NumPy arrays or (CPU or CUDA) torch tensors;
computations run in float64 NumPy.

Probes
------
``centroid_gap(a, b)``
    Liang et al.'s gap ``||mean(a) - mean(b)||`` (their Δ_gap).  In
    ``[0, 2]`` for unit vectors.
``relative_modality_gap(a, b)``
    The centroid gap divided by the pooled within-modality spread (RMS
    distance of a vector to its own modality's centroid).  Not a quantity
    from Liang et al.: it is a Fisher-style signal-to-noise normalisation we
    add so that gaps of encoders whose embeddings are more or less spread out
    can be compared.  ``≈ 0`` for identical distributions, ``≫ 1`` for two
    tight, distinct clusters.  Both gaps are biased upwards on finite samples:
    two samples of ``n`` and ``m`` vectors from *one* distribution give a
    relative gap of about ``sqrt(1/n + 1/m)`` (0.2 at n = m = 50), so compare
    gaps at equal sample sizes.
``mean_pairwise_cosine(x)``
    The cone effect: mean cosine similarity over all ordered pairs
    ``i != j`` of one modality (the diagonal is excluded).
``linear_separability(a, b)``
    Cross-validated balanced accuracy of a logistic-regression classifier
    (on standardised features) telling the two sets apart: ``≈ 0.5`` when
    they are indistinguishable, ``≈ 1`` when a hyperplane separates them.
    Vectors of one item (an image and its caption, an item encoded as query
    and as candidate) are kept in one fold when ``groups`` names the items.

Per Meta Token and per budget
-----------------------------
``gap_report(img_emb [n, R, D], txt_emb [m, R, D])`` evaluates the probes on
(i) **vector r** of every item, for each Meta Token index ``r`` ("token"
rows), and (ii) each retrieval **budget**: the mean of an item's first ``r``
Meta Embeddings, renormalised to unit length, a single summary vector per
item for the prefix the budget would score ("budget" rows).  Late interaction
(MaxSim) does not score this mean, but it is the natural single point that
locates a prefix of Meta Embeddings on the sphere.  ``side_gap_report`` does the
same between query-side and candidate-side embeddings (``R_q`` vs ``R_c``
Meta Tokens), with budgets ``(r_q, r_c)``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "centroid_gap",
    "default_budgets",
    "gap_report",
    "linear_separability",
    "mean_cross_cosine",
    "mean_pairwise_cosine",
    "project_2d",
    "relative_modality_gap",
    "side_gap_report",
]

_EPS = 1e-12


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a NumPy array, torch tensor or nested sequence to a float64 array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().double().numpy()  # float64 tensors keep their precision
    return np.asarray(x, dtype=np.float64)


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Renormalise every vector, refusing ones without a direction (zero or non-finite)."""
    norms = np.linalg.norm(x, axis=-1)
    bad = ~np.isfinite(norms) | (norms <= _EPS)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} zero or non-finite vector(s) (first at index {where}); "
                         "they have no direction, and the probes are defined on unit vectors")
    return x / norms[..., None]


def _as_matrix(x: Any, name: str, normalize: bool) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, D], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not normalize and not np.isfinite(arr).all():  # (normalize=True: _unit_rows refuses them)
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ValueError(f"{name} has non-finite values (first at index {where})")
    return _unit_rows(arr, name) if normalize else arr


def _check_dims(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding dimensions differ: {a.shape[-1]} vs {b.shape[-1]}")


def centroid_gap(a: Any, b: Any, *, normalize: bool = True) -> float:
    """Liang et al. (2022)'s modality gap ``||mean(a) - mean(b)||_2``.

    Args:
        a: ``[n, D]`` embeddings of one modality (or side).
        b: ``[m, D]`` embeddings of the other.
        normalize: L2-normalise rows first (the probes are defined on unit vectors).

    Returns:
        The Euclidean distance between the two centroids (``[0, 2]`` for unit vectors).
    """
    a, b = _as_matrix(a, "a", normalize), _as_matrix(b, "b", normalize)
    _check_dims(a, b)
    return float(np.linalg.norm(a.mean(0) - b.mean(0)))


def _spread(x: np.ndarray) -> float:
    """RMS distance of the rows of ``x`` to their centroid."""
    return float(np.sqrt(np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))))


def relative_modality_gap(a: Any, b: Any, *, normalize: bool = True) -> float:
    """Centroid gap divided by the pooled within-modality spread.

    ``relative_gap = ||μ_a - μ_b|| / sqrt((s_a² + s_b²) / 2)`` where ``s_x`` is
    the RMS distance of a vector of ``x`` to ``μ_x``.  This is a Fisher-style
    normalisation added here (Liang et al. report the unnormalised gap, see
    :func:`centroid_gap`): a gap of 0.3 means little when each modality is
    spread over a radius of 1, and a lot when each is a tight cluster.

    Returns ``0.0`` when both sets have zero spread and equal centroids, and
    ``inf`` when they have zero spread but different centroids.
    """
    a, b = _as_matrix(a, "a", normalize), _as_matrix(b, "b", normalize)
    _check_dims(a, b)
    gap = float(np.linalg.norm(a.mean(0) - b.mean(0)))
    pooled = float(np.sqrt((_spread(a) ** 2 + _spread(b) ** 2) / 2))
    if pooled < _EPS:
        return 0.0 if gap < _EPS else float("inf")
    return gap / pooled


def mean_pairwise_cosine(x: Any, *, normalize: bool = True) -> float:
    """Mean cosine similarity over all pairs ``i != j`` of ``x`` (the cone effect).

    Computed in O(nD) from the sum vector: ``(||Σx||² - Σ||x_i||²) / (n(n-1))``.
    ``1`` when all vectors coincide, ``≈ 0`` for isotropic random directions.
    Needs at least two vectors.
    """
    x = _as_matrix(x, "x", normalize)
    n = x.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least 2 vectors")
    if not normalize:
        x = _unit_rows(x, "x")  # cosine similarity is defined on directions
    s = x.sum(0)
    return float((s @ s - np.sum(x * x)) / (n * (n - 1)))


def mean_cross_cosine(a: Any, b: Any) -> float:
    """Mean cosine similarity between every vector of ``a`` and every vector of ``b`` (rows renormalised)."""
    a, b = _as_matrix(a, "a", True), _as_matrix(b, "b", True)
    _check_dims(a, b)
    return float(a.mean(0) @ b.mean(0))


def _item_groups(groups: Any, n: int, m: int) -> np.ndarray:
    """Validate ``groups = (ids_a [n], ids_b [m])`` and return one int id per row of ``[a; b]``: ``[n + m]``."""
    if not isinstance(groups, (tuple, list)) or len(groups) != 2:
        raise ValueError("groups must be a pair (ids of a's items [n], ids of b's items [m])")
    ids = []
    for name, g, size in (("a", groups[0], n), ("b", groups[1], m)):
        arr = np.asarray(g)
        if arr.shape != (size,):
            raise ValueError(f"groups for {name} must have shape ({size},) (one item id per vector), "
                             f"got {tuple(arr.shape)}")
        ids.append(arr)
    both = np.concatenate(ids)
    if both.dtype.kind not in "iuUSO":  # item ids are labels: ints or strings, never floats or bools
        raise ValueError(f"groups must hold int or str item ids, got dtype {both.dtype}")
    return np.unique(both.astype(str) if both.dtype.kind == "O" else both, return_inverse=True)[1].reshape(-1)


def _merge_groups(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Connected components of rows linked by an equal id in ``x`` or in ``y``: ``[N] -> [N]``, numbered in
    order of each component's first row (so the seeded fold shuffle does not depend on scipy's labelling)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, n_x = len(x), int(x.max()) + 1
    size = n + n_x + int(y.max()) + 1  # nodes: rows, then x's ids, then y's ids
    rows = np.concatenate([np.arange(n), np.arange(n)])
    cols = np.concatenate([n + x, n + n_x + y])  # row i -- its x id, row i -- its y id
    graph = coo_matrix((np.ones(2 * n), (rows, cols)), shape=(size, size))
    return _number_by_first(connected_components(graph, directed=False)[1][:n])


def _number_by_first(labels: np.ndarray) -> np.ndarray:
    """``labels [N]`` renumbered 0, 1, ... in order of each label's first row (independent of how they were drawn)."""
    _, first_row, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first_row))[inverse.reshape(-1)]


def _copy_ids(X: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """One id per row of ``X [N, D]``, shared by copies: rows within ``rtol`` of the larger one's norm.

    A vector and its rescaled copy (a raw hidden state and its normalised self, ``x`` and ``3 * x``) differ
    in the last bits once renormalised, so exact equality missed them.  Ids are ``np.unique``'s of the
    distinct rows, merged (connected components) into each copy group's first id and renumbered in order:
    unchanged when no two distinct rows are copies.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    uniq, inv = np.unique(X, axis=0, return_inverse=True)
    inv = inv.reshape(-1)  # [N] -> [U]
    U = uniq.astype(np.float64)
    sq = np.einsum("ij,ij->i", U, U)  # [U]
    norms = np.sqrt(sq)
    pi, pj = [], []
    block = max(1, 2**22 // len(U))
    for s in range(0, len(U), block):
        d2 = sq[s : s + block, None] + sq[None, :] - 2.0 * (U[s : s + block] @ U.T)  # [b, U]
        tol = (rtol * np.maximum(norms[s : s + block, None], norms[None, :])) ** 2
        i, j = np.nonzero(d2 <= tol)
        keep = i + s < j
        pi.append(i[keep] + s)
        pj.append(j[keep])
    i, j = np.concatenate(pi), np.concatenate(pj)
    if not len(i):
        return inv
    comp = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(U), len(U))), directed=False)[1]
    return _number_by_first(comp)[inv]  # [U] -> [N]


def _one_vector_set_apart(group: np.ndarray, n_a: int) -> bool:
    """Whether one set is copies of a single vector the other set lacks: grouped folds cannot hold it out (it is
    one group), so such sets keep plain stratified folds (a point against a cloud; the copies' twins in the
    training folds are that point)."""
    ga, gb = set(group[:n_a].tolist()), set(group[n_a:].tolist())
    return (len(ga) == 1 or len(gb) == 1) and not ga & gb


def _row_order(x: np.ndarray) -> np.ndarray:
    """Lexicographic order of the rows of ``x [n, D]`` (first column first; stable): ``[n]``."""
    return np.lexsort(x.T[::-1])


def linear_separability(a: Any, b: Any, seed: int = 0, cv: int = 5, *, normalize: bool = True,
                        groups: tuple[Sequence[Any], Sequence[Any]] | None = None) -> float:
    """Cross-validated balanced accuracy of a linear classifier separating ``a`` from ``b``.

    A logistic regression (scikit-learn, L2 penalty, ``C=1``, classes weighted
    by inverse frequency) on per-dimension standardised features (scaler fit
    on the training folds) is trained to tell the two sets apart under
    stratified ``cv``-fold cross-validation (shuffled with ``seed``); the mean
    held-out *balanced* accuracy is returned, so chance level is 0.5 even when
    ``len(a) != len(b)``.  Standardising makes the probe independent of the
    spread of the embeddings: on raw unit vectors in a tight cone (small
    within-cone variance) ``C=1`` shrinks the classifier towards the
    class-mean difference (or, with unequal set sizes, towards always
    predicting the larger set), which scores separable sets near chance.

    A repeated vector (equal up to a relative 1e-6: rescaled copies too, which differ in the last
    bits once renormalised) is kept, with all its copies, in one fold (grouped folds): a copy in the
    training folds gave the held-out row's label away -- the opposite one for a vector in both
    sets (two identical sets scored 0.26 instead of 0.5), the same one for copies within a set
    (20 texts encoded 5 times each against 100 vectors of the same distribution scored 0.77,
    not about 0.5; repeated label texts do this).  Sets of distinct vectors are split by plain
    stratified folds, as is a set of copies of one vector that the other set lacks (one group cannot be
    held out apart from itself; also with ``groups``).  The same leak
    comes from *near* copies, which the probe cannot recognise: an image and its caption after
    contrastive training, one item encoded as query and as candidate.  ``groups`` names the items
    (``paired`` sets: ``(range(n), range(n))``), and every item's vectors then stay in one fold too;
    without it two sets of paired near-copies (``b = a + 1e-4 * noise``) scored 0.25, not 0.5.

    Args:
        a, b: ``[n, D]`` and ``[m, D]`` embeddings.
        seed: fold-shuffling seed.  The result is a function of the two sets and ``seed``: rows are put in
            lexicographic order before the folds are drawn (the same sets in another order gave another
            split: 0.70-0.80 for one pair of 32-vector sets).
        cv: number of folds (an int >= 2); lowered to the size of the smaller set if needed.
        groups: optional ``(ids_a [n], ids_b [m])``, an item id (int or str) per vector; vectors of one
            item, in either set, are held out together.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ValueError(f"cv must be an int >= 2 (number of folds), got {cv!r}")
    a, b = _as_matrix(a, "a", normalize), _as_matrix(b, "b", normalize)
    _check_dims(a, b)
    folds = min(int(cv), a.shape[0], b.shape[0])
    if folds < 2:
        raise ValueError("linear_separability needs at least 2 vectors per set")
    items = None if groups is None else _item_groups(groups, len(a), len(b))  # [n + m]
    oa, ob = _row_order(a), _row_order(b)  # the folds then depend on the sets, not on the order they came in
    a, b = a[oa], b[ob]
    if items is not None:
        items = np.concatenate([items[: len(oa)][oa], items[len(oa):][ob]])
    X = np.concatenate([a, b])  # [n + m, D]
    y = np.concatenate([np.zeros(len(a), dtype=int), np.ones(len(b), dtype=int)])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"))
    group = _copy_ids(X)  # [n + m] one id per distinct vector (copies, also rescaled ones, share it)
    distinct = int(group.max()) + 1
    if (groups is None and distinct == len(X)) or _one_vector_set_apart(group, len(a)):  # plain stratified folds
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        scores = cross_val_score(clf, X, y, cv=splitter, scoring="balanced_accuracy", error_score="raise")
        return float(np.mean(scores))
    if groups is not None:
        group = _merge_groups(group, items)  # [n + m] one id per item
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.utils import check_random_state

    if distinct == 1:  # one vector, in both sets: nothing tells them apart
        return 0.5
    folds = min(folds, len(np.unique(group[: len(a)])), len(np.unique(group[len(a):])))
    if folds < 2:  # a fold holding a set's only distinct vector would leave no training row of that set
        raise ValueError("linear_separability: a or b repeats vectors (or groups items), and one of them has a single "
                         "distinct vector or item; grouped cross-validation needs at least 2 per set")
    # The groups are shuffled here, not by StratifiedGroupKFold(shuffle=True): before scikit-learn 1.8 that
    # shuffled the groups' class counts without their ids, so the folds were not stratified and the score
    # differed with the installed version.  Renaming group perm[i] to i (the permutation scikit-learn >= 1.8
    # draws from the same seed; argsort inverts it) gives its folds, and its numbers, on every version.
    perm = check_random_state(seed).permutation(int(group.max()) + 1)  # [n_groups]
    group = np.argsort(perm)[group]  # [n + m]
    splitter = StratifiedGroupKFold(n_splits=folds)  # shuffle=False: the order above is the shuffle
    scores = cross_val_score(clf, X, y, groups=group, cv=splitter, scoring="balanced_accuracy", error_score="raise")
    return float(np.mean(scores))


# --------------------------------------------------------------------------- reports


def default_budgets(R_a: int, R_b: int | None = None) -> list[tuple[int, int]]:
    """Default budgets for a report.

    With ``R_b=None`` (same Meta Token count on both sets, e.g. image vs text
    items in the same role): ``(r, r)`` for ``r`` in 1, 2, 4, ... and ``R_a``.
    Otherwise (query vs candidate side): the paper's groups
    ``(1,1), (2,4), (4,8), (8,16), (16,64)`` that fit in ``(R_a, R_b)``, plus
    ``(R_a, R_b)`` itself.
    """
    if R_b is None:
        rs = sorted({2**k for k in range(R_a.bit_length()) if 2**k <= R_a} | {R_a})
        return [(r, r) for r in rs]
    from .config import DEFAULT_GROUPS

    out = [tuple(g) for g in DEFAULT_GROUPS if g[0] <= R_a and g[1] <= R_b]
    if (R_a, R_b) not in out:
        out.append((R_a, R_b))
    return out


def _as_multivector(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim == 2:  # single-vector encoder: [n, D] -> [n, 1, D]
        arr = arr[:, None, :]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [n, R, D] (or [n, D]), got shape {tuple(arr.shape)}")
    if 0 in arr.shape:
        raise ValueError(f"{name} has shape {tuple(arr.shape)}: it needs at least one item, vector and dimension")
    return _unit_rows(arr, name)


def _prefix_mean(x: np.ndarray, r: int, name: str) -> np.ndarray:
    """Mean of each item's first ``r`` vectors, renormalised: ``[n, R, D] -> [n, D]``.

    An item whose first ``r`` vectors cancel (zero mean) has no direction: a clear error.
    """
    return _unit_rows(x[:, :r].mean(1), f"{name} (mean of the first {r} vectors of each item)")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _normalise_budgets(budgets: Iterable[Any] | None, R_a: int, R_b: int, same: bool) -> list[tuple[int, int]]:
    if budgets is None:
        return default_budgets(R_a, None if same and R_a == R_b else R_b)
    out: list[tuple[int, int]] = []
    for b in budgets:
        if _is_int(b):
            pair = (int(b), int(b))
        elif isinstance(b, (tuple, list, np.ndarray)) and len(b) == 2 and all(_is_int(v) for v in b):
            pair = (int(b[0]), int(b[1]))
        else:
            raise ValueError(f"budget {b!r} must be an int r or a pair of ints (r_a, r_b)")
        if not (1 <= pair[0] <= R_a and 1 <= pair[1] <= R_b):
            raise ValueError(f"budget {pair} does not fit the embeddings (R = {R_a}, {R_b})")
        out.append(pair)  # type: ignore[arg-type]
    return out


def _probe_rows(a: np.ndarray, b: np.ndarray, names: tuple[str, str], separability: bool, seed: int, cv: int,
                groups: tuple[Sequence[Any], Sequence[Any]] | None = None):
    yield "centroid_gap", centroid_gap(a, b, normalize=False)
    yield "relative_gap", relative_modality_gap(a, b, normalize=False)
    if separability:
        yield "separability", linear_separability(a, b, seed=seed, cv=cv, normalize=False, groups=groups)
    if len(a) > 1:
        yield f"mean_cos_{names[0]}", mean_pairwise_cosine(a, normalize=False)
    if len(b) > 1:
        yield f"mean_cos_{names[1]}", mean_pairwise_cosine(b, normalize=False)
    yield "mean_cos_cross", mean_cross_cosine(a, b)


def _report(
    a: Any,
    b: Any,
    names: tuple[str, str],
    budgets: Sequence[Any] | None,
    *,
    same: bool,
    tokens: bool,
    separability: bool,
    seed: int,
    cv: int,
    groups: tuple[Sequence[Any], Sequence[Any]] | None,
) -> pd.DataFrame:
    A, B = _as_multivector(a, names[0]), _as_multivector(b, names[1])
    _check_dims(A, B)
    if groups is not None:
        _item_groups(groups, A.shape[0], B.shape[0])  # a clear error before any probe runs
    R_a, R_b = A.shape[1], B.shape[1]
    rows: list[dict[str, Any]] = []
    if tokens:
        for r in range(min(R_a, R_b)):
            for probe, value in _probe_rows(A[:, r], B[:, r], names, separability, seed, cv, groups):
                rows.append({"level": "token", "token": r, "r_a": pd.NA, "r_b": pd.NA, "budget": pd.NA, "probe": probe, "value": value})
    for r_a, r_b in _normalise_budgets(budgets, R_a, R_b, same):
        va, vb = _prefix_mean(A, r_a, names[0]), _prefix_mean(B, r_b, names[1])
        for probe, value in _probe_rows(va, vb, names, separability, seed, cv, groups):
            rows.append(
                {"level": "budget", "token": pd.NA, "r_a": r_a, "r_b": r_b, "budget": f"({r_a},{r_b})", "probe": probe, "value": value}
            )
    df = pd.DataFrame(rows, columns=["level", "token", "r_a", "r_b", "budget", "probe", "value"])
    for col in ("token", "r_a", "r_b"):
        df[col] = df[col].astype("Int64")
    df["budget"] = df["budget"].astype("string")
    df["value"] = df["value"].astype(float)
    df.attrs.update(side_a=names[0], side_b=names[1], n_a=int(A.shape[0]), n_b=int(B.shape[0]))
    return df


def gap_report(
    img_emb: Any,
    txt_emb: Any,
    budgets: Sequence[Any] | None = None,
    *,
    tokens: bool = True,
    separability: bool = True,
    seed: int = 0,
    cv: int = 5,
    groups: tuple[Sequence[Any], Sequence[Any]] | None = None,
) -> pd.DataFrame:
    """Image-vs-text modality-gap probes per Meta Token index and per budget.

    Args:
        img_emb: ``[n, R, D]`` embeddings of image(-bearing) items (``[n, D]`` is read as ``R = 1``).
        txt_emb: ``[m, R', D]`` embeddings of text-only items, usually from the same role (``R' = R``).
        budgets: prefix lengths ``r`` (scored as ``(r, r)``) or pairs ``(r_img, r_txt)``;
            ``None`` uses :func:`default_budgets`.
        tokens: include per-Meta-Token rows (vector ``r`` of every item), ``r < min(R, R')``.
        separability: include the (slowest) logistic-regression probe.
        seed, cv, groups: passed to :func:`linear_separability`; ``groups`` names the scene of every
            item (``(range(n), range(n))`` when image ``i`` and text ``i`` show one scene): pass it for
            paired sets, whose matched pairs otherwise leak across folds and lower the separability.

    Returns:
        A tidy frame with columns ``level`` (``"token"`` or ``"budget"``), ``token``
        (0-based Meta Token index on token rows, NA otherwise), ``r_a``, ``r_b``
        (prefix lengths on budget rows), ``budget`` (label ``"(r_a,r_b)"``),
        ``probe`` (``centroid_gap``, ``relative_gap``, ``separability``,
        ``mean_cos_image``, ``mean_cos_text``, ``mean_cos_cross``) and ``value``.
        A budget row's vectors are the renormalised mean of each item's first
        ``r`` Meta Embeddings (see the module docstring).
    """
    return _report(
        img_emb, txt_emb, ("image", "text"), budgets,
        same=True, tokens=tokens, separability=separability, seed=seed, cv=cv, groups=groups,
    )


def side_gap_report(
    query_emb: Any,
    cand_emb: Any,
    budgets: Sequence[Any] | None = None,
    *,
    tokens: bool = True,
    separability: bool = True,
    seed: int = 0,
    cv: int = 5,
    groups: tuple[Sequence[Any], Sequence[Any]] | None = None,
) -> pd.DataFrame:
    """Query-side vs candidate-side gap: like :func:`gap_report` with ``R_q`` vs ``R_c`` Meta Tokens.

    Budgets are ``(r_q, r_c)`` pairs (default: the paper's groups that fit);
    token rows compare query vector ``r`` with candidate vector ``r`` for
    ``r < min(R_q, R_c)``.  Cone-effect probes are named ``mean_cos_query`` and
    ``mean_cos_candidate``.  Query and candidate encodings of the same items are paired: pass
    ``groups=(item_ids, item_ids)`` (see :func:`linear_separability`).
    """
    return _report(
        query_emb, cand_emb, ("query", "candidate"), budgets,
        same=False, tokens=tokens, separability=separability, seed=seed, cv=cv, groups=groups,
    )


# --------------------------------------------------------------------------- 2-D views


#: ``method`` values of :func:`project_2d`.
PROJECTIONS = ("pca", "umap")


def check_projection(method: str) -> str:
    """``method`` lower-cased, or a ValueError unless it is one of :data:`PROJECTIONS` (notebooks check their
    ``projection`` parameter with it before training: a typo failed only in the last cell)."""
    key = str(method).lower()
    if key not in PROJECTIONS:
        raise ValueError(f"method={method!r}; expected 'pca' or 'umap'")
    return key


def project_2d(
    vectors: Any,
    labels: Sequence[Any],
    method: str = "pca",
    *,
    seed: int = 0,
    normalize: bool = True,
    **kwargs: Any,
) -> pd.DataFrame:
    """Project ``[N, D]`` vectors to 2-D for plotting the gap (Liang et al.'s Fig. 1 view).

    Args:
        vectors: ``[N, D]`` embeddings (e.g. image and text vectors stacked).
        labels: ``N`` labels (e.g. ``"image"`` / ``"text"``), copied to the ``label`` column.
        method: ``"pca"`` (scikit-learn) or ``"umap"`` (needs the optional ``umap-learn`` package).
        seed: random state of the projection.
        normalize: L2-normalise rows first.
        **kwargs: passed to ``PCA`` / ``umap.UMAP``.

    Returns:
        ``DataFrame(x, y, label)``; ``df.attrs`` holds ``method`` and, for PCA,
        ``explained_variance_ratio`` (for axis labels).
    """
    X = _as_matrix(vectors, "vectors", normalize)
    labels = list(labels)
    if len(labels) != X.shape[0]:
        raise ValueError(f"{len(labels)} labels for {X.shape[0]} vectors")
    method = check_projection(method)
    attrs: dict[str, Any] = {"method": method}
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed, **kwargs)
        xy = pca.fit_transform(X)
        attrs["explained_variance_ratio"] = [float(v) for v in pca.explained_variance_ratio_]
    elif method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError as e:
            raise ImportError(
                "project_2d(method='umap') needs the optional 'umap-learn' package "
                "(pip install umap-learn); use method='pca' otherwise"
            ) from e
        kwargs.setdefault("n_neighbors", min(15, max(2, X.shape[0] - 1)))
        xy = umap.UMAP(n_components=2, random_state=seed, **kwargs).fit_transform(X)
    else:
        raise ValueError(f"method={method!r}; expected 'pca' or 'umap'")
    df = pd.DataFrame({"x": xy[:, 0].astype(float), "y": xy[:, 1].astype(float), "label": labels})
    df.attrs.update(attrs)
    return df
