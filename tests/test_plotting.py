"""Figure style and plot helpers (Agg backend, no display)."""
from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from metaembed import plotting as P
from metaembed.probes import gap_report, project_2d

BUDGETS = [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]


@pytest.fixture(autouse=True)
def _style():
    P.set_style()
    yield
    plt.close("all")


def budget_frame() -> pd.DataFrame:
    rows = []
    for method, base in (("MMR", 60.0), ("NoMMR", 50.0)):
        for i, b in enumerate(BUDGETS):
            for seed in (0, 1):
                rows.append({"method": method, "budget": b, "value": base + 2 * i + seed, "metric": "P@1", "seed": seed})
    for method, v in (("single-last", 58.0), ("single-mean", 57.0)):
        rows.append({"method": method, "budget": (1, 1), "value": v, "metric": "P@1", "seed": 0})
    return pd.DataFrame(rows)


def test_budget_label_and_parse():
    assert P.budget_label((16, 64)) == "(16,64)"
    assert P.budget_label([2, 4]) == "(2,4)"
    assert P.budget_label("(16, 64)") == "(16,64)"
    assert P.budget_label(4) == "(4,4)"
    assert P.parse_budget("8x16") == (8, 16)
    assert P.parse_budget("4") == (4, 4) and P.parse_budget(np.int64(2)) == (2, 2)
    assert P.sort_budgets(["(16,64)", (1, 1), "(4,8)", (2, 4), (1, 1)]) == ["(1,1)", "(2,4)", "(4,8)", "(16,64)"]
    with pytest.raises(ValueError):
        P.parse_budget("(1,2,3)")


def test_sort_budgets_orders_by_scoring_cost_then_r_q():
    """Group order is r_q * r_c (scoring cost), then r_q: (2,4) before (1,16); equal costs in r_q order (a set's
    iteration order would differ between processes)."""
    assert P.sort_budgets([(1, 16), (2, 4), (1, 1)]) == ["(1,1)", "(2,4)", "(1,16)"]
    same_cost = [(64, 1), (8, 8), (1, 64), (32, 2), (4, 16), (2, 32), (16, 4)]
    assert P.sort_budgets(same_cost) == ["(1,64)", "(2,32)", "(4,16)", "(8,8)", "(16,4)", "(32,2)", "(64,1)"]


def test_palette_is_stable_and_keyed_by_method():
    pal = P.method_palette(["MMR", "NoMMR", "single-last", "split-(16,64)", "my-new-method"])
    assert pal["MMR"] == P.METHOD_COLORS["mmr"] == P.method_color("MetaEmbed")
    assert pal["split-(16,64)"] == P.method_color("split")
    assert len({pal["MMR"], pal["NoMMR"], pal["single-last"], pal["split-(16,64)"]}) == 4
    assert P.method_color("my-new-method") == pal["my-new-method"]  # md5-based: same in every process
    assert P.format_params(3.1e9) == "3.1B" and P.format_params(2_000_000) == "2M" and P.format_params(12) == "12"


def test_plot_budget_curves_with_named_baseline():
    fig = P.plot_budget_curves(budget_frame(), baseline="single-last", annotate_gain=True)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [P.budget_label(b) for b in BUDGETS]
    assert ax.get_ylabel() == "Precision@1 (%)"
    assert "budget" in ax.get_xlabel().lower()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "MMR" in legend and "NoMMR" in legend
    assert any("single-last" in t for t in legend)  # dashed baseline has a legend entry
    assert "single-mean" in legend  # not the baseline: stays a curve
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(58.0)


@pytest.mark.parametrize("baseline", [58.0, 58, np.int64(58), ("single-last", 58.0),
                                      {"single-last": 58.0, "single-mean": 57.0}])
def test_plot_budget_curves_numeric_baselines(baseline):
    df = budget_frame()
    df = df[df.method.isin(["MMR", "NoMMR"])]
    df = df.assign(budget=df.budget.map(P.budget_label))  # labels work as well as tuples
    fig = P.plot_budget_curves(df, baseline=baseline, ylabel="NDCG@5 (%)")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "NDCG@5 (%)"
    assert len([ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]) == (2 if isinstance(baseline, dict) else 1)


@pytest.mark.parametrize("baseline", [("single-last", "single-mean"), ["single-last", "single-mean"]])
def test_plot_budget_curves_two_baseline_names(baseline):
    """A tuple of two method names is a list of baselines, not a ``(label, value)`` pair."""
    fig = P.plot_budget_curves(budget_frame(), baseline=baseline)
    ax = fig.axes[0]
    dashed = sorted(ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--")
    assert dashed == [pytest.approx(57.0), pytest.approx(58.0)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "single-last" in legend and "single-mean" in legend


def test_named_baseline_is_the_mean_of_its_rows_over_seeds_and_budgets():
    """A single-vector method scored at several budgets and seeds: the dashed line is the mean of all its rows (one
    seed repeated across budgets is not an error there), and the rows leave the curves."""
    df = budget_frame()[lambda d: d["method"] == "MMR"]
    base = pd.DataFrame([{"method": "single-last", "budget": b, "value": v, "metric": "P@1", "seed": s}
                         for b in ((1, 1), (2, 4)) for s, v in ((0, 56.0), (1, 58.0))])
    ax = P.plot_budget_curves(pd.concat([df, base], ignore_index=True), baseline="single-last",
                              annotate_gain=True).axes[0]
    (dashed,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert dashed.get_ydata()[0] == pytest.approx(57.0)
    assert [t.get_text() for t in ax.texts] == [f"{68.5 - 57.0:+.1f}"]  # MMR at (16,64): mean of seeds 68, 69
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["MMR", "single-last (best single-vector)", "\u00b1x.x: end point \u2212 single-last"]


def test_plot_budget_curves_label_value_pair_with_numpy_value():
    df = budget_frame()[lambda d: d["method"].isin(["MMR", "NoMMR"])]
    fig = P.plot_budget_curves(df, baseline=("single-last", np.float64(58.0)))
    dashed = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(58.0)


def test_plot_budget_facets_one_panel_per_model():
    df = pd.concat([budget_frame().assign(model=m) for m in ("3B", "7B", "32B")])
    fig = P.plot_budget_facets(df, col="model", baseline="single-last", col_wrap=2)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["3B", "7B", "32B"]


def test_plot_budget_facets_pass_on_ylabel_chance_and_sharey():
    """Fig. 3 passes ``chance`` and ``ylabel`` through every panel; dropping either, or ``sharey``, went unnoticed
    (a review helper)."""
    df = pd.concat([budget_frame().assign(model=m) for m in ("3B", "7B")])
    fig = P.plot_budget_facets(df, col="model", ylabel="Overall P@1 (%)", chance=8, sharey=True)
    for ax in fig.axes:
        chance = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith("chance")]
        assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(12.5)
    assert fig.axes[0].get_ylabel() == "Overall P@1 (%)"
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])
    separate = P.plot_budget_facets(df, col="model")
    assert not separate.axes[0].get_shared_y_axes().joined(separate.axes[0], separate.axes[1])


