"""metaembed.ablations: notebook parameters -> configs, Table 5, scaling specs (fast, no training)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from metaembed import ablations as A
from metaembed.config import ConfigError, RunConfig
from metaembed.data.mmeb import MMEB_TRAIN_SUBSETS
from metaembed.data.records import EvalQuery, Item

BUDGETS = [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]
TASKS = [("Cls", "classification", "ind"), ("VQA", "vqa", "ind"), ("Ret-OOD", "retrieval", "ood")]


def rows(method: str, budgets, p1: float, ndcg: float, seed: int = 0, step: float = 0.0) -> list[dict]:
    """Result rows of evaluate(): three P@1 tasks (p1, p1 + 2, p1 + 4) and one document task per budget."""
    out = []
    for i, (r_q, r_c) in enumerate(budgets):
        for j, (task, meta, split) in enumerate(TASKS):
            out.append({"method": method, "seed": seed, "task": task, "meta_task": meta, "split": split, "r_q": r_q,
                        "r_c": r_c, "budget": f"({r_q},{r_c})", "metric": "P@1", "value": p1 + 2 * j + step * i,
                        "n_queries": 10})
        out.append({"method": method, "seed": seed, "task": "Doc", "meta_task": "document", "split": "ind",
                    "r_q": r_q, "r_c": r_c, "budget": f"({r_q},{r_c})", "metric": "NDCG@5", "value": ndcg + step * i,
                    "n_queries": 10})
    return out


def results(seeds=(0,)) -> pd.DataFrame:
    data = []
    for s in seeds:
        data += rows("single-last", [(1, 1)], 50.0 + s, 40.0, s)
        data += rows("single-mean", [(1, 1)], 48.0, 45.0, s)
        data += rows("split", BUDGETS, 40.0, 30.0, s, step=1.0)
        data += rows("MetaEmbed", BUDGETS, 46.0 + s, 35.0, s, step=2.0)
        data += rows("NoMMR", BUDGETS, 30.0, 20.0, s, step=5.0)
    return pd.DataFrame(data)


# --------------------------------------------------------------------------- configs


def test_config_from_params_maps_every_parameter():
    cfg = A.config_from_params(backbone="paligemma", tiny_size="xs", R_q=4, R_c=8, groups=[[1, 1], [2, 4], [4, 8]],
                               tau=0.05, max_steps=40, batch_size=4, lr=3e-4, precision="32-true",
                               gradient_checkpointing=False, data_source="synthetic", data_path=None, eval_path=None,
                               vidore_path=None, n_train=32, n_eval_queries=3, n_candidates=4, seed=7, name="x")
    assert isinstance(cfg, RunConfig) and cfg.name == "x"
    assert (cfg.model.backbone, cfg.model.tiny_size, cfg.model.R_q, cfg.model.R_c) == ("paligemma", "xs", 4, 8)
    assert cfg.loss.groups == [(1, 1), (2, 4), (4, 8)] and cfg.loss.tau == 0.05
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr) == (40, 4, 3e-4)
    assert (cfg.data.n_train, cfg.data.n_eval_queries, cfg.data.n_candidates) == (32, 3, 4)
    assert cfg.train.seed == cfg.model.seed == cfg.data.seed == 7
    assert cfg.train.checkpoint_every_n_steps is None and cfg.train.progress_bar is False
    assert cfg.train.warmup_steps <= 40 // 5


def test_config_from_params_rejects_unknown_and_invalid():
    with pytest.raises(ConfigError, match=r"unknown notebook parameter\(s\) \['max_step'\].*valid: .*max_steps"):
        A.config_from_params(max_step=3)
    with pytest.raises(ConfigError, match="unknown notebook parameter"):
        A.config_from_params(methods=["MetaEmbed"])  # notebook-only parameters are not config keys
    with pytest.raises(ConfigError, match="loss.groups"):
        A.config_from_params(R_q=2, R_c=4)  # the default groups reach (16, 64)


def test_config_from_params_short_runs_and_none():
    base = A.config_from_params()
    cfg = A.config_from_params(base, max_steps=3, n_train=None, n_eval_queries=None)
    assert cfg.train.max_steps == 3 and cfg.train.warmup_steps == 0  # cosine schedule stays valid
    assert cfg.data.n_train == base.data.n_train and cfg.data.n_eval_queries == base.data.n_eval_queries
    assert base.train.max_steps != 3  # the base config is copied, not modified


def test_method_config():
    base = A.config_from_params(max_steps=20)
    meta, nommr = A.method_config(base, "MetaEmbed"), A.method_config(base, "NoMMR", seed=3)
    assert meta.loss.active_groups() == list(BUDGETS) and nommr.loss.active_groups() == [(16, 64)]
    assert nommr.train.seed == nommr.model.seed == nommr.data.seed == 3 and nommr.name == "NoMMR-seed3"
    for m in ("single-last", "single-mean"):
        c = A.method_config(base, m)
        assert c.model.pooling == m and c.loss.active_groups() == [(1, 1)] and c.model_vector_counts() == (1, 1)
    split = A.method_config(base, "split")
    assert split.model.pooling == "split" and split.loss.active_groups() == [(16, 64)]
    assert split.eval.budgets == [(16, 64)] and meta.eval.budgets is None
    assert base.model.pooling == "meta" and base.loss.mmr  # untouched
    with pytest.raises(ValueError, match="unknown method 'MMR'"):
        A.method_config(base, "MMR")


def test_method_config_single_vector_resets_eval_budgets():
    from metaembed.pipeline import eval_budgets

    base = A.config_from_params(max_steps=10)
    base.eval.budgets = [(1, 1), (2, 4), (16, 64)]  # explicit budgets a one-vector model cannot score
    for m in ("single-last", "single-mean"):
        assert eval_budgets(A.method_config(base, m)) == [(1, 1)]
    assert eval_budgets(A.method_config(base, "MetaEmbed")) == [(1, 1), (2, 4), (16, 64)]  # others keep them
    assert eval_budgets(A.method_config(base, "split")) == [(16, 64)]
    # metaembed eval of a split model trained from the CLI without eval.budgets (newcomer review): the loss
    # groups' prefixes scored (1,1) Retrieval 100.0 from candidates that all tie; the full budget only
    split = A.method_config(base, "split")
    split.eval.budgets = None
    assert eval_budgets(split) == [(16, 64)]


def test_method_config_nommr_and_split_need_groups_ending_at_full_budget():
    from metaembed.pipeline import eval_budgets

    base = A.config_from_params(R_q=16, R_c=64, groups=[(1, 1), (2, 4), (4, 8)])  # valid for MetaEmbed
    assert A.method_config(base, "MetaEmbed").loss.active_groups() == [(1, 1), (2, 4), (4, 8)]
    for m in ("NoMMR", "split"):  # would train only (4, 8) but be reported as (16, 64)
        with pytest.raises(ConfigError, match=rf"{m} is the \(R_q, R_c\) = \(16, 64\) baseline.*"
                                              r"only the last loss group \(4, 8\)"):
            A.method_config(base, m)
    base = A.config_from_params(R_q=4, R_c=8, groups=[(1, 1), (2, 4), (4, 8)])  # packaged smoke layout
    for m in ("NoMMR", "split"):
        c = A.method_config(base, m)
        assert c.loss.active_groups() == [(4, 8)] and max(eval_budgets(c), key=lambda b: b[0] * b[1]) == (4, 8)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["quickstart", "smoke", *sorted(ROOT.glob("experiments/configs/*.yaml"))], ids=str)
def test_method_config_packaged_configs(config):
    """Every Table 5 method builds from the packaged and paper configs."""
    base = A.config_from_params(config, max_steps=5)
    for m in A.METHODS:
        A.method_config(base, m)


@pytest.mark.parametrize("notebook", sorted(ROOT.glob("experiments/*.yaml")), ids=lambda p: p.name)
def test_method_config_experiment_parameters(notebook: Path):
    """The experiments' R_q / R_c / groups parameters give a valid config for every Table 5 method."""
    import yaml

    params = yaml.safe_load(notebook.read_text()).get("parameters") or {}
    shape = {k: params[k] for k in ("R_q", "R_c", "groups") if k in params}
    if not {"R_q", "groups"} <= set(shape):
        pytest.skip("no model / loss-group parameters")
    base = A.config_from_params(max_steps=5, **shape)
    for m in A.METHODS:
        A.method_config(base, m)


def test_work_dir_and_metric_group(tmp_path: Path):
    work = A.work_dir_for(tmp_path / "runs" / "mmr_ablation")
    assert work == (tmp_path / "runs" / ".work" / "mmr_ablation").resolve()
    (work / "old").mkdir(parents=True)
    assert (work / "old").exists() and A.work_dir_for(tmp_path / "runs" / "mmr_ablation", clean=True) == work
    assert not work.exists()
    assert A.metric_group("ndcg@5") == "NDCG@5" and A.metric_group("p@1") == "Overall"
    assert A.metric_group("NDCG@10") == "NDCG@10" and A.metric_group("IND") == "IND"


# --------------------------------------------------------------------------- aggregation


def test_table5_rows_and_deltas():
    t5 = A.table5(results())
    assert t5["row"].tolist() == ["single-last", "single-mean", "split-(16,64)", "MetaEmbed (1,1)", "MetaEmbed (2,4)",
                                  "MetaEmbed (4,8)", "MetaEmbed (8,16)", "MetaEmbed (16,64)", "NoMMR-(16,64)"]
    assert t5.attrs["reference"] == "single-last"  # best single-vector on Overall (52 vs 50)
    t = t5.set_index("row")
    assert t.loc["single-last", "Overall"] == 52.0 and t.loc["single-last", "Δ Overall"] == 0.0
    assert t.loc["single-mean", "Δ Overall"] == -2.0
    assert t.loc["MetaEmbed (16,64)", "Overall"] == 48.0 + 8 and t.loc["MetaEmbed (16,64)", "Δ Overall"] == 4.0
    assert t.loc["NoMMR-(16,64)", "Overall"] == 32.0 + 20 and t.loc["split-(16,64)", "budget"] == "(16,64)"
    # deltas of every group are to the same reference method (single-last), even where single-mean is better
    assert t.loc["single-mean", "Δ NDCG@5"] == 5.0
    assert "Overall sd" not in t5.columns and set(t5["n_seeds"]) == {1}


def test_table5_seeds_and_reference():
    t5 = A.table5(results(seeds=(0, 1)), groups=["Overall", "IND", "OOD"])
    t = t5.set_index("row")
    assert t.loc["single-last", "Overall"] == 52.5 and t.loc["single-last", "n_seeds"] == 2
    assert math.isclose(t.loc["single-last", "Overall sd"], 0.7, abs_tol=0.05)  # sd of 52, 53 (rounded)
    assert t.loc["MetaEmbed (1,1)", "IND"] == 47.5  # mean of (46, 48) and (47, 49)
    t5 = A.table5(results(), reference="single-mean")
    assert t5.attrs["reference"] == "single-mean" and t5.set_index("row").loc["single-last", "Δ Overall"] == 2.0
    with pytest.raises(ValueError, match="reference method"):
        A.table5(results(), reference="nope")
    with pytest.raises(ValueError, match=r"groups \['Grounding'\] not in the results"):
        A.table5(results(), groups=["Grounding"])


def test_table5_rounds_a_small_negative_delta_to_zero_not_minus_zero():
    """A Δ of -0.04 rounded to -0.0, which table5.csv printed as '-0.0' (fork review)."""
    df = results()
    df.loc[df["method"] == "single-mean", "value"] = 52.0 - 0.04  # 0.04 below the reference, single-last
    t5 = A.table5(df, groups=["Overall"])
    delta = t5.set_index("row").loc["single-mean", "Δ Overall"]
    assert delta == 0.0 and math.copysign(1.0, delta) == 1.0
    assert "-0.0" not in t5.to_csv(index=False)


def test_table5_without_single_vector_methods():
    df = results()
    t5 = A.table5(df[df["method"].isin(["MetaEmbed", "NoMMR"])])
    assert t5.attrs["reference"] is None and t5["Δ Overall"].isna().all()
    assert A.best_single_vector(df[df["method"] == "MetaEmbed"]) is None


def test_budget_curves_and_best_single_vector():
    curves = A.budget_curves(results(), "NDCG@5")
    meta = curves[curves["method"] == "MetaEmbed"]
    assert meta["budget"].tolist() == ["(1,1)", "(2,4)", "(4,8)", "(8,16)", "(16,64)"]
    assert meta["value"].tolist() == [35.0, 37.0, 39.0, 41.0, 43.0] and set(curves["metric"]) == {"NDCG@5"}
    assert set(A.budget_curves(results(), "Overall")["metric"]) == {"P@1"}
    assert A.best_single_vector(results(), "NDCG@5") == ("single-mean", 45.0)
    with pytest.raises(ValueError, match="no rows for group"):
        A.budget_curves(results(), "Grounding")



def test_curves_vs_best_single_picks_the_baseline_per_group():
    """mmr_ablation's per-meta-task figure: each panel's dashed line is that panel's best single-vector method."""
    curves, base = A.curves_vs_best_single(results(), ["ndcg@5", "Overall", "vqa"], ["MetaEmbed", "NoMMR"],
                                           rename={"MetaEmbed": "MetaEmbed (MMR)"})
    # single-last is best on Overall (52 vs 50) and VQA, single-mean on NDCG@5 (45 vs 40)
    assert base == {"NDCG@5": "single-mean", "Overall": "single-last", "VQA": "single-last"}
    assert list(pd.unique(curves["group"])) == ["NDCG@5", "Overall", "VQA"]
    for group, best in base.items():
        methods = set(curves.loc[curves["group"] == group, "method"])
        assert methods == {"MetaEmbed (MMR)", "NoMMR", best}
    df = results()
    _, none = A.curves_vs_best_single(df[df["method"].isin(["MetaEmbed", "NoMMR"])], "Overall")
    assert none == {"Overall": None}


@pytest.mark.parametrize("metric", ["ndcg5", "NDCG@10", "Grounding", "p@5"])
def test_resolve_group_rejects_unknown_metrics(metric):
    """A misspelled fig4b_metric raises, naming the available groups, instead of silently dropping its panel."""
    with pytest.raises(ValueError, match=r"not in the results; available groups: .*NDCG@5.*Overall"):
        A.resolve_group(results(), metric)
    with pytest.raises(ValueError, match="available groups"):
        A.curves_vs_best_single(results(), ["Overall", metric])


def test_resolve_group_is_case_insensitive():
    assert A.resolve_group(results(), "ndcg@5") == "NDCG@5" and A.resolve_group(results(), "NDCG@5") == "NDCG@5"
    assert A.resolve_group(results(), "p@1") == "Overall" and A.resolve_group(results(), "OVERALL") == "Overall"
    assert A.resolve_group(results(), "vqa") == "VQA" and A.resolve_group(results(), "ind") == "IND"

def test_method_summary_groups():
    s = A.method_summary(results())
    assert list(s.columns[:2]) == ["method", "seed"]
    row = s[(s["method"] == "split") & (s["budget"] == "(16,64)") & (s["group"] == "OOD")]
    assert row["value"].item() == 44.0 + 4  # Ret-OOD = p1 + 4, budget index 4
    assert {"Classification", "VQA", "Retrieval", "IND", "OOD", "Overall", "NDCG@5"} <= set(s["group"])


