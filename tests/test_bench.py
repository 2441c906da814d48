"""metaembed.bench timing helpers (CPU-runnable; CUDA calls are faked)."""
from __future__ import annotations

import pytest
import torch
from metaembed import bench


def test_time_ms_records_events_on_the_benchmarked_devices_stream(monkeypatch):
    """--device cuda:1 while cuda:0 is current: the events must bracket fn's work on cuda:1's stream,
    not the current device's (Event.record() without a stream), or the latency is ~0 and unsynchronised."""
    current = 0
    recorded = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.stream = None

        def record(self, stream=None):
            self.stream = stream if stream is not None else fake_current_stream()
            recorded.append(self.stream)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    def fake_current_stream(device=None):
        dev = torch.device(device) if device is not None else torch.device("cuda", current)
        return f"stream-of-cuda:{current if dev.index is None else dev.index}"

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", fake_current_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    mean, std = bench.time_ms(lambda: None, torch.device("cuda:1"), runs=3, warmup=1)
    assert (mean, std) == (1.0, 0.0)
    assert recorded == ["stream-of-cuda:1"] * 6


# the exact error PyTorch's CPU allocator raises (a plain RuntimeError, not torch.OutOfMemoryError)
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 524288000000 bytes. Error code 12 (Cannot allocate memory)")


def test_cpu_allocation_failure_is_an_oom():
    assert bench._is_oom(RuntimeError(CPU_OOM))
    assert bench._is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bench._is_oom(MemoryError())
    assert bench._is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not bench._is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_cli_index_too_large_for_cpu_memory_is_a_usage_error(monkeypatch, capsys):
    """--device cpu with an index beyond RAM: the "does not fit" message and rc 2, not a traceback."""
    from metaembed.cli import main as cli_main

    def no_memory(shape, dtype, device, gen_rows=4096):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(bench, "_random_unit", no_memory)
    rc = cli_main(["bench", "--device", "cpu", "--N", "1000000", "--D", "4096", "--budgets", "16,64"])
    assert rc == 2
    assert "does not fit on cpu" in capsys.readouterr().err


def _ref_inputs(B=2, N=64, R_q=4, R_c=8, D=16, dtype=torch.bfloat16):
    return torch.randn(B, R_q, D).to(dtype), torch.randn(N, R_c, D).to(dtype)


def _ref_cfg(limit_gib=4.0):
    return bench.BenchConfig(device="cpu", reference_limit_gib=limit_gib)


def test_reference_cpu_oom_is_reported(monkeypatch):
    queries, index = _ref_inputs()

    def timed(fn):
        raise RuntimeError(CPU_OOM)

    row = bench._reference(_ref_cfg(), torch.device("cpu"), queries, index, 4, 8, timed)
    assert row["reference_ms"] is None and row["reference_status"].startswith("OOM (needs ~")


def _reference_formula(B, N, R_q, R_c, D, r_q, r_c, esize, threads):
    """What maxsim_reference allocates: sim [B, N, r_q, r_c] once, its max over r_c [B, N, r_q], the scores
    [B, N], contiguous copies of non-contiguous prefixes, and the CPU GEMM workspace."""
    copies = (B * r_q * D if r_q < R_q else 0) + (N * r_c * D if r_c < R_c else 0)
    return (B * N * r_q * r_c + B * N * r_q + B * N + copies) * esize + threads * bench.MATMUL_WORKSPACE_PER_THREAD


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r_q, r_c", [(4, 8), (2, 4), (4, 2)])
def test_reference_memory_estimate_follows_what_maxsim_reference_allocates(dtype, r_q, r_c):
    B, N, R_q, R_c, D = 3, 100_000, 4, 8, 3584  # meta tensors: shapes only
    queries = torch.empty(B, R_q, D, dtype=dtype, device="meta")
    index = torch.empty(N, R_c, D, dtype=dtype, device="meta")
    expected = _reference_formula(B, N, R_q, R_c, D, r_q, r_c, dtype.itemsize, torch.get_num_threads())
    assert bench.reference_bytes(queries, index, r_q, r_c) == expected
    # the skip message quotes it
    row = bench._reference(_ref_cfg(expected / bench.GIB * 0.99), torch.device("cpu"), queries, index, r_q, r_c,
                           timed=None)
    assert row["reference_status"] == f"skipped (needs ~{expected / bench.GIB:.1f} GiB)"


