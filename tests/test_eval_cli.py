"""``metaembed eval`` on real-data layouts: no training data, run folders, saved paths, split guards, data errors."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from metaembed import cli
from metaembed.config import ModelConfig, config_from_dict
from metaembed.data.mmeb import EVAL_FIELDS, TRAIN_FIELDS
from metaembed.training.trainer import config_to_yaml
from PIL import Image

TINY = ["--set", "model.R_q=4", "--set", "model.R_c=8", "--set", "loss.groups=[[1,1],[2,4],[4,8]]"]


def _parquet(path: Path, rows: list[tuple], fields: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({f: [r[i] for r in rows] for i, f in enumerate(fields)}), path)


def _png(root: Path, rel: str, color: tuple[int, int, int]) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(root / rel)
    return rel


def mmeb_train(root: Path) -> Path:
    """Eight text-to-image triples of one MMEB-train subset."""
    rows = [(f"find colour {i}", "", "<|image_1|> Represent the given image.",
             _png(root, f"images/VOC2007/{i}.png", (30 * i, 0, 0)), "", "") for i in range(8)]
    _parquet(root / "VOC2007" / "original-00000-of-00001.parquet", rows, TRAIN_FIELDS)
    return root


def mmeb_eval(root: Path) -> Path:
    """Two MMEB-eval tasks of three queries (images under ``root``)."""
    cands = [_png(root, f"MSCOCO_t2i/{i}.png", (0, 40 * i, 0)) for i in range(3)]
    _parquet(root / "MSCOCO_t2i" / "test-00000-of-00001.parquet",
             [(f"caption {i}", "", ["<|image_1|> Represent the given image."] * 3, cands[i:] + cands[:i])
              for i in range(3)], EVAL_FIELDS)
    img = _png(root, "ImageNet-1K/q.png", (9, 9, 9))
    _parquet(root / "ImageNet-1K" / "test-00000-of-00001.parquet",
             [("<|image_1|> Represent the given image for classification", img, ["a", "b", "c"], ["", "", ""])] * 3,
             EVAL_FIELDS)
    return root


def saved_model(tmp_path: Path, data: dict) -> Path:
    """A tiny untrained model with a run_config.yaml whose data section is ``data``."""
    from metaembed.model import MetaEmbedModel

    model_dir = MetaEmbedModel.build(ModelConfig(tiny_size="xs", R_q=4, R_c=8)).save_pretrained(tmp_path / "model")
    cfg = config_from_dict({"model": {"tiny_size": "xs", "R_q": 4, "R_c": 8},
                            "loss": {"groups": [[1, 1], [2, 4], [4, 8]]}, "data": data})
    (model_dir / "run_config.yaml").write_text(config_to_yaml(cfg))
    return model_dir


def _error(capsys) -> str:
    """The error line (after any model-loading progress bars on stderr)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("metaembed: error:"), err
    return last


def test_mmeb_model_evaluates_from_another_directory_without_training_data(tmp_path, monkeypatch, capsys):
    """Relative data paths are saved absolute; eval needs only MMEB-eval (the training set may be gone)."""
    work = tmp_path / "work"
    mmeb_train(work / "train")
    mmeb_eval(work / "eval")
    monkeypatch.chdir(work)
    argv = ["train", "--config", "smoke", "--data", "train", "--output", "run", "--set", "data.eval_path=eval",
            "--set", "train.val_fraction=0", "--set", "train.batch_size=4", *TINY]
    assert cli.main(argv) == 0
    saved = yaml.safe_load((work / "run" / "model" / "run_config.yaml").read_text())
    assert saved["data"]["path"] == str(work / "train") and saved["data"]["eval_path"] == str(work / "eval")
    assert saved["data"]["vidore_path"] is None and saved["model"]["backbone_path"] is None  # unset stays null
    assert yaml.safe_load((work / "run" / "config.yaml").read_text())["data"]["path"] == str(work / "train")
    capsys.readouterr()
    for f in (work / "train").rglob("*.parquet"):
        f.unlink()  # evaluation must not read MMEB-train
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["eval", "--model", str(work / "run" / "model"), "--budgets", "1,1"]) == 0
    out = capsys.readouterr().out
    assert "Retrieval" in out and "Classification" in out


def test_train_reads_no_evaluation_data(tmp_path, monkeypatch, capsys):
    """`metaembed train` trains only: MMEB-eval / ViDoRe folders named in the config are not read (they were
    loaded, checked and thrown away, so a missing or broken evaluation set stopped training)."""
    work = tmp_path / "work"
    mmeb_train(work / "train")
    (work / "eval").mkdir()  # named, but holds no MMEB-eval task
    monkeypatch.chdir(work)
    argv = ["train", "--config", "smoke", "--data", "train", "--output", "run", "--set", "data.eval_path=eval",
            "--set", "data.vidore_path=eval", "--set", "train.val_fraction=0", "--set", "train.batch_size=4", *TINY]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (work / "run" / "model" / "run_config.yaml").is_file()


def test_eval_with_eval_data_only_and_nothing_to_evaluate(tmp_path, capsys):
    model_dir = saved_model(tmp_path, {"source": "mmeb", "eval_path": str(mmeb_eval(tmp_path / "eval"))})
    assert cli.main(["eval", "--model", str(model_dir), "--budgets", "1,1 4,8"]) == 0  # no data.path at all
    out = capsys.readouterr().out
    assert cli.main(["eval", "--model", str(model_dir), "--budgets", "1,1", "4,8"]) == 0  # unquoted, as flops takes them
    unquoted = capsys.readouterr().out
    assert "(1,1)" in unquoted and "(4,8)" in unquoted and "(16,64)" not in unquoted
    assert "Overall" in out  # and what the numbers are (the table alone did not say; a review helper)
    # MMEB-eval only: no NDCG@5 column, and the title no longer names one (newcomer review)
    assert "P@1 (%) per meta-task / IND / OOD / Overall per budget (r_q, r_c)" in out and "NDCG" not in out
    assert cli.main(["eval", "--model", str(model_dir), "--set", "data.eval_path=null"]) == 2
    assert "nothing to evaluate" in _error(capsys)