def test_scaling_table():
    df = pd.concat([results().assign(model="a-xs", backbone="a", size="xs", params=1000),
                    results().assign(model="a-s", backbone="a", size="s", params=4000)])
    df = df[df["method"].isin(["MetaEmbed", "single-last", "single-mean"])]
    t = A.scaling_table(df)
    assert t["model"].tolist() == ["a-xs", "a-xs", "a-s", "a-s"]
    meta = t[t["method"] == "MetaEmbed"].iloc[0]
    assert meta["budget"] == "(16,64)" and meta["value"] == 56.0 and meta["gain"] == 4.0
    assert t[t["method"] != "MetaEmbed"]["method"].unique().tolist() == ["single-last"]
    t = A.scaling_table(df, budget=(4, 8))
    assert t[t["method"] == "MetaEmbed"]["budget"].tolist() == ["(4,8)"] * 2
    with pytest.raises(ValueError, match=r"MetaEmbed of a-xs was not evaluated at budget \(8, 32\); available: "
                                         r"\[\(1, 1\), \(2, 4\), \(4, 8\), \(8, 16\), \(16, 64\)\]"):
        A.scaling_table(df, budget=(8, 32))
    # a model whose MetaEmbed run is missing dropped out silently (Fig. 4a then joined its neighbours)
    with pytest.raises(ValueError, match=r"model a-s has no MetaEmbed rows \(methods: \['single-last', 'single-mean'\]"):
        A.scaling_table(df[~((df["model"] == "a-s") & (df["method"] == "MetaEmbed"))])


# --------------------------------------------------------------------------- scaling specs


def test_model_specs_tiny_deduplicates():
    specs = A.model_specs(["qwen2_5_vl", "paligemma"], "s", "qwen2_5_vl", ["xs", "s", "m"])
    assert [s["model"] for s in specs] == ["qwen2_5_vl-xs", "qwen2_5_vl-s", "qwen2_5_vl-m", "paligemma-s"]
    by = {s["model"]: s for s in specs}
    assert by["qwen2_5_vl-s"]["in_sizes"] and by["qwen2_5_vl-s"]["in_families"]
    assert not by["qwen2_5_vl-m"]["in_families"] and by["paligemma-s"]["backbone_path"] is None


def test_model_specs_checkpoints():
    ckpts = {"qwen2.5-vl-3b": "ck/3b", "qwen2.5-vl-32b": {"path": "ck/32b", "lr": 1e-5},
             "paligemma-3b": "ck/pali"}
    specs = A.model_specs(["qwen2_5_vl", "paligemma"], None, "qwen2_5_vl", ["qwen2.5-vl-3b", "qwen2.5-vl-32b"], ckpts)
    by = {s["model"]: s for s in specs}
    assert set(by) == {"MetaEmbed-3B", "MetaEmbed-32B", "MetaEmbed-3B-Gemma"}
    assert by["MetaEmbed-32B"]["overrides"] == {"lr": 1e-5} and by["MetaEmbed-32B"]["backbone_path"] == "ck/32b"
    assert by["MetaEmbed-3B"]["in_families"] and by["MetaEmbed-3B-Gemma"]["backbone"] == "paligemma"
    with pytest.raises(ConfigError, match="family 'mllama'"):
        A.model_specs(["mllama"], None, "qwen2_5_vl", [], ckpts)
    with pytest.raises(ConfigError, match="unknown override"):
        A.model_specs([], None, "qwen2_5_vl", ["qwen2.5-vl-3b"], {"qwen2.5-vl-3b": {"path": "x", "steps": 1}})
    # data settings per model were dropped silently: every model is scored on the notebook's one benchmark
    for key in ("n_eval_queries", "seed", "eval_path"):
        with pytest.raises(ConfigError, match=rf"checkpoints\['qwen2.5-vl-3b'\]: \['{key}'\] set\(s\) the data"):
            A.model_specs([], None, "qwen2_5_vl", ["qwen2.5-vl-3b"], {"qwen2.5-vl-3b": {"path": "x", key: 2}})


def test_check_metric_names_what_the_benchmark_yields():
    """fig4b_metric was checked only once results existed: a typo, or NDCG@5 with MMEB files and no ViDoRe,
    failed after every method had trained (a review helper)."""
    from metaembed.config import RunConfig
    from metaembed.data.records import Benchmark, DocRetrievalTask, EvalTask
    from metaembed.probes import check_projection

    cfg = RunConfig()
    p1 = [EvalTask("a", "classification", "ind"), EvalTask("b", "retrieval", "ood")]
    doc = DocRetrievalTask(name="d", queries={}, corpus={}, qrels={})
    assert A.summary_groups(Benchmark([], p1, [doc]), cfg) == ["Classification", "Retrieval", "IND", "OOD",
                                                                 "Overall", "NDCG@5"]
    assert A.check_metric("ndcg@5", Benchmark([], p1, [doc]), cfg) == "NDCG@5"
    assert A.check_metric("p@1", Benchmark([], p1), cfg) == "Overall"
    with pytest.raises(ValueError, match=r"fig4b_metric='ndcg@5' .* \['Classification', 'Retrieval', 'IND', 'OOD', "
                                         r"'Overall'\] \(NDCG needs document tasks: set vidore_path\)"):
        A.check_metric("ndcg@5", Benchmark([], p1), cfg)
    with pytest.raises(ValueError, match=r"fig4b_metric='ndcg5' \(summary group 'ndcg5'\)"):
        A.check_metric("ndcg5", Benchmark([], p1, [doc]), cfg)
    assert check_projection("PCA") == "pca"
    with pytest.raises(ValueError, match="expected 'pca' or 'umap'"):
        check_projection("tsne")


def test_random_ranking_floor_is_the_level_of_the_data_each_seed_scores_on():
    """Fig. 4b's NDCG@5 panel had no random-ranking line (NoMMR's 9.3 at (2,4) sat at the 8.3 floor unseen)."""
    from metaembed import evaluation
    from metaembed.config import RunConfig
    from metaembed.data.records import Benchmark, DocRetrievalTask, EvalTask, Item

    cfg = RunConfig()
    page = Item(text="p")
    doc = DocRetrievalTask("d", {"q": Item(text="q"), "q2": Item(text="q2")}, {f"d{i}": page for i in range(4)},
                           {"q": {"d0": 1}})  # q2 unjudged: not scored, not in the level
    cfg.eval.ndcg_k = 1
    assert A.random_ranking_floor(cfg, benchmark=Benchmark([], [], [doc])) == pytest.approx(25.0)  # 1 in 4 at rank 1
    cfg.eval.ndcg_k = 5  # every rank of 4 docs: the expected DCG is (1/4) * sum_r 1/log2(r+1)
    assert A.random_ranking_floor(cfg, benchmark=Benchmark([], [], [doc])) == pytest.approx(
        25.0 * sum(1 / math.log2(r + 1) for r in range(1, 5)))
    assert A.random_ranking_floor(cfg, benchmark=Benchmark([], [EvalTask("a", "classification", "ind")])) is None
    base = A.config_from_params(n_train=8, n_eval_queries=12, n_candidates=8, seed=0, name="floor")
    one, other = A.random_ranking_floor(base, [0]), A.random_ranking_floor(base, 1)
    assert one == pytest.approx(evaluation.random_ranking_level(A.load_benchmark(base).doc_tasks, 5))
    assert one != other and A.random_ranking_floor(base, [0, 1]) == pytest.approx((one + other) / 2)


# --------------------------------------------------------------------------- running (training faked)


def test_run_methods_identical_settings(monkeypatch, tmp_path: Path):
    from metaembed import pipeline

    seen = []

    def fake_train_and_evaluate(cfg, output_dir, benchmark=None, **_):
        seen.append((cfg, Path(output_dir), benchmark))
        Path(output_dir, "checkpoints").mkdir(parents=True)
        budgets = [(1, 1)] if cfg.model.pooling.startswith("single") else BUDGETS
        df = pd.DataFrame(rows("x", budgets, 10.0, 5.0)).drop(columns=["method", "seed"])
        return df

    monkeypatch.setattr(pipeline, "train_and_evaluate", fake_train_and_evaluate)
    base = A.config_from_params(max_steps=7, n_train=16)
    bench = object()
    df = A.run_methods(["MetaEmbed", "NoMMR", "single-last"], base, tmp_path, bench, seeds=[0, 1], verbose=False)
    assert list(df.columns[:2]) == ["method", "seed"] and len(seen) == 6
    assert set(zip(df["method"], df["seed"])) == {(m, s) for m in ("MetaEmbed", "NoMMR", "single-last") for s in (0, 1)}
    assert all(b is bench for *_, b in seen)
    assert {c.train.max_steps for c, *_ in seen} == {7} and {c.data.n_train for c, *_ in seen} == {16}
    assert seen[3][1] == tmp_path / "MetaEmbed" / "seed1" and not (seen[3][1] / "checkpoints").exists()
    assert [c.loss.mmr for c, *_ in seen[:3]] == [True, False, False]
    with pytest.raises(ValueError, match="unknown method"):
        A.run_methods(["MetaEmbed", "ColPali"], base, tmp_path, bench)


def test_rank_candidates_with_a_fake_model():
    class Fake:
        def encode(self, items, role):
            vecs = {"q": [1.0, 0.0], "a": [0.6, 0.8], "b": [1.0, 0.0], "c": [0.0, 1.0]}
            return torch.tensor([[vecs[i.text]] * (2 if role == "query" else 3) for i in items])

    q = EvalQuery(query=Item("q"), candidates=[Item("a"), Item("b"), Item("c")])
    r = A.rank_candidates(Fake(), q, budget=(1, 1))
    assert r["text"].tolist() == ["b", "a", "c"] and r["rank"].tolist() == [1, 2, 3]
    assert r["positive"].tolist() == [False, True, False] and r["score"].iloc[0] == pytest.approx(1.0)
    assert A.rank_candidates(Fake(), q)["score"].iloc[0] == pytest.approx(2.0)  # full budget: 2 query vectors



def test_tiny_efficiency_encode_latency_is_one_query_alone(monkeypatch):
    """The "encode 1 query" bar is the latency of one query encoded alone, not a batch-32 per-item share."""
    import time as _time

    from metaembed.model import MetaEmbedModel

    calls = []

    def fake_encode(self, items, role, batch_size=32, progress=False):
        items = list(items)
        calls.append((role, len(items), batch_size))
        for _ in range(0, len(items), batch_size):
            _time.sleep(0.03)  # a fixed 30 ms per forward pass, whatever its size
        return torch.zeros(len(items), self.num_vectors(role), self.embedding_dim)

    monkeypatch.setattr(MetaEmbedModel, "encode", fake_encode)
    df = A.tiny_efficiency(["qwen2_5_vl"], ["xs"], [(1, 1), (2, 4)], encode_items=8, n_candidates=16, runs=3,
                           dtype="float32")
    row = df.iloc[0]
    assert row["encode_query_ms"] >= 29  # one forward pass for one query
    # a batch-8 share is 30 ms / 8 items: well under a quarter of one pass (relative, so a slow host's longer
    # sleeps move both sides)
    assert max(row["encode_query_batch_ms"], row["encode_candidate_batch_ms"]) < row["encode_query_ms"] / 4
    assert "encode_query_std_ms" in df.columns and len(df) == 2
    # the batch is what the figure's label says: 8 items go in one batch of 8, not "a batch of 32" (a review helper)
    assert ("query", 1, 1) in calls and ("query", 8, 8) in calls and ("candidate", 8, 8) in calls
    assert set(df["encode_batch"]) == {8}

def test_probe_items_are_paired():
    images, texts = A.probe_items(5, seed=3)
    assert len(images) == len(texts) == 5
    assert all(i.image is not None for i in images) and all(t.image is None for t in texts)
    assert {i.image.size for i in images} == {(56, 56)}
    assert {i.image.size for i in A.probe_items(2, seed=3, image_size=40)[0]} == {(40, 40)}  # image_size reaches them


def test_count_parameters_tiny_and_published():
    assert A.count_parameters(A.config_from_params(tiny_size="xs")) > 10_000
    cfg = A.config_from_params(backbone_path="checkpoints/Qwen2.5-VL-3B-Instruct")  # not loaded: meta-device count
    n = A.count_parameters(cfg)
    assert 3.0e9 < n < 4.5e9 and A.count_parameters(cfg, published="qwen2.5-vl-3b") == n


def test_p1_standard_error():
    df = pd.DataFrame(rows("MetaEmbed", [(1, 1)], 50.0, 10.0))  # tasks at 50, 52, 54 % with 10 queries each
    se = A.p1_standard_error(df, "Overall")
    expected = 100 * math.sqrt(sum(p * (1 - p) / 10 for p in (0.50, 0.52, 0.54))) / 3
    assert se == pytest.approx(expected)
    assert A.p1_standard_error(df, "OOD") == pytest.approx(100 * math.sqrt(0.54 * 0.46 / 10))
    assert math.isnan(A.p1_standard_error(df, "NDCG@5"))
    t5 = A.table5(results())
    assert "Overall se" in t5.columns and "NDCG@5 se" not in t5.columns
    meta = results()[lambda d: d["method"] == "MetaEmbed"]
    assert t5.set_index("row").loc["MetaEmbed (16,64)", "Overall se"] == pytest.approx(
        A.p1_standard_error(meta, "Overall", (16, 64)), abs=0.05)


def test_p1_standard_error_rejects_pooled_rows():
    """Rows of several budgets, methods or models are not extra tasks: the SE would shrink ~1/sqrt(#rows per task)."""
    df = results()
    with pytest.raises(ValueError, match=r"task Cls appears 5 times per seed.*pass budget="):
        A.p1_standard_error(df[df["method"] == "MetaEmbed"], "Overall")  # five budgets, budget=None
    with pytest.raises(ValueError, match="appears 5 times per seed.*one method"):
        A.p1_standard_error(df, "IND", (1, 1))  # five methods at (1, 1)
    models = pd.concat([df.assign(model="a"), df.assign(model="b")])
    with pytest.raises(ValueError, match="appears 2 times per seed"):
        A.p1_standard_error(models[models["method"] == "single-last"], "Overall")
    two_seeds = results(seeds=(0, 1))  # one row per task and seed is fine
    assert A.p1_standard_error(two_seeds[two_seeds["method"] == "single-last"], "Overall") > 0


def test_legend_below_merges_panel_legends():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2)
    a.plot([0, 1], label="MetaEmbed")
    a.legend()
    b.plot([0, 1], label="MetaEmbed")
    b.axhline(0.5, label="chance")
    b.legend()
    A.legend_below(fig)
    assert a.get_legend() is None and b.get_legend() is None
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["MetaEmbed", "chance"]
    plt.close(fig)


