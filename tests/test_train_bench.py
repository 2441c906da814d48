"""``metaembed train-bench``: the real-size training / encoding measurement, exercised on a tiny model.

The GPU numbers it exists for (3B step time, tokens/s, peak memory) come from a GPU machine; here
every path it times (plain step, GradCache with a short last chunk, the evaluation path) runs on CPU
and its bookkeeping (token counts, batch assembly, errors) is checked exactly.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from transformers import CONFIG_MAPPING

from metaembed.backbones import BACKBONES
from metaembed.backbones.published import published_config, resolve, size_report
from metaembed.backbones.qwen_vl import IMAGE_PAD, Qwen2_5_VLAdapter
from metaembed.cli import main as cli_main
from metaembed.train_bench import (
    TrainBenchConfig,
    build_model,
    make_batch,
    make_triples,
    parse_batches,
    run_train_bench,
    tiny_backbone,
)

TINY = dict(backbone="tiny-xs", image_size=56, text_tokens=8, steps=2, warmup=0, eval_queries_per_task=1,
            progress=False, pool=8)
# one 56 px image = 2x2 merged visual tokens + vision start/end, 8 single-token words, 16 + 64 Meta Tokens
TOKENS_PER_ITEM = 4 + 2 + 8 + 80


def test_parse_batches():
    assert parse_batches(["8", "256/32"]) == [(8, None), (256, 32)]
    with pytest.raises(ValueError, match="B/chunk"):
        parse_batches(["8x"])


@pytest.mark.parametrize("batches", [[(0, None)], [(4, 5)], [(4, 0)], []])
def test_bad_batches_are_rejected(batches):
    with pytest.raises(ValueError):
        TrainBenchConfig(batches=batches).validate()


@pytest.fixture(scope="module")
def tiny_result():
    return run_train_bench(TrainBenchConfig(batches=[(3, None), (5, 2)], **TINY))


def test_every_path_runs_and_counts_tokens(tiny_result):
    plain, cached = tiny_result["rows"]
    assert plain["status"] == cached["status"] == "ok"
    assert plain["tokens_per_step"] == 3 * 3 * TOKENS_PER_ITEM  # query, positive, hard negative
    assert cached["tokens_per_step"] == 3 * 5 * TOKENS_PER_ITEM  # chunks 2, 2, 1
    assert plain["max_seq_len"] == TOKENS_PER_ITEM
    for row in (plain, cached):
        assert math.isfinite(row["loss"]) and row["step_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"])
        assert "peak_allocated_gib" not in row  # CPU: no allocator peak to report
    model = tiny_result["model"]
    assert 0 < model["trainable_parameters"] < model["parameters"]
    ev = tiny_result["eval"]
    assert ev["items_encoded"] > 0 and set(ev["overall_p1"]) == {"(1,1)", "(2,4)", "(4,8)", "(8,16)", "(16,64)"}


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_tiny_backbone_of_every_family_is_timed(family):
    """``tiny-*`` was Qwen2.5-VL only: a quick training-step check of another family on any device needed its
    full-size published config."""
    name = "tiny-xs" if family == "qwen2_5_vl" else f"tiny-{family}-xs"
    assert tiny_backbone(name) == (family, "xs")
    cfg = TrainBenchConfig(backbone=name, device="cpu", dtype="float32", batches=[(2, None)], image_size=56,
                           text_tokens=4, steps=1, warmup=0, eval_queries_per_task=0, progress=False, pool=2, R_q=2,
                           R_c=4)
    model, info = build_model(cfg, torch.device("cpu"))
    assert info["family"] == family and type(model.backbone) is BACKBONES[family]
    assert model.backbone.spec["kind"] == "tiny" and model.backbone.spec["size"] == "xs"
    # every item: its image and words, then R_q + R_c = 6 Meta Tokens (layout both)
    lengths = [int(model.backbone.encode_item(item, []).input_ids.numel()) + 6
               for t in make_triples(cfg, 2) for item in (t.query, t.positive, t.negative)]
    (row,) = run_train_bench(cfg)["rows"]
    assert row["status"] == "ok" and math.isfinite(row["loss"])
    assert row["max_seq_len"] == max(lengths) and row["tokens_per_step"] == sum(lengths)



def test_tiny_backbone_finds_a_family_an_installed_package_declares(tmp_path):
    """model.backbone and from_pretrained load the 'metaembed.backbones' entry points when a name is not known, but
    tiny_backbone looked only at BACKBONES: train-bench --backbone tiny-<plugin family>-xs stopped with "unknown
    backbone family" in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    site = tmp_path / "site"
    (site / "plugfam-0.1.dist-info").mkdir(parents=True)
    (site / "plugfam-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: plugfam\nVersion: 0.1\n")
    (site / "plugfam-0.1.dist-info" / "entry_points.txt").write_text("[metaembed.backbones]\nplug_vl = plugfam:Plug\n")
    (site / "plugfam.py").write_text("from metaembed.backbones.qwen_vl import Qwen2_5_VLAdapter\n\n\n"
                                     "class Plug(Qwen2_5_VLAdapter):\n    family = 'plug_vl'\n")
    lib = Path(__file__).resolve().parents[1] / "lib"
    for code, want in (("from metaembed.train_bench import tiny_backbone\nprint(tiny_backbone('tiny-plug_vl-xs'))",
                        "('plug_vl', 'xs')"),  # and get_adapter_class, without a ModelConfig.validate first
                       ("from metaembed.backbones import load_backbone\n"
                        "print(type(load_backbone('plug_vl', size='xs')).__name__)", "Plug")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{lib}"})
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip() == want


def test_tiny_family_without_a_random_build_processor_keeps_its_own(monkeypatch):
    """_random_image_processor is only required for from_config (docs/CONTRACTS.md): a family with tiny() alone
    raised NotImplementedError in build_model after its model was built."""
    from metaembed.backbones.qwen_vl import Qwen2_5_VLAdapter

    def missing(cls, config, image_side):
        raise NotImplementedError("no random-weight builds (from_config)")

    monkeypatch.setattr(Qwen2_5_VLAdapter, "_random_image_processor", classmethod(missing))
    cfg = TrainBenchConfig(**{**TINY, "device": "cpu", "dtype": "float32"})
    with pytest.warns(UserWarning, match=f"--image-size {cfg.image_size} is not applied"):  # was silently ignored
        model, _ = build_model(cfg, torch.device("cpu"))
    assert model.backbone.image_processor is not None


def test_grad_cache_batch_has_a_short_last_chunk():
    cfg = TrainBenchConfig(**TINY)
    model, _ = build_model(cfg, torch.device("cpu"))
    batch = make_batch(model, cfg, B=9, chunk=4)  # pool 8 = 2 distinct chunks, reused; last chunk 1 triple
    for role in ("query", "positive", "negative"):
        chunks = batch[role]
        assert [c["input_ids"].shape[0] for c in chunks] == [4, 4, 1]
        last = chunks[-1]
        assert last["image_grid_thw"].shape[0] == 1
        assert last["pixel_values"].shape[0] == int(last["image_grid_thw"].prod())
    with pytest.raises(ValueError, match="pool"):
        make_batch(model, cfg, B=9, chunk=None)


def test_random_published_build_has_the_published_size():
    """``from_config`` keeps the architecture: same parameter count as the published model (meta device)."""
    adapter = Qwen2_5_VLAdapter.from_config(published_config("metaembed-3b"), device="meta")
    n = sum(p.numel() for p in adapter.model.parameters())
    report = size_report("metaembed-3b")
    assert report["tie_word_embeddings"]  # 3B ties its LM head: the base model holds every parameter
    assert n == report["total_params"]
    image_id = adapter.token_id(IMAGE_PAD)
    assert adapter.model.config.image_token_id == image_id < adapter.model.config.get_text_config().vocab_size
    assert adapter.model.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "paligemma-3b", "llama-3.2-11b-vision"])
