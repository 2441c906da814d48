"""Run configuration: field validation, YAML round trip, the packaged configs and the paper's defaults."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from metaembed.config import (
    DEFAULT_GROUPS,
    ConfigError,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = sorted((ROOT / "lib" / "metaembed" / "configs").glob("*.yaml"))
PAPER = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))


def test_defaults_are_the_papers_hyper_parameters():
    """§4.1: LoRA r = alpha = 32, G = 5 groups up to (R_q, R_c) = (16, 64), w_g = 1, tau = 0.03; Table 4: lr 1e-4;
    Appendix A: 1% of the training data held out."""
    cfg = RunConfig().validate()
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.R_q, cfg.model.R_c) == (32, 32, 16, 64)
    assert cfg.loss.active_groups() == [tuple(g) for g in DEFAULT_GROUPS] == [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]
    assert cfg.loss.active_weights() == [1.0] * 5 and cfg.loss.tau == 0.03
    assert cfg.train.lr == 1e-4 and cfg.train.val_fraction == 0.01


@pytest.mark.parametrize("path", PACKAGED + PAPER, ids=lambda p: p.name)
def test_configs_load_and_round_trip_through_yaml(path, tmp_path):
    """config_to_yaml -> load_config gives an equal config (tuples written as lists come back as tuples)."""
    from metaembed.training import config_to_yaml

    cfg = load_config(path)
    out = tmp_path / "c.yaml"
    out.write_text(config_to_yaml(cfg))
    assert load_config(out) == cfg


def test_non_default_config_round_trips(tmp_path):
    from metaembed.training import config_to_yaml

    cfg = config_from_dict({
        "name": "09", "model": {"R_q": 4, "R_c": 8, "lora": True, "lora_dropout": 0.05, "image_size": 112},
        "loss": {"groups": [[1, 1], [4, 8]], "weights": [0.5, 2], "query_chunk_size": 16},
        "train": {"lr": "1e-5", "devices": "auto", "gradient_clip_val": None, "lr_schedule": "cosine",
                  "warmup_steps": 3, "max_steps": 10},
        "data": {"subset_weights": {"A": 1, "0o17": 0.25}, "subsets": ["A", "0o17"]},
        "eval": {"budgets": [[1, 1], [4, 8]], "ndcg_k": 10},
    })  # "09" and "0o17" are strings that a plain yaml.safe_dump writes unquoted and YAML 1.2 reads as numbers
    out = tmp_path / "c.yaml"
    out.write_text(config_to_yaml(cfg))
    back = load_config(out)
    assert back == cfg and back.eval.budgets == [(1, 1), (4, 8)] and back.train.lr == 1e-5


@pytest.mark.parametrize("key, value", [
    ("eval.batch_size", 0), ("eval.batch_size", -1), ("eval.ndcg_k", 0), ("eval.batch_size", True),
])
def test_eval_settings_are_rejected_at_load_not_after_training(key, value):
    """evaluate() rejects them too, but only after the whole training run (train_and_evaluate)."""
    with pytest.raises(ConfigError, match=key):
        config_from_dict(apply_overrides({}, {key: value}))
    with pytest.raises(ConfigError, match=key):
        RunConfig(eval=EvalConfig(**{key.split(".")[1]: value})).validate()


@pytest.mark.parametrize("key, value", [
    ("lora_alpha", 0), ("lora_alpha", -3), ("lora_dropout", 1.0), ("lora_dropout", 1.5), ("lora_dropout", -0.1),
    ("lora_dropout", math.nan), ("lora_r", 0), ("lora_target_modules", []),
])
def test_lora_settings_that_train_no_lora_weight_are_rejected(key, value):
    """alpha 0 scales the LoRA update (alpha / r) B A x to 0 and dropout 1 zeroes its input: every LoRA gradient is
    0 and training silently updates the Meta Tokens alone; r 0 and no target module fail inside peft unnamed."""
    with pytest.raises(ConfigError, match=f"model.{key}"):
        config_from_dict({"model": {key: value}})
    with pytest.raises(ConfigError, match=f"model.{key}"):
        ModelConfig(**{key: value}).validate()


@pytest.mark.parametrize("key", ["R_q", "R_c", "max_text_length", "image_size", "lora_r"])
def test_model_counts_must_be_at_least_one(key):
    """0 Meta Tokens, a 0-token text limit (every word dropped) or 0-pixel images build nothing usable; 1 is fine."""
    with pytest.raises(ConfigError, match=f"model.{key} must be >= 1, got 0"):
        config_from_dict({"model": {key: 0}, "loss": {"groups": [[1, 1]]}})
    config_from_dict({"model": {key: 1}, "loss": {"groups": [[1, 1]]}})


def test_model_image_size_is_bounded():
    """model.image_size=2**64 passed validate and failed in PIL's resize at the first batch (OverflowError; 2**20 asks
    for terabytes); a side up to MAX_IMAGE_SIDE is accepted."""
    from metaembed.config import MAX_IMAGE_SIDE

    for side in (MAX_IMAGE_SIDE + 1, 2**64):
        with pytest.raises(ConfigError, match=f"model.image_size={side} is larger than any image .* at most 32768"):
            config_from_dict({"model": {"image_size": side}, "loss": {"groups": [[1, 1]]}})
    assert config_from_dict({"model": {"image_size": MAX_IMAGE_SIDE}, "loss": {"groups": [[1, 1]]}}).model.image_size \
        == MAX_IMAGE_SIDE


@pytest.mark.parametrize("key, value", [("R_q", True), ("R_c", 2.0), ("max_text_length", "8"), ("image_size", False),
                                        ("lora_r", True)])
def test_model_counts_built_in_code_must_be_ints(key, value):
    """YAML values are cast by config_from_dict; a ModelConfig built in code gets the same check (True is not 1)."""
    with pytest.raises(ConfigError, match=f"model.{key}"):
        ModelConfig(**{key: value}).validate()


@pytest.mark.parametrize("key, value, want", [
    ("train.lr", "1e-3", 1e-3), ("train.batch_size", 4.0, 4), ("train.devices", "auto", "auto"), ("train.devices", 2, 2),
    ("model.lora", None, None), ("name", 3, "3"), ("loss.groups", [[1, 1.0], [2, 4]], [(1, 1), (2, 4)]),
])
def test_overrides_are_cast_to_the_field_types(key, value, want):
    cfg = config_from_dict(apply_overrides({}, {key: value}))
    section, _, field = key.partition(".")
    got = getattr(getattr(cfg, section), field) if field else getattr(cfg, section)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("key, value, match", [
    ("train.batch_size", 4.5, "train.batch_size"), ("train.lr", True, "train.lr"), ("loss.mmr", 1, "loss.mmr"),
    ("model.R_q", True, "model.R_q"), ("train.max_stepz", 3, "train.max_stepz"), ("name.x", 1, "name"),
    ("loss.tau", "nan", "loss.tau"), ("name", None, "name"),
])
def test_bad_values_and_unknown_keys_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(apply_overrides({}, {key: value}))


@pytest.mark.parametrize("key, value", [
    ("source", "mmbe"), ("negatives", "lists"), ("negative_choice", "last"), ("max_eval_queries", 0),
    ("max_train", -1), ("subset_weights", {"A": -1}),
    # passed, and failed in make_benchmark naming n_candidates=, not the key (a fuzzing helper)
    ("n_candidates", -7), ("n_candidates", 9), ("image_size", 0), ("image_size", 57),
])
def test_data_section_is_validated_with_the_run_config(key, value):
    """RunConfig.validate skipped data: a misspelt data.source passed every config check, so `metaembed eval`
    loaded the whole model before load_benchmark rejected it."""
    with pytest.raises(ConfigError, match=f"data.{key}"):
        config_from_dict({"data": {key: value}})


def test_integral_number_strings_are_ints_and_devices_strings_are_checked(tmp_path):
    """YAML 1.1 reads 1e3 as a string (1.0e3 as a float, accepted); train.devices '1.5' reached L.Trainer."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 1e3\n  devices: '0,1'\n")
    cfg = load_config(path)
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int and cfg.train.devices == "0,1"
    assert config_from_dict({"train": {"devices": "auto"}}).train.devices == "auto"
    assert config_from_dict({"train": {"devices": "2"}}).train.devices == 2
    for bad in ("1.5", "all", "cuda:0"):
        with pytest.raises(ConfigError, match="train.devices"):
            config_from_dict({"train": {"devices": bad}})
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        config_from_dict({"train": {"max_steps": "1.5e0"}})