def test_gpu_paper_sets_build_table4_configs():
    """The GPU sets' overrides and per-model checkpoints reach the RunConfig (GradCache, MoCa negatives, lr)."""
    from metaembed import reproduce as R

    root = Path(__file__).resolve().parents[1]
    sets = {s.name: s for s in R.load_parameter_sets(include_gpu=True, root=root)}
    p = sets["mmr_ablation_paper"].parameters
    cfg = A.config_from_params(**{k: v for k, v in p.items() if k in A.PARAM_KEYS},
                                       overrides=p["overrides"])
    assert (cfg.train.batch_size, cfg.train.grad_cache_chunk_size, cfg.loss.query_chunk_size) == (2048, 64, 128)
    assert (cfg.data.split, cfg.data.negatives, cfg.loss.tau) == ("train", "list", 0.03)
    p = sets["backbone_scaling_paper"].parameters
    specs = {s["size"]: s for s in A.model_specs(p["families"], p["family_size"], p["scaling_family"],
                                                         p["sizes"], p["checkpoints"])}
    assert specs["qwen2.5-vl-32b"]["overrides"] == {"batch_size": 1536, "lr": 1.0e-5}
    assert specs["qwen2.5-vl-3b"]["overrides"] == {"batch_size": 2048, "lr": 1.0e-4}
    for name in ("mmr_ablation_paper", "backbone_scaling_paper"):  # MMEB-train's 20, not the release's 24
        p = sets[name].parameters
        full = A.config_from_params(**{k: v for k, v in p.items() if k in A.PARAM_KEYS}, overrides=p["overrides"])
        assert sorted(full.data.subsets) == sorted(MMEB_TRAIN_SUBSETS)
    for name in ("mmr_ablation_paper", "backbone_scaling_paper"):  # --quick: short runs with the overrides
        q = sets[name].resolved_parameters(quick=True)
        cfg = A.config_from_params(**{k: v for k, v in q.items() if k in A.PARAM_KEYS}, overrides=q["overrides"])
        assert cfg.train.max_steps == 20 and cfg.train.warmup_steps <= 4 and cfg.train.grad_cache_chunk_size == 64
        assert (cfg.data.max_train, cfg.data.max_eval_queries) == (2000, 100)
        assert sorted(cfg.data.subsets) == sorted(MMEB_TRAIN_SUBSETS)  # not the hard-negative release's 24
        if cfg.data.vidore_path:  # a smoke run does not encode every ViDoRe corpus
            assert (cfg.data.max_doc_queries, cfg.data.max_doc_pages) == (50, 200)
    quick = sets["backbone_scaling_paper"].resolved_parameters(quick=True)
    assert A.model_specs(quick["families"], quick["family_size"], quick["scaling_family"],
                                 quick["sizes"], quick["checkpoints"])[0]["overrides"] == {}


def test_config_overrides_are_type_checked():
    cfg = A.config_from_params(max_steps=40, overrides={"train.grad_cache_chunk_size": "8"})
    assert cfg.train.grad_cache_chunk_size == 8
    with pytest.raises(ConfigError, match="overrides: unknown config key"):
        A.config_from_params(overrides={"train.gradcache": 8})


def test_run_methods_with_resume_continues_each_run_from_its_last_checkpoint(tmp_path: Path):
    """The paper sets train for days, but run_methods deleted every run's checkpoints and notebook_setup emptied
    the run folder, so a crash restarted every method from step 0 (a review helper).  With ``resume`` the
    checkpoints stay and a rerun continues from them; without it a run starts over."""
    import json

    base = A.config_from_params(max_steps=2, batch_size=4, n_train=16, n_eval_queries=1, n_candidates=2,
                                overrides={"train.checkpoint_every_n_steps": 1})
    run = tmp_path / "MetaEmbed" / "seed0"
    A.run_methods(["MetaEmbed"], base, tmp_path, resume=True, verbose=False)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    longer = A.config_from_params(base, max_steps=3)
    rows = A.run_methods(["MetaEmbed"], longer, tmp_path, resume=True, verbose=False)
    timing = json.loads((run / "timing.json").read_text())
    assert (timing["first_step"], timing["steps"]) == (2, 1) and len(rows)  # steps 2 -> 3, then evaluated
    A.run_methods(["MetaEmbed"], longer, tmp_path, verbose=False)  # no resume: from step 0, checkpoints removed
    timing = json.loads((run / "timing.json").read_text())
    assert (timing["first_step"], timing["steps"]) == (0, 3) and not (run / "checkpoints").exists()
    work = A.work_dir_for(tmp_path / "out")
    (work / "kept").mkdir(parents=True)
    A.notebook_setup(tmp_path / "out", tmp_path / "figs", resume=True)
    assert (work / "kept").is_dir()  # resume keeps the training-run folder
    A.notebook_setup(tmp_path / "out", tmp_path / "figs")
    assert not work.exists()


def test_run_methods_rejects_repeated_methods_and_seeds(monkeypatch, tmp_path: Path):
    """A repeat used to train twice into one <method>/seed<k> folder, then fail later in summarize;
    seeds="12" silently ran seeds 1 and 2."""
    from metaembed import pipeline

    trained = []
    monkeypatch.setattr(pipeline, "train_and_evaluate", lambda cfg, *a, **k: trained.append(cfg) or pd.DataFrame())
    base = A.config_from_params(max_steps=7, n_train=16)
    with pytest.raises(ValueError, match=r"seeds \[0, 1, 0\] repeat \[0\]"):
        A.run_methods(["MetaEmbed"], base, tmp_path, object(), seeds=[0, 1, 0], verbose=False)
    with pytest.raises(ValueError, match=r"methods \['MetaEmbed', 'NoMMR', 'MetaEmbed'\] repeat \['MetaEmbed'\]"):
        A.run_methods(["MetaEmbed", "NoMMR", "MetaEmbed"], base, tmp_path, object(), verbose=False)
    with pytest.raises(ValueError, match="seeds must be an int or a list of ints, got '12'"):
        A.run_methods(["MetaEmbed"], base, tmp_path, object(), seeds="12", verbose=False)
    assert trained == []  # rejected before any training


def test_model_specs_and_scaling_runs_reject_one_label_for_two_models(tmp_path: Path):
    """Two checkpoints of one published backbone used to share the label, the run folder and the result rows."""
    ckpts = {"qwen2.5-vl-3b": "ck/a", "Qwen2.5-VL-3B-Instruct": "ck/b"}
    with pytest.raises(ConfigError, match="two models are both labelled 'MetaEmbed-3B'.*ck/a.*ck/b"):
        A.model_specs([], "s", "qwen2_5_vl", list(ckpts), ckpts)
    spec = {"model": "m", "backbone": "qwen2_5_vl", "size": "xs", "backbone_path": None, "overrides": {}}
    with pytest.raises(ConfigError, match="two models are both labelled 'm'"):
        A.scaling_runs([spec, {**spec, "size": "s"}], ["MetaEmbed"], A.config_from_params(max_steps=2), tmp_path,
                       verbose=False)


def test_model_specs_and_scaling_runs_name_a_missing_path_and_an_empty_model_list(tmp_path: Path):
    """``checkpoints: {xs: {lr: 0.01}}`` stopped on a bare ``KeyError: 'path'``, and no model at all on pandas'
    "No objects to concatenate" (a review helper); both are ConfigErrors before any training."""
    with pytest.raises(ConfigError, match=r"checkpoints\['xs'\] needs a 'path'"):
        A.model_specs([], "xs", "qwen2_5_vl", ["xs"], {"xs": {"lr": 0.01}})
    with pytest.raises(ConfigError, match="no model to train"):
        A.model_specs([], "xs", "qwen2_5_vl", [], {})
    with pytest.raises(ConfigError, match="at least one model"):
        A.scaling_runs([], ["MetaEmbed"], A.config_from_params(max_steps=2), tmp_path, verbose=False)


def test_aggregation_keeps_rows_with_a_missing_key():
    """pandas' groupby drops NaN keys: rows without a seed (or a model without params) used to vanish from
    method_summary / Table 5 / scaling_table without a word."""
    df = results()
    df.loc[df["method"] == "NoMMR", "seed"] = float("nan")  # e.g. rows of a run that had no seed column
    assert "NoMMR" in set(A.method_summary(df)["method"])
    t = A.table5(df).set_index("row")
    assert t.loc["NoMMR-(16,64)", "Overall"] == 52.0 and t.loc["NoMMR-(16,64)", "Overall se"] > 0
    scaled = df[df["method"].isin(["MetaEmbed", "single-last"])].assign(model="a", params=float("nan"))
    assert A.scaling_table(scaled)["method"].tolist() == ["MetaEmbed", "single-last"]


def test_notebook_setup_makes_folders_empties_old_runs_and_sets_threads(tmp_path: Path, capsys):
    out_dir = tmp_path / "runs" / "nb"
    stale = A.work_dir_for(out_dir) / "old-model"
    stale.mkdir(parents=True)
    threads = torch.get_num_threads()
    try:
        out, figs, work = A.notebook_setup(out_dir, tmp_path / "figs", threads=1)
        assert torch.get_num_threads() == 1 or torch.cuda.is_available()
        A.notebook_setup(out_dir, tmp_path / "figs", threads=None)  # None leaves the thread count alone
        assert torch.get_num_threads() == 1 or torch.cuda.is_available()
    finally:
        torch.set_num_threads(threads)
    assert out == out_dir and out.is_dir() and figs == tmp_path / "figs"
    assert work == A.work_dir_for(out_dir) and not stale.exists()
    assert pd.get_option("display.width") == 200
    assert f"tables -> {out.resolve()}" in capsys.readouterr().out


def test_remove_stale_outputs_removes_what_a_rerun_did_not_write_again(tmp_path: Path, capsys):
    """A hand rerun into the same output_dir left the earlier run's conditional tables and figures next to the new
    ones (mmr_vs_nommr.csv after a rerun without NoMMR).  Only the notebook's own tables and figures that existed
    at notebook_setup and were not rewritten go; other notebooks' figures, sub-folders and other files stay."""
    out, figs = tmp_path / "out", tmp_path / "figs"
    (figs / "nb_paper").mkdir(parents=True)
    out.mkdir()
    A.notebook_setup(out, figs, threads=None)  # the earlier run: writes its tables, and its last cell records them
    old = {out / "stale.csv": "a", out / "stale.json": "{}", out / "kept.csv": "a"}
    for path, text in old.items():
        path.write_text(text)
    A.remove_stale_outputs(out, figs, prefix="nb")
    old.update({out / "notes.txt": "mine", figs / "nb_old.png": "x", figs / "nb_old.pdf": "x", figs / "nb_fig.png": "x",
                figs / "other_fig.png": "x", figs / "nb_paper" / "nb_fig.png": "x", figs / "nbextra.png": "x"})
    for path, text in old.items():
        path.write_text(text)
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # written long before this run
    A._OUTPUT_SNAPSHOTS.clear()  # a new kernel
    with pytest.raises(RuntimeError, match="notebook_setup"):
        A.remove_stale_outputs(out, figs, prefix="nb")
    out_, figs_, _ = A.notebook_setup(out, figs, threads=None)
    (out / "kept.csv").write_text("a")  # rewritten, same size
    (out / "new.csv").write_text("b")
    (figs / "nb_fig.png").write_text("y")
    with pytest.raises(ValueError, match="prefix"):
        A.remove_stale_outputs(out, figs, prefix="")
    capsys.readouterr()
    removed = A.remove_stale_outputs(out_, figs_, prefix="nb")
    assert [p.name for p in removed] == ["nb_old.pdf", "nb_old.png", "stale.csv", "stale.json"]
    assert "stale.csv" in capsys.readouterr().out
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["figs/nb_fig.png", "figs/nb_paper/nb_fig.png", "figs/nbextra.png", "figs/other_fig.png",
                    "out/.notebook-outputs", "out/kept.csv", "out/new.csv", "out/notes.txt"]
    assert A.remove_stale_outputs(out, figs, prefix="nb") == []  # a second call: nothing stale is left
    (out / ".notebook-outputs").write_text("[" * 10**5 + "]" * 10**5)  # RecursionError (a fuzzing helper)
    assert A.remove_stale_outputs(out, figs, prefix="nb") == []


def test_remove_stale_outputs_in_one_folder_for_tables_and_figures(tmp_path: Path):
    """output_dir == figures_dir: the tables the notebook's earlier run wrote are still its own, whatever their
    name."""
    A.notebook_setup(tmp_path, tmp_path, threads=None)
    (tmp_path / "table.csv").write_text("x")
    A.remove_stale_outputs(tmp_path, tmp_path, "nb")  # the earlier run
    for name in ("table.csv", "nb_a.png", "other_a.png"):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, ns=(1_000_000_000, 1_000_000_000))
    A.notebook_setup(tmp_path, tmp_path, threads=None)
    assert [p.name for p in A.remove_stale_outputs(tmp_path, tmp_path, "nb")] == ["nb_a.png", "table.csv"]


def test_remove_stale_outputs_keeps_tables_no_run_of_the_notebook_wrote(tmp_path: Path):
    """papermill -p output_dir pointed at a used folder: the last cell deleted every *.csv / *.json in it (a user's
    measurements, another notebook's tables, a reproduce run's .reproduce.json) as "stale outputs of an earlier
    run".  Only tables this notebook's own earlier run wrote there go."""
    mine = {"my_measurements.csv": "a,b", "notes.json": "{}", ".reproduce.json": "{}", "other_nb_table.csv": "c"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
        os.utime(tmp_path / name, ns=(1_000_000_000, 1_000_000_000))
    for cond in (True, False):  # a first run, then a rerun that no longer writes extra.csv
        out, figs, _ = A.notebook_setup(tmp_path, tmp_path / "figs", threads=None)
        (out / "results.csv").write_text("x")
        if cond:
            (out / "extra.csv").write_text("y")
        removed = A.remove_stale_outputs(out, figs, prefix="nb")
    assert [p.name for p in removed] == ["extra.csv"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file() and p.name != ".notebook-outputs") == sorted(
        [*mine, "results.csv"])


def test_remove_stale_outputs_keeps_a_table_changed_since_the_run_wrote_it(tmp_path: Path):
    """A table the earlier run wrote, then edited by hand (or replaced by a user's own of that name), was deleted by
    a rerun that did not write it again: the manifest held its name only.  It holds the sha256 as written now, and
    a manifest of names alone (written before) still removes its unchanged tables."""
    import json

    def run(writes: dict[str, str]) -> list[str]:
        out, figs, _ = A.notebook_setup(tmp_path, tmp_path / "figs", threads=None)
        for name, text in writes.items():
            (out / name).write_text(text)
        return [p.name for p in A.remove_stale_outputs(out, figs, prefix="nb")]

    run({"results.csv": "x", "extra.csv": "y", "edited.csv": "z"})
    manifest = json.loads((tmp_path / ".notebook-outputs").read_text())
    assert sorted(manifest["nb"]) == ["edited.csv", "extra.csv", "results.csv"]
    (tmp_path / "edited.csv").write_text("z, with my notes")
    for name in ("extra.csv", "edited.csv"):
        os.utime(tmp_path / name, ns=(1_000_000_000, 1_000_000_000))
    assert run({"results.csv": "x2"}) == ["extra.csv"]
    assert (tmp_path / "edited.csv").read_text() == "z, with my notes"
    (tmp_path / "edited.csv").write_text("z")
    (tmp_path / ".notebook-outputs").write_text(json.dumps({"nb": ["edited.csv", "results.csv", ["odd"]]}))
    os.utime(tmp_path / "edited.csv", ns=(1_000_000_000, 1_000_000_000))
    assert run({"results.csv": "x3"}) == ["edited.csv"]


def test_config_from_params_type_checks_parameters_like_overrides():
    """Parameters were stored as given: "no" switched gradient checkpointing on, a group [16, 64.5] became (16, 64),
    max_steps="5" was a TypeError and lr="1e-4" (YAML 1.1 reads 1e-4 as a string) was refused; overrides cast them."""
    with pytest.raises(ConfigError, match=r"notebook parameters: model.gradient_checkpointing must be true or false"):
        A.config_from_params(gradient_checkpointing="no")
    with pytest.raises(ConfigError, match=r"loss.groups\[4\]\[1\] must be an integer, got float 64.5"):
        A.config_from_params(groups=[[1, 1], [2, 4], [4, 8], [8, 16], [16, 64.5]])
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        A.config_from_params(max_steps="ten")
    cfg = A.config_from_params(max_steps="5", lr="1e-4", backbone_path=Path("ck") / "3b", groups=[[1, 1], [16, 64]])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.warmup_steps) == (5, 1e-4, 1)
    assert cfg.model.backbone_path == str(Path("ck") / "3b") and cfg.loss.groups == [(1, 1), (16, 64)]


