"""One figure style and the plot helpers behind the notebooks' figures.

Call :func:`set_style` once at the top of a notebook.  Every helper takes a
tidy :class:`pandas.DataFrame`, draws with seaborn/matplotlib and returns the
:class:`matplotlib.figure.Figure`; :func:`save_figure` writes it reproducibly.

Colours are keyed by *method name* (:func:`method_palette`), so ``MetaEmbed``
/ ``MMR``, ``NoMMR``, ``single-last``, ``single-mean``, ``split`` ... keep the
same colour in every figure; unknown names get a colour derived from a stable
hash of the name (not Python's salted ``hash``).  Within one figure :func:`method_palette`
gives distinct labels distinct colours: variants of one method (``MetaEmbed τ=0.01``,
``MetaEmbed τ=0.1``) get shades of its colour, and hash collisions move to a free colour.

Figures (paper numbering, Xiao et al. 2025):

* :func:`plot_budget_curves` - score vs retrieval budget (Fig. 4b; Fig. 3 per model
  via :func:`plot_budget_facets`), with the best single-vector baseline dashed.
* :func:`plot_scaling` - score vs model size, MetaEmbed (16,64) vs single-vector (Fig. 4a).
* :func:`plot_latency_memory` - scoring latency and index memory vs budget (Fig. 2 middle, Table 3).
* :func:`plot_projection` - 2-D PCA/UMAP view of embeddings (modality gap).
* :func:`plot_gap_by_token` - modality-gap probes per Meta Token index or budget.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

__all__ = [
    "METHOD_COLORS",
    "METRIC_LABELS",
    "budget_label",
    "band_note",
    "chance_line",
    "format_params",
    "gain_label_offsets",
    "legend_entries",
    "method_color",
    "method_palette",
    "parse_budget",
    "plot_budget_curves",
    "plot_budget_facets",
    "plot_gap_by_token",
    "plot_latency_memory",
    "plot_projection",
    "plot_scaling",
    "save_figure",
    "set_style",
    "sort_budgets",
]

# Colour-blind friendly (Okabe-Ito / seaborn "colorblind"); keys are lower-cased method names.
_C = sns.color_palette("colorblind", 10).as_hex()
METHOD_COLORS: dict[str, str] = {
    "metaembed": _C[0],  # blue
    "mmr": _C[0],
    "meta": _C[0],
    "nommr": _C[3],  # vermilion
    "single-last": _C[2],  # green (the paper's dashed green baseline)
    "single-mean": _C[1],  # orange
    "split": _C[4],  # purple
    "single-vector": _C[2],
    "init": _C[7],  # grey
    "trained": _C[0],
    "image": _C[9],  # light blue
    "text": _C[5],  # brown
    "query": _C[8],  # yellow
    "candidate": _C[6],  # pink
}
def _rgb_distance(a: str, b: str) -> float:
    """Euclidean distance of two ``#rrggbb`` colours in 0-255 RGB."""
    ra, rb = (matplotlib.colors.to_rgb(c) for c in (a, b))
    return 255.0 * math.dist(ra, rb)


#: Colours for labels without a fixed one: tab20, less those that look like a fixed colour (tab20's blue next to
#: MetaEmbed's, its orange next to single-mean's, its grey next to init's), which made two curves look alike.
_FALLBACK = [c for c in sns.color_palette("tab20", 20).as_hex()
             if min(_rgb_distance(c, f) for f in set(METHOD_COLORS.values())) >= 50]

#: Axis labels for common metric names (lower-case keys).
METRIC_LABELS: dict[str, str] = {
    "p@1": "Precision@1 (%)",
    "precision@1": "Precision@1 (%)",
    "p1": "Precision@1 (%)",
    "ndcg@5": "NDCG@5 (%)",
    "ndcg5": "NDCG@5 (%)",
    "mmeb": "MMEB score (%)",
    "latency_ms": "Scoring latency (ms)",
    "memory_gib": "Index memory (GiB)",
}

_BASELINE_KEY = "single-vector"  # colour name of an unnamed (numeric) baseline: single-last's green


def _key(method: Any) -> str:
    key = str(method).strip().lower()
    key = re.sub(r"\s+", "", key)
    if key.startswith("split"):
        return "split"
    if key.startswith("nommr"):
        return "nommr"
    if key.startswith("metaembed"):
        return "metaembed"
    return key


def method_color(method: Any) -> str:
    """The colour of ``method`` on its own: fixed for known names, stable-hashed for others.

    Several labels in one figure should take their colours from :func:`method_palette`, which
    keeps them distinct (variants of one method, hash collisions).
    """
    key = _key(method)
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return _FALLBACK[_hash_index(key)]


def _hash_index(key: str) -> int:
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % len(_FALLBACK)