def test_check_trainer_settings_knows_lightnings_names():
    from metaembed.config import TrainConfig, check_trainer_settings

    for ok in ({}, {"precision": "bf16-mixed"}, {"precision": "16"}, {"strategy": "fsdp"}, {"strategy": "ddp"},
               {"accelerator": "gpu"}, {"accelerator": "cuda"}):
        check_trainer_settings(TrainConfig(**ok), here=False)
    for path in PACKAGED + PAPER:  # every shipped recipe (bf16-mixed, ddp / fsdp, gpu)
        check_trainer_settings(load_config(path).train, here=False)
    for key, bad in (("precision", "bf16"[::-1]), ("precision", "fp16"), ("strategy", "DDP"), ("accelerator", "GPU")):
        with pytest.raises(ConfigError, match=f"train.{key}={bad!r} is not a Lightning {key}"):
            check_trainer_settings(TrainConfig(**{key: bad}))


def test_unknown_keys_of_mixed_types_are_named(tmp_path):
    """An int key next to a misspelt one crashed the sort of the unknown keys (TypeError, exit 1)."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 3\n  1: 2\n  maxsteps: 3\n")
    with pytest.raises(ConfigError, match="unknown config key.*train.1, train.maxsteps"):
        load_config(path)


def test_a_section_given_as_a_mapping_is_merged_and_a_mapping_field_replaced():
    """train={max_steps: 2} replaced the section: its other keys fell back to the defaults without a word."""
    data = {"train": {"lr": 1e-3, "max_steps": 9}, "data": {"subset_weights": {"A": 1.0, "B": 2.0}, "seed": 1}}
    apply_overrides(data, {"train": {"max_steps": 2}, "data.subset_weights": {"A": 3.0}})
    assert data == {"train": {"lr": 1e-3, "max_steps": 2}, "data": {"subset_weights": {"A": 3.0}, "seed": 1}}
    # one level: a mapping field inside a section given whole is replaced too, and its keys are taken literally
    apply_overrides(data, {"data": {"subset_weights": {"C": 2.0, "v1.5": 1.0}}})
    assert data["data"] == {"subset_weights": {"C": 2.0, "v1.5": 1.0}, "seed": 1}
    assert config_from_dict(apply_overrides({}, {"train": {"max_steps": 2}})).train.max_steps == 2


def test_check_accelerator_available():
    from metaembed.config import TrainConfig, check_accelerator_available

    for ok in ("auto", "cpu"):
        check_accelerator_available(TrainConfig(accelerator=ok))
    if not torch.cuda.is_available():
        for name in ("gpu", "cuda"):
            with pytest.raises(ConfigError, match=f"train.accelerator='{name}' but this machine has no such device"):
                check_accelerator_available(TrainConfig(accelerator=name))


def test_a_key_given_twice_in_a_config_file_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``max_steps:`` silently replaced the first."""
    from metaembed.pipeline import read_config

    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  max_steps: 800\n  batch_size: 32\n  max_steps: 8\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: not valid YAML at line 4.*duplicate key 'max_steps' "
                                          r"\(first given on line 2\)"):
        read_config(path)
    path.write_text("train:\n  <<: {max_steps: 800}\n  max_steps: 8\n")  # a merged key may be overridden
    assert read_config(path).train.max_steps == 8


