"""metaembed.efficiency (Table 3 FLOPs / index memory) and the bench / flops CLIs."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from metaembed import bench, efficiency
from metaembed.efficiency import (
    PAPER_TABLE3,
    efficiency_table,
    index_memory_bytes,
    parse_budgets,
    scoring_flops,
)

#: Cells where the plain formula and the paper's printed Table 3 differ at 2 decimals (see module doc).
KNOWN_DIFFS = {("FLOPs (G)", (1, 1)): 0.72, ("FLOPs (G)", (16, 64)): 734.00, ("index memory (GiB)", (1, 1)): 0.67}


def test_formulas():
    assert scoring_flops(16, 64, 3584, 100_000) == 2 * 16 * 64 * 3584 * 100_000
    assert scoring_flops(1, 1, 1, 0) == 0
    assert index_memory_bytes(64, 3584, 100_000) == 100_000 * 64 * 3584 * 2
    assert index_memory_bytes(1, 8, 10, dtype_bytes=4) == 320
    with pytest.raises(ValueError, match="r_q must be >= 1"):
        scoring_flops(-1, 1, 1, 1)
    with pytest.raises(TypeError, match="D must be an int"):
        index_memory_bytes(1, 2.5, 1)


def test_formulas_reject_empty_budgets_and_dims():
    """A budget of 0 vectors (or D = 0, 0-byte dtype) is an error, not 0 FLOPs / 0 bytes; N = 0 is fine."""
    assert index_memory_bytes(4, 8, 0) == 0
    for args in [(0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1)]:
        with pytest.raises(ValueError, match="must be >= 1"):
            scoring_flops(*args)
    for args in [(0, 1, 1), (1, 0, 1), (1, 1, 1, 0)]:
        with pytest.raises(ValueError, match="must be >= 1"):
            index_memory_bytes(*args)
    # Python ints: no overflow for large indexes
    assert index_memory_bytes(64, 3584, 10**14, 4) == 64 * 3584 * 10**14 * 4 > 2**63


def test_table3_numbers():
    """Paper config (D=3584, N=100k, bf16) reproduces Table 3's FLOPs and memory columns."""
    table = efficiency_table()
    assert table["budget"].tolist() == ["(1,1)", "(2,4)", "(4,8)", "(8,16)", "(16,64)"]
    for _, row in table.iterrows():
        budget = (row["r_q"], row["r_c"])
        paper = PAPER_TABLE3[budget]
        for col, key in (("FLOPs (G)", "gflops"), ("index memory (GiB)", "memory_gib")):
            want = KNOWN_DIFFS.get((col, budget), paper[key])
            assert round(row[col], 2) == pytest.approx(want, abs=1e-9), (col, budget)
            assert row[col] == pytest.approx(paper[key], rel=0.02)  # even the odd cells are within 2 %
    assert table["index memory (GiB)"].iloc[0] == pytest.approx(0.6676, abs=1e-4)  # paper prints 0.68


def test_table_other_settings():
    t = efficiency_table(D=128, N=1000, budgets=[(2, 4)], dtype="float32")
    assert t["FLOPs (G)"].iloc[0] == pytest.approx(2 * 2 * 4 * 128 * 1000 / 1e9)
    assert t["index memory (GiB)"].iloc[0] == pytest.approx(1000 * 4 * 128 * 4 / 2**30)
    with pytest.raises(ValueError, match="dtype"):
        efficiency_table(dtype="float8")


def test_parse_budgets():
    assert parse_budgets("1,1 2,4  16x64") == [(1, 1), (2, 4), (16, 64)]
    assert parse_budgets(["1,1 2,4", "(8,16)"]) == [(1, 1), (2, 4), (8, 16)]
    with pytest.raises(ValueError):
        parse_budgets("1;x")
    with pytest.raises(ValueError, match="no budgets"):
        parse_budgets("  ")