def _natural_key(label: Any) -> tuple:
    """Sort key that orders numbers inside labels by value (``τ=0.01 < τ=0.03 < τ=0.1``, ``2 < 10``)."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", str(label).strip().lower())
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def _mix(color: str, t: float) -> str:
    """``color`` mixed towards black (``t < 0``) or white (``t > 0``) by ``|t|``."""
    rgb = np.array(matplotlib.colors.to_rgb(color))
    target = np.ones(3) if t > 0 else np.zeros(3)
    return matplotlib.colors.to_hex(rgb + abs(t) * (target - rgb))


def _shades(base: str, n: int) -> list[str]:
    """``n`` shades of ``base`` from dark to light (the base itself in the middle when ``n`` is odd)."""
    if n == 1:
        return [base]
    spread = min(0.5, 0.3 * (n - 1))
    return [_mix(base, t) if abs(t) > 1e-9 else base for t in np.linspace(-spread, spread, n)]


def _extra_colors(n: int) -> list[str]:
    """Colours beyond the fallback table (many unknown labels in one figure)."""
    return sns.color_palette("husl", n).as_hex()


def method_palette(methods: Sequence[Any] | pd.Series | None = None) -> dict[Any, str]:
    """``{method: colour}`` for seaborn's ``palette=`` (all known methods when ``methods`` is None).

    Distinct labels always get distinct colours, deterministically (the same labels give the same
    palette in any order and any process):

    * a known method (:data:`METHOD_COLORS`, e.g. ``MetaEmbed``, ``NoMMR (16,64)``, ``split-(16,64)``)
      keeps its fixed colour when it is the only label of that colour;
    * several labels of one colour (variants of a method, e.g. ``MetaEmbed τ=0.01`` / ``τ=0.03`` /
      ``τ=0.1``, or ``MMR`` next to ``trained``) get shades of it, dark to light in natural label
      order;
    * other labels get their stable-hashed fallback colour (:func:`method_color`), or the next free
      one of the fallback table when that colour is taken in this palette.
    """
    if methods is None:
        return dict(METHOD_COLORS)
    labels = list(pd.unique(pd.Series(list(methods), dtype=object)))
    out: dict[Any, str] = {}
    by_color: dict[str, list[Any]] = {}
    unknown = []
    for m in labels:
        key = _key(m)
        if key in METHOD_COLORS:
            by_color.setdefault(METHOD_COLORS[key], []).append(m)
        else:
            unknown.append(m)
    for base, group in by_color.items():
        group = sorted(group, key=lambda m: (_natural_key(m), str(m)))
        out.update(zip(group, _shades(base, len(group))))
    used = {c.lower() for c in out.values()}
    free_extra: list[str] = []
    for m in sorted(unknown, key=lambda m: (_key(m), str(m))):
        start = _hash_index(_key(m))
        color = next((c for c in (_FALLBACK[(start + i) % len(_FALLBACK)] for i in range(len(_FALLBACK)))
                      if c.lower() not in used), None)
        if color is None:  # the table is used up: evenly spaced hues
            if not free_extra:
                free_extra = [c for c in _extra_colors(len(unknown) + len(used)) if c.lower() not in used]
            color = free_extra.pop(0)
        out[m] = color
        used.add(color.lower())
    return {m: out[m] for m in labels}


_NOTE_GID = "metaembed-legend-note"


def _legend_note(ax: Any, text: str) -> None:
    """A legend entry of text only (an empty, unmarked line): what the numbers written on the axes are."""
    ax.plot([], [], linestyle="none", marker="none", label=text, gid=_NOTE_GID)


def legend_entries(axes: Sequence[Any]) -> dict[str, Any]:
    """``{label: handle}`` of every visible axes in ``axes``, first occurrence of a label winning (entries of a
    curve or baseline drawn in some panels only are kept); the text-only notes (what written numbers are) last."""
    seen: dict[str, Any] = {}
    for ax in axes:
        if not ax.get_visible():
            continue
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label and not label.startswith("_") and label not in seen:
                seen[label] = handle
    notes = {k: h for k, h in seen.items() if getattr(h, "get_gid", lambda: None)() == _NOTE_GID}
    return {**{k: h for k, h in seen.items() if k not in notes}, **notes}  # text-only notes last


def chance_line(ax: Any, n_candidates: int | tuple[str, float], scale: float = 100.0) -> Any:
    """Draw a chance level as a dotted grey line.

    ``n_candidates`` an int: chance P@1 (``scale / n_candidates``: one positive among ``n_candidates``),
    labelled ``chance (1/n)``.  A ``(label, level)`` pair: ``level`` as it is, in the axis' units, e.g.
    ``("random ranking", evaluation.random_ranking_level(tasks))`` on an NDCG@k panel.
    """
    if isinstance(n_candidates, tuple) and len(n_candidates) == 2 and isinstance(n_candidates[0], str):
        label, level = n_candidates
        if isinstance(level, bool) or not isinstance(level, numbers.Real) or not math.isfinite(level):
            raise ValueError(f"chance level {label!r} must be a finite number, got {level!r}")
        return ax.axhline(float(level), color="0.6", linestyle=":", linewidth=1.2, label=label)
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, (int, np.integer)) or n_candidates < 1:
        raise ValueError(f"n_candidates must be an int >= 1 or a (label, level) pair, got {n_candidates!r}")
    return ax.axhline(scale / n_candidates, color="0.6", linestyle=":", linewidth=1.2,
                      label=f"chance (1/{n_candidates})")


def set_style(context: str = "notebook", font_scale: float = 1.0) -> dict[str, str]:
    """Apply the project's single figure theme; returns the method palette.

    seaborn ``whitegrid`` + colour-blind palette, legends on a mostly opaque white box (no edge) so a line
    behind one does not cross its text, fonts embedded as TrueType in PDFs (editable text), deterministic
    SVG ids.  Safe to call repeatedly.
    """
    sns.set_theme(context=context, style="whitegrid", palette="colorblind", font_scale=font_scale)
    matplotlib.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "figure.figsize": (6.0, 4.0),
            "axes.spines.top": False,
            "axes.spines.right": False,
            # a legend placed over the axes hides the lines behind it (Fig. 4a's chance line crossed its note)
            "legend.frameon": True,
            "legend.framealpha": 0.85,
            "legend.facecolor": "white",
            "legend.edgecolor": "none",
            "pdf.fonttype": 42,
            "ps.fonttype": 42,
            "svg.hashsalt": "metaembed",
            "lines.linewidth": 2.0,
            "lines.markersize": 6.0,
        }
    )
    return method_palette()


# --------------------------------------------------------------------------- budgets


def _spread(values: np.ndarray, gap: float) -> np.ndarray:
    """Label positions for ``values``: points closer than ``gap`` are merged into clusters whose labels sit
    ``gap`` apart, centred on the cluster's mean (isolated points keep their place)."""
    order = np.argsort(values, kind="stable")
    clusters: list[list[float]] = []  # sorted values per cluster

    def span(c: list[float]) -> tuple[float, float]:
        centre, half = float(np.mean(c)), (len(c) - 1) / 2 * gap
        return centre - half, centre + half

    for v in values[order]:
        clusters.append([float(v)])
        while len(clusters) > 1 and span(clusters[-2])[1] + gap > span(clusters[-1])[0]:
            last = clusters.pop()
            clusters[-1].extend(last)
    placed = [span(c)[0] + i * gap for c in clusters for i in range(len(c))]
    out = np.empty(len(values), dtype=float)
    out[order] = placed
    return out


