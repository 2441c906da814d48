"""metaembed.bench timing helpers (CPU-runnable; CUDA calls are faked)."""
from __future__ import annotations

import pytest
import torch
from metaembed import bench
from metaembed.efficiency import fixed_or_sig, sig_figures


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
    assert row["gemm_flop_frac"] == pytest.approx(row["gemm_TFLOPs"] / 1.0)  # over the matmul peak
    assert row["gemm_dtype"] == "float32"  # bf16 inputs, the CPU matmul dtype of measure_peaks


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
    assert seen == [True, False, False, False]  # the copy (untouched), then the matmuls in true fp32


def test_no_tf32_restores_a_false_setting_too():
    """_no_tf32 puts back the caller's TF32 setting whatever it was: leaving it True after a benchmark would make the
    caller's later fp32 matmuls TF32 (10-bit mantissa) on a GPU."""
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        for before in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = before
            with bench._no_tf32():
                assert torch.backends.cuda.matmul.allow_tf32 is False
            assert torch.backends.cuda.matmul.allow_tf32 is before
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


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


# --------------------------------------------------------------------------- mutation-testing gaps (helper 97)
# The figures of Table 3 (latency, per-query latency, bandwidth / FLOP fractions) from fake clocks and fake
# peaks, so every unit, numerator and denominator is checked exactly; GPU-only columns through format_report.


def test_time_ms_on_cpu_is_the_mean_and_sample_std_in_ms_of_the_timed_runs_only(monkeypatch):
    """``warmup`` untimed calls, then ``runs`` timed ones: call k takes k ms on a fake clock, so the warm-up
    calls (1, 2 ms) must not enter the mean (4 ms over 3, 4, 5), the std is the sample std (ddof 1: 1.0, not
    0.816) and the unit is ms (not s)."""
    import types

    clock, calls = [0.0], []

    def fn():
        calls.append(1)
        clock[0] += len(calls) * 1e-3

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    mean, std = bench.time_ms(fn, torch.device("cpu"), runs=3, warmup=2)
    assert len(calls) == 5
    assert mean == pytest.approx(4.0) and std == pytest.approx(1.0)


def test_measure_peaks_units_and_best_of_runs(monkeypatch):
    """Copy bandwidth counts read + write (2 x bytes) in GB (1e9), the matmul 2 n^3 FLOPs in TFLOP (1e12), each
    from its best (fastest) run; on CPU the matmul is fp32 whatever the index dtype (the CPU scorer's), and its
    peak the best over three sizes (a 2048^3 matmul alone ran at a third of 512^3's rate on a shared host, and
    the scorer reached 150-170% of that "peak"; a review helper)."""
    # the copy's three runs (best 2 ms), then the matmul's at n = 512 (best 1 ms), 1024 (best 4 ms), 2048 (best 80)
    times = iter([5.0, 2.0, 4.0, 1.0, 3.0, 2.0, 8.0, 4.0, 9.0, 90.0, 80.0, 85.0])
    monkeypatch.setattr(bench, "time_ms", lambda fn, device, runs, warmup: (next(times), None))
    peaks = bench.measure_peaks(torch.device("cpu"), torch.bfloat16, runs=3)
    nbytes = 256 << 20
    assert peaks["copy_GBps"] == pytest.approx(2 * nbytes / 2e-3 / 1e9)
    assert peaks["matmul_TFLOPs"] == pytest.approx(2 * 1024**3 / 4e-3 / 1e12)  # 0.54, vs 0.27 at 512, 0.21 at 2048
    assert peaks["matmul_dtype"] == "float32" and peaks["matmul_n"] == 1024


FAKE_PEAKS = {"copy_GBps": 0.004, "matmul_TFLOPs": 1e-5, "matmul_dtype": "float32", "matmul_n": 2048}