def test_eval_of_a_run_folder_suggests_its_model(tmp_path, capsys):
    run = tmp_path / "run"
    saved_model(run, {})
    assert cli.main(["eval", "--model", str(run)]) == 2
    assert f"did you mean {run / 'model'}?" in _error(capsys)
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", "--model", str(tmp_path / "empty")]) == 2
    assert "is not a saved MetaEmbed model (no metaembed_config.json)" in _error(capsys)


@pytest.mark.parametrize("overrides, message", [
    (["data.n_eval_queries=3"], "data.n_eval_queries=3 exceeds the trained 2"),
    (["data.seed=1"], "data.seed=1 differs from the trained data.seed=0"),
    (["data.n_candidates=3"], "data.n_candidates=3 differs from the trained data.n_candidates=4"),
    (["data.subsets=[Cls-Object,Ret-T2I]"], "adds task(s) ['Ret-T2I']"),
    (["data.subsets=[Cls-Object,Ret-T2I-OOD,Ret-I2T]"], "adds task(s) ['Ret-I2T']"),  # Ret-T2I read backwards
    (["data.subsets=[Cls-Object,VQA-Attr,Doc-Pages]"], "adds task(s) ['VQA-Attr']"),  # scenes of other families
])
def test_synthetic_eval_refuses_settings_that_score_training_queries(tmp_path, capsys, overrides, message):
    """Training held out only the evaluation queries of its own split (seed, candidates, count, tasks)."""
    model_dir = saved_model(tmp_path, {"n_train": 16, "n_eval_queries": 2, "n_candidates": 4,
                                       "subsets": ["Cls-Object", "Ret-T2I-OOD"]})
    argv = ["eval", "--model", str(model_dir)]
    for o in overrides:
        argv += ["--set", o]
    assert cli.main(argv) == 2
    err = _error(capsys)
    assert message in err and "training queries" in err and str(model_dir / "run_config.yaml") in err


def test_synthetic_eval_allows_fewer_queries_and_other_sizes(tmp_path, capsys):
    """A smaller n_eval_queries is a prefix of the held-out queries; n_train, image_size and OOD tasks draw none."""
    model_dir = saved_model(tmp_path, {"n_train": 16, "n_eval_queries": 2, "n_candidates": 4,
                                       "subsets": ["Cls-Object", "Ret-T2I"]})
    argv = ["eval", "--model", str(model_dir), "--budgets", "1,1", "--set", "data.n_eval_queries=1",
            "--set", "data.n_train=999", "--set", "data.subsets=[Cls-Object,Cls-Object-OOD]"]
    assert cli.main(argv) == 0
    assert "Classification" in capsys.readouterr().out


def test_data_errors_exit_2_without_traceback(tmp_path, capsys):
    """Malformed MMEB / ViDoRe files from train and eval: 'metaembed: error: ...', status 2."""
    bad = mmeb_eval(tmp_path / "eval")
    table = pq.read_table(bad / "ImageNet-1K" / "test-00000-of-00001.parquet").drop(["tgt_img_path"])
    pq.write_table(table, bad / "ImageNet-1K" / "test-00000-of-00001.parquet")
    model_dir = saved_model(tmp_path, {"source": "mmeb", "eval_path": str(bad)})
    assert cli.main(["eval", "--model", str(model_dir)]) == 2
    assert "missing column(s) ['tgt_img_path']" in _error(capsys)
    assert cli.main(["eval", "--model", str(model_dir), "--set", "data.eval_path=null",
                     "--set", f"data.vidore_path={tmp_path / 'eval'}"]) == 2
    assert "no ViDoRe v1/v2 dataset folder found" in _error(capsys)
    (tmp_path / "vidore" / "esg_reports_v2").mkdir(parents=True)  # no corpus/queries/qrels
    assert cli.main(["eval", "--model", str(model_dir), "--set", "data.eval_path=null",
                     "--set", f"data.vidore_path={tmp_path / 'vidore'}"]) == 2
    assert "esg_reports_v2/corpus: directory not found" in _error(capsys)
    assert cli.main(["train", "--config", "smoke", "--data", str(tmp_path / "eval"),
                     "--output", str(tmp_path / "run")]) == 2
    # the folders' own prefix is named (an MMEB-train release with train-*.parquet is one data.split away)
    assert "no subset directory with 'original-*.parquet' files; its subset directories hold 'test-*.parquet' " \
        "(choose one with data.split)" in _error(capsys)
    assert cli.main(["train", "--config", "smoke", "--set", "data.n_candidates=9",
                     "--output", str(tmp_path / "run")]) == 2
    assert "n_candidates=9" in _error(capsys)