def parse_budget(budget: Any) -> tuple[int, int]:
    """``(16, 64)``, ``[16, 64]``, ``"(16,64)"``, ``"16x64"`` or ``"16,64"`` -> ``(16, 64)``; an int r -> ``(r, r)``."""
    if isinstance(budget, (int, np.integer)):
        return int(budget), int(budget)
    if isinstance(budget, str):
        nums = re.findall(r"\d+", budget)
        if len(nums) == 1:
            return int(nums[0]), int(nums[0])
        if len(nums) != 2:
            raise ValueError(f"cannot parse budget {budget!r}; expected '(r_q,r_c)'")
        return int(nums[0]), int(nums[1])
    vals = tuple(int(v) for v in budget)
    if len(vals) != 2:
        raise ValueError(f"budget {budget!r} must have two entries (r_q, r_c)")
    return vals  # type: ignore[return-value]


def budget_label(budget: Any) -> str:
    """``(16, 64)`` -> ``"(16,64)"`` (the paper's notation without spaces); labels pass through normalised."""
    r_q, r_c = parse_budget(budget)
    return f"({r_q},{r_c})"


def sort_budgets(budgets: Sequence[Any]) -> list[str]:
    """Unique budget labels in group order: by ``r_q * r_c`` (scoring cost), then ``r_q``."""
    labels = {budget_label(b) for b in budgets}
    return sorted(labels, key=lambda s: (parse_budget(s)[0] * parse_budget(s)[1], parse_budget(s)))


def format_params(n: float) -> str:
    """Human-readable parameter count: 3.1e9 -> ``"3.1B"``, 2.5e6 -> ``"2.5M"``.

    The unit is chosen after rounding, so a count that rounds up to the next unit is written in it
    (999,999 -> ``"1M"``, not ``"1000K"``).
    """
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        v = n / div
        text = f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"
        if abs(float(text)) >= 1:
            return f"{text}{suffix}"
    return f"{n:g}"


# --------------------------------------------------------------------------- saving


def save_figure(
    fig: Figure,
    name: str,
    out_dir: str | os.PathLike[str] = "figures",
    *,
    pdf: bool = False,
    dpi: int = 150,
    close: bool = False,
) -> Path:
    """Save ``fig`` as ``<out_dir>/<name>.png`` (and ``.pdf`` with ``pdf=True``); returns the PNG path.

    Tight bounding box, ``dpi`` 150, and no timestamp/software metadata, so
    re-rendering the same figure with the same library versions gives
    byte-identical files (PNG via Agg is deterministic; PDF creation dates are
    dropped).  ``name`` may carry a ``.png``/``.pdf`` suffix (any case), which is ignored, and
    sub-folders (``"fig3/panel_a"``), which are created.
    """
    out = Path(out_dir)
    stem = re.sub(r"\.(png|pdf)$", "", name, flags=re.IGNORECASE)
    png = out / f"{stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    if pdf:
        fig.savefig(
            out / f"{stem}.pdf",
            bbox_inches="tight",
            metadata={"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None},
        )
    if close:
        plt.close(fig)
    return png


# --------------------------------------------------------------------------- helpers


def _new_axes(ax: plt.Axes | None, figsize: tuple[float, float] = (6.0, 4.0)) -> tuple[Figure, plt.Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _metric_label(df: pd.DataFrame, y: str, ylabel: str | None) -> str:
    if ylabel is not None:
        return ylabel
    if "metric" in df.columns and df["metric"].nunique() == 1:
        m = str(df["metric"].iloc[0])
        return METRIC_LABELS.get(m.lower(), m)
    return METRIC_LABELS.get(y.lower(), y)


def _baseline_lines(
    df: pd.DataFrame, baseline: Any, hue: str | None, y: str, note: str | None = "best single-vector"
) -> tuple[pd.DataFrame, list[tuple[str, float, str]]]:
    """Resolve ``baseline`` into (label, value, colour name) lines; drop rows of baseline methods from ``df``.

    The colour name is the key the line's colour is looked up under in the figure's palette
    (:func:`method_palette` over the curves and the baselines together).  ``note`` labels a number
    (``note`` itself) and a lone method name (``"<name> (<note>)"``; the bare name when None).
    """
    if baseline is None:
        return df, []
    if isinstance(baseline, (int, float, np.floating, np.integer)):
        label = note or "single-vector"
        return df, [(label, _finite_baseline(label, baseline), _BASELINE_KEY)]
    if (isinstance(baseline, tuple) and len(baseline) == 2 and isinstance(baseline[0], str)
            and isinstance(baseline[1], numbers.Real) and not isinstance(baseline[1], bool)):
        return df, [(baseline[0], _finite_baseline(baseline[0], baseline[1]), baseline[0])]
    if isinstance(baseline, Mapping):
        return df, [(str(k), _finite_baseline(k, v), k) for k, v in baseline.items()]
    names = [baseline] if isinstance(baseline, str) else list(baseline)
    if hue is None or hue not in df.columns:
        raise ValueError(f"baseline={baseline!r} names methods but the frame has no hue column {hue!r}")
    lines = []
    for name in names:
        rows = df[df[hue] == name]
        if rows.empty:
            raise ValueError(f"baseline method {name!r} not found in column {hue!r}")
        _check_one_series(rows, [hue], "plot_budget_curves", "baseline", seeds=False)
        # several budgets/seeds of a single-vector method: its score is their mean
        lines.append((f"{name} ({note})" if len(names) == 1 and note else str(name), float(rows[y].mean()), name))
    return df[~df[hue].isin(names)], lines


def _finite_baseline(label: Any, value: Any) -> float:
    """``value`` as a float; a NaN/inf baseline would be an invisible line with a legend entry and ``+nan`` gains."""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"baseline {label!r} has no finite value ({value!r}); leave it out of baseline=")
    return v


#: Columns whose values tell series apart: rows of one curve point must agree on them (never averaged).
_SERIES_COLUMNS = ("model", "group", "metric")


def _check_one_series(data: pd.DataFrame, cell: Sequence[str | None], what: str, point: str,
                      *, seeds: bool = True, budget: str | None = None, hint: str = "") -> None:
    """Refuse rows that one plotted point (``cell``: e.g. method and budget) would average across series.

    Repeated rows of a point are averaged with an error band: that is meant for seeds.  Rows of several
    models, summary groups or metrics (:data:`_SERIES_COLUMNS`), or (``seeds``) the same seed twice,
    would be averaged into a point that no run measured.
    """
    cell = [c for c in dict.fromkeys(cell) if c is not None and c in data.columns]
    cols = [c for c in _SERIES_COLUMNS if c in data.columns and c not in cell]
    check_seeds = seeds and "seed" in data.columns and "seed" not in cell
    if data.empty or not cell or not (cols or check_seeds):
        return
    for key, part in data.groupby(cell, sort=False, dropna=False):  # key: a tuple (grouped by a list)
        at = f"{point} " + ", ".join(
            f"{c.lstrip('_')}={budget_label(k) if c == budget else repr(k) if isinstance(k, str) else k}"
            for c, k in zip(cell, key))
        for col in cols:
            values = [str(v) for v in pd.unique(part[col])]
            if len(values) > 1:
                raise ValueError(f"{what}: {at} would average rows of {len(values)} {col!r} values {values}; "
                                 f"pass one {col} per call{hint}")
        if check_seeds and part["seed"].duplicated().any():
            seed = part.loc[part["seed"].duplicated(), "seed"].iloc[0]
            raise ValueError(f"{what}: {at} has several rows of seed {seed} (repeated rows, or series "
                             f"that a column of their own tells apart)")


def _drop_missing(data: pd.DataFrame, y: str, keys: Sequence[str | None], what: str,
                  budget: str | None = None) -> pd.DataFrame:
    """Rows of ``data`` whose ``y`` is a number; warns naming the others (``keys`` columns), which are not drawn.

    seaborn drops NaN scores silently and joins the line across them, so a missing budget or size
    would look measured (and a gain label would read ``+nan``).  ``budget``: a key column of budgets,
    named by :func:`budget_label` in the warning.
    """
    missing = data[y].isna()
    if not missing.any():
        return data
    cols = [k for k in dict.fromkeys(keys) if k is not None and k in data.columns]
    shown = data.loc[missing, cols].copy()
    if budget in shown.columns:
        shown[budget] = shown[budget].map(budget_label)
    points = sorted({tuple(str(v) for v in r) for r in shown.itertuples(index=False)})
    warnings.warn(f"{what}: {int(missing.sum())} row(s) with a missing {y!r} are not drawn "
                  f"({', '.join(cols)}: {points})", stacklevel=3)
    return data[~missing]


#: Behind value labels: a line through a label (its own curve rising to the point) made "+4.2" read "4.2".
_LABEL_BOX = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}