def _cli(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_flops_cli(capsys, tmp_path):
    out = tmp_path / "new" / "t.json"  # a folder that does not exist yet is made, as eval --json does
    assert _cli(efficiency, ["--budgets", "1,1 16,64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| (16,64) | 734.00 | 42.72 |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["budget"] for r in rows] == ["(1,1)", "(16,64)"]
    assert _cli(efficiency, ["--budgets", "oops"]) == 2
    # small settings: significant digits, not the 0.00 that hid every value below 0.005
    assert _cli(efficiency, ["--D", "128", "--N", "1000", "--budgets", "1,1 2,4"]) == 0
    text = capsys.readouterr().out
    assert "| (1,1) | 0.000256 | 0.000238 |" in text and "| (2,4) | 0.00205 | 0.000954 |" in text


def test_bench_cpu_small(capsys, tmp_path):
    out = tmp_path / "b.json"
    argv = ["--device", "cpu", "--D", "16", "--N", "50", "--batch-size", "3", "--budgets", "1,1", "2,4",
            "--runs", "2", "--warmup", "0", "--json", str(out)]
    assert _cli(bench, argv) == 0
    text = capsys.readouterr().out
    assert "| (2,4) |" in text and "per query (ms)" in text and "copy bandwidth" in text
    res = json.loads(out.read_text())
    assert res["config"]["N"] == 50 and res["device"]["type"] == "cpu" and res["complete"] is True
    row = res["rows"][1]
    assert row["gflops_per_query"] == pytest.approx(scoring_flops(2, 4, 16, 50) / 1e9)
    assert row["per_query_ms"] == pytest.approx(row["batch_ms"] / 3)
    assert row["reference_status"] == "ok" and row["reference_ms"] > 0
    assert row["single_ms"] > 0 and 0 < row["single_bw_frac"]


def test_bench_reference_skipped_above_limit():
    cfg = bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2)], device="cpu", runs=1, warmup=0,
                            reference_limit_gib=1e-9, maxsim_cpu=False)
    row = bench.run_benchmark(cfg)["rows"][0]
    assert row["reference_ms"] is None and row["reference_status"].startswith("skipped")


def test_bench_defaults_depend_on_device():
    assert bench.default_config("cpu") == bench.CPU_DEFAULTS
    assert bench.default_config("cuda") == {"D": 3584, "N": 100_000, "batch_size": 1000}


def _fake_maxsim_cpu(tmp_path, monkeypatch, body: str) -> None:
    pkg = tmp_path / "maxsim_cpu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os, signal\nimport numpy as np\n\n\ndef maxsim_scores(query, docs):\n"
                                     + body)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned child inherits sys.path


def test_bench_maxsim_cpu_is_timed_in_a_child(tmp_path, monkeypatch):
    # a correct stand-in: the row gets its timings, measured in the child process
    _fake_maxsim_cpu(tmp_path, monkeypatch, "    return np.einsum('id,njd->nij', query, docs).max(-1).sum(-1)\n")
    cfg = bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2), (2, 4)], device="cpu", runs=1, warmup=0)
    res = bench.run_benchmark(cfg)
    assert res["maxsim_cpu"] is not None
    for row in res["rows"]:
        assert row["maxsim_cpu_status"] == "ok" and row["maxsim_cpu_single_ms"] > 0
    assert "maxsim-cpu 1q (ms)" in bench.format_report(res) and row["single_same_input_ms"] > 0


def test_bench_survives_a_crashing_maxsim_cpu(tmp_path, monkeypatch):
    """maxsim-cpu 0.1.0 segfaults for D >= 512: the benchmark reports it and finishes."""
    _fake_maxsim_cpu(tmp_path, monkeypatch, "    os.kill(os.getpid(), signal.SIGSEGV)\n")
    cfg = bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2), (2, 4)], device="cpu", runs=1, warmup=0)
    rows = bench.run_benchmark(cfg)["rows"]
    assert [r["maxsim_cpu_status"] for r in rows] == ["crashed", "crashed"]
    assert all(r["single_ms"] > 0 for r in rows)


