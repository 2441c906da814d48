"""metaembed.kernels.triton_maxsim: the Triton MaxSim kernel against the fp64 reference (Eq. 4).

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, on the
same edge cases as the CUDA kernel's emulation tests (bf16 cases in fp16: the interpreter mis-reads
bf16); with a GPU (marked gpu) it is compiled and checked at the issue's shapes.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from metaembed.kernels.selfcheck import EMULATOR_CASES, VARIANT_CASES, Case, make_inputs, reference_scores
from metaembed.maxsim import maxsim

triton_maxsim = pytest.importorskip("metaembed.kernels.triton_maxsim")
pytest.importorskip("triton")

TOL = 1e-3
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def interpret():
    """Triton's interpreter: conftest sets TRITON_INTERPRET=1 before Triton is imported when there is no GPU
    (Triton reads it when its own functions are decorated, so it cannot be switched on later)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present: the gpu tests below compile the kernel)")


def _cpu_case(case: Case) -> Case:
    return dataclasses.replace(case, dtype="fp16") if case.dtype == "bf16" else case


#: the edge shapes; VARIANT_CASES pick the CUDA kernel's engine / tile / loads, which Triton has no analogue of
EDGE_CASES = tuple(c for c in EMULATOR_CASES if c not in VARIANT_CASES)


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.name)
def test_interpreted_kernel_matches_fp64_reference(interpret, case):
    case = _cpu_case(case)
    q, c = make_inputs(case, "cpu")
    out = triton_maxsim.maxsim_triton(q, c, case.r_q, case.r_c)
    assert out.shape == (case.nq, case.N) and out.dtype == torch.float32
    if out.numel():
        assert float((out.double() - reference_scores(q, c, case.r_q, case.r_c)).abs().max()) <= TOL


def test_interpreted_kernel_detects_wrong_padding(interpret, monkeypatch):
    """Negative control: a budget that reads one vector too many changes the scores."""
    q, c = make_inputs(Case("p", 3, 20, 4, 8, 32, 3, 5, dtype="fp16"), "cpu")
    out = triton_maxsim.maxsim_triton(q, c, 3, 5)
    assert (out.double() - reference_scores(q, c, 3, 6)).abs().max() > 1e-2
    assert (out.double() - reference_scores(q, c, 3, 5)).abs().max() <= TOL


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's matmul on NaN / inf
@pytest.mark.parametrize("r_q,r_c", [(3, 4), (2, 3)])  # padding rows and columns
def test_interpreted_kernel_propagates_nan_and_inf_like_the_reference(interpret, r_q, r_c):
    """A NaN inside the budget makes the score NaN (torch.amax; tl.max drops it), and a +inf element gives
    +inf, not NaN from a zero padding row (0 * inf)."""
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(2, r_q, 16, generator=g), torch.randn(5, r_c, 16, generator=g)
    c[1, r_c - 1, 5] = float("nan")
    c[2, 0, 3] = float("inf")
    out = triton_maxsim.maxsim_triton(q, c).double()  # [2, 5]
    ref = reference_scores(q, c, r_q, r_c)
    assert torch.equal(out.isnan(), ref.isnan()) and ref[:, 1].isnan().all()
    assert torch.equal(out[ref.isinf()], ref[ref.isinf()]) and ref.isinf().any()
    fin = ref.isfinite()
    assert (out[fin] - ref[fin]).abs().max() <= TOL


def test_backend_triton_dispatch_and_errors(interpret):
    q, c = make_inputs(Case("d", 2, 9, 4, 8, 16, 4, 8, dtype="fp32"), "cpu")
    torch.testing.assert_close(maxsim(q, c, 2, 3, backend="triton"), maxsim(q, c, 2, 3, backend="torch"),
                               atol=1e-5, rtol=0)
    q16 = q.half()  # queries are cast to the candidates' dtype
    assert maxsim(q16, c, 2, 3, backend="triton").dtype == torch.float32
    with pytest.raises(ValueError, match="at most 256"):
        triton_maxsim.maxsim_triton(torch.randn(1, 300, 16), torch.randn(2, 2, 16))
    with pytest.raises(ValueError, match=r"\(2, 300\) pads to \(2, 512\); .* at most 256"):  # the candidates' side
        triton_maxsim.maxsim_triton(torch.randn(1, 2, 16), torch.randn(2, 300, 16))