def _fake_clock(monkeypatch):
    """run_benchmark on a fake clock: a maxsim call takes 1 + (queries scored) ms, maxsim_reference 100 + that,
    with a tenth of it as std; the peaks are FAKE_PEAKS.  Returns the recorded calls (scorer shapes) and timings."""
    calls, timings = [], []
    real_maxsim, real_ref = bench.maxsim, bench.maxsim_reference

    def maxsim(q, c, r_q=None, r_c=None, **kw):
        calls.append(("maxsim", tuple(q.shape), tuple(c.shape), q.dtype, r_q, r_c, kw.get("backend")))
        return real_maxsim(q, c, r_q, r_c, **kw)

    def reference(q, c, r_q=None, r_c=None):
        calls.append(("reference", tuple(q.shape), tuple(c.shape), q.dtype, r_q, r_c, None))
        return real_ref(q, c, r_q, r_c)

    def time_ms(fn, device, runs, warmup):
        n = len(calls)
        fn()
        (what, shape, *_), = calls[n:]
        ms = (100.0 if what == "reference" else 1.0) + shape[0]
        timings.append((what, shape[0], runs, warmup))
        return ms, ms / 10

    monkeypatch.setattr(bench, "maxsim", maxsim)
    monkeypatch.setattr(bench, "maxsim_reference", reference)
    monkeypatch.setattr(bench, "time_ms", time_ms)
    monkeypatch.setattr(bench, "measure_peaks", lambda device, dtype, runs=5: dict(FAKE_PEAKS))
    return calls, timings


def test_rows_latencies_fractions_and_units_from_a_fake_clock(monkeypatch):
    """Every measured figure of a row from known timings: one query ([1, R_q, D] over the whole index) vs the
    batch amortised per query (time / B, std / B); bandwidth = index bytes (the dtype's) / the one-query time in
    GB/s; FLOP rate = B x FLOPs / the batch time in TFLOP/s; each over its peak; the reference's speed-up over
    the batch; every budget timed with --runs after --warmup; the JSON config as given."""
    calls, timings = _fake_clock(monkeypatch)
    B, D, N = 4, 8, 40
    cfg = bench.BenchConfig(D=D, N=N, batch_size=B, budgets=[(1, 2), (2, 4)], dtype="float32", device="cpu", runs=3,
                            warmup=1, maxsim_cpu=False, agreement=False)
    res = bench.run_benchmark(cfg)
    assert {k: res["config"][k] for k in ("D", "N", "batch_size", "dtype", "R_q", "R_c", "runs", "warmup")} == \
        {"D": D, "N": N, "batch_size": B, "dtype": "float32", "R_q": 2, "R_c": 4, "runs": 3, "warmup": 1}
    assert [r["budget"] for r in res["rows"]] == ["(1,2)", "(2,4)"]
    assert {(runs, warmup) for *_, runs, warmup in timings} == {(3, 1)}
    assert [(c[0], c[1], c[2], c[4], c[5]) for c in calls] == [
        ("maxsim", (1, 2, D), (N, 4, D), 1, 2), ("maxsim", (B, 2, D), (N, 4, D), 1, 2),
        ("reference", (B, 2, D), (N, 4, D), 1, 2),
        ("maxsim", (1, 2, D), (N, 4, D), 2, 4), ("maxsim", (B, 2, D), (N, 4, D), 2, 4),
        ("reference", (B, 2, D), (N, 4, D), 2, 4)]
    for row in res["rows"]:
        r_q, r_c = row["r_q"], row["r_c"]
        flops, mem = 2 * r_q * r_c * D * N, N * r_c * D * 4  # fp32: 4 bytes
        assert row["gflops_per_query"] == pytest.approx(flops / 1e9)
        assert row["index_gib"] == pytest.approx(mem / 2**30)
        assert (row["single_ms"], row["single_ms_std"]) == (2.0, pytest.approx(0.2))  # 1 + 1 query
        assert (row["batch_ms"], row["batch_ms_std"]) == (5.0, pytest.approx(0.5))  # 1 + 4 queries
        assert (row["per_query_ms"], row["per_query_ms_std"]) == (1.25, pytest.approx(0.125))
        assert row["single_GBps"] == pytest.approx(mem / 2e-3 / 1e9)
        assert row["single_bw_frac"] == pytest.approx(mem / 2e-3 / 1e9 / FAKE_PEAKS["copy_GBps"])
        assert row["batch_TFLOPs"] == pytest.approx(B * flops / 5e-3 / 1e12)
        assert row["batch_flop_frac"] == pytest.approx(B * flops / 5e-3 / 1e12 / FAKE_PEAKS["matmul_TFLOPs"])
        assert (row["reference_ms"], row["reference_ms_std"]) == (104.0, pytest.approx(10.4))
        assert row["speedup_vs_reference"] == pytest.approx(104.0 / 5.0)
        assert "paper_ms" not in row  # not the paper's setting, though (2,4) is one of its budgets
    # the markdown row: the same figures, each in its column
    line = next(x for x in bench.format_report(res).splitlines() if x.startswith("| (2,4) |"))
    assert line == "| (2,4) | 0.00000512 | 0.00000477 | 2.000 ± 0.200 | 5.00 ± 0.50 | 1.2500 ± 0.1250 | " \
                   "0.00256 (64%) | 0.00000410 (41%) | 104.00 ± 10.40 |"