def test_reference_runs_when_its_real_allocation_fits_the_limit(monkeypatch):
    """bf16 sim + max once (not fp32 twice plus an upcast index, ~4x more): under the limit, it runs."""
    monkeypatch.setattr(bench, "MATMUL_WORKSPACE_PER_THREAD", 0, raising=False)  # independent of the thread count
    B, N, R_q, R_c, D = 2, 4096, 16, 64, 16
    queries, index = _ref_inputs(B, N, R_q, R_c, D)
    need = _reference_formula(B, N, R_q, R_c, D, 16, 64, 2, torch.get_num_threads())
    old = (B * N * 16 * 64 * 2 + N * 64 * D) * 4
    limit = max(need, old // 2) / bench.GIB  # between the real allocation and the old 4x estimate
    row = bench._reference(_ref_cfg(limit), torch.device("cpu"), queries, index, 16, 64, timed=lambda fn: (1.0, 0.0))
    assert row["reference_status"] == "ok"


def test_copy_bandwidth_source_is_written_before_timing(monkeypatch):
    """An untouched torch.empty source reads the shared zero page (inflated copy bandwidth): it must be filled.
    The spy hands out zeroed buffers (what a fresh mapping holds) and checks the copy source was overwritten."""
    made = []

    def spy_empty(*shape, **kwargs):
        t = torch.zeros(*shape, **kwargs)
        if kwargs.get("dtype") == torch.uint8:
            made.append(t)
        return t

    monkeypatch.setattr(torch, "empty", spy_empty)
    monkeypatch.setattr(bench, "time_ms", lambda fn, device, runs, warmup: (1.0, 0.0))  # no timing loops
    peaks = bench.measure_peaks(torch.device("cpu"), torch.float32, runs=1)
    assert peaks["copy_GBps"] > 0
    src = made[0]
    assert src.numel() == 256 << 20 and bool(src.all())  # every byte written (non-zero)


def test_bare_gemm_has_the_batch_shape_in_column_blocks(monkeypatch):
    """The issue's "at least 0.9x the time of a bare bf16 GEMM of the same shape": [B*r_q, D] x [D, N*r_c],
    every candidate column exactly once (blocks into a reused buffer, a shorter tail), timed, speed = gemm / batch."""
    B, N, R_q, R_c, D, r_q, r_c = 3, 50, 4, 8, 16, 2, 5
    queries, index = _ref_inputs(B, N, R_q, R_c, D)
    calls, real_mm = [], torch.mm

    def spy_mm(a, b, *, out):
        calls.append((tuple(a.shape), tuple(b.shape), tuple(out.shape)))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", spy_mm)
    monkeypatch.setattr(bench, "time_ms", lambda fn, device, runs, warmup: (fn(), (2.0, 0.5))[1])
    cfg = bench.BenchConfig(device="cpu", gemm_runs=1)
    row = bench.bare_gemm(cfg, torch.device("cpu"), queries, index, r_q, r_c, batch_ms=4.0,
                          flops=bench.scoring_flops(r_q, r_c, D, N), peaks={"matmul_TFLOPs": 1.0},
                          out_bytes=B * r_q * 4 * 64)  # fp32 on CPU: 64 columns per block
    assert calls[: len(calls) // 2] == calls[len(calls) // 2:]  # warm-up, then the timed call
    one = calls[: len(calls) // 2]
    assert [c[0] for c in one] == [(B * r_q, D)] * 4 and sum(c[1][1] for c in one) == N * r_c  # 250 = 3 x 64 + 58
    assert [c[2] for c in one] == [(B * r_q, 64)] * 3 + [(B * r_q, 58)]
    assert row["gemm_status"] == "ok" and row["gemm_batch_ms"] == 2.0 and row["speed_vs_gemm"] == 0.5
    assert row["gemm_TFLOPs"] == pytest.approx(B * 2 * r_q * r_c * D * N / 2e-3 / 1e12)


def test_bench_reports_the_bare_gemm():
    cfg = bench.BenchConfig(D=8, N=40, batch_size=3, budgets=[(1, 2), (2, 4)], device="cpu", runs=1, warmup=0,
                            maxsim_cpu=False, agreement=False, reference=False, gemm=True, gemm_runs=1)
    res = bench.run_benchmark(cfg)
    for row in res["rows"]:
        assert row["gemm_status"] == "ok" and row["speed_vs_gemm"] == pytest.approx(row["gemm_batch_ms"] / row["batch_ms"])
    assert "speed vs bare GEMM" in bench.format_report(res)
    default = bench.run_benchmark(bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2)], device="cpu", runs=1,
                                                    warmup=0, maxsim_cpu=False, agreement=False, reference=False))
    assert "gemm_status" not in default["rows"][0]  # on by default on GPU only