def test_eval_reads_its_data_before_the_weights(tmp_path, capsys, monkeypatch):
    """A malformed or missing evaluation file failed only after from_pretrained (minutes at real size; a review
    helper)."""
    from metaembed.model import MetaEmbedModel

    bad = mmeb_eval(tmp_path / "eval")
    table = pq.read_table(bad / "ImageNet-1K" / "test-00000-of-00001.parquet").drop(["tgt_img_path"])
    pq.write_table(table, bad / "ImageNet-1K" / "test-00000-of-00001.parquet")
    model_dir = saved_model(tmp_path, {"source": "mmeb", "eval_path": str(bad)})
    loaded = []
    monkeypatch.setattr(MetaEmbedModel, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    assert cli.main(["eval", "--model", str(model_dir)]) == 2
    assert "missing column(s) ['tgt_img_path']" in _error(capsys) and not loaded


def _image_column(n: int, side: int = 20, height: int | None = None) -> pa.Array:
    import io

    def png_bytes(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (side + i, height or side), (10, 200, 10)).save(buf, format="PNG")
        return buf.getvalue()

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.array([{"bytes": png_bytes(i), "path": f"p{i}.png"} for i in range(n)], type=struct)


def _vidore_v2(root: Path, side: int = 20, height: int | None = None) -> None:
    for sub, cols in (("corpus", {"corpus-id": pa.array([0, 1], type=pa.int64()),
                                  "image": _image_column(2, side, height)}),
                      ("queries", {"query-id": pa.array([0], type=pa.int64()), "query": ["what?"]}),
                      ("qrels", {"query-id": pa.array([0], type=pa.int64()), "corpus-id": pa.array([1], type=pa.int64()),
                                 "score": pa.array([1.0])})):
        (root / sub).mkdir(parents=True)
        pq.write_table(pa.table(cols), root / sub / "test-00000-of-00001.parquet")


def _vidore_v1(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table({"query": ["q1", None], "image": _image_column(2), "image_filename": ["f1", "f2"]}),
                   root / "data" / "test-00000-of-00001.parquet")


def test_vidore_folder_names_in_errors_and_v1_skipped_loudly(tmp_path, caplog):
    """No dataset folder: name the expected and the found folders; v2 next to v1: say v1 is skipped."""
    from metaembed.config import ConfigError, DataConfig
    from metaembed.pipeline import load_benchmark

    root = tmp_path / "vidore"
    _vidore_v2(root / "esg_reports_v2_copy")
    cfg = DataConfig(source="mmeb", vidore_path=str(root))
    with pytest.raises(ConfigError) as info:
        load_benchmark(cfg, train=False)
    msg = str(info.value)
    assert "esg_reports_human_labeled_v2" in msg and "docvqa_test_subsampled" in msg
    assert "found: ['esg_reports_v2_copy']" in msg
    _vidore_v2(root / "esg_reports_human_labeled_v2")
    _vidore_v1(root / "tatdqa_test")
    with caplog.at_level("WARNING", logger="metaembed.pipeline"):
        bench = load_benchmark(cfg, train=False)
    assert [t.name for t in bench.doc_tasks] == ["ESG_Human"] and bench.train == []
    assert "scoring v2 (esg_reports_human_labeled_v2), skipping v1 (tatdqa_test)" in caplog.text
    caplog.clear()
    (root / "esg_reports_human_labeled_v2").rename(tmp_path / "moved")
    with caplog.at_level("WARNING", logger="metaembed.pipeline"):
        assert [t.name for t in load_benchmark(cfg, train=False).doc_tasks] == ["tatdqa"]
    assert "skipping v1" not in caplog.text


def test_load_benchmark_without_training_data(tmp_path):
    """train=False: no data.path needed for MMEB, and no synthetic training triples drawn (same eval queries)."""
    from metaembed.config import ConfigError, DataConfig
    from metaembed.pipeline import load_benchmark

    ev = str(mmeb_eval(tmp_path / "eval"))
    with pytest.warns(UserWarning, match="loading 2 of the 36"):
        bench = load_benchmark(DataConfig(source="mmeb", eval_path=ev), train=False)
    assert bench.train == [] and [t.name for t in bench.eval_tasks] == ["ImageNet-1K", "MSCOCO_t2i"]
    with pytest.raises(ConfigError, match="needs data.path"):
        load_benchmark(DataConfig(source="mmeb", eval_path=ev))
    train_only = load_benchmark(DataConfig(source="mmeb", path=str(mmeb_train(tmp_path / "train")), eval_path=ev,
                                           vidore_path=str(tmp_path / "nowhere")), evaluation=False)
    assert train_only.train and train_only.eval_tasks == [] and train_only.doc_tasks == []
    cfg = DataConfig(n_train=8, n_eval_queries=2, n_candidates=4, subsets=["Cls-Object", "Doc-Pages"])
    full, evals = load_benchmark(cfg), load_benchmark(cfg, train=False)
    assert len(full.train) == 8 and evals.train == []
    assert [q.query.uid for q in evals.eval_tasks[0].queries] == [q.query.uid for q in full.eval_tasks[0].queries]


def test_lora_model_on_a_relative_backbone_path_evaluates_from_elsewhere(tmp_path, monkeypatch, capsys):
    """The saved model's own config (metaembed_config.json) names its base checkpoint by an absolute path."""
    import json

    from metaembed.model import CONFIG_FILE, MetaEmbedModel

    monkeypatch.chdir(tmp_path)
    MetaEmbedModel.build(ModelConfig(tiny_size="xs", R_q=4, R_c=8)).backbone.save("base", weights=True)
    assert cli.main(["train", "--config", "smoke", "--backbone", "base", "--output", "run",
                     "--set", "model.tiny_size=xs"]) == 0
    info = json.loads((tmp_path / "run" / "model" / CONFIG_FILE).read_text())
    assert info["model"]["backbone_path"] == str(tmp_path / "base") and info["model"]["lora"] is None
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "run" / "model"), "--budgets", "1,1",
                     "--set", "data.n_eval_queries=1"]) == 0
    assert "Overall" in capsys.readouterr().out


def test_eval_of_a_lora_model_checks_and_relocates_its_base_checkpoint(tmp_path, monkeypatch, capsys):
    """Another checkpoint at the saved backbone_path is exit 2 (the adapter would run on a model nobody trained);
    --backbone points at a copy of the right one; --skip-base-check loads anyway."""
    import shutil

    from metaembed.model import MetaEmbedModel

    monkeypatch.chdir(tmp_path)
    MetaEmbedModel.build(ModelConfig(tiny_size="xs", R_q=4, R_c=8)).backbone.save("base", weights=True)
    assert cli.main(["train", "--config", "smoke", "--backbone", "base", "--output", "run",
                     "--set", "model.tiny_size=xs"]) == 0
    shutil.move("base", "moved")
    MetaEmbedModel.build(ModelConfig(tiny_size="xs", R_q=4, R_c=8, seed=1)).backbone.save("base", weights=True)
    args = ["eval", "--model", "run/model", "--budgets", "1,1", "--set", "data.n_eval_queries=1"]
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "not the one this LoRA adapter was trained on" in capsys.readouterr().err
    assert cli.main([*args, "--backbone", "moved"]) == 0
    assert "Overall" in capsys.readouterr().out
    assert cli.main([*args, "--skip-base-check"]) == 0