def test_plot_scaling_linear_axis_and_latency_title():
    df = pd.DataFrame({"params": [3e9, 7e9] * 2, "value": [69.1, 76.6, 65.6, 71.6],
                       "method": ["MetaEmbed (16,64)"] * 2 + ["single-last"] * 2, "model": ["3B", "7B"] * 2})
    assert P.plot_scaling(df, logx=False).axes[0].get_xscale() == "linear"
    table3 = pd.DataFrame({"budget": BUDGETS[:2], "latency_ms": [1.0, 2.0], "memory_gib": [0.5, 1.0]})
    fig = P.plot_latency_memory(table3, latency_std=None, title="Table 3 on CPU")
    assert fig._suptitle is not None and fig._suptitle.get_text() == "Table 3 on CPU"


def test_plot_scaling():
    df = pd.DataFrame(
        {
            "params": [3e9, 7e9, 32e9] * 2,
            "value": [69.1, 76.6, 78.7, 65.6, 71.6, 72.1],
            "method": ["MetaEmbed (16,64)"] * 3 + ["single-last"] * 3,
            "model": ["3B", "7B", "32B"] * 2,
            "metric": "MMEB",
        }
    )
    fig = P.plot_scaling(df)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "Model size (parameters, log scale)" and ax.get_ylabel() == "MMEB score (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3B", "7B", "32B"]
    assert "+7.5" in [t.get_text() for t in ax.texts]  # 3B -> 7B gain of MetaEmbed
    assert P.method_color("MetaEmbed (16,64)") == P.METHOD_COLORS["metaembed"]


def test_plot_latency_memory_two_panels():
    table3 = pd.DataFrame(
        {
            "budget": BUDGETS,
            "latency_ms": [1.67, 1.66, 1.67, 1.92, 6.25],
            "latency_std_ms": [0.13, 0.12, 0.12, 0.12, 0.07],
            "memory_gib": [0.68, 2.67, 5.34, 10.68, 42.72],
        }
    )
    fig = P.plot_latency_memory(table3)
    ax_l, ax_m = fig.axes
    assert ax_l.get_ylabel() == "Scoring latency (ms)" and ax_m.get_ylabel() == "Index memory (GiB)"
    assert [t.get_text() for t in ax_m.get_xticklabels()] == [P.budget_label(b) for b in BUDGETS]
    fig2 = P.plot_latency_memory(pd.concat([table3.assign(device="cpu"), table3.assign(device="A100")]), hue="device")
    assert fig2.axes[1].get_legend() is not None  # right of the memory panel, off the error bars


def test_plot_latency_memory_log_axes_cut_bars_that_reach_zero():
    """On the committed efficiency figure (log axes) sub-ms timings with sd >= mean drew bars down to 0, i.e. off
    the axis: they now end at the axis bottom (one decade below the fastest mean), counted in a note; the others
    keep mean ± sd."""
    df = pd.DataFrame({"setting": ["a"] * 3 + ["b"] * 3, "budget": BUDGETS[:3] * 2,
                       "latency_ms": [0.26, 1.0, 2.0, 20.0, 40.0, 80.0],
                       "latency_std_ms": [0.1, 1.6, 0.5, 1.0, 50.0, 2.0],
                       "memory_gib": [1e-4, 2e-4, 4e-4, 1e-2, 2e-2, 4e-2]})
    colours = {"a": "#111111", "b": "#222222"}
    fig = P.plot_latency_memory(df, hue="setting", log=True, palette=colours,
                                latency_label="Scoring latency, 1 query (ms)")
    ax_l, ax_m = fig.axes
    assert ax_l.get_yscale() == ax_m.get_yscale() == "log"
    assert ax_l.get_ylabel() == "Scoring latency, 1 query (ms), log scale"
    assert ax_l.get_ylim()[0] == pytest.approx(0.01)  # 10 ** floor(log10(0.26)) / 10
    lows = [seg[0][1] for c in ax_l.containers for seg in c.lines[2][0].get_segments()]
    assert lows == pytest.approx([0.16, 0.01, 1.5, 19.0, 0.01, 78.0])
    assert [t.get_text() for t in ax_l.texts] == ["2 bar(s) cut at the axis (mean − sd < 0.01)"]
    assert [ln.get_color() for ln in ax_m.get_lines()] == ["#111111", "#222222"]
    assert [t.get_text() for t in ax_m.get_legend().get_texts()] == ["a", "b"]
    fig = P.plot_latency_memory(df.assign(latency_std_ms=0.01), hue="setting", log=True)  # nothing to cut
    assert not fig.axes[0].texts and fig.axes[0].get_ylim()[0] > 0.1  # the axis fits the bars
    fig = P.plot_latency_memory(df[df["setting"] == "b"], log=False)  # linear axes: mean ± sd as given
    lows = [seg[0][1] for seg in fig.axes[0].containers[0].lines[2][0].get_segments()]
    assert lows == pytest.approx([19.0, -10.0, 78.0]) and not fig.axes[0].texts
    with pytest.raises(ValueError, match="palette has no colour for \\['b'\\]"):
        P.plot_latency_memory(df, hue="setting", palette={"a": "k"})
    with pytest.raises(ValueError, match="values <= 0"):
        P.plot_latency_memory(df.assign(latency_ms=0.0), hue="setting", log=True)
    plt.close("all")


def test_plot_projection_and_gap_by_token():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((40, 4, 8)) + np.eye(8)[0]
    txt = rng.standard_normal((40, 4, 8)) - np.eye(8)[0]
    df2d = project_2d(np.concatenate([img[:, 0], txt[:, 0]]), ["image"] * 40 + ["text"] * 40)
    fig = P.plot_projection(df2d)
    assert fig.axes[0].get_xlabel().startswith("PC 1")
    gap = pd.concat([gap_report(img, txt, cv=3).assign(condition=c) for c in ("init", "trained")])
    fig = P.plot_gap_by_token(gap, hue="condition", title="gap")
    assert len(fig.axes) == 3 and fig.axes[0].get_xlabel() == "Meta Token index r"
    # one panel per probe in the order asked for; separability's chance level is 0.5 (balanced accuracy)
    assert [ax.get_title() for ax in fig.axes] == ["Centroid gap ||μ_a − μ_b||", "Relative gap (gap / spread)",
                                                   "Linear separability (bal. acc.)"]
    dashed = [ln.get_ydata()[0] for ln in fig.axes[2].get_lines() if ln.get_linestyle() == "--"]
    assert dashed == [0.5]
    legend = fig.axes[0].get_legend() or fig.legends[0]
    assert legend.get_title().get_text() == "condition"
    fig = P.plot_gap_by_token(gap[gap["condition"] == "trained"], probes=["centroid_gap"], level="budget")
    # (r, r) prefixes of both sides are not a retrieval budget (r_q, r_c): one prefix length r per tick
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "4"]
    assert fig.axes[0].get_xlabel() == "r (mean of the first r vectors)"
    named = gap.assign(pair="image vs text")
    # separability saturated at 1.0 for both conditions (as in every modality_gap figure): the later curve hides
    # the earlier one, which the legend still names, so the panel says so
    named.loc[named["probe"] == "separability", "value"] = 1.0
    named.loc[(named["probe"] == "centroid_gap") & (named["condition"] == "trained"), "value"] += 0.1  # apart
    fig = P.plot_gap_by_token(named, probes=["centroid_gap", "separability"], hue="condition", level="budget")
    assert fig.axes[0].get_title() == "Centroid gap ||μ_image − μ_text||"
    assert [t.get_text() for t in fig.axes[1].texts] == ["both curves coincide"]
    assert len(fig.axes[0].texts) == 0
    with pytest.raises(ValueError, match="not in gap_df"):
        P.plot_gap_by_token(gap, probes=["nope"])


