"""Late-interaction scoring (metaembed.maxsim), Eq. 3-4."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from metaembed.groups import GroupError
from metaembed.maxsim import maxsim, maxsim_reference, pairwise_maxsim

# the module, not the function: ``metaembed.maxsim`` is also a lazy top-level export of the function
maxsim_mod = importlib.import_module("metaembed.maxsim")


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _loop_maxsim(q, c, r_q, r_c):
    """Eq. 4 with Python loops over queries, candidates and tokens."""
    out = torch.empty(q.shape[0], c.shape[0], dtype=torch.float64)
    for a in range(q.shape[0]):
        for b in range(c.shape[0]):
            out[a, b] = sum(
                max(float(q[a, i].double() @ c[b, j].double()) for j in range(r_c)) for i in range(r_q)
            )
    return out


def test_reference_matches_python_loop():
    q, c = _rand(3, 4, 5, seed=1), _rand(4, 6, 5, seed=2)
    for r_q, r_c in [(4, 6), (1, 1), (2, 3)]:
        torch.testing.assert_close(maxsim_reference(q, c, r_q, r_c), _loop_maxsim(q, c, r_q, r_c))


@pytest.mark.parametrize(
    "nq, N, R_q, R_c, D, r_q, r_c",
    [
        (7, 13, 16, 64, 8, None, None),
        (7, 13, 16, 64, 8, 2, 4),
        (7, 13, 16, 64, 8, 16, 1),
        (1, 5, 4, 8, 3, None, None),
        (5, 1, 4, 8, 3, 3, 5),
        (4, 6, 1, 1, 3, None, None),
        (4, 6, 3, 5, 1, None, None),
    ],
)
def test_maxsim_matches_reference_float64(nq, N, R_q, R_c, D, r_q, r_c):
    q, c = _rand(nq, R_q, D, seed=3), _rand(N, R_c, D, seed=4)
    out = maxsim(q, c, r_q, r_c)
    assert out.shape == (nq, N) and out.dtype == torch.float64
    torch.testing.assert_close(out, maxsim_reference(q, c, r_q, r_c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "nq, r_q, r_c, chunk_size",
    [
        (3, 1, 40, None),  # small query block (qb*r_q < 16), r_c > 32: amax over r_c, no pooling
        (3, 2, 40, 4),  # small block, r_q > 1, r_c > 32: amax over r_c then sum over r_q
        (20, 1, 4, None),  # large block (qb*r_q >= 16), r_q = 1, r_c > 1: amax over r_c only
        (20, 1, 40, 5),
        (20, 2, 1, None),  # large block, r_c = 1: sum over r_q only
    ],
)
def test_every_cpu_block_reduction_matches_the_plain_formula(nq, r_q, r_c, chunk_size):
    """Each reduction branch of the CPU path (small / large query block x r_q = 1 / r_c = 1 / r_c > 32)
    against Eq. 4; some branches were reached by no other test (a sum over r_c there went unnoticed)."""
    q, c = _rand(nq, 2, 4, seed=21), _rand(7, 48, 4, seed=22)
    out = maxsim(q, c, r_q, r_c, chunk_size=chunk_size)  # [nq, 7]
    torch.testing.assert_close(out, maxsim_reference(q, c, r_q, r_c), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, _loop_maxsim(q, c, r_q, r_c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nq, r_q", [(8, 2), (4, 4), (5, 4)])
@pytest.mark.parametrize("r_c", [1, 3, 40])
def test_query_blocks_of_exactly_small_m_rows_match_the_formula(nq, r_q, r_c):
    """``qb * r_q == _SMALL_M`` (16) is the boundary between the query-major and token-major layouts: the
    cached query blocks and the reduction must agree on which side of it they are (no other test sits on it)."""
    assert min(nq, 256 // r_q) * r_q in (16, 20)
    q, c = _rand(nq, 4, 4, seed=23), _rand(7, 48, 4, seed=24)
    out = maxsim(q, c, r_q, r_c)
    torch.testing.assert_close(out, _loop_maxsim(q, c, r_q, r_c), rtol=1e-12, atol=1e-12)


def test_fp32_output_and_tolerance():
    q, c = _rand(6, 8, 16, seed=5), _rand(9, 16, 16, seed=6)
    out = maxsim(q.float(), c.float(), 4, 8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), maxsim_reference(q, c, 4, 8), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_chunk_size_not_dividing_N(chunk_size):
    q, c = _rand(5, 4, 6, seed=7), _rand(11, 8, 6, seed=8)
    torch.testing.assert_close(maxsim(q, c, 3, 5, chunk_size=chunk_size), maxsim_reference(q, c, 3, 5))


def test_tiny_max_chunk_bytes_forces_many_chunks(monkeypatch):
    calls = []
    real = maxsim_mod._maxsim_torch

    def spy(queries, candidates, r_q, r_c, qb, cb, **kwargs):
        calls.append((qb, cb))
        return real(queries, candidates, r_q, r_c, qb, cb, **kwargs)

    monkeypatch.setattr(maxsim_mod, "_maxsim_torch", spy)
    q, c = _rand(9, 4, 6, seed=9), _rand(10, 8, 6, seed=10)
    out = maxsim(q, c, 4, 8, max_chunk_bytes=1)
    torch.testing.assert_close(out, maxsim_reference(q, c, 4, 8))
    assert calls == [(1, 1)]  # one query x one candidate per block


def test_block_plan_respects_max_chunk_bytes():
    plan = maxsim_mod._plan_blocks
    for nq, N, r_q, r_c, budget in [(1000, 10000, 16, 64, 256 * 2**20), (3, 10**6, 1, 1, 2**20), (10**5, 7, 2, 4, 2**22)]:
        for on_cpu in (True, False):
            qb, cb = plan(nq, N, r_q, r_c, None, budget, on_cpu)
            assert 1 <= qb <= nq and 1 <= cb <= N
            assert qb * r_q * cb * r_c * 4 <= budget
    # the bound also holds when the query side must be chunked
    qb, cb = plan(10**5, 10**5, 16, 64, None, 2**20, False)
    assert qb < 10**5 and qb * 16 * cb * 64 * 4 <= 2**20


def test_block_plan_with_a_chunk_size_still_respects_max_chunk_bytes():
    """``chunk_size`` fixes the candidates per chunk; the queries per block are still cut to keep the
    ``[qb, r_q, cb, r_c]`` block under ``max_chunk_bytes`` (all 10,000 queries at once would be 2.6 GB here)."""
    for on_cpu in (True, False):
        qb, cb = maxsim_mod._plan_blocks(10**4, 10**4, 16, 64, 64, 2**20, on_cpu)
        assert cb == 64 and 1 <= qb < 10**4 and qb * 16 * cb * 64 * 4 <= 2**20


def test_gpu_block_plan_counts_the_candidate_copy(monkeypatch):
    """The torch path on a GPU (no compiled kernel) copies each candidate chunk to the compute dtype as
    [cb * r_c, D]: the plan sized cb from r_q * r_c only, so one query at D = 3584, (16, 64) over 100,000
    candidates copied 65,536 of them (60 GB of fp32) under a 256 MiB budget (a review helper)."""
    plan = maxsim_mod._plan_blocks
    for nq, N, r_q, r_c, D in [(1, 100_000, 16, 64, 3584), (1, 2000, 16, 64, 1024), (4, 10**6, 1, 1, 4096),
                               (256, 100_000, 16, 64, 3584)]:
        budget = 256 * 2**20
        qb, cb = plan(nq, N, r_q, r_c, None, budget, False, D=D, itemsize=4)
        assert cb * r_c * D * 4 <= budget, (nq, N, r_q, r_c, D, cb)
        assert qb * r_q * cb * r_c * 4 <= budget
    # the scores do not change with the smaller chunks
    q, c = _rand(2, 4, 512, seed=3), _rand(40, 8, 512, seed=4)
    monkeypatch.setattr(maxsim_mod, "_plan_blocks",
                        lambda *a, **kw: plan(*a, **{**kw, "on_cpu": False}))
    torch.testing.assert_close(maxsim(q, c, 4, 8, max_chunk_bytes=8 * 512 * 4 * 3), maxsim_reference(q, c, 4, 8))


def test_cpu_block_plan_budget_is_shared_by_the_workers(monkeypatch):
    plan = maxsim_mod._plan_blocks
    for nq, N, r_q, r_c, budget in [(1000, 10000, 16, 64, 2**20), (3, 10**6, 1, 1, 2**16), (16, 4096, 4, 8, 2**18)]:
        plans = set()
        for threads in (1, 2, 4):
            monkeypatch.setattr(maxsim_mod, "_cpu_threads", lambda threads=threads: threads)
            plans.add(plan(nq, N, r_q, r_c, None, budget, True))
        assert len(plans) == 1  # the blocks (hence the bits) do not depend on the thread count
    # the workers share the budget: one block each, their number capped
    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(maxsim_mod, "_cpu_threads", lambda: 4)
    calls = []
    real = maxsim_mod._score_range

    def spy(*args):
        calls.append(args[5:7])  # (qb, cb)
        return real(*args)

    monkeypatch.setattr(maxsim_mod, "_score_range", spy)
    q, c = _rand(2, 4, 8, seed=44).float(), _rand(40, 8, 8, seed=45).float()
    for budget, workers in [(2 * 4 * 8 * 8 * 4, 1), (2 * 2 * 4 * 8 * 8 * 4, 2), (2**20, 4)]:
        calls.clear()
        out = maxsim(q, c, chunk_size=8, max_chunk_bytes=budget)
        torch.testing.assert_close(out.double(), maxsim_reference(q.double(), c.double()), rtol=1e-5, atol=1e-5)
        assert len(calls) == workers
        assert all(len(calls) * qb * 4 * cb * 8 * 4 <= budget for qb, cb in calls)


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize(
    "nq, N, r_q, r_c, chunk_size, dtype",
    [
        (1, 23, 16, 64, 2, torch.float32),  # small-M orientation, candidates split over workers
        (9, 23, 2, 4, 3, torch.float32),  # large-M orientation (token-major queries)
        (3, 17, 1, 1, 4, torch.float32),  # r_c == 1: rows read in place
        (5, 11, 3, 1, 2, torch.bfloat16),  # upcast copies
        (40, 2, 16, 8, None, torch.float64),  # one chunk, the query blocks split over workers
    ],
)
def test_parallel_workers_match_reference(monkeypatch, two_threads, nq, N, r_q, r_c, chunk_size, dtype):
    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    calls = []
    real = maxsim_mod._score_range

    def spy(*args):
        calls.append(args[7:9])  # (query range, candidate range)
        return real(*args)

    monkeypatch.setattr(maxsim_mod, "_score_range", spy)
    q, c = _rand(nq, 16, 32, seed=24).to(dtype), _rand(N, 64, 32, seed=25).to(dtype)
    out = maxsim(q, c, r_q, r_c, chunk_size=chunk_size, max_chunk_bytes=2**16)  # room for both workers' blocks
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), maxsim_reference(q.double(), c.double(), r_q, r_c), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # one range per worker, together covering [0, nq) x [0, N)
    cover = torch.zeros(nq, N, dtype=torch.int64)
    for (a0, a1), (b0, b1) in calls:
        cover[a0:a1, b0:b1] += 1
    assert bool((cover == 1).all())
    assert torch.get_num_threads() == 2


def test_query_split_with_a_short_last_block_matches(monkeypatch, two_threads):
    """Worker 2 gets only the partial last query block (2 * r_q rows < _SMALL_M, while qb * r_q is not).

    The pre-built query blocks are token-major (large orientation); the worker must read them that way.
    """
    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    q, c = _rand(7, 4, 8, seed=40).float(), _rand(1, 2, 8, seed=41).float()
    assert 5 * 4 >= maxsim_mod._SMALL_M > 2 * 4
    out = maxsim_mod._maxsim_torch(q, c, 4, 2, 5, 1)  # query blocks [0, 5), [5, 7): one per worker
    torch.testing.assert_close(out.double(), maxsim_reference(q.double(), c.double(), 4, 2), rtol=1e-5, atol=1e-5)
    torch.set_num_threads(1)
    assert torch.equal(maxsim_mod._maxsim_torch(q, c, 4, 2, 5, 1), out)  # same bits as one worker


@pytest.mark.parametrize("chunk_size, max_chunk_bytes", [(5, 1024), (None, 4096), (3, 2**20)])
def test_bit_identical_across_thread_counts(monkeypatch, two_threads, chunk_size, max_chunk_bytes):
    """The block plan must not depend on the thread count (a tight budget caps the workers instead)."""
    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    q, c = _rand(12, 2, 32, seed=42).float(), _rand(30, 4, 32, seed=43).float()
    outs = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        outs.append(maxsim(q, c, chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    torch.testing.assert_close(outs[0].double(), maxsim_reference(q.double(), c.double()), rtol=1e-5, atol=1e-5)


def test_reference_is_exact_on_integer_inputs():
    """The oracle computed int8 inputs in int8: 100 * 100 * 4 wrapped to 64 (a review helper); maxsim was right."""
    q, c = torch.full((1, 1, 4), 100, dtype=torch.int8), torch.full((2, 1, 4), 100, dtype=torch.int8)
    assert maxsim_reference(q, c).tolist() == [[40000, 40000]]
    assert maxsim(q, c).tolist() == [[40000.0, 40000.0]]


def test_parallel_workers_run_in_the_callers_inference_mode(monkeypatch, two_threads):
    """Inference mode is per thread: ``out`` made under ``torch.inference_mode()`` is an inference tensor, which
    helpers outside it may not write ("Inplace update to inference tensor outside InferenceMode"; a review
    helper).  Small calls stay on this thread, so only real sizes failed, and so did any search or evaluation
    inside ``with torch.inference_mode():``.  Same bits as outside it, for inference-tensor inputs too."""
    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    q, c = _rand(6, 4, 8, seed=28).float(), _rand(40, 8, 8, seed=29).float()
    want = maxsim(q, c, 3, 5, chunk_size=7)
    with torch.inference_mode():
        got = maxsim(q, c, 3, 5, chunk_size=7)
        q_inf, c_inf = q.clone(), c.clone()  # inference tensors
        got_inf = maxsim(q_inf, c_inf, 3, 5, chunk_size=7)
    assert got.is_inference() and torch.equal(got, want) and torch.equal(got_inf, want)
    with torch.inference_mode(False):  # helpers left in inference mode would make this one an inference tensor
        assert not maxsim(q, c, 3, 5, chunk_size=7).is_inference()


def test_workers_restore_thread_settings(monkeypatch, two_threads):
    import threading

    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    q, c = _rand(4, 4, 8, seed=26).float(), _rand(50, 8, 8, seed=27).float()
    single = maxsim(q, c, 2, 4, chunk_size=5)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # inherits the default
    t.start()
    t.join()
    assert torch.get_num_threads() == 2 and seen == [2]
    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 10**18)  # one worker
    torch.testing.assert_close(maxsim(q, c, 2, 4, chunk_size=5), single, rtol=1e-6, atol=1e-6)
    assert torch.get_num_threads() == 2

    def boom(*args):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(maxsim_mod, "_score_range", boom)
    with pytest.raises(RuntimeError, match="worker failed"):
        maxsim(q, c, 2, 4, chunk_size=5)
    assert torch.get_num_threads() == 2


def test_threads_started_during_a_call_keep_the_default_thread_count(monkeypatch, two_threads):
    """A thread that first uses torch while another thread scores must not inherit 1 thread for good.

    ``torch.set_num_threads`` also sets the count that threads initialising later inherit: the
    caller of :func:`maxsim` must not switch itself to one thread for the duration of the call.
    """
    import threading

    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    real, seen, workers = maxsim_mod._score_range, [], []

    def probe(*args):
        workers.append(torch.get_num_threads())  # each worker runs single-threaded ops
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # starts mid-call
        t.start()
        t.join()
        return real(*args)

    monkeypatch.setattr(maxsim_mod, "_score_range", probe)
    q, c = _rand(4, 4, 8, seed=54).float(), _rand(50, 8, 8, seed=55).float()
    for workers_min_work in (0, 10**18):  # several workers, then one
        monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", workers_min_work)
        seen.clear()
        workers.clear()
        torch.testing.assert_close(maxsim(q, c, 2, 4, chunk_size=5).double(),
                                   maxsim_reference(q.double(), c.double(), 2, 4), rtol=1e-5, atol=1e-5)
        assert seen and all(n == 2 for n in seen), seen
        assert workers and all(n == 1 for n in workers), workers
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("r_q", [1, 2])
def test_no_grad_scoring_of_inputs_that_require_grad_on_parallel_workers(monkeypatch, two_threads, r_q):
    """Under no_grad, inputs that require grad (a model's output) are scored as values on every worker.

    Their views still require grad and the helper threads run in grad mode (it is per thread), where
    ``mm(out=...)`` refused them: e.g. ``MultiVectorIndex.search`` at budget (1, r_c) raised.
    """
    monkeypatch.setattr(maxsim_mod, "_CPU_PARALLEL_MIN_WORK", 0)
    q = _rand(6, 4, 32, seed=56).float().requires_grad_()
    c = _rand(30, 8, 32, seed=57).float().requires_grad_()
    with torch.no_grad():
        out = maxsim(q, c, r_q, 4, chunk_size=10)
    assert not out.requires_grad
    torch.testing.assert_close(out.double(), maxsim_reference(q.detach().double(), c.detach().double(), r_q, 4),
                               rtol=1e-5, atol=1e-5)


def test_helper_pool_is_rebuilt_after_fork(monkeypatch):
    stale = maxsim_mod._helper_pool(1)
    monkeypatch.setattr(maxsim_mod, "_pool", (-1, 1, stale))  # as seen by a forked child
    fresh = maxsim_mod._helper_pool(1)
    assert fresh is not stale and fresh.submit(lambda: 3).result() == 3


def test_maxsim_stays_differentiable():
    q = _rand(3, 4, 5, seed=28).requires_grad_()
    c = _rand(6, 8, 5, seed=29).requires_grad_()
    torch.testing.assert_close(maxsim(q, c, 2, 3).detach(), maxsim_reference(q, c, 2, 3).detach())
    torch.autograd.gradcheck(lambda a, b: maxsim(a, b, 2, 3, chunk_size=4), (q, c))


def test_chunking_over_queries_matches():
    q, c = _rand(50, 4, 6, seed=11), _rand(7, 8, 6, seed=12)
    out = maxsim(q, c, max_chunk_bytes=4 * 8 * 4 * 3)  # 3 (query, candidate) pairs per block
    torch.testing.assert_close(out, maxsim_reference(q, c))


def test_empty_inputs_give_empty_scores():
    q, c = _rand(3, 4, 5), _rand(0, 8, 5)
    out = maxsim(q, c)
    assert out.shape == (3, 0)
    assert maxsim(_rand(0, 4, 5), _rand(6, 8, 5)).shape == (0, 6)
    assert maxsim(_rand(0, 4, 5).float(), _rand(0, 8, 5).float()).dtype == torch.float32
    with pytest.raises(GroupError, match="exceeds"):
        maxsim(q, c, 5, 8)  # budgets are still checked


def test_non_contiguous_inputs():
    base_q = _rand(6, 5, 4, seed=13)  # [R_q, nq, D]
    q = base_q.transpose(0, 1)  # [nq=5, R_q=6, D=4] non-contiguous
    base_c = _rand(4, 9, 12, seed=14)  # [D, N, R_c]
    c = base_c.permute(1, 2, 0)  # [N=9, R_c=12, D=4], D has stride != 1
    assert not q.is_contiguous() and not c.is_contiguous()
    torch.testing.assert_close(maxsim(q, c, 3, 7, chunk_size=2), maxsim_reference(q.contiguous(), c.contiguous(), 3, 7))
    c_strided = _rand(20, 12, 4, seed=15)[::2, 1:]  # every other row, offset tokens
    torch.testing.assert_close(maxsim(q, c_strided), maxsim_reference(q, c_strided.contiguous()))


def test_bf16_inputs_accumulate_in_fp32():
    q, c = _rand(4, 16, 64, seed=16), _rand(5, 8, 64, seed=17)
    qb, cb = q.bfloat16(), c.bfloat16()
    out = maxsim(qb, cb)
    assert out.dtype == torch.float32
    exact = maxsim_reference(qb.double(), cb.double())  # same rounded inputs, exact arithmetic
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)
    # bf16 accumulation would be far off: the fp32 path must be much closer than that
    bf16_err = (maxsim_reference(qb, cb).double() - exact).abs().max()
    assert (out.double() - exact).abs().max() < bf16_err / 10


@pytest.mark.parametrize("r_q, r_c", [(1, 1), (16, 8)])
def test_fp16_inputs_accumulate_in_fp32(r_q, r_c):
    """fp16, like bf16, is upcast: the compute dtype starts from fp32 (promote(bf16, fp16) is fp32, so a compute
    dtype started from fp16 passed the bf16 test while fp16 inputs were summed in fp16)."""
    q, c = _rand(4, 16, 64, seed=18), _rand(5, 8, 64, seed=19)
    qh, ch = q.half(), c.half()
    exact = maxsim_reference(qh.double(), ch.double(), r_q, r_c)
    for out in (maxsim(qh, ch, r_q, r_c), pairwise_maxsim(qh[:4], ch[:4], r_q, r_c)[:, None]):
        assert out.dtype == torch.float32
    out = maxsim(qh, ch, r_q, r_c)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pairwise_maxsim(qh[:4], ch[:4], r_q, r_c).double(), exact[:4].diagonal(),
                               rtol=1e-5, atol=1e-4)


def test_mixed_dtypes():
    q, c = _rand(3, 4, 8), _rand(5, 6, 8)
    out = maxsim(q.bfloat16(), c.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), maxsim_reference(q.bfloat16().double(), c.float().double()), rtol=1e-5, atol=1e-5)


def test_budget_errors():
    q, c = _rand(2, 16, 4), _rand(3, 64, 4)
    with pytest.raises(GroupError, match=r"budget \(32, 64\) exceeds the trained token counts R_q=16, R_c=64"):
        maxsim(q, c, 32, 64)
    with pytest.raises(GroupError, match=r"budget \(16, 65\)"):
        maxsim(q, c, r_c=65)
    with pytest.raises(GroupError, match="r_q >= 1"):
        maxsim(q, c, 0, 4)
    with pytest.raises(GroupError, match="exceeds"):
        maxsim_reference(q, c, 17, 4)


def test_shape_device_and_argument_errors():
    q, c = _rand(2, 4, 8), _rand(3, 6, 8)
    with pytest.raises(ValueError, match=r"queries must be 3-D"):
        maxsim(q[0], c)
    with pytest.raises(ValueError, match=r"candidates must be 3-D"):
        maxsim(q, c[0])
    with pytest.raises(ValueError, match=r"queries has D=8, candidates has D=7"):
        maxsim(q, _rand(3, 6, 7))
    with pytest.raises(ValueError, match="R_q=0"):
        maxsim(_rand(2, 0, 8), c)
    with pytest.raises(ValueError, match="on meta but candidates is on cpu"):
        maxsim(q.to("meta"), c)
    with pytest.raises(ValueError, match="chunk_size"):
        maxsim(q, c, chunk_size=0)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        maxsim(q, c, max_chunk_bytes=0)
    with pytest.raises(ValueError, match="backend"):
        maxsim(q, c, backend="numba")
    with pytest.raises(TypeError, match="queries must be a torch.Tensor"):
        maxsim(q.numpy(), c)
    with pytest.raises(TypeError, match="real floating"):  # named, not a matmul error on bool
        maxsim(q > 0, c > 0)


def test_backend_cuda_on_cpu_tensors_raises():
    q, c = _rand(2, 4, 8), _rand(3, 6, 8)
    with pytest.raises(RuntimeError, match="backend='cuda' requested but inputs are on cpu"):
        maxsim(q, c, backend="cuda")
    torch.testing.assert_close(maxsim(q, c, backend="torch"), maxsim_reference(q, c))


@pytest.mark.parametrize("shape_q, shape_c", [((0, 4, 8), (3, 6, 8)), ((2, 4, 8), (0, 6, 8)), ((2, 4, 0), (3, 6, 0))])
def test_unusable_backend_raises_for_empty_inputs_too(monkeypatch, shape_q, shape_c):
    """``backend="cuda"`` / ``"triton"`` that cannot run is an error whatever the shapes (not zeros for empty ones)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, c = _rand(*shape_q).float(), _rand(*shape_c).float()
    with pytest.raises(RuntimeError, match="backend='cuda' requested but inputs are on cpu"):
        maxsim(q, c, backend="cuda")
    with pytest.raises(RuntimeError, match="Triton cannot run on cpu"):
        maxsim(q, c, backend="triton")
    with pytest.raises(RuntimeError, match="has no backward"):
        maxsim(q.requires_grad_(), c, backend="cuda")
    assert maxsim(q.detach(), c, backend="torch").shape == maxsim(q.detach(), c).shape == (shape_q[0], shape_c[0])


def test_auto_dispatches_to_kernel_when_available(monkeypatch):
    """CUDA inputs go to metaembed.kernels.maxsim_cuda when it says it is available."""
    calls = []
    fake = types.ModuleType("metaembed.kernels")
    asked = []
    fake.is_available = lambda device=None: asked.append(device) or True

    def maxsim_cuda(queries, candidates, r_q, r_c):
        calls.append((r_q, r_c))
        return torch.full((queries.shape[0], candidates.shape[0]), 7.0)

    fake.maxsim_cuda = maxsim_cuda
    monkeypatch.setitem(sys.modules, "metaembed.kernels", fake)
    import metaembed

    monkeypatch.setattr(metaembed, "kernels", fake, raising=False)
    q, c = _rand(2, 4, 8).float(), _rand(3, 6, 8).float()

    class _FakeCuda(torch.Tensor):  # a CPU tensor that claims to be on CUDA
        @property
        def is_cuda(self):
            return True

    out = maxsim_mod._try_cuda_kernel(q.as_subclass(_FakeCuda), c, 2, 4, required=True)
    assert calls == [(2, 4)] and out.shape == (2, 3) and bool((out == 7).all())
    assert asked == [c.device]  # the architecture of the device holding the index, not the current one
    fake.is_available = lambda device=None: False
    assert maxsim_mod._try_cuda_kernel(q.as_subclass(_FakeCuda), c, 2, 4, required=False) is None
    with pytest.raises(RuntimeError, match="is_available"):
        maxsim_mod._try_cuda_kernel(q.as_subclass(_FakeCuda), c, 2, 4, required=True)
    # CPU inputs never touch the kernel in auto mode
    fake.is_available = lambda device=None: True
    calls.clear()
    torch.testing.assert_close(maxsim(q, c), maxsim_reference(q, c))
    assert calls == []


def test_kernel_scores_come_back_as_fp32(monkeypatch):
    """maxsim promises fp32 scores for fp16 / bf16 / fp32 inputs; a kernel returning its input dtype (fp16)
    must be upcast, or downstream P@1 / NDCG would rank on fp16-rounded scores (spurious ties)."""
    fake = types.ModuleType("metaembed.kernels")
    fake.is_available = lambda device=None: True
    fake.maxsim_cuda = lambda queries, candidates, r_q, r_c: torch.full(
        (queries.shape[0], candidates.shape[0]), 1.0009765625 + 2**-12, dtype=torch.float32).half()
    monkeypatch.setitem(sys.modules, "metaembed.kernels", fake)

    class _FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    q, c = _rand(2, 4, 8).half(), _rand(3, 6, 8).half()
    out = maxsim_mod._try_cuda_kernel(q.as_subclass(_FakeCuda), c, 2, 4, required=True)
    assert out.dtype == torch.float32 and out.shape == (2, 3)


def test_missing_kernels_module_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "metaembed.kernels", None)  # makes the import raise ImportError
    q, c = _rand(2, 4, 8).float(), _rand(3, 6, 8).float()

    class _FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    assert maxsim_mod._try_cuda_kernel(q.as_subclass(_FakeCuda), c, 4, 6, required=False) is None
    with pytest.raises(RuntimeError, match="cannot be imported"):
        maxsim_mod._try_cuda_kernel(q.as_subclass(_FakeCuda), c, 4, 6, required=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference():
    q, c = _rand(33, 16, 32, seed=20), _rand(257, 64, 32, seed=21)
    for r_q, r_c in [(16, 64), (2, 4), (1, 1)]:
        ref = maxsim_reference(q, c, r_q, r_c)
        for backend in ("auto", "torch"):
            out = maxsim(q.float().cuda(), c.float().cuda(), r_q, r_c, backend=backend)
            assert out.device.type == "cuda" and out.dtype == torch.float32
            torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-3)