def test_eval_rejects_unwritable_outputs_and_empty_budgets_before_evaluating(tmp_path, monkeypatch, capsys):
    """--csv naming a directory (IsADirectoryError), --json below a file (FileExistsError) or an empty
    eval.budgets failed with a traceback after the whole evaluation had run; a task named twice in
    data.eval_tasks likewise (the summary refused it)."""
    def no_eval(*args, **kwargs):
        raise AssertionError("evaluated before rejecting the arguments")

    monkeypatch.setattr("metaembed.pipeline.evaluate_model", no_eval)
    model_dir = saved_model(tmp_path, {"source": "mmeb", "eval_path": str(mmeb_eval(tmp_path / "eval"))})
    afile = tmp_path / "afile"
    afile.write_text("")
    capsys.readouterr()
    for extra, message in ((["--csv", str(tmp_path)], f"--csv: {tmp_path} is a directory"),
                           (["--json", str(afile / "r.json")], f"--json: cannot create {afile / 'r.json'}"),
                           (["--set", "eval.budgets=[]"], "eval.budgets is empty"),
                           (["--budgets", " "], "--budgets is empty"),
                           (["--budgets", ""], "--budgets is empty"),  # scored the default budgets silently
                           (["--budgets", "0,1"], "--budgets: budget must have r_q >= 1"),  # named no flag
                           (["--set", "data.eval_tasks=[MSCOCO_t2i, MSCOCO_t2i]"], "named more than once")):
        assert cli.main(["eval", "--model", str(model_dir), *extra]) == 2, extra
        assert message in _error(capsys)


def test_eval_rejects_bad_data_settings_and_model_overrides_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """A misspelt data.source (or data.negatives, ...) was rejected by load_benchmark only after the model had
    loaded; --set model.* was dropped silently (the saved model's config replaces config.model)."""
    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model before rejecting the arguments")

    monkeypatch.setattr("metaembed.model.MetaEmbedModel.from_pretrained", no_load)
    model_dir = saved_model(tmp_path, {"source": "mmeb", "eval_path": str(mmeb_eval(tmp_path / "eval"))})
    capsys.readouterr()
    for extra, message in ((["--set", "data.source=mmbe"], "data.source='mmbe'; expected one of"),
                           (["--set", "data.max_eval_queries=0"], "data.max_eval_queries must be >= 1"),
                           (["--set", "model.max_text_length=8"], "--set model.max_text_length: eval takes the "
                                                                  "model settings from the saved model"),
                           (["--set", "model.pooling=single-mean", "--set", "eval.batch_size=2"],
                            "--set model.pooling: eval takes")):
        assert cli.main(["eval", "--model", str(model_dir), *extra]) == 2, extra
        assert message in _error(capsys)


def test_eval_json_holds_the_per_task_rows_then_the_printed_summary(tmp_path, capsys):
    """--json wrote the per-task rows only; the meta-task / IND / OOD / Overall means and the ViDoRe NDCG@5 mean
    of the printed table now follow them as records marked by a 'summary' key (rows unchanged, first)."""
    import json
    import warnings

    import pandas as pd

    vidore = tmp_path / "vidore"
    _vidore_v2(vidore / "esg_reports_human_labeled_v2", side=32)
    model_dir = saved_model(tmp_path, {"source": "mmeb", "eval_path": str(mmeb_eval(tmp_path / "eval")),
                                       "vidore_path": str(vidore)})
    js, csv = tmp_path / "out" / "r.json", tmp_path / "r.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 of the 36 MMEB tasks
        assert cli.main(["eval", "--model", str(model_dir), "--budgets", "1,1 4,8", "--json", str(js),
                         "--csv", str(csv)]) == 0
    printed = capsys.readouterr().out
    records = json.loads(js.read_text())
    rows = pd.read_csv(csv)
    n = len(rows)
    assert all("summary" not in r for r in records[:n]) and all("summary" in r for r in records[n:])
    pd.testing.assert_frame_equal(pd.DataFrame(records[:n]), rows, rtol=1e-9)  # the per-task rows, where they were
    summary = pd.DataFrame(records[n:])
    assert list(summary.columns) == ["summary", "budget", "r_q", "r_c", "value", "n_tasks"]
    assert set(summary["summary"]) == {"Classification", "Retrieval", "IND", "Overall", "NDCG@5"}
    for (r_q, r_c), part in rows.groupby(["r_q", "r_c"]):
        p1 = part[part["metric"] == "P@1"]
        want = {"Classification": p1[p1["meta_task"] == "classification"]["value"].mean(),
                "Retrieval": p1[p1["meta_task"] == "retrieval"]["value"].mean(),
                "IND": p1[p1["split"] == "ind"]["value"].mean(), "Overall": p1["value"].mean(),
                "NDCG@5": part[part["metric"] == "NDCG@5"]["value"].mean()}  # the ESG_Human (ViDoRe v2) task
        got = summary[(summary["r_q"] == r_q) & (summary["r_c"] == r_c)].set_index("summary")["value"].to_dict()
        assert got == pytest.approx(want)
        line = next(x for x in printed.splitlines() if x.startswith(f"({r_q},{r_c})"))
        assert [float(v) for v in line.split()[1:]] == [round(want[k], 1) for k in
                                                         ("Classification", "Retrieval", "IND", "Overall", "NDCG@5")]
    assert set(rows[rows["metric"] == "NDCG@5"]["task"]) == {"ESG_Human"}