@pytest.mark.parametrize("level", ["token", "budget"])
def test_plot_gap_by_token_refuses_to_average_reports_without_hue(level):
    """Two reports concatenated without hue used to be averaged silently into one curve no model has."""
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((20, 3, 8)), rng.standard_normal((20, 3, 8))
    gap = pd.concat([gap_report(img + 3 * np.eye(8)[0], txt, cv=3).assign(condition="trained"),
                     gap_report(img, txt, cv=3).assign(condition="init")], ignore_index=True)
    with pytest.raises(ValueError, match=r"averaged into one point; pass hue=.*\(condition\)"):
        P.plot_gap_by_token(gap, probes=["centroid_gap"], level=level)
    fig = P.plot_gap_by_token(gap, probes=["centroid_gap"], hue="condition", level=level)
    drawn = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata())]
    assert len(drawn) == 2  # one curve per condition, never their mean
    # repeats of one report over distinct seeds are what the sd band is for
    seeds = pd.concat([gap_report(img, txt, cv=3).assign(seed=s) for s in (0, 1)], ignore_index=True)
    P.plot_gap_by_token(seeds, probes=["centroid_gap"], level=level)
    with pytest.raises(ValueError, match="averaged into one point"):
        P.plot_gap_by_token(pd.concat([seeds, seeds]), probes=["centroid_gap"], level=level)
    # two models that each carry a seed of their own are not repeats of one report: refused, naming the column
    models = pd.concat([gap_report(img + 3 * np.eye(8)[0], txt, cv=3).assign(method="MMR", seed=0),
                        gap_report(img, txt, cv=3).assign(method="NoMMR", seed=1)], ignore_index=True)
    with pytest.raises(ValueError, match=r"averaged into one point; pass hue=.*\(method\)"):
        P.plot_gap_by_token(models, probes=["centroid_gap"], level=level)
    P.plot_gap_by_token(models, probes=["centroid_gap"], hue="method", level=level)


@pytest.mark.parametrize("n, text", [(999_999, "1M"), (999_500, "1M"), (999_499, "999K"), (999_999_999, "1B"),
                                     (99_950, "100K"), (1_234_567, "1.23M"), (999, "999")])
def test_format_params_rounds_into_the_next_unit(n, text):
    """999,999 used to print "1000K": the unit was chosen before rounding."""
    assert P.format_params(n) == text


def test_save_figure_is_deterministic(tmp_path):
    def render() -> Figure:
        return P.plot_budget_curves(budget_frame(), baseline="single-last")

    png = P.save_figure(render(), "fig4b", out_dir=tmp_path / "a", pdf=True)
    assert png == tmp_path / "a" / "fig4b.png" and png.exists() and (tmp_path / "a" / "fig4b.pdf").exists()
    png2 = P.save_figure(render(), "fig4b.png", out_dir=tmp_path / "b", pdf=True, close=True)
    assert png.read_bytes() == png2.read_bytes()
    assert (tmp_path / "a" / "fig4b.pdf").read_bytes() == (tmp_path / "b" / "fig4b.pdf").read_bytes()
    assert b"Software" not in png.read_bytes()[:200]


def _hls(color: str) -> tuple[float, float, float]:
    import colorsys

    import matplotlib.colors as mc

    return colorsys.rgb_to_hls(*mc.to_rgb(color))


def test_palette_gives_variants_of_one_method_distinct_shades():
    """modality_gap's query-vs-candidate figure: three MetaEmbed temperatures, not three identical blues."""
    labels = ["init", "MetaEmbed τ=0.01", "MetaEmbed τ=0.03", "MetaEmbed τ=0.1", "NoMMR τ=0.03"]
    pal = P.method_palette(labels)
    assert list(pal) == labels
    assert len(set(pal.values())) == len(labels)
    assert pal["init"] == P.METHOD_COLORS["init"] and pal["NoMMR τ=0.03"] == P.METHOD_COLORS["nommr"]
    blue = _hls(P.METHOD_COLORS["metaembed"])
    shades = [_hls(pal[f"MetaEmbed τ={t}"]) for t in ("0.01", "0.03", "0.1")]
    assert all(abs(h - blue[0]) < 0.02 for h, _, _ in shades)  # shades of MetaEmbed's blue ...
    assert shades[0][1] < shades[1][1] < shades[2][1]  # ... dark to light in natural (numeric) order
    assert P.method_palette(labels[::-1]) == pal  # deterministic, independent of the order
    # one label of a method keeps its fixed colour; two labels sharing a colour are told apart
    assert P.method_palette(["MetaEmbed (16,64)", "single-last"])["MetaEmbed (16,64)"] == P.METHOD_COLORS["metaembed"]
    two = P.method_palette(["MMR", "trained"])
    assert two["MMR"] != two["trained"]


def test_palette_resolves_hash_collisions():
    a, b = "cuda (NVIDIA H200)", "cuda (NVIDIA H100 80GB HBM3)"
    assert P.method_color(a) == P.method_color(b)  # one table slot
    pal = P.method_palette([a, b])
    assert pal[a] != pal[b]
    many = P.method_palette([f"setting {i}" for i in range(40)] + ["MetaEmbed", "NoMMR"])
    assert len(set(many.values())) == 42
    assert many["MetaEmbed"] == P.METHOD_COLORS["metaembed"]
    assert P.method_palette([f"setting {i}" for i in range(40)]) == P.method_palette([f"setting {i}" for i in range(40)])


def test_plot_budget_curves_baseline_and_curve_colours_differ():
    df = budget_frame()[lambda d: d["method"] == "MMR"].assign(method="cuda (NVIDIA H200)")
    ax = P.plot_budget_curves(df, baseline=("chance (1/8)", 12.5)).axes[0]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 1]
    assert dashed and solid
    assert dashed[0].get_color() != solid[0].get_color()


def test_annotated_gain_is_over_the_best_baseline():
    """Fig. 3: the gain is over the best single-vector method (as in scaling_table), not the first listed."""
    rows = [{"method": "MetaEmbed", "budget": b, "value": 40.0} for b in BUDGETS]
    rows += [{"method": "single-last", "budget": (1, 1), "value": 25.0},
             {"method": "single-mean", "budget": (1, 1), "value": 35.0}]
    ax = P.plot_budget_curves(pd.DataFrame(rows), baseline=["single-last", "single-mean"], annotate_gain=True).axes[0]
    assert [t.get_text() for t in ax.texts] == ["+5.0"]
    fig = P.plot_budget_facets(pd.DataFrame(rows).assign(model="3B"), col="model",
                               baseline=["single-last", "single-mean"])
    assert [t.get_text() for t in fig.axes[0].texts] == ["+5.0"]


def test_unnamed_labels_never_get_a_look_alike_of_a_fixed_colour():
    """tab20's blue, orange and grey sit 30-38 RGB units from MetaEmbed's blue, single-mean's orange and init's grey:
    a GME or VLM2Vec curve beside MetaEmbed / single-mean looked like the same method."""
    names = ["MetaEmbed", "single-mean", "init", "GME", "VLM2Vec", "single-cls", "ColPali", "E5-V"]
    pal = P.method_palette(names)
    fixed = set(P.METHOD_COLORS.values())
    for name in names[3:]:
        assert min(P._rgb_distance(pal[name], f) for f in fixed) >= 50, name


