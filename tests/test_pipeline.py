"""metaembed.pipeline: what reaches the evaluator, the trainer and the tables (training and scoring faked)."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from metaembed import pipeline
from metaembed.config import ConfigError, load_config
from metaembed.data.records import Benchmark, EvalTask
from metaembed.evaluation import RESULT_COLUMNS


def _smoke():
    return load_config(pipeline.resolve_config("smoke"))  # R_q=4, R_c=8, groups (1,1) (2,4) (4,8)


def _rows(budgets, p1=50.0):
    """evaluate()-shaped rows: one synthetic-style P@1 task, every budget."""
    return pd.DataFrame([{"task": "Cls-Object", "meta_task": "classification", "split": "ind", "r_q": r_q, "r_c": r_c,
                          "budget": f"({r_q},{r_c})", "metric": "P@1", "value": p1 + r_q, "n_queries": 2}
                         for r_q, r_c in budgets])


def _bench():
    return Benchmark(train=[], eval_tasks=[EvalTask("t", "classification", "ind", [])])


def test_eval_budgets_are_int_pairs_clipped_to_the_model():
    cfg = _smoke()
    cfg.eval.budgets = [[1, 1], [2.0, 4]]
    assert pipeline.eval_budgets(cfg) == [(1, 1), (2, 4)]  # tuples of ints, as summarize/budget_table key them
    cfg.eval.budgets = None
    cfg.loss.groups = [[1, 1], [2, 16], [4, 8]]
    assert pipeline.eval_budgets(cfg) == [(1, 1), (4, 8)]  # (2, 16) needs r_c <= R_c = 8
    cfg.loss.groups = [[8, 8], [2, 16]]
    assert pipeline.eval_budgets(cfg) == [(4, 8)]  # no group fits: the full (R_q, R_c)


def test_evaluate_model_passes_the_eval_settings(monkeypatch):
    seen = {}

    def fake_evaluate(benchmark, encode, budgets, **kw):
        seen.update(benchmark=benchmark, encode=encode, budgets=budgets, **kw)
        return _rows(budgets)

    monkeypatch.setattr("metaembed.evaluation.evaluate", fake_evaluate)
    cfg = _smoke()
    cfg.eval.batch_size, cfg.eval.ndcg_k, cfg.eval.ties, cfg.eval.cache_dir = 3, 7, "pessimistic", "/tmp/from-config"
    model, bench = SimpleNamespace(encode=lambda items, role: None), _bench()
    pipeline.evaluate_model(model, bench, cfg)
    assert seen["benchmark"] is bench and seen["encode"] is model.encode
    assert seen["budgets"] == [(1, 1), (2, 4), (4, 8)]
    assert (seen["batch_size"], seen["k"], seen["ties"]) == (3, 7, "pessimistic")
    assert seen["cache_dir"] == "/tmp/from-config"
    pipeline.evaluate_model(model, bench, cfg, cache_dir="/tmp/given")
    assert seen["cache_dir"] == "/tmp/given"


def test_evaluate_model_encodes_eval_batch_size_items_per_forward(tmp_path):
    """eval.batch_size reaches model.encode: its own default (32) split every batch of 128 into forwards of 32
    (a review helper); a cache is still keyed by the model's fingerprint."""
    from _fake_model import FakeMetaEmbedModel

    from metaembed.data.records import EvalQuery, Item

    model, sizes = FakeMetaEmbedModel(), []
    collate = model.collate
    model.collate = lambda items, role: sizes.append((role, len(items))) or collate(items, role)
    task = EvalTask("t", "classification", "ind",
                    [EvalQuery(Item(f"q{i}", uid=f"q{i}"), [Item(f"c{i}-{j}", uid=f"c{i}-{j}") for j in range(4)])
                     for i in range(25)])
    cfg = _smoke()
    cfg.eval.batch_size, cfg.eval.budgets = 128, [(1, 1)]
    pipeline.evaluate_model(model, Benchmark(train=[], eval_tasks=[task]), cfg)
    assert sizes == [("query", 25), ("candidate", 100)]
    model.fingerprint = lambda: "fake-model-v1"
    pipeline.evaluate_model(model, Benchmark(train=[], eval_tasks=[task]), cfg, cache_dir=tmp_path)
    from metaembed.evaluation import cache_folder

    assert cache_folder(tmp_path, "fake-model-v1").is_dir()