def _draw_baselines(ax: plt.Axes, lines: list[tuple[str, float, Any]], palette: Mapping[Any, str]) -> None:
    for label, value, color_name in lines:
        ax.axhline(value, linestyle="--", color=palette[color_name], linewidth=1.5, label=label, zorder=1)


# --------------------------------------------------------------------------- figures


def band_note(data: pd.DataFrame, keys: Sequence[str | None], errorbar: Any = "sd") -> str:
    """``"\\nband: ±1 sd over 3 seeds"`` when some point (rows sharing ``keys``) averages several rows, for
    the x label of a figure whose shaded bands would otherwise say nothing of what they are; ``""`` when every
    point is one row or ``errorbar`` is None.  ``errorbar`` as seaborn takes it (``"sd"``, ``("ci", 95)``, ...)."""
    cols = [k for k in keys if k is not None and k in data.columns]
    if errorbar is None or data.empty:
        return ""
    n = int(data.groupby(cols, dropna=False).size().max()) if cols else len(data)
    if n < 2:
        return ""
    if isinstance(errorbar, str):
        kind, level = errorbar, None
    elif isinstance(errorbar, (tuple, list)) and len(errorbar) == 2:
        kind, level = errorbar
    else:  # a callable
        kind, level = "custom", None
    what = {"sd": f"±{level or 1} sd", "se": f"±{level or 1} se", "ci": f"{level or 95}% bootstrap CI",
            "pi": f"{level or 95}% percentile interval"}.get(str(kind), "error band")
    runs = "seeds" if "seed" in data.columns else "rows"
    return f"\nband: {what} over {n} {runs} per point"