def test_gain_labels_stay_apart_with_the_chance_line():
    """The notebooks drew the chance line after the curves, widening the y-range after the labels were spaced for
    the old one: '-2.6' was printed over '-3.2'.  chance= draws it before the labels are placed."""
    ends = {"MetaEmbed (MMR)": [30, 31, 31.5, 32, 32.4], "NoMMR": [26, 28, 30, 31, 31.8]}
    rows = [{"method": m, "budget": b, "value": v} for m, vals in ends.items() for b, v in zip(BUDGETS, vals)]
    rows.append({"method": "single-mean", "budget": (1, 1), "value": 35.0})
    fig = P.plot_budget_curves(pd.DataFrame(rows), baseline="single-mean", annotate_gain=True, chance=8)
    ax = fig.axes[0]
    assert any(ln.get_label() == "chance (1/8)" for ln in ax.get_lines()) and ax.get_ylim()[0] < 12.5
    fig.canvas.draw()
    boxes = {t.get_text(): t.get_window_extent() for t in ax.texts}
    assert set(boxes) == {"-2.6", "-3.2"} and not boxes["-2.6"].overlaps(boxes["-3.2"])
    plt.close(fig)


def test_gain_label_goes_to_the_largest_budget_under_a_custom_order():
    rows = [{"method": "MetaEmbed", "budget": b, "value": v} for b, v in (((1, 1), 10.0), ((2, 4), 20.0), ((16, 64), 30.0))]
    rows.append({"method": "single-last", "budget": (1, 1), "value": 5.0})
    fig = P.plot_budget_curves(pd.DataFrame(rows), baseline="single-last", annotate_gain=True,
                               order=["(16,64)", "(2,4)", "(1,1)"])
    (text,) = fig.axes[0].texts
    assert (text.get_text(), text.xy) == ("+25.0", (0, 30.0))  # was +5.0 at (1,1), the rightmost tick
    plt.close(fig)


def test_facets_legend_lists_what_later_panels_draw():
    """Only the first panel's legend was kept: a curve or baseline first drawn in a later panel had no entry."""
    rows = [{"model": "3B", "method": "MetaEmbed", "budget": b, "value": 30.0 + i} for i, b in enumerate(BUDGETS)]
    rows += [{"model": "3B", "method": "single-last", "budget": (1, 1), "value": 20.0}]
    rows += [{"model": "7B", "method": m, "budget": b, "value": v + i} for m, v in (("MetaEmbed", 40.0), ("NoMMR", 35.0))
             for i, b in enumerate(BUDGETS)]
    rows += [{"model": "7B", "method": "single-mean", "budget": (1, 1), "value": 30.0}]
    fig = P.plot_budget_facets(pd.DataFrame(rows), col="model", panel_baselines={"3B": "single-last", "7B": "single-mean"})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["MetaEmbed", "single-last (best single-vector)", "NoMMR", "single-mean (best single-vector)",
                      "\u00b1x.x: end point \u2212 single-last", "\u00b1x.x: end point \u2212 single-mean"]
    assert fig.axes[1].get_legend() is None
    plt.close(fig)


def test_gain_labels_of_close_end_points_do_not_overlap():
    """Fig. 4b: MMR 30.7 and NoMMR 29.7 at (16,64) printed '-18.2' over '-19.3' (both at their points' height);
    close labels are now spread apart, in the points' order, while a lone label stays at its point."""
    rows = [{"method": m, "budget": b, "value": v} for m, v in (("MetaEmbed", 30.7), ("NoMMR", 29.7), ("far", 5.0))
            for b in BUDGETS]
    rows += [{"method": "single-mean", "budget": (1, 1), "value": 49.0}]
    fig = P.plot_budget_curves(pd.DataFrame(rows), baseline="single-mean", annotate_gain=True)
    fig.canvas.draw()
    boxes = {t.get_text(): t.get_window_extent() for t in fig.axes[0].texts}
    assert set(boxes) == {"-18.3", "-19.3", "-44.0"}
    assert boxes["-18.3"].y0 >= boxes["-19.3"].y1 - 1  # above it, not overlapping
    far = next(t for t in fig.axes[0].texts if t.get_text() == "-44.0")
    assert far.xyann[1] == 0  # nothing near it: not moved
    plt.close(fig)


def test_plot_budget_facets_per_panel_baselines():
    df = pd.concat([budget_frame().assign(group="VQA"), budget_frame().assign(group="Retrieval")])
    fig = P.plot_budget_facets(df[df["method"].isin(["MMR", "NoMMR"]) | (df["group"] == "VQA") & (df["method"] == "single-last")
                                  | (df["group"] == "Retrieval") & (df["method"] == "single-mean")],
                               col="group", col_order=["VQA", "Retrieval"], annotate_gain=False,
                               panel_baselines={"VQA": "single-last", "Retrieval": "single-mean"})
    labels = [[ln.get_label() for ln in ax.get_lines() if ln.get_linestyle() == "--"] for ax in fig.axes[:2]]
    assert labels == [["single-last (best single-vector)"], ["single-mean (best single-vector)"]]


def test_gain_label_offsets_separate_equal_heights():
    offs = P.gain_label_offsets([(1, 30.0), (1, 30.0), (2, 40.0), (2, 35.0), (3, 20.0), (3, 20.0), (3, 20.0)])
    assert offs[0][1] > 0 and offs[1][1] < 0  # tie: one above, one below
    assert offs[2][1] > 0 and offs[3][1] < 0  # higher above, lower below
    assert len({o for o in offs[4:]}) == 3  # three tied labels at three offsets
    assert P.gain_label_offsets([(1, 5.0)]) == [(0.0, 5.0)]


def test_plot_scaling_gain_labels_do_not_overlap_at_equal_heights():
    """Fig. 4a: two methods with the same score at a size get their gain labels on opposite sides."""
    df = pd.DataFrame({"params": [1e6, 4e6] * 2, "value": [20.0, 25.0, 18.0, 25.0],
                       "method": ["MetaEmbed (16,64)"] * 2 + ["single-vector"] * 2, "model": ["xs", "s"] * 2})
    ax = P.plot_scaling(df).axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["+5.0", "+7.0"]
    fig = ax.figure
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert not boxes[0].overlaps(boxes[1])


def test_plot_scaling_gain_labels_of_three_close_methods_do_not_overlap():
    """Three methods within a point of each other at each size: the two labels below their points were placed
    5 points under each point and overlapped ('+10.6' over '+10.8'); they now stack in display space."""
    rows = [{"params": s, "value": v, "method": m, "model": name}
            for m, vals in (("MetaEmbed (16,64)", [20.0, 30.0, 40.6]), ("single-last", [19.0, 29.6, 40.3]),
                            ("single-mean", [18.5, 29.3, 40.0]))
            for s, v, name in zip([1e6, 4e6, 1.6e7], vals, ["xs", "s", "m"])]
    fig = P.plot_scaling(pd.DataFrame(rows))
    fig.canvas.draw()
    texts = fig.axes[0].texts
    assert len(texts) == 6
    boxes = [t.get_window_extent() for t in texts]
    assert not [(a.get_text(), b.get_text()) for (a, ba), (b, bb) in itertools.combinations(zip(texts, boxes), 2)
                if ba.overlaps(bb)]
    # still in the points' order at each size: MetaEmbed's label highest, single-mean's lowest
    for size in (4e6, 1.6e7):
        ys = [bx.y0 for t, bx in zip(texts, boxes) if t.xy[0] == size]
        assert ys == sorted(ys, reverse=True)
    plt.close(fig)