def test_one_timed_run_reports_no_spread_instead_of_a_zero_std():
    """``--runs 1``: one timing has no standard deviation; it used to be reported as ``± 0.000``, a spread that
    was never measured."""
    assert bench.time_ms(lambda: None, torch.device("cpu"), runs=1, warmup=0)[1] is None
    assert bench.time_ms(lambda: None, torch.device("cpu"), runs=2, warmup=0)[1] is not None
    res = bench.run_benchmark(bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2)], device="cpu", runs=1,
                                                warmup=0, maxsim_cpu=False, agreement=False, reference=False))
    row = res["rows"][0]
    assert row["single_ms_std"] is None and row["batch_ms_std"] is None and row["per_query_ms_std"] is None
    report = bench.format_report(res)
    table = [line for line in report.splitlines() if line.startswith("| (1,2)") or line.startswith("| (1, 2)")]
    assert table and "±" not in table[0]


@pytest.mark.parametrize("budgets, message", [([], "no budgets"), ([(0, 1)], "r_q >= 1"), ([(1, 2), (2,)], "pair"),
                                              ([(1.5, 2)], "must be an integer")])
def test_bad_budgets_are_rejected_before_the_index_is_built(budgets, message, monkeypatch):
    """run_benchmark (the API; the CLI parses its --budgets): a clear ValueError before the index is generated
    and the device peaks are measured (minutes at the paper size), not max()'s or an IndexError, or after both."""
    def no_setup(*args, **kwargs):
        raise AssertionError("index built / peaks measured before the budgets were checked")

    monkeypatch.setattr(bench, "_random_unit", no_setup)
    monkeypatch.setattr(bench, "measure_peaks", no_setup)
    cfg = bench.BenchConfig(D=8, N=40, batch_size=2, budgets=budgets, device="cpu", runs=1, warmup=0,
                            maxsim_cpu=False)
    with pytest.raises(ValueError, match=message):
        bench.run_benchmark(cfg)


def test_cli_json_to_stdout_is_one_document_after_the_report(capsys):
    """--json - : the partial results (rewritten after each row into a file) must not go to stdout too."""
    import json

    from metaembed.cli import main as cli_main

    rc = cli_main(["bench", "--device", "cpu", "--D", "8", "--N", "40", "--batch-size", "2", "--budgets", "1,1", "2,4",
                   "--runs", "1", "--warmup", "0", "--no-agreement", "--no-reference", "--json", "-"])
    assert rc == 0
    out = capsys.readouterr().out
    report, sep, doc = out.partition("\n{")
    assert sep and report.startswith("## Scoring benchmark") and '"complete"' not in report
    result = json.loads("{" + doc)  # exactly one JSON document, the complete one
    assert result["complete"] is True and [r["budget"] for r in result["rows"]] == ["(1,1)", "(2,4)"]


@pytest.mark.parametrize("field, value", [("agreement_k", 0), ("agreement_k", -1), ("agreement_fp64_queries", 0)])
def test_bad_agreement_settings_are_rejected_before_measuring(field, value, monkeypatch):
    """k = 0 reported a vacuous 100% "identical top-0"; 0 fp64 queries (or k < 0) failed with a bare RuntimeError
    after the first budget's timings."""
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: pytest.fail("measured before rejecting"))
    cfg = bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2)], device="cpu", runs=1, warmup=0,
                            maxsim_cpu=False, reference=False, **{field: value})
    with pytest.raises(ValueError, match=f"need agreement_k and agreement_fp64_queries >= 1 .*{value}"):
        bench.run_benchmark(cfg)
    cfg.agreement = False  # the setting is only read by the check it skips
    monkeypatch.undo()
    assert "agree_k" not in bench.run_benchmark(cfg)["rows"][0]