def test_config_from_params_overrides_win_over_notebook_defaults():
    """The notebook defaults (no periodic checkpoint, no progress bar, short warmup, a held-out check within
    max_steps) silently replaced the same keys set in ``overrides``, which are documented as set last."""
    keys = {"train.checkpoint_every_n_steps": 20, "train.progress_bar": True, "train.warmup_steps": 30,
            "train.val_check_interval": 50}
    tc = A.config_from_params(max_steps=100, overrides=keys).train
    assert (tc.checkpoint_every_n_steps, tc.progress_bar, tc.warmup_steps, tc.val_check_interval) == (20, True, 30, 50)
    tc = A.config_from_params(max_steps=100).train  # without overrides: the notebook defaults
    assert (tc.checkpoint_every_n_steps, tc.progress_bar, tc.warmup_steps) == (None, False, 20)
    assert tc.val_check_interval <= 100


def test_run_methods_checks_every_method_before_training(monkeypatch, tmp_path: Path):
    """NoMMR's invalid config (loss groups not ending at (R_q, R_c)) was found after MetaEmbed and single-last trained."""
    from metaembed import pipeline

    trained = []
    monkeypatch.setattr(pipeline, "train_and_evaluate", lambda cfg, *a, **k: trained.append(cfg.name) or pd.DataFrame())
    base = A.config_from_params(max_steps=7, groups=[(1, 1), (2, 4), (4, 8)])  # R = (16, 64): MetaEmbed only
    with pytest.raises(ConfigError, match=r"NoMMR is the \(R_q, R_c\) = \(16, 64\) baseline"):
        A.run_methods(["MetaEmbed", "single-last", "NoMMR"], base, tmp_path, object(), seeds=[0, 1], verbose=False)
    bad_budgets = A.config_from_params(max_steps=7, R_q=4, R_c=8, groups=[(1, 1), (4, 8)])
    bad_budgets.eval.budgets = [(1, 1), (16, 64)]
    with pytest.raises(ConfigError, match="eval.budgets"):
        A.run_methods(["single-last", "MetaEmbed"], bad_budgets, tmp_path, object(), verbose=False)
    assert trained == []


def test_scaling_runs_checks_every_model_before_training(monkeypatch, tmp_path: Path):
    """A size without a checkpoint (a published name read as a tiny size) failed only after the models before it
    trained; so did a per-model override that breaks a method."""
    from metaembed import pipeline

    trained = []
    monkeypatch.setattr(pipeline, "train_and_evaluate", lambda cfg, *a, **k: trained.append(cfg.name) or pd.DataFrame())
    base = A.config_from_params(max_steps=2)
    ok = {"model": "ok", "backbone": "qwen2_5_vl", "size": "xs", "backbone_path": None, "overrides": {}}
    specs = A.model_specs([], "s", "qwen2_5_vl", ["xs", "qwen2.5-vl-3b"], {})  # no checkpoints entry for the 3B
    with pytest.raises(ConfigError, match=r"model 'qwen2_5_vl-qwen2.5-vl-3b' \(size 'qwen2.5-vl-3b', tiny\): "
                                          r"model.tiny_size='qwen2.5-vl-3b'; the tiny qwen2_5_vl sizes are"):
        A.scaling_runs(specs, ["MetaEmbed"], base, tmp_path, object(), verbose=False)
    broken = {**ok, "model": "broken", "overrides": {"groups": [[1, 1], [4, 8]]}}  # NoMMR: last group != (16, 64)
    with pytest.raises(ConfigError, match="NoMMR is the"):
        A.scaling_runs([ok, broken], ["MetaEmbed", "NoMMR"], base, tmp_path, object(), verbose=False)
    with pytest.raises(ValueError, match="unknown method"):
        A.scaling_runs([ok], ["MetaEmbed", "MMR"], base, tmp_path, object(), verbose=False)
    assert trained == []


def test_load_benchmark_reads_the_vidore_v1_folders_beside_v2(tmp_path: Path):
    """A folder with ViDoRe v2 and some v1 datasets: the pipeline loaded v2 (warning it skipped v1), then the whole
    v1 suite was read and the first missing v1 folder raised; a v2-only folder failed on a v1 file path."""
    from test_vidore import beir, v1_file

    v1_file(tmp_path / "tatdqa_test" / "data" / "test-00000-of-00001.parquet", queries=["q1", "q2"],
            filenames=["f1", "f2"], sizes=[(10, 10), (11, 10)])
    base = A.config_from_params(tiny_size="xs", n_train=8, n_eval_queries=2, n_candidates=4, vidore_path=str(tmp_path))
    assert [t.name for t in A.load_benchmark(base).doc_tasks] == ["tatdqa"]  # v1 only
    beir(tmp_path / "esg_reports_v2", corpus_ids=[0, 1], queries=[(0, "co2"), (1, "eau")], qrels=[(0, 1, 1), (1, 0, 1)],
         languages=["english", "french"])
    bm = A.load_benchmark(base)
    assert [t.name for t in bm.doc_tasks] == ["tatdqa"] and bm.eval_tasks and bm.train  # v1 beside v2
    v2_only = A.config_from_params(base, vidore_path=str(tmp_path / "v2"))
    beir(tmp_path / "v2" / "esg_reports_v2", corpus_ids=[0], queries=[(0, "co2")], qrels=[(0, 0, 1)], languages=["english"])
    with pytest.raises(ConfigError, match=r"no ViDoRe v1 dataset folder.*found: \['esg_reports_v2'\]"):
        A.load_benchmark(v2_only)
    # the paper sets' --quick caps (data.max_doc_queries / max_doc_pages) raised "cap the ViDoRe tasks of
    # data.vidore_path, which is not set" here; the instructions reach the v1 tasks as the pipeline's
    capped = A.config_from_params(base, overrides={"data.max_doc_queries": 1, "data.max_doc_pages": 1,
                                                   "data.vidore_query_instruction": "Find: ",
                                                   "data.vidore_page_instruction": "A page."})
    (task,) = A.load_benchmark(capped).doc_tasks
    assert [q.text for q in task.queries.values()] == ["Find: q1"] and list(task.corpus) == ["f1"]
    assert task.corpus["f1"].text == "A page."


# --------------------------------------------------------------------------- notebook cells with other parameters


def _notebook_cells(name: str, *needles: str) -> list[str]:
    """Sources of the code cells of ``notebooks/<name>.ipynb`` that contain each needle, in needle order."""
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    out = []
    for needle in needles:
        found = [c.source for c in nb.cells if c.cell_type == "code" and needle in c.source]
        assert len(found) == 1, f"{name}: {len(found)} code cells contain {needle!r}"
        out.append(found[0])
    return out


def _lib_with(**fakes):
    """``metaembed.ablations`` with some functions replaced, as a notebook cell's ``ablations``."""
    import types

    return types.SimpleNamespace(**{**{k: getattr(A, k) for k in dir(A) if not k.startswith("__")}, **fakes})


def _run_cells(ns: dict, name: str, *needles: str) -> dict:
    """Execute the code cells of ``notebooks/<name>.ipynb`` holding each needle, in order, in namespace ``ns``."""
    for src in _notebook_cells(name, *needles):
        exec(compile(src, "<cell>", "exec"), ns)
    return ns


def test_mmr_ablation_figures_with_single_vector_methods_only(tmp_path: Path):
    """methods=[single-last, single-mean] (papermill -y) used to crash Fig. 4b: 'no budget to draw'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from metaembed import plotting

    from metaembed import evaluation

    df = results()
    methods = ["single-last", "single-mean"]
    ns = {"A": A, "ablations": A, "plotting": plotting, "methods": methods, "fig4b_metric": "ndcg@5",
          "summary": A.method_summary(df[df["method"].isin(methods)]), "data_source": "synthetic",
          "n_candidates": 8, "figs": tmp_path, "seeds": [0], "backbone_path": None, "tiny_size": "xs",
          "base": A.config_from_params(max_steps=5, n_train=8, n_eval_queries=6)}
    ns["benchmark"] = A.load_benchmark(ns["base"])
    try:
        for src in _notebook_cells("mmr_ablation", "mmr_ablation_fig4b", "mmr_ablation_per_metatask"):
            exec(compile(src, "<cell>", "exec"), ns)
    finally:
        plt.close("all")
    assert not list(tmp_path.glob("*.png"))  # no curve to draw: no figure, and no error
    ns["methods"] = ["MetaEmbed", "single-last"]  # one curve method: drawn, titled for what it shows
    ns["summary"] = A.method_summary(df[df["method"].isin(ns["methods"])])
    try:
        for src in _notebook_cells("mmr_ablation", "mmr_ablation_fig4b", "mmr_ablation_per_metatask"):
            exec(compile(src, "<cell>", "exec"), ns)
        assert ns["fig"] is not None and sorted(p.name for p in tmp_path.glob("*.png")) == [
            "mmr_ablation_fig4b.png", "mmr_ablation_per_metatask.png"]
        fig4b = [f for f in map(plt.figure, plt.get_fignums()) if f.axes[0].get_title().startswith("Document")]
        (ndcg_ax, p1_ax) = fig4b[0].axes[:2]
        level = evaluation.random_ranking_level(ns["benchmark"].doc_tasks, 5)  # the floor of the NDCG@5 panel
        dotted = lambda ax: [(ln.get_label(), ln.get_ydata()[0]) for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert dotted(ndcg_ax) == [(f"random ranking ({level:.1f})", pytest.approx(level))]
        assert dotted(p1_ax) == [("chance (1/8)", pytest.approx(12.5))]
    finally:
        plt.close("all")


def _efficiency_namespace(tmp_path: Path, **params) -> dict:
    """The efficiency notebook's Table 3 cells run on a fake latency measurement (no benchmark)."""
    from metaembed.efficiency import efficiency_table

    ns = {"pd": pd, "groups": [[1, 1], [2, 4], [4, 8]], "paper_dim": 3584, "paper_candidates": 100000,
          "index_dtype": "bfloat16", "accuracy_run": None, "latency_candidates": 10, "latency_dim": 64,
          "scoring_batch_size": 2, "out": tmp_path / "efficiency", **params}
    ns["out"].mkdir(parents=True, exist_ok=True)
    ns["lat"] = pd.DataFrame({"device": "cpu (test)", "budget": [f"({a},{b})" for a, b in ns["groups"]],
                              "single_ms": 1.0, "single_ms_std": 0.1, "per_query_ms": 0.5, "per_query_ms_std": 0.1})
    for src in _notebook_cells("efficiency", "analytic = efficiency_table(", "t3 = analytic["):
        exec(compile(src, "<cell>", "exec"), ns)
    assert ns["analytic"].equals(efficiency_table(ns["paper_dim"], ns["paper_candidates"], ns["groups"],
                                                  ns["index_dtype"]))
    return ns


def test_efficiency_table3_shows_paper_numbers_only_beside_the_paper_setting(tmp_path: Path):
    """paper_dim=2048 / float32 used to print the paper's D=3584 bf16 latencies beside another config's FLOPs."""
    paper = _efficiency_namespace(tmp_path)["t3"]
    assert paper["paper latency per query (ms)"].notna().all() and paper["paper MMEB (%, MetaEmbed-7B)"].notna().all()
    for other in ({"paper_dim": 2048}, {"index_dtype": "float32"}, {"paper_candidates": 1000}):
        t3 = _efficiency_namespace(tmp_path, **other)["t3"]
        assert t3["paper latency per query (ms)"].isna().all() and t3["paper MMEB (%, MetaEmbed-7B)"].isna().all(), other


def test_efficiency_accuracy_column_refuses_a_run_of_several_models(tmp_path: Path):
    """accuracy_run=backbone_scaling used to average MetaEmbed over every model into one 'accuracy'."""
    run = tmp_path / "backbone_scaling"
    run.mkdir()
    rows = [{"model": m, "method": "MetaEmbed", "seed": 0, "group": "Overall", "budget": b, "value": v}
            for m, v in (("qwen2_5_vl-xs", 10.0), ("paligemma-xs", 30.0)) for b in ("(1,1)", "(2,4)", "(4,8)")]
    pd.DataFrame(rows).to_csv(run / "summary.csv", index=False)
    with pytest.raises(ValueError, match="2 models"):
        _efficiency_namespace(tmp_path, accuracy_run="backbone_scaling")
    pd.DataFrame(rows[:3]).to_csv(run / "summary.csv", index=False)  # one model: its scores, named
    t3 = _efficiency_namespace(tmp_path, accuracy_run="backbone_scaling")["t3"]
    assert t3["MetaEmbed P@1 (%, qwen2_5_vl-xs)"].tolist() == [10.0, 10.0, 10.0]


def test_efficiency_accuracy_column_names_its_model(tmp_path: Path):
    """efficiency_paper put mmr_ablation_paper's 3B P@1 beside the paper's MetaEmbed-7B MMEB column with no model
    named in the table or its notes (a review helper)."""
    import json

    run = tmp_path / "mmr_ablation_paper"
    run.mkdir()
    rows = [{"method": "MetaEmbed", "seed": 0, "group": "Overall", "budget": b, "value": 20.0}
            for b in ("(1,1)", "(2,4)", "(4,8)")]
    pd.DataFrame(rows).to_csv(run / "summary.csv", index=False)
    (run / "key_numbers.json").write_text(json.dumps({"backbone": "checkpoints/Qwen2.5-VL-3B-Instruct"}))
    t3 = _efficiency_namespace(tmp_path, accuracy_run="mmr_ablation_paper")["t3"]
    assert t3["MetaEmbed P@1 (%, Qwen2.5-VL-3B-Instruct)"].tolist() == [20.0] * 3
    assert "paper MMEB (%, MetaEmbed-7B)" in t3.columns
    notes = json.loads((tmp_path / "efficiency" / "table3_notes.json").read_text())
    assert notes["accuracy_model"] == "Qwen2.5-VL-3B-Instruct" and "model Qwen2.5-VL-3B-Instruct" in notes["accuracy"]


def test_backbone_scaling_with_single_vector_methods_only_fails_before_training_with_a_clear_error():
    """methods=[single-last] used to train every model, then crash the notebook with KeyError: 'model'."""
    df = results().assign(model="a-xs", backbone="a", size="xs", params=1000)
    with pytest.raises(ValueError, match=r"no MetaEmbed rows \(methods: \['single-last'\]\); add MetaEmbed"):
        A.scaling_table(df[df["method"] == "single-last"])
    (src,) = _notebook_cells("backbone_scaling", "specs = ablations.model_specs(")
    ns = {"methods": ["single-last"], "seeds": [0], "ablations": A}
    with pytest.raises(ValueError, match="add 'MetaEmbed'"):
        exec(compile(src, "<cell>", "exec"), ns)  # raises before any model spec, config or benchmark is built
    assert "specs" not in ns