def test_gain_label_offsets_stack_close_heights():
    """Heights in display points: a label below its point moves further down only when the label above reaches it."""
    offs = P.gain_label_offsets([(1, 100.0), (1, 98.0), (1, 96.0), (2, 100.0), (2, 50.0), (2, 49.0)], step=11.0)
    assert offs[:3] == [(0.0, 5.0), (0.0, -5.0), (0.0, -14.0)]  # 98-5-11 = 82 = 96-14
    assert offs[3:] == [(0.0, 5.0), (0.0, -5.0), (0.0, -15.0)]


@pytest.mark.parametrize("budgets", [["(1, 1)", "(2, 4)", "(4, 8)"], [(1, 1), (2, 4), (4, 8)]],
                         ids=["spaced", "tuples"])
def test_plot_gap_by_token_budget_labels_in_any_form(budgets):
    """Budget labels other than "(r_a,r_b)" used to get ticks but no points: the panel came out empty."""
    gap = pd.DataFrame({"level": "budget", "token": pd.NA, "budget": budgets, "probe": "centroid_gap",
                        "value": [1.0, 2.0, 3.0]})
    ax = P.plot_gap_by_token(gap, probes=["centroid_gap"], level="budget").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["(1,1)", "(2,4)", "(4,8)"]
    drawn = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert [list(ln.get_ydata()) for ln in drawn] == [[1.0, 2.0, 3.0]]


def test_plot_budget_curves_missing_scores_are_named_not_annotated_as_nan():
    """A NaN score is left out with a warning naming it; the gain label is at the last scored budget, never '+nan'."""
    rows = [{"method": "MetaEmbed", "budget": b, "value": v} for b, v in zip(BUDGETS, [50.0, 52.0, 55.0, 57.0, np.nan])]
    rows.append({"method": "single-last", "budget": (1, 1), "value": 40.0})
    with pytest.warns(UserWarning, match=r"1 row\(s\) with a missing 'value' are not drawn.*MetaEmbed.*\(16,64\)"):
        ax = P.plot_budget_curves(pd.DataFrame(rows), baseline="single-last", annotate_gain=True).axes[0]
    assert [t.get_text() for t in ax.texts] == ["+17.0"]  # 57 at (8,16) over 40


def test_plot_scaling_missing_score_is_named_and_gains_skip_it():
    df = pd.DataFrame({"params": [1e6, 4e6, 1.6e7] * 2, "value": [50.0, np.nan, 60.0, 40.0, 45.0, 50.0],
                       "method": ["MetaEmbed (16,64)"] * 3 + ["single-vector"] * 3, "model": ["xs", "s", "m"] * 2})
    with pytest.warns(UserWarning, match=r"missing 'value' are not drawn.*MetaEmbed \(16,64\)', 's'"):
        ax = P.plot_scaling(df).axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["+10.0", "+5.0", "+5.0"]  # no '+nan'


def test_plot_latency_memory_draws_no_error_bars_for_single_runs():
    """A one-run benchmark has no std (None in its rows, object dtype in pandas): plain points, no crash."""
    table3 = pd.DataFrame({"budget": BUDGETS[:3], "latency_ms": [1.0, 2.0, 3.0], "latency_std_ms": [None] * 3,
                           "memory_gib": [0.1, 0.2, 0.4]})
    fig = P.plot_latency_memory(table3)
    container = fig.axes[0].containers[0]
    assert not container.has_yerr
    fig = P.plot_latency_memory(table3.assign(latency_std_ms=[0.1, None, 0.3]))
    assert fig.axes[0].containers[0].has_yerr


def test_plot_latency_memory_rejects_several_rows_per_budget():
    """Two models without hue= used to be joined into one zigzag line."""
    df = pd.DataFrame({"model": ["a", "a", "b", "b"], "budget": [(1, 1), (16, 64)] * 2,
                       "latency_ms": [1.0, 2.0, 10.0, 20.0], "memory_gib": [1.0, 2.0, 1.0, 2.0]})
    with pytest.raises(ValueError, match=r"one row per budget; budget \(1,1\) has 2 rows \(pass hue="):
        P.plot_latency_memory(df)
    with pytest.raises(ValueError, match=r"one row per budget and model; budget \(1,1\), model='a' has 2 rows"):
        P.plot_latency_memory(pd.concat([df, df]), hue="model")
    ax_l = P.plot_latency_memory(df, hue="model").axes[0]
    assert sorted(list(ln.get_ydata()) for ln in ax_l.get_lines()) == [[1.0, 2.0], [10.0, 20.0]]


def test_chance_line_is_one_over_n_candidates():
    fig, ax = plt.subplots()
    line = P.chance_line(ax, 8)
    assert line.get_ydata()[0] == pytest.approx(12.5) and line.get_label() == "chance (1/8)"
    assert P.chance_line(ax, 4, scale=1.0).get_ydata()[0] == pytest.approx(0.25)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_candidates"):
            P.chance_line(ax, bad)
    # a (label, level) pair: NDCG@k's random-ranking level, in the axis' units as given
    line = P.chance_line(ax, ("random ranking", 8.3))
    assert line.get_ydata()[0] == 8.3 and line.get_label() == "random ranking" and line.get_linestyle() == ":"
    for bad in (("random ranking", float("nan")), ("random ranking", "8.3"), (8, 3)):
        with pytest.raises(ValueError, match="finite number|n_candidates"):
            P.chance_line(ax, bad)
    plt.close(fig)


def test_a_lone_baseline_is_called_best_only_when_the_caller_says_so():
    """Fig. 3 of backbone_scaling labelled its only single-vector method "single-last (best single-vector)"."""
    rows = [{"model": m, "method": meth, "budget": b, "value": 10.0 + i + (m == "7B")}
            for m in ("3B", "7B") for meth in ("MetaEmbed", "single-last") for i, b in enumerate(BUDGETS)]
    df = pd.DataFrame(rows)
    labels = lambda fig: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fig = P.plot_budget_facets(df, col="model", baseline="single-last", chance=("random ranking", 5.0))
    assert labels(fig) == ["MetaEmbed", "single-last (best single-vector)", "random ranking",
                           "\u00b1x.x: end point \u2212 single-last"]
    fig = P.plot_budget_facets(df, col="model", baseline="single-last", baseline_note="single-vector")
    assert labels(fig) == ["MetaEmbed", "single-last (single-vector)", "\u00b1x.x: end point \u2212 single-last"]
    fig = P.plot_budget_curves(df[df["model"] == "3B"], baseline="single-last", baseline_note=None)
    assert labels(fig) == ["MetaEmbed", "single-last"]
    fig = P.plot_budget_curves(df[(df["model"] == "3B") & (df["method"] == "MetaEmbed")], baseline=12.0,
                               baseline_note="single-last")
    assert labels(fig) == ["MetaEmbed", "single-last"]
    plt.close("all")