def test_unavailable_on_cpu_without_the_interpreter(monkeypatch):
    """(is_available reads TRITON_INTERPRET at call time.)"""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_maxsim.is_available("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_maxsim.maxsim_triton(torch.randn(1, 2, 16), torch.randn(3, 2, 16))


# ---- GPU ------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
#: the interpreter covers every emulator case; on a GPU each new shape is a compile (~seconds): a few edges
GPU_EDGE_CASES = ("bf16-few-queries", "budget-1x1", "rc-over-tile", "rq-split-tc", "odd-D-scalar", "transposed",
                  "empty-index")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", tuple(c for c in EMULATOR_CASES if c.name in GPU_EDGE_CASES) + (
    Case("D3584-nq64-16x64", 64, 1003, 16, 64, 3584, 16, 64),
    Case("D4096-nq1000-1x1", 1000, 1003, 16, 64, 4096, 1, 1),
    Case("D128-nq1000-16x64", 1000, 1003, 16, 64, 128, 16, 64),
    Case("fp32-D2048", 50, 301, 16, 64, 2048, 8, 32, dtype="fp32"),
    Case("padded-D2048", 100, 257, 16, 64, 2048, 16, 64, layout="padded"),
), ids=lambda c: c.name)
def test_gpu_triton_matches_fp64_reference(case):
    q, c = make_inputs(case, "cuda")
    out = triton_maxsim.maxsim_triton(q, c, case.r_q, case.r_c)
    if out.numel():
        assert float((out.double() - reference_scores(q, c, case.r_q, case.r_c)).abs().max()) <= TOL


def test_interpreted_kernel_refuses_inputs_that_require_grad(interpret):
    """The kernel has no backward: scores for inputs that require grad silently carried no graph (as
    kernels.maxsim_cuda, an error in grad mode; fine under no_grad)."""
    q, c = torch.randn(2, 3, 16).requires_grad_(), torch.randn(5, 4, 16)
    with pytest.raises(RuntimeError, match="no backward"):
        triton_maxsim.maxsim_triton(q, c)
    with pytest.raises(RuntimeError, match="no backward"):
        triton_maxsim.maxsim_triton(q.detach(), c.requires_grad_())
    with torch.no_grad():
        out = triton_maxsim.maxsim_triton(q, c)
    assert (out.double() - reference_scores(q.detach(), c.detach(), 3, 4)).abs().max() <= TOL


@pytest.mark.parametrize("max_programs", [1, 2, 3, 5])
def test_interpreted_kernel_splits_grids_larger_than_one_launch(interpret, monkeypatch, max_programs):
    """A launch holds at most 2**31 - 1 programs (Triton passes the grid as a C int, and the kernel's program ids
    are int32): 10^5 queries x 10^6 candidates at (16, 64) are 6.25e9 tiles, an OverflowError in one launch.
    Larger grids run as several launches over blocks of queries and candidates, each writing its own block of
    ``out``; shown here with the per-launch limit lowered to a few programs (3 row tiles x 4 column tiles)."""
    q, c = make_inputs(Case("grid", 40, 50, 2, 3, 16, 1, 1, dtype="fp16"), "cpu")
    monkeypatch.setattr(triton_maxsim, "_MAX_PROGRAMS", max_programs)
    grids, kernel = [], triton_maxsim._kernel

    class Recorder:  # the interpreter runs any grid: record each launch's size
        def __init__(self, launcher):
            self.launcher = launcher

        def __getitem__(self, grid):
            grids.append(grid[0])
            return self.launcher[grid]

    monkeypatch.setattr(triton_maxsim, "_kernel", lambda interpret: Recorder(kernel(interpret)))
    out = triton_maxsim.maxsim_triton(q, c, 1, 1)  # 16 queries x 16 candidates per tile under the interpreter
    assert float((out.double() - reference_scores(q, c, 1, 1)).abs().max()) <= TOL
    assert max(grids) <= max_programs and sum(grids) == 3 * 4  # every tile once, no launch over the limit
    grids.clear()
    out = triton_maxsim.maxsim_triton(q, c, 2, 3)  # 8 queries x 4 candidates per tile: 5 x 13 tiles
    assert float((out.double() - reference_scores(q, c, 2, 3)).abs().max()) <= TOL
    assert max(grids) <= max_programs and sum(grids) == 5 * 13