def test_maxsim_cpu_comparison_is_timed_on_its_own_input(monkeypatch):
    """With maxsim-cpu installed: metaembed timed again on one query and the budget's index prefix as one
    contiguous fp32 array (maxsim-cpu's input), and maxsim-cpu run with --runs / --warmup on each budget."""
    calls, timings = _fake_clock(monkeypatch)
    made = []

    class FakeMaxsimCpu:
        def __init__(self, runs, warmup):
            made.append((runs, warmup))
            self.seen = []

        def __call__(self, queries, index, r_q, r_c):
            self.seen.append((r_q, r_c))
            return {"maxsim_cpu_status": "ok", "maxsim_cpu_single_ms": 7.0, "maxsim_cpu_single_ms_std": 0.7,
                    "maxsim_cpu_per_query_ms": 3.0}

        def close(self):
            made.append("closed")

    monkeypatch.setattr(bench, "_maxsim_cpu_version", lambda: "0.0-fake")
    monkeypatch.setattr(bench, "_MaxsimCpu", FakeMaxsimCpu)
    cfg = bench.BenchConfig(D=8, N=40, batch_size=4, budgets=[(2, 4), (1, 2)], device="cpu", runs=3, warmup=1,
                            agreement=False, reference=False)  # the largest budget first
    res = bench.run_benchmark(cfg)
    assert made == [(3, 1), "closed"] and (res["config"]["R_q"], res["config"]["R_c"]) == (2, 4)
    same_input = [c for c in calls if c[6] is None]  # maxsim(q1, docs): no budget, no backend
    assert [(c[1], c[2], c[3]) for c in same_input] == [((1, 2, 8), (40, 4, 8), torch.float32),
                                                        ((1, 1, 8), (40, 2, 8), torch.float32)]
    for row in res["rows"]:
        assert (row["single_same_input_ms"], row["single_same_input_ms_std"]) == (2.0, pytest.approx(0.2))
        assert row["maxsim_cpu_per_query_ms"] == 3.0
    line = next(x for x in bench.format_report(res).splitlines() if x.startswith("| (1,2) |"))
    assert line.endswith("| 2.000 ± 0.200 | 7.000 ± 0.700 | 3.0000 |")


def test_maxsim_cpu_child_and_the_arrays_it_gets(monkeypatch):
    """The child times one query and the batch (per query = batch time / queries) with --runs after --warmup;
    the parent hands it the budget's prefixes (``[r_q, D]`` queries, ``[N, r_c, D]`` docs) as contiguous fp32."""
    import sys
    import types

    import numpy as np

    scored = []
    fake = types.ModuleType("maxsim_cpu")
    fake.maxsim_scores = lambda q, docs: scored.append((q.shape, docs.shape))
    monkeypatch.setitem(sys.modules, "maxsim_cpu", fake)
    timed = []

    def time_ms(fn, device, runs, warmup):
        n = len(scored)
        fn()
        timed.append((runs, warmup, len(scored) - n))
        return 6.0, 0.6

    monkeypatch.setattr(bench, "time_ms", time_ms)
    qs, docs = [np.zeros((2, 8), np.float32)] * 3, np.zeros((5, 4, 8), np.float32)
    out = bench._maxsim_cpu_child(qs, docs, 4, 1)
    assert out == {"maxsim_cpu_single_ms": 6.0, "maxsim_cpu_single_ms_std": 0.6, "maxsim_cpu_per_query_ms": 2.0,
                   "maxsim_cpu_status": "ok"}
    assert timed == [(4, 1, 1), (4, 1, 3)]

    got = []

    class Pool:  # in-process stand-in for the spawned worker
        def submit(self, fn, qs, docs, runs, warmup):
            got.append(([q.shape for q in qs], docs.shape, docs.dtype, docs.flags.c_contiguous, runs, warmup))
            return types.SimpleNamespace(result=lambda: {"maxsim_cpu_status": "ok"})

    m = bench._MaxsimCpu(4, 1)
    m.pool = Pool()
    m(torch.randn(3, 4, 8).bfloat16(), torch.randn(5, 6, 8).bfloat16(), 2, 3)
    assert got == [([(2, 8)] * 3, (5, 3, 8), np.float32, True, 4, 1)]