def test_pairwise_maxsim_is_the_diagonal():
    q, c = _rand(5, 4, 6, seed=18), _rand(5, 8, 6, seed=19)
    torch.testing.assert_close(pairwise_maxsim(q, c), maxsim_reference(q, c).diagonal())
    torch.testing.assert_close(pairwise_maxsim(q, c, 2, 3), maxsim_reference(q, c, 2, 3).diagonal())
    assert pairwise_maxsim(q.bfloat16(), c.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="same number of rows"):
        pairwise_maxsim(q, c[:4])
    with pytest.raises(GroupError, match="exceeds"):
        pairwise_maxsim(q, c, 5, 1)


def test_pairwise_maxsim_gradients():
    q = _rand(3, 2, 4, seed=22).requires_grad_()
    c = _rand(3, 3, 4, seed=23).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: pairwise_maxsim(a, b), (q, c))


def test_top_level_maxsim_is_callable_in_any_import_order():
    """`import metaembed.maxsim` must not shadow the `metaembed.maxsim(...)` function."""
    import metaembed
    import metaembed.maxsim  # noqa: F401  (rebinds the package attribute to the submodule)

    q, c = _rand(2, 4, 8).float(), _rand(3, 6, 8).float()
    torch.testing.assert_close(metaembed.maxsim(q, c, 2, 3), maxsim_reference(q, c, 2, 3))