def test_every_published_family_has_a_random_build_of_its_size(name):
    """Random-weight builds (``from_config``) cover every published family, not only Qwen2.5-VL: the base model's
    parameter count is the published one (without an untied LM head), and the config's image token is the tiny
    tokenizer's, inside the published embedding table."""
    pub = resolve(name)
    adapter = BACKBONES[pub.family].from_config(published_config(name), device="meta")
    report = size_report(name, use_peft=False)
    assert sum(p.numel() for p in adapter.model.parameters()) == report["total_params"] - report["lm_head_params"]
    config = adapter.model.config
    for attr, token in adapter.config_tokens.items():
        assert getattr(config, attr) == adapter.token_id(token) < config.get_text_config().vocab_size
    assert adapter.model.dtype == torch.bfloat16 and adapter.spec["kind"] == "random"


#: each family's published config with every width and depth cut down (token ids, image sizes, tiles kept)
_SHRINK = {
    "paligemma": dict(hidden_size=64, projection_dim=64,
                      text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=16),
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, projection_dim=64)),
    "mllama": dict(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, cross_attention_layers=[1]),
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                      attention_heads=2, intermediate_layers_indices=[0], vision_output_dim=64)),
}


def _shrunk_config(name: str):
    pub = resolve(name)
    raw = copy.deepcopy(pub.config)
    for key, value in _SHRINK[pub.family].items():
        if isinstance(value, dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


@pytest.mark.parametrize("name, image_tokens", [("paligemma-3b", 1024), ("llama-3.2-11b-vision", 1)])
def test_random_builds_of_fixed_tile_families_train_at_their_published_input_size(name, image_tokens, monkeypatch):
    """PaliGemma and Mllama random builds read images at their config's size (448 px: 1024 SigLIP tokens; 560 px
    tiles, up to 4, behind one image token), whatever ``--image-size`` the benchmark draws, and train-bench times
    their training steps.  Run on the published configs with widths and depths cut down, on CPU."""
    import metaembed.backbones.published as published

    monkeypatch.setattr(published, "published_config", _shrunk_config)
    cfg = TrainBenchConfig(backbone=name, device="cpu", dtype="float32", batches=[(2, None)], image_size=64,
                           text_tokens=4, steps=1, warmup=0, eval_queries_per_task=0, progress=False, pool=2, R_q=2,
                           R_c=4)
    model, info = build_model(cfg, torch.device("cpu"))
    assert info["family"] == resolve(name).family and "random weights" in info["what"]
    item = make_triples(cfg, 1)[0].query
    encoded = model.backbone.encode_item(item, [])
    image_id = model.backbone.model.config.image_token_id
    assert int((encoded.input_ids == image_id).sum()) == image_tokens
    if resolve(name).family == "mllama":  # a 64 px image fills one 560 px tile of 4 (pixel rows padded to 4)
        assert tuple(encoded.image["pixel_values"].shape[1:]) == (4, 3, 560, 560)
        assert int(encoded.image["n_tiles"]) == 1
    else:
        assert tuple(encoded.image["pixel_values"].shape) == (1, 3, 448, 448)
    (row,) = run_train_bench(cfg)["rows"]
    assert row["status"] == "ok" and math.isfinite(row["loss"])
    # query, positive, hard negative x 2: image tokens, <bos>, 4 one-token words, R_q + R_c Meta Tokens (the tiny
    # tokenizer has no newline token, so PaliGemma's prefix gets no separator)
    assert row["tokens_per_step"] == 3 * 2 * (image_tokens + 1 + 4 + 6)


def test_cli_writes_report_and_json(tmp_path, capsys):
    out = tmp_path / "tb.json"
    rc = cli_main(["train-bench", "--backbone", "tiny-xs", "--image-size", "56", "--text-tokens", "4",
                   "--batches", "2", "--steps", "1", "--warmup", "0", "--eval-queries", "0", "--no-progress",
                   "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| batch |" in text and "tokens/s" in text
    data = json.loads(out.read_text())
    assert data["rows"][0]["batch_size"] == 2 and data["eval"] is None and data["complete"] is True


def test_cli_json_to_stdout_is_one_document_after_the_report(capsys):
    """--json - : the partial results (rewritten into a file as each part finishes) must not go to stdout too."""
    rc = cli_main(["train-bench", "--backbone", "tiny-xs", "--image-size", "56", "--text-tokens", "4",
                   "--batches", "2", "--steps", "1", "--warmup", "0", "--eval-queries", "0", "--no-progress",
                   "--json", "-"])
    assert rc == 0
    report, sep, doc = capsys.readouterr().out.partition("\n{")
    assert sep and report.startswith("## Training cost") and '"complete"' not in report
    data = json.loads("{" + doc)  # exactly one JSON document, the complete one
    assert data["complete"] is True and data["rows"][0]["batch_size"] == 2


@pytest.mark.parametrize("args, message", [
    (["--backbone", "tiny-xs", "--backbone-path", "/no/such/checkpoint", "--batches", "2", "--image-size", "56",
      "--text-tokens", "2", "--steps", "1", "--warmup", "0", "--eval-queries", "0"],  # (small: the old code timed it)
     "needs a published --backbone"),
    # the message itself (str(KeyError) quoted it) and the tiny names the help gives (a review helper)
    (["--backbone", "no-such-model"], "train-bench: unknown published backbone 'no-such-model'; known:"),
    (["--backbone", "no-such-model"], "or tiny-[<family>-]xs|s|m|l for a tiny random backbone"),
    (["--backbone", "tiny-gemma-s"], "unknown backbone family 'gemma'; tiny-<family>-<size> with a family of ["),
    (["--backbone", "tiny-paligemma-xxl"], "tiny-paligemma-xxl: unknown tiny size 'xxl'; choose from"),
    (["--batches", "4/8"], "chunk"),
    (["--device", "meta"], "expected auto, cpu, cuda or cuda:N"),  # was a traceback (Tensor.item() on meta)
])
def test_cli_errors(args, message, capsys):
    assert cli_main(["train-bench", "--device", "cpu", "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


def test_partial_results_are_reported_as_they_come(capsys):
    seen = []
    run_train_bench(TrainBenchConfig(batches=[(2, None)], **{**TINY, "steps": 1, "eval_queries_per_task": 0}),
                    on_result=lambda kind, value: seen.append((kind, dict(value))))
    assert [k for k, _ in seen] == ["config", "device", "model", "row"] and seen[3][1]["status"] == "ok"


def test_cli_json_keeps_finished_rows_when_cut_short(tmp_path, monkeypatch):
    """A run killed mid-way (time limit) leaves the finished rows (all of them) as JSON, marked incomplete."""
    from metaembed import train_bench

    real, calls = train_bench._measure_batch, []

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_bench, "_measure_batch", measure)
    out = tmp_path / "tb.json"
    with pytest.raises(RuntimeError, match="killed"):
        cli_main(["train-bench", "--backbone", "tiny-xs", "--image-size", "56", "--text-tokens", "4",
                  "--batches", "2", "3", "2", "--steps", "1", "--warmup", "0", "--eval-queries", "0", "--no-progress",
                  "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and [r["batch_size"] for r in data["rows"]] == [2, 3]
    assert data["model"]["attention"]["text"]
    # ... with the setting they were measured at
    assert data["config"]["batches"] == ["2", "3", "2"] and data["config"]["image_size"] == 56
    assert data["device"]["type"] == "cpu"


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 524288000000 bytes. Error code 12 (Cannot allocate memory)")


def test_cpu_out_of_memory_step_is_reported_as_oom(monkeypatch):
    from metaembed import train_bench

    cfg = TrainBenchConfig(**TINY)
    model, _ = build_model(cfg, torch.device("cpu"))

    def no_memory(fn, device, runs, warmup):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(train_bench, "time_ms", no_memory)
    row = train_bench._measure_batch(model, cfg, torch.device("cpu"), 2, None)
    assert row["status"] == "OOM"


@pytest.mark.parametrize("size", [57, 14])
def test_image_size_the_eval_path_rejects_is_rejected_up_front(size, monkeypatch, capsys):
    """make_benchmark needs an even --image-size >= 16: reject it before any timing, not after all of them."""
    from metaembed import train_bench

    with pytest.raises(ValueError, match="even number >= 16"):
        TrainBenchConfig(image_size=size, eval_queries_per_task=1).validate()
    TrainBenchConfig(image_size=size, eval_queries_per_task=0).validate()  # no eval path: any size >= 1

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was validated")

    monkeypatch.setattr(train_bench, "build_model", never)
    rc = cli_main(["train-bench", "--backbone", "tiny-xs", "--device", "cpu", "--image-size", str(size),
                   "--eval-queries", "1", "--no-progress"])
    assert rc == 2 and "even number >= 16" in capsys.readouterr().err


def test_eval_texts_are_not_truncated_to_text_tokens(monkeypatch):
    """--text-tokens 8 sets the training items' text length; the synthetic eval texts (up to ~46 tokens) must
    be encoded whole, else distractors truncate to the positive's exact input and ties="first" counts a hit."""
    from metaembed import train_bench
    from metaembed.data.records import IMAGE_PLACEHOLDER

    cfg = TrainBenchConfig(**TINY)
    model, _ = build_model(cfg, torch.device("cpu"))
    adapter = model.backbone
    real, seen = adapter.encode_item, []

    def spy(item, append_ids, max_text_length=256):
        seen.append((len(adapter.text_ids((item.text or "").replace(IMAGE_PLACEHOLDER, " "))), max_text_length))
        return real(item, append_ids, max_text_length)

    monkeypatch.setattr(adapter, "encode_item", spy)
    train_bench._measure_eval(model, cfg, torch.device("cpu"))
    assert seen and max(n for n, _ in seen) > cfg.text_tokens  # the eval texts are longer than --text-tokens
    assert all(n <= limit for n, limit in seen)  # none truncated
    assert all(limit == train_bench.EVAL_MAX_TEXT_LENGTH == 256 for _, limit in seen)
    assert model.config.max_text_length == cfg.text_tokens  # the training length is restored


def test_plain_batch_beyond_pool_is_rejected_before_any_timing(monkeypatch, capsys):
    """A plain batch larger than --pool cannot be collated: rejected up front, not after the model is built and
    the earlier batch sizes are timed (minutes at 3B size)."""
    from metaembed import train_bench

    with pytest.raises(ValueError, match="pool"):
        TrainBenchConfig(batches=[(2, None), (16, None)], pool=8).validate()
    TrainBenchConfig(batches=[(2, None), (16, 8)], pool=8).validate()  # GradCache repeats collated chunks

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was validated")

    monkeypatch.setattr(train_bench, "build_model", never)
    rc = cli_main(["train-bench", "--backbone", "tiny-xs", "--device", "cpu", "--batches", "2", "16", "--pool", "8",
                   "--eval-queries", "0", "--no-progress"])
    assert rc == 2 and "plain batch 16 > --pool 8" in capsys.readouterr().err


def test_grad_cache_short_last_chunk_with_per_item_pixel_values(tmp_path):
    """PaliGemma's pixel_values are one row per item (no image_grid_thw): a short last chunk keeps its first rows."""
    from metaembed.backbones import load_backbone

    ck = tmp_path / "paligemma"
    load_backbone("paligemma", None, size="xs").save(ck)
    cfg = TrainBenchConfig(**{**TINY, "backbone": "metaembed-3b-gemma", "backbone_path": str(ck)})
    model, _ = build_model(cfg, torch.device("cpu"))
    batch = make_batch(model, cfg, B=5, chunk=2)
    for role in ("query", "positive", "negative"):
        assert [c["pixel_values"].shape[0] for c in batch[role]] == [2, 2, 1]
        assert [c["input_ids"].shape[0] for c in batch[role]] == [2, 2, 1]


def test_eval_path_encodes_eval_batch_size_items_per_forward(monkeypatch):
    """evaluate() hands eval_batch_size items at a time; model.encode must not re-split them into its default 32."""
    import dataclasses

    from metaembed import train_bench
    from metaembed.data import synthetic

    cfg = TrainBenchConfig(**{**TINY, "eval_batch_size": 40, "eval_queries_per_task": 10})  # 40 candidates a task
    model, _ = build_model(cfg, torch.device("cpu"))
    real, sizes = model.collate, []

    def spy(items, role):
        sizes.append(len(items))
        return real(items, role)

    monkeypatch.setattr(model, "collate", spy)
    real_bench = synthetic.make_benchmark  # one retrieval task (40 distinct candidates) of the 14: fast

    def one_task(**kw):
        bench = real_bench(**kw)
        return dataclasses.replace(bench, eval_tasks=[t for t in bench.eval_tasks if t.name == "Ret-T2I"], doc_tasks=[])

    monkeypatch.setattr(synthetic, "make_benchmark", one_task)
    train_bench._measure_eval(model, cfg, torch.device("cpu"))
    assert max(sizes) == 40


def test_one_timed_step_reports_no_spread_and_the_autocast_dtype():
    """--steps 1 (gpu_check.sh) has no standard deviation: none is reported (time_ms's 0.0 would claim a spread
    of 0); the report names the autocast dtype actually used (float16 is not bf16)."""
    from metaembed.train_bench import format_report

    result = run_train_bench(TrainBenchConfig(batches=[(2, None)], **{**TINY, "steps": 1, "eval_queries_per_task": 0}))
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["step_s_std"] is None
    assert "±" not in format_report(result)
    result["device"]["type"] = "cuda"
    result["config"]["dtype"] = "float16"
    result["rows"][0].update(step_s_std=0.01, peak_allocated_gib=1.5, peak_reserved_gib=2.0)
    text = format_report(result)
    assert "float16 autocast" in text and "bf16 autocast" not in text and "± 0.010" in text


# --------------------------------------------------------------------------- mutation-testing gaps (helper 97)
# Step time, tokens/s and peak memory from fake clocks / fake CUDA memory counters (exact units and counts), the
# GPU-only bookkeeping through fakes, and the report cell by cell.


def test_tokens_are_the_non_padding_positions():
    """tokens/s counts real tokens: padding (attention_mask 0) is not work the model was asked to do."""
    from metaembed.train_bench import _tokens

    a = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    b = {"attention_mask": torch.tensor([[1, 1], [1, 0]])}
    assert (_tokens(a), _tokens([a, b]), _tokens(None)) == (5, 8, 0)


@pytest.fixture(scope="module")
def tiny_model():
    """One tiny model for the bookkeeping tests (they may train it: none depends on its weights)."""
    return build_model(TrainBenchConfig(**TINY), torch.device("cpu"))[0]


def _spy_steps(monkeypatch, events, losses):
    """Record each step (its clip_grad_norm_ call) and each MMR loss; a fake time_ms that runs ``runs`` steps
    (after ``warmup`` ones) and reports 2000 ms +- 100 ms."""
    from metaembed import train_bench
    from metaembed.training import MetaEmbedLightningModule

    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: (events.append("step"), real_clip(params, max_norm))[1])
    for name in ("batch_loss", "grad_cache_loss"):
        real = getattr(MetaEmbedLightningModule, name)

        def spy(self, *a, _real=real, **k):
            out = _real(self, *a, **k)
            losses.append(float(out.loss.detach()))
            return out

        monkeypatch.setattr(MetaEmbedLightningModule, name, spy)

    def time_ms(fn, device, runs, warmup):
        events.append(("timed", runs, warmup))
        for _ in range(warmup + runs):
            fn()
        return 2000.0, 100.0

    monkeypatch.setattr(train_bench, "time_ms", time_ms)


def test_step_time_rates_and_loss_from_a_fake_clock(monkeypatch, tiny_model):
    """step_s is time_ms's ms in seconds; tokens/s and triples/s (all B triples, GradCache too) are over it; the
    warm-up steps run first and untimed, then --steps timed ones; the loss reported is the last step's; the step
    trains (AdamW at 1e-4 moves the trainable weights); the loss config carries --query-chunk-size."""
    from metaembed import train_bench

    events, losses, loss_cfgs, made = [], [], [], []
    _spy_steps(monkeypatch, events, losses)
    real_lc = train_bench.LossConfig
    monkeypatch.setattr(train_bench, "LossConfig", lambda **kw: (loss_cfgs.append(kw), real_lc(**kw))[1])

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    cfg = TrainBenchConfig(**{**TINY, "warmup": 1, "steps": 1, "query_chunk_size": 2})
    model = tiny_model
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    row = train_bench._measure_batch(model, cfg, torch.device("cpu"), 3, None)
    assert events == ["step", ("timed", 1, 0), "step"]
    assert row["status"] == "ok" and (row["step_s"], row["step_s_std"]) == (2.0, 0.1)
    assert row["tokens_per_step"] == 3 * 3 * TOKENS_PER_ITEM
    assert row["tokens_per_s"] == row["tokens_per_step"] / 2.0 and row["triples_per_s"] == 1.5
    assert len(losses) == 2 and row["loss"] == losses[-1]
    assert any(not torch.equal(p.detach(), b) for p, b in zip(trainable, before))
    assert made == [{"lr": 1e-4}]
    assert loss_cfgs[-1]["query_chunk_size"] == 2 and loss_cfgs[-1]["use_hard_negatives"] is True
    assert loss_cfgs[-1]["groups"] == [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]

    one = TrainBenchConfig(**{**TINY, "warmup": 0, "steps": 1})
    cached = train_bench._measure_batch(model, one, torch.device("cpu"), 3, 2)  # GradCache: chunks 2, 1
    assert cached["triples_per_s"] == 1.5 and cached["tokens_per_s"] == 3 * 3 * TOKENS_PER_ITEM / 2.0

    plain = TrainBenchConfig(**{**TINY, "warmup": 0, "steps": 1, "hard_negatives": False})
    row = train_bench._measure_batch(model, plain, torch.device("cpu"), 2, None)  # --no-hard-negatives
    assert row["tokens_per_step"] == 2 * 2 * TOKENS_PER_ITEM and loss_cfgs[-1]["use_hard_negatives"] is False


def test_non_finite_loss_is_an_error(monkeypatch, tiny_model):
    import types

    from metaembed import train_bench
    from metaembed.training import MetaEmbedLightningModule

    nan = torch.tensor(float("nan"), requires_grad=True)
    monkeypatch.setattr(MetaEmbedLightningModule, "batch_loss", lambda self, batch, gather=True:
                        types.SimpleNamespace(loss=nan * 1))
    cfg = TrainBenchConfig(**{**TINY, "steps": 1})
    with pytest.raises(RuntimeError, match="non-finite MMR loss at batch 2"):
        train_bench._measure_batch(tiny_model, cfg, torch.device("cpu"), 2, None)


def test_cuda_peak_memory_is_reset_after_warmup_and_read_in_gib(monkeypatch, tiny_model):
    """GPU bookkeeping, with fake CUDA memory counters: the allocator's peak is reset after the warm-up steps and
    before the timed ones (each batch size its own peak, not the largest so far), and reported in GiB, allocated
    and reserved each from its own counter; the optimizer state is freed before the cache is emptied (else the
    next batch size starts with it reserved)."""
    import contextlib

    from metaembed import train_bench

    events, losses = [], []
    _spy_steps(monkeypatch, events, losses)
    monkeypatch.setattr(train_bench, "move_data_to_device", lambda batch, device: batch)
    monkeypatch.setattr(train_bench, "_autocast", lambda device, dtype: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * 2**30)
    opts = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, **kw):
            opts.append(self)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("empty_cache", len(opts[-1].state))))
    cfg = TrainBenchConfig(**{**TINY, "warmup": 1, "steps": 1})
    row = train_bench._measure_batch(tiny_model, cfg, torch.device("cuda"), 2, None)
    assert events == ["step", "reset", ("timed", 1, 0), "step", ("empty_cache", 0)]
    assert (row["peak_allocated_gib"], row["peak_reserved_gib"]) == (3.0, 5.0)


def test_autocast_only_on_cuda_below_fp32():
    import contextlib
    import warnings

    from metaembed.train_bench import _autocast

    assert isinstance(_autocast(torch.device("cpu"), torch.bfloat16), contextlib.nullcontext)
    assert isinstance(_autocast(torch.device("cuda"), torch.float32), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that it disables it
        assert isinstance(_autocast(torch.device("cuda"), torch.float16), torch.autocast)


def test_run_on_cuda_reports_weights_and_batches(monkeypatch):
    """The run's own records on a (fake) GPU: the resident weights in GiB, the device name, the batches as
    given (B and B/chunk), one row per batch size in order."""
    from metaembed import train_bench

    monkeypatch.setattr(train_bench, "_resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * 2**30)
    monkeypatch.setattr(train_bench, "build_model", lambda cfg, device: (None, {"what": "fake"}))
    monkeypatch.setattr(train_bench, "_measure_batch",
                        lambda model, cfg, device, B, chunk: {"batch_size": B, "grad_cache_chunk": chunk})
    res = run_train_bench(TrainBenchConfig(batches=[(8, None), (128, 64)], eval_queries_per_task=0))
    assert res["config"]["batches"] == ["8", "128/64"] and res["device"]["name"] == "Fake GPU"
    assert res["model"]["weights_gib"] == 6.0 and res["eval"] is None
    assert [(r["batch_size"], r["grad_cache_chunk"]) for r in res["rows"]] == [(8, None), (128, 64)]


def test_eval_items_per_second_is_over_the_encoding_time(monkeypatch):
    """items/s divides the items encoded by the time spent encoding them (not the whole evaluation's); fake clock:
    each read advances 0.5 s and each encode call 1 s."""
    import types

    from metaembed import train_bench

    clock, encodes = [0.0], []

    def read():
        clock[0] += 0.5
        return clock[0]

    class Model:
        config = types.SimpleNamespace(max_text_length=8)

        def encode(self, items, role, batch_size=32, progress=False):
            encodes.append(len(items))
            clock[0] += 1.0
            return torch.nn.functional.normalize(torch.randn(len(items), 16 if role == "query" else 64, 8), dim=-1)

    monkeypatch.setattr(train_bench, "time", types.SimpleNamespace(perf_counter=read))
    cfg = TrainBenchConfig(backbone="tiny-xs", eval_queries_per_task=1, image_size=16, progress=False)
    out = train_bench._measure_eval(Model(), cfg, torch.device("cpu"))
    assert out["items_encoded"] == sum(encodes) and out["encode_s"] == pytest.approx(1.5 * len(encodes))
    assert out["items_per_s"] == pytest.approx(sum(encodes) / (1.5 * len(encodes)))
    assert out["total_s"] > out["encode_s"]


def test_grad_cache_batch_reuses_distinct_chunks(monkeypatch, tiny_model):
    """GradCache batches repeat the distinct collated chunks in turn (not the first one over and over), collate
    no more triples than the chunks used, and cut only a short last chunk (B % chunk != 0)."""
    from metaembed import train_bench

    cfg, model = TrainBenchConfig(**TINY), tiny_model  # pool 8
    made, real = [], train_bench.make_triples
    monkeypatch.setattr(train_bench, "make_triples", lambda cfg, n: (made.append(n), real(cfg, n))[1])
    batch = make_batch(model, cfg, B=8, chunk=4)  # two whole chunks
    assert made == [8] and [c["input_ids"].shape[0] for c in batch["query"]] == [4, 4]
    assert not torch.equal(batch["query"][0]["pixel_values"], batch["query"][1]["pixel_values"])
    batch = make_batch(model, cfg, B=7, chunk=4)
    assert [c["input_ids"].shape[0] for c in batch["positive"]] == [4, 3]
    make_batch(model, cfg, B=4, chunk=2)  # 2 chunks: 4 triples collated, not the pool's 8
    assert made[-1] == 4
    make_batch(model, cfg, B=24, chunk=4)  # 6 chunks: the pool's 8 triples (2 chunks) collated, not 24
    assert made[-1] == 8


def test_tokens_and_max_length_over_every_role(monkeypatch, tiny_model):
    """tokens/step sums the non-padding tokens of queries, positives and negatives; max len is the longest padded
    input of any of them (here a step that runs out of memory: the row keeps both)."""
    from metaembed import train_bench

    def mask(n, width, pad):
        return {"attention_mask": torch.tensor([[1] * (width - pad) + [0] * pad] * n)}

    batch = {"query": mask(2, 5, 1), "positive": mask(2, 9, 2), "negative": mask(2, 7, 0)}
    monkeypatch.setattr(train_bench, "make_batch", lambda model, cfg, B, chunk: batch)
    monkeypatch.setattr(train_bench, "time_ms", lambda fn, device, runs, warmup: (_ for _ in ()).throw(
        RuntimeError(CPU_OOM)))
    row = train_bench._measure_batch(tiny_model, TrainBenchConfig(**{**TINY, "warmup": 0}), torch.device("cpu"), 2,
                                     None)
    assert row["status"] == "OOM" and row["tokens_per_step"] == 2 * 4 + 2 * 7 + 2 * 7 and row["max_seq_len"] == 9


@pytest.mark.parametrize("kw", [dict(batches=[(9, None)], pool=8), dict(steps=0), dict(warmup=-1)])
def test_out_of_range_settings_are_rejected(kw):
    with pytest.raises(ValueError):
        TrainBenchConfig(**kw).validate()


def test_batch_spec_with_an_empty_chunk_is_rejected():
    with pytest.raises(ValueError, match="B/chunk"):
        parse_batches(["8/"])


def test_loss_groups_fit_both_token_counts():
    from metaembed.train_bench import _groups

    assert _groups(TrainBenchConfig(R_q=16, R_c=8)) == [(1, 1), (2, 4), (4, 8)]
    assert _groups(TrainBenchConfig(R_q=2, R_c=64)) == [(1, 1), (2, 4)]


def test_model_is_built_with_the_requested_lora_and_checkpointing():
    cfg = TrainBenchConfig(**{**TINY, "lora_r": 4, "gradient_checkpointing": False})
    model, info = build_model(cfg, torch.device("cpu"))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (model.config.lora_r, model.config.lora_alpha, model.config.gradient_checkpointing) == (4, 4, False)
    assert model.config.lora and any(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_cli_options_reach_the_config(monkeypatch):
    import argparse
    import sys

    from metaembed.train_bench import _config_from_args, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = _config_from_args(parser.parse_args([
        "--backbone", "tiny-s", "--device", "cpu", "--dtype", "float32", "--batches", "4", "16/8",
        "--query-chunk-size", "3", "--steps", "5", "--warmup", "2", "--image-size", "112", "--text-tokens", "9",
        "--R-q", "8", "--R-c", "16", "--lora-r", "4", "--no-gradient-checkpointing", "--no-hard-negatives",
        "--pool", "12", "--eval-queries", "0", "--seed", "3", "--no-progress"]))
    assert cfg == TrainBenchConfig(backbone="tiny-s", device="cpu", dtype="float32", batches=[(4, None), (16, 8)],
                                   query_chunk_size=3, steps=5, warmup=2, image_size=112, text_tokens=9, R_q=8,
                                   R_c=16, lora_r=4, gradient_checkpointing=False, hard_negatives=False, pool=12,
                                   eval_queries_per_task=0, seed=3, progress=False)
    for tty in (True, False):  # progress bars on a terminal only, as metaembed eval (not in pipes and logs)
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty, raising=False)
        assert _config_from_args(parser.parse_args([])) == TrainBenchConfig(batches=[(8, None), (32, None)],
                                                                            progress=tty)


def _tb_result():
    config = {"dtype": "bfloat16", "lora_r": 32, "R_q": 16, "R_c": 64, "gradient_checkpointing": True,
              "image_size": 448, "text_tokens": 64, "query_chunk_size": None, "steps": 3, "warmup": 1,
              "eval_queries_per_task": 4}
    model = {"what": "fake 3B", "build_s": 12.34, "weights_gib": 7.5, "parameters": 3_000_000, "hidden_size": 2048,
             "trainable_parameters": 40_000, "attention": {"text": "sdpa", "vision": "sdpa"}}
    rows = [{"batch_size": 8, "grad_cache_chunk": None, "tokens_per_step": 12_345, "max_seq_len": 400, "status": "ok",
             "step_s": 1.5, "step_s_std": 0.25, "tokens_per_s": 8230.0, "triples_per_s": 5.333,
             "peak_allocated_gib": 20.5, "peak_reserved_gib": 24.25, "loss": 3.14159},
            {"batch_size": 128, "grad_cache_chunk": 64, "tokens_per_step": 99_000, "max_seq_len": 400, "status": "OOM"}]
    ev = {"tasks": 14, "items_encoded": 226, "encode_s": 12.3, "items_per_s": 18.4, "total_s": 20.0,
          "peak_allocated_gib": 9.5, "overall_p1": {"(1,1)": 25.0, "(16,64)": 30.5}}
    return {"config": config, "model": model, "device": {"name": "Fake GPU", "type": "cuda", "torch": "2.x"},
            "rows": rows, "eval": ev}


def test_format_report_cells():
    from metaembed.train_bench import format_report

    lines = format_report(_tb_result()).splitlines()
    assert lines[2] == ("- device: Fake GPU (cuda), torch 2.x; weights bfloat16, bfloat16 autocast; build 12.3 s, "
                        "weights 7.50 GiB")
    assert lines[3].startswith("- parameters 3,000,000 (trainable: 40,000 = LoRA r=32 + 80 Meta Tokens x 2048); ")
    table = [x.split(" | ") for x in lines if x.startswith("| ")]
    assert table == [
        ["| batch", "GradCache chunk", "tokens/step", "max len", "step (s)", "tokens/s", "triples/s",
         "peak alloc (GiB)", "peak reserved (GiB)", "loss |"],
        ["| 8", "-", "12,345", "400", "1.500 ± 0.250", "8,230", "5.33", "20.50", "24.25", "3.142 |"],
        ["| 128", "64", "99,000", "400", "OOM", "-", "-", "-", "-", "- |"]]
    assert lines[-1] == ("Evaluation path (14 synthetic tasks, 4 queries each): 226 items encoded in 12.3 s "
                         "(18.4 items/s), 20.0 s in all, peak 9.50 GiB; Overall P@1 (random weights, near chance): "
                         "(1,1) 25.0, (16,64) 30.5")


# --------------------------------------------------------------------------- mutation review (tbmut)
# GPU-only paths with fakes: the dtype autocast actually runs in, train mode and cleared gradients in each step, the
# evaluation's CUDA bookkeeping (syncs around each encode, its own peak), errors that are not OOM, the published
# random build's arguments, and token / max-length counts over GradCache chunks of different widths.


def test_autocast_runs_in_the_requested_dtype():
    import warnings

    from metaembed.train_bench import _autocast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that it disables it
        for dtype in (torch.float16, torch.bfloat16):
            assert _autocast(torch.device("cuda"), dtype).fast_dtype == dtype  # --dtype float16 is not bf16


def test_cuda_steps_run_in_train_mode_under_autocast_with_cleared_grads(monkeypatch, tiny_model):
    """Each step (warm-up and timed) runs under --dtype autocast, in train mode (HF gradient checkpointing and LoRA
    dropout act only in training) and starts with no gradients held (zero_grad(set_to_none=True), as Lightning:
    else the previous step's gradients are allocated through the forward and counted in the peak)."""
    import contextlib

    from metaembed import train_bench
    from metaembed.training import MetaEmbedLightningModule

    events, losses, seen = [], [], []
    _spy_steps(monkeypatch, events, losses)
    real = MetaEmbedLightningModule.batch_loss

    def spy(self, *a, **k):
        seen.append((tiny_model.training, all(p.grad is None for p in tiny_model.parameters() if p.requires_grad)))
        return real(self, *a, **k)

    monkeypatch.setattr(MetaEmbedLightningModule, "batch_loss", spy)
    autocasts = []
    monkeypatch.setattr(train_bench, "_autocast",
                        lambda device, dtype: (autocasts.append((device.type, dtype)), contextlib.nullcontext())[1])
    moved, freed = [], []
    monkeypatch.setattr(train_bench, "move_data_to_device", lambda batch, device: (moved.append(batch), batch)[1])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(
        (len(moved[-1]), all(p.grad is None for p in tiny_model.parameters()))))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 0)
    tiny_model.eval()  # as the evaluation path leaves it
    cfg = TrainBenchConfig(**{**TINY, "warmup": 1, "steps": 1, "dtype": "float16"})
    row = train_bench._measure_batch(tiny_model, cfg, torch.device("cuda"), 2, None)
    assert row["status"] == "ok" and events.count("step") == 2
    assert autocasts == [("cuda", torch.float16)] * 2
    assert seen == [(True, True)] * 2
    # before the cache is emptied, the device batch and the gradients are freed (else the next batch size, or the
    # evaluation after the last one, starts with them allocated and reserved)
    assert freed == [(0, True)]


def test_cuda_eval_syncs_around_each_encode_and_reports_its_own_peak(monkeypatch):
    """Evaluation on a (fake) GPU: the peak is reset before the first encode (else it is the training peak) and read
    in GiB; each encode's clock reads are bracketed by syncs (without the second, CUDA's queued work is not timed and
    items/s is overstated); encodes run under --dtype autocast; the benchmark is drawn at --image-size; the task
    count is every task."""
    import contextlib
    import types

    from metaembed import train_bench
    from metaembed.data.synthetic import make_benchmark

    events, images, clock = [], set(), [0.0]

    def read():
        events.append("clock")
        clock[0] += 0.5
        return clock[0]

    class Model:
        config = types.SimpleNamespace(max_text_length=8)

        def encode(self, items, role, batch_size=32, progress=False):
            events.append("encode")
            images.update(it.image.size[0] for it in items if it.image is not None)
            return torch.nn.functional.normalize(torch.randn(len(items), 16 if role == "query" else 64, 8), dim=-1)

    monkeypatch.setattr(train_bench, "time", types.SimpleNamespace(perf_counter=read))
    monkeypatch.setattr(train_bench, "sync", lambda device: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    autocasts = []
    monkeypatch.setattr(train_bench, "_autocast",
                        lambda device, dtype: (autocasts.append(dtype), contextlib.nullcontext())[1])
    cfg = TrainBenchConfig(backbone="tiny-xs", eval_queries_per_task=1, image_size=16, dtype="float16", progress=False)
    out = train_bench._measure_eval(Model(), cfg, torch.device("cuda"))
    n = events.count("encode")
    assert n > 0 and events.index("reset") < events.index("clock") < events.index("encode")
    at = [i for i, e in enumerate(events) if e == "encode"]
    assert all(events[i - 2:i] == ["sync", "clock"] and events[i + 1:i + 3] == ["sync", "clock"] for i in at)
    assert out["peak_allocated_gib"] == 3.0 and autocasts == [torch.float16] * n
    assert images and images <= {16, 32}  # scenes at --image-size, pages twice that
    bench = make_benchmark(n_train=0, n_eval_queries=1, n_candidates=4, image_size=16, seed=0)
    assert out["tasks"] == len(bench.eval_tasks) + len(bench.doc_tasks)


@pytest.mark.parametrize("error, oom", [(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
                                        (MemoryError(), True)])
def test_only_allocation_failures_become_oom_rows(error, oom, monkeypatch, tiny_model):
    """A bug in a step (any other RuntimeError) is raised, not reported as the batch size running out of memory;
    Python's MemoryError is an OOM row like the allocators' errors."""
    from metaembed import train_bench

    def fail(fn, device, runs, warmup):
        raise error

    monkeypatch.setattr(train_bench, "time_ms", fail)
    cfg = TrainBenchConfig(**{**TINY, "warmup": 0})
    if oom:
        assert train_bench._measure_batch(tiny_model, cfg, torch.device("cpu"), 2, None)["status"] == "OOM"
    else:
        with pytest.raises(RuntimeError, match="shapes"):
            train_bench._measure_batch(tiny_model, cfg, torch.device("cpu"), 2, None)


def test_published_random_build_gets_the_dtype_seed_and_image_size(monkeypatch):
    """from_config defaults (bf16, seed 0, 448 px) must not stand in for --dtype, --seed, --image-size: a Qwen image
    at 896 px is 1024 visual tokens, not 256."""
    import metaembed.backbones as backbones
    from metaembed import train_bench

    seen = []

    class Stop(Exception):
        pass

    class Fake:
        @classmethod
        def from_config(cls, config, **kw):
            seen.append(kw)
            raise Stop

    monkeypatch.setattr(backbones, "get_adapter_class", lambda family: Fake)
    cfg = TrainBenchConfig(backbone="metaembed-3b", dtype="float16", seed=5, image_size=896)
    with pytest.raises(Stop):
        train_bench.build_model(cfg, torch.device("cpu"))
    assert seen == [dict(seed=5, dtype=torch.float16, device=torch.device("cpu"), image_side=896)]


def test_tokens_and_max_length_over_grad_cache_chunks_of_different_widths(monkeypatch, tiny_model):
    """GradCache chunks are padded separately (a real tokenizer's words differ in length): tokens/step sums every
    chunk of every role and max len is the widest chunk anywhere (here a middle chunk of the hard negatives)."""
    from metaembed import train_bench

    def mask(n, width, pad):
        return {"attention_mask": torch.tensor([[1] * (width - pad) + [0] * pad] * n)}

    batch = {"query": [mask(2, 5, 1), mask(2, 6, 0), mask(1, 4, 0)],
             "positive": [mask(2, 9, 2), mask(2, 12, 3), mask(1, 7, 0)],
             "negative": [mask(2, 7, 0), mask(2, 13, 1), mask(1, 6, 0)]}
    monkeypatch.setattr(train_bench, "make_batch", lambda model, cfg, B, chunk: batch)
    monkeypatch.setattr(train_bench, "time_ms", lambda fn, device, runs, warmup: (_ for _ in ()).throw(
        RuntimeError(CPU_OOM)))
    row = train_bench._measure_batch(tiny_model, TrainBenchConfig(**{**TINY, "warmup": 0}), torch.device("cpu"), 5, 2)
    assert row["tokens_per_step"] == (8 + 12 + 4) + (14 + 18 + 7) + (14 + 24 + 6) and row["max_seq_len"] == 13


def test_validate_boundaries():
    """A plain batch of exactly --pool triples can be collated; --query-chunk-size 0 is rejected up front (the loss
    would raise it only at the first step, after the model build), as are an unknown dtype and tiny family."""
    TrainBenchConfig(batches=[(8, None)], pool=8, text_tokens=0, warmup=0).validate()  # image-only items too
    with pytest.raises(ValueError, match="query_chunk_size"):
        TrainBenchConfig(query_chunk_size=0).validate()
    for kw, message in ((dict(dtype="fp8"), "dtype"), (dict(backbone="tiny-gemma-s"), "unknown backbone family")):
        with pytest.raises(ValueError, match=message):  # validate(), not the model build, names them
            TrainBenchConfig(**kw).validate()


def test_grad_cache_chunk_larger_than_the_pool(tiny_model):
    """B/chunk with chunk > --pool (e.g. 2048/128 at the default pool 64): one chunk collated and repeated."""
    cfg = TrainBenchConfig(**{**TINY, "pool": 2})
    batch = make_batch(tiny_model, cfg, B=6, chunk=3)
    assert [c["input_ids"].shape[0] for c in batch["query"]] == [3, 3]


def test_short_last_chunk_keeps_the_patches_of_its_images(tiny_model):
    """Qwen pixel_values are patch rows: a short last chunk of 3 keeps the 3 images' patches, not one image's."""
    batch = make_batch(tiny_model, TrainBenchConfig(**TINY), B=7, chunk=4)
    last = batch["query"][-1]
    assert last["image_grid_thw"].shape[0] == 3
    assert last["pixel_values"].shape[0] == int(last["image_grid_thw"].prod(dim=-1).sum())


def test_report_names_no_autocast_at_float32():
    from metaembed.train_bench import format_report

    result = _tb_result()
    result["config"]["dtype"] = "float32"
    assert "autocast" not in format_report(result).splitlines()[2]


def test_tiny_build_reads_images_at_image_size():
    """A tiny Qwen backbone's processor takes --image-size (not a 448 px cap): 504 px = 18 x 18 visual tokens."""
    cfg = TrainBenchConfig(**{**TINY, "image_size": 504})
    model, _ = build_model(cfg, torch.device("cpu"))
    ids = model.backbone.encode_item(make_triples(cfg, 1)[0].query, []).input_ids
    assert int((ids == model.backbone.token_id(IMAGE_PAD)).sum()) == (504 // 28) ** 2


def test_grad_cache_rows_time_the_grad_cache_path(monkeypatch, tiny_model):
    """B/chunk runs MetaEmbedLightningModule.grad_cache_loss (no-grad pass, cached gradients, per-chunk backward);
    plain B runs batch_loss.  batch_loss also accepts chunk lists (encoded chunk-wise with every graph kept): a
    GradCache row timed through it would report a plain step's time and memory under the GradCache label."""
    from metaembed import train_bench
    from metaembed.training import MetaEmbedLightningModule

    events, losses = [], []
    _spy_steps(monkeypatch, events, losses)
    calls = []
    for name in ("batch_loss", "grad_cache_loss"):
        spied = getattr(MetaEmbedLightningModule, name)

        def spy(self, *a, _spied=spied, _name=name, **k):
            calls.append(_name)
            return _spied(self, *a, **k)

        monkeypatch.setattr(MetaEmbedLightningModule, name, spy)
    cfg = TrainBenchConfig(**{**TINY, "warmup": 0, "steps": 1})
    train_bench._measure_batch(tiny_model, cfg, torch.device("cpu"), 3, 2)
    assert calls == ["grad_cache_loss"]
    train_bench._measure_batch(tiny_model, cfg, torch.device("cpu"), 2, None)
    assert calls == ["grad_cache_loss", "batch_loss"]


def test_a_non_finite_loss_at_any_step_is_an_error(monkeypatch, tiny_model):
    """A NaN at a warm-up step is an error even when the last step's loss is finite."""
    import types

    from metaembed import train_bench
    from metaembed.training import MetaEmbedLightningModule

    values = iter([float("nan"), 1.0])
    monkeypatch.setattr(MetaEmbedLightningModule, "batch_loss", lambda self, batch, gather=True:
                        types.SimpleNamespace(loss=torch.tensor(next(values), requires_grad=True) * 1))
    cfg = TrainBenchConfig(**{**TINY, "warmup": 1, "steps": 1})
    with pytest.raises(RuntimeError, match="non-finite MMR loss"):
        train_bench._measure_batch(tiny_model, cfg, torch.device("cpu"), 2, None)


def test_out_of_memory_moving_the_batch_to_the_device_is_an_oom_row(monkeypatch, tiny_model):
    """A GradCache batch is moved to the device whole (B triples of pixel values: ~30 GB fp32 at 2048 x 448 px
    Qwen): running out of memory there is that batch size's OOM row, not the end of the run (the larger batch
    sizes after it and the evaluation path were lost)."""
    from metaembed import train_bench

    def no_memory(batch, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 29.60 GiB")

    monkeypatch.setattr(train_bench, "move_data_to_device", no_memory)
    row = train_bench._measure_batch(tiny_model, TrainBenchConfig(**TINY), torch.device("cpu"), 2, None)
    assert row["status"] == "OOM" and row["tokens_per_step"] == 2 * 3 * TOKENS_PER_ITEM