def test_paper_setting_rows_carry_table3(monkeypatch):
    """At the paper's setting (D=3584, N=100,000, batch 1,000, bf16) each row carries Table 3's latency and the
    analytic columns follow it (734.00 GFLOPs by the formula, printed 733.89; 42.72 GiB at (16,64)); in fp32 it
    is another setting (no paper column) and the index is twice the size.  Zero-stride tensors and a fake clock:
    nothing is allocated or run."""
    monkeypatch.setattr(bench, "_random_unit", lambda shape, dtype, device: torch.zeros(1, 1, 1, dtype=dtype)
                        .expand(*shape))
    monkeypatch.setattr(bench, "maxsim", lambda *a, **k: pytest.fail("scored"))
    monkeypatch.setattr(bench, "time_ms", lambda fn, device, runs, warmup: (5.0, 0.5))
    monkeypatch.setattr(bench, "measure_peaks", lambda device, dtype, runs=5: dict(FAKE_PEAKS))
    base = dict(D=3584, N=100_000, batch_size=1000, budgets=[(1, 1), (16, 64)], device="cpu", runs=2, warmup=0,
                maxsim_cpu=False, agreement=False, reference=False)
    res = bench.run_benchmark(bench.BenchConfig(**base))
    assert [r["paper_ms"] for r in res["rows"]] == [1.67, 6.25]
    assert [round(r["gflops_per_query"], 2) for r in res["rows"]] == [0.72, 734.0]
    assert round(res["rows"][1]["index_gib"], 2) == 42.72
    line = next(x for x in bench.format_report(res).splitlines() if x.startswith("| (16,64) |"))
    assert line.endswith("| 6.25 |") and "| paper (ms) |" in bench.format_report(res)
    fp32 = bench.run_benchmark(bench.BenchConfig(**base, dtype="float32"))
    assert all("paper_ms" not in r for r in fp32["rows"])
    assert round(fp32["rows"][1]["index_gib"], 2) == 85.45


def test_torch_chunked_is_per_query_over_the_timed_queries(monkeypatch):
    """The chunked path's per-query time divides by the queries it timed (the first --torch-queries, at most the
    batch), with --torch-runs after one warm-up; the speed-up is its per-query time over the scorer's."""
    seen, timed = [], []
    monkeypatch.setattr(bench, "maxsim", lambda q, c, r_q, r_c, backend=None: seen.append((q.shape[0], r_q, r_c,
                                                                                           backend)))

    def time_ms(fn, device, runs, warmup):
        fn()
        timed.append((runs, warmup))
        return 8.0, 0.8

    monkeypatch.setattr(bench, "time_ms", time_ms)
    cfg = bench.BenchConfig(device="cpu", torch_queries=4, torch_runs=2)
    queries, index = _ref_inputs(B=6)
    out = bench._torch_chunked(cfg, torch.device("cpu"), queries, index, 2, 4, per_query_ms=0.5)
    assert seen == [(4, 2, 4, "torch")] and timed == [(2, 1)]
    assert out["torch_chunked_queries"] == 4 and out["torch_chunked_per_query_ms"] == 2.0
    assert out["torch_chunked_per_query_ms_std"] == pytest.approx(0.2) and out["speedup_vs_torch_chunked"] == 4.0
    cfg.torch_queries = 10  # more than the batch: all 6 of them
    out = bench._torch_chunked(cfg, torch.device("cpu"), queries, index, 2, 4, per_query_ms=0.5)
    assert seen[-1][0] == 6 and out["torch_chunked_queries"] == 6 and out["torch_chunked_per_query_ms"] == 8.0 / 6