def test_written_numbers_are_named_in_the_legend():
    """The numbers written beside the curves were explained in README captions only: the legend says what they are
    (the end point minus the highest baseline, named as its line is; the gain over the next smaller size)."""
    rows = [{"method": "MetaEmbed", "budget": b, "value": 10.0 + i} for i, b in enumerate(BUDGETS)]
    labels = lambda fig: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fig = P.plot_budget_curves(pd.DataFrame(rows), baseline={"single-mean": 12.0, "single-last": 9.0},
                               annotate_gain=True)
    assert labels(fig)[-1] == "\u00b1x.x: end point \u2212 single-mean"  # the highest line, which the numbers use
    fig = P.plot_budget_curves(pd.DataFrame(rows), baseline=12.0, baseline_note="single-vector", annotate_gain=True)
    assert labels(fig)[-1] == "\u00b1x.x: end point \u2212 single-vector"
    sizes = pd.DataFrame([{"method": m, "params": p, "value": v, "model": f"{p // 10**9}B"}
                          for m in ("MetaEmbed", "single-last") for p, v in ((3 * 10**9, 50.0), (7 * 10**9, 55.0))])
    assert labels(P.plot_scaling(sizes))[-1] == "\u00b1x.x: gain over the next smaller size"
    assert "gain" not in " ".join(labels(P.plot_scaling(sizes, annotate_gain=False)))
    # Fig. 4a's chance line is drawn by plot_scaling, before the note (the notebook drew it afterwards: note, then chance)
    fig = P.plot_scaling(sizes, chance=40)
    assert labels(fig) == ["MetaEmbed", "single-last", "chance (1/40)", "\u00b1x.x: gain over the next smaller size"]
    assert [ln.get_ydata()[0] for ln in fig.axes[0].get_lines() if ln.get_label() == "chance (1/40)"] == [2.5]
    plt.close("all")


def test_a_line_behind_the_legend_does_not_cross_its_text():
    """Legends had no frame: Fig. 4a's dotted chance line ran through the legend's note text."""
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="curve", color="blue")
    ax.axhline(0.5, color=(1.0, 0.0, 0.0), linewidth=12)  # through the centre, under the legend
    legend = ax.legend(loc="center")
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    box = legend.get_window_extent()
    height = rgba.shape[0]  # display y counts from the bottom, image rows from the top
    inside = rgba[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2, :3].astype(int)
    red = (inside[..., 0] > 200) & (inside[..., 1] < 60) & (inside[..., 2] < 60)
    assert inside.size and not red.any()  # the line is still behind it, only faded
    outside = rgba[:, :int(box.x0) - 2, :3].astype(int)
    assert ((outside[..., 0] > 200) & (outside[..., 1] < 60) & (outside[..., 2] < 60)).any()


def test_plot_budget_facets_keeps_a_labels_colour_in_every_panel():
    """Each panel took its own palette: 'MetaEmbed τ=0.03' was the base blue beside τ=0.01 and a dark shade
    where τ=0.01 was missing, while the figure's one legend showed the first panel's colours."""
    rows = [{"model": model, "method": f"MetaEmbed τ={t}", "budget": b, "value": 50.0 + i}
            for model, taus in (("3B", ("0.01", "0.03", "0.1")), ("7B", ("0.03", "0.1")))
            for t in taus for i, b in enumerate(BUDGETS)]
    fig = P.plot_budget_facets(pd.DataFrame(rows), col="model", annotate_gain=False)
    colours = [{ln.get_label(): ln.get_color() for ln in ax.get_lines() if not ln.get_label().startswith("_")}
               for ax in fig.axes[:2]]
    assert set(colours[1]) == {"MetaEmbed τ=0.03", "MetaEmbed τ=0.1"}
    assert all(colours[1][m] == colours[0][m] for m in colours[1])
    assert len(set(colours[0].values())) == 3


def test_plot_latency_memory_missing_std_draws_no_bar_at_that_point():
    """A NaN std was drawn as 0: caps at the point, a '± 0' spread never measured."""
    table3 = pd.DataFrame({"budget": BUDGETS[:3], "latency_ms": [1.0, 2.0, 3.0], "latency_std_ms": [0.1, None, 0.3],
                           "memory_gib": [0.1, 0.2, 0.4]})
    container = P.plot_latency_memory(table3).axes[0].containers[0]
    _, caps, (bars,) = container.lines
    assert [len(seg) for seg in bars.get_segments()] == [2, 0, 2]  # no bar at (2,4)
    assert all(np.isnan(float(cap.get_ydata()[1])) for cap in caps)  # and no caps there
    assert float(caps[0].get_ydata()[0]) == pytest.approx(0.9)


def test_plot_projection_reads_an_array_of_explained_variance():
    """attrs holding sklearn's array (not project_2d's list) raised 'truth value of an array is ambiguous'."""
    df2d = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 0.0, 1.0, 0.0], "label": ["image"] * 2 + ["text"] * 2})
    df2d.attrs.update(method="pca", explained_variance_ratio=np.array([0.42, 0.17]))
    ax = P.plot_projection(df2d).axes[0]
    assert ax.get_xlabel() == "PC 1 (42% var.)" and ax.get_ylabel() == "PC 2 (17% var.)"