def test_fp32_inputs_are_multiplied_in_ieee_fp32_not_tf32(interpret, monkeypatch):
    """fp32 inputs get ``input_precision="ieee"`` (the docstring's "true fp32, no TF32"): the interpreter
    multiplies in numpy whatever the precision, and TF32's 10-bit mantissa stays within the GPU tests'
    tolerance on random unit vectors, so only the launch argument shows the choice."""
    calls = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(kwargs["PRECISION"])

    monkeypatch.setattr(triton_maxsim, "_kernel", lambda interpret: Launcher())
    triton_maxsim.maxsim_triton(torch.randn(2, 3, 16), torch.randn(4, 3, 16))
    triton_maxsim.maxsim_triton(torch.randn(2, 3, 16), torch.randn(4, 3, 16).half())  # queries cast to fp16
    assert calls[0] == "ieee" and calls[1] != "ieee" and len(calls) == 2


def test_large_tiles_halve_block_k_and_the_paper_budget_keeps_its_tiles():
    cfg = triton_maxsim._config
    assert cfg(16, 64, torch.bfloat16, False) == {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                                                  "num_warps": 8, "num_stages": 3}
    assert cfg(128, 128, torch.float32, False)["BLOCK_K"] == 32
    large = ((256, 128), (128, 256), (256, 256))
    assert [cfg(pq, pc, torch.bfloat16, False)["BLOCK_K"] for pq, pc in large] == [32] * 3
    assert cfg(256, 256, torch.float32, False)["BLOCK_K"] == 16