def test_efficiency_latency_figure_calls_only_the_paper_dim_the_paper_dim(tmp_path: Path):
    """latency_dim=256 with paper_dim=3584 used to be labelled "D=256 (paper dim)" in the Fig. 2 analogue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from metaembed import plotting

    (src,) = _notebook_cells("efficiency", "sizes_family = tiny[")
    budgets = ["(1,1)", "(2,4)"]
    tiny = pd.DataFrame({"model": ["qwen2_5_vl-xs"] * 2 + ["qwen2_5_vl-m"] * 2, "backbone": "qwen2_5_vl",
                         "D": [32, 32, 128, 128], "budget": budgets * 2, "score_ms": [0.1, 0.1, 0.2, 0.2],
                         "score_std_ms": [0.01, 0.01, 0.3, 0.01], "index_gib_measured": 1e-6})
    lat = pd.DataFrame({"budget": budgets, "single_ms": 1.0, "single_ms_std": 0.1, "index_gib": 1e-4})
    settings = {}
    for latency_dim in (3584, 256):
        ns = {"pd": pd, "plotting": plotting, "tiny": tiny, "lat": lat, "latency_dim": latency_dim, "paper_dim": 3584,
              "out": tmp_path, "figs": tmp_path, "latency_candidates": 10, "index_dtype": "bfloat16",
              "latency_repeats": 2, "measured": {"device": {"type": "cpu"}}}
        try:
            exec(compile(src, "<cell>", "exec"), ns)
            ax_l, ax_m = ns["fig"].axes  # plotting.plot_latency_memory on log axes, largest D first
            legend = [t.get_text() for t in ax_m.get_legend().get_texts()]
            assert ax_l.get_yscale() == ax_m.get_yscale() == "log"
            assert [t.get_text() for t in ax_l.texts] == ["1 bar(s) cut at the axis (mean − sd < 0.01)"]
        finally:
            plt.close("all")
        assert legend == list(ns["settings"])
        assert legend[1:] == ["D=128 (tiny qwen2_5_vl-m)", "D=32 (tiny qwen2_5_vl-xs)"]
        settings[latency_dim] = legend
    assert settings[3584][0] == "D=3584 (paper dim)" and settings[256][0] == "D=256"


def test_seed_and_method_lists_take_papermill_scalars():
    """papermill -p seeds 1 / -p methods MetaEmbed give an int / a str: one seed, one method."""
    assert A.seed_list(1) == [1] and A.seed_list([0, 2]) == [0, 2]
    assert A.method_list("MetaEmbed") == ["MetaEmbed"] and A.method_list(("NoMMR", "split")) == ["NoMMR", "split"]
    with pytest.raises(ValueError, match="use -y"):
        A.seed_list("[0, 1]")  # papermill -p seeds '[0, 1]' passes the text
    with pytest.raises(ValueError, match="use -y"):
        A.method_list("[MetaEmbed, NoMMR]")
    for bad in (None, [], [0, 0]):
        with pytest.raises(ValueError):
            A.seed_list(bad)
    with pytest.raises(ValueError, match="unknown method"):
        A.method_list("MMR")


def test_groups_given_as_text_by_papermill_p_point_to_y():
    """papermill -p groups '[[1,1],[8,16]]' passes the text: the error named the config type, not -y as the
    seeds / methods errors do, so a researcher did not learn how to pass a list from the command line."""
    with pytest.raises(ConfigError, match="use -y 'groups: \\[\\[1,1\\],\\[8,16\\]\\]'"):
        A.config_from_params(R_q=8, R_c=16, groups="[[1,1],[8,16]]")


def test_notebook_key_numbers_record_the_recipe(tmp_path: Path):
    """Two by-hand runs of mmr_ablation (papermill -p tau 0.1, -p R_q 8 ...) into two folders wrote key_numbers.json
    files that differed only in their numbers: tau, R_q / R_c and the groups were recorded nowhere in the outputs."""
    df = results()
    ns = {"ablations": A, "methods": ["MetaEmbed", "NoMMR", "single-last"], "seeds": [0], "backbone": "qwen2_5_vl",
          "backbone_path": None, "tiny_size": "xs", "out": tmp_path, "summary": A.method_summary(df),
          "t5": A.table5(df, groups=["Overall"]),
          "base": A.config_from_params(tau=0.1, R_q=8, R_c=16, groups=[[1, 1], [8, 16]], max_steps=5)}
    import json

    (src,) = _notebook_cells("mmr_ablation", "key_numbers.json")
    exec(compile(src, "<cell>", "exec"), ns)
    key = json.loads((tmp_path / "key_numbers.json").read_text())
    assert (key["tau"], key["R_q"], key["R_c"], key["groups"]) == (0.1, 8, 16, [[1, 1], [8, 16]])
    assert (key["steps"], key["weights"], key["backbone"]) == (5, None, "tiny qwen2_5_vl xs")
    # backbone_scaling's key numbers likewise (it recorded the steps only)
    base = A.config_from_params(tau=0.05, R_q=4, R_c=8, groups=[[1, 1], [4, 8]], max_steps=7, lr=3e-4)
    scaling = pd.DataFrame({"group": ["Overall"], "method": ["MetaEmbed"], "model": ["xs"], "params": [10],
                            "value": [50.0], "gain": [float("nan")]})
    (src,) = _notebook_cells("backbone_scaling", "key_numbers.json")
    exec(compile(src, "<cell>", "exec"), {"base": base, "scaling": scaling, "out": tmp_path, "ablations": A})
    key = json.loads((tmp_path / "key_numbers.json").read_text())
    assert {k: key[k] for k in ("tau", "R_q", "R_c", "groups", "lr", "steps")} == {
        "tau": 0.05, "R_q": 4, "R_c": 8, "groups": [[1, 1], [4, 8]], "lr": 3e-4, "steps": 7}


def test_mmr_ablation_config_cell_takes_one_seed_and_one_method_from_papermill(capsys):
    """-p seeds 1 -p methods MetaEmbed used to fail: TypeError 'int' object is not subscriptable / KeyError 'M'."""
    from IPython.display import display

    (src,) = _notebook_cells("mmr_ablation", "base = ablations.config_from_params(")
    ns = {"pd": pd, "display": display, "ablations": A, "methods": "MetaEmbed", "seeds": 1, "backbone": "qwen2_5_vl",
          "backbone_path": None, "tiny_size": "xs", "R_q": 4, "R_c": 8, "groups": [[1, 1], [4, 8]], "tau": 0.03,
          "max_steps": 2, "batch_size": 4, "lr": 1e-3, "precision": "32-true", "gradient_checkpointing": False,
          "data_source": "synthetic", "data_path": None, "eval_path": None, "vidore_path": None, "n_train": 4,
          "n_eval_queries": 1, "n_candidates": 2, "overrides": {}, "fig4b_metric": "p@1"}
    exec(compile(src, "<cell>", "exec"), ns)
    assert ns["methods"] == ["MetaEmbed"] and ns["seeds"] == [1] and ns["base"].train.seed == 1
    assert "MetaEmbed" in capsys.readouterr().out


def test_tau_runs_refuse_what_papermill_passes_as_text_and_bad_indexes_before_training():
    """``-p taus '[0.01, 0.1]'`` (text: split into characters), ``taus: []`` and ``ref_tau_index: 3`` gave a bare
    IndexError or "loss.tau must be a number, got str '['", and a repeated tau failed only after the untrained
    model was built and probed (a review helper)."""
    assert A.tau_runs(["MetaEmbed", "NoMMR"], [0.01, 0.1], 1) == (
        [0.01, 0.1], 0.1, [("MetaEmbed", 0.01), ("MetaEmbed", 0.1), ("NoMMR", 0.1)])
    assert A.tau_runs(["MetaEmbed"], 0.1) == ([0.1], 0.1, [("MetaEmbed", 0.1)])
    with pytest.raises(ValueError, match="papermill -p passes lists as text"):
        A.tau_runs(["MetaEmbed"], "[0.01, 0.1]")
    with pytest.raises(ValueError, match="taus is empty"):
        A.tau_runs(["MetaEmbed"], [])
    with pytest.raises(ValueError, match="ref_tau_index=3 must index taus"):
        A.tau_runs(["MetaEmbed"], [0.01, 0.1], 3)
    with pytest.raises(ValueError, match="repeat a run"):
        A.tau_runs(["MetaEmbed"], [0.03, 0.03])


def test_modality_gap_config_cell_takes_one_tau_and_one_method_from_papermill():
    """-p taus 0.1 used to fail (TypeError: 'float' object is not subscriptable); -p methods NoMMR iterated letters."""
    ns = {"ablations": _lib_with(load_benchmark=lambda cfg: None), "methods": "NoMMR", "taus": 0.1,
          "ref_tau_index": 0, "backbone": "qwen2_5_vl", "tiny_size": "xs", "R_q": 4, "R_c": 8,
          "groups": [[1, 1], [4, 8]], "max_steps": 2, "batch_size": 4, "lr": 1e-3, "n_train": 4, "seed": 0,
          "n_probe_items": 2, "projection": "pca"}
    _run_cells(ns, "modality_gap", "ablations.tau_runs(methods, taus, ref_tau_index)")
    assert ns["methods"] == ["NoMMR"] and ns["taus"] == [0.1] and ns["base"].loss.tau == 0.1
    # every run's config is built in this cell, before the untrained model is probed (cell 5)
    assert [c.loss.tau for c in ns["configs"]] == [0.1, 0.1] and len(ns["runs"]) == 2


# --------------------------------------------------------------------------- mutation-testing gaps (helper 95)


def test_config_from_params_none_paths_reset_the_base_and_numpy_ints_are_cast(tmp_path):
    """``backbone_path=None`` (a tiny model of scaling_runs) clears a base checkpoint path instead of keeping it;
    numpy integers (from a pandas / numpy sweep) are cast like ints, not refused; the progress bar is off even when
    the base config file shows it."""
    import numpy as np

    shown = tmp_path / "shown.yaml"
    shown.write_text("train:\n  progress_bar: true\n  max_steps: 5\n")
    assert A.config_from_params(shown).train.progress_bar is False
    base = A.config_from_params(backbone_path="ck/3b", max_steps=5)
    cfg = A.config_from_params(base, backbone_path=None, tiny_size="xs")
    assert cfg.model.backbone_path is None and cfg.train.progress_bar is False
    cfg = A.config_from_params(max_steps=np.int64(5), R_q=np.int64(16), seed=np.int32(3))
    assert (cfg.train.max_steps, cfg.model.R_q, cfg.data.seed) == (5, 16, 3) and type(cfg.model.R_q) is int


def test_config_from_params_keeps_the_overrides_of_a_built_base():
    """A RunConfig base (built with the notebook's overrides, as backbone_scaling passes it to scaling_runs) keeps
    them: the notebook defaults applied again reset the checkpoint interval and progress bar and capped the
    warmup (40 -> 20 at 100 steps).  A new max_steps still refits the warmup."""
    base = A.config_from_params(max_steps=100, overrides={"train.warmup_steps": 40, "train.progress_bar": True,
                                                          "train.checkpoint_every_n_steps": 10})
    for cfg in (A.config_from_params(base, tiny_size="xs"), A.method_config(base, "NoMMR")):
        t = cfg.train
        assert (t.warmup_steps, t.progress_bar, t.checkpoint_every_n_steps) == (40, True, 10)
    assert A.config_from_params(base, max_steps=10).train.warmup_steps == 2


def _fake_training(monkeypatch, seen: list) -> None:
    from metaembed import pipeline

    def fake_train_and_evaluate(cfg, output_dir, benchmark=None, **_):
        seen.append((cfg, Path(output_dir), benchmark))
        budgets = [(1, 1)] if cfg.model.pooling.startswith("single") else BUDGETS
        return pd.DataFrame(rows("x", budgets, 10.0, 5.0)).drop(columns=["method", "seed"])

    monkeypatch.setattr(pipeline, "train_and_evaluate", fake_train_and_evaluate)


def test_run_methods_seeds_none_keeps_the_config_seed_and_builds_one_benchmark_per_data_config(monkeypatch,
                                                                                               tmp_path: Path):
    """seeds=None trains the config's own seed (and labels the rows with it); without a benchmark every seed gets
    the data of its own data.seed (one load per distinct data config, shared by the methods)."""
    seen: list = []
    _fake_training(monkeypatch, seen)
    loads = []
    monkeypatch.setattr(A, "load_benchmark", lambda cfg: loads.append(cfg.data.seed) or f"bench-{cfg.data.seed}")
    base = A.config_from_params(max_steps=7, seed=7)
    df = A.run_methods(["MetaEmbed", "single-last"], base, tmp_path, seeds=None, verbose=False)
    assert set(df["seed"]) == {7} and {c.train.seed for c, *_ in seen} == {7}
    assert seen[0][1] == tmp_path / "MetaEmbed" / "seed7"
    seen.clear()
    A.run_methods(["MetaEmbed", "single-last"], base, tmp_path, seeds=[0, 1], verbose=False)
    assert loads == [7, 0, 1] and [b for *_, b in seen] == ["bench-0", "bench-0", "bench-1", "bench-1"]


def test_load_timings_names_runs_by_their_folder_under_work(tmp_path: Path):
    for run in ("MetaEmbed/seed0", "MetaEmbed/seed1", "m/NoMMR/seed0"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "timing.json").write_text('{"train_s": 1.5, "eval_s": 0.5, "steps": 3}')
    t = A.load_timings(tmp_path)
    assert t["run"].tolist() == ["MetaEmbed/seed0", "MetaEmbed/seed1", "m/NoMMR/seed0"]
    assert t["train_s"].tolist() == [1.5] * 3 and list(t.columns) == ["run", "train_s", "eval_s", "steps"]
    # a "run" key inside the file relabelled the row; a truncated file raised JSONDecodeError naming no file
    (tmp_path / "MetaEmbed/seed0/timing.json").write_text('{"run": "other", "train_s": 1.5}')
    assert A.load_timings(tmp_path)["run"].tolist()[0] == "MetaEmbed/seed0"
    (tmp_path / "MetaEmbed/seed1/timing.json").write_text('{"train_s": 1.')
    with pytest.raises(ValueError, match=r"MetaEmbed/seed1/timing.json: not a timing record"):
        A.load_timings(tmp_path)


def test_train_model_trains_into_the_given_folder(monkeypatch, tmp_path: Path):
    from metaembed import training

    seen = []

    class Model:
        def eval(self):
            return "eval-mode"

    monkeypatch.setattr(training, "train", lambda cfg, bm: seen.append(cfg.train.output_dir) or (Model(), None))
    base = A.config_from_params(max_steps=2)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert A.train_model(base, tmp_path / "run") == "eval-mode"
    assert seen == [str(tmp_path / "run")] and not (tmp_path / "run" / "checkpoints").exists()
    assert base.train.output_dir != str(tmp_path / "run")  # the caller's config is not modified


def odd_budget_results(seeds=(0, 1)) -> pd.DataFrame:
    """MetaEmbed at budgets that share r_q or whose cost order differs from r_q + r_c order; single-last beside it."""
    data = []
    for s in seeds:
        data += rows("single-last", [(1, 1)], 50.0 + 2 * s, 40.0 + s, s)
        data += rows("single-mean", [(1, 1)], 49.0, 39.0 + 4 * s, s)
        data += rows("MetaEmbed", [(1, 1), (1, 6), (2, 2), (1, 4), (2, 4)], 40.0 + 4 * s, 30.0, s, step=3.0)
    return pd.DataFrame(data)


def test_budget_curves_sort_by_cost_then_r_q_within_each_method_and_seed():
    curves = A.budget_curves(odd_budget_results())
    meta = curves[(curves["method"] == "MetaEmbed") & (curves["seed"] == 0)]
    # cost r_q * r_c: 1, 4 (r_q 1 before 2), 4, 6, 8 -- not r_q + r_c (2, 4, 5, 6, 7)
    assert meta["budget"].tolist() == ["(1,1)", "(1,4)", "(2,2)", "(1,6)", "(2,4)"]
    assert meta["value"].tolist() == [42.0, 51.0, 48.0, 45.0, 54.0]
    keys = list(zip(curves["method"], curves["seed"]))
    assert keys == sorted(keys, key=keys.index) and len(set(keys)) == 6  # each curve contiguous
    assert "seed" in curves.columns  # one curve per seed: the plot draws the band over seeds


def test_best_single_vector_and_curves_average_seeds_and_respect_candidates():
    df = odd_budget_results()  # single-last Overall 52, 54 (mean 53); single-mean 51, 51 ; NDCG 40/41 vs 39/43
    assert A.best_single_vector(df, "Overall") == ("single-last", 53.0)
    assert A.best_single_vector(df, "NDCG@5") == ("single-mean", 41.0)  # 41.0 beats 40.5 only as a mean
    assert A.best_single_vector(df, "Overall", candidates=("single-mean",)) == ("single-mean", 51.0)
    curves, base = A.curves_vs_best_single(df, ["p@1", "Overall"], ["MetaEmbed"], candidates=("single-mean",))
    assert base == {"Overall": "single-mean"} and set(curves["group"]) == {"Overall"}
    assert len(curves) == 2 * 5 + 2  # one panel: MetaEmbed's 5 budgets and single-mean's (1,1), per seed
    assert set(curves["method"]) == {"MetaEmbed", "single-mean"}


def test_p1_standard_error_budget_meta_task_and_seeds():
    """The SE of one run: per seed over the tasks of the group at exactly ``budget``, then averaged over seeds."""
    df = odd_budget_results()
    meta = df[df["method"] == "MetaEmbed"]

    def se(ps):
        return 100 * math.sqrt(sum(p * (1 - p) / 10 for p in ps)) / len(ps)

    s0 = se([0.43, 0.45, 0.47])  # seed 0 at (1,6): 40 + 3 * 1 + (0, 2, 4)
    s1 = se([0.47, 0.49, 0.51])  # seed 1: + 4
    assert A.p1_standard_error(meta, "Overall", (1, 6)) == pytest.approx((s0 + s1) / 2)
    assert A.p1_standard_error(meta, "VQA", (1, 6)) == pytest.approx((se([0.45]) + se([0.49])) / 2)
    assert A.p1_standard_error(meta, "Classification", (1, 1)) == pytest.approx((se([0.40]) + se([0.44])) / 2)
    assert math.isnan(A.p1_standard_error(meta, "Grounding", (1, 6)))


def test_table5_cells_match_both_budget_coordinates_and_take_the_reference_at_its_largest_budget():
    df = odd_budget_results()
    t5 = A.table5(df, decimals=None)
    assert t5["row"].tolist() == ["single-last", "single-mean", "MetaEmbed (1,1)", "MetaEmbed (1,4)", "MetaEmbed (2,2)",
                                  "MetaEmbed (1,6)", "MetaEmbed (2,4)"]  # MetaEmbed rows by cost r_q * r_c, then r_q
    t = t5.set_index("row")
    # (1,4) and (1,6) share r_q = 1: each row is its own budget's mean over seeds
    assert t.loc["MetaEmbed (1,4)", "Overall"] == pytest.approx(42.0 + 9 + 2)
    assert t.loc["MetaEmbed (1,6)", "Overall"] == pytest.approx(42.0 + 3 + 2)
    assert t.loc["MetaEmbed (1,4)", "Overall sd"] == pytest.approx(math.sqrt(8))  # 51, 55 (ddof 1)
    assert t.loc["MetaEmbed (1,4)", "Overall se"] == pytest.approx(A.p1_standard_error(df[df["method"] == "MetaEmbed"],
                                                                                       "Overall", (1, 4)))
    assert t.loc["MetaEmbed (2,4)", "Δ Overall"] == pytest.approx(56.0 - 53.0)
    ref = A.table5(df, reference="MetaEmbed", decimals=None).set_index("row")
    assert ref.loc["single-last", "Δ Overall"] == pytest.approx(53.0 - 56.0)  # MetaEmbed at (2,4), its largest
    assert ref.loc["MetaEmbed (2,4)", "Δ Overall"] == 0.0
    rounded = A.table5(df, decimals=1).set_index("row")
    assert rounded.loc["MetaEmbed (1,4)", "Overall sd"] == 2.8 and rounded.loc["MetaEmbed (1,4)", "n_seeds"] == 2


def test_table5_n_seeds_counts_the_most_seeds_of_any_group():
    """A seed without document tasks still counts for the P@1 columns."""
    df = results(seeds=(0, 1))
    df = df[~((df["seed"] == 1) & (df["metric"] == "NDCG@5"))]
    t = A.table5(df, groups=["Overall", "NDCG@5"]).set_index("row")
    assert t.loc["single-last", "n_seeds"] == 2 and t.loc["single-last", "Overall"] == 52.5
    assert t.loc["single-last", "NDCG@5"] == 40.0 and math.isnan(t.loc["single-last", "NDCG@5 sd"])


def test_scaling_table_means_over_seeds_at_exactly_the_budget():
    df = odd_budget_results().assign(model="a-xs", backbone="a", size="xs", params=1000)
    t = A.scaling_table(df, budget=(1, 4))
    meta = t[t["method"] == "MetaEmbed"].iloc[0]
    assert meta["value"] == pytest.approx(53.0) and meta["gain"] == pytest.approx(0.0)  # (51 + 55) / 2 - 53
    t = A.scaling_table(df)
    assert t.iloc[0]["budget"] == "(2,4)" and t.iloc[0]["value"] == pytest.approx(56.0)
    assert t.iloc[1][["method", "value"]].tolist() == ["single-last", 53.0]
    small = A.scaling_table(df[(df["r_q"] * df["r_c"]) < 8])  # largest by cost: (1,6), not (2,2)
    assert small.iloc[0]["budget"] == "(1,6)" and small.iloc[0]["value"] == pytest.approx(42.0 + 3 + 2)
    nosingle = A.scaling_table(df[df["method"] == "MetaEmbed"])
    assert nosingle["method"].tolist() == ["MetaEmbed"] and math.isnan(nosingle["gain"].iloc[0])


def test_model_specs_family_takes_its_first_checkpoint():
    ckpts = {"qwen2.5-vl-3b": "ck/3b", "qwen2.5-vl-7b": "ck/7b"}
    (spec,) = A.model_specs(["qwen2_5_vl"], None, "qwen2_5_vl", [], ckpts)
    assert (spec["model"], spec["backbone_path"], spec["in_families"], spec["in_sizes"]) == (
        "MetaEmbed-3B", "ck/3b", True, False)
    specs = A.model_specs([], "s", "qwen2_5_vl", ["xs"])
    assert (specs[0]["in_sizes"], specs[0]["in_families"]) == (True, False)


def test_scaling_runs_per_model_folders_overrides_and_columns(monkeypatch, tmp_path: Path):
    seen: list = []
    _fake_training(monkeypatch, seen)
    base = A.config_from_params(max_steps=2)
    specs = A.model_specs(["paligemma"], "xs", "qwen2_5_vl", ["xs", "qwen2.5-vl-3b"],
                          {"qwen2.5-vl-3b": {"path": "ck/Qwen2.5-VL-3B-Instruct", "lr": 1e-5}})
    df = A.scaling_runs(specs, ["MetaEmbed"], base, tmp_path, object(), verbose=False)
    assert [d for _, d, _ in seen] == [tmp_path / m / "MetaEmbed" / "seed0" for m in
                                       ("qwen2_5_vl-xs", "MetaEmbed-3B", "paligemma-xs")]
    cfg3b = seen[1][0]
    assert cfg3b.train.lr == 1e-5 and cfg3b.model.backbone_path == "ck/Qwen2.5-VL-3B-Instruct"
    assert seen[0][0].train.lr == base.train.lr and seen[0][0].model.tiny_size == "xs"
    first = df.groupby("model", sort=False).first()
    assert first.loc["MetaEmbed-3B", "params"] == A.count_parameters(cfg3b, published="qwen2.5-vl-3b")
    assert first.loc["qwen2_5_vl-xs", "params"] == A.count_parameters(seen[0][0]) > 0
    assert first["in_families"].tolist() == [False, False, True] and first["in_sizes"].tolist() == [True, True, False]


def test_count_parameters_of_a_published_checkpoint_is_the_whole_backbone_without_lora():
    from metaembed.backbones.published import size_report

    cfg = A.config_from_params(backbone_path="checkpoints/Qwen2.5-VL-3B-Instruct")
    assert A.count_parameters(cfg) == size_report("qwen2.5-vl-3b", use_peft=False)["total_params"]


def test_tiny_efficiency_columns(monkeypatch):
    """Every Table 3 column of tiny_efficiency from a fake benchmark, a fake clock and recorded model configs:
    FLOPs in 1e9 and memory in GiB at ``paper_candidates`` and ``dtype``, latency of one query (not amortized),
    best-of-3 batch encoding, the model built with the largest budget."""
    import types

    from metaembed import bench
    from metaembed.model import MetaEmbedModel

    built, benched = [], []
    build = MetaEmbedModel.build.__func__

    def fake_build(cls, cfg, *a, **k):
        built.append(cfg)
        return build(cls, cfg, *a, **k)

    def fake_run_benchmark(cfg, *a, **k):
        benched.append(cfg)
        return {"rows": [{"budget": f"({a},{c})", "r_q": a, "r_c": c, "single_ms": 10.0 * a, "single_ms_std": 1.0 * a,
                          "per_query_ms": 0.5, "index_gib": 0.125 * c} for a, c in cfg.budgets]}

    ticks = iter([0.0, 0.05, 1.0, 1.01, 2.0, 2.03] * 6)  # three batch passes per role: 50, 10, 30 ms
    monkeypatch.setattr(MetaEmbedModel, "build", classmethod(fake_build))
    monkeypatch.setattr(MetaEmbedModel, "encode", lambda self, items, role, batch_size=32, progress=False:
                        torch.zeros(len(list(items)), self.num_vectors(role), self.embedding_dim))
    monkeypatch.setattr(bench, "run_benchmark", fake_run_benchmark)
    monkeypatch.setattr(bench, "time_ms", lambda fn, dev, runs, warmup: (fn(), (7.0, 0.7))[1])
    monkeypatch.setattr(A, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    df = A.tiny_efficiency(["qwen2_5_vl", "paligemma"], ["xs"], [(1, 1), (2, 4)], encode_items=5, n_candidates=16,
                           dtype="float32", paper_candidates=1000)
    assert df["model"].tolist() == ["qwen2_5_vl-xs"] * 2 + ["paligemma-xs"] * 2  # the others at "s", else sizes[0]
    assert [(c.backbone, c.tiny_size, c.R_q, c.R_c) for c in built] == [("qwen2_5_vl", "xs", 2, 4),
                                                                        ("paligemma", "xs", 2, 4)]
    assert [(c.D, c.N, c.dtype, c.budgets) for c in benched] == [(int(d), 16, "float32", [(1, 1), (2, 4)])
                                                                 for d in df["D"].iloc[::2]]
    row = df.iloc[1]
    D = int(row["D"])
    assert D > 1 and row["params"] > 0 and row["n_candidates"] == 16
    assert row["gflops_per_query"] == pytest.approx(2 * 2 * 4 * D * 1000 / 1e9)
    assert row["index_gib"] == pytest.approx(1000 * 4 * D * 4 / 2**30)
    assert (row["score_ms"], row["score_std_ms"], row["index_gib_measured"]) == (20.0, 2.0, 0.5)
    assert (row["encode_query_ms"], row["encode_query_std_ms"]) == (7.0, 0.7)
    assert row["encode_query_batch_ms"] == pytest.approx(10.0 / 5) == row["encode_candidate_batch_ms"]
    half = A.tiny_efficiency(["qwen2_5_vl"], ["xs"], [(1, 1)], encode_items=1, n_candidates=4, dtype="float16",
                             paper_candidates=1000)
    assert benched[-1].dtype == "float16" and half["index_gib"].iloc[0] == pytest.approx(1000 * 1 * D * 2 / 2**30)


def test_tiny_models_take_the_other_families_at_s():
    assert A.tiny_models(["qwen2_5_vl", "paligemma"], ["xs", "s"]) == [
        ("qwen2_5_vl", "xs"), ("qwen2_5_vl", "s"), ("paligemma", "s")]
    assert A.tiny_models(["qwen2_5_vl", "paligemma"], ["xs", "m"]) == [
        ("qwen2_5_vl", "xs"), ("qwen2_5_vl", "m"), ("paligemma", "xs")]


def test_tiny_models_take_a_name_as_one_name_and_refuse_what_selects_nothing():
    """papermill -p tiny_sizes xs passed the string 'xs', iterated as ['x', 's']: the s model was measured under
    rc=0; sizes no selected family has gave an empty table and a KeyError two cells later (a review helper)."""
    assert A.tiny_models("qwen2_5_vl", "xs") == [("qwen2_5_vl", "xs")]
    with pytest.raises(ConfigError, match=r"tiny_sizes \['x'\]: no tiny size"):
        A.tiny_models(["qwen2_5_vl"], ["x", "s"])
    with pytest.raises(ConfigError, match=r"tiny_sizes \['l'\]: no tiny size of \['paligemma'\]; they have "
                                          r"\{'paligemma': \['m', 's', 'xs'\]\}"):
        A.tiny_models(["paligemma"], ["l"])  # efficiency: KeyError 'score_ms' two cells later
    with pytest.raises(ConfigError, match="name at least one of each"):
        A.tiny_models([], ["s"])
    with pytest.raises(ValueError, match="papermill -p passes lists as text"):
        A.tiny_models(["qwen2_5_vl"], "[xs, s]")
    specs = A.model_specs("paligemma", "s", "qwen2_5_vl", "xs")  # backbone_scaling: -p families paligemma
    assert [(x["backbone"], x["size"]) for x in specs] == [("qwen2_5_vl", "xs"), ("paligemma", "s")]


def test_probe_items_follow_the_seed():
    a, b = A.probe_items(4, seed=0)[1], A.probe_items(4, seed=1)[1]
    assert [t.text for t in a] != [t.text for t in b]
    assert [t.text for t in a] == [t.text for t in A.probe_items(4, seed=0)[1]]


def test_modality_probes_roles_and_budgets_within_the_model():
    class Fake:
        def encode(self, items, role):
            g = torch.Generator().manual_seed(len(items) + (role == "query"))
            return torch.nn.functional.normalize(torch.randn(len(items), 2 if role == "query" else 4, 8, generator=g),
                                                 dim=-1)

    items = [Item(f"t{i}") for i in range(6)]
    report, emb = A.modality_probes(Fake(), items, items, [(1, 1), (2, 4), (4, 8)], run="x")
    assert set(zip(report["pair"], report["role"])) == {("image vs text", "query"), ("image vs text", "candidate"),
                                                        ("query vs candidate", "both")}
    side = report[(report["pair"] == "query vs candidate") & (report["level"] == "budget")]
    assert sorted(set(side["budget"])) == ["(1,1)", "(2,4)"] and set(report["run"]) == {"x"}
    assert emb["candidate"]["text"].shape == (6, 4, 8)


def test_modality_probes_hold_each_scene_out_whole():
    """Image i and text i (and an item as query and as candidate) are near-copies here: nothing separates the
    sets, so the probe must say ~0.5.  Folds that split the pairs scored ~0.25 (the pair gave the label away)."""
    base = torch.nn.functional.normalize(torch.randn(40, 1, 8, generator=torch.Generator().manual_seed(0)), dim=-1)

    class NearCopies:
        calls = 0

        def encode(self, items, role):
            NearCopies.calls += 1
            g = torch.Generator().manual_seed(NearCopies.calls)
            return base[[int(i.text[1:]) for i in items]] + 1e-4 * torch.randn(len(items), 1, 8, generator=g)

    scenes = [Item(f"s{i}") for i in range(40)]
    report, _ = A.modality_probes(NearCopies(), scenes, scenes, [(1, 1)])
    sep = report[(report["probe"] == "separability") & (report["level"] == "budget")]
    assert len(sep) == 3 and sep["value"].between(0.4, 0.6).all(), sep
    unpaired, _ = A.modality_probes(NearCopies(), scenes, scenes, [(1, 1)], paired=False)
    low = unpaired[(unpaired["probe"] == "separability") & (unpaired["pair"] == "image vs text")]
    assert (low["value"] < 0.4).all()  # what ungrouped folds report for the same near-copies
    with pytest.raises(ValueError, match="one text per image"):
        A.modality_probes(NearCopies(), scenes, scenes[:-1], [(1, 1)])


def test_rank_candidates_with_explicit_candidates_marks_no_positive():
    class Fake:
        def encode(self, items, role):
            vecs = {"q": [1.0, 0.0], "a": [0.6, 0.8], "b": [1.0, 0.0]}
            return torch.tensor([[vecs[i.text]] for i in items])

    r = A.rank_candidates(Fake(), Item("q"), candidates=[Item("a"), Item("b")])
    assert r["text"].tolist() == ["b", "a"] and not r["positive"].any()


def test_method_summary_without_key_columns_is_the_plain_summary():
    df = results()
    one = df[(df["method"] == "MetaEmbed")].drop(columns=["method", "seed"])
    from metaembed.evaluation import summarize

    pd.testing.assert_frame_equal(A.method_summary(one), summarize(one))


def test_backbone_scaling_figures_without_families_or_single_vector_methods(tmp_path: Path):
    """families=[] saved an empty families figure (the chance line only), and methods=[MetaEmbed] titled Fig. 4a
    "vs the best single-vector method" (a review helper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from metaembed import plotting

    fig4a, families = _notebook_cells("backbone_scaling", "sz = scaling[", "fam = scaling[")
    rows = [{"group": "Overall", "in_sizes": True, "in_families": False, "model": f"q-{s}", "params": p,
             "method": "MetaEmbed", "budget": "(16,64)", "value": v, "seed": 0}
            for s, p, v in (("xs", 1e6, 10.0), ("s", 4e6, 20.0))]
    ns = {"scaling": pd.DataFrame(rows), "plotting": plotting, "figs": tmp_path, "data_source": "synthetic",
          "base": A.config_from_params(n_candidates=8), "scaling_family": "qwen2_5_vl", "checkpoints": {}}
    try:
        exec(compile(fig4a, "<cell>", "exec"), ns)
        assert ns["fig"].axes[0].get_title() == "qwen2_5_vl: MetaEmbed per size"
        # one single-vector method plotted: named, not "the best single-vector method" (a figures review)
        one = pd.DataFrame(rows + [{**r, "method": "single-last", "budget": "(1,1)", "value": 5.0} for r in rows])
        exec(compile(fig4a, "<cell>", "exec"), {**ns, "scaling": one})
        assert plt.gcf().axes[0].get_title() == "qwen2_5_vl: MetaEmbed vs single-last per size"
        two = one.assign(method=lambda d: d["method"].where(~((d["method"] == "single-last") & (d["model"] == "q-s")),
                                                             "single-mean"))
        exec(compile(fig4a, "<cell>", "exec"), {**ns, "scaling": two})
        assert plt.gcf().axes[0].get_title() == "qwen2_5_vl: MetaEmbed vs best single-vector per size"
        exec(compile(families, "<cell>", "exec"), ns)  # no row of a family
        assert sorted(p.name for p in tmp_path.glob("*.png")) == ["backbone_scaling_fig4a.png"]
    finally:
        plt.close("all")


def test_budget_curves_of_a_summary_in_any_row_order_break_cost_ties_by_r_q():
    """A :func:`method_summary` frame read back or concatenated in another row order: equal-cost budgets
    ((1,4) and (2,2)) still come r_q first, as from run_methods rows (mutabl: sort key without r_q)."""
    s = A.method_summary(odd_budget_results())
    shuffled = s.iloc[::-1].reset_index(drop=True)  # (2,2) before (1,4) within each method and seed
    curves = A.budget_curves(shuffled)
    meta = curves[(curves["method"] == "MetaEmbed") & (curves["seed"] == 0)]
    assert meta["budget"].tolist() == ["(1,1)", "(1,4)", "(2,2)", "(1,6)", "(2,4)"]


def test_table5_cells_are_means_over_three_seeds_and_rounded_to_one_decimal():
    """With three seeds the cell is the mean (not the median, which equals it for two seeds), and the default
    ``decimals=1`` is the paper's precision (mutabl: vals.median(), decimals=2)."""
    per_seed = ((0, 50.0), (1, 51.0), (2, 56.0))
    df = pd.concat([pd.DataFrame(rows("single-last", [(1, 1)], p, 40.0, s)) for s, p in per_seed]
                   + [pd.DataFrame(rows("MetaEmbed", [(1, 1), (2, 4)], 46.0 + 0.1 * s, 35.0, s, step=1.0))
                      for s in (0, 1, 2)], ignore_index=True)
    t = A.table5(df).set_index("row")
    # single-last Overall per seed: 52, 53, 58 -> mean 54.333 (median 53)
    assert t.loc["single-last", "Overall"] == 54.3 and t.loc["single-last", "n_seeds"] == 3
    assert t.loc["MetaEmbed (2,4)", "Δ Overall"] == round(49.1 - 54.0 - 1 / 3, 1)  # 49.1 - 54.333 = -5.2
    assert t.loc["single-last", "Overall sd"] == round(pd.Series([52.0, 53.0, 58.0]).std(), 1)  # 3.2


def test_scaling_table_keeps_the_documented_columns_fig4a_plots_params_from():
    """backbone_scaling.ipynb plots Fig. 4a with x='params' from scaling_table (mutabl: 'params' dropped from the
    grouping keys)."""
    df = pd.concat([results().assign(model="a-xs", backbone="a", size="xs", params=1000),
                    results().assign(model="a-s", backbone="a", size="s", params=4000)])
    t = A.scaling_table(df)
    assert t.columns.tolist() == ["model", "backbone", "size", "params", "method", "budget", "value", "gain"]
    assert t["params"].tolist() == [1000, 1000, 4000, 4000]


def test_count_parameters_counts_frozen_weights_of_a_lora_model_and_seed_lists_take_numpy_ints():
    """Fig. 4a's x axis is the model's size, not what trains: a tiny model with ``model.lora: true`` counts its
    frozen base weights too (mutabl: only requires_grad); a numpy int seed is one seed (mutabl: isinstance int)."""
    import copy

    import numpy as np
    from metaembed.model import MetaEmbedModel

    cfg = A.config_from_params(tiny_size="xs", overrides={"model.lora": True})
    params = list(MetaEmbedModel.build(copy.deepcopy(cfg.model)).parameters())
    assert any(not p.requires_grad for p in params)  # LoRA: the base weights are frozen
    assert A.count_parameters(cfg) == sum(p.numel() for p in params)
    assert A.seed_list(np.int64(3)) == [3] and A.seed_list(np.arange(2)) == [0, 1]


def test_scaling_runs_count_a_checkpoint_by_its_published_name_whatever_its_folder_is_called(monkeypatch,
                                                                                                tmp_path: Path):
    """A checkpoint folder not named like the Hugging Face id (``ck/my-3b``) is still counted as the published
    backbone its ``sizes`` entry names, on the meta device, not loaded (mutabl: published= not passed)."""
    from metaembed.backbones.published import size_report

    seen: list = []
    _fake_training(monkeypatch, seen)
    specs = A.model_specs([], None, "qwen2_5_vl", ["qwen2.5-vl-3b"], {"qwen2.5-vl-3b": "ck/my-3b"})
    df = A.scaling_runs(specs, ["MetaEmbed"], A.config_from_params(max_steps=2), tmp_path, object(), verbose=False)
    assert set(df["params"]) == {size_report("qwen2.5-vl-3b", use_peft=False)["total_params"]}


def test_model_specs_default_family_size_and_an_empty_checkpoint_path():
    """Families default to the tiny ``s`` model (mutabl: "xs"); a checkpoints entry whose path is empty names the
    missing path like one without it (mutabl: only None refused; '' became backbone_path '')."""
    assert [s["model"] for s in A.model_specs(["paligemma"])] == ["paligemma-s"]
    with pytest.raises(ConfigError, match=r"checkpoints\['qwen2.5-vl-3b'\] needs a 'path'"):
        A.model_specs([], "s", "qwen2_5_vl", ["qwen2.5-vl-3b"], {"qwen2.5-vl-3b": {"path": "", "lr": 1e-5}})


# --------------------------------------------------------------------------- notebook outputs, recomputed
# The tables and key numbers the notebooks write, executed cell by cell on fake runs (no training, under a
# second): what a researcher cites must equal the lib functions applied to the notebook's own results.csv.
# nbval only executes the notebooks, and at one seed a mean over seeds equals a max (a notebook-mutation review).


def _single_mean_best(seeds=(0, 1)) -> pd.DataFrame:
    """results() with single-mean the best single-vector method (the Table 5 reference is not single-last)."""
    return results(seeds).replace({"method": {"single-last": "single-mean", "single-mean": "single-last"}})


def test_mmr_ablation_written_tables_and_key_numbers_are_the_lib_aggregates_over_seeds(tmp_path: Path):
    """summary.csv, timings.csv, mmr_vs_nommr.csv, table5.csv and key_numbers.json of two seeds, recomputed
    from results.csv (mutants: MMR - NoMMR sign, max over seeds, NDCG@5 or the se columns dropped from Table 5,
    the method filter of overall_p1, seed 0's data for every seed, timings from the wrong folder, a hard-coded
    reference)."""
    import json

    from IPython.display import display
    from metaembed import plotting

    df, seen = _single_mean_best(), []
    work = tmp_path / "work"
    for run in ("MetaEmbed/seed0", "MetaEmbed/seed1"):
        (work / run).mkdir(parents=True)
        (work / run / "timing.json").write_text(json.dumps({"train_s": 1.0, "eval_s": 0.5, "steps": 5}))
    fake = _lib_with(run_methods=lambda methods, base, work, benchmark, seeds, **kw: seen.append(benchmark) or df)
    methods = ["MetaEmbed", "NoMMR", "single-last", "single-mean"]
    ns = {"ablations": fake, "pd": pd, "display": display, "plotting": plotting, "methods": methods, "seeds": [0, 1],
          "base": A.config_from_params(max_steps=5), "work": work, "benchmark": object(), "resume": False,
          "out": tmp_path / "out", "backbone": "qwen2_5_vl", "backbone_path": None, "tiny_size": "xs"}
    out = ns["out"]  # the tables' folder; work is beside it, as notebook_setup makes them
    out.mkdir()
    _run_cells(ns, "mmr_ablation", "results = ablations.run_methods(", "mean_summary = summary.groupby(",
               'wide["MMR - NoMMR"]', "t5 = ablations.table5(", "key_numbers.json")
    assert seen == [None]  # two seeds: each seed builds its own data
    res = pd.read_csv(out / "results.csv")
    summary = A.method_summary(res)
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), summary)
    assert pd.read_csv(out / "timings.csv")["run"].tolist() == ["MetaEmbed/seed0", "MetaEmbed/seed1"]
    mean = summary.groupby(["method", "budget", "group"])["value"].mean()
    wide = pd.read_csv(out / "mmr_vs_nommr.csv")
    for r in wide.itertuples(index=False):
        assert r.MetaEmbed == pytest.approx(mean["MetaEmbed", r.budget, r.group])
        assert r.NoMMR == pytest.approx(mean["NoMMR", r.budget, r.group])
        assert r[-1] == pytest.approx(r.MetaEmbed - r.NoMMR)  # the "MMR - NoMMR" column
    assert list(dict.fromkeys(wide["budget"])) == [f"({a},{b})" for a, b in BUDGETS]  # rows in cost order
    t5 = A.table5(res, groups=["Overall", "IND", "OOD", "NDCG@5"])
    pd.testing.assert_frame_equal(pd.read_csv(out / "table5.csv"), pd.read_csv(
        __import__("io").StringIO(t5.to_csv(index=False))))
    key = json.loads((out / "key_numbers.json").read_text())
    assert key["reference"] == t5.attrs["reference"] == "single-mean" and key["seeds"] == [0, 1]
    for m in methods:
        want = mean[m][:, "Overall"]
        assert key["overall_p1"][m] == pytest.approx({b: want[b] for b in key["overall_p1"][m]}) and len(want) == len(
            key["overall_p1"][m])
    assert key["table5"] == t5.set_index("row")[["Overall", "Δ Overall"]].to_dict(orient="index")  # rounded: exact