def test_items_the_backbone_cannot_encode_exit_2_without_traceback(tmp_path, capsys):
    """With data.check_images=false a missing MMEB-eval image, and a ViDoRe page the Qwen processor refuses
    (aspect ratio over 200), raised InputError from encoding: a traceback and exit status 1."""
    import warnings

    ev = mmeb_eval(tmp_path / "eval")
    (ev / "MSCOCO_t2i" / "1.png").unlink()
    model_dir = saved_model(tmp_path, {"source": "mmeb", "eval_path": str(ev), "check_images": False})
    _vidore_v2(tmp_path / "vidore" / "esg_reports_human_labeled_v2", side=300, height=1)  # 300x1 px pages
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 of the 36 MMEB tasks
        assert cli.main(["eval", "--model", str(model_dir), "--budgets", "1,1"]) == 2
        assert f"image file not found: {ev / 'MSCOCO_t2i' / '1.png'}" in _error(capsys)
        assert cli.main(["eval", "--model", str(model_dir), "--budgets", "1,1", "--set", "data.eval_path=null",
                         "--set", f"data.vidore_path={tmp_path / 'vidore'}"]) == 2
        assert "image processor cannot take its 300x1 image" in _error(capsys)


def test_mmeb_paths_under_synthetic_data_are_an_error_not_ignored(tmp_path, monkeypatch, capsys):
    """data.eval_path (data.path) with data.source left at 'synthetic' scored (trained on) the synthetic tasks,
    exit status 0, even for a path that does not exist: the MMEB files were silently ignored."""
    from metaembed.pipeline import load_benchmark

    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model before rejecting the arguments")

    model_dir = saved_model(tmp_path, {"source": "synthetic", "n_eval_queries": 2, "n_candidates": 4})
    monkeypatch.setattr("metaembed.model.MetaEmbedModel.from_pretrained", no_load)
    monkeypatch.setattr("metaembed.model.MetaEmbedModel.build", no_load)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(model_dir), "--set", f"data.eval_path={tmp_path / 'MMEB-eval'}"]) == 2
    assert "data.source='synthetic', which reads no MMEB files; set data.source=mmeb" in _error(capsys)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "smoke", "--output", str(out), "--set", f"data.path={tmp_path}"]) == 2
    assert f"data.path={str(tmp_path)!r} but data.source='synthetic'" in _error(capsys)
    cfg = config_from_dict({"data": {"eval_image_root": "/imgs", "n_train": 4, "n_eval_queries": 1}}).data
    assert load_benchmark(cfg, evaluation=False).train  # only the files a call would read are checked
    with pytest.raises(ValueError, match="data.eval_image_root='/imgs' but data.source='synthetic'"):
        load_benchmark(cfg, train=False)


def test_eval_budgets_beyond_the_saved_model_are_rejected_before_loading_it(tmp_path, monkeypatch, capsys):
    """--budgets 8,8 on an R_q=4 model was rejected only after from_pretrained had loaded the backbone weights
    (minutes for a real checkpoint); the saved metaembed_config.json alone answers it."""
    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model before rejecting --budgets")

    monkeypatch.setattr("metaembed.model.MetaEmbedModel.from_pretrained", no_load)
    model_dir = saved_model(tmp_path, {})
    capsys.readouterr()
    for extra in (["--budgets", "1,1 8,8"], ["--set", "eval.budgets=[[4,16]]"]):
        assert cli.main(["eval", "--model", str(model_dir), *extra]) == 2, extra
        assert "exceeds the trained token counts R_q=4, R_c=8" in _error(capsys)


class _Scored(Exception):
    """Raised with the budgets ``eval`` would score (see :func:`_budgets_only`)."""


def _budgets_only(monkeypatch) -> type[_Scored]:
    """Make ``metaembed eval`` stop at scoring, raising :class:`_Scored` with its budgets (no data, no model run)."""
    from metaembed.pipeline import eval_budgets

    def budgets_only(model, benchmark, config, progress=False):
        raise _Scored(eval_budgets(config))

    monkeypatch.setattr("metaembed.pipeline.load_benchmark", lambda *a, **k: None)
    monkeypatch.setattr("metaembed.pipeline.evaluate_model", budgets_only)
    return _Scored


def test_eval_with_another_config_scores_and_checks_the_models_own_groups(tmp_path, monkeypatch, capsys):
    """``eval --config OTHER`` took loss.groups (the default budgets) from OTHER and checked them against OTHER's
    model section, which eval replaces by the saved model's: an R_q=8, R_c=16 model trained with the groups (1,1),
    (2,4), (8,16) was scored at smoke's (1,1), (2,4), (4,8) (its full budget (8,16) never, without a word), and
    --set loss.groups=[[1,1],[8,16]] was refused as exceeding smoke's R_q=4, R_c=8."""
    from metaembed.model import MetaEmbedModel

    Scored = _budgets_only(monkeypatch)
    model = MetaEmbedModel.build(ModelConfig(tiny_size="xs", R_q=8, R_c=16))
    model_dir = model.save_pretrained(tmp_path / "model")
    trained = config_from_dict({"model": {"tiny_size": "xs", "R_q": 8, "R_c": 16},
                                "loss": {"groups": [[1, 1], [2, 4], [8, 16]]},
                                "data": {"n_train": 16, "n_eval_queries": 2, "n_candidates": 4}})  # smoke's split
    (model_dir / "run_config.yaml").write_text(config_to_yaml(trained))
    argv = ["eval", "--model", str(model_dir)]
    for extra, want in (([], [(1, 1), (2, 4), (8, 16)]),  # run_config.yaml: unchanged
                        (["--config", "smoke"], [(1, 1), (2, 4), (8, 16)]),
                        (["--config", "smoke", "--set", "loss.groups=[[1,1],[8,16]]"], [(1, 1), (8, 16)]),
                        (["--config", "smoke", "--set", "loss.tau=0.05"], [(1, 1), (2, 4), (8, 16)])):
        with pytest.raises(Scored) as seen:
            cli.main([*argv, *extra])
        assert seen.value.args[0] == want, extra
    capsys.readouterr()
    assert cli.main([*argv, "--config", "smoke", "--set", "loss.groups=[[1,1],[16,32]]"]) == 2
    assert "last group (16, 32) exceeds the trained token counts R_q=8, R_c=16" in _error(capsys)
    # a model saved without a run_config.yaml: the config's groups that fit it, as before
    bare = model.save_pretrained(tmp_path / "bare")
    for config, want in (("smoke", [(1, 1), (2, 4), (4, 8)]), ("quickstart", [(1, 1), (2, 4), (4, 8), (8, 16)])):
        with pytest.raises(Scored) as seen:
            cli.main(["eval", "--model", str(bare), "--config", config])
        assert seen.value.args[0] == want, config