def test_compile_for_refuses_a_process_in_interpreter_mode(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_maxsim.compile_for(90, 16, 64)


def test_kernel_compiles_for_sm86_and_sm90_within_their_shared_memory():
    """Ahead-of-time compile (no GPU) with a real launch's tiles and specialisation, in a fresh process without
    the interpreter: the padded budget (256, 256) asked 128 KiB of shared memory with BLOCK_K 64, more than the
    99 KiB a block gets on sm_86 / sm_89, so it could not launch there."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's own default, set to silence its 3.9 warning
    cmd = [sys.executable, "-m", "metaembed.kernels.triton_maxsim", "--arch", "86", "--arch", "90",
           "--budget", "16,64", "--budget", "256,256"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith(("| 8", "| 9"))]
    assert len(rows) == 8 and "all compiled and fit" in run.stdout
    for sm, budget, dtype, tile, shared, limit, _ in rows:
        assert float(shared) <= float(limit), (sm, budget, dtype, shared)
        # compiled as launched (aligned pointers, unit stride along D): the loads are pipelined, >= 2 stages of the
        # A and B tiles in shared memory (without that specialisation it compiled to one stage, 32 KiB at (16, 64))
        m, n, k = (int(x) for x in tile.split(" x "))
        assert float(shared) * 1024 >= 2 * (m + n) * k * (4 if "float32" in dtype else 2), (sm, budget, dtype, shared)
    assert {(r[0].strip(), r[1].strip(), r[3].strip()) for r in rows if r[2].strip() == "bfloat16"} == {
        ("86", "(16, 64)", "128 x 128 x 64"), ("86", "(256, 256)", "256 x 256 x 32"),
        ("90", "(16, 64)", "128 x 128 x 64"), ("90", "(256, 256)", "256 x 256 x 32")}


def test_the_compile_check_holds_each_architecture_to_its_opt_in_shared_memory(monkeypatch, capsys):
    """The per-block opt-in shared memory of the CUDA programming guide (sm_80 / sm_87: 163 KiB, sm_86 / sm_89:
    99 KiB, sm_90: 227 KiB) is what ``python -m metaembed.kernels.triton_maxsim`` checks a tile against: a larger
    limit for sm_86 passed the 128 KiB tile that cannot launch there.  Runs without Triton (compile_for faked)."""
    import types

    assert triton_maxsim.SHARED_MEMORY_LIMIT == {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                                                 90: 227 * 1024}
    shared = 128 * 1024  # the 256 x 256 x 64 bf16 tile's pipelined buffers
    monkeypatch.setattr(triton_maxsim, "compile_for", lambda arch, r_q, r_c, dtype=None: types.SimpleNamespace(
        metadata=types.SimpleNamespace(shared=shared), asm={"cubin": b""}))
    monkeypatch.setattr(triton_maxsim, "_stack_bytes", lambda cubin: None)
    assert triton_maxsim.main(["--arch", "90", "--budget", "256,256"]) == 0
    assert triton_maxsim.main(["--arch", "86", "--budget", "256,256"]) == 1
    assert "(too large)" in capsys.readouterr().out


def test_compile_for_refuses_budgets_past_max_pad_on_either_side(monkeypatch):
    """``compile_for`` (the no-GPU compile check) refuses a padded budget past :data:`MAX_PAD` on the query *and*
    the candidate side before compiling, as a launch does: a candidate budget of 300 pads to 512 columns."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for r_q, r_c, pads in ((16, 300, r"\(16, 512\)"), (300, 16, r"\(512, 16\)")):
        with pytest.raises(ValueError, match=rf"pads to {pads}; the Triton kernel holds at most 256"):
            triton_maxsim.compile_for(90, r_q, r_c)


# ---- pinned by the mutation review of the kernel body (grouped order, D strides, int64 offsets, store mask)


def test_interpreted_kernel_grouped_order_with_a_partial_last_group(interpret):
    """11 row tiles (one query each at r_q = 16) make a full group of GROUP_M = 8 and a partial one of 3, over 2
    column tiles (8 candidates each): the partial group's tiles are found only through ``(pid % per_group) %
    rows_in_group`` (``pid % rows_in_group`` gave wrong tiles there, silently: raster-groups' last group of one row
    tile and every single-group case map any program the same way; at nq = 1000, (16, 64) on a GPU it is 125 row
    tiles, a last group of 5).  Fast stand-in for raster-groups."""
    case = Case("raster-partial-group", 11, 13, 16, 2, 16, 16, 2, dtype="fp16")
    q, c = make_inputs(case, "cpu")
    out = triton_maxsim.maxsim_triton(q, c, case.r_q, case.r_c)
    assert float((out.double() - reference_scores(q, c, case.r_q, case.r_c)).abs().max()) <= TOL


def test_interpreted_kernel_reads_queries_with_a_non_unit_d_stride(interpret):
    """Queries (and candidates) stored D-outermost, so the query D stride sq2 != 1: the ``transposed`` case keeps
    the queries' D stride at 1 and only strides the candidates along D, so a kernel that assumed unit D stride for
    the queries passed every test."""
    case = Case("q-d-stride", 3, 9, 4, 6, 40, 3, 5, dtype="fp16")
    q0, c0 = make_inputs(case, "cpu")
    q = q0.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # storage [D, nq, R_q]
    c = c0.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert q.stride(2) != 1 and c.stride(2) != 1
    out = triton_maxsim.maxsim_triton(q, c, case.r_q, case.r_c)
    assert float((out.double() - reference_scores(q0, c0, case.r_q, case.r_c)).abs().max()) <= TOL


def _sparse_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` elements of address space, pages untouched (a few are written): skips where it cannot be had."""
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as e:  # no overcommit
        pytest.skip(f"cannot reserve {numel} elements of address space: {e}")


def _launch_into(monkeypatch, make_out) -> None:
    """Run the kernel's launches with ``make_out(out)`` (a view of the shape of ``out``, other strides) as the score
    tensor, then copy its scores into ``out``: the store through another row stride / into a guarded buffer."""
    kernel = triton_maxsim._kernel

    class Launcher:
        def __init__(self, launcher):
            self.launcher = launcher

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                o, far = args[2], make_out(args[2])
                self.launcher[grid](*args[:2], far, *args[3:14], far.stride(0), **kwargs)
                o.copy_(far)
            return launch

    monkeypatch.setattr(triton_maxsim, "_kernel", lambda interpret: Launcher(kernel(interpret)))


@pytest.mark.parametrize("where", ["c-item", "q-item", "c-vector", "q-vector", "c-dim", "out-row"])
def test_interpreted_kernel_offsets_past_2_31_elements(interpret, monkeypatch, where):
    """Element offsets past 2**31 (a real index: 10^6 candidates x 64 x 3584 is 2.3e11 elements; 10^5 x 10^6 scores)
    are computed in int64: the item / vector / D offsets of both operands and the score row offset.  In int32 they
    wrapped (under the interpreter a segfault or wrong scores; on a GPU an illegal address or wrong scores).  Shown
    with one stride of 2**30 elements into a mostly untouched buffer (~300 MB resident).  The end of such a buffer
    is followed by unmapped address space, so a load the masks should have stopped (query rows past nq or past r_q,
    candidates past N) segfaults here where a dense tensor reads its neighbours silently."""
    g = torch.Generator().manual_seed(0)
    big = 2**30
    q = torch.nn.functional.normalize(torch.randn(3, 3, 16, generator=g), dim=-1).half()
    c = torch.nn.functional.normalize(torch.randn(3, 3, 16, generator=g), dim=-1).half()
    shape, dense = (3, 3, 16), (48, 16, 1)
    if where != "out-row":
        strides = {"c-item": (big, 16, 1), "q-item": (big, 16, 1), "c-vector": (48, big, 1),
                   "q-vector": (48, big, 1),
                   "c-dim": (3, 1, big // 4)}[where]  # 15 * 2**28 past 2**31: 8 GB of address space
        buf = _sparse_buffer(sum(s * (n - 1) for s, n in zip(strides, shape)) + 1, torch.float16)
        view = buf.as_strided(shape, strides)
        view.copy_(q if where[0] == "q" else c)
        if where[0] == "q":
            q = view
        else:
            c = view
        assert view.stride() != dense
    else:  # the kernel writes its scores into a view whose rows are 2**30 elements apart
        def far_rows(o: torch.Tensor) -> torch.Tensor:
            return _sparse_buffer(big * (o.shape[0] - 1) + o.shape[1], torch.float32).as_strided(o.shape, (big, 1))

        _launch_into(monkeypatch, far_rows)
    out = triton_maxsim.maxsim_triton(q, c, 3, 3)
    assert float((out.double() - reference_scores(q, c, 3, 3)).abs().max()) <= TOL


def test_interpreted_kernel_writes_nothing_outside_its_block_of_out(interpret, monkeypatch):
    """The store mask keeps a partial row / column tile inside ``out``: launched into a NaN-guarded buffer (rows
    ``ldo`` = N + 5 apart, spare rows below), nothing outside the [nq, N] block changes.  Without the query mask
    the last row tile wrote past the end of ``out`` (heap corruption: the suite crashed, or not, by luck)."""
    blocks = []

    def guarded(o: torch.Tensor) -> torch.Tensor:  # the [nq, N] block of a NaN buffer: rows N + 5 apart, 40 spare
        blocks.append(torch.full((o.shape[0] + 40, o.shape[1] + 5), float("nan")))
        return blocks[-1][: o.shape[0], : o.shape[1]]

    _launch_into(monkeypatch, guarded)
    q, c = make_inputs(Case("store-mask", 5, 11, 3, 5, 16, 3, 5, dtype="fp16"), "cpu")  # 4 queries, 4 candidates a tile
    out = triton_maxsim.maxsim_triton(q, c, 3, 5)
    assert float((out.double() - reference_scores(q, c, 3, 5)).abs().max()) <= TOL
    (guard,) = blocks
    spare = guard.clone()
    spare[: out.shape[0], : out.shape[1]] = float("nan")
    assert spare.isnan().all() and torch.equal(guard[: out.shape[0], : out.shape[1]], out)