def test_triton_row_is_per_query_and_a_fraction_of_the_matmul_peak(monkeypatch):
    """The Triton columns: batch time / B per query, B x FLOPs / batch time as TFLOP/s and over the peak, the
    largest difference from the scorer; --triton-runs after the compiling call."""
    monkeypatch.setattr(bench, "maxsim", lambda q, c, r_q, r_c, backend=None: torch.full((q.shape[0], c.shape[0]), 1.5))
    timed = []
    monkeypatch.setattr(bench, "time_ms",
                        lambda fn, device, runs, warmup: (timed.append((runs, warmup)), (6.0, 0.6))[1])
    queries, index = _ref_inputs(B=3, N=5)
    flops = bench.scoring_flops(2, 4, 16, 5)
    cfg = bench.BenchConfig(device="cpu", triton_runs=2)
    row = bench._triton(cfg, torch.device("cpu"), queries, index, 2, 4, scores=torch.full((3, 5), 1.25).bfloat16(),
                        flops=flops, peaks={"matmul_TFLOPs": 2.0})
    assert timed == [(2, 0)]
    assert (row["triton_status"], row["triton_batch_ms"], row["triton_batch_ms_std"]) == ("ok", 6.0, 0.6)
    assert row["triton_per_query_ms"] == 2.0
    assert row["triton_TFLOPs"] == pytest.approx(3 * flops / 6e-3 / 1e12)
    assert row["triton_flop_frac"] == pytest.approx(3 * flops / 6e-3 / 1e12 / 2.0)
    assert row["triton_max_abs_diff"] == 0.25


def _gpu_result():
    """A GPU-style result (the CUDA kernel as scorer) with every optional column, for format_report."""
    config = {"D": 3584, "N": 100_000, "batch_size": 4, "dtype": "bfloat16", "R_q": 16, "R_c": 64, "runs": 3,
              "warmup": 1, "seed": 0, "backend": "auto"}
    first = {"budget": "(1,1)", "r_q": 1, "r_c": 1, "gflops_per_query": 0.7168, "index_gib": 0.0123,
             "single_ms": 25.5, "single_ms_std": 0.5, "batch_ms": 62.5, "batch_ms_std": 7.0, "per_query_ms": 15.625,
             "per_query_ms_std": 1.75, "single_GBps": 1800.0, "single_bw_frac": 0.9, "batch_TFLOPs": 120.0,
             "batch_flop_frac": 0.6, "reference_ms": 500.0, "reference_ms_std": 5.0, "reference_status": "ok",
             "speedup_vs_reference": 8.0, "torch_chunked_queries": 64, "torch_chunked_per_query_ms": 31.25,
             "torch_chunked_per_query_ms_std": 0.25, "speedup_vs_torch_chunked": 2.0, "triton_status": "ok",
             "triton_batch_ms": 20.0, "triton_batch_ms_std": 40.0, "triton_per_query_ms": 5.0, "triton_TFLOPs": 150.0,
             "triton_flop_frac": 0.75, "triton_max_abs_diff": 1.5e-6, "gemm_status": "ok", "gemm_batch_ms": 50.0,
             "gemm_batch_ms_std": 20.0, "speed_vs_gemm": 0.8, "paper_ms": 1.67,
             "single_same_input_ms": 30.0, "single_same_input_ms_std": 1.0, "maxsim_cpu_status": "ok",
             "maxsim_cpu_single_ms": 40.0, "maxsim_cpu_single_ms_std": 2.0, "maxsim_cpu_per_query_ms": 20.0,
             "agree_max_abs_err_fp64": 1.2e-7, "agree_fp64_queries": 4, "agree_tie_tol": 1e-5, "agree_queries": 4,
             "agree_k": 100, "agree_topk_identical_frac": 0.999, "agree_topk_up_to_ties_frac": 1.0}
    second = {**first, "budget": "(2,4)", "r_q": 2, "r_c": 4, "gflops_per_query": 5.7344, "index_gib": 2.67,
              "reference_ms": None, "reference_status": "OOM (needs ~9.0 GiB)", "triton_status": "error: X",
              "gemm_status": "OOM", "maxsim_cpu_status": "crashed", "paper_ms": 1.66}
    del second["speedup_vs_reference"]
    return {"config": config, "device": {"type": "cuda", "name": "Fake GPU", "torch": "2.x", "threads": 2},
            "scorer": "metaembed.kernels CUDA kernel", "maxsim_cpu": None, "rows": [first, second],
            "peaks": {"copy_GBps": 2000.0, "matmul_TFLOPs": 200.0, "matmul_dtype": "bfloat16", "matmul_n": 8192}}