@pytest.mark.parametrize("device", ["meta", "foo", "cuda:x", "mps"])
def test_devices_the_benchmark_cannot_time_are_usage_errors(device, monkeypatch, capsys):
    """``meta`` printed a whole table of timings of no work; other accelerators' async launches would be timed by
    perf_counter without a sync; a bad device string was a traceback.  Now a ValueError (CLI: rc 2) up front."""
    from metaembed.cli import main as cli_main

    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: pytest.fail("measured on an untimeable device"))
    cfg = bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2)], device=device, runs=1, warmup=0,
                            maxsim_cpu=False, agreement=False, reference=False)
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        bench.run_benchmark(cfg)
    assert cli_main(["bench", "--device", device, "--D", "8", "--N", "40", "--budgets", "1,2"]) == 2
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_cuda_device_index_beyond_the_devices_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="cuda:3: there are 1 CUDA device"):
        bench._resolve_device("cuda:3")
    assert bench._resolve_device("cuda:0") == torch.device("cuda:0")


def test_fp32_matmul_peak_is_measured_without_tf32(monkeypatch):
    """A caller's TF32 setting (torch.set_float32_matmul_precision("high")) made the fp32 "peak" a TF32 one (~8x on
    a GPU) while the kernel's fp32 path is true fp32: its FLOP fraction was understated.  The setting is restored."""
    seen = []

    def spy(fn, device, runs, warmup):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return 1.0, None

    monkeypatch.setattr(bench, "time_ms", spy)
    prev = torch.backends.cuda.matmul.allow_tf32  # (a property: monkeypatch cannot restore it)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        bench.measure_peaks(torch.device("cpu"), torch.float32, runs=1)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert seen == [True, False]  # the copy (untouched), then the matmul in true fp32


def test_small_latencies_keep_three_significant_digits():
    """A GPU's amortised per-query time at the paper setting (~2.4e-4 ms at (1,1)) printed as "0.0002 ± 0.0000":
    one digit, 17% off, and a spread shown as zero."""
    assert bench._pm(0.00024, 0.00003, 4) == "0.000240 ± 0.000030"
    assert bench._pm(0.0818, 0.01, 4) == "0.0818 ± 0.0100"  # already 3 significant digits: unchanged
    assert bench._pm(1.5, 0.1, 2) == "1.50 ± 0.10" and bench._pm(0.00024, None, 4) == "0.000240"
    assert bench._pm(0.0, 0.0, 2) == "0.00 ± 0.00" and bench._pm(None, None) == "-"


def test_backend_is_checked_up_front_and_named(monkeypatch):
    """An unknown backend failed at the first timing, after the index and peaks; backend="triton" (API) was
    reported as "chunked PyTorch" on CPU (and as the CUDA kernel on GPU) while Triton scored."""
    base = dict(D=8, N=8, batch_size=1, budgets=[(1, 1)], device="cpu", runs=1, warmup=0, maxsim_cpu=False,
                agreement=False, reference=False)
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: pytest.fail("measured before rejecting"))
    with pytest.raises(ValueError, match="backend='fast'; expected one of"):
        bench.run_benchmark(bench.BenchConfig(backend="fast", **base))
    monkeypatch.setattr(bench, "_triton_available", lambda device: False)
    with pytest.raises(ValueError, match="backend='triton' needs Triton"):
        bench.run_benchmark(bench.BenchConfig(backend="triton", **base))
    assert bench._backend_name(torch.device("cpu"), "triton", torch.float32) == \
        "metaembed.kernels.triton_maxsim (Triton)"
    assert bench._backend_name(torch.device("cpu"), "auto", torch.float32) == "metaembed.maxsim (chunked PyTorch)"
