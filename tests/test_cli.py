"""The ``metaembed`` CLI and the quickstart pipeline (in-process ``main(argv)`` calls)."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from metaembed import cli, pipeline
from metaembed.config import ConfigError, load_config
from metaembed.pipeline import CONFIG_DIR, packaged_configs, resolve_config

TINY = ["--set", "model.R_q=4", "--set", "model.R_c=8", "--set", "loss.groups=[[1,1],[2,4],[4,8]]"]


def test_parse_overrides_reads_yaml_values():
    got = cli.parse_overrides(["train.max_steps=10", "train.lr=1e-4", "loss.groups=[[1,1],[2,4]]",
                               "model.backbone_path=null", "train.strategy=ddp", "train.progress_bar=false"])
    assert got == {"train.max_steps": 10, "train.lr": "1e-4", "loss.groups": [[1, 1], [2, 4]],
                   "model.backbone_path": None, "train.strategy": "ddp", "train.progress_bar": False}
    with pytest.raises(ConfigError, match="key.sub=value"):
        cli.parse_overrides(["train.max_steps"])


def test_parse_overrides_edge_cases():
    """An empty value is the empty string (not YAML's null), the key is stripped, an empty key or an unparseable
    value is a ConfigError naming the pair (not a traceback)."""
    assert cli.parse_overrides(["name=", " train.seed =3"]) == {"name": "", "train.seed": 3}
    for bad in ["=3", " =3"]:
        with pytest.raises(ConfigError, match="key.sub=value"):
            cli.parse_overrides([bad])
    with pytest.raises(ConfigError, match="cannot parse the value"):
        cli.parse_overrides(["loss.groups=[[1,1"])


def test_set_value_holding_colon_space_must_be_quoted():
    """``--set data.vidore_query_instruction=Find a page: `` is a YAML mapping, which the config then refused as
    "must be a string, got dict" without saying why: the error names the quoting. Quoted, or in braces, it parses."""
    text = "Find a document image that matches the given query: "
    with pytest.raises(ConfigError, match="reads as a YAML mapping.*quote"):
        cli.parse_overrides([f"data.vidore_query_instruction={text}"])
    assert cli.parse_overrides([f'data.vidore_query_instruction="{text}"']) == {"data.vidore_query_instruction": text}
    assert cli.parse_overrides(["loss={mmr: false}"]) == {"loss.mmr": False}


def test_train_passes_resume_to_training(monkeypatch, tmp_path):
    """--resume reaches train(ckpt_path=...); the end-to-end resume test cannot tell a resumed run from a fresh
    one that trains to the same max_steps."""
    import metaembed.training as training

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    seen = []
    trainer = types.SimpleNamespace(is_global_zero=True, global_step=0)
    monkeypatch.setattr(training, "train", lambda config, ckpt_path=None: seen.append(ckpt_path) or (None, trainer))
    out = str(tmp_path / "run")
    assert cli.main(["train", "--config", "smoke", "--output", out, "--resume", str(ckpt)]) == 0
    assert cli.main(["train", "--config", "smoke", "--output", out]) == 0
    assert seen == [str(ckpt), None]


def test_train_prints_the_steps_of_this_run_after_a_resume(monkeypatch, tmp_path, capsys):
    """The printed line after a resume names this run's steps and the span it covered (checked otherwise only by
    the 20 s real-model test)."""
    import metaembed.training as training
    from metaembed.training.trainer import _START_KEY, _STEPS_KEY

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    trainer = types.SimpleNamespace(is_global_zero=True, global_step=5,
                                    callback_metrics={_STEPS_KEY: torch.tensor(2), _START_KEY: torch.tensor(3)})
    monkeypatch.setattr(training, "train", lambda config, ckpt_path=None: (None, trainer))
    assert cli.main(["train", "--config", "smoke", "--output", str(tmp_path / "run"), "--resume", str(ckpt)]) == 0
    assert "trained 2 steps (steps 3 -> 5, resumed)" in capsys.readouterr().out


def test_set_keeps_strings_that_look_like_numbers_and_casts_by_field_type():
    """--set name=1e3 / train.output_dir=1e5 became '1000.0' / '100000.0' (every YAML string float() accepted
    was made a float before the field's type was known); numbers still reach float and int fields."""
    cfg = cli._load("smoke", cli.parse_overrides(["name=1e3", "train.output_dir=1e5", "train.lr=1e-4",
                                                  "train.max_steps=1e3", "loss.tau=3e-2"]))
    assert (cfg.name, cfg.train.output_dir) == ("1e3", "1e5")
    # plain YAML numbers in string fields keep what was typed ('1.1', '31' and '10' before)
    typed = cli._load("smoke", cli.parse_overrides(["name=1.10", "train.output_dir=0x1f", "eval.cache_dir=010",
                                                    "train.max_steps=010", "train.lr=0.10"]))
    assert (typed.name, typed.train.output_dir, typed.eval.cache_dir) == ("1.10", "0x1f", "010")
    assert (typed.train.max_steps, typed.train.lr) == (10, 0.1) and type(typed.train.max_steps) is int
    # a number with a YAML comment is YAML's value, as before (the comment must not become part of the name)
    assert cli._load("smoke", cli.parse_overrides(["name=1.10 # note"])).name == "1.1"
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float and cfg.loss.tau == 0.03
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    for bad in ("train.max_steps=1.5e0", "train.max_steps=inf", "train.max_steps=abc"):
        with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
            cli._load("smoke", cli.parse_overrides([bad]))


@pytest.mark.parametrize("override, message", [
    ("train.precision=bf16mixed", "train.precision='bf16mixed' is not a Lightning precision"),
    ("train.strategy=dpp", "train.strategy='dpp' is not a Lightning strategy"),
    ("train.strategy=FSDP", "train.strategy='FSDP' is not a Lightning strategy"),
    ("train.accelerator=gpux", "train.accelerator='gpux' is not a Lightning accelerator"),
    ("train.devices=1.5", "train.devices must be an integer >= 1, -1, 'auto' or a list of device ids"),
])
def test_misspelt_trainer_settings_exit_2_before_loading_data(tmp_path, capsys, monkeypatch, override, message):
    """L.Trainer rejected them with a traceback (exit 1) once the data were loaded and the model was built."""
    monkeypatch.setattr("metaembed.training.train", _no_work)
    monkeypatch.setattr(pipeline, "load_benchmark", _no_work)
    for argv in (["train", "--config", "smoke", "--output", str(tmp_path / "run"), "--set", override],
                 ["quickstart", "--config", "smoke", "--output", str(tmp_path / "q"), "--set", override]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("metaembed: error:") and message in err and "Traceback" not in err
    with pytest.raises(ConfigError, match=override.split("=")[0]):  # the library entry point too
        cfg = load_config(resolve_config("smoke"), cli.parse_overrides([override]))
        pipeline.train_and_evaluate(cfg, tmp_path / "run", benchmark=object())


def test_packaged_configs_resolve_by_name_and_are_valid():
    assert {"quickstart", "smoke"} <= set(packaged_configs())
    assert resolve_config("quickstart") == CONFIG_DIR / "quickstart.yaml"
    assert resolve_config("smoke.yaml") == CONFIG_DIR / "smoke.yaml"
    for name in packaged_configs():
        load_config(resolve_config(name))  # validates (unknown keys, groups vs R_q/R_c)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config("no-such-config")


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "smoke", "--set", "train.bogus=1"], "unknown config key(s) train.bogus"),
    (["train", "--config", "no-such-config"], "config 'no-such-config' not found"),
    (["train", "--config", "smoke", "--set", "loss.groups=[[1,1],[8,16]]"], "exceeds the trained token counts"),
    (["train", "--config", "smoke", "--set", "train.max_steps"], "--set expects key.sub=value"),
    (["train", "--config", "smoke", "--resume", "missing.ckpt"], "checkpoint not found"),
    # a folder for --resume and a file for --backbone exist too, but failed only after the data loaded
    (["train", "--config", "smoke", "--resume", str(Path(__file__).parent)], "checkpoint not found"),
    (["train", "--config", "smoke", "--backbone", __file__], "checkpoint directory not found"),
    (["eval", "--model", "no/such/dir"], "directory not found"),
])
def test_config_errors_exit_2_without_traceback(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaembed: error:") and message in err and "Traceback" not in err


def test_resume_given_a_run_folder_names_the_checkpoint_file(tmp_path, capsys):
    """``--resume runs/sm`` said only "checkpoint not found" for a folder that exists (a walkthrough review)."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    for folder, hint in ((tmp_path / "run", f"did you mean --resume {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}?"),
                         (tmp_path / "run" / "checkpoints", f"did you mean --resume {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}?"),
                         (tmp_path, "is a folder, --resume takes a checkpoint file (DIR/checkpoints/last.ckpt)")):
        assert cli.main(["train", "--config", "smoke", "--resume", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "checkpoint not found" in err and hint in err, err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "eval", "quickstart", "flops", "bench", "train-bench", "reproduce"):
        assert name in out


def test_delegated_subcommands_are_lazy_and_fail_gracefully(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("fake_sub")
    fake.add_arguments = lambda p: p.add_argument("--n", type=int, default=1)
    fake.run = lambda args: seen.setdefault("n", args.n) and 0
    monkeypatch.setitem(sys.modules, "fake_sub", fake)
    monkeypatch.setitem(cli.SUBCOMMANDS, "flops", cli.Subcommand("fake", "fake_sub"))
    monkeypatch.setitem(cli.SUBCOMMANDS, "bench", cli.Subcommand("missing", "metaembed.no_such_module"))
    assert cli.main(["flops", "--n", "7"]) == 0 and seen == {"n": 7}
    assert cli.main(["bench", "--anything", "x"]) == 1
    assert "metaembed bench: unavailable" in capsys.readouterr().err
    assert cli.main(["flops"]) == 0  # a broken 'bench' does not affect other subcommands


def test_quickstart_subcommand_forwards_output_and_overrides(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "run_quickstart", lambda *a, **k: calls.append((a, k)) or pd.DataFrame())
    assert cli.main(["quickstart", "--output", str(tmp_path), "--set", "train.max_steps=2"]) == 0
    assert calls == [(("quickstart", str(tmp_path), {"train.max_steps": 2}), {})]


def test_train_resume_and_eval_with_the_real_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "smoke", "--output", str(out), "--set", "train.checkpoint_every_n_steps=1"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (out / "model" / "run_config.yaml").is_file()
    assert cli.main(["train", "--config", "smoke", "--output", str(out), "--resume", str(ckpt),
                     "--set", "train.max_steps=4"]) == 0
    assert "trained 1 step (steps 3 -> 4, resumed)" in capsys.readouterr().out  # this run's steps, not the total
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4

    js = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(out / "model"), "--budgets", "1,1 4,8", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "(1,1)" in printed and "(4,8)" in printed and "Overall" in printed
    rows = [r for r in json.loads(js.read_text()) if "summary" not in r]  # per-task rows, then summary records
    assert {(r["r_q"], r["r_c"]) for r in rows} == {(1, 1), (4, 8)}
    assert {r["metric"] for r in rows} == {"P@1", "NDCG@5"}


def test_quickstart_trains_mmr_and_nommr_and_writes_tables(tmp_path, capsys):
    tiny = dict(a.split("=", 1) for a in TINY[1::2])
    argv = ["quickstart", "--output", str(tmp_path)]
    for k, v in {**tiny, "train.max_steps": 2, "train.batch_size": 4, "train.val_fraction": 0.0,
                 "train.warmup_steps": 0, "train.val_check_interval": "null", "data.n_train": 16,
                 "data.n_eval_queries": 2, "data.n_candidates": 4,
                 "data.subsets": "[Cls-Object,Ret-T2I,Doc-Pages]"}.items():
        argv += ["--set", f"{k}={v}"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "MMR:" in printed and "NoMMR:" in printed and "NDCG@5" in printed
    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df["run"].unique()) == ["MMR", "NoMMR"]
    for _, part in df.groupby("run"):
        assert {(a, b) for a, b in zip(part["r_q"], part["r_c"])} == {(1, 1), (2, 4), (4, 8)}  # every budget
    assert (tmp_path / "results.json").is_file()
    assert (tmp_path / "budget_table_MMR.csv").is_file() and (tmp_path / "budget_table_NoMMR.csv").is_file()
    for run in ("MMR", "NoMMR"):
        cfg = load_config(tmp_path / run / "config.yaml")
        assert cfg.loss.mmr is (run == "MMR") and cfg.train.seed == 0 and cfg.train.max_steps == 2
        assert (tmp_path / run / "model").is_dir() and (tmp_path / run / "results.csv").is_file()


@pytest.mark.parametrize("module, name", [("efficiency", "flops"), ("bench", "bench"), ("train_bench", "train-bench")])
def test_python_dash_m_runs_the_same_subcommand(module, name):
    """``python -m metaembed.<module>`` (what experiments/gpu_check.sh runs) is ``metaembed <name>``."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", f"metaembed.{module}", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: metaembed {name}")
    if module == "efficiency":  # bad input: the subcommand's own message and exit status 2
        res = subprocess.run([sys.executable, "-m", "metaembed.efficiency", "--D", "8", "--N", "-1"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "N must be >= 0, got -1" in res.stderr


def test_eval_budgets_beyond_the_saved_model_exit_2(tmp_path, capsys):
    """--budgets larger than the model's R_q / R_c: a ConfigError after loading, not a traceback."""
    from metaembed.config import ModelConfig
    from metaembed.model import MetaEmbedModel

    model_dir = MetaEmbedModel.build(ModelConfig(tiny_size="xs", R_q=4, R_c=8)).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    argv = ["eval", "--model", str(model_dir), "--config", "smoke", "--budgets", "1,1 8,16"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "metaembed: error: --budgets" in err and "(8, 16) exceeds" in err and "R_q=4, R_c=8" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("yaml_text, overrides, message", [
    ("train:\n  max_steps: ten\n", None, "train.max_steps must be an integer, got str 'ten'"),
    ("train:\n  lr: fast\n", None, "train.lr must be a number, got str 'fast'"),
    ("train:\n  progress_bar: 'no'\n", None, "train.progress_bar must be true or false"),
    ("loss:\n  groups: [[1, 1], [2]]\n", None, "loss.groups[1] must have 2 entries"),
    ("data:\n  subsets: Ret-T2I\n", None, "data.subsets must be a list"),
    ("model:\n  tiny_size: xs\n", {"model.tiny_size.x": 1}, "cannot set model.tiny_size.x: model.tiny_size is str"),
    ("train: 3\n", {"train.max_steps": 2}, "cannot set train.max_steps: train is int 3, not a mapping"),
])
def test_load_config_rejects_mistyped_values_naming_the_key(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert message in str(info.value)
    if "tiny_size: xs" in yaml_text:  # a valid file: the override is to blame, not the file
        assert str(info.value).endswith(f"(an override / --set, applied to {path})")
    else:
        assert str(info.value).startswith(f"{path}: ")


def test_load_config_casts_values_to_the_field_types(tmp_path):
    path = tmp_path / "ok.yaml"
    # YAML 1.1 reads 1e-3 (no dot) as a string; an empty section is null
    path.write_text("model:\ntrain:\n  lr: 1e-3\n  max_steps: 4.0\n  devices: auto\n  gradient_clip_val: 1\n"
                    "loss:\n  groups: [[1, 1], [2, 4]]\n  tau: 3e-2\n  weights: [1, '0.5']\n"
                    "data:\n  subset_weights: {Ret-T2I: 2}\n")
    cfg = load_config(path, {"model.R_q": 4, "model.R_c": 8, "eval.budgets": [[1, 1]]})
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float
    assert cfg.train.max_steps == 4 and type(cfg.train.max_steps) is int
    assert cfg.train.devices == "auto" and type(cfg.train.gradient_clip_val) is float
    assert cfg.loss.groups == [(1, 1), (2, 4)] and cfg.loss.tau == 0.03 and cfg.loss.weights == [1.0, 0.5]
    assert cfg.data.subset_weights == {"Ret-T2I": 2.0} and cfg.eval.budgets == [(1, 1)]
    assert (cfg.model.R_q, cfg.model.R_c) == (4, 8)


def test_every_packaged_and_recipe_config_loads_with_typed_values():
    from metaembed.reproduce import find_root

    paths = [resolve_config(n) for n in packaged_configs()]
    recipes = find_root() / "experiments" / "configs"
    paths += sorted(recipes.glob("*.yaml")) if recipes.is_dir() else []
    for path in paths:
        cfg = load_config(path)
        assert type(cfg.train.lr) is float and type(cfg.train.max_steps) is int, path


def test_set_into_a_null_or_scalar_section(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\ntrain:\n  max_steps: 3\n")  # empty (null) model section
    assert load_config(path, {"model.tiny_size": "xs"}).model.tiny_size == "xs"
    assert cli.main(["train", "--config", str(path), "--set", "train.max_steps.x=1"]) == 2
    err = capsys.readouterr().err
    assert "cannot set train.max_steps.x: train.max_steps is int 3, not a mapping" in err and "Traceback" not in err
    assert cli._load(None, {"model": None, "model.R_c": 80}).model.R_c == 80  # no config file: overrides only
    with pytest.raises(ConfigError, match="cannot set train.max_steps: train is int 3"):
        cli._load(None, {"train": 3, "train.max_steps": 2})


def _no_work(*args, **kwargs):
    raise AssertionError("the command started working before rejecting its arguments")


def test_config_file_that_is_not_yaml_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    """A YAML syntax error or a binary file given as --config raised a raw yaml/Unicode traceback."""
    monkeypatch.setattr("metaembed.training.train", _no_work)
    (tmp_path / "bad.yaml").write_text("train:\n  max_steps: [1, 2\n")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    for argv, message in ((["train", "--config", str(tmp_path / "bad.yaml")], "bad.yaml: not valid YAML at line"),
                          (["quickstart", "--config", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "q")],
                           "bad.yaml: not valid YAML at line"),
                          (["train", "--config", str(tmp_path / "bin.yaml")], "bin.yaml: not a UTF-8 text file")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("metaembed: error:") and message in err and "Traceback" not in err


def test_unwritable_output_and_conflicting_data_flags_exit_2_before_training(tmp_path, capsys, monkeypatch):
    """--output naming a file (or a path below one) failed with NotADirectoryError after the model was
    built; --data with --set data.source=synthetic trained on synthetic data, ignoring --data."""
    monkeypatch.setattr("metaembed.training.train", _no_work)
    monkeypatch.setattr(pipeline, "run_quickstart", _no_work)
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, message in (
        (["train", "--config", "smoke", "--output", str(afile)], f"--output / train.output_dir: {afile} is not a dir"),
        (["train", "--config", "smoke", "--output", str(afile / "run")], f"{afile} is not a directory"),
        (["train", "--config", "smoke", "--set", f"train.output_dir={afile}"], "train.output_dir"),
        (["quickstart", "--output", str(afile / "q")], f"--output: cannot create {afile / 'q'}"),
        (["train", "--config", "smoke", "--data", str(tmp_path), "--set", "data.source=synthetic"],
         "--data reads MMEB-train, but --set data.source='synthetic'"),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("metaembed: error:") and message in err and "Traceback" not in err


def test_train_and_evaluate_rejects_what_would_fail_after_training(tmp_path, monkeypatch):
    """eval.budgets beyond (R_q, R_c), an empty eval.budgets, or a benchmark with nothing to evaluate
    (data.source=mmeb without eval_path / vidore_path) raised only once training was over."""
    from metaembed.data.records import Benchmark, Item, TrainExample

    monkeypatch.setattr("metaembed.training.train", _no_work)
    cfg = load_config(resolve_config("smoke"))  # R_q=4, R_c=8
    for budgets, message in (([[1, 1], [8, 16]], r"eval.budgets: budget \(8, 16\) exceeds"),
                             ([], "eval.budgets is empty")):
        cfg.eval.budgets = budgets
        with pytest.raises(ConfigError, match=message):
            pipeline.train_and_evaluate(cfg, tmp_path / "run")
    cfg.eval.budgets = None
    only_train = Benchmark(train=[TrainExample(Item("q"), Item("c"))])
    with pytest.raises(ConfigError, match="nothing to evaluate after training"):
        pipeline.train_and_evaluate(cfg, tmp_path / "run", only_train)


@pytest.mark.parametrize("overrides, message", [
    (["data.n_train=0"], "no training examples (data.n_train, data.max_train"),
    (["data.n_train=2"], "2 training examples cannot fill one global batch of train.batch_size=4 x world_size=1"),
])
def test_too_little_training_data_exits_2_without_traceback(tmp_path, capsys, monkeypatch, overrides, message):
    """An empty training set or one smaller than a batch raised a bare ValueError traceback from the data module."""
    from metaembed.model import MetaEmbedModel

    def no_model(*args, **kwargs):  # the check must come before minutes of loading a real backbone
        raise AssertionError("the backbone was built before the training data was checked")

    monkeypatch.setattr(MetaEmbedModel, "build", no_model)
    argv = ["train", "--config", "smoke", "--output", str(tmp_path / "run"), "--set", "model.tiny_size=xs"]
    assert cli.main(argv + [a for o in overrides for a in ("--set", o)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"metaembed: error: {message}")


def test_backbone_checkpoint_of_another_family_exits_2(tmp_path, capsys):
    """--backbone pointing at a PaliGemma folder while model.backbone is the default Qwen family is a clear
    error (exit 2), not a traceback (and never a randomly initialised model)."""
    ckpt = tmp_path / "paligemma"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "paligemma"}')
    argv = ["train", "--config", "smoke", "--backbone", str(ckpt), "--output", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model_type 'paligemma' is not a" in err.strip().splitlines()[-1]


def test_misspelt_model_settings_and_a_missing_backbone_exit_2_before_loading_data(tmp_path, capsys, monkeypatch):
    """model.backbone / dtype / tiny_size typos failed in the model build with a ValueError traceback (exit 1),
    and a missing --backbone directory was found only after the whole training set had been loaded."""
    monkeypatch.setattr("metaembed.training.train", _no_work)
    monkeypatch.setattr(pipeline, "load_benchmark", _no_work)
    out = str(tmp_path / "run")
    for extra, message in ((["--set", "model.backbone=qwen2.5_vl"], "model.backbone='qwen2.5_vl'; expected one of"),
                           (["--set", "model.dtype=bf16-mixed"], "model.dtype='bf16-mixed'; expected one of"),
                           (["--set", "model.tiny_size=xl"], "model.tiny_size='xl'; the tiny qwen2_5_vl sizes"),
                           (["--backbone", str(tmp_path / "nope")],
                            f"--backbone / model.backbone_path: checkpoint directory not found: {tmp_path / 'nope'}")):
        assert cli.main(["train", "--config", "smoke", "--output", out, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("metaembed: error:") and message in err and "Traceback" not in err


def test_set_values_are_read_as_yaml_1_2():
    """--set train.seed=010 became 8 (YAML 1.1 octal), name=1:30 became '90' (base 60), name=yes became 'True'."""
    got = cli.parse_overrides(["train.seed=010", "name=1:30", "a=yes", "b=off", "c=2024-05-01", "d=0o10"])
    assert got == {"train.seed": 10, "name": "1:30", "a": "yes", "b": "off", "c": "2024-05-01", "d": 8}
    cfg = cli._load("smoke", cli.parse_overrides(["train.seed=010", "name=yes", "train.output_dir=1:30"]))
    assert (cfg.train.seed, cfg.name, cfg.train.output_dir) == (10, "yes", "1:30")


def test_output_flag_wins_over_set_train_output_dir(monkeypatch, tmp_path):
    """--output is documented as setting train.output_dir: it overrides a --set train.output_dir given with it."""
    import metaembed.training as training

    seen = []
    trainer = types.SimpleNamespace(is_global_zero=True, global_step=0)
    monkeypatch.setattr(training, "train", lambda config, ckpt_path=None: seen.append(config.train.output_dir)
                        or (None, trainer))
    out, other = str(tmp_path / "out"), str(tmp_path / "other")
    assert cli.main(["train", "--config", "smoke", "--set", f"train.output_dir={other}", "--output", out]) == 0
    assert cli.main(["train", "--config", "smoke", "--output", out, "--set", f"train.output_dir={other}"]) == 0
    assert cli.main(["train", "--config", "smoke", "--set", f"train.output_dir={other}"]) == 0
    assert seen == [out, out, other]


def test_train_flags_survive_a_section_set_and_the_section_is_merged(monkeypatch, tmp_path):
    """--set 'train={max_steps: 2}' replaced the whole train section (lr, val_fraction ... back to their defaults)
    and, the --output key sitting before it, dropped --output too: the run wrote to runs/default, exit 0."""
    import metaembed.training as training

    seen = []
    trainer = types.SimpleNamespace(is_global_zero=True, global_step=0)
    monkeypatch.setattr(training, "train", lambda config, ckpt_path=None: seen.append(config) or (None, trainer))
    out = str(tmp_path / "out")
    smoke = cli._load("smoke", {})
    assert cli.main(["train", "--config", "smoke", "--set", f"train.output_dir={tmp_path / 'x'}",
                     "--set", "train={max_steps: 2, batch_size: 4}", "--output", out]) == 0
    t = seen[0].train
    assert (t.output_dir, t.max_steps, t.batch_size) == (out, 2, 4)
    assert (t.lr, t.val_fraction, t.progress_bar) == (smoke.train.lr, smoke.train.val_fraction, smoke.train.progress_bar)


def test_train_refuses_eval_budgets_the_model_cannot_score(monkeypatch, tmp_path, capsys):
    """eval.budgets beyond (R_q, R_c) trained and were saved with the model; every plain `metaembed eval` of it then
    failed.  Also: accelerator gpu on a machine without one fails before any data or model is built."""
    monkeypatch.setattr("metaembed.training.train", lambda *a, **k: pytest.fail("trained"))
    argv = ["train", "--config", "smoke", "--output", str(tmp_path / "o")]
    assert cli.main([*argv, "--set", "model.R_q=4", "--set", "model.R_c=8", "--set", "eval.budgets=[[16, 64]]"]) == 2
    assert "budget (16, 64) exceeds the trained token counts R_q=4, R_c=8" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main([*argv, "--set", "train.accelerator=gpu"]) == 2
        assert "train.accelerator='gpu' but this machine has no such device" in capsys.readouterr().err


def test_parser_rejects_unknown_arguments_and_a_missing_subcommand(capsys, monkeypatch):
    """An unknown flag of a subcommand that loaded is a usage error (exit 2), as is no subcommand at all."""
    from metaembed import pipeline

    monkeypatch.setattr(pipeline, "run_quickstart", _no_work)
    with pytest.raises(SystemExit) as e:
        cli.main(["quickstart", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in err
    assert err.startswith("usage: metaembed quickstart [-h]")  # the subcommand's usage, not the top-level one
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "required: COMMAND" in capsys.readouterr().err


def test_interrupt_exits_130(monkeypatch, capsys, tmp_path):
    """Ctrl-C during a run prints one line and exits with the shell's 128 + SIGINT, not a traceback."""
    from metaembed import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_quickstart", interrupted)
    assert cli.main(["quickstart", "--output", str(tmp_path / "run")]) == 130
    assert "metaembed: interrupted" in capsys.readouterr().err


def test_sigterm_exits_143(monkeypatch, capsys, tmp_path):
    """Lightning turns SIGTERM (preemption, kill) into a SystemExit without a code: train exited 0, so
    `metaembed train ... && metaembed eval ...` went on without a model (a review helper)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from metaembed import pipeline

    def terminated(*args, **kwargs):
        raise SIGTERMException

    monkeypatch.setattr(pipeline, "run_quickstart", terminated)
    assert cli.main(["quickstart", "--output", str(tmp_path / "run")]) == 143
    assert "metaembed: terminated (SIGTERM)" in capsys.readouterr().err


def test_sigterm_during_train_names_the_checkpoint_to_resume_from(monkeypatch, capsys, tmp_path):
    """The message named <output>/checkpoints/last.ckpt also when no checkpoint had been written (no
    train.checkpoint_every_n_steps, no validation yet; newcomer review): it names the newest one, or says none."""
    import metaembed.training as training
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    out = tmp_path / "run"
    written: list[str] = []

    def terminated(config, ckpt_path=None):
        for i, name in enumerate(written):
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            (out / "checkpoints" / name).write_bytes(b"x")
            os.utime(out / "checkpoints" / name, ns=(10**9 * (i + 1),) * 2)
        raise SIGTERMException

    monkeypatch.setattr(training, "train", terminated)
    assert cli.main(["train", "--config", "smoke", "--output", str(out)]) == 143
    err = capsys.readouterr().err
    assert f"no checkpoint was written in {out / 'checkpoints'}" in err and "last.ckpt every n" in err
    written[:] = ["last.ckpt", "best-step4.ckpt"]  # the best, written at a later validation, is the newest
    assert cli.main(["train", "--config", "smoke", "--output", str(out)]) == 143
    assert f"--resume {out / 'checkpoints' / 'best-step4.ckpt'}" in capsys.readouterr().err


def test_only_the_named_subcommand_gets_its_arguments(monkeypatch):
    """build_parser loads (imports) the subcommand named in argv only, also after a leading option; the others
    get a bare parser. The quickstart --output default is runs/quickstart."""
    calls = []

    def add_arguments(p):
        calls.append("loaded")
        p.add_argument("--flag")

    cmds = {**cli.SUBCOMMANDS, "other": cli.Subcommand("x", None, add_arguments, lambda args: 0)}
    monkeypatch.setattr(cli, "SUBCOMMANDS", cmds)
    args, extra = cli.build_parser(["--x", "quickstart"]).parse_known_args(["--x", "quickstart"])
    assert calls == [] and extra == ["--x"] and args.output == "runs/quickstart"
    args = cli.build_parser(["other", "--flag", "1"]).parse_args(["other", "--flag", "1"])
    assert calls == ["loaded"] and args.flag == "1"


def test_a_whole_section_given_as_a_mapping_is_checked_like_its_dotted_keys(monkeypatch, capsys, tmp_path):
    """--set 'loss={mmr: false}' passed quickstart's refusal of --set loss.mmr=false (its run then trained MMR
    anyway), and a notebook's overrides={'train': {'lr': ...}} passed the refusal of a parameter's key (a review
    helper)."""
    from metaembed import ablations
    from metaembed.config import ConfigError

    assert cli.parse_overrides(["loss={mmr: false, tau: 0.1}", "train.lr=0.001"]) == {
        "loss.mmr": False, "loss.tau": 0.1, "train.lr": 1e-3}
    assert cli.parse_overrides(["data.subset_weights={A: 2}"]) == {"data.subset_weights": {"A": 2}}  # a field
    assert cli.main(["quickstart", "--config", "smoke", "--output", str(tmp_path / "qs"),
                     "--set", "loss={mmr: false}"]) == 2
    assert "quickstart sets loss.mmr itself" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.lr is set by the notebook parameter 'lr'"):
        ablations.config_from_params(lr=2e-3, overrides={"train": {"lr": 1e-5}})


def test_json_paths_of_the_benchmarks_are_checked_before_any_work(tmp_path, capsys):
    """flops printed its table and bench / train-bench ran before "[Errno 21] Is a directory" (no flag named);
    eval checked its --json first (a review helper)."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv in (["flops"], ["bench", "--device", "cpu", "--N", "64", "--D", "16", "--runs", "1", "--warmup", "0"],
                 ["train-bench"]):
        for path, message in ((tmp_path, f"--json: {tmp_path} is a directory"),
                              (afile / "x.json", f"--json: cannot create {afile / 'x.json'}: {afile} is not a "
                                                 "directory")):
            assert cli.main([*argv, "--json", str(path)]) == 2, argv
            out, err = capsys.readouterr()
            assert out == "" and err.strip().splitlines()[-1] == f"metaembed: error: {message}", (argv, out, err)


def test_set_value_may_hold_an_equals_sign():
    """Only the first ``=`` separates the key: an instruction or a name holding ``=`` keeps it."""
    got = cli.parse_overrides(["data.vidore_page_instruction=A page (lang=en).", "name=a=b"])
    assert got == {"data.vidore_page_instruction": "A page (lang=en).", "name": "a=b"}


@pytest.mark.parametrize("flag", ["--backbone", "--data", "--output", "--resume"])
def test_train_refuses_an_empty_flag_value(flag, monkeypatch, capsys):
    """``--backbone "$CKPT"`` with CKPT unset: an empty --backbone / --data / --output was read as not given, so
    a recipe trained a tiny random model (or the synthetic data, or into the config's folder) and exited 0."""
    monkeypatch.setattr("metaembed.training.train", lambda *a, **kw: pytest.fail("trained"))
    for empty in ("", " "):
        assert cli.main(["train", "--config", "smoke", flag, empty]) == 2
        assert f"metaembed: error: {flag} is empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["quickstart", "--output", ""],  # trained into the working directory
    ["train-bench", "--backbone", "tiny-s", "--backbone-path", ""],
    ["train-bench", "--batches", "8", ""],
    ["bench", "--json", ""],
    ["flops", "--json", " "],
    ["reproduce", "--root", ""],
    ["train", "--config", "smoke", "--set", ""],
])
def test_every_subcommand_refuses_an_empty_flag_value(argv, monkeypatch, capsys):
    """The check sits in ``main`` for every subcommand's flags (also other modules' parsers, and list flags):
    nothing runs."""
    import metaembed.pipeline as pipeline
    monkeypatch.setattr(pipeline, "run_quickstart", lambda *a, **kw: pytest.fail("ran"))
    monkeypatch.setattr("metaembed.training.train", lambda *a, **kw: pytest.fail("trained"))
    for module in ("bench", "efficiency", "reproduce", "train_bench"):
        monkeypatch.setattr(f"metaembed.{module}.run", lambda *a, **kw: pytest.fail("ran"))
    assert cli.main(argv) == 2
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"metaembed: error: {flag} is empty")