def test_bench_reports_agreement_with_the_references():
    cfg = bench.BenchConfig(D=16, N=300, batch_size=6, budgets=[(1, 1), (4, 8)], device="cpu", runs=1, warmup=0,
                            maxsim_cpu=False)
    res = bench.run_benchmark(cfg)
    for row in res["rows"]:
        assert row["agree_k"] == 100 and row["agree_queries"] == 6 and row["agree_fp64_queries"] == 6
        assert row["agree_max_abs_err_fp64"] <= 1e-5 and row["agree_topk_identical_frac"] == 1.0
    assert "top-100 identical to fp32 ref (6 queries)" in bench.format_report(res)


def test_agreement_detects_a_wrong_scorer():
    """Negative control: scores off by noise fail both agreement targets."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 4, 16), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(300, 8, 16), dim=-1)
    exact = bench.maxsim(q, c, 4, 8)
    good = bench.agreement(exact, q, c, 4, 8, k=100, fp64_queries=5)
    bad = bench.agreement(exact + 0.05 * torch.randn_like(exact), q, c, 4, 8, k=100, fp64_queries=5)
    assert good["agree_max_abs_err_fp64"] <= 1e-5 and good["agree_topk_identical_frac"] == 1.0
    assert good["agree_topk_up_to_ties_frac"] == 1.0
    assert bad["agree_max_abs_err_fp64"] > 1e-3 and bad["agree_topk_identical_frac"] < 0.5
    assert bad["agree_topk_up_to_ties_frac"] < 0.5


def test_agreement_error_is_the_largest_not_a_typical_one():
    """agree_max_abs_err_fp64 is the max over all scores: one candidate off by 0.01 among 5 x 300 exact scores is
    0.01 (a mean would report ~7e-6 and pass the 1e-3 target)."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 4, 16), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(300, 8, 16), dim=-1)
    wrong = bench.maxsim(q, c, 4, 8).clone()
    wrong[3, 123] += 0.01
    err = bench.agreement(wrong, q, c, 4, 8, k=10, fp64_queries=5)["agree_max_abs_err_fp64"]
    assert err == pytest.approx(0.01, abs=1e-5)


def test_agreement_counts_a_near_tie_swap_only_up_to_ties():
    """Swapping the k-th and (k+1)-th candidates is 'not identical' but 'identical up to ties' when they nearly tie."""
    torch.manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(1, 2, 16), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(50, 4, 16), dim=-1)
    c[11] = torch.nn.functional.normalize(c[10] + 1e-7 * torch.randn(4, 16), dim=-1)  # a near-tie with 10
    exact = bench.maxsim(q, c, 2, 4)  # [1, 50]
    order = exact[0].argsort(descending=True).tolist()
    k = min(order.index(10), order.index(11)) + 1  # the pair sits at places k and k + 1
    assert {order[k - 1], order[k]} == {10, 11}
    swapped = exact.clone()
    swapped[0, order[k - 1]], swapped[0, order[k]] = exact[0, order[k]] - 1e-6, exact[0, order[k - 1]] + 1e-6
    out = bench.agreement(swapped, q, c, 2, 4, k=k, fp64_queries=1)
    assert out["agree_topk_identical_frac"] == 0.0 and out["agree_topk_up_to_ties_frac"] == 1.0
    far = exact.clone()  # the same swap with a candidate far below the k-th is no tie
    far[0, order[-1]] = exact[0, order[0]] + 1.0
    assert bench.agreement(far, q, c, 2, 4, k=k, fp64_queries=1)["agree_topk_up_to_ties_frac"] == 0.0