@pytest.mark.parametrize("model, match", [
    ({"backbone": "qwen25_vl"}, "model.backbone='qwen25_vl'"), ({"dtype": "bfloat"}, "model.dtype='bfloat'"),
    ({"tiny_size": "xxs"}, "model.tiny_size='xxs'"), ({"backbone": "mllama", "tiny_size": "l"}, "tiny mllama sizes"),
    ({"pooling": "multi"}, "model.pooling='multi'; expected one of"), ({"layout": "roles"}, "model.layout='roles'"),
])
def test_misspelt_backbone_dtype_or_tiny_size_is_a_config_error(model, match):
    """A misspelt model.backbone / dtype / tiny_size passed every config check: the run loaded its data and
    then failed in the model build with a ValueError traceback (exit status 1)."""
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": model})
    if "tiny_size" in model:  # only a tiny random model (no checkpoint) reads it
        config_from_dict({"model": {**model, "backbone_path": "/ckpt"}})


def test_config_backbone_names_match_the_backbones():
    """config.TINY_SIZES / DTYPES (checked without importing transformers) mirror the backbone adapters."""
    import torch

    from metaembed import backbones
    from metaembed.config import DTYPES, TINY_SIZES

    assert set(TINY_SIZES) == set(backbones.BACKBONES)
    sizes = {family: cls.tiny_sizes for family, cls in backbones.BACKBONES.items()}
    assert all(sizes.values()) and {k: set(v) for k, v in TINY_SIZES.items()} == {k: set(v) for k, v in sizes.items()}
    assert all(isinstance(backbones._to_dtype(d), torch.dtype) for d in DTYPES)