def plot_budget_curves(
    df: pd.DataFrame,
    x: str = "budget",
    y: str = "value",
    hue: str | None = "method",
    baseline: Any = None,
    *,
    order: Sequence[Any] | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    annotate_gain: bool = False,
    errorbar: Any = "sd",
    palette: Mapping[Any, str] | None = None,
    chance: int | tuple[str, float] | None = None,
    baseline_note: str | None = "best single-vector",
    ax: plt.Axes | None = None,
) -> Figure:
    """Score vs retrieval budget ``(r_q, r_c)`` (Fig. 4b; per model, Fig. 3).

    Args:
        df: tidy frame with a budget column ``x`` (tuples or ``"(r_q,r_c)"`` labels),
            a score column ``y`` and optionally ``hue`` (e.g. MMR vs NoMMR).  Several
            rows per (budget, hue), i.e. seeds, are averaged with a ``errorbar`` band; rows
            with a missing (NaN) score are left out with a warning naming them.  Rows of one
            point that differ in ``model``, ``group`` or ``metric``, or repeat a ``seed``, are a
            ValueError (they are different series, not seeds).
        baseline: the best single-vector baseline drawn as a dashed horizontal line
            with its own legend entry.  A finite number (labelled ``baseline_note``), a
            ``(label, value)`` pair (``value`` a number), a ``{label: value}`` mapping, or a
            method name (or list / tuple of names, also two) in ``hue``, whose rows are then
            taken out of the curves and averaged into the line.
        baseline_note: what one named baseline is, in its legend entry (``"single-last (best
            single-vector)"``): say ``"single-vector"`` where no other single-vector method was trained,
            None for the bare name.  Several named baselines are labelled by name only.
        order: budgets in x order (rows at other budgets are not drawn); default: every budget
            of the curves in group order (:func:`sort_budgets`).
        ylabel: default from a unique ``metric`` column or ``y`` (:data:`METRIC_LABELS`).
        annotate_gain: write ``+x.x`` (points over the best, i.e. highest, baseline, as in
            :func:`metaembed.ablations.scaling_table`) at the largest budget of each curve (by cost,
            also under a custom ``order``), like the paper's red arrows.  The labels of close end points
            are kept apart for the y-limits when they are placed: draw what widens them (``chance``)
            through this function, not onto the axes afterwards.
        chance: draw chance P@1 for this many candidates per query, or a ``(label, level)`` pair such
            as NDCG@k's random-ranking level (:func:`chance_line`), before the gain labels are placed.
        palette: ``{label: colour}`` for the curves and baselines (:func:`plot_budget_facets` passes
            one for the whole figure, so a label keeps its colour in every panel); default:
            :func:`method_palette` of this axes' labels.
        ax: draw into an existing axes (e.g. a facet); otherwise a new figure.

    Raises:
        ValueError: no budget to draw (an empty frame, or every score missing), or rows of one point
            from several series (see ``df``).
    """
    scored = _drop_missing(df, y, [hue, x], "plot_budget_curves", budget=x)
    data, lines = _baseline_lines(scored, baseline, hue, y, baseline_note)
    data = data.copy()
    data["_budget"] = data[x].map(budget_label)
    labels = [budget_label(b) for b in order] if order is not None else sort_budgets(data["_budget"].tolist())
    if not labels:  # the axis would be empty, and its x limits reversed
        raise ValueError(f"plot_budget_curves: no budget to draw ({len(df)} row(s), {len(df) - len(scored)} with a "
                         f"missing {y!r}, {len(scored) - len(data)} of baseline methods)")
    pos = {b: i for i, b in enumerate(labels)}
    data = data[data["_budget"].isin(pos)]
    data["_x"] = data["_budget"].map(pos)
    _check_one_series(data, [hue, "_budget"], "plot_budget_curves", "the point", budget="_budget",
                      hint=" (plot_budget_facets(col=...) draws one panel each)")
    fig, ax = _new_axes(ax)
    has_hue = hue is not None and hue in data.columns
    curve_names = list(pd.unique(data[hue])) if has_hue else []
    # one palette for curves and baselines: distinct labels never share a colour
    names = curve_names + [name for _, _, name in lines if name not in curve_names]
    if palette is None:
        palette = method_palette(names)
    elif any(n not in palette for n in names):
        raise ValueError(f"palette has no colour for {[n for n in names if n not in palette]}")
    hue_kw: dict[str, Any] = {}
    if has_hue:
        hue_kw = {"hue": hue, "palette": {m: palette[m] for m in curve_names}, "hue_order": curve_names}
    sns.lineplot(data=data, x="_x", y=y, marker="o", errorbar=errorbar, ax=ax, **hue_kw)
    _draw_baselines(ax, lines, palette)
    if chance is not None:
        chance_line(ax, chance)
    if annotate_gain and lines:
        ref = max(value for _, value, _ in lines)  # the best baseline
        groups = data.groupby(hue, sort=False) if hue_kw else [(None, data)]
        rank = {b: i for i, b in enumerate(sort_budgets(labels))}  # by cost: the largest budget, whatever the order
        ends = []
        for name, g in groups:
            end = max(g["_budget"].unique(), key=rank.__getitem__)
            ends.append((name, pos[end], g[g["_budget"] == end][y].mean()))
        ends = [e for e in ends if np.isfinite(e[2])]
        lo, hi = ax.get_ylim()
        text_y = _spread(np.array([e[2] for e in ends]), 0.05 * (hi - lo))  # labels of close end points apart
        to_points = 72.0 / ax.figure.dpi
        for (name, x_end, last), ty in zip(ends, text_y):
            dy = (ax.transData.transform((0, ty))[1] - ax.transData.transform((0, last))[1]) * to_points
            ax.annotate(f"{last - ref:+.1f}", (x_end, last), textcoords="offset points", xytext=(6, dy),
                        va="center", color=palette[name] if name is not None else "black", fontsize="small",
                        bbox=_LABEL_BOX)
        if ends:  # the legend says what the numbers are (they were explained in README captions only)
            label, _, key = max(lines, key=lambda line: line[1])
            best = key if key != _BASELINE_KEY else label  # a method's bare name; a number's note
            _legend_note(ax, f"\u00b1x.x: end point \u2212 {best}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.3, len(labels) - 1 + (0.6 if annotate_gain else 0.3))
    ax.set_xlabel(r"Retrieval budget $(r_q, r_c)$" + band_note(data, [hue if has_hue else None, "_budget"], errorbar))
    ax.set_ylabel(_metric_label(df, y, ylabel))
    if title:
        ax.set_title(title)
    if hue_kw or lines:
        ax.legend(title=None)
    return fig


def plot_budget_facets(
    df: pd.DataFrame,
    col: str = "model",
    x: str = "budget",
    y: str = "value",
    hue: str | None = "method",
    baseline: Any = None,
    *,
    col_order: Sequence[Any] | None = None,
    col_wrap: int = 4,
    sharey: bool = False,
    ylabel: str | None = None,
    annotate_gain: bool = True,
    panel_baselines: Mapping[Any, Any] | None = None,
    chance: int | tuple[str, float] | None = None,
    baseline_note: str | None = "best single-vector",
) -> Figure:
    """One :func:`plot_budget_curves` panel per value of ``col`` (Fig. 3: one panel per model size).

    A ``baseline`` method name is resolved within each panel, so every model gets its
    own single-vector line.  ``panel_baselines`` (``{col value: baseline}``, any form
    :func:`plot_budget_curves` takes, ``None`` for none) gives each panel its own baseline, e.g.
    the best single-vector method of each panel (:func:`metaembed.ablations.curves_vs_best_single`);
    panels it does not name fall back to ``baseline``.  One palette serves every panel, so a
    method keeps its colour across panels even where another is missing; the first panel's legend
    lists every panel's curves and baselines.  ``chance`` draws chance P@1 (or a ``(label, level)`` line)
    in every panel; ``baseline_note`` as in :func:`plot_budget_curves`.
    """
    cols = list(col_order) if col_order is not None else list(pd.unique(df[col]))
    ncols = min(col_wrap, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), sharey=sharey, squeeze=False)
    panel = {c: panel_baselines[c] if panel_baselines is not None and c in panel_baselines else baseline for c in cols}
    names = list(pd.unique(df[hue])) if hue is not None and hue in df.columns else []
    for c in cols:  # every panel's baseline colour names (e.g. "single-vector" for a number)
        names += [name for _, _, name in _baseline_lines(df[df[col] == c], panel[c], hue, y, baseline_note)[1]
                  if name not in names]
    palette = method_palette(names)
    for ax, c in zip(axes.flat, cols):
        plot_budget_curves(df[df[col] == c], x=x, y=y, hue=hue, baseline=panel[c], ylabel=ylabel,
                           annotate_gain=annotate_gain, title=str(c), palette=palette, chance=chance,
                           baseline_note=baseline_note, ax=ax)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    for ax in list(axes.flat)[len(cols):]:
        ax.set_visible(False)
    entries = legend_entries(axes.flat)  # a curve or baseline of a later panel only was left out
    if entries:
        axes.flat[0].legend(list(entries.values()), list(entries), title=None)
    fig.tight_layout()
    return fig