def test_bench_times_the_chunked_torch_path_and_speedups():
    """The kernel's comparison columns (on by default only when the scorer is the CUDA kernel)."""
    cfg = bench.BenchConfig(D=8, N=40, batch_size=6, budgets=[(1, 2), (2, 4)], device="cpu", runs=1, warmup=0,
                            maxsim_cpu=False, agreement=False, torch_chunked=True, torch_queries=4, torch_runs=2)
    res = bench.run_benchmark(cfg)
    for row in res["rows"]:
        assert row["torch_chunked_queries"] == 4 and row["torch_chunked_per_query_ms"] > 0
        assert row["speedup_vs_torch_chunked"] == pytest.approx(row["torch_chunked_per_query_ms"] / row["per_query_ms"])
        assert row["speedup_vs_reference"] == pytest.approx(row["reference_ms"] / row["batch_ms"])
    assert "chunked PyTorch per query (4 q, ms)" in bench.format_report(res)
    default = bench.run_benchmark(bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2)], device="cpu", runs=1,
                                                    warmup=0, maxsim_cpu=False, agreement=False))
    assert "torch_chunked_per_query_ms" not in default["rows"][0]  # on CPU the scorer is the chunked path itself
    with pytest.raises(ValueError, match="torch_queries=0"):
        bench.run_benchmark(bench.BenchConfig(D=8, N=40, batch_size=2, device="cpu", torch_queries=0))


def test_bench_times_the_triton_kernel_and_streams_rows():
    """Forced on CPU, where conftest runs Triton in its interpreter (on by default only on a GPU)."""
    pytest.importorskip("triton")
    seen = []
    cfg = bench.BenchConfig(D=16, N=40, batch_size=3, budgets=[(1, 2), (2, 4)], device="cpu", runs=1, warmup=0,
                            maxsim_cpu=False, agreement=False, triton=True, triton_runs=1,
                            dtype="float16")  # the interpreter mis-reads bf16
    res = bench.run_benchmark(cfg, on_row=seen.append)
    assert [r["budget"] for r in seen] == ["(1,2)", "(2,4)"]
    for row in res["rows"]:
        assert row["triton_status"] == "ok" and row["triton_per_query_ms"] > 0
        assert row["triton_max_abs_diff"] <= 1e-5  # same fp16 inputs, fp32 accumulation
    assert "Triton per query (ms)" in bench.format_report(res)


def test_bench_json_keeps_finished_rows_when_cut_short(tmp_path, monkeypatch):
    """A run killed mid-way (time limit) leaves the finished budgets' rows as JSON, marked incomplete."""
    real, calls = bench.agreement, []

    def agreement(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "agreement", agreement)
    out = tmp_path / "b.json"
    with pytest.raises(RuntimeError, match="killed"):
        _cli(bench, ["--device", "cpu", "--D", "16", "--N", "50", "--batch-size", "3", "--budgets", "1,1", "2,4",
                     "--runs", "1", "--warmup", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and [r["budget"] for r in data["rows"]] == ["(1,1)"]
    # ... with the setting they were measured at
    assert data["config"]["N"] == 50 and data["config"]["batch_size"] == 3 and data["device"]["type"] == "cpu"
    assert data["peaks"]["copy_GBps"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--D", "0"], "D="), (["--batch-size", "0"], "B="), (["--N", "0"], "N="),
    (["--backend", "cuda"], "backend cuda needs the CUDA kernel"),
])
def test_bench_rejects_bad_settings_before_measuring(argv, message, capsys, monkeypatch):
    """0 is not 'the default'; a CPU run asked for the CUDA kernel stops before measuring anything."""
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: pytest.fail("measured before rejecting"))
    assert _cli(bench, ["--device", "cpu", "--N", "50", "--budgets", "1,1", "--runs", "1", "--warmup", "0",
                        *argv]) == 2
    assert message in capsys.readouterr().err