def test_eval_other_groups_of_a_model_trained_with_loss_weights(tmp_path, monkeypatch, capsys):
    """Every paper recipe sets loss.weights (w_g, Eq. 7; training only): ``eval --set loss.groups=...`` kept the
    run's weights and was refused ("loss.weights has 3 entries for 2 groups"), and so was ``--config OTHER`` whose
    weights fit OTHER's groups (a review helper)."""
    from metaembed.model import MetaEmbedModel

    Scored = _budgets_only(monkeypatch)
    model_dir = MetaEmbedModel.build(ModelConfig(tiny_size="xs", R_q=8, R_c=16)).save_pretrained(tmp_path / "m")
    trained = config_from_dict({"model": {"tiny_size": "xs", "R_q": 8, "R_c": 16},
                                "loss": {"groups": [[1, 1], [2, 4], [8, 16]], "weights": [1.0, 2.0, 3.0]},
                                "data": {"n_train": 16, "n_eval_queries": 2, "n_candidates": 4}})
    (model_dir / "run_config.yaml").write_text(config_to_yaml(trained))
    other = tmp_path / "other.yaml"
    other.write_text(config_to_yaml(config_from_dict({
        "model": {"tiny_size": "xs", "R_q": 8, "R_c": 16},
        "loss": {"groups": [[1, 1], [2, 2], [4, 4], [6, 8], [8, 16]], "weights": [1, 1, 1, 1, 1]},
        "data": {"n_train": 16, "n_eval_queries": 2, "n_candidates": 4}})))
    argv = ["eval", "--model", str(model_dir)]
    for extra, want in ((["--set", "loss.groups=[[1,1],[8,16]]"], [(1, 1), (8, 16)]),
                        (["--set", "loss={groups: [[2,4]]}"], [(2, 4)]),
                        (["--config", str(other)], [(1, 1), (2, 4), (8, 16)]),
                        (["--config", str(other), "--set", "loss.groups=[[4,8]]"], [(4, 8)]),
                        ([], [(1, 1), (2, 4), (8, 16)])):
        with pytest.raises(Scored) as seen:
            cli.main([*argv, *extra])
        assert seen.value.args[0] == want, extra
    capsys.readouterr()  # weights given with the groups are still checked
    assert cli.main([*argv, "--set", "loss.groups=[[1,1],[8,16]]", "--set", "loss.weights=[1,1,1]"]) == 2
    assert "loss.weights has 3 entries for 2 groups" in _error(capsys)


def _fake_model_dir(tmp_path: Path, data: dict | None = None, *, run_config: bool = True,
                    settings: bool = True) -> Path:
    """A model folder holding only what eval reads before loading weights: metaembed_config.json (the tiny
    R_q=4, R_c=8 model's settings, or ``{}`` when not ``settings``) and a run_config.yaml with ``data``."""
    import dataclasses
    import json

    from metaembed.model import CONFIG_FILE

    model_dir = tmp_path / "model"
    model_dir.mkdir(parents=True)
    info = {"model": dataclasses.asdict(ModelConfig(tiny_size="xs", R_q=4, R_c=8))} if settings else {}
    (model_dir / CONFIG_FILE).write_text(json.dumps(info))
    if run_config:
        cfg = config_from_dict({"model": {"tiny_size": "xs", "R_q": 4, "R_c": 8},
                                "loss": {"groups": [[1, 1], [2, 4], [4, 8]]}, "data": data or {}})
        (model_dir / "run_config.yaml").write_text(config_to_yaml(cfg))
    return model_dir


def _fake_evaluation(monkeypatch) -> dict:
    """Stand-ins for loading, scoring and summarising: what eval passes them is recorded in the returned dict
    (``load``: from_pretrained's keywords, ``config``: the config scored, ``json``: write_results_json's
    path and summary, ``summaries``: the number of summarize calls)."""
    import types

    import pandas as pd

    seen: dict = {"summaries": 0}

    def from_pretrained(model_dir, backbone_path=None, check_base=True, verify=True):
        seen["load"] = {"backbone_path": backbone_path, "check_base": check_base, "verify": verify}
        return types.SimpleNamespace(config=ModelConfig(tiny_size="xs", R_q=4, R_c=8, pooling="meta"))

    def evaluate_model(model, benchmark, config, progress=False):
        seen["config"], seen["progress"] = config, progress
        return pd.DataFrame({"task": ["A"], "value": [1.0]})

    def summarize(df):
        seen["summaries"] += 1
        return "SUMMARY"

    def write_results_json(df, path, summary=None):
        seen["json"] = (path, summary)
        return Path(path)

    monkeypatch.setattr("metaembed.model.MetaEmbedModel.from_pretrained", from_pretrained)
    monkeypatch.setattr("metaembed.pipeline.load_benchmark", lambda data, train=True: None)
    monkeypatch.setattr("metaembed.pipeline.evaluate_model", evaluate_model)
    monkeypatch.setattr("metaembed.pipeline.write_results_json", write_results_json)
    monkeypatch.setattr("metaembed.evaluation.summarize", summarize)
    monkeypatch.setattr("metaembed.evaluation.budget_table", lambda summary: pd.DataFrame({"x": [1]}))
    return seen


def test_eval_passes_backbone_and_skip_base_check_to_from_pretrained(tmp_path, monkeypatch):
    """--backbone relocates a LoRA model's base checkpoint, --skip-base-check turns the fingerprint check off and
    --skip-verify the saved files' sha256 check: all must reach MetaEmbedModel.from_pretrained (the LoRA
    end-to-end tests are slow)."""
    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path)
    assert cli.main(["eval", "--model", str(model_dir)]) == 0
    assert seen["load"] == {"backbone_path": None, "check_base": True, "verify": True}
    base = str(tmp_path / "base")
    assert cli.main(["eval", "--model", str(model_dir), "--backbone", base, "--skip-base-check"]) == 0
    assert seen["load"] == {"backbone_path": base, "check_base": False, "verify": True}
    assert cli.main(["eval", "--model", str(model_dir), "--skip-verify"]) == 0
    assert seen["load"] == {"backbone_path": None, "check_base": True, "verify": False}