def test_plot_scaling_refuses_two_models_at_one_size():
    """Two families at one parameter count were averaged into one point under the first model's tick."""
    df = pd.DataFrame({"params": [1e5, 2e5, 2e5] * 2, "value": [10.0, 20.0, 40.0, 9.0, 11.0, 13.0],
                       "method": ["MetaEmbed (16,64)"] * 3 + ["single-vector"] * 3,
                       "model": ["fam1-xs", "fam1-s", "fam2-s"] * 2})
    with pytest.raises(ValueError, match=r"2 'model' values \['fam1-s', 'fam2-s'\] at params=200000"):
        P.plot_scaling(df)
    ax = P.plot_scaling(df[df["model"] != "fam2-s"]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fam1-xs\n100K", "fam1-s\n200K"]


@pytest.mark.parametrize("column", ["model", "group", "metric", "seed"])
def test_plot_budget_curves_refuses_to_average_different_series(column):
    """Rows of two models / two summary groups (P@1 and NDCG@5) / one seed twice were averaged into one
    curve with an 'sd' band, as if they were seeds."""
    df = budget_frame()[lambda d: d["method"] == "MMR"]
    other = df.assign(value=df["value"] + 30)
    if column == "seed":
        both = pd.concat([df, other])
        match = r"method='MMR', budget=\(1,1\) has several rows of seed 0"
    else:
        both = pd.concat([df.assign(**{column: "a"}), other.assign(**{column: "b"})])
        match = rf"method='MMR', budget=\(1,1\) would average rows of 2 '{column}' values \['a', 'b'\]"
    with pytest.raises(ValueError, match=match):
        P.plot_budget_curves(both)
    if column != "seed":  # one panel per series is fine
        fig = P.plot_budget_facets(both, col=column, annotate_gain=False)
        assert [ax.get_title() for ax in fig.axes] == ["a", "b"]


def test_plot_budget_curves_refuses_a_baseline_of_several_models():
    rows = budget_frame()[lambda d: d["method"].isin(["MMR", "single-last"])]
    both = pd.concat([rows.assign(model="3B"), rows[rows["method"] == "single-last"].assign(model="7B", value=70.0)])
    with pytest.raises(ValueError, match=r"baseline method='single-last' would average rows of 2 'model'"):
        P.plot_budget_curves(both, baseline="single-last")


@pytest.mark.parametrize("baseline", [float("nan"), ("chance (1/8)", np.nan), {"single-last": np.nan, "x": 50.0},
                                      np.inf])
def test_plot_budget_curves_refuses_a_non_finite_baseline(baseline):
    """A NaN baseline was an invisible line with a legend entry, and the gain label read '+nan'."""
    df = budget_frame()[lambda d: d["method"] == "MMR"]
    with pytest.raises(ValueError, match="has no finite value"):
        P.plot_budget_curves(df, baseline=baseline, annotate_gain=True)


def test_plot_budget_curves_with_nothing_to_draw_raises():
    """An empty (or all-NaN) frame gave an empty axes with reversed x limits (-0.3, -0.7)."""
    with pytest.raises(ValueError, match=r"no budget to draw \(0 row\(s\)"):
        P.plot_budget_curves(pd.DataFrame({"method": [], "budget": [], "value": []}))
    nan = pd.DataFrame({"method": ["MMR"], "budget": [(1, 1)], "value": [np.nan]})
    with pytest.warns(UserWarning, match="missing"), pytest.raises(ValueError, match="1 with a missing 'value'"):
        P.plot_budget_curves(nan)
    ax = P.plot_budget_curves(nan.fillna(1.0)).axes[0]  # one budget, one point: fine
    assert ax.get_xlim()[0] < ax.get_xlim()[1]


def test_save_figure_suffix_in_any_case_and_sub_folders(tmp_path):
    """'x.PNG' was written as 'x.PNG.png', and a name with a sub-folder raised FileNotFoundError."""
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert P.save_figure(fig, "fig4b.PNG", tmp_path, pdf=True) == tmp_path / "fig4b.png"
    assert (tmp_path / "fig4b.pdf").exists() and not (tmp_path / "fig4b.PNG.png").exists()
    png = P.save_figure(fig, "fig3/panel_a", tmp_path, pdf=True, close=True)
    assert png == tmp_path / "fig3" / "panel_a.png" and png.exists() and (tmp_path / "fig3" / "panel_a.pdf").exists()
    assert not plt.fignum_exists(fig.number)


def test_plot_budget_curves_order_selects_and_orders_the_budgets():
    """``order``: only those budgets are drawn, in that order (rows at other budgets are left out)."""
    df = budget_frame()[lambda d: d["method"] == "MMR"]
    other = pd.DataFrame({"method": "NoMMR", "budget": [(2, 4)] * 2, "value": [1.0, 2.0], "seed": 0})  # not drawn
    ax = P.plot_budget_curves(pd.concat([df, other]), order=["(16,64)", (1, 1)]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["(16,64)", "(1,1)"]
    (line,) = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]
    assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [68.5, 60.5]  # seed means
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MMR"]


def test_plot_budget_curves_ylabel_only_from_a_single_metric():
    df = budget_frame()[lambda d: d["method"].isin(["MMR", "NoMMR"])]
    assert P.plot_budget_curves(df).axes[0].get_ylabel() == "Precision@1 (%)"
    mixed = df.assign(metric=np.where(df["method"] == "MMR", "P@1", "NDCG@5"))  # one metric per curve
    assert P.plot_budget_curves(mixed).axes[0].get_ylabel() == "value"  # neither metric's name


def test_plot_scaling_gains_are_between_seed_means():
    """Several seeds per size: the point and its gain label are the seed mean, the gain over the preceding size."""
    df = pd.DataFrame({"params": [1e6, 1e6, 4e6, 4e6, 1.6e7, 1.6e7], "value": [20.0, 22.0, 30.0, 36.0, 34.0, 34.0],
                       "seed": [0, 1] * 3, "method": "MetaEmbed (16,64)", "model": ["xs", "xs", "s", "s", "m", "m"]})
    ax = P.plot_scaling(df).axes[0]
    assert [t.get_text() for t in ax.texts] == ["+12.0", "+1.0"]  # 33 - 21, 34 - 33
    with pytest.raises(ValueError, match=r"plot_scaling: the point .* would average rows of 2 'group' values"):
        P.plot_scaling(pd.concat([df.assign(group="VQA"), df.assign(group="Retrieval")]))
    with pytest.raises(ValueError, match=r"several rows of seed 0"):
        P.plot_scaling(pd.concat([df, df]))


def test_plot_latency_memory_orders_rows_by_budget():
    """Rows in any order: ticks in group order and each line through the points in that order."""
    table3 = pd.DataFrame({"budget": [(16, 64), (1, 1), (4, 8), (2, 4)], "latency_ms": [6.0, 1.0, 3.0, 2.0],
                           "memory_gib": [40.0, 0.5, 5.0, 2.5]})
    fig = P.plot_latency_memory(table3)
    ax_l, ax_m = fig.axes
    assert [t.get_text() for t in ax_m.get_xticklabels()] == ["(1,1)", "(2,4)", "(4,8)", "(16,64)"]
    (mem,) = ax_m.get_lines()
    assert list(mem.get_xdata()) == [0, 1, 2, 3] and list(mem.get_ydata()) == [0.5, 2.5, 5.0, 40.0]
    lat = [ln for ln in ax_l.get_lines() if len(ln.get_xdata()) == 4]
    assert [list(ln.get_ydata()) for ln in lat] == [[1.0, 2.0, 3.0, 6.0]]


def test_plot_gap_by_token_x_is_the_one_based_token_index_of_the_selected_probes():
    """Meta Token r = token + 1 on the x axis; rows of probes not drawn are not checked (nor drawn)."""
    gap = pd.DataFrame({"level": "token", "token": [0, 1, 2], "budget": pd.NA, "probe": "centroid_gap",
                        "value": [1.0, 2.0, 3.0]})
    other = pd.DataFrame({"level": "token", "token": [0, 0], "budget": pd.NA, "probe": "mean_cos_text",
                          "value": [0.1, 0.2]})  # two reports of a probe that is not drawn
    budget_rows = pd.DataFrame({"level": "budget", "token": pd.NA, "budget": ["(1,1)"], "probe": "centroid_gap",
                                "value": [9.0]})
    ax = P.plot_gap_by_token(pd.concat([gap, other, budget_rows], ignore_index=True), probes=["centroid_gap"]).axes[0]
    (line,) = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [1.0, 2.0, 3.0]


def test_plot_budget_facets_palette_covers_a_baseline_of_a_later_panel_only():
    """The figure's palette takes every panel's baseline colour names, not only the first panel's."""
    df = pd.concat([budget_frame().assign(model=m) for m in ("3B", "7B")])
    df = df[df["method"].isin(["MMR", "NoMMR"])]
    fig = P.plot_budget_facets(df, col="model", annotate_gain=False, panel_baselines={"7B": ("chance (1/8)", 12.5)})
    dashed = [[ln.get_label() for ln in ax.get_lines() if ln.get_linestyle() == "--"] for ax in fig.axes[:2]]
    assert dashed == [[], ["chance (1/8)"]]


def test_a_band_over_seeds_says_what_it_is():
    """Two seeds drew ±1 sd bands (below 0 P@1 in a review helper's run) that no label explained; one seed per
    point draws none and adds nothing."""
    df = budget_frame()
    note = "\nband: ±1 sd over 2 seeds per point"
    assert P.plot_budget_curves(df, baseline="single-last").axes[0].get_xlabel().endswith(note)
    assert P.plot_budget_curves(df, baseline="single-last", errorbar=("ci", 90)).axes[0].get_xlabel().endswith(
        "\nband: 90% bootstrap CI over 2 seeds per point")
    one = df[df["seed"] == 0]
    assert P.plot_budget_curves(one, baseline="single-last").axes[0].get_xlabel() == r"Retrieval budget $(r_q, r_c)$"
    assert P.plot_budget_curves(df, baseline="single-last", errorbar=None).axes[0].get_xlabel().endswith("$")
    sizes = pd.DataFrame({"params": [1e6, 1e6, 4e6, 4e6], "value": [20.0, 22.0, 30.0, 36.0], "seed": [0, 1] * 2,
                          "method": "MetaEmbed (16,64)", "model": ["xs", "xs", "s", "s"]})
    assert P.plot_scaling(sizes).axes[0].get_xlabel() == "Model size (parameters, log scale)" + note
    assert P.plot_scaling(sizes[sizes["seed"] == 1]).axes[0].get_xlabel() == "Model size (parameters, log scale)"
    assert P.plot_scaling(sizes, logx=False).axes[0].get_xlabel() == "Model size (parameters)" + note
    gap = pd.DataFrame({"level": "token", "token": [0, 1, 0, 1], "budget": pd.NA, "probe": "centroid_gap",
                        "value": [1.0, 2.0, 1.5, 2.5], "seed": [0, 0, 1, 1]})
    assert P.plot_gap_by_token(gap, probes=["centroid_gap"]).axes[0].get_xlabel() == "Meta Token index r" + note
    plt.close("all")


def test_the_drawn_band_is_the_errorbar_the_label_names():
    """The band drawn is the ``errorbar`` asked for (the x label names it): a 100% percentile interval of two
    seeds spans min..max of the point, and ``errorbar=None`` draws no band at all (an sd band under a label
    saying "90% bootstrap CI" would misstate the spread)."""
    df = budget_frame()[lambda d: d["method"] == "MMR"]  # values 60 + 2 i + seed, seeds 0 and 1
    ax = P.plot_budget_curves(df, errorbar=("pi", 100)).axes[0]
    (band,) = [c for c in ax.collections if len(c.get_paths())]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(60.0) and ys.max() == pytest.approx(61.0 + 2 * (len(BUDGETS) - 1))
    xs = band.get_paths()[0].vertices[:, 0]
    at0 = ys[np.isclose(xs, 0.0)]
    assert sorted(set(np.round(at0, 6))) == [60.0, 61.0]  # min and max of the two seeds, not mean ± sd
    ax = P.plot_budget_curves(df, errorbar=None).axes[0]
    assert not [c for c in ax.collections if len(c.get_paths())]


def test_a_numeric_baseline_is_drawn_in_the_single_vector_green():
    """A number as ``baseline`` is the (unnamed) best single-vector line: the paper's dashed green, the colour of
    ``single-vector`` / ``single-last``, whatever its legend label says."""
    df = budget_frame()[lambda d: d["method"].isin(["MMR", "NoMMR"])]
    for note in ("best single-vector", "single-vector baseline"):
        ax = P.plot_budget_curves(df, baseline=58.0, baseline_note=note).axes[0]
        (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert line.get_label() == note
        assert matplotlib.colors.to_hex(line.get_color()) == P.METHOD_COLORS["single-vector"]


def test_ylabel_names_the_metric_of_the_score_column():
    """Without a ``metric`` column the y label comes from the score column's name (``p@1`` -> Precision@1 (%));
    a single ``metric`` of ``ndcg@5`` reads NDCG@5 (%), the cutoff the numbers were computed at."""
    df = budget_frame()[lambda d: d["method"] == "MMR"]
    by_column = df.drop(columns="metric").rename(columns={"value": "p@1"})
    assert P.plot_budget_curves(by_column, y="p@1").axes[0].get_ylabel() == "Precision@1 (%)"
    assert P.plot_budget_curves(df.assign(metric="ndcg@5")).axes[0].get_ylabel() == "NDCG@5 (%)"
    assert P.plot_budget_curves(df.drop(columns="metric").rename(columns={"value": "ndcg5"}),
                                y="ndcg5").axes[0].get_ylabel() == "NDCG@5 (%)"


def test_a_band_over_repeated_rows_without_seeds_says_rows():
    """Repeated rows with no ``seed`` column are counted as rows, not called seeds."""
    df = budget_frame()[lambda d: d["method"] == "MMR"].drop(columns="seed")
    assert P.plot_budget_curves(df).axes[0].get_xlabel().endswith("\nband: ±1 sd over 2 rows per point")


def test_plot_projection_draws_x_on_the_x_axis():
    """The scatter's points are (``x``, ``y``) of the projection frame, in that order (PC 1 across, PC 2 up)."""
    df2d = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "y": [10.0, 20.0, 30.0, 40.0],
                         "label": ["image", "image", "text", "text"]})
    ax = P.plot_projection(df2d).axes[0]
    pts = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    assert sorted(map(tuple, np.asarray(pts).tolist())) == [(0.0, 10.0), (1.0, 20.0), (2.0, 30.0), (3.0, 40.0)]