@pytest.mark.parametrize("loss", [
    {"mmr": False, "groups": [[4, 8], [2, 4], [16, 64]]},  # not nested
    {"mmr": False, "groups": [[32, 128], [16, 64]]},  # beyond (R_q, R_c): silently dropped from the eval budgets
])
def test_nommr_groups_are_checked_like_mmr_groups(loss):
    """mmr=False validated only the last group, though every group is a default eval budget (eval_budgets)."""
    with pytest.raises(ConfigError, match="loss.groups"):
        config_from_dict({"loss": loss})


def test_training_that_would_never_stop_is_rejected():
    """max_steps=-1 with the default max_epochs=-1 (Lightning: infinite) trained until killed."""
    with pytest.raises(ConfigError, match="would never stop"):
        config_from_dict({"train": {"max_steps": -1}})
    with pytest.raises(ConfigError, match="would never stop"):  # early stopping without a validation split
        config_from_dict({"train": {"max_steps": -1, "early_stopping_patience": 3, "val_fraction": 0.0}})
    config_from_dict({"train": {"max_steps": -1, "max_epochs": 2}})
    config_from_dict({"train": {"max_steps": -1, "early_stopping_patience": 3}})


def test_config_files_and_set_values_read_plain_scalars_as_yaml_1_2(tmp_path):
    """PyYAML's YAML 1.1 rules read ``seed: 010`` as 8 (octal), ``1:30`` as 90 (base 60), ``yes`` / ``off`` as
    bools and ``2024-05-01`` as a date (then rejected for a string field); --set and files read alike."""
    from metaembed.cli import parse_overrides
    from metaembed.config import read_yaml

    assert read_yaml("a: 010\nb: 1:30\nc: yes\nd: off\ne: 2024-05-01\nf: 0o17\ng: 0x1f\nh: 1.5\ni: True\nj: ~") == {
        "a": 10, "b": "1:30", "c": "yes", "d": "off", "e": "2024-05-01", "f": 15, "g": 31, "h": 1.5, "i": True,
        "j": None}
    path = tmp_path / "c.yaml"
    path.write_text("name: 2024-05-01\ntrain:\n  seed: 010\n  output_dir: runs/1:30\n")
    cfg = load_config(path, parse_overrides(["data.seed=007", "eval.cache_dir=yes"]))
    assert (cfg.name, cfg.train.seed, cfg.train.output_dir) == ("2024-05-01", 10, "runs/1:30")
    assert (cfg.data.seed, cfg.eval.cache_dir) == (7, "yes")
    with pytest.raises(ConfigError, match="loss.mmr must be true or false, got str 'no'"):  # not silently False
        config_from_dict(apply_overrides({}, parse_overrides(["loss.mmr=no"])))