def plot_scaling(
    df: pd.DataFrame,
    x: str = "params",
    y: str = "value",
    hue: str = "method",
    *,
    label: str | None = "model",
    ylabel: str | None = None,
    annotate_gain: bool = True,
    logx: bool = True,
    chance: int | tuple[str, float] | None = None,
    ax: plt.Axes | None = None,
) -> Figure:
    """Score vs model size (Fig. 4a): e.g. MetaEmbed (16,64) vs the best single-vector method.

    Args:
        df: tidy frame: ``x`` = parameter count, ``y`` = score, ``hue`` = method;
            optional ``label`` column (e.g. ``"Qwen2.5-VL-3B"``) names each size on the x axis.
        annotate_gain: write each point's gain over the preceding size of the same method
            (the paper's green numbers); at each size the highest point's label goes above it and
            the others' below theirs, stacked (:func:`gain_label_offsets`), so equal or close heights do not overlap.
        chance: draw chance P@1 for this many candidates per query, or a ``(label, level)`` pair
            (:func:`chance_line`), before the gain labels are placed (a line drawn afterwards can widen
            the y-limits under them) and before the legend's note on what they are.

    Rows with a missing (NaN) score are left out with a warning naming them; gains are then over
    the preceding size that has a score.

    Raises:
        ValueError: several ``label`` values (models) at one size, or rows of one point that differ in
            ``model``, ``group`` or ``metric`` or repeat a ``seed``: they would be averaged into one
            point under one model's tick label.
    """
    data = _drop_missing(df, y, [hue, label, x], "plot_scaling").sort_values(x)
    if label is not None and label in data.columns:
        n_labels = data.groupby(x, sort=True)[label].nunique(dropna=False)
        if (n_labels > 1).any():
            size = n_labels[n_labels > 1].index[0]
            models = [str(v) for v in pd.unique(data.loc[data[x] == size, label])]
            raise ValueError(f"plot_scaling: {len(models)} {label!r} values {models} at {x}={size} would share "
                             f"one point and one tick; pass one model per size (e.g. one backbone family)")
    _check_one_series(data, [hue, x], "plot_scaling", "the point")
    fig, ax = _new_axes(ax)
    agg = data.groupby([hue, x], sort=False, as_index=False)[y].mean()
    hue_order = list(pd.unique(data[hue]))
    palette = method_palette(hue_order)
    sns.lineplot(data=data, x=x, y=y, hue=hue, palette=palette, marker="o", errorbar="sd",
                 ax=ax, hue_order=hue_order)
    if logx:
        ax.set_xscale("log")
    if chance is not None:
        chance_line(ax, chance)
    if annotate_gain:
        labels = []
        for name, g in agg.groupby(hue, sort=False):
            g = g.sort_values(x)
            for (_, prev), (_, cur) in zip(g.iloc[:-1].iterrows(), g.iloc[1:].iterrows()):
                labels.append((name, cur[x], cur[y], f"{cur[y] - prev[y]:+.1f}"))
        if labels:
            ax.margins(y=0.12)  # room for the labels above the highest and below the lowest point
            ax.autoscale_view()
        # stack the labels in display points, so close (not only equal) heights of 3+ methods stay apart
        to_points = 72.0 / ax.figure.dpi
        heights = [float(ax.transData.transform((px, py))[1]) * to_points for _, px, py, _ in labels]
        offsets = gain_label_offsets([(px, h) for (_, px, _, _), h in zip(labels, heights)])
        for (name, px, py, text), off in zip(labels, offsets):
            ax.annotate(text, (px, py), textcoords="offset points", xytext=off, ha="center",
                        va="bottom" if off[1] > 0 else "top", fontsize="small", color=palette[name],
                        bbox=_LABEL_BOX)
        if labels:
            _legend_note(ax, "\u00b1x.x: gain over the next smaller size")
    sizes = sorted(pd.unique(data[x]))
    ax.set_xticks(sizes)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    if label is not None and label in data.columns:
        names = data.drop_duplicates(x).set_index(x)[label]
        ax.set_xticklabels(
            [str(names[s]) if str(names[s]) == format_params(s) else f"{names[s]}\n{format_params(s)}" for s in sizes]
        )
    else:
        ax.set_xticklabels([format_params(s) for s in sizes])
    ax.set_xlabel("Model size (parameters" + (", log scale" if logx else "") + ")" + band_note(data, [hue, x]))
    ax.set_ylabel(_metric_label(df, y, ylabel))
    ax.legend(title=None)
    return fig


def gain_label_offsets(points: Sequence[tuple[float, float]], *, above: float = 5.0, below: float = -5.0,
                       step: float = 11.0) -> list[tuple[float, float]]:
    """Offsets (points) that keep value labels of points sharing an x from overlapping.

    ``points`` are ``(x, y)`` with ``y`` in display points (``step`` is a label's height plus a gap).
    At each x, the label of the highest point goes ``above`` it and every other label below its
    point, ``below`` under it or, when the label of the next higher point reaches lower, ``step``
    under that label's top (equal or close heights of several methods stack; ties in ``points``
    order, first nearest).  Returns one ``(dx, dy)`` per point, for
    ``annotate(..., textcoords="offset points", xytext=...)`` with ``va="bottom"`` for positive
    and ``va="top"`` for negative ``dy``.
    """
    out: list[tuple[float, float]] = [(0.0, above)] * len(points)
    by_x: dict[float, list[int]] = {}
    for i, (px, _) in enumerate(points):
        by_x.setdefault(float(px), []).append(i)
    for idx in by_x.values():
        idx = sorted(idx, key=lambda i: -float(points[i][1]))  # stable: ties keep their order
        label_top = math.inf  # top edge of the previous label below its point
        for i in idx[1:]:
            yv = float(points[i][1])
            dy = min(below, label_top - step - yv)
            out[i] = (0.0, dy)
            label_top = yv + dy
    return out