def test_inputs_requiring_grad_never_take_a_kernel(monkeypatch):
    """The kernels have no backward: with grad on, "auto" must use the differentiable torch path on a
    CUDA tensor (not silently return scores without a graph), and "cuda" / "triton" must say so."""
    calls = []
    fake = types.ModuleType("metaembed.kernels")
    fake.is_available = lambda device=None: True

    def maxsim_cuda(queries, candidates, r_q, r_c):  # a real kernel's output carries no graph
        calls.append((r_q, r_c))
        return maxsim_reference(queries.detach(), candidates.detach(), r_q, r_c).float()

    fake.maxsim_cuda = maxsim_cuda
    monkeypatch.setitem(sys.modules, "metaembed.kernels", fake)

    class _FakeCuda(torch.Tensor):  # a CPU tensor that claims to be on CUDA
        @property
        def is_cuda(self):
            return True

    q = _rand(2, 4, 8, seed=50).float().as_subclass(_FakeCuda).requires_grad_()
    c = _rand(3, 6, 8, seed=51).float()
    out = maxsim(q, c, 2, 3)
    assert calls == [] and out.requires_grad
    out.sum().backward()
    q_ref = q.detach().as_subclass(torch.Tensor).clone().requires_grad_()
    maxsim_reference(q_ref, c, 2, 3).sum().backward()
    torch.testing.assert_close(q.grad.as_subclass(torch.Tensor), q_ref.grad)
    for backend in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match="no backward"):
            maxsim(q, c, 2, 3, backend=backend)
    with torch.no_grad():  # no graph wanted: the kernel is used
        maxsim(q, c, 2, 3)
    assert calls == [(2, 3)]