class _Trainer:
    def __init__(self, zero: bool = True, world_size: int = 1, strategy=None):
        self.is_global_zero, self.global_step, self.world_size, self.strategy = zero, 5, world_size, strategy


def _fake_training(monkeypatch, zero: bool = True, **trainer_kw):
    """train() returns a stub model at once; evaluate_model() records its arguments and returns fixed rows."""
    calls = []

    def train(config, benchmark, ckpt_path=None):
        calls.append({"train": config, "benchmark": benchmark, "ckpt_path": ckpt_path})
        return SimpleNamespace(encode=None, trained=True), _Trainer(zero, **trainer_kw)

    def evaluate_model(model, benchmark, config, cache_dir=None, progress=False):
        calls.append({"evaluate": config, "cache_dir": cache_dir, "model": model})
        return _rows(pipeline.eval_budgets(config), p1=60.0 if config.loss.mmr else 40.0)

    monkeypatch.setattr("metaembed.training.train", train)
    monkeypatch.setattr(pipeline, "evaluate_model", evaluate_model)
    return calls


def test_train_and_evaluate_trains_a_copy_and_writes_the_tables(tmp_path, monkeypatch):
    calls = _fake_training(monkeypatch)
    cfg = _smoke()
    cfg.eval.cache_dir = str(tmp_path / "cache")
    df = pipeline.train_and_evaluate(cfg, tmp_path / "run", _bench(), ckpt_path="last.ckpt")
    assert cfg.train.output_dir == "runs/smoke"  # the caller's config is not modified
    trained = calls[0]["train"]
    assert trained is not cfg and trained.train.output_dir == str(tmp_path / "run")
    assert calls[0]["ckpt_path"] == "last.ckpt"
    # one embedding cache per run name: MMR and NoMMR of a quickstart never share a folder
    assert calls[1]["cache_dir"] == tmp_path / "cache" / "smoke"
    assert pd.read_csv(tmp_path / "run" / "results.csv").equals(df.reset_index(drop=True))
    assert (tmp_path / "run" / "budget_table.csv").is_file() and (tmp_path / "run" / "results.json").is_file()
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert timing["steps"] == 5 and set(timing) == {"train_s", "eval_s", "steps", "first_step"} and timing["first_step"] == 0
    cfg.eval.cache_dir = None
    pipeline.train_and_evaluate(cfg, tmp_path / "run2", _bench())
    assert calls[-1]["cache_dir"] is None


def test_timing_json_counts_this_runs_steps_of_a_resumed_run(tmp_path, monkeypatch):
    """timing.json's steps are the steps train_s paid for (steps_trained), not the trainer's global_step: a run
    resumed at step 5 to 8 took 3 steps (the stub trainer above has no callback_metrics, so either passed)."""
    from metaembed.training.trainer import _START_KEY, _STEPS_KEY

    trainer = SimpleNamespace(is_global_zero=True, global_step=8, world_size=1, strategy=None,
                              callback_metrics={_STEPS_KEY: torch.tensor(3), _START_KEY: torch.tensor(5)})
    monkeypatch.setattr("metaembed.training.train", lambda config, benchmark, ckpt_path=None: (None, trainer))
    monkeypatch.setattr(pipeline, "evaluate_model", lambda model, bench, config, **kw: _rows([(1, 1)]))
    pipeline.train_and_evaluate(_smoke(), tmp_path / "run", _bench(), ckpt_path="last.ckpt")
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert (timing["steps"], timing["first_step"]) == (3, 5)