def test_backbone_scaling_written_tables_and_gains_are_the_lib_aggregates(tmp_path: Path):
    """summary.csv, scaling_table.csv (Overall and NDCG@5) and key_numbers.json's gains recomputed from
    results.csv with method_summary / scaling_table (mutants: the group not passed to scaling_table, the gains of
    the single-vector rows or of NDCG@5 in the key numbers, the membership flags lost, seed 0's data)."""
    import json

    specs = [{"model": "q-xs", "in_families": True, "in_sizes": True},
             {"model": "q-s", "in_families": False, "in_sizes": True},
             {"model": "p-xs", "in_families": True, "in_sizes": False}]
    df = pd.concat([results((0, 1)).assign(model=s["model"], backbone=s["model"][0], size=s["model"][2:],
                                           params=1000 * (i + 1), in_families=s["in_families"],
                                           in_sizes=s["in_sizes"],
                                           value=lambda d, i=i: d["value"] + 3.0 * i * (d["method"] == "MetaEmbed"))
                    for i, s in enumerate(specs)], ignore_index=True)
    seen = []
    fake = _lib_with(scaling_runs=lambda specs, methods, base, work, benchmark, seeds, **kw: seen.append(benchmark)
                     or df)
    ns = {"ablations": fake, "pd": pd, "specs": specs, "methods": ["MetaEmbed", "single-last", "single-mean"],
          "seeds": [0, 1], "base": A.config_from_params(max_steps=5), "work": tmp_path, "benchmark": object(),
          "resume": False, "out": tmp_path}
    _run_cells(ns, "backbone_scaling", "results = ablations.scaling_runs(", "tables = []",
               "key_numbers.json")
    assert seen == [None]
    res = pd.read_csv(tmp_path / "results.csv")
    lead = ["model", "backbone", "size", "params", "in_families", "in_sizes", "method", "seed"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "summary.csv"), A.method_summary(res, lead))
    written = pd.read_csv(tmp_path / "scaling_table.csv")
    for group in ("Overall", "NDCG@5"):
        want = A.scaling_table(res, group).merge(pd.DataFrame(specs), on="model")
        got = written[written["group"] == group].drop(columns="group").reset_index(drop=True)
        pd.testing.assert_frame_equal(got[want.columns.tolist()], want, check_dtype=False)
    meta = A.scaling_table(res, "Overall").query("method == 'MetaEmbed'")[["model", "params", "value", "gain"]]
    key = json.loads((tmp_path / "key_numbers.json").read_text())
    assert key["gain_over_single_vector"] == meta.round(2).to_dict(orient="records")
    assert [g["gain"] for g in key["gain_over_single_vector"]] != [0.0] * 3