def test_fp64_blocks_respect_max_chunk_bytes(monkeypatch):
    """fp64 inputs give an fp64 [qb, r_q, cb, r_c] block: 8 bytes per element against the budget, not 4."""
    seen = []
    real = maxsim_mod._score_range

    def spy(*args):
        q_pre, c_pre, out, r_q, r_c, qb, cb = args[:7]
        seen.append(min(qb, q_pre.shape[0]) * r_q * min(cb, c_pre.shape[0]) * r_c * out.element_size())
        return real(*args)

    monkeypatch.setattr(maxsim_mod, "_score_range", spy)
    q, c = _rand(16, 8, 16, seed=52), _rand(16, 8, 16, seed=53)
    budget = 8 * 8 * 8 * 16  # 16 fp64 (query, candidate) blocks
    out = maxsim(q, c, max_chunk_bytes=budget)
    torch.testing.assert_close(out, maxsim_reference(q, c), rtol=1e-12, atol=1e-12)
    assert seen and sum(seen) <= budget


def test_zero_dim_embeddings_score_zero_like_the_reference():
    q, c = _rand(2, 3, 0), _rand(4, 5, 0)
    torch.testing.assert_close(maxsim(q, c), maxsim_reference(q, c))
    assert maxsim(q.float(), c.float(), 1, 1).shape == (2, 4)


