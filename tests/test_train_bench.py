"""``metaembed train-bench``: the real-size training / encoding measurement, exercised on a tiny model.

The GPU numbers it exists for (3B step time, tokens/s, peak memory) come from a GPU machine; here
every path it times (plain step, GradCache with a short last chunk, the evaluation path) runs on CPU
and its bookkeeping (token counts, batch assembly, errors) is checked exactly.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from metaembed.backbones.published import published_config, size_report
from metaembed.backbones.qwen_vl import IMAGE_PAD, Qwen2_5_VLAdapter
from metaembed.cli import main as cli_main
from metaembed.train_bench import TrainBenchConfig, build_model, make_batch, parse_batches, run_train_bench

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
    (["--backbone", "metaembed-3b-gemma"], "backbone-path"),
    (["--backbone", "no-such-model"], "unknown published backbone"),
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
    """A run killed mid-way (time limit) leaves the finished rows as JSON, marked incomplete."""
    from metaembed import train_bench

    real, calls = train_bench._measure_batch, []

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_bench, "_measure_batch", measure)
    out = tmp_path / "tb.json"
    with pytest.raises(RuntimeError, match="killed"):
        cli_main(["train-bench", "--backbone", "tiny-xs", "--image-size", "56", "--text-tokens", "4",
                  "--batches", "2", "3", "--steps", "1", "--warmup", "0", "--eval-queries", "0", "--no-progress",
                  "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and [r["batch_size"] for r in data["rows"]] == [2]
    assert data["model"]["attention"]["text"]
    # ... with the setting they were measured at
    assert data["config"]["batches"] == ["2", "3"] and data["config"]["image_size"] == 56
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