def plot_latency_memory(
    df: pd.DataFrame,
    x: str = "budget",
    latency: str = "latency_ms",
    memory: str = "memory_gib",
    hue: str | None = None,
    *,
    latency_std: str | None = "latency_std_ms",
    title: str | None = None,
    log: bool = False,
    palette: Mapping[Any, str] | None = None,
    latency_label: str = "Scoring latency (ms)",
) -> Figure:
    """Scoring latency (ms) and index memory (GiB) vs retrieval budget, two panels (Fig. 2 middle, Table 3).

    Args:
        df: one row per budget (and ``hue`` value, e.g. device or model), with columns
            ``latency`` (mean ms), ``memory`` (GiB) and optionally ``latency_std`` (mean ± sd error bars).
        hue: one line per value, in order of appearance, with a legend right of the memory panel.
        log: log-scale y axes.  An error bar whose lower end ``mean - sd`` is <= 0 has no place there: the
            axis then starts one decade below the fastest mean, such a bar (or one reaching below that) is cut
            there, and the panel says so.
        palette: ``{hue value: colour}``; default :func:`method_palette`.
        latency_label: the latency axis' label (e.g. ``"Scoring latency, 1 query (ms)"``).

    Raises:
        ValueError: several rows of one budget (and ``hue`` value), e.g. two models without ``hue``.
    """
    data = df.copy()
    data["_budget"] = data[x].map(budget_label)
    keys = ["_budget"] if hue is None else [hue, "_budget"]
    dup = data.duplicated(keys)
    if dup.any():  # one line would zigzag through the rows of several devices / models
        first = data[dup].iloc[0]
        where = f"budget {first['_budget']}" + ("" if hue is None else f", {hue}={first[hue]!r}")
        raise ValueError(f"plot_latency_memory needs one row per budget{'' if hue is None else ' and ' + hue}; "
                         f"{where} has {int((data[keys] == first[keys]).all(axis=1).sum())} rows"
                         + (" (pass hue= the column that tells them apart)" if hue is None else ""))
    labels = sort_budgets(data["_budget"].tolist())
    data["_x"] = data["_budget"].map({b: i for i, b in enumerate(labels)})
    means = pd.to_numeric(data[latency], errors="coerce").to_numpy(dtype=float)
    if log and not (means[np.isfinite(means)] > 0).all():
        raise ValueError(f"plot_latency_memory(log=True): {latency!r} has values <= 0, which a log axis cannot show")
    bottom = 10.0 ** math.floor(math.log10(np.nanmin(means))) / 10 if log and np.isfinite(means).any() else None
    groups = list(data.groupby(hue, sort=False)) if hue is not None else [(None, data)]
    if palette is None:
        palette = method_palette([name for name, _ in groups]) if hue is not None else {}
    elif hue is not None and any(name not in palette for name, _ in groups):
        raise ValueError(f"palette has no colour for {[n for n, _ in groups if n not in palette]}")
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(11.0 if hue is not None else 10.0, 3.8))
    cut = 0
    for name, g in groups:
        g = g.sort_values("_x")
        color = palette[name] if name is not None else METHOD_COLORS["metaembed"]
        mean = pd.to_numeric(g[latency], errors="coerce").to_numpy(dtype=float)
        yerr = None
        if latency_std is not None and latency_std in g.columns:  # no spread (one timed run): None, no bars
            sd = pd.to_numeric(g[latency_std], errors="coerce").to_numpy(dtype=float)
            if not np.isnan(sd).all():  # a NaN std draws no bar (0 would draw caps: "± 0")
                lower = sd.copy()
                if bottom is not None:  # mean - sd <= 0 (or below the axis): the bar ends at the axis
                    over = mean - sd < bottom
                    cut += int(over.sum())
                    lower = np.where(over, mean - bottom, sd)
                yerr = np.vstack([lower, sd])  # [2, n_budgets]
        ax_l.errorbar(g["_x"], mean, yerr=yerr, marker="o", color=color, capsize=3,
                      label=str(name) if name is not None else None)
        ax_m.plot(g["_x"], g[memory], marker="s", color=color, label=str(name) if name is not None else None)
    for ax, ylabel in ((ax_l, latency_label), (ax_m, "Index memory (GiB)")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(r"Retrieval budget $(r_q, r_c)$")
        ax.set_ylabel(ylabel + (", log scale" if log else ""))
        if log:
            ax.set_yscale("log")
    if cut:  # otherwise the axis fits the bars as they are
        ax_l.set_ylim(bottom=bottom)
        ax_l.text(0.02, 0.02, f"{cut} bar(s) cut at the axis (mean − sd < {bottom:g})", transform=ax_l.transAxes,
                  fontsize="x-small", color="0.3", va="bottom")
    if hue is not None:
        ax_m.legend(title=None, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_projection(
    df2d: pd.DataFrame,
    hue: str = "label",
    style: str | None = None,
    *,
    title: str | None = None,
    alpha: float = 0.7,
    ax: plt.Axes | None = None,
) -> Figure:
    """Scatter of a :func:`metaembed.probes.project_2d` frame (x, y, label), coloured by ``hue``.

    Axis labels name the method (``PC 1 (42% var.)`` for PCA, ``UMAP 1`` for UMAP) from ``df2d.attrs``.
    """
    fig, ax = _new_axes(ax, (5.0, 4.5))
    sns.scatterplot(data=df2d, x="x", y="y", hue=hue, style=style, palette=method_palette(df2d[hue]),
                    alpha=alpha, s=18, linewidth=0, ax=ax)
    method = str(df2d.attrs.get("method", "pca")).lower()
    if method == "pca":
        evr = df2d.attrs.get("explained_variance_ratio")
        evr = None if evr is None else [float(v) for v in evr]  # a list or an array (sklearn's own)
        names = [f"PC {i + 1}" + (f" ({evr[i]:.0%} var.)" if evr and i < len(evr) else "") for i in range(2)]
    else:
        names = [f"{method.upper()} {i + 1}" for i in range(2)]
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_aspect("equal", adjustable="datalim")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.legend(title=None, markerscale=1.5)
    if title:
        ax.set_title(title)
    return fig


_PROBE_LABELS = {
    "centroid_gap": "Centroid gap ||μ_a − μ_b||",
    "relative_gap": "Relative gap (gap / spread)",
    "separability": "Linear separability (bal. acc.)",
    "mean_cos_cross": "Mean cross cosine",
}


#: Columns of a probe report row that locate it (not a series): ignored when naming what tells rows apart.
_GAP_POINT_COLUMNS = ("level", "token", "r_a", "r_b", "budget", "probe", "value", "_x", "_budget")


def _check_one_report(data: pd.DataFrame, cell: Sequence[str]) -> None:
    """Refuse rows of one probe point (``cell``) from several reports unless they are repeats of one report over
    seeds: a ``seed`` column tells them apart and no other column (a model, method, role ...) does."""
    dup = data.duplicated(cell, keep=False)
    others = [c for c in data.columns if c not in _GAP_POINT_COLUMNS and c not in cell and c != "seed"]
    for _, rows in data[dup].groupby(list(cell), sort=False, dropna=False):
        varying = [c for c in others if rows[c].astype(str).nunique() > 1]
        if not varying and "seed" in rows.columns and not rows["seed"].duplicated().any():
            continue  # repeats of one report over seeds: averaged with an sd band
        first = rows.iloc[0]
        where = f"budget {first['_budget']}" if "_budget" in rows.columns else f"Meta Token {int(first['_x'])}"
        at = ", ".join([f"{c}={str(first[c])!r}" for c in cell if c != "_x"] + [where])
        raise ValueError(f"plot_gap_by_token: {len(rows)} rows at {at} would be averaged into one point; "
                         + (f"pass hue= the column that tells them apart ({', '.join(varying)}) or select one"
                            if varying else "select one report (no column tells the rows apart)"))


def plot_gap_by_token(
    gap_df: pd.DataFrame,
    probes: Sequence[str] | None = ("centroid_gap", "relative_gap", "separability"),
    hue: str | None = None,
    *,
    level: str = "token",
    title: str | None = None,
) -> Figure:
    """Modality-gap probes per Meta Token index (``level="token"``) or per budget (``level="budget"``).

    One panel per probe (scales differ); ``hue`` names a column that distinguishes
    reports concatenated together (e.g. ``"condition"`` = init/trained, ``"method"`` =
    MMR/NoMMR, ``"tau"``).  Separability panels show the 0.5 chance level dashed.

    Several rows of one point (probe, ``hue`` value, token or budget) are averaged with an sd band
    only when they are repeats of one report: a ``seed`` column tells them apart and no other does.

    Raises:
        ValueError: several rows of one point that are not seed repeats, e.g. reports of several models
            or roles concatenated without ``hue`` (with or without distinct seeds): they would be averaged
            into a point no model has (the message names the columns that differ).
    """
    data = gap_df[gap_df["level"] == level].copy()
    if data.empty:
        raise ValueError(f"gap_df has no rows with level={level!r}")
    probes = list(probes) if probes is not None else list(pd.unique(data["probe"]))
    missing = [p for p in probes if p not in set(data["probe"])]
    if missing:
        raise ValueError(f"probes {missing} not in gap_df (has {sorted(set(data['probe']))})")
    # the two sides compared (a pair column such as "image vs text"), named in titles and labels
    pairs = list(pd.unique(data["pair"].astype(str))) if "pair" in data.columns else []
    side_a, side_b = pairs[0].split(" vs ", 1) if len(pairs) == 1 and " vs " in pairs[0] else ("a", "b")
    tick_labels = None
    if level == "token":
        data["_x"] = data["token"].astype(int) + 1
        xlabel = "Meta Token index r"
        labels = None
    else:
        data["_budget"] = data["budget"].map(budget_label)  # "(1, 2)", (1, 2), "1x2" -> "(1,2)"
        labels = sort_budgets(data["_budget"].tolist())
        data["_x"] = data["_budget"].map({b: i for i, b in enumerate(labels)})
        prefixes = [parse_budget(b) for b in labels]
        if all(r_a == r_b for r_a, r_b in prefixes):
            # one prefix length for both sides: not a retrieval budget (r_q, r_c), so not written as one
            tick_labels = [str(r_a) for r_a, _ in prefixes]
            xlabel = "r (mean of the first r vectors)"
        else:
            xlabel = f"(r_{side_a}, r_{side_b}) (mean of the first r vectors)"
    data = data[data["probe"].isin(probes)].copy()
    _check_one_report(data, [c for c in (hue, "probe", "_x") if c is not None])
    fig, axes = plt.subplots(1, len(probes), figsize=(4.2 * len(probes), 3.6), squeeze=False)
    hue_kw: dict[str, Any] = {}
    if hue is not None:
        data[hue] = data[hue].astype(str)
        hue_kw = {"hue": hue, "palette": method_palette(data[hue]), "hue_order": list(pd.unique(data[hue]))}
    for ax, probe in zip(axes.flat, probes):
        part = data[data["probe"] == probe]
        sns.lineplot(data=part, x="_x", y="value", marker="o", errorbar="sd", ax=ax, **hue_kw)
        if probe == "separability":
            ax.axhline(0.5, linestyle="--", color="grey", linewidth=1, label="chance")
        if hue is not None and part[hue].nunique() > 1:
            spread = part.groupby("_x")["value"].agg(lambda v: float(v.max() - v.min()))
            if bool((spread <= 1e-9).all()):  # every curve drawn on the last one: say so, the legend names them all
                n = part[hue].nunique()
                ax.text(0.5, 0.35, "both curves coincide" if n == 2 else f"all {n} curves coincide",
                        transform=ax.transAxes, ha="center", va="center", fontsize="small", color="0.3")
        title = _PROBE_LABELS.get(probe, probe.replace("_", " "))
        ax.set_title(title.replace("μ_a", f"μ_{side_a}").replace("μ_b", f"μ_{side_b}"))  # the sides' names
        ax.set_xlabel(xlabel + band_note(part, [hue, "_x"]))
        ax.set_ylabel("")
        if labels is not None:
            ax.set_xticks(range(len(labels)), tick_labels or labels, rotation=0 if tick_labels else 30)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend() is not None and ax is not axes.flat[0]:
            ax.get_legend().remove()
    if hue is not None:
        axes.flat[0].legend(title=hue)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