def test_zero_dim_embeddings_give_zeros_not_uninitialised_memory():
    """D = 0: every score is an empty sum, 0; a freed block of 7s is what an uninitialised result would hold."""
    for _ in range(3):
        junk = torch.full((64, 64), 7.0)  # [nq, N] fp32, freed so the allocator can hand it out again
        del junk
        out = maxsim(torch.ones(64, 2, 0), torch.ones(64, 3, 0))  # [64, 64]
        assert torch.equal(out, torch.zeros(64, 64))


def test_a_replaced_helper_pool_still_accepts_work():
    """A caller holding the pool while another thread grows it must still be able to submit its jobs."""
    held = maxsim_mod._helper_pool(1)
    grown = maxsim_mod._helper_pool(maxsim_mod._pool[1] + 1)
    assert held.submit(lambda: 3).result() == 3 and grown.submit(lambda: 4).result() == 4


def test_kernel_dispatch_refuses_unhandled_dtypes_and_a_wrong_output_shape(monkeypatch):
    """``backend="auto"`` hands CUDA inputs to the kernel only when *both* dtypes are ones it handles: a float64
    index with float32 queries takes the torch path (the kernel would refuse it with a TypeError, not fall
    back); and a kernel result of the wrong shape is a RuntimeError, never returned as scores."""
    fake = types.ModuleType("metaembed.kernels")
    fake.is_available = lambda device=None: True
    shape = {}
    fake.maxsim_cuda = lambda queries, candidates, r_q, r_c: torch.zeros(shape["out"])
    monkeypatch.setitem(sys.modules, "metaembed.kernels", fake)

    class _FakeCuda(torch.Tensor):  # a CPU tensor that claims to be on CUDA
        @property
        def is_cuda(self):
            return True

    q, c = _rand(2, 4, 8).float(), _rand(3, 6, 8).float()
    for cq, cc in ((q, c.double()), (q.double(), c)):
        kernels, reason = maxsim_mod._cuda_kernels(cq.as_subclass(_FakeCuda), cc)
        assert kernels is None and "float64" in reason
        assert maxsim_mod._try_cuda_kernel(cq.as_subclass(_FakeCuda), cc, 4, 6, required=False) is None
    shape["out"] = (2, 3)
    assert maxsim_mod._try_cuda_kernel(q.as_subclass(_FakeCuda), c, 4, 6, required=True).shape == (2, 3)
    shape["out"] = (3, 2)
    with pytest.raises(RuntimeError, match=r"returned shape \(3, 2\), expected \(2, 3\)"):
        maxsim_mod._try_cuda_kernel(q.as_subclass(_FakeCuda), c, 4, 6, required=True)