def test_set_errors_name_builtin_types_and_explain_tuple_pairs():
    """A number typed on --set was reported as "_IntWithText 0" (the wrapper that keeps its spelling), and
    [(1,1),(2,4)], the notation of budgets everywhere, as "str '(1'" with no word on the list form."""
    from metaembed.cli import parse_overrides

    for item, want in (("loss.mmr=0", "loss.mmr must be true or false, got int 0"),
                       ("train.max_steps=10.5", "train.max_steps must be an integer, got float 10.5"),
                       ("eval.budgets=[(1,1),(2,4)]", "eval.budgets[0] must be a list (tuple[int, int]), got str "
                                                      "'(1'; write each pair as a list [r_q, r_c]: [[1,1],[2,4]]"),
                       # one pair where a list of pairs is expected: the string and the flat list
                       ("eval.budgets=1,1", "eval.budgets must be a list (list[tuple[int, int]]), got str '1,1'; "
                                            "write a list of [r_q, r_c] pairs: [[1,1]] or [[1,1],[2,4]]"),
                       ("loss.groups=[2,4]", "loss.groups must be a list of [r_q, r_c] pairs, got the single pair "
                                             "[2,4]; write [[2,4]]")):
        with pytest.raises(ConfigError, match=re.escape(want)):
            config_from_dict(apply_overrides({}, parse_overrides([item])))


def test_dump_yaml_quotes_strings_either_yaml_version_would_misread():
    """A string such as '09' or '0o17' (plain in PyYAML's output: YAML 1.1 strings) must read back a string."""
    import yaml
    from metaembed.config import dump_yaml, read_yaml

    data = {"a": "09", "b": "0o17", "c": "yes", "d": "1:30", "e": "010", "f": "2024-05-01", "g": 1e-5, "h": 10,
            "i": True, "j": None, "k": "1e3", "l": [1.5, "true"]}
    text = dump_yaml(data)
    assert read_yaml(text) == data and yaml.safe_load(text) == data


def test_documented_defaults():
    """Defaults every run that leaves the key out gets (the field comments and docstrings): the paper's input layout
    [v; t; M_q; M_c] (§3.2), no LoRA dropout and weight decay, in-batch plus hard negatives (Eq. 6), a clip of 1.0,
    NDCG@5 (ViDoRe's metric) with ties counted as VLM2Vec's argmax does, MMEB's 'original' split with image checks."""
    cfg = RunConfig().validate()
    m, loss, t, d, e = cfg.model, cfg.loss, cfg.train, cfg.data, cfg.eval
    assert (m.backbone, m.tiny_size, m.pooling, m.layout, m.dtype) == ("qwen2_5_vl", "s", "meta", "both", "float32")
    assert (m.max_text_length, m.lora_dropout, m.lora, m.image_size) == (256, 0.0, None, None)
    assert (loss.mmr, loss.use_hard_negatives, loss.mask_duplicate_candidates, loss.weights) == (True, True, False, None)
    assert (t.weight_decay, t.warmup_steps, t.gradient_clip_val, t.lr_schedule) == (0.0, 0, 1.0, "constant")
    assert (t.gather_across_ranks, t.placeholder_image, t.max_epochs, t.precision) == (True, False, -1, "32-true")
    assert (d.source, d.split, d.negatives, d.negative_choice, d.check_images, d.skip_missing) == (
        "synthetic", "original", "auto", "first", True, False)
    assert (d.n_candidates, d.image_size) == (8, 56)
    assert (e.budgets, e.batch_size, e.ndcg_k, e.ties) == (None, 32, 5, "first")


def test_nommr_trains_the_largest_group_with_its_weight():
    """NoMMR (mmr=False, the Fig. 4b ablation) trains only the last, largest group (R_q, R_c) with its w_g; a weight
    list of another length than the groups is an error, not a silent zip."""
    from metaembed.config import LossConfig

    loss = LossConfig(mmr=False, weights=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert loss.active_groups() == [(16, 64)] and loss.active_weights() == [5.0]
    assert LossConfig(mmr=False).active_weights() == [1.0]
    assert LossConfig(weights=[1.0, 2.0, 3.0, 4.0, 5.0]).active_weights() == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ConfigError, match="loss.weights has 2 entries for 5 groups"):
        LossConfig(weights=[1.0, 2.0]).active_weights()


@pytest.mark.parametrize("key", ["loss.tau", "loss.query_chunk_size", "train.batch_size", "train.num_nodes",
                                 "train.accumulate_grad_batches", "train.grad_cache_chunk_size", "eval.ndcg_k"])