def test_format_report_puts_each_figure_in_its_column():
    """Every column of the markdown table (the GPU-only ones included: speed-ups, chunked PyTorch, Triton, bare
    GEMM; maxsim-cpu; the paper's latency), cell by cell, from a result with distinct values."""
    text = bench.format_report(_gpu_result())
    lines = text.splitlines()
    assert "- measured copy bandwidth (read+write): 2000.0 GB/s; bfloat16 matmul (8192^3): 200.000 TFLOP/s" in lines
    assert any(x.startswith("- latency: mean ± std over 3 runs after 1 warm-up; ") and x.endswith("batch time / 4")
               for x in lines)
    header = next(x for x in lines if x.startswith("| budget |"))
    assert header.split(" | ") == [
        "| budget", "GFLOPs/query", "index GiB", "1 query (ms)", "batch of 4 (ms)", "per query (ms)",
        "1q GB/s (% copy BW)", "batch TFLOP/s (% matmul)", "PyTorch ref, batch (ms)", "× vs ref",
        "chunked PyTorch per query (64 q, ms)", "× vs chunked", "Triton per query (ms)", "Triton TFLOP/s (% matmul)",
        "Triton max |diff|", "bare GEMM, batch (ms)", "speed vs bare GEMM", "1q, maxsim-cpu's input (ms)",
        "maxsim-cpu 1q (ms)", "maxsim-cpu per query (ms)", "paper (ms) |"]
    rows = [x.split(" | ") for x in lines if x.startswith("| (")]
    assert rows[0] == [
        "| (1,1)", "0.717", "0.0123", "25.500 ± 0.500", "62.50 ± 7.00", "15.6250 ± 1.7500", "1800 (90%)",
        "120 (60%)", "500.00 ± 5.00", "8.0", "31.2500 ± 0.2500", "2.0", "5.0000 ± 10.0000", "150 (75%)", "1.5e-06",
        "50.00 ± 20.00", "0.80", "30.000 ± 1.000", "40.000 ± 2.000", "20.0000", "1.67 |"]
    assert rows[1] == [
        "| (2,4)", "5.73", "2.67", "25.500 ± 0.500", "62.50 ± 7.00", "15.6250 ± 1.7500", "1800 (90%)", "120 (60%)",
        "OOM (needs ~9.0 GiB)", "-", "31.2500 ± 0.2500", "2.0", "error: X", "-", "-", "OOM", "-", "30.000 ± 1.000",
        "crashed", "-", "1.66 |"]
    agree = [x for x in lines if x.startswith("| (")][2:]
    assert agree[0] == "| (1,1) | 1.20e-07 | 99.9% | 100.0% |"
    assert not any("above 100%" in x for x in lines)
    # the heading names Table 3's setting only for it (a review helper: D=64, N=512 was "Table 3 setting")
    assert lines[0] == "## Scoring benchmark (D=3584, N=100,000, batch 4, bfloat16 index, R=(16,64))"
    paper = _gpu_result()
    paper["config"]["batch_size"] = 1000
    assert bench.format_report(paper).startswith("## Scoring benchmark (Table 3 setting: D=3584, N=100,000, batch 1,000")
    over = _gpu_result()
    over["rows"][1]["batch_flop_frac"] = 1.6  # a CPU scorer past a matmul peak measured on one shape
    note = next(x for x in bench.format_report(over).splitlines() if "above 100%" in x)
    assert note.startswith("Fractions above 100% (batch_flop_frac): the scorer outran the measured peak")


def test_format_report_names_table3_only_for_its_bf16_index():
    """The heading's "Table 3 setting" needs the paper's dtype too (bf16 index), as the rows' paper_ms do: a float32
    run at D=3584, N=100,000, batch 1,000 is another setting (twice the index bytes)."""
    paper = _gpu_result()
    paper["config"]["batch_size"] = 1000
    assert bench.format_report(paper).startswith("## Scoring benchmark (Table 3 setting: ")
    paper["config"]["dtype"] = "float32"
    assert bench.format_report(paper).startswith("## Scoring benchmark (D=3584, N=100,000, batch 1,000, float32 index")


def test_format_report_mentions_maxsim_cpu_only_on_cpu():
    """The "pip install maxsim-cpu" hint is for CPU runs; a GPU result without maxsim-cpu does not carry it."""
    assert "maxsim-cpu not importable" not in bench.format_report(_gpu_result())
    cpu = _gpu_result()
    cpu["device"]["type"] = "cpu"
    assert "maxsim-cpu not importable" in bench.format_report(cpu)