def test_efficiency_table3_columns_come_from_their_own_series_and_the_accuracy_is_a_mean(tmp_path: Path):
    """table3.csv: each latency column from its own measured series, the paper's columns from PAPER_TABLE3 and
    the accuracy column the mean over seeds of MetaEmbed's Overall P@1 only (mutants: single_ms as the per-query
    latency, the wrong sd series, max over seeds, the Overall or MetaEmbed filter dropped, MMEB in the latency
    column, the paper's N in the notes)."""
    import json

    from metaembed.efficiency import PAPER_TABLE3, efficiency_table

    run = tmp_path / "mmr_ablation"
    run.mkdir()
    A.method_summary(results((0, 1))).to_csv(run / "summary.csv", index=False)  # MetaEmbed, NoMMR, ...; 4 groups
    groups = [[1, 1], [2, 4], [4, 8]]
    lat = pd.DataFrame({"device": "cpu (test)", "budget": [f"({a},{b})" for a, b in groups],
                        "single_ms": [1.0, 2.0, 3.0], "single_ms_std": [0.1, 0.2, 0.3],
                        "per_query_ms": [0.5, 0.6, 0.7], "per_query_ms_std": [0.05, 0.06, 0.07]})
    ns = {"pd": pd, "groups": groups, "paper_dim": 3584, "paper_candidates": 100000, "index_dtype": "bfloat16",
          "accuracy_run": "mmr_ablation", "latency_candidates": 10, "latency_dim": 64, "scoring_batch_size": 2,
          "out": tmp_path / "efficiency", "lat": lat.iloc[::-1].reset_index(drop=True)}  # rows matched by budget
    ns["out"].mkdir()
    _run_cells(ns, "efficiency", "analytic = efficiency_table(", "t3 = analytic[")
    t3 = pd.read_csv(tmp_path / "efficiency" / "table3.csv")
    assert t3["budget"].tolist() == ["(1,1)", "(2,4)", "(4,8)"]
    for col, series in (("latency 1 query (ms)", "single_ms"), ("latency 1 query sd (ms)", "single_ms_std"),
                        ("latency per query (ms)", "per_query_ms"), ("latency per query sd (ms)", "per_query_ms_std")):
        assert t3[col].tolist() == lat[series].tolist(), col
    # each row says where its latencies were measured: not at the paper's N of the FLOPs / memory / paper columns
    assert t3[["latency N", "latency D", "latency batch"]].drop_duplicates().values.tolist() == [[10, 64, 2]]
    assert set(t3["latency device"]) == {"cpu (test)"}
    analytic = efficiency_table(3584, 100000, groups, "bfloat16")
    assert t3["FLOPs (G)"].tolist() == pytest.approx(analytic["FLOPs (G)"].tolist())
    s = A.method_summary(results((0, 1)))
    want = s[(s["method"] == "MetaEmbed") & (s["group"] == "Overall")].groupby("budget")["value"].mean()
    assert t3["MetaEmbed P@1 (%)"].tolist() == pytest.approx([want[b] for b in t3["budget"]])
    assert t3["paper latency per query (ms)"].tolist() == [PAPER_TABLE3[tuple(g)]["latency_ms"] for g in groups]
    assert t3["paper MMEB (%, MetaEmbed-7B)"].tolist() == [PAPER_TABLE3[tuple(g)]["mmeb"] for g in groups]
    notes = json.loads((tmp_path / "efficiency" / "table3_notes.json").read_text())
    assert (notes["latency_N"], notes["latency_D"], notes["scoring_batch_size"]) == (10, 64, 2)