def test_eval_shows_encoding_progress_on_a_terminal(tmp_path, monkeypatch):
    """Encoding a real benchmark takes hours: eval showed no progress at all (a review helper); now bars on a
    terminal, none with --no-progress or when stderr is a file (logs and the tests' captured stderr)."""
    import sys

    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path)
    assert cli.main(["eval", "--model", str(model_dir)]) == 0 and seen["progress"] is False  # captured: no tty
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(["eval", "--model", str(model_dir)]) == 0 and seen["progress"] is True
    assert cli.main(["eval", "--model", str(model_dir), "--no-progress"]) == 0 and seen["progress"] is False


def test_eval_budgets_may_be_separated_by_semicolons(tmp_path, monkeypatch):
    """--budgets "1,1;4,8" (as the help of other tools writes them) is the same as "1,1 4,8"."""
    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path)
    for text in ("1,1;4,8", "1,1; 4,8", "1,1 4,8"):
        assert cli.main(["eval", "--model", str(model_dir), "--budgets", text]) == 0, text
        assert seen["config"].eval.budgets == [(1, 1), (4, 8)], text


def test_eval_checks_budgets_against_the_saved_model_without_a_run_config(tmp_path, monkeypatch, capsys):
    """A model saved without run_config.yaml scores with the default config, whose model section (R_q=16,
    R_c=64) is not the saved model's (4, 8): --budgets 8,8 must be checked against the saved settings, before
    the weights load, not against the config's."""
    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path, run_config=False)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(model_dir), "--budgets", "1,1 8,8"]) == 2
    assert "exceeds the trained token counts R_q=4, R_c=8" in _error(capsys)
    assert "load" not in seen and "config" not in seen


def test_eval_with_unreadable_saved_settings_checks_the_loaded_models(tmp_path, monkeypatch, capsys):
    """When metaembed_config.json's settings cannot be read before loading, the loaded model's config (R_q=4,
    R_c=8) replaces the config's model section and the budgets are checked against it after loading."""
    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path, run_config=False, settings=False)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(model_dir), "--budgets", "8,8"]) == 2
    assert "exceeds the trained token counts R_q=4, R_c=8" in _error(capsys)
    assert "load" in seen and "config" not in seen
    assert cli.main(["eval", "--model", str(model_dir), "--budgets", "4,8"]) == 0
    assert seen["config"].model == ModelConfig(tiny_size="xs", R_q=4, R_c=8)


def test_eval_writes_the_printed_summary_to_json_and_creates_the_csv_folder(tmp_path, monkeypatch):
    """--json gets the summary of the printed table (summarize runs once: it warns about a partial MMEB-eval)
    and --csv into a folder that does not exist yet creates it."""
    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path)
    js, csv = tmp_path / "j" / "r.json", tmp_path / "new" / "sub" / "r.csv"
    assert cli.main(["eval", "--model", str(model_dir), "--json", str(js), "--csv", str(csv)]) == 0
    assert seen["json"] == (str(js), "SUMMARY") and seen["summaries"] == 1
    assert csv.read_text().splitlines() == ["task,value", "A,1.0"]


def test_synthetic_split_check_applies_only_to_synthetic_training_and_evaluation(tmp_path, monkeypatch, capsys):
    """The split guard compares synthetic with synthetic only: an MMEB evaluation of a synthetic-trained model
    (and a synthetic evaluation of an MMEB-trained one) may use another data.seed; a synthetic evaluation of all
    tasks (data.subsets=null) adds tasks of the trained subsets' families and is refused."""
    seen = _fake_evaluation(monkeypatch)
    synthetic = _fake_model_dir(tmp_path / "s", {"source": "synthetic"})
    argv = ["eval", "--model", str(synthetic), "--set", "data.seed=3"]
    assert cli.main([*argv, "--set", "data.source=mmeb", "--set", f"data.eval_path={tmp_path}"]) == 0
    assert seen["config"].data.seed == 3
    mmeb = _fake_model_dir(tmp_path / "m", {"source": "mmeb"})
    assert cli.main(["eval", "--model", str(mmeb), "--set", "data.source=synthetic", "--set", "data.seed=5"]) == 0
    assert seen["config"].data.seed == 5
    subset = _fake_model_dir(tmp_path / "t", {"source": "synthetic", "subsets": ["Ret-T2I"]})
    assert cli.main(["eval", "--model", str(subset)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(subset), "--set", "data.subsets=null"]) == 2
    assert ("data.subsets adds task(s) ['Cls-Object', 'VQA-What', 'VQA-Attr', 'Ret-I2T', 'Ret-Composed', 'Ground'] "
            "to the trained data.subsets ['Ret-T2I']") in _error(capsys)


def test_eval_refuses_a_whole_model_section_override(tmp_path, monkeypatch, capsys):
    """--set model={...} (the section, not model.KEY) was dropped as silently as --set model.R_q."""
    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(model_dir), "--set", "model={R_q: 2}"]) == 2
    assert "--set model.R_q: eval takes the model settings from the saved model" in _error(capsys)  # dotted_overrides
    assert "load" not in seen


def test_a_malformed_budget_exits_2_without_traceback(tmp_path, monkeypatch, capsys):
    """parse_budget raises GroupError (a ValueError, not a ConfigError): still a usage error, exit status 2."""
    _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(model_dir), "--budgets", "1,1 x"]) == 2
    assert "cannot parse budget 'x'" in _error(capsys)