def test_reference_limit_is_in_gib():
    """--reference-limit-gib is GiB (2**30 bytes): a reference needing exactly the limit runs, one byte more is
    skipped."""
    queries, index = _ref_inputs()
    need = bench.reference_bytes(queries, index, 4, 8)
    ok = bench._reference(_ref_cfg(need / bench.GIB), torch.device("cpu"), queries, index, 4, 8, lambda fn: (1.0, 0.1))
    assert (ok["reference_status"], ok["reference_ms"], ok["reference_ms_std"]) == ("ok", 1.0, 0.1)
    over = bench._reference(_ref_cfg((need - 1) / bench.GIB), torch.device("cpu"), queries, index, 4, 8, None)
    assert over["reference_status"].startswith("skipped")


def test_compact_number_formats():
    assert (sig_figures(123.4), sig_figures(12.34), sig_figures(0.01234), sig_figures(0.0)) == \
        ("123", "12.3", "0.0123", "0.0")
    assert (fixed_or_sig(733.888), fixed_or_sig(1.0), fixed_or_sig(0.01234)) == \
        ("733.89", "1.00", "0.0123")
    # a value that rounds up to the next power of ten keeps 3 digits, not 4 (a mutation review)
    assert [sig_figures(x) for x in (0.09999, 99.96, -0.9996, 0.0012349)] == ["0.100", "100", "-1.00", "0.00123"]


def test_blocked_reference_blocks_stay_within_block_bytes(monkeypatch):
    """Each block's similarities [nq, n, r_q, r_c] plus its upcast candidates [n, r_c, D], in the reference's
    dtype's bytes (8 for fp64), fit ``block_bytes``; the blocks cover every candidate once."""
    sizes, real = [], bench.maxsim_reference
    monkeypatch.setattr(bench, "maxsim_reference", lambda q, c: (sizes.append(c.shape[0]), real(q, c))[1])
    queries, index = _ref_inputs(B=2, N=23, R_q=4, R_c=8, D=16)
    per_candidate = (2 * 2 * 4 + 4 * 16) * 8
    out = bench._blocked_reference(queries, index, 2, 4, torch.float64, block_bytes=5 * per_candidate)
    assert sizes == [5, 5, 5, 5, 3]
    whole = real(queries[:, :2].double(), index[:, :4].double())
    assert out.dtype == torch.float64 and torch.allclose(out, whole, rtol=0, atol=1e-12)


def test_agreement_fp64_check_covers_the_first_queries_only_and_k_equal_n_is_not_vacuous():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 2, 16), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(50, 4, 16), dim=-1)
    exact = bench.maxsim(q, c, 2, 4)
    off = exact.clone()
    off[4] += 1.0  # a query beyond the fp64 ones
    out = bench.agreement(off, q, c, 2, 4, k=10, fp64_queries=2)
    assert out["agree_fp64_queries"] == 2 and out["agree_max_abs_err_fp64"] <= 1e-5
    full = bench.agreement(exact, q, c, 2, 4, k=50, fp64_queries=1)  # k = N: every top-k is the whole index
    assert full["agree_topk_identical_frac"] is None and full["agree_topk_up_to_ties_frac"] is None


def test_agreement_counts_a_swap_across_the_kth_place_as_a_tie_only_within_tie_tol():
    """A scorer whose top-k swaps the reference's k-th and (k+1)-th candidates is not identical; it is
    'identical up to ties' exactly when their reference scores differ by at most ``tie_tol``."""
    torch.manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(1, 2, 16), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(40, 4, 16), dim=-1)
    ref = bench._blocked_reference(q, c, 2, 4, torch.float32)  # [1, 40]
    order = ref[0].argsort(descending=True)
    kth, nxt = int(order[2]), int(order[3])  # k = 3
    gap = float(ref[0, kth] - ref[0, nxt])
    assert gap > 1e-4
    swapped = ref.clone()
    swapped[0, kth], swapped[0, nxt] = ref[0, nxt], ref[0, kth]
    exact = bench.agreement(ref, q, c, 2, 4, k=3)
    assert (exact["agree_topk_identical_frac"], exact["agree_topk_up_to_ties_frac"]) == (1.0, 1.0)
    for tol, tie in ((1e-5, 0.0), (gap * 0.99, 0.0), (gap * 1.01, 1.0)):
        out = bench.agreement(swapped, q, c, 2, 4, k=3, tie_tol=tol)
        assert (out["agree_topk_identical_frac"], out["agree_topk_up_to_ties_frac"], out["agree_tie_tol"]) == \
            (0.0, tie, tol), tol