def test_plot_gap_by_token_budget_label_names_the_sides_in_pair_order():
    """Per-budget prefixes ``(r_a, r_b)`` of an ``"image vs text"`` report are written ``(r_image, r_text)``:
    the first number is the image side's prefix length."""
    gap = pd.DataFrame({"level": "budget", "token": pd.NA, "budget": ["(1,2)", "(2,4)"], "probe": "centroid_gap",
                        "value": [1.0, 2.0], "pair": "image vs text"})
    ax = P.plot_gap_by_token(gap, probes=["centroid_gap"], level="budget").axes[0]
    assert ax.get_xlabel() == "(r_image, r_text) (mean of the first r vectors)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["(1,2)", "(2,4)"]


def test_plot_gap_by_token_says_curves_coincide_only_when_they_do_everywhere():
    """Curves that meet at one token but differ elsewhere are both visible: no "coincide" note."""
    gap = pd.DataFrame({"level": "token", "token": [0, 1, 0, 1], "budget": pd.NA, "probe": "separability",
                        "value": [1.0, 0.9, 1.0, 0.7], "condition": ["init", "init", "trained", "trained"]})
    ax = P.plot_gap_by_token(gap, probes=["separability"], hue="condition").axes[0]
    assert [t.get_text() for t in ax.texts] == []
    same = gap.assign(value=[1.0, 0.9, 1.0, 0.9])
    ax = P.plot_gap_by_token(same, probes=["separability"], hue="condition").axes[0]
    assert [t.get_text() for t in ax.texts] == ["both curves coincide"]


def test_legend_entries_keep_the_first_handle_of_a_label():
    """A label drawn in several panels keeps its first panel's handle (its place and its artist)."""
    fig, (a, b) = plt.subplots(1, 2)
    (first,) = a.plot([0, 1], label="MetaEmbed")
    b.plot([0, 1], label="MetaEmbed", linestyle="--")
    b.plot([0, 1], label="NoMMR")
    entries = P.legend_entries([a, b])
    assert list(entries) == ["MetaEmbed", "NoMMR"] and entries["MetaEmbed"] is first