def test_vidore_train_beside_mmeb_train_weights_and_guards(tmp_path, monkeypatch, capsys):
    """data.vidore_train (the paper's second training set, §4.1) joins MMEB-train as the subset 'ViDoRe-train':
    capped and weighted with the others; alone it needs no data.path; the synthetic benchmark refuses it."""
    from metaembed.config import ConfigError, DataConfig
    from metaembed.data.mmeb import load_mmeb_train
    from metaembed.pipeline import load_benchmark
    from test_vidore import colpali_train_set

    train = mmeb_train(tmp_path / "train")
    vt = colpali_train_set(tmp_path / "colpali_train_set")
    cfg = DataConfig(source="mmeb", path=str(train), vidore_train=str(vt))
    with pytest.warns(UserWarning, match="skipped 1 row"):
        both = load_benchmark(cfg, evaluation=False).train
    assert [ex.task for ex in both] == ["VOC2007"] * 8 + ["ViDoRe-train"] * 3
    with pytest.warns(UserWarning):
        mixed = load_benchmark(DataConfig(source="mmeb", path=str(train), vidore_train=str(vt), max_per_subset=4,
                                          subset_weights={"ViDoRe-train": 2.0}), evaluation=False).train
    assert [ex.task for ex in mixed].count("ViDoRe-train") == 6 and [ex.task for ex in mixed].count("VOC2007") == 4
    # MMEB-train alone: exactly what load_mmeb_train's own cap gives (the mixing moved after loading)
    alone = load_benchmark(DataConfig(source="mmeb", path=str(train), max_per_subset=3, seed=4), evaluation=False).train
    ref = load_mmeb_train(train, max_per_subset=3, seed=4)
    assert [ex.query.text for ex in alone] == [ex.query.text for ex in ref]
    with pytest.warns(UserWarning):
        only = load_benchmark(DataConfig(source="mmeb", vidore_train=str(vt)), evaluation=False).train
    assert [ex.query.text for ex in only] == ["what is the revenue?", "who signed?", "what year?"]
    with pytest.raises(ConfigError, match="needs data.path .* and/or data.vidore_train"):
        load_benchmark(DataConfig(source="mmeb"), evaluation=False)
    with pytest.raises(ConfigError, match="data.vidore_train=.* but data.source='synthetic'"):
        load_benchmark(DataConfig(vidore_train=str(vt)), evaluation=False)
    with pytest.raises(ConfigError, match=r"unknown subset\(s\) \['ViDoRe'\]"), pytest.warns(UserWarning):
        load_benchmark(DataConfig(source="mmeb", path=str(train), vidore_train=str(vt),
                                  subset_weights={"ViDoRe": 2.0}), evaluation=False)
    # trained end to end from the command line; the saved run config keeps the absolute path
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", "smoke", "--data", "train", "--output", "run", "--set", "data.vidore_train=colpali_train_set",
            "--set", "data.vidore_train_image_dir=pages", "--set", "train.val_fraction=0", "--set", "train.batch_size=4",
            *TINY]
    assert cli.main(argv) == 0, capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "run" / "model" / "run_config.yaml").read_text())
    assert saved["data"]["vidore_train"] == str(vt.resolve())
    # the page folder is made absolute although the run creates it (a relative one moved with the working directory)
    assert saved["data"]["vidore_train_image_dir"] == str((tmp_path / "pages").resolve())
    assert len(list((tmp_path / "pages").rglob("*.png"))) == 2  # 3 pairs, two of them on one page


def test_eval_set_loss_groups_of_a_model_without_a_run_config_are_checked_against_it(tmp_path, monkeypatch, capsys):
    """A model saved without run_config.yaml (R_q=4, R_c=8) scored with the default config (16, 64): ``--set
    loss.groups`` is checked against the saved model, so a group it cannot score is an error, not a budget
    clipped away from the table without a word (a mutation review: checked against the config's model it
    passed, and eval_budgets then dropped (8, 16))."""
    from metaembed.pipeline import eval_budgets

    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path, run_config=False)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(model_dir), "--set", "loss.groups=[[1,1],[8,16]]"]) == 2
    assert "loss.groups" in _error(capsys) and "config" not in seen
    assert cli.main(["eval", "--model", str(model_dir), "--set", "loss.groups=[[1,1],[4,8]]"]) == 0
    assert eval_budgets(seen["config"]) == [(1, 1), (4, 8)]


def test_eval_of_a_single_vector_model_under_a_multi_vector_config_scores_one_budget(tmp_path, monkeypatch):
    """A single-vector model (pooling single-last, whatever its R_q / R_c) saved without run_config.yaml and scored
    with a multi-vector run's --config: the default budgets are clipped to the one vector it produces, (1, 1),
    not the config's groups up to (4, 8) -- rows that would repeat the (1, 1) numbers under larger budgets."""
    import dataclasses
    import json
    import types

    from metaembed.model import CONFIG_FILE
    from metaembed.pipeline import eval_budgets

    seen = _fake_evaluation(monkeypatch)
    single = ModelConfig(tiny_size="xs", R_q=4, R_c=8, pooling="single-last")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / CONFIG_FILE).write_text(json.dumps({"model": dataclasses.asdict(single)}))
    monkeypatch.setattr("metaembed.model.MetaEmbedModel.from_pretrained",
                        lambda model_dir, backbone_path=None, check_base=True, verify=True: types.SimpleNamespace(config=single))
    assert cli.main(["eval", "--model", str(model_dir), "--config", "smoke"]) == 0  # groups (1,1) (2,4) (4,8)
    assert seen["config"].model.pooling == "single-last"
    assert eval_budgets(seen["config"]) == [(1, 1)]


@pytest.mark.parametrize("flag", ["--csv", "--backbone"])
def test_eval_refuses_an_empty_flag_value(tmp_path, monkeypatch, capsys, flag):
    """``--csv "$OUT"`` with OUT unset wrote no CSV and exited 0 (an empty --backbone failed later, naming the
    working directory)."""
    seen = _fake_evaluation(monkeypatch)
    model_dir = _fake_model_dir(tmp_path)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(model_dir), flag, ""]) == 2
    assert f"{flag} is empty" in _error(capsys) and "config" not in seen