def test_agreement_names_how_many_queries_each_check_covers():
    """The fp64 check covers the first fp64_queries queries, the top-k check all of them: the report's column
    headers read these counts."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 2, 8), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(40, 4, 8), dim=-1)
    out = bench.agreement(bench.maxsim(q, c, 2, 4), q, c, 2, 4, k=3, fp64_queries=2)
    assert (out["agree_fp64_queries"], out["agree_queries"]) == (2, 5)


def test_random_index_rows_are_unit_norm():
    x = bench._random_unit((10, 3, 8), torch.float32, torch.device("cpu"), gen_rows=4)  # 3 blocks of rows
    assert x.shape == (10, 3, 8) and torch.allclose(x.norm(dim=-1), torch.ones(10, 3))


@pytest.mark.parametrize("field, value", [("runs", 0), ("warmup", -1), ("torch_queries", 0), ("torch_runs", 0),
                                          ("triton_runs", 0), ("gemm_runs", 0)])
def test_runs_below_one_or_negative_warmup_are_rejected(field, value, monkeypatch):
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: pytest.fail("measured before rejecting"))
    cfg = bench.BenchConfig(D=8, N=40, batch_size=2, budgets=[(1, 2)], device="cpu", maxsim_cpu=False,
                            **{field: value})
    with pytest.raises(ValueError, match=f"{field}={value}"):
        bench.run_benchmark(cfg)


@pytest.mark.parametrize("dtype, gib", [("bfloat16", "488.3"), ("float32", "976.6")])
def test_index_too_large_message_uses_the_dtype(dtype, gib, monkeypatch):
    monkeypatch.setattr(bench, "_random_unit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(CPU_OOM)))
    cfg = bench.BenchConfig(D=4096, N=1_000_000, budgets=[(16, 64)], dtype=dtype, device="cpu", maxsim_cpu=False)
    with pytest.raises(ValueError, match=f"the {gib} GiB index"):
        bench.run_benchmark(cfg)


def test_cli_options_reach_the_config(monkeypatch):
    """Every ``metaembed bench`` option lands in its BenchConfig field; the defaults are the documented ones
    (10 runs after 2 warm-up, the paper's budgets; CPU sizes D=256, N=4,096, batch 16)."""
    import argparse

    from metaembed.config import DEFAULT_GROUPS

    got = []

    class Stop(Exception):
        pass

    def capture(cfg, on_row=None, on_start=None):
        got.append(cfg)
        raise Stop

    def cli(argv):
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        with pytest.raises(Stop):
            bench.run(parser.parse_args(argv))
        return got[-1]

    monkeypatch.setattr(bench, "run_benchmark", capture)
    cfg = cli(["--device", "cpu", "--D", "8", "--N", "40", "--batch-size", "3", "--budgets", "1,1", "2,4", "--dtype",
               "float32", "--runs", "4", "--warmup", "3", "--seed", "7", "--backend", "torch", "--no-reference",
               "--reference-limit-gib", "2.5", "--no-agreement", "--no-triton", "--no-gemm", "--torch-queries", "5"])
    assert (cfg.D, cfg.N, cfg.batch_size, cfg.budgets, cfg.dtype, cfg.device, cfg.runs, cfg.warmup, cfg.seed,
            cfg.backend) == (8, 40, 3, [(1, 1), (2, 4)], "float32", "cpu", 4, 3, 7, "torch")
    assert (cfg.reference, cfg.reference_limit_gib, cfg.agreement, cfg.triton, cfg.gemm, cfg.torch_queries) == \
        (False, 2.5, False, False, False, 5)
    d = cli([])
    assert (d.D, d.N, d.batch_size, d.runs, d.warmup, d.budgets) == (None, None, None, 10, 2,
                                                                     [tuple(g) for g in DEFAULT_GROUPS])
    assert (d.reference, d.agreement, d.triton, d.gemm) == (True, True, None, None)
    assert (bench.BenchConfig().runs, bench.BenchConfig().warmup) == (10, 2)
    assert bench.CPU_DEFAULTS == {"D": 256, "N": 4096, "batch_size": 16}