@pytest.mark.parametrize("world_size, strategy, reloaded", [(2, "fsdp", True), (1, "fsdp", False), (2, "ddp", False)])
def test_after_multi_process_fsdp_the_saved_full_model_is_evaluated(tmp_path, monkeypatch, world_size, strategy,
                                                                    reloaded):
    """After a multi-process FSDP fit the trained model holds rank 0's shard only: rank 0 scores the full model
    train() saved, on the trainer's device; DDP and one-process runs score the trained model itself."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from metaembed.model import MetaEmbedModel

    strat = FSDPStrategy() if strategy == "fsdp" else DDPStrategy()
    monkeypatch.setattr(type(strat), "root_device", property(lambda self: torch.device("cpu")))
    calls = _fake_training(monkeypatch, world_size=world_size, strategy=strat)
    loads = []
    monkeypatch.setattr(MetaEmbedModel, "from_pretrained",
                        classmethod(lambda cls, d, device="cpu", **kw: loads.append((d, device)) or "full model"))
    pipeline.train_and_evaluate(_smoke(), tmp_path / "run", _bench())
    model = calls[-1]["model"]
    if reloaded:
        assert model == "full model" and loads == [(tmp_path / "run" / "model", torch.device("cpu"))]
    else:
        assert model.trained and not loads


def test_train_and_evaluate_on_a_non_zero_rank_writes_nothing(tmp_path, monkeypatch):
    calls = _fake_training(monkeypatch, zero=False)
    df = pipeline.train_and_evaluate(_smoke(), tmp_path / "run", _bench())
    assert df.empty and [k for c in calls for k in c if k in ("train", "evaluate")] == ["train"]
    assert not (tmp_path / "run" / "results.csv").exists()


def test_quickstart_runs_mmr_then_nommr_on_one_benchmark(tmp_path, monkeypatch, capsys):
    calls = _fake_training(monkeypatch)
    built = []
    real_load = pipeline.load_benchmark
    monkeypatch.setattr(pipeline, "load_benchmark", lambda cfg: built.append(real_load(cfg)) or built[-1])
    results = pipeline.run_quickstart("smoke", tmp_path, overrides={"train.max_steps": 1})
    trains = [c for c in calls if "train" in c]
    assert [(c["train"].name, c["train"].loss.mmr) for c in trains] == [("MMR", True), ("NoMMR", False)]
    assert all(c["train"].train.max_steps == 1 for c in trains)
    assert len(built) == 1 and all(c["benchmark"] is built[0] for c in trains)  # both runs see the same data
    assert list(results.columns) == ["run", *RESULT_COLUMNS]
    assert results["run"].tolist() == ["MMR"] * 3 + ["NoMMR"] * 3
    saved = pd.read_csv(tmp_path / "results.csv")
    assert saved["run"].tolist() == results["run"].tolist() and saved["value"].tolist() == results["value"].tolist()
    for run, p1 in (("MMR", 60.0), ("NoMMR", 40.0)):
        table = pd.read_csv(tmp_path / f"budget_table_{run}.csv", index_col=0)
        assert table["Overall"].tolist() == [p1 + 1, p1 + 2, p1 + 4]  # each run's own rows
    printed = capsys.readouterr().out
    mmr, nommr = printed.split("NoMMR: P@1")
    assert "61.0" in mmr and "41.0" not in mmr and "41.0" in nommr and "61.0" not in nommr


def test_quickstart_checks_trainer_settings_before_building_the_benchmark(tmp_path, monkeypatch):
    _fake_training(monkeypatch)
    monkeypatch.setattr(pipeline, "load_benchmark", lambda cfg: pytest.fail("the benchmark was built first"))
    with pytest.raises(ConfigError, match="precision"):
        pipeline.run_quickstart("smoke", tmp_path, overrides={"train.precision": "65-true"})


def test_quickstart_refuses_overrides_it_would_ignore(tmp_path, monkeypatch):
    """quickstart sets name, loss.mmr and train.output_dir for each of its runs: a --set of them was overwritten
    without a word (the output went to runs/quickstart, not the train.output_dir asked for)."""
    _fake_training(monkeypatch)
    for key, value in (("name", "myrun"), ("loss.mmr", False), ("train.output_dir", str(tmp_path / "x"))):
        with pytest.raises(ConfigError, match=rf"quickstart sets {re.escape(key)} itself"):
            pipeline.run_quickstart("smoke", tmp_path, overrides={key: value})
        if "." in key:  # the section form of the same override (the Python API's; it trained MMR anyway)
            section, name = key.split(".")
            with pytest.raises(ConfigError, match=rf"quickstart sets {re.escape(key)} itself"):
                pipeline.run_quickstart("smoke", tmp_path, overrides={section: {name: value}})


def test_resolve_config_reads_a_name_with_a_slash_as_a_path(tmp_path, monkeypatch):
    """Only a bare name is looked up among the packaged configs: a missing path is an error even when the
    packaged folder happens to hold a file at that relative path."""
    monkeypatch.chdir(tmp_path)
    assert pipeline.resolve_config("smoke") == pipeline.CONFIG_DIR / "smoke.yaml"
    for name in (f"../{pipeline.CONFIG_DIR.name}/smoke", f"..\\{pipeline.CONFIG_DIR.name}\\smoke"):
        with pytest.raises(ConfigError, match="not found"):
            pipeline.resolve_config(name)


@pytest.mark.parametrize("check_images", [True, False])
def test_load_benchmark_hands_the_vidore_train_fields_to_its_loader(monkeypatch, check_images):
    """``data.vidore_train``, ``data.vidore_train_image_dir`` and ``data.check_images`` reach
    ``load_vidore_train`` (check_images was droppable: a damaged page then stopped a run that asked not to
    decode pages; a review helper)."""
    from metaembed.config import DataConfig
    from metaembed.data import vidore
    from metaembed.data.records import Item, TrainExample

    seen = {}

    def fake(path, **kw):
        seen.update(path=path, **kw)
        return [TrainExample(Item(f"q{i}"), Item(f"p{i}"), None, task="ViDoRe-train") for i in range(4)]

    monkeypatch.setattr(vidore, "load_vidore_train", fake)
    cfg = DataConfig(source="mmeb", vidore_train="vt", vidore_train_image_dir="pages", check_images=check_images,
                     eval_path="ev")
    bench = pipeline.load_benchmark(cfg, evaluation=False)
    assert seen == {"path": "vt", "image_dir": "pages", "check_images": check_images}
    assert [ex.query.text for ex in bench.train] == ["q0", "q1", "q2", "q3"]


def test_load_benchmark_hands_every_data_field_to_the_mmeb_loaders(tmp_path, monkeypatch):
    from metaembed.config import DataConfig
    from metaembed.data import mmeb
    from metaembed.data.records import Item, TrainExample

    seen = {}

    def fake_train(root, subsets, **kw):
        seen["train"] = {"root": root, "subsets": subsets, **kw}
        return [TrainExample(Item(f"q{i}"), Item(f"p{i}"), Item(f"n{i}"), task="AB"[i // 3]) for i in range(6)]

    real_mix = mmeb.mix_subsets

    def mix(examples, **kw):
        seen["mix"] = kw
        return real_mix(examples, **kw)

    def fake_eval(root, tasks, **kw):
        seen["eval"] = {"root": root, "tasks": tasks, **kw}
        return [EvalTask("t", "classification", "ind", [])]

    monkeypatch.setattr(mmeb, "load_mmeb_train", fake_train)
    monkeypatch.setattr(mmeb, "load_mmeb_eval", fake_eval)
    monkeypatch.setattr(mmeb, "mix_subsets", mix)
    cfg = DataConfig(source="mmeb", path="tr", eval_path="ev", subsets=["A", "B"], image_root="img", split="train",
                     negatives="list", negative_choice="random", skip_missing=True, check_images=True,
                     max_per_subset=9, subset_weights={"A": 2.0}, seed=3, eval_tasks=["t"], eval_image_root="eimg",
                     max_eval_queries=4)
    bench = pipeline.load_benchmark(cfg)
    assert seen["train"] == {"root": "tr", "subsets": ["A", "B"], "image_root": "img", "split": "train",
                             "negatives": "list", "negative_choice": "random", "skip_missing": True,
                             "check_images": True, "seed": 3}
    # caps and weights apply to MMEB-train and ViDoRe-train together, after loading
    assert seen["mix"] == {"max_per_subset": 9, "subset_weights": {"A": 2.0}, "seed": 3}
    assert seen["eval"] == {"root": "ev", "tasks": ["t"], "image_root": "eimg", "check_images": True, "max_queries": 4}
    assert [ex.query.text for ex in bench.train] == ["q0", "q1", "q2"] * 2 + ["q3", "q4", "q5"]
    assert bench.doc_tasks == []
    seen.clear()
    assert pipeline.load_benchmark(cfg, train=False).train == [] and "train" not in seen  # eval only
    seen.clear()
    assert pipeline.load_benchmark(cfg, evaluation=False).eval_tasks == [] and "eval" not in seen  # train only
    with pytest.raises(ValueError, match="load nothing"):
        pipeline.load_benchmark(cfg, train=False, evaluation=False)
    cfg.check_images = False
    pipeline.load_benchmark(cfg)
    assert seen["train"]["check_images"] is False and seen["eval"]["check_images"] is False

    def bad_weights(*args, **kw):
        raise ValueError("subset_weights names 'C', which was not loaded")

    monkeypatch.setattr(mmeb, "load_mmeb_train", bad_weights)
    with pytest.raises(ConfigError, match=r"data \(training data tr\): subset_weights names 'C'"):
        pipeline.load_benchmark(cfg)
    cfg.vidore_path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="data.vidore_path: directory not found"):
        pipeline.load_benchmark(cfg, train=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_max_train_keeps_a_seeded_sample_in_file_order(monkeypatch, seed):
    from metaembed.config import DataConfig
    from metaembed.data import mmeb
    from metaembed.data.records import Item, TrainExample

    rows = [TrainExample(Item(f"q{i}"), Item(f"p{i}")) for i in range(20)]
    monkeypatch.setattr(mmeb, "load_mmeb_train", lambda *a, **kw: list(rows))
    cfg = DataConfig(source="mmeb", path="tr", max_train=7, seed=seed)
    got = [int(ex.query.text[1:]) for ex in pipeline.load_benchmark(cfg, evaluation=False).train]
    want = sorted(torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:7].tolist())
    assert got == want  # 7 rows, the data.seed sample, in their file order
    cfg.max_train = 20
    assert len(pipeline.load_benchmark(cfg, evaluation=False).train) == 20
    cfg.max_train = 21
    assert len(pipeline.load_benchmark(cfg, evaluation=False).train) == 20  # all of them (with a warning)


def test_vidore_tasks_join_the_loaded_benchmark_only_for_evaluation(monkeypatch):
    from metaembed.config import DataConfig

    calls = []
    monkeypatch.setattr(pipeline, "_vidore_tasks", lambda root, unknown_ids: calls.append(root) or ["doc-task"])
    cfg = DataConfig(n_train=4, n_eval_queries=2, n_candidates=2, subsets=["Ret-T2I"], vidore_path="vd")
    bench = pipeline.load_benchmark(cfg)
    assert calls == ["vd"] and bench.doc_tasks == ["doc-task"]
    assert len(bench.train) == 4 and bench.eval_tasks  # the training triples and MMEB tasks are kept
    assert pipeline.load_benchmark(cfg, evaluation=False).doc_tasks == [] and calls == ["vd"]


def test_synthetic_data_rejects_only_the_mmeb_paths_the_call_would_read():
    from metaembed.config import DataConfig

    pipeline.check_data_source(DataConfig(source="mmeb", path="tr", eval_path="ev"))
    pipeline.check_data_source(DataConfig(path="tr", image_root="img"), train=False)
    pipeline.check_data_source(DataConfig(eval_path="ev", eval_image_root="eimg"), evaluation=False)
    for field in ("path", "image_root", "eval_path", "eval_image_root"):
        with pytest.raises(ConfigError, match=rf"data.{field}='x' but data.source='synthetic'"):
            pipeline.check_data_source(DataConfig(**{field: "x"}))
    # MMEB-only caps had no effect on synthetic data (eval_tasks=[Cls-Object] still scored all 14 tasks)
    for field, value, kw in (("max_train", 2, {}), ("eval_tasks", ["Cls-Object"], {}), ("max_eval_queries", 1, {})):
        with pytest.raises(ConfigError, match=rf"data.{field}={value!r} but data.source='synthetic'".replace("[", r"\[")):
            pipeline.check_data_source(DataConfig(**{field: value}))
    # the MMEB mixing caps too: the synthetic benchmark kept 2 triples of each task under either (a review helper)
    for field, value in (("max_per_subset", 1), ("subset_weights", {"Ret-T2I": 5.0})):
        with pytest.raises(ConfigError, match=rf"data.{field}=.* but data.source='synthetic'"):
            pipeline.check_data_source(DataConfig(**{field: value}))
    pipeline.check_data_source(DataConfig(max_train=2), train=False)
    pipeline.check_data_source(DataConfig(eval_tasks=["Cls-Object"], max_eval_queries=1), evaluation=False)


def test_vidore_root_scores_every_dataset_folder_it_holds(tmp_path, monkeypatch):
    from metaembed.data import vidore

    for name in ("esg_reports_v2", "economics_reports_v2", "unrelated"):
        (tmp_path / name).mkdir()
    seen = []
    monkeypatch.setattr(vidore, "load_vidore_v2_suite",
                        lambda root, keys, on_unknown: seen.append(on_unknown) or list(keys))
    want = sorted(k for k, (name, _) in vidore.VIDORE_V2_TASKS.items()
                  if name.split("/")[1] in ("esg_reports_v2", "economics_reports_v2"))
    assert len(want) >= 3  # a folder may serve several tasks (English / all languages)
    with pytest.warns(vidore.ViDoReDataWarning, match=r"scoring 4 of the 7 ViDoRe v2 tasks .* missing dataset "
                                                       r"folders: \['biomedical_lectures_v2', 'esg_reports_human"):
        assert sorted(pipeline._vidore_tasks(str(tmp_path))) == want  # every task of both folders
    # data.vidore_unknown_ids reaches the loader (the error's hint named an argument no config key set)
    from metaembed.config import DataConfig

    with pytest.warns(vidore.ViDoReDataWarning, match="scoring 4 of the 7"):
        pipeline.load_benchmark(DataConfig(n_train=0, n_eval_queries=1, subsets=["Cls-Object"],
                                           vidore_path=str(tmp_path), vidore_unknown_ids="skip"), train=False)
    assert seen == ["error", "skip"]
    with pytest.raises(ConfigError, match=r"data.vidore_unknown_ids='ignore'; expected one of \('error', 'skip'\)"):
        DataConfig(vidore_unknown_ids="ignore").validate()


def test_a_partial_vidore_folder_warns_and_a_whole_one_does_not(tmp_path, monkeypatch):
    """A missing or misnamed dataset folder dropped out of the NDCG@k mean without a word (a review helper);
    MMEB warns the same way about a partial suite."""
    import warnings

    from metaembed.data import vidore

    monkeypatch.setattr(vidore, "load_vidore_v1_suite", lambda root, keys: list(keys))
    (tmp_path / "docvqa_test_subsampled").mkdir()
    (tmp_path / "tatdqa-test").mkdir()  # misnamed
    with pytest.warns(vidore.ViDoReDataWarning, match=r"scoring 1 of the 10 ViDoRe v1 tasks \(docvqa\).*'tatdqa_test'"):
        assert pipeline._vidore_tasks(str(tmp_path)) == ["docvqa"]
    for name in vidore.VIDORE_V1_TASKS.values():
        if name != "vidore/tatdqa_test":
            (tmp_path / name.split("/")[1]).mkdir(exist_ok=True)
    with pytest.warns(vidore.ViDoReDataWarning, match=r"scoring 9 of the 10 ViDoRe v1 tasks .*: \['tatdqa_test'\]$"):
        assert len(pipeline._vidore_tasks(str(tmp_path))) == 9  # one folder short is still partial
    (tmp_path / "tatdqa_test").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", vidore.ViDoReDataWarning)
        assert pipeline._vidore_tasks(str(tmp_path)) == list(vidore.VIDORE_V1_TASKS)


def test_synthetic_data_rejects_mmeb_caps_of_zero_or_empty():
    """``data.max_train=0`` (or ``max_per_subset=0``, ``eval_tasks=[]``) under ``source=synthetic`` is an MMEB
    setting the synthetic benchmark ignores, like any other value: only null (and '') means unset."""
    from metaembed.config import DataConfig

    for field, value in (("max_train", 0), ("max_per_subset", 0), ("eval_tasks", []), ("subset_weights", {})):
        with pytest.raises(ConfigError, match=rf"data.{field}=.* but data.source='synthetic'"):
            pipeline.check_data_source(DataConfig(**{field: value}))