def test_agreement_is_not_vacuous_when_k_covers_the_index():
    """With k >= N every top-k is the whole index: no fraction (rather than a 100% that checks nothing)."""
    cfg = bench.BenchConfig(D=16, N=60, batch_size=4, budgets=[(1, 1)], device="cpu", runs=1, warmup=0,
                            maxsim_cpu=False, reference=False)
    res = bench.run_benchmark(cfg)
    row = res["rows"][0]
    assert row["agree_k"] == 100 and row["agree_topk_identical_frac"] is None
    assert row["agree_max_abs_err_fp64"] <= 1e-5  # the score check still runs
    assert "n/a (k >= N" in bench.format_report(res)
    cfg.agreement_k = 59
    assert bench.run_benchmark(cfg)["rows"][0]["agree_topk_identical_frac"] == 1.0


# --------------------------------------------------------------------------- mutation-testing gaps (helper 95)


def test_paper_table3_as_printed():
    """Table 3 of the paper, cell by cell (the notebook prints these beside the reproduction)."""
    printed = """(1, 1)	0.71	1.67 0.13	0.68	71.3
                 (2, 4)	5.73	1.66 0.12	2.67	72.0
                 (4, 8)	22.94	1.67 0.12	5.34	72.9
                 (8, 16)	91.75	1.92 0.12	10.68	74.3
                 (16, 64)	733.89	6.25 0.07	42.72	76.6"""
    want = {}
    for line in printed.splitlines():
        budget, rest = line.strip().split(")", 1)
        r_q, r_c = (int(x) for x in budget.strip("(").split(","))
        gflops, ms, std, gib, mmeb = (float(x) for x in rest.split())
        want[(r_q, r_c)] = {"gflops": gflops, "latency_ms": ms, "latency_std_ms": std, "memory_gib": gib, "mmeb": mmeb}
    assert PAPER_TABLE3 == want
    assert (efficiency.PAPER_D, efficiency.PAPER_N, efficiency.PAPER_BATCH) == (3584, 100_000, 1_000)


def test_dtype_bytes_of_every_index_dtype():
    from metaembed.efficiency import DTYPE_BYTES, dtype_bytes

    assert DTYPE_BYTES == {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int8": 1}
    assert dtype_bytes("torch.float32") == 4 == dtype_bytes(torch.float32) and dtype_bytes("torch.int8") == 1
    for name, size in DTYPE_BYTES.items():
        assert torch.empty((), dtype=getattr(torch, name)).element_size() == size
        t = efficiency_table(D=8, N=10, budgets=[(1, 2)], dtype=name)
        assert t["index memory (GiB)"].iloc[0] == pytest.approx(10 * 2 * 8 * size / 2**30)
    assert efficiency.GIB == 2**30


def test_table_memory_follows_r_c_and_flops_follow_n():
    t = efficiency_table(D=4, N=10, budgets=[(1, 8), (8, 1)], dtype="float32")
    assert t["index memory (GiB)"].tolist() == pytest.approx([10 * 8 * 4 * 4 / 2**30, 10 * 1 * 4 * 4 / 2**30])
    assert t["FLOPs (G)"].tolist() == pytest.approx([2 * 8 * 4 * 10 / 1e9] * 2)


def test_parse_budgets_takes_semicolons():
    assert parse_budgets("1,1;2,4; 16,64") == [(1, 1), (2, 4), (16, 64)]


def test_markdown_table_blank_for_none_and_every_row():
    text = efficiency.markdown_table([{"a": 1.234, "b": None}, {"a": 2.0, "b": "x"}], ["a", "b"])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1.23 |  |", "| 2.00 | x |"]


def test_flops_cli_default_budgets_dtype_and_json_to_stdout(capsys):
    assert _cli(efficiency, ["--D", "8", "--N", "10", "--dtype", "float32", "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out[out.index("{"):])
    assert doc["dtype"] == "float32" and [r["budget"] for r in doc["rows"]] == ["(1,1)", "(2,4)", "(4,8)", "(8,16)",
                                                                                "(16,64)"]
    assert doc["rows"][-1]["index memory (GiB)"] == pytest.approx(10 * 64 * 8 * 4 / 2**30)
    assert "| (16,64) |" in out