def test_efficiency_printed_table3_and_measurements_use_the_parameters(tmp_path: Path, monkeypatch, capsys):
    """The printed Table 3 puts each budget's paper numbers beside it; the latency benchmark and the tiny models
    are measured with the notebook's repeats and candidates; encode_vs_score.csv and latency_memory.csv take the
    right series (mutants: PAPER_TABLE3 looked up at (r_c, r_q), runs=1, n_candidates not passed, the ratio
    inverted, per-query latency or the analytic memory in latency_memory.csv)."""
    from IPython.display import display
    from metaembed import bench, plotting
    from metaembed.efficiency import PAPER_TABLE3

    groups = [[1, 1], [2, 4], [16, 64]]
    ns = {"pd": pd, "groups": groups, "paper_dim": 3584, "paper_candidates": 100000, "index_dtype": "bfloat16"}
    _run_cells(ns, "efficiency", "analytic = efficiency_table(")
    printed = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], float(r[2]), float(r[4])) for r in printed] == [
        (f"({a},{b})", PAPER_TABLE3[(a, b)]["gflops"], PAPER_TABLE3[(a, b)]["memory_gib"]) for a, b in groups]
    seen = {}
    budgets = ["(1,1)", "(2,4)", "(16,64)"]
    row = {"single_ms": 1.0, "single_ms_std": 0.1, "per_query_ms": 0.2, "index_gib": 1e-4}
    monkeypatch.setattr(bench, "run_benchmark", lambda cfg: seen.setdefault("bench", cfg) and {
        "device": {"type": "cpu", "name": "test"}, "rows": [{"budget": b, **row} for b in budgets]})
    monkeypatch.setattr(bench, "format_report", lambda measured: "")
    tiny = pd.DataFrame({"model": "q-xs", "backbone": "qwen2_5_vl", "params": 10, "D": 32, "budget": budgets,
                         "score_ms": [0.1, 0.2, 0.4], "score_std_ms": 0.01, "index_gib_measured": [1e-6, 2e-6, 3e-6],
                         "index_gib": 9.0, "encode_query_ms": 8.0, "encode_query_std_ms": 0.1, "encode_batch": 4,
                         "encode_query_batch_ms": 2.0, "encode_candidate_batch_ms": 3.0})
    fake = _lib_with(tiny_efficiency=lambda *a, **kw: seen.setdefault("tiny", kw) is None or tiny)
    ns.update({"ablations": fake, "plotting": plotting, "display": display, "out": tmp_path, "figs": tmp_path,
               "seed": 0, "latency_dim": 64, "latency_candidates": 10, "scoring_batch_size": 2, "latency_repeats": 3,
               "device": "cpu", "tiny_backbones": ["qwen2_5_vl"], "tiny_sizes": ["xs"], "encode_items": 4})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        _run_cells(ns, "efficiency", "measured = bench.run_benchmark(", "tiny = ablations.tiny_efficiency(",
                   'cost["encode / score"]', "sizes_family = tiny[")
    finally:
        plt.close("all")
    cfg = seen["bench"]
    assert (cfg.runs, cfg.N, cfg.D, cfg.batch_size) == (3, 10, 64, 2)
    assert seen["tiny"]["runs"] == 3 and seen["tiny"]["n_candidates"] == 10
    cost = pd.read_csv(tmp_path / "encode_vs_score.csv")
    assert cost["encode / score"].tolist() == pytest.approx([80.0, 40.0, 20.0])
    curves = pd.read_csv(tmp_path / "latency_memory.csv")
    assert curves["latency_ms"].tolist() == [1.0] * 3 + [0.1, 0.2, 0.4]
    assert curves["memory_gib"].tolist() == [1e-4] * 3 + [1e-6, 2e-6, 3e-6]


def test_modality_gap_runs_train_their_own_configs_and_label_their_probes(tmp_path: Path):
    """Each (method, tau) run trains its own config and its probes carry its labels; gap_summary.csv keeps the
    image-vs-text rows at r = 1 and r = R of each role (mutants: every run trained with the base config, the
    untrained model labelled trained, the reference tau on every run, the prefixes swapped, the query side's
    full budget mislabelled)."""
    import types

    trained, probed = [], []

    def probes(model, images, texts, groups, *, seed, **labels):
        probed.append(labels)
        R = {"query": 4, "candidate": 8}
        rows = [{"pair": "image vs text", "level": "budget", "role": role, "budget": f"({r},{r})", "probe": p,
                 "value": float(r)} for role in R for r in (1, 2, R[role]) for p in ("centroid_gap", "separability")]
        rows += [{"pair": "query vs candidate", "level": "budget", "role": "both", "budget": "(1,1)",
                  "probe": "centroid_gap", "value": 0.0}]
        return pd.DataFrame(rows).assign(**labels), {}

    fake = _lib_with(train_model=lambda cfg, out, benchmark: trained.append(cfg) or "model", modality_probes=probes)
    model_cls = types.SimpleNamespace(build=lambda cfg: types.SimpleNamespace(eval=lambda: "init model"))
    base = A.config_from_params(R_q=4, R_c=8, groups=[[1, 1], [2, 4], [4, 8]], tau=0.05, max_steps=2)
    runs = [("MetaEmbed", 0.01), ("MetaEmbed", 0.05), ("NoMMR", 0.05)]
    configs = [A.config_from_params(A.method_config(base, m), tau=t) for m, t in runs]
    ns = {"ablations": fake, "pd": pd, "MetaEmbedModel": model_cls, "base": base, "runs": runs, "configs": configs,
          "ref_tau": 0.05, "images": [], "texts": [], "groups": [[1, 1], [2, 4], [4, 8]], "seed": 0, "work": tmp_path,
          "benchmark": None, "out": tmp_path, "R_q": 4, "R_c": 8}
    _run_cells(ns, "modality_gap", "reports, embeddings = [], {}", "full = {")
    assert [(c.loss.tau, c.loss.active_groups()) for c in trained] == [
        (c.loss.tau, c.loss.active_groups()) for c in configs]
    assert probed == [{"condition": "init", "method": "MetaEmbed", "tau": 0.05}] + [
        {"condition": "trained", "method": m, "tau": t} for m, t in runs]
    summary = pd.read_csv(tmp_path / "gap_summary.csv", dtype={"budget": str})
    assert set(summary["role"]) == {"query", "candidate"}
    assert dict(zip(summary["budget"], summary["prefix"])) == {"(1,1)": "r = 1", "(4,4)": "r = R", "(8,8)": "r = R"}
    assert set(summary.loc[summary["role"] == "query", "budget"]) == {"(1,1)", "(4,4)"}


def test_quickstart_config_cell_passes_every_parameter(capsys):
    """tau, n_eval_queries, ... of papermill -p reach the config (mutants: one not passed, one hard-coded)."""
    import types

    params = {"backbone": "paligemma", "tiny_size": "s", "R_q": 4, "R_c": 8, "groups": [[1, 1], [4, 8]],
              "tau": 0.07, "max_steps": 3, "batch_size": 5, "lr": 3e-4, "n_train": 7, "n_eval_queries": 9,
              "n_candidates": 5, "seed": 11}
    item = types.SimpleNamespace(text="t")
    bench = types.SimpleNamespace(train=[types.SimpleNamespace(query=item, positive=item, negative=item)] * 2,
                                  eval_tasks=[], doc_tasks=[])
    ns = _run_cells({"ablations": _lib_with(load_benchmark=lambda cfg: bench), **params}, "quickstart",
                    "config = ablations.config_from_params(")
    c = ns["config"]
    got = {"backbone": c.model.backbone, "tiny_size": c.model.tiny_size, "R_q": c.model.R_q, "R_c": c.model.R_c,
           "groups": [list(g) for g in c.loss.groups], "tau": c.loss.tau, "max_steps": c.train.max_steps,
           "batch_size": c.train.batch_size, "lr": c.train.lr, "n_train": c.data.n_train,
           "n_eval_queries": c.data.n_eval_queries, "n_candidates": c.data.n_candidates, "seed": c.train.seed}
    assert got == params


def test_backbone_scaling_config_cell_builds_the_benchmark_of_its_seed():
    """seeds=[3]: the one benchmark every model trains on is seed 3's data (mutant: seed=0 in the base config,
    so a run labelled seed 3 trained on seed 0's data)."""
    ns = {"ablations": _lib_with(load_benchmark=lambda cfg: cfg.data.seed), "pd": pd, "methods": ["MetaEmbed"],
          "seeds": [3], "families": [], "family_size": "xs", "scaling_family": "qwen2_5_vl", "sizes": ["xs"],
          "checkpoints": {}, "R_q": 4, "R_c": 8, "groups": [[1, 1], [4, 8]], "tau": 0.03, "max_steps": 2,
          "batch_size": 4, "lr": 1e-3, "precision": "32-true", "gradient_checkpointing": False,
          "data_source": "synthetic", "data_path": None, "eval_path": None, "n_train": 4, "n_eval_queries": 1,
          "n_candidates": 2, "overrides": {}}
    _run_cells(ns, "backbone_scaling", "specs = ablations.model_specs(")
    assert ns["benchmark"] == 3 and ns["base"].train.seed == 3


def test_quickstart_rank_tables_show_the_positive_at_the_budget_the_figure_names(monkeypatch):
    """The example ranking is made at the full budget its figure's title names, and the per-budget table lists
    the positive's rank at every budget (mutants: ranked at groups[0], the negatives' rows shown)."""
    import ast
    import types

    from metaembed.model import MetaEmbedModel

    calls = []

    def rank(model, query, budget=None):
        calls.append(budget)
        return pd.DataFrame({"rank": [1, 2, 3], "score": [0.9, 0.5, 0.1], "positive": [False, True, False]})

    monkeypatch.setattr(MetaEmbedModel, "from_pretrained", classmethod(lambda cls, path: "model"))
    tasks = [types.SimpleNamespace(name=n, queries=[f"{n}-q0"]) for n in ("Ret-T2I", "Ret-I2T")]
    groups = [[1, 1], [2, 4], [4, 8]]
    ns = {"ablations": _lib_with(rank_candidates=rank), "pd": pd, "run_dir": Path("x"), "groups": groups,
          "benchmark": types.SimpleNamespace(eval_tasks=tasks)}
    nine, eleven = _notebook_cells("quickstart", "ranked = [ablations.rank_candidates(", "ranks = pd.concat(")
    exec(compile(nine, "<cell>", "exec"), ns)
    assert calls == [(4, 8), (4, 8)] and ns["examples"] == ["Ret-T2I-q0", "Ret-I2T-q0"]
    body = ast.parse(eleven).body
    exec(compile(ast.Module(body=body[:-1], type_ignores=[]), "<cell>", "exec"), ns)
    shown = eval(compile(ast.Expression(body[-1].value), "<cell>", "eval"), ns)
    assert shown["budget"].tolist() == ["(1, 1)", "(2, 4)", "(4, 8)"] and shown["rank"].tolist() == [2, 2, 2]