def test_zero_where_a_positive_value_is_needed_names_the_key(key):
    """tau = 0 divides the similarities by 0 (Eq. 6); a 0 chunk, batch, node or accumulation count does no work."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(apply_overrides({}, {key: 0}))


def test_zero_is_accepted_where_it_means_something():
    """w_g = 0 switches one group off (Eq. 7: w_g >= 0, not all 0), lr 0 freezes the weights (a baseline), no warmup,
    no validation split, no clipping, early stopping at the first worse validation."""
    cfg = config_from_dict({"loss": {"weights": [0, 1, 1, 1, 1]},
                            "train": {"lr": 0, "warmup_steps": 0, "val_fraction": 0, "gradient_clip_val": 0,
                                      "early_stopping_patience": 0, "num_workers": 0, "seed": 0}})
    assert cfg.loss.active_weights() == [0.0, 1.0, 1.0, 1.0, 1.0] and cfg.train.lr == 0.0
    for section in ("train", "model", "data"):
        assert getattr(config_from_dict({section: {"seed": 2**32 - 1}}), section).seed == 2**32 - 1
        with pytest.raises(ConfigError, match=rf"{section}.seed must be <= 2\*\*32 - 1"):
            config_from_dict({section: {"seed": 2**32}})


@pytest.mark.parametrize("key, value, match", [
    ("train.warmup_steps", -1, "must be >= 0"), ("train.num_workers", -1, "must be >= 0"),
    ("train.log_every_n_steps", -1, "must be >= 0"), ("train.early_stopping_patience", -1, "must be >= 0"),
    ("train.seed", -1, "must be >= 0"), ("model.seed", -1, "must be >= 0"), ("data.seed", -1, "must be >= 0"),
    ("train.max_steps", 0, "must be >= 1 or -1"),
    ("train.max_epochs", 0, "must be >= 1 or -1"), ("train.max_steps", -2, "must be >= 1 or -1"),
    ("train.devices", 0, "must be >= 1 or -1"), ("train.devices", -2, "must be >= 1 or -1"),
    ("data.n_train", -1, "must be >= 0"), ("data.n_eval_queries", 0, "must be >= 1"),
    ("data.max_per_subset", -1, "must be >= 0"), ("data.max_train", -1, "must be >= 0"),
])
def test_counts_below_their_minimum_name_the_key(key, value, match):
    """A negative warmup, seed or worker count, 0 steps / epochs / devices (-1 is the only 'no limit') and 0 eval
    queries per task reached the trainer or the data generator, which failed late or read them silently."""
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} {match}"):
        config_from_dict(apply_overrides({}, {key: value}))


def test_zero_training_triples_are_accepted_for_evaluation_only_data():
    """data.n_train / max_train / max_per_subset 0 keep no training triple (an eval-only benchmark); -1 is the
    only 'no limit' count of train.max_steps / max_epochs / devices."""
    cfg = config_from_dict({"data": {"n_train": 0, "max_train": 0, "max_per_subset": 0},
                            "train": {"max_steps": -1, "max_epochs": 1, "devices": -1}})
    assert (cfg.data.n_train, cfg.data.max_train, cfg.data.max_per_subset) == (0, 0, 0)
    assert (cfg.train.max_steps, cfg.train.devices) == (-1, -1)


@pytest.mark.parametrize("key, value", [
    ("weight_decay", -0.1), ("weight_decay", math.nan), ("weight_decay", True), ("gradient_clip_val", -1.0),
    ("gradient_clip_val", math.inf), ("val_fraction", -0.1), ("val_fraction", math.nan), ("val_fraction", 1.0),
    ("val_fraction", 1.5), ("lr", True), ("lr", math.inf),
])
def test_train_numbers_out_of_range_or_not_numbers_are_rejected(key, value):
    """A negative weight decay or clip value, val_fraction 1 (nothing left to train on) and a bool lr (True is 1.0
    to Python) are config errors, also for a TrainConfig built in code (no YAML cast in between)."""
    with pytest.raises(ConfigError, match=f"train.{key}"):
        TrainConfig(**{key: value}).validate()
    if not isinstance(value, bool):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            config_from_dict({"train": {key: value}})


@pytest.mark.parametrize("train, match", [
    ({"lr_schedule": "linear"}, "train.lr_schedule='linear'; expected one of"),
    ({"lr_schedule": "cosine", "warmup_steps": 10, "max_steps": 10}, "needs train.max_steps > train.warmup_steps"),
    ({"lr_schedule": "cosine", "warmup_steps": 11, "max_steps": 10}, "needs train.max_steps > train.warmup_steps"),
])
def test_lr_schedule_is_checked_with_the_run_config(train, match):
    """An unknown schedule, or a cosine decay with no step after the warmup (max_steps <= warmup_steps), is
    rejected at load, not when the optimizer is configured after the model build."""
    from metaembed.config import check_lr_schedule

    with pytest.raises(ConfigError, match=match):
        config_from_dict({"train": train})
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        check_lr_schedule("cosine", None, 0)
    config_from_dict({"train": {"lr_schedule": "cosine", "warmup_steps": 9, "max_steps": 10}})


def test_unknown_tie_mode_is_rejected():
    """eval.ties decides how P@1 counts a tie (evaluation.precision_at_1): a misspelt mode is not a default."""
    with pytest.raises(ConfigError, match="eval.ties='best'; expected one of"):
        config_from_dict({"eval": {"ties": "best"}})
    assert config_from_dict({"eval": {"ties": "expected"}}).eval.ties == "expected"


def test_every_active_weight_zero_is_rejected():
    """Eq. 7 with every active w_g = 0 is a loss of 0: nothing trains (also NoMMR, whose only weight is the last)."""
    with pytest.raises(ConfigError, match="every active group weight is 0"):
        config_from_dict({"loss": {"weights": [0, 0, 0, 0, 0]}})
    with pytest.raises(ConfigError, match="every active group weight is 0"):
        config_from_dict({"loss": {"mmr": False, "weights": [1, 1, 1, 1, 0]}})


@pytest.mark.parametrize("pooling", ["single-last", "single-mean"])
def test_single_vector_poolings_have_one_vector_per_side(pooling):
    """The Table 5 single-vector baselines produce (1, 1) vectors, so a group beyond (1, 1) is a config error."""
    cfg = config_from_dict({"model": {"pooling": pooling}, "loss": {"groups": [[1, 1]]}})
    assert cfg.model_vector_counts() == (1, 1)
    with pytest.raises(ConfigError, match="loss.groups") as info:
        config_from_dict({"model": {"pooling": pooling}, "loss": {"groups": [[1, 1], [2, 4]]}})
    # the default groups with a single-vector pooling (--set model.pooling=single-last): say how to train it
    assert f"model.pooling={pooling!r} gives one vector per item" in str(info.value)
    assert "set loss.groups=[[1,1]] and loss.mmr=false" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"pooling": "meta", "R_q": 2, "R_c": 2}})
    assert "one vector per item" not in str(info.value)  # the hint is for the single-vector poolings only


def test_check_int():
    """Bools, floats and strings are TypeErrors, values below the minimum ValueErrors; the minimum itself is fine."""
    from metaembed.config import check_int

    assert check_int(0, "n") == 0 and check_int(3, "n", minimum=3) == 3
    for bad in (True, False, 1.0, "1"):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int(bad, "n")
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n", minimum=1)


def test_empty_sections_and_casts_of_nested_values():
    """An empty YAML section (``model:`` reads as null) is the defaults; dict keys and values and tuple items are
    cast to their hints (data.subset_weights: str -> float)."""
    from metaembed.config import _coerce

    cfg = config_from_dict({"model": None, "loss": None, "train": {"max_steps": 5}})
    assert cfg.model == ModelConfig() and cfg.train.max_steps == 5
    w = config_from_dict({"data": {"subset_weights": {17: "0.5", "B": 2}}}).data.subset_weights
    assert w == {"17": 0.5, "B": 2.0} and [type(v) for v in w.values()] == [float, float]
    assert list(w) == ["17", "B"]
    with pytest.raises(ConfigError, match="data.subset_weights.B"):
        config_from_dict({"data": {"subset_weights": {"B": "heavy"}}})
    assert _coerce([1, "2"], tuple[int, ...], "k") == (1, 2)


def test_fuzzed_config_values_are_short_config_errors_or_exact_ints(tmp_path):
    """Found by fuzzing (a review helper): a YAML alias bomb of 560 bytes took 50 s and 4.6 GB to be refused, all
    of it spent on the error message (its full repr; here 6 levels, a 3.7 MB message); 600 nested [ raised
    RecursionError; an int of 400 digits in a float field raised OverflowError; and '1e23' for an int went through
    a float to 99999999999999991611392."""
    from metaembed.pipeline import read_config

    levels = ["&a0 [x,x,x,x,x,x,x,x,x]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 6)]
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: [" + ",".join(levels) + "]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train.batch_size must be an integer, got list \[\['x', ") as e:
        read_config(path)
    assert len(str(e.value)) < len(str(path)) + 400
    path.write_text("train:\n  lr: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML \(collections nested too deeply to read\)"):
        read_config(path)
    for key in ("lr", "weight_decay"):
        with pytest.raises(ConfigError, match=rf"train.{key} must be a number, got int 1000000.*\.\.\.0000"):
            config_from_dict({"train": {key: 10**400}})
    assert config_from_dict({"train": {"max_steps": "1e23"}}).train.max_steps == 10**23
    assert config_from_dict({"train": {"max_steps": float(2**53)}}).train.max_steps == 2**53
    with pytest.raises(ConfigError, match=r"train.max_steps must be an integer, got float 1e\+23"):
        config_from_dict({"train": {"max_steps": 1e23}})  # the float is not the integer 10**23 that was written
    for bad in ("1e100000000", "nan", "-inf", "1.000000000000000000001"):
        with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
            config_from_dict({"train": {"max_steps": bad}})


def test_missing_or_non_mapping_config_file_is_a_config_error(tmp_path):
    """A missing file or a YAML list at the top level is a ConfigError naming the file, not a traceback."""
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_config(path, {"train.max_steps": 3})
    # experiments/quickstart.yaml (a reproduce parameter set) for the packaged run config quickstart
    repo_set = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    with pytest.raises(ConfigError, match=r"quickstart.yaml is a parameter set of `metaembed reproduce` .* run it "
                                          r"with `metaembed reproduce quickstart`"):
        load_config(repo_set)


@pytest.mark.parametrize("key", ["model.backbone_path", "data.path", "data.vidore_path", "eval.cache_dir",
                                 "train.output_dir"])
def test_an_empty_path_is_refused(key):
    """``--set model.backbone_path=`` (or ``--backbone "$CKPT"`` with CKPT unset) read as the working directory:
    ". has no config.json" (a review helper); every path key refuses an empty value, naming null for none."""
    section, name = key.split(".")
    for empty in ("", "  "):
        with pytest.raises(ConfigError, match=f"{key} is empty"):
            config_from_dict({section: {name: empty}})
    if name != "output_dir":
        assert getattr(getattr(config_from_dict({section: {name: None}}), section), name) is None


def test_defaults_a_run_takes_without_naming_them():
    """Defaults no test pinned (a mutation review): ``data.vidore_unknown_ids='error'`` (a ``skip`` default dropped
    every qrels row naming a query / page id missing from the files, with only a count) and the LoRA targets
    every paper recipe spells out (a packaged config run on a pretrained ``--backbone`` takes the default: one
    projection fewer trained fewer weights, without a word)."""
    cfg = RunConfig().validate()
    assert cfg.data.vidore_unknown_ids == "error"
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.model.lora_target_modules == seven
    for path in PAPER:
        if load_config(path).model.lora:
            assert load_config(path).model.lora_target_modules == seven, path.name


def test_an_invalid_override_value_is_blamed_on_the_override(tmp_path):
    """A valid file with ``--set train.max_steps=ten``: the error names the override, not the file (only an
    override that failed while being applied was covered; the value errors came from validating the merged
    dict, which must be a copy: validating the file alone then passes)."""
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"train.max_steps": "ten"})
    assert "train.max_steps must be an integer" in str(info.value)
    assert str(info.value).endswith(f"(an override / --set, applied to {path})")
