"""Tests for metaembed.evaluation with fake encoders (no model)."""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from _memory import peak_rss_growth, peak_rss_growth_in_fresh_process
from metaembed.data.records import Benchmark, DocRetrievalTask, EvalQuery, EvalTask, Item
from metaembed.data.synthetic import make_benchmark
from metaembed.evaluation import (
    RESULT_COLUMNS,
    TiedPositiveWarning,
    budget_table,
    budget_table_title,
    evaluate,
    evaluate_doc_retrieval,
    evaluate_mmeb,
    ndcg_at_k,
    precision_at_1,
    random_ndcg_at_k,
    random_ranking_level,
    results_to_json,
    summarize,
    tied_with_positive,
)

R_Q, R_C, DIM = 4, 8, 16


class HashEncoder:
    """Deterministic random unit vectors per (uid or text, role); counts what it encodes."""

    def __init__(self, R_q: int = R_Q, R_c: int = R_C, dim: int = DIM, fail_after: int | None = None):
        self.R = {"query": R_q, "candidate": R_c}
        self.dim = dim
        self.calls = 0
        self.seen: dict[str, list[str]] = {"query": [], "candidate": []}
        self.fail_after = fail_after

    def vectors(self, item: Item, role: str) -> torch.Tensor:
        key = f"{role}|{item.uid or item.text}"
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        v = torch.randn(self.R[role], self.dim, generator=torch.Generator().manual_seed(seed))
        return torch.nn.functional.normalize(v, dim=-1)  # [R, D]

    def __call__(self, items, role):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.seen[role] += [it.uid or it.text for it in items]
        return torch.stack([self.vectors(it, role) for it in items])  # [n, R, D]


class Truncated:
    def __init__(self, enc: HashEncoder, r_q: int, r_c: int):
        self.enc, self.r = enc, {"query": r_q, "candidate": r_c}

    def __call__(self, items, role):
        return self.enc(items, role)[:, : self.r[role]]


def _text(t: str, uid: bool = True) -> Item:
    return Item(text=t, uid=t if uid else None)


def _random_tasks(seed: int = 0, n_tasks: int = 3, nq: int = 6, n_cand: int = 5) -> list[EvalTask]:
    rng = random.Random(seed)
    pool = [_text(f"doc {i}") for i in range(12)]  # shared candidates -> dedupe
    metas = ["classification", "vqa", "retrieval", "grounding"]
    tasks = []
    for t in range(n_tasks):
        qs = [EvalQuery(query=_text(f"t{t} q{i}"), candidates=rng.sample(pool, n_cand), qid=f"q{i}") for i in range(nq)]
        tasks.append(EvalTask(name=f"T{t}", meta_task=metas[t % 4], split="ind" if t % 2 == 0 else "ood", queries=qs))
    return tasks


# ----------------------------------------------------------------------------- precision@1
def test_precision_at_1_tie_modes():
    s = torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 2.0, 1.0], [2.0, 2.0, 2.0]])
    assert precision_at_1(s).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert precision_at_1(s, ties="pessimistic").tolist() == [1.0, 0.0, 0.0, 0.0]
    assert precision_at_1(s, ties="expected").tolist() == pytest.approx([1.0, 0.0, 0.5, 1 / 3])
    assert precision_at_1(torch.tensor([[0.3]])).tolist() == [1.0]


def test_precision_at_1_first_matches_vlm2vec_argmax():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 3, (200, 6), generator=g).float()  # many ties
    expected = torch.tensor([float(np.argmax(row) == 0) for row in s.numpy()], dtype=torch.float64)
    assert torch.equal(precision_at_1(s, ties="first"), expected)


def test_precision_at_1_is_fp64_for_fp32_scores_and_single_candidates():
    """Hits are fp64 whatever the score dtype (the evaluator writes them into an fp64 tensor; an fp32 result of a
    one-candidate query made evaluate_mmeb raise 'Index put requires the source and destination dtypes match')."""
    for scores in (torch.tensor([[0.5]]), torch.tensor([[0.5, 0.2], [0.1, 0.3]])):
        for ties in ("first", "pessimistic", "expected"):
            assert precision_at_1(scores, ties=ties).dtype == torch.float64
    task = EvalTask("One", "vqa", "ind", [EvalQuery(_text("q"), [_text("only")], "q")])
    assert evaluate_mmeb([task], HashEncoder(), None, progress=False).value.tolist() == [100.0]


def test_tied_with_positive_flags_exact_ties_only():
    """Only a positive *equal* to the best other candidate is a tie (the TiedPositiveWarning count)."""
    s = torch.tensor([[0.9, 0.5, 0.2], [0.5, 0.5, 0.1], [0.4, 0.5, 0.4], [0.7, 0.7, 0.7]])  # [4, 3]
    assert tied_with_positive(s).tolist() == [False, True, False, True]
    assert tied_with_positive(torch.tensor([[0.3]])).tolist() == [False]  # no other candidate


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3), "2-D"), (torch.zeros(2, 0), "no candidates"),
    (torch.tensor([[1.0, float("nan")]]), "NaN"),
])
def test_precision_at_1_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        precision_at_1(bad)
    with pytest.raises(ValueError, match="ties"):
        precision_at_1(torch.zeros(1, 2), ties="optimistic")


# ----------------------------------------------------------------------------- NDCG
def test_ndcg_hand_computed():
    scores = torch.tensor([
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # ranking 0,1,2,3,4,5
        [0.1, 0.5, 0.5, 0.5, 0.2, 0.0],  # ties: 3,2,1 (doc index descending), then 4, 0, 5
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ])
    qrels = [{1: 2, 5: 1}, {1: 2, 0: 1, 5: 1}, {0: 0, 1: -1}, {}]
    got = ndcg_at_k(scores, qrels, k=5)
    d = lambda r: 1 / math.log2(r + 1)
    idcg0 = 2 * d(1) + 1 * d(2)
    assert got[0].item() == pytest.approx((2 * d(2)) / idcg0)  # doc 5 at rank 6 is cut off
    idcg1 = 2 * d(1) + d(2) + d(3)
    assert got[1].item() == pytest.approx((2 * d(3) + 1 * d(5)) / idcg1)
    assert got[2].item() == 0.0  # judged but nothing positive: 0 like trec_eval
    assert math.isnan(got[3].item())  # no judgement: trec_eval skips the query
    assert ndcg_at_k(scores[:1], [{1: 2, 5: 1}], k=1).item() == 0.0


def test_ndcg_errors():
    with pytest.raises(ValueError, match="doc index 7"):
        ndcg_at_k(torch.zeros(1, 3), [{7: 1}])
    with pytest.raises(ValueError, match="2 entries"):
        ndcg_at_k(torch.zeros(1, 3), [{0: 1}, {1: 1}])
    with pytest.raises(ValueError, match="k must"):
        ndcg_at_k(torch.zeros(1, 3), [{0: 1}], k=0)
    with pytest.raises(ValueError, match="k must"):
        ndcg_at_k(torch.zeros(1, 3), [{0: 1}], k=2.0)
    # a numpy integer (e.g. from a parameter grid) is an int k, not an error
    scores = torch.tensor([[0.3, 0.9, 0.1]])
    assert ndcg_at_k(scores, [{0: 1, 2: 2}], k=np.int64(2)).item() == ndcg_at_k(scores, [{0: 1, 2: 2}], k=2).item()


def test_ndcg_matches_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    nq, n_docs = 30, 25
    scores = torch.from_numpy(rng.integers(0, 6, size=(nq, n_docs)).astype(np.float32))  # lots of ties
    qrels = []
    for i in range(nq):
        docs = rng.choice(n_docs, size=int(rng.integers(1, 8)), replace=False)
        qrels.append({int(d): int(rng.integers(-1, 4)) for d in docs})
    qrels[0] = {int(d): 0 for d in range(3)}  # judged, nothing relevant
    ours = ndcg_at_k(scores, qrels, k=5)
    name = lambda d: f"d{d:03d}"  # zero-padded so string order == index order
    ev = pytrec_eval.RelevanceEvaluator(
        {f"q{i}": {name(d): g for d, g in r.items()} for i, r in enumerate(qrels)}, {"ndcg_cut_5"}
    )
    res = ev.evaluate({f"q{i}": {name(d): float(scores[i, d]) for d in range(n_docs)} for i in range(nq)})
    theirs = torch.tensor([res[f"q{i}"]["ndcg_cut_5"] for i in range(nq)], dtype=torch.float64)
    assert torch.allclose(ours, theirs, atol=1e-9)


def test_ndcg_ranks_fp64_scores_as_trec_eval_stores_them():
    """trec_eval holds run scores as a C float: fp64 scores equal in fp32 tie there (doc id descending first),
    and ndcg_at_k ranked them by their fp64 values (1.0 instead of 0.63; a review helper)."""
    scores = torch.tensor([[1.0 + 1e-12, 1.0]], dtype=torch.float64)  # doc 0 relevant, ahead only in fp64
    assert ndcg_at_k(scores, [{0: 1}], k=5).item() == pytest.approx(1 / np.log2(3), abs=1e-15)
    with pytest.raises(ValueError, match="fp32 range"):
        ndcg_at_k(torch.tensor([[1e300, 0.0]], dtype=torch.float64), [{0: 1}])
    pytrec_eval = pytest.importorskip("pytrec_eval")
    res = pytrec_eval.RelevanceEvaluator({"q": {"d0": 1}}, {"ndcg_cut_5"}).evaluate(
        {"q": {"d0": 1.0 + 1e-12, "d1": 1.0}})
    assert res["q"]["ndcg_cut_5"] == pytest.approx(1 / np.log2(3), abs=1e-12)


def test_ndcg_matches_pytrec_eval_when_k_exceeds_the_corpus():
    """k = 5 and 10 over 3-4 docs, tied scores, grade-0 judgements (pytrec_eval's default ndcg_cut cut-offs).
    Grades stay >= -1: pytrec_eval 0.5 crashes on a query judged only with grades <= -2."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(1)
    for n_docs in (3, 4):
        scores = torch.from_numpy(rng.integers(0, 2, size=(8, n_docs)).astype(np.float64))  # [8, n_docs]
        qrels = [{int(d): int(rng.integers(-1, 3)) for d in rng.choice(n_docs, size=int(rng.integers(1, n_docs + 1)),
                                                                       replace=False)} for _ in range(8)]
        ev = pytrec_eval.RelevanceEvaluator(
            {f"q{i}": {f"d{d}": g for d, g in r.items()} for i, r in enumerate(qrels)}, {"ndcg_cut"})
        res = ev.evaluate({f"q{i}": {f"d{d}": float(scores[i, d]) for d in range(n_docs)} for i in range(8)})
        for k in (5, 10):
            theirs = torch.tensor([res[f"q{i}"][f"ndcg_cut_{k}"] for i in range(8)], dtype=torch.float64)
            assert torch.allclose(ndcg_at_k(scores, qrels, k=k), theirs, atol=1e-12)


@pytest.mark.parametrize("n_docs", [1, 3, 5, 6])
def test_random_ndcg_is_the_mean_over_every_ranking(n_docs: int):
    """The random-ranking floor is exact: the mean of ndcg_at_k over all n_docs! rankings (graded, negative and
    zero grades, a query without judgements, k below, at and above the corpus size)."""
    import itertools

    rng = np.random.default_rng(n_docs)
    qrels = [{int(d): int(rng.integers(-1, 4)) for d in rng.choice(n_docs, size=int(rng.integers(1, n_docs + 1)),
                                                                   replace=False)} for _ in range(5)]
    qrels += [{0: 0}, {}]  # judged with nothing relevant: 0.0; no judgement: NaN (as ndcg_at_k)
    perms = torch.tensor(list(itertools.permutations(range(n_docs))), dtype=torch.float64)  # [n!, n_docs] scores
    for k in (1, 2, 5, 10):
        want = torch.stack([ndcg_at_k(perms, [rel] * len(perms), k=k).mean() for rel in qrels])  # [nq]
        got = random_ndcg_at_k(qrels, n_docs, k=k)
        assert torch.allclose(got, want, atol=1e-12, equal_nan=True), (k, got, want)
        assert got[-2].item() == 0.0 and math.isnan(got[-1].item())
    with pytest.raises(ValueError, match="doc index 9"):
        random_ndcg_at_k([{9: 1}], n_docs)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="n_docs"):
            random_ndcg_at_k([{0: 1}], bad)


def test_random_ranking_level_averages_as_the_ndcg_group():
    """Per task the mean over its judged queries, then the unweighted mean over tasks (the NDCG@k summary row)."""
    task = _doc_task()  # 10 docs; q4 unjudged, q3 judged only 0
    d = 1 / np.log2(np.arange(2, 7))  # [5]
    per_query = [3 / 10 * d.sum() / (2 * d[0] + d[1]), 1 / 10 * d.sum() / d[0],
                 5 / 10 * d.sum() / (2 * d[0] + 2 * d[1] + d[2]), 0.0]
    assert random_ranking_level([task]) == pytest.approx(100 * np.mean(per_query), abs=1e-12)
    small = DocRetrievalTask("Small", {"q": _text("q")}, {"a": _text("a"), "b": _text("b")}, {"q": {"b": 1}})
    both = random_ranking_level([task, small], k=1)
    assert both == pytest.approx((100 * np.mean([3 / 10 / 2, 1 / 10, 5 / 10 / 2, 0.0]) + 50.0) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        random_ranking_level([])


# ----------------------------------------------------------------------------- MMEB evaluation
def test_evaluate_mmeb_known_values():
    e = {n: torch.tensor(v, dtype=torch.float32) for n, v in {
        "q1": [[1.0, 0.0]], "q2": [[0.0, 1.0]], "a": [[1.0, 0.0]], "b": [[0.0, 1.0]], "c": [[0.6, 0.8]]}.items()}

    def enc(items, role):
        return torch.stack([e[it.uid] for it in items])

    a, b, c = _text("a"), _text("b"), _text("c")
    task = EvalTask("T", "retrieval", "ind", [
        EvalQuery(_text("q1"), [a, b, c], "q1"),  # a is best: hit
        EvalQuery(_text("q2"), [a, b, c], "q2"),  # b (1.0) beats a (0.0)? positive is a -> miss
    ])
    df = evaluate_mmeb([task], enc, [(1, 1)], progress=False)
    assert list(df.columns) == RESULT_COLUMNS
    row = df.iloc[0]
    assert (row.task, row.meta_task, row.split, row.budget, row.metric, row.n_queries) == (
        "T", "retrieval", "ind", "(1,1)", "P@1", 2)
    assert row.value == pytest.approx(50.0)
    # a tie with the positive: "first" counts a hit, "pessimistic" a miss
    tie = EvalTask("Tie", "vqa", "ood", [EvalQuery(_text("q1"), [a, _text("a2")], "q")])
    e["a2"] = e["a"].clone()
    with pytest.warns(TiedPositiveWarning, match=r"Tie \(1,1\): 1/1.*counts them as hits"):
        assert evaluate_mmeb([tie], enc, [(1, 1)], progress=False).value[0] == 100.0
    with pytest.warns(TiedPositiveWarning, match="counts them as misses"):
        assert evaluate_mmeb([tie], enc, [(1, 1)], progress=False, ties="pessimistic").value[0] == 0.0
    with pytest.warns(TiedPositiveWarning):
        assert evaluate_mmeb([tie], enc, [(1, 1)], progress=False, ties="expected").value[0] == 50.0


def test_a_collapsed_encoder_is_flagged_and_eval_ties_reaches_the_scores(recwarn):
    """Every item encoded alike: VLM2Vec's argmax rule gives 100% P@1; the warning says so, eval.ties changes it."""
    from metaembed.config import ConfigError, config_from_dict
    from metaembed.pipeline import evaluate_model

    bench = make_benchmark(n_train=8, n_eval_queries=4, tasks=["Cls-Object", "Ret-T2I"])
    collapsed = SimpleNamespace(encode=lambda items, role: torch.nn.functional.normalize(
        torch.ones(len(items), 2, 4), dim=-1))
    out = {}
    for ties in ("first", "pessimistic"):
        cfg = config_from_dict({"model": {"R_q": 2, "R_c": 2}, "loss": {"groups": [[1, 1], [2, 2]]},
                                "eval": {"ties": ties}})
        with pytest.warns(TiedPositiveWarning, match=r"Cls-Object \(1,1\): 4/4"):
            df = evaluate_model(collapsed, Benchmark(train=[], eval_tasks=bench.eval_tasks), cfg)
        out[ties] = df[df.metric == "P@1"].value.tolist()
    assert out["first"] == [100.0] * 4 and out["pessimistic"] == [0.0] * 4
    with pytest.raises(ConfigError, match="eval.ties='optimistic'"):
        config_from_dict({"eval": {"ties": "optimistic"}})


def test_budget_slicing_equals_truncated_encoder():
    tasks = _random_tasks()
    enc = HashEncoder()
    budgets = [(1, 1), (2, 4), (4, 8), (1, 8)]
    df = evaluate_mmeb(tasks, enc, budgets, progress=False)
    assert len(df) == len(tasks) * len(budgets)
    for r_q, r_c in budgets:
        ref = evaluate_mmeb(tasks, Truncated(HashEncoder(), r_q, r_c), None, progress=False)
        got = df[(df.r_q == r_q) & (df.r_c == r_c)].reset_index(drop=True)
        assert got.value.tolist() == pytest.approx(ref.value.tolist())
    # and the metric itself: a direct recomputation for one budget
    t = tasks[0]
    hits = []
    for q in t.queries:
        qv = enc.vectors(q.query, "query")[:2]
        s = [(qv @ enc.vectors(c, "candidate")[:4].T).amax(dim=1).sum().item() for c in q.candidates]
        hits.append(float(np.argmax(s) == 0))
    assert df[(df.task == "T0") & (df.budget == "(2,4)")].value.item() == pytest.approx(100 * np.mean(hits))


def test_each_unique_item_encoded_once():
    tasks = _random_tasks()
    x = _text("same object, no uid", uid=False)
    tasks[0].queries[0].candidates += [x, x]  # same object twice -> once
    tasks[0].queries[1].candidates.append(_text("same object, no uid", uid=False))  # a distinct object
    enc = HashEncoder()
    evaluate_mmeb(tasks, enc, [(1, 1), (4, 8)], batch_size=4, progress=False)
    n_unique = len({c.uid for t in tasks for q in t.queries for c in q.candidates if c.uid})
    assert len(enc.seen["candidate"]) == n_unique + 2
    assert enc.seen["candidate"].count("same object, no uid") == 2
    assert len(enc.seen["query"]) == sum(len(t.queries) for t in tasks)
    assert max(1, math.ceil(n_unique / 4)) <= enc.calls


def test_cache_resume(tmp_path):
    tasks = _random_tasks()
    full = evaluate_mmeb(tasks, HashEncoder(), [(2, 4)], batch_size=3, progress=False)
    # an interrupted first run ...
    enc = HashEncoder(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate_mmeb(tasks, enc, [(2, 4)], batch_size=3, cache_dir=tmp_path, cache_key="hash", progress=False)
    done = set(enc.seen["query"]) | set(enc.seen["candidate"])
    # ... resumes without re-encoding what was stored
    enc2 = HashEncoder()
    df = evaluate_mmeb(tasks, enc2, [(2, 4)], batch_size=3, cache_dir=tmp_path, cache_key="hash", progress=False)
    assert not (set(enc2.seen["query"]) | set(enc2.seen["candidate"])) & done
    pd.testing.assert_frame_equal(df, full)
    # a third run encodes nothing at all
    enc3 = HashEncoder(fail_after=0)
    pd.testing.assert_frame_equal(
        evaluate_mmeb(tasks, enc3, [(2, 4)], cache_dir=tmp_path, cache_key="hash", progress=False), full)
    # one key naming two differently shaped encoders is caught
    with pytest.raises(ValueError, match="cache_key"):
        evaluate_mmeb(_random_tasks(seed=1, n_tasks=1) + [EvalTask("New", "vqa", "ind", [
            EvalQuery(_text("brand new"), [_text("new cand")], "n")])],
            HashEncoder(R_q=2, R_c=2), [(1, 1)], cache_dir=tmp_path, cache_key="hash", progress=False)


def _encode_into_shared_cache(cache_dir: str, worker: int, n: int, start) -> None:
    from metaembed.evaluation import _EmbeddingStore

    start.wait(60)  # both writers start together
    store = _EmbeddingStore(HashEncoder(), batch_size=1, cache_dir=cache_dir, progress=False, cache_key="shared")
    store.embed([Item(text=f"w{worker}-{i}", uid=f"w{worker}-{i}") for i in range(n)], "candidate", "Task")


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-cache", "existing-cache"])
def test_cache_concurrent_writers(tmp_path, fresh):
    """Two evaluations sharing one cache folder (same task label) keep every shard and leave no temp files,
    whether both create the cache (its manifest) or it exists already (only shards race)."""
    import multiprocessing as mp

    from metaembed.evaluation import _EmbeddingStore

    if not fresh:
        _EmbeddingStore(HashEncoder(), 1, cache_dir=tmp_path, progress=False, cache_key="shared")
    ctx = mp.get_context("spawn")
    n, start = 60, ctx.Barrier(2)
    procs = [ctx.Process(target=_encode_into_shared_cache, args=(str(tmp_path), w, n, start)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = _EmbeddingStore(HashEncoder(fail_after=0), 1, cache_dir=tmp_path, progress=False, cache_key="shared")
    assert len(store.memo["candidate"]) == 2 * n  # nothing overwritten: every uid cached once
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".tmp"]
    # both shards' embeddings are the encoder's
    ref = HashEncoder()([Item(text="w1-7", uid="w1-7")], "candidate")[0]
    torch.testing.assert_close(store.memo["candidate"][("uid", "w1-7")], ref, rtol=0, atol=0)


class Negated(HashEncoder):
    """Same shapes as HashEncoder, different model: every candidate vector negated."""

    def __call__(self, items, role):
        out = super().__call__(items, role)
        return -out if role == "candidate" else out


def test_cache_keeps_encoders_apart(tmp_path):
    tasks = _random_tasks()
    budgets = [(1, 1), (2, 4)]
    a = evaluate_mmeb(tasks, HashEncoder(), budgets, cache_dir=tmp_path, cache_key="model-a", progress=False)
    ref_b = evaluate_mmeb(tasks, Negated(), budgets, progress=False)
    assert not np.allclose(a.value, ref_b.value)  # the two models really differ
    # same [R, D], same uids, one cache_dir: model b gets its own embeddings, not model a's
    b = evaluate_mmeb(tasks, Negated(), budgets, cache_dir=tmp_path, cache_key="model-b", progress=False)
    pd.testing.assert_frame_equal(b, ref_b)
    assert len(list(tmp_path.glob("enc-*/encoder.json"))) == 2
    # each resumes from its own folder without encoding anything
    pd.testing.assert_frame_equal(
        evaluate_mmeb(tasks, HashEncoder(fail_after=0), budgets, cache_dir=tmp_path, cache_key="model-a",
                      progress=False), a)
    # an encoder with a fingerprint() keys itself; a plain callable must name itself
    class Fingerprinted(Negated):
        def fingerprint(self):
            return "model-b"

    pd.testing.assert_frame_equal(
        evaluate_mmeb(tasks, Fingerprinted(fail_after=0), budgets, cache_dir=tmp_path, progress=False), ref_b)
    with pytest.raises(ValueError, match="cache_key"):
        evaluate_mmeb(tasks, HashEncoder(), budgets, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="cache_key"):
        evaluate_mmeb(tasks, HashEncoder(), budgets, cache_dir=tmp_path, cache_key=" ", progress=False)
    # shards of an older, unkeyed cache are ignored with a warning
    (tmp_path / "query").mkdir()
    with pytest.warns(UserWarning, match="ignored"):
        evaluate_mmeb(tasks, HashEncoder(fail_after=0), budgets, cache_dir=tmp_path, cache_key="model-a",
                      progress=False)


def _fruit_task(name: str, pos: str, neg: str, cand_prefix: str) -> EvalTask:
    """One query whose positive shares its text; uids are per-task row ids (``q0``), not content hashes."""
    return EvalTask(name, "vqa", "ind", [EvalQuery(Item(text=pos, uid="q0"), [
        Item(text=pos, uid=f"{cand_prefix}0"), Item(text=neg, uid=f"{cand_prefix}1")], "q0")])


def _fruit_encoder(items, role):
    e = {"apple": [1.0, 0.0], "pear": [0.0, 1.0]}
    return torch.tensor([[e[it.text]] for it in items])  # [n, 1, 2]


def test_a_uid_naming_two_different_items_raises(tmp_path):
    """Embeddings are keyed by uid: task B's query 'q0' (pear) silently got task A's 'q0' (apple) embedding,
    in one run or from the cache of an earlier one, and B scored 0% instead of 100%."""
    a, b = _fruit_task("A", "apple", "pear", "a"), _fruit_task("B", "pear", "apple", "b")
    assert evaluate_mmeb([b], _fruit_encoder, None, progress=False).value.tolist() == [100.0]
    with pytest.raises(ValueError, match=r"query uid 'q0' names two different items: .*text 'pear' without an image"):
        evaluate_mmeb([a, b], _fruit_encoder, None, progress=False)
    evaluate_mmeb([a], _fruit_encoder, None, cache_dir=tmp_path, cache_key="m", progress=False)
    with pytest.raises(ValueError, match=r"query uid 'q0' names two different items: .*embedding cache"):
        evaluate_mmeb([b], _fruit_encoder, None, cache_dir=tmp_path, cache_key="m", progress=False)
    # within one task's candidate list too
    clash = EvalTask("C", "vqa", "ind", [EvalQuery(Item(text="apple", uid="qa"), [
        Item(text="apple", uid="x"), Item(text="pear", uid="x")], "q0")])
    with pytest.raises(ValueError, match="candidate uid 'x' names two different items: text 'apple'"):
        evaluate_mmeb([clash], _fruit_encoder, None, progress=False)
    # one content under one uid, as distinct objects and across tasks and runs, is fine
    same = _fruit_task("A2", "apple", "pear", "a")
    df = evaluate_mmeb([a, same], _fruit_encoder, None, cache_dir=tmp_path, cache_key="m", progress=False)
    assert df.value.tolist() == [100.0, 100.0]


class _BufferEncoder:
    """Writes every batch into one reused buffer (as some encoders do): rows kept as views all become the last batch."""

    def __init__(self):
        self.buf = torch.zeros(4, 1, 2)

    def __call__(self, items, role):
        out = self.buf[: len(items)]
        out.copy_(_fruit_encoder(items, role))
        return out


def test_an_encoder_reusing_its_output_buffer_is_copied():
    """The store kept the tensor the encoder returned (a CPU fp32 tensor was not copied): an encoder writing
    every batch into one buffer left all embeddings equal to the last batch, every score tied."""
    task = EvalTask("T", "vqa", "ind", [
        EvalQuery(Item(text="apple", uid="qa"), [Item(text="apple", uid="ca"), Item(text="pear", uid="cp")], "q0"),
        EvalQuery(Item(text="pear", uid="qp"), [Item(text="pear", uid="cp"), Item(text="apple", uid="ca")], "q1")])
    df = evaluate_mmeb([task], _BufferEncoder(), None, batch_size=1, progress=False, ties="pessimistic")
    assert df.value.tolist() == [100.0]


def test_mmeb_errors():
    enc = HashEncoder()
    empty = EvalTask("EmptyTask", "vqa", "ind", [EvalQuery(_text("q"), [], "q-empty")])
    with pytest.raises(ValueError, match=r"EmptyTask.*q-empty.*empty candidate list"):
        evaluate_mmeb([empty], enc, [(1, 1)], progress=False)
    with pytest.raises(ValueError, match=r"T0.*\(8, 8\)"):
        evaluate_mmeb(_random_tasks(n_tasks=1), enc, [(8, 8)], progress=False)
    with pytest.raises(ValueError, match="budget"):
        evaluate_mmeb(_random_tasks(n_tasks=1), enc, [(0, 1)], progress=False)
    with pytest.raises(ValueError, match="expected a tensor"):
        evaluate_mmeb(_random_tasks(n_tasks=1), lambda items, role: torch.zeros(len(items), 4), [(1, 1)],
                      progress=False)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_mmeb(_random_tasks(n_tasks=1), lambda items, role: torch.full((len(items), 1, 2), float("nan")),
                      [(1, 1)], progress=False)


# ----------------------------------------------------------------------------- document retrieval
def _doc_task() -> DocRetrievalTask:
    corpus = {f"d{i:02d}": _text(f"page {i}") for i in range(10)}
    queries = {f"q{i}": _text(f"query {i}") for i in range(5)}
    qrels = {"q0": {"d03": 2, "d04": 1}, "q1": {"d00": 1}, "q2": {"d09": 2, "d01": 2, "d02": 1}, "q3": {"d05": 0}}
    return DocRetrievalTask("Docs", queries, corpus, qrels, split="ood")  # q4 has no judgement


def test_doc_retrieval_matches_direct_ndcg():
    task, enc = _doc_task(), HashEncoder()
    df = evaluate_doc_retrieval([task], enc, [(1, 1), (4, 8)], progress=False)
    assert df.metric.tolist() == ["NDCG@5", "NDCG@5"] and df.n_queries.tolist() == [4, 4]
    assert set(df.meta_task) == {"document"} and set(df.split) == {"ood"}
    docs = sorted(task.corpus)
    qids = ["q0", "q1", "q2", "q3"]
    Q = torch.stack([enc.vectors(task.queries[q], "query") for q in qids])
    D = torch.stack([enc.vectors(task.corpus[d], "candidate") for d in docs])
    s = torch.einsum("qid,njd->qnij", Q[:, :4], D[:, :8]).amax(-1).sum(-1)  # [nq, N]
    qrels = [{docs.index(d): g for d, g in task.qrels[q].items()} for q in qids]
    assert df.value[1] == pytest.approx(100 * ndcg_at_k(s, qrels).mean().item())
    assert len(enc.seen["candidate"]) == 10  # the corpus is encoded once for both budgets


def test_doc_retrieval_with_repeated_queries_unjudged_queries_and_other_k_matches_direct_ndcg():
    """Three paths no test reached (a review helper's mutants passed): ``k`` other than 5 (the row said NDCG@1 and
    held NDCG@5), two query ids sharing one query item (ViDoRe v1 repeats query strings: without expanding the
    encoded rows the task crashed), and a qrels entry that is an empty dict (skipped like a query without one,
    not scored as NaN)."""
    task = _doc_task()
    task.queries["q5"] = task.queries["q1"]  # the same Item under another id
    task.qrels["q5"] = {"d07": 1, "d00": 1}
    task.qrels["q4"] = {}
    enc = HashEncoder()
    qids = ["q0", "q1", "q2", "q3", "q5"]
    docs = sorted(task.corpus)
    Q = torch.stack([enc.vectors(task.queries[q], "query") for q in qids])
    D = torch.stack([enc.vectors(task.corpus[d], "candidate") for d in docs])
    s = torch.einsum("qid,njd->qnij", Q[:, :4], D[:, :8]).amax(-1).sum(-1)  # [nq, N]
    qrels = [{docs.index(d): g for d, g in task.qrels[q].items()} for q in qids]
    got = {}
    for k in (1, 5, 10):
        df = evaluate_doc_retrieval([task], enc, [(4, 8)], k=k, progress=False)
        assert df.metric.tolist() == [f"NDCG@{k}"] and df.n_queries.tolist() == [5]
        got[k] = df.value[0]
        assert got[k] == pytest.approx(100 * ndcg_at_k(s, qrels, k=k).mean().item())
    assert len({round(v, 6) for v in got.values()}) == 3, got  # the three k differ here


def test_doc_retrieval_scores_each_budget_on_its_prefixes():
    """Every budget's NDCG@5 is that of Eq. 4 on the first r_q / r_c vectors, not of the full embeddings."""
    task, enc = _doc_task(), HashEncoder()
    budgets = [(1, 1), (2, 3), (4, 8)]
    df = evaluate_doc_retrieval([task], enc, budgets, progress=False)
    docs, qids = sorted(task.corpus), ["q0", "q1", "q2", "q3"]
    Q = torch.stack([enc.vectors(task.queries[q], "query") for q in qids])  # [4, R_q, D]
    D = torch.stack([enc.vectors(task.corpus[d], "candidate") for d in docs])  # [10, R_c, D]
    qrels = [{docs.index(d): g for d, g in task.qrels[q].items()} for q in qids]
    want = [100 * ndcg_at_k(torch.einsum("qid,njd->qnij", Q[:, :r_q], D[:, :r_c]).amax(-1).sum(-1), qrels).mean().item()
            for r_q, r_c in budgets]
    assert df.value.tolist() == pytest.approx(want)
    assert len(set(round(w, 6) for w in want)) > 1  # the budgets give different numbers here


@pytest.mark.parametrize("as_str", [False, True])
def test_doc_retrieval_tie_break_uses_id_strings_like_trec_eval(as_str: bool):
    """Exact ties are broken by doc id *string*, descending (trec_eval): "9" > "10", so with integer
    ids 9 and 10 of one identical page, doc 9 ranks first (sorting ints would put 10 first)."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    ids = ["9", "10"] if as_str else [9, 10]
    page = Item(text="same page", uid="p")
    task = DocRetrievalTask("ints", {"q": _text("q")}, {d: page for d in ids}, {"q": {ids[0]: 1}})

    def enc(items, role):
        return torch.nn.functional.normalize(torch.ones(len(items), 1, 4), dim=-1)

    ours = evaluate_doc_retrieval([task], enc, None, k=1, progress=False).value.item()
    official = pytrec_eval.RelevanceEvaluator({"q": {"9": 1}}, {"ndcg_cut.1"}).evaluate(
        {"q": {"9": 1.0, "10": 1.0}})["q"]["ndcg_cut_1"]
    assert official == 1.0 and ours == pytest.approx(100 * official)


def test_doc_retrieval_rejects_ids_equal_as_strings():
    page = Item(text="p", uid="p")
    task = DocRetrievalTask("mixed", {"q": _text("q")}, {9: page, "9": page}, {"q": {9: 1}})
    with pytest.raises(ValueError, match="not distinct as strings"):
        evaluate_doc_retrieval([task], lambda items, role: torch.ones(len(items), 1, 4), None, progress=False)


def test_doc_retrieval_errors():
    t = _doc_task()
    t.qrels["q0"]["d99"] = 1
    with pytest.raises(ValueError, match=r"Docs.*q0.*d99"):
        evaluate_doc_retrieval([t], HashEncoder(), [(1, 1)], progress=False)
    t = _doc_task()
    t.qrels["ghost"] = {"d00": 1}
    with pytest.raises(ValueError, match="ghost"):
        evaluate_doc_retrieval([t], HashEncoder(), [(1, 1)], progress=False)



def test_bad_tasks_fail_before_anything_is_encoded():
    """A bad task (the last MMEB task, or a document task after all MMEB tasks) used to raise only once
    every task before it was encoded: hours of a real model's time spent for a traceback."""
    good = _random_tasks(n_tasks=2)
    bad_mmeb = EvalTask("Bad", "vqa", "ind", [EvalQuery(_text("lonely"), [], "q0")])
    bad_doc = _doc_task()
    bad_doc.qrels["q0"]["d99"] = 1
    for bm, match in [(Benchmark([], good + [bad_mmeb]), "empty candidate list"),
                      (Benchmark([], good, [_doc_task(), bad_doc]), "d99"),
                      (Benchmark([], good, [_doc_task()]), "k must")]:
        enc = HashEncoder()
        with pytest.raises(ValueError, match=match):
            evaluate(bm, enc, [(1, 1)], progress=False, k=0 if match == "k must" else 5)
        assert enc.calls == 0
    enc = HashEncoder()
    with pytest.raises(ValueError, match="empty candidate list"):
        evaluate_mmeb(good + [bad_mmeb], enc, [(1, 1)], progress=False)
    with pytest.raises(ValueError, match="d99"):
        evaluate_doc_retrieval([_doc_task(), bad_doc], enc, [(1, 1)], progress=False)
    assert enc.calls == 0


@pytest.mark.parametrize("split", ["IND", "test", ""])
def test_an_eval_task_split_other_than_ind_or_ood_raises_before_encoding(split):
    """A task split ``"IND"`` counted in Overall but in neither the IND nor the OOD mean: the summary said
    IND 100 / Overall 50 with no OOD row, silently.  Such a task is now refused before anything is encoded."""
    tasks = _random_tasks(n_tasks=2)
    tasks[1].split = split
    enc = HashEncoder()
    with pytest.raises(ValueError, match=rf"task T1: split {split!r} is not 'ind' or 'ood'"):
        evaluate_mmeb(tasks, enc, [(1, 1)], progress=False)
    assert enc.calls == 0


def test_a_budget_beyond_the_encoders_vectors_fails_at_the_first_batch(tmp_path):
    """A budget asking for more vectors than the encoder returns raised only after the whole first task (every
    query and candidate) was encoded; now at the first batch of the role it overflows, or at once from a cache."""
    tasks = _random_tasks(nq=12, n_cand=5)
    enc = HashEncoder()  # R_q = 4, R_c = 8
    with pytest.raises(ValueError, match=r"task T0\) gives query embeddings with R_q = 4 vectors; budget \(8, 1\)"):
        evaluate_mmeb(tasks, enc, [(1, 1), (8, 1)], batch_size=2, progress=False)
    assert enc.calls == 1
    enc = HashEncoder()
    with pytest.raises(ValueError, match=r"candidate embeddings with R_c = 8 vectors; budget \(2, 16\)"):
        evaluate_mmeb(tasks, enc, [(2, 16)], batch_size=2, progress=False)
    assert len(enc.seen["candidate"]) == 2  # one batch, not the task's 12 unique candidates
    with pytest.raises(ValueError, match=r"candidate embeddings with R_c = 8 vectors; budget \(1, 9\)"):
        evaluate_doc_retrieval([_doc_task()], HashEncoder(), [(1, 9)], progress=False)
    evaluate_mmeb(tasks[:1], HashEncoder(), [(1, 1)], cache_dir=tmp_path, cache_key="m", progress=False)
    enc = HashEncoder()
    with pytest.raises(ValueError, match=r"cache shard .* R_c = 8 vectors; budget \(1, 9\)"):
        evaluate_mmeb(tasks, enc, [(1, 9)], cache_dir=tmp_path, cache_key="m", progress=False)
    assert enc.calls == 0


def test_duplicate_task_names_fail_before_anything_is_encoded():
    """Two tasks of one name were both encoded and scored, then summarize() refused the colliding rows (and the
    tie warning divided by the wrong task's query count): now they raise before any encoding."""
    a, b = _random_tasks(n_tasks=2)
    b.name = "T0"
    enc = HashEncoder()
    with pytest.raises(ValueError, match=r"MMEB task name\(s\) \['T0'\] appear more than once"):
        evaluate_mmeb([a, b], enc, [(1, 1)], progress=False)
    with pytest.raises(ValueError, match=r"document task name\(s\) \['Docs'\] appear more than once"):
        evaluate_doc_retrieval([_doc_task(), _doc_task()], enc, [(1, 1)], progress=False)
    with pytest.raises(ValueError, match="appear more than once"):
        evaluate(Benchmark([], [a], [_doc_task(), _doc_task()]), enc, [(1, 1)], progress=False)
    assert enc.calls == 0
    # an MMEB task and a document task may share a name (their metrics differ)
    doc = _doc_task()
    doc.name = "T0"
    assert set(evaluate(Benchmark([], [a], [doc]), enc, [(1, 1)], progress=False).metric) == {"P@1", "NDCG@5"}


@pytest.mark.parametrize("grade", [0.5, 1.7, "2", True, float("nan")])
def test_doc_retrieval_rejects_fractional_or_non_numeric_grades(grade):
    """Grades were passed through ``int()``: 0.5 silently became 0 (not relevant), so the task-level NDCG
    disagreed with :func:`ndcg_at_k` on the same qrels; trec_eval grades are ints, anything else raises."""
    t = _doc_task()
    t.qrels["q0"]["d00"] = grade
    with pytest.raises(ValueError, match=r"Docs: qrels grade .* of query 'q0', doc 'd00' is not an integer"):
        evaluate_doc_retrieval([t], HashEncoder(), [(1, 1)], progress=False)
    t.qrels["q0"]["d00"] = 2.0  # an integer-valued float (e.g. from a float parquet column) is the int 2
    assert len(evaluate_doc_retrieval([t], HashEncoder(), [(1, 1)], progress=False)) == 1

# ----------------------------------------------------------------------------- summaries
def _fake_results() -> pd.DataFrame:
    rows = []
    spec = [("A", "classification", "ind", 10.0), ("B", "classification", "ood", 30.0), ("C", "vqa", "ind", 50.0),
            ("D", "retrieval", "ood", 70.0), ("E", "grounding", "ind", 90.0)]
    for r_q, r_c, bonus in [(4, 8, 5.0), (1, 1, 0.0)]:
        for name, mt, split, v in spec:
            rows.append({"task": name, "meta_task": mt, "split": split, "r_q": r_q, "r_c": r_c,
                         "budget": f"({r_q},{r_c})", "metric": "P@1", "value": v + bonus, "n_queries": 10})
        rows.append({"task": "Doc", "meta_task": "document", "split": "ind", "r_q": r_q, "r_c": r_c,
                     "budget": f"({r_q},{r_c})", "metric": "NDCG@5", "value": 40.0 + bonus, "n_queries": 5})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)



def _p1_rows(tasks, budgets=((1, 1), (4, 8))) -> pd.DataFrame:
    from metaembed.data.mmeb import MMEB_TASKS
    rows = []
    for r_q, r_c in budgets:
        for name in tasks:
            info = MMEB_TASKS.get(name)
            rows.append({"task": name, "meta_task": info.meta_task if info else "classification",
                         "split": info.split if info else "ind", "r_q": r_q, "r_c": r_c,
                         "budget": f"({r_q},{r_c})", "metric": "P@1", "value": 50.0, "n_queries": 10})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def test_summary_warns_on_a_partial_mmeb_task_set():
    import warnings as w
    from metaembed.data.mmeb import MMEB_TASKS, MMEBDataWarning
    names = list(MMEB_TASKS)
    with pytest.warns(MMEBDataWarning, match=r"cover 2 of the 36 MMEB-eval tasks.*missing: \['"):
        summarize(_p1_rows(names[:2]))
    with pytest.warns(MMEBDataWarning, match="cover 35 of the 36"):  # one task missing at one budget only
        budget_table(pd.concat([_p1_rows(names), _p1_rows(names[:35], budgets=((8, 16),))]))
    with w.catch_warnings():
        w.simplefilter("error")
        table = budget_table(_p1_rows(names))  # the full set
        assert table.loc["(4,8)", "Overall"] == 50.0
        summarize(_fake_results())  # not MMEB task names (synthetic-style): no warning


def test_summarize_and_budget_table():
    df = _fake_results()
    s = summarize(df)
    at = s[s.budget == "(1,1)"].set_index("group")
    assert at.loc["Classification", "value"] == 20.0 and at.loc["Classification", "n_tasks"] == 2
    assert at.loc["VQA", "value"] == 50.0 and at.loc["Grounding", "value"] == 90.0
    assert at.loc["IND", "value"] == pytest.approx(50.0) and at.loc["OOD", "value"] == pytest.approx(50.0)
    assert at.loc["Overall", "value"] == pytest.approx(50.0) and at.loc["Overall", "n_tasks"] == 5
    assert at.loc["NDCG@5", "value"] == 40.0
    table = budget_table(df)
    assert list(table.index) == ["(1,1)", "(4,8)"]
    assert list(table.columns) == ["Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall",
                                   "NDCG@5"]
    assert table.loc["(4,8)", "Overall"] == 55.0
    assert "Overall" in table.to_string()
    with pytest.raises(ValueError, match="twice"):
        summarize(pd.concat([df, df.iloc[:1]]))
    # the line above the table names only what it holds (an MMEB-only run was titled "... and NDCG@5 (%)")
    both = "P@1 (%) per meta-task / IND / OOD / Overall and NDCG@5 (%) per budget (r_q, r_c)"
    assert budget_table_title(5, table) == budget_table_title(5) == both
    assert budget_table_title(5, table.drop(columns="NDCG@5")) == "P@1 (%) per meta-task / IND / OOD / Overall per budget (r_q, r_c)"
    assert budget_table_title(10, table[["NDCG@5"]]) == "NDCG@10 (%) per budget (r_q, r_c)"


def test_summarize_takes_unweighted_task_means_per_split():
    """MMEB-style aggregates are plain means over tasks (not medians), IND over the ind tasks, OOD over the
    ood ones; skewed values so that mean != median and IND != OOD."""
    df = _fake_results()
    df.loc[df.task == "A", "value"] = 0.0  # (1,1): A 0, B 30, C 50, D 70, E 90
    at = summarize(df).query("budget == '(1,1)'").set_index("group")["value"]
    assert at["Classification"] == pytest.approx(15.0)  # (0 + 30) / 2
    assert at["IND"] == pytest.approx(140.0 / 3)  # A, C, E: (0 + 50 + 90) / 3
    assert at["OOD"] == pytest.approx(50.0)  # B, D: (30 + 70) / 2
    assert at["Overall"] == pytest.approx(48.0)  # (0 + 30 + 50 + 70 + 90) / 5; the median is 50


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_summarize_rejects_missing_or_infinite_values(bad):
    """A NaN task value was skipped by the means while n_tasks still counted it (Classification 10.0 over
    "2 tasks" was one task's number); now it raises, naming the task and budget."""
    df = _fake_results()
    df["value"] = df["value"].astype(object)
    df.loc[(df.task == "B") & (df.budget == "(1,1)"), "value"] = bad
    with pytest.raises(ValueError, match=r"task B has value .* at budget \(1,1\) \(P@1\)"):
        summarize(df)
    with pytest.raises(ValueError, match="task B has value"):
        budget_table(df)


def test_results_to_json(tmp_path):
    df = _fake_results()
    path = results_to_json(df, tmp_path / "sub" / "results.json")
    records = json.loads(path.read_text())
    assert len(records) == len(df) and records[0]["task"] == "A" and records[0]["value"] == 15.0
    # unrounded, as in the CSV (pandas' to_json wrote 16.6666666667 for 16.666666666666664)
    odd = df.assign(value=[100 / 6] + [float("nan")] * (len(df) - 1))
    records = json.loads(results_to_json(odd, tmp_path / "odd.json").read_text())
    assert records[0]["value"] == 100 / 6 and records[1]["value"] is None


def test_a_results_write_that_fails_leaves_the_earlier_file_whole(tmp_path):
    """results.json / results.csv were written in place: a full disk (a crash review, on a 256 KiB tmpfs) turned an
    earlier complete results file into an empty or partial one.  Both go through a temporary file now.  The disk
    fills here as a file-size limit (RLIMIT_FSIZE, EFBIG) in a child process."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, signal
        import pandas as pd
        from metaembed.evaluation import results_to_csv, results_to_json
        df = pd.DataFrame({{"task": ["A", "B"], "value": [15.0, 20.0]}})
        results_to_json(df, {str(tmp_path / "r.json")!r}), results_to_csv(df, {str(tmp_path / "r.csv")!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))
        bigger = pd.concat([df] * 500, ignore_index=True)
        for write, path in ((results_to_json, "r.json"), (results_to_csv, "r.csv")):
            try:
                write(bigger, {str(tmp_path)!r} + "/" + path)
            except OSError as e:
                print("refused", path, e.errno)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["refused r.json 27", "refused r.csv 27"]  # EFBIG
    assert json.loads((tmp_path / "r.json").read_text()) == [{"task": "A", "value": 15.0}, {"task": "B", "value": 20.0}]
    assert (tmp_path / "r.csv").read_text() == "task,value\nA,15.0\nB,20.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]  # no temporary file left


def test_evaluate_synthetic_benchmark_end_to_end():
    b = make_benchmark(n_train=0, n_eval_queries=4, tasks=["Cls-Object", "Ret-T2I-OOD", "Doc-Pages"])
    enc = HashEncoder()
    df = evaluate(b, enc, [(1, 1), (4, 8)], progress=False)
    assert set(df.metric) == {"P@1", "NDCG@5"} and len(df) == 3 * 2
    assert df.value.between(0, 100).all()
    seen = enc.seen["candidate"]
    assert len(seen) == len(set(seen))  # shared items encoded once across tasks
    table = budget_table(df)
    assert {"Classification", "Retrieval", "IND", "OOD", "Overall", "NDCG@5"} <= set(table.columns)
    with pytest.raises(ValueError, match="no evaluation tasks"):
        evaluate(Benchmark(train=[]), enc, [(1, 1)], progress=False)


def _evaluation_growth(kind: str) -> int:
    """Run by the test below in a fresh interpreter: peak RSS growth of evaluating 64 MiB of candidate
    embeddings (document or MMEB tasks), after checking the values against the metric on whole tensors."""
    n, R, D = 2048, 8, 1024  # candidate embeddings 2048 x 8 x 1024 fp32 = 64 MiB
    bank = {"candidate": torch.nn.functional.normalize(torch.randn(n, R, D, generator=torch.Generator().manual_seed(0)),
                                                       dim=-1), "query": None}
    bank["query"] = bank["candidate"][:256, :4].contiguous()

    def encode(items, role):  # rows of a bank built beforehand: no encoder temporaries to measure
        return bank[role][[int(it.uid[1:]) for it in items]]

    if kind == "doc":
        task = DocRetrievalTask("t", {f"q{i}": Item(f"q {i}", uid=f"q{i}") for i in range(16)},
                                {f"d{i}": Item(f"d {i}", uid=f"d{i}") for i in range(n)},
                                {f"q{i}": {f"d{i * 7}": 1} for i in range(16)})
        df, grew = peak_rss_growth(
            lambda: evaluate_doc_retrieval([task], encode, [(1, 1), (4, 8)], batch_size=64, progress=False))
    else:
        task = EvalTask("m", "retrieval", "ind", [EvalQuery(Item(f"q {i}", uid=f"q{i}"),  # 4 chunks of 64 queries
                        [Item(f"c {j}", uid=f"c{j}") for j in range(i * 8, (i + 1) * 8)]) for i in range(256)])
        df, grew = peak_rss_growth(
            lambda: evaluate_mmeb([task], encode, [(1, 1), (4, 8)], batch_size=64, progress=False))
    from metaembed.maxsim import maxsim

    if kind == "doc":  # reference: the metric on the whole embedding tensors
        for (r_q, r_c), value in zip([(1, 1), (4, 8)], df["value"]):
            s = maxsim(bank["query"][:16], bank["candidate"], r_q, r_c)
            order = sorted(range(n), key=lambda d: str(d))  # doc ids sorted as strings, as trec_eval
            qrels = [{order.index(i * 7): 1} for i in range(16)]
            assert value == 100.0 * float(ndcg_at_k(s[:, order], qrels).mean())
    else:
        for (r_q, r_c), value in zip([(1, 1), (4, 8)], df["value"]):
            s = torch.stack([maxsim(bank["query"][i : i + 1], bank["candidate"][i * 8 : (i + 1) * 8], r_q, r_c)[0]
                             for i in range(256)])
            assert value == pytest.approx(100.0 * float(precision_at_1(s).mean()))
    return grew


@pytest.mark.parametrize("kind", ["doc", "mmeb"])
def test_evaluation_holds_the_embeddings_about_once(kind):
    """The embedding step held every candidate embedding 2-3 times (the memo's per-batch copies, a stack of
    them, and for document tasks D[d_rows]); it now holds them once (+ a batch, + a chunk of queries' candidates
    for MMEB), with the same results.
    Measured in a fresh interpreter (see peak_rss_growth_in_fresh_process)."""
    size = 2048 * 8 * 1024 * 4  # candidate embeddings, fp32
    grew = peak_rss_growth_in_fresh_process("test_evaluation:_evaluation_growth", kind)
    assert grew < 2.4 * size, f"peak RSS grew {grew / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of embeddings"  # was 3x


def _memo_ram_bytes(store, keys=None) -> int:
    """Bytes of the distinct storages the memo's rows (of ``keys``, default all) keep alive."""
    held = {}
    for role in store.memo.values():
        for key, row in role.items():
            if keys is None or key in keys:
                held[row.untyped_storage().data_ptr()] = row.untyped_storage().nbytes()
    return sum(held.values())


def test_memo_does_not_keep_a_second_copy_of_rows_shared_with_an_earlier_task():
    """embed() wrote new rows into its [U, R, D] result and the memo kept views of it, so the whole result
    stayed alive with the memo: each document task sharing 200 items with an earlier one kept another copy
    of them for the rest of the evaluation (4x the unique rows after three such tasks).  Now only the rows
    the memo holds stay."""
    from metaembed.evaluation import _EmbeddingStore

    row = R_C * DIM * 4
    corpus = [_text(f"d{i}") for i in range(200)]
    store = _EmbeddingStore(HashEncoder(), batch_size=16, cache_dir=None, progress=False)
    first, _ = store.embed(corpus, "candidate", "A")
    assert first.untyped_storage().data_ptr() == store.memo["candidate"][("uid", "d0")].untyped_storage().data_ptr()
    del first  # the memo holds it: the one copy
    for t in range(3):
        emb, rows = store.embed(corpus + [_text(f"new {t}")], "candidate", f"B{t}")
        torch.testing.assert_close(emb[rows[-1]], HashEncoder().vectors(_text(f"new {t}"), "candidate"), rtol=0, atol=0)
    del emb
    assert _memo_ram_bytes(store) == 203 * row  # was 200 + 3 x 201 rows


def test_memo_keeps_no_uid_rows_without_the_cached_result(tmp_path):
    """With a cache, one item without a uid kept the whole [U, R, D] result of its embed() call in RAM (the memo
    held a view of it) although the other rows are memory-mapped from the cache; now at most a batch."""
    from metaembed.evaluation import _EmbeddingStore

    row = R_C * DIM * 4
    corpus = [_text(f"d{i}") for i in range(200)]
    cached = _EmbeddingStore(HashEncoder(), batch_size=16, cache_dir=tmp_path, progress=False, cache_key="k")
    no_uid = Item(text="no uid")
    emb, _ = cached.embed(corpus + [no_uid], "candidate", "C")
    ref = HashEncoder().vectors(no_uid, "candidate")
    del emb
    assert _memo_ram_bytes(cached, {("id", id(no_uid))}) <= 16 * row  # a batch, not all 201 rows
    torch.testing.assert_close(cached.memo["candidate"][("id", id(no_uid))], ref, rtol=0, atol=0)


def test_mmeb_stacks_a_chunks_candidates_a_block_at_a_time(monkeypatch):
    """A chunk of 64 queries stacked the union of their candidates in one tensor: with 1,000 distinct candidates
    each at the paper's R_c = 64, D = 3,584 that is 58 GB.  Now a chunk holds the queries whose candidates fit
    MMEB_STACK_BYTES, scored in one stack, with the same P@1; one query with more is stacked in balanced blocks."""
    import metaembed.evaluation as E
    from metaembed.maxsim import maxsim

    task = EvalTask("m", "retrieval", "ind", [EvalQuery(_text(f"q {i}"), [_text(f"c {i} {j}") for j in range(6)])
                                              for i in range(12)])  # 72 distinct candidates in one chunk
    budgets = [(1, 1), (2, 4), (4, 8)]
    want = evaluate_mmeb([task], HashEncoder(), budgets, progress=False)
    stacked: list[int] = []
    real = E.maxsim

    def spy(q, c, r_q, r_c):
        stacked.append(c.shape[0])
        return real(q, c, r_q, r_c)

    monkeypatch.setattr(E, "maxsim", spy)
    monkeypatch.setattr(E, "MMEB_STACK_BYTES", 20 * R_C * DIM * 4)  # twenty fp32 candidate rows
    got = evaluate_mmeb([task], HashEncoder(), budgets, progress=False)
    assert stacked == [18] * 4 * len(budgets)  # chunks of three queries: each one's candidates in one stack
    pd.testing.assert_frame_equal(got, want)
    stacked.clear()
    monkeypatch.setattr(E, "MMEB_STACK_BYTES", 5 * R_C * DIM * 4)  # fewer rows than one query's six
    got = evaluate_mmeb([task], HashEncoder(), budgets, progress=False)
    assert stacked == [3, 3] * 12 * len(budgets)  # one query per chunk, its rows in balanced blocks
    pd.testing.assert_frame_equal(got, want)
    enc = HashEncoder()  # and the reference: each query against its own six candidates
    for (r_q, r_c), value in zip(budgets, got["value"]):
        s = torch.stack([maxsim(enc.vectors(q.query, "query")[None], torch.stack([enc.vectors(c, "candidate")
                                                                               for c in q.candidates]), r_q, r_c)[0]
                         for q in task.queries])  # [12, 6]
        assert value == pytest.approx(100.0 * float(precision_at_1(s).mean()))


@pytest.mark.parametrize("rows_per_block", [383, 191, 127])  # query chunks of 63+1, 31+31+2, 21+21+21+1 queries
def test_mmeb_blocks_keep_exact_ties_of_identical_candidates(monkeypatch, rows_per_block):
    """A short last block takes another matmul path than the full ones: at D = 3,584 a collapsed model's identical
    candidates there scored 1 ulp apart, so at (1,1) the tie warning counted 63/64 and ties='first' gave 98.4
    instead of 100 (one stack: 64/64 and 100).  The stacks are query chunks now (each query's candidates in one);
    a one-query chunk's identical candidates still came out 1 ulp apart with ATEN_CPU_CAPABILITY=default, which
    _tie_copies_of_the_positive absorbs (test_a_copy_of_the_positive_ties_it_whatever_the_matmul_rounding)."""
    import warnings

    import metaembed.evaluation as E

    D = 3584
    g = torch.Generator().manual_seed(0)
    qv, cv = torch.randn(4, D, generator=g), torch.randn(8, D, generator=g)

    def encode(items, role):  # every candidate the same vector (a collapsed model), distinct uids
        if role == "query":
            return torch.stack([qv + 0.01 * i for i in range(len(items))])
        return cv.expand(len(items), 8, D).clone()

    task = EvalTask("m", "retrieval", "ind", [EvalQuery(_text(f"q {i}"), [_text(f"c {i} {j}") for j in range(6)])
                                              for i in range(64)])  # 384 distinct candidates in one chunk
    monkeypatch.setattr(E, "MMEB_STACK_BYTES", rows_per_block * 8 * D * 4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = evaluate_mmeb([task], encode, [(1, 1), (4, 8)], progress=False, cache_key="collapsed")
    assert got["value"].tolist() == [100.0, 100.0]
    (msg,) = [str(x.message) for x in w if issubclass(x.category, TiedPositiveWarning)]
    assert "m (1,1): 64/64" in msg and "m (4,8): 64/64" in msg


def test_a_copy_of_the_positive_ties_it_whatever_the_matmul_rounding(monkeypatch):
    """A CPU matmul can round identical candidates 1-2 ulp apart by their column (torch.mm of one query row and 6
    identical columns gave 4 equal values and 2 others, on AVX2 and AVX-512 alike; with
    ATEN_CPU_CAPABILITY=default the test above failed, 98.4).  Such noise is
    injected here (odd columns one ulp up) so the check holds on every machine: a candidate whose first r_c
    vectors equal the positive's ties it (ties='first': a hit, and counted), one that differs beyond r_c only
    ties at the smaller budget, and a merely close candidate is scored as without the check."""
    import metaembed.evaluation as E

    D = 64
    g = torch.Generator().manual_seed(0)
    qv, cv = torch.randn(4, D, generator=g), torch.randn(8, D, generator=g)
    beyond = cv.clone()
    beyond[4:] = 3.0 * qv[0]  # same first 4 vectors; at (4,8) vectors 4..7 beat the positive's best
    close = cv.clone()
    close[0] = cv[0] * (1 + 1e-6)  # not a copy: its score stays its own, however close
    real = E.maxsim

    def noisy(q, c, r_q, r_c, *a, **k):  # [nq, N]: odd columns one ulp up
        out = real(q, c, r_q, r_c, *a, **k)
        out[:, 1::2] = torch.nextafter(out[:, 1::2], torch.tensor(math.inf))
        return out

    def encode(items, role):
        if role == "query":
            return qv.expand(len(items), 4, D).clone()
        return torch.stack([{"copy": cv, "beyond": beyond, "close": close}.get(it.text.split()[0], cv) for it in items])

    def run(kind):
        task = EvalTask("m", "retrieval", "ind", [EvalQuery(_text(f"q {i}"), [_text(f"pos {i}"), _text(f"{kind} {i}")])
                                                  for i in range(8)])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = evaluate_mmeb([task], encode, [(1, 1), (4, 4), (4, 8)], progress=False, cache_key=kind)
        msgs = [str(x.message) for x in w if issubclass(x.category, TiedPositiveWarning)]
        return got["value"].tolist(), msgs

    monkeypatch.setattr(E, "maxsim", noisy)
    values, (msg,) = run("copy")
    assert values == [100.0, 100.0, 100.0] and all(f"m {b}: 8/8" in msg for b in ("(1,1)", "(4,4)", "(4,8)"))
    values, (msg,) = run("beyond")
    assert values == [100.0, 100.0, 0.0] and "m (4,8)" not in msg
    close_result = run("close")  # within the compared distance of the positive, yet scored as it is
    monkeypatch.setattr(E, "_tie_copies_of_the_positive", lambda *a: None)
    assert run("close") == close_result
    assert run("copy")[0] != [100.0, 100.0, 100.0]  # what the noise does without the check


def test_an_evaluation_that_will_not_fit_in_ram_without_a_cache_says_so_at_its_first_batch(monkeypatch, tmp_path):
    """Without eval.cache_dir every embedding stays in RAM for the whole evaluation (about 100 GB for MMEB-eval
    at the paper's R_c = 64, D = 3,584): the run was killed for memory hours in, after encoding, without a word.
    Now the first batches project the memo's size from the unique items and warn when it exceeds half the RAM."""
    import metaembed.evaluation as E

    shared = [_text(f"c{j}") for j in range(6)]
    tasks = [EvalTask("A", "retrieval", "ind", [EvalQuery(_text(f"qa{i}"), shared[:4]) for i in range(3)]),
             EvalTask("B", "retrieval", "ind", [EvalQuery(_text(f"qb{i}"), shared[2:]) for i in range(2)])]
    assert E._expected_items(tasks) == {"query": 5, "candidate": 6}  # shared candidates once
    held = 5 * R_Q * DIM * 4 + 6 * R_C * DIM * 4  # 1,280 + 3,072 bytes
    monkeypatch.setattr(E, "_ram_bytes", lambda: 2 * held - 2)
    with pytest.warns(E.EmbeddingMemoryWarning, match="5 query and 6 candidate items") as seen:
        want = evaluate_mmeb(tasks, HashEncoder(), [(1, 1)], progress=False)
    assert len([w for w in seen if w.category is E.EmbeddingMemoryWarning]) == 1
    assert "set eval.cache_dir" in str(seen[0].message)
    monkeypatch.setattr(E, "_ram_bytes", lambda: 1000)  # the queries alone exceed half of it: still one warning
    with pytest.warns(E.EmbeddingMemoryWarning) as seen:
        evaluate_mmeb(tasks, HashEncoder(), [(1, 1)], progress=False)
    assert len([w for w in seen if w.category is E.EmbeddingMemoryWarning]) == 1
    assert "5 query items so far" in str(seen[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", E.EmbeddingMemoryWarning)
        evaluate_mmeb(tasks, HashEncoder(), [(1, 1)], progress=False, cache_dir=tmp_path, cache_key="k")  # on disk
        monkeypatch.setattr(E, "_ram_bytes", lambda: 2 * held + 2)
        pd.testing.assert_frame_equal(evaluate_mmeb(tasks, HashEncoder(), [(1, 1)], progress=False), want)
    # a document task counts its judged queries and its corpus
    doc = DocRetrievalTask("D", {"q0": _text("q0"), "q1": _text("q1"), "q2": _text("q2")},
                           {f"d{i}": _text(f"d{i}") for i in range(4)}, {"q0": {"d1": 1}, "q2": {"d0": 2}})
    assert E._expected_items(docs=E._prepare_docs([doc], 5)) == {"query": 2, "candidate": 4}


# ----------------------------------------------------------------------------- mutation-review pins
def test_ndcg_rejects_a_doc_index_equal_to_the_corpus_size():
    """Index ``n_docs`` is one past the last doc: accepted, it raised the ideal DCG with a document that can never
    be retrieved (NDCG silently lowered) instead of naming the bad qrels entry."""
    with pytest.raises(ValueError, match="doc index 3"):
        ndcg_at_k(torch.zeros(1, 3), [{0: 1, 3: 1}])
    with pytest.raises(ValueError, match="doc index 3"):
        random_ndcg_at_k([{3: 1}], n_docs=3)


def test_random_ranking_level_is_the_mean_not_the_median_of_three_tasks():
    """With two tasks mean == median; three skewed task levels (50, 25, 10 %) pin the unweighted mean."""
    def one_relevant(name: str, n_docs: int) -> DocRetrievalTask:
        corpus = {f"d{i}": _text(f"{name} page {i}") for i in range(n_docs)}
        return DocRetrievalTask(name, {"q": _text(f"{name} q")}, corpus, {"q": {"d0": 1}})

    tasks = [one_relevant("Two", 2), one_relevant("Four", 4), one_relevant("Ten", 10)]
    assert random_ranking_level(tasks, k=1) == pytest.approx((50.0 + 25.0 + 10.0) / 3, abs=1e-12)


def test_a_query_repeated_with_other_candidates_is_scored_with_its_own_embedding():
    """MMEB reuses one query item with different candidate lists: the store encodes it once and every
    EvalQuery must map back to its row (q_rows).  Indexing the unique rows by query position scored the
    second 'q1' with q2's embedding (100% instead of 66.7%)."""
    e = {"q1": [[1.0, 0.0]], "q2": [[0.0, 1.0]], "a": [[1.0, 0.0]], "b": [[0.0, 1.0]]}

    def enc(items, role):
        return torch.tensor([e[it.uid] for it in items])

    a, b = _text("a"), _text("b")
    task = EvalTask("Rep", "vqa", "ind", [
        EvalQuery(_text("q1"), [a, b], "0"),  # hit
        EvalQuery(_text("q1"), [b, a], "1"),  # same query item, positive b: miss
        EvalQuery(_text("q2"), [b, a], "2"),  # hit
    ])
    df = evaluate_mmeb([task], enc, None, progress=False)
    assert df.value.item() == pytest.approx(200.0 / 3)


def test_a_bad_ties_rule_fails_before_anything_is_encoded():
    """ties is checked before encoding (otherwise precision_at_1 raised only after the first task was encoded)."""
    enc = HashEncoder()
    with pytest.raises(ValueError, match="ties='optimistic'"):
        evaluate_mmeb(_random_tasks(n_tasks=1), enc, [(1, 1)], progress=False, ties="optimistic")
    assert enc.calls == 0


def test_summarize_does_not_weight_tasks_by_their_query_counts():
    """MMEB's meta-task / IND / OOD / Overall numbers are plain means over tasks; a task with 10x the queries
    counts once (a query-weighted mean passed while every task had n_queries = 10)."""
    df = _fake_results()
    df.loc[df.task == "A", "n_queries"] = 1000  # A: 10.0, B: 30.0
    at = summarize(df).query("budget == '(1,1)'").set_index("group")["value"]
    assert at["Classification"] == pytest.approx(20.0)
    assert at["IND"] == pytest.approx(50.0) and at["Overall"] == pytest.approx(50.0)


def test_summarize_keeps_meta_tasks_outside_the_four_mmeb_ones():
    """A P@1 task of another meta-task (a custom benchmark) gets its own group (and counts in Overall)."""
    df = _fake_results()
    df.loc[df.task == "E", "meta_task"] = "ocr"
    at = summarize(df).query("budget == '(1,1)'").set_index("group")
    assert at.loc["ocr", "value"] == 90.0 and at.loc["ocr", "n_tasks"] == 1
    assert "Grounding" not in at.index
    assert budget_table(df).loc["(1,1)", "ocr"] == 90.0


def test_budget_table_rounds_to_the_requested_decimals():
    """``decimals`` reaches the table (it was rounded to one decimal whatever was asked)."""
    df = _fake_results()
    df.loc[df.task == "A", "value"] = 10.1234
    table = budget_table(df, decimals=3)
    assert table.loc["(1,1)", "Classification"] == pytest.approx((10.1234 + 30.0) / 2, abs=5e-4)
    assert table.loc["(1,1)", "Classification"] != round((10.1234 + 30.0) / 2, 1)


def test_a_repeated_budget_is_scored_once():
    """``budgets=[(1, 1), (1, 1)]`` gives one row per task, not two that summarize() then refuses."""
    df = evaluate_mmeb(_random_tasks(n_tasks=2), HashEncoder(), [(1, 1), (2, 4), (1, 1)], progress=False)
    assert len(df) == 4
    summarize(df)


def test_a_uid_with_and_without_an_image_in_two_tasks_raises():
    """A uid stands for (text, has image): one uid used for a text-only item in one task and an image item in a
    later one would give the image item the text-only embedding (the image was ignored in the check)."""
    from PIL import Image

    enc = lambda items, role: torch.tensor([[[1.0, 0.0]] if it.image is None else [[0.0, 1.0]] for it in items])
    plain = EvalTask("A", "vqa", "ind", [EvalQuery(Item(text="x", uid="q0"), [Item(text="c", uid="c0")], "q0")])
    img = EvalTask("B", "vqa", "ind", [EvalQuery(Item(text="x", uid="q0", image=Image.new("RGB", (2, 2))),
                                                 [Item(text="c", uid="c0")], "q0")])
    with pytest.raises(ValueError, match="query uid 'q0' names two different items"):
        evaluate_mmeb([plain, img], enc, None, progress=False)
    with pytest.raises(ValueError, match="query uid 'q0' names two different items"):  # within one task
        evaluate_mmeb([EvalTask("C", "vqa", "ind", plain.queries + img.queries)], enc, None, progress=False)


def test_a_cache_folder_whose_manifest_names_another_key_is_refused(tmp_path):
    """The manifest's cache_key is checked, not only the folder name (a copied or renamed folder would serve
    another model's embeddings)."""
    from metaembed.evaluation import CACHE_MANIFEST, cache_folder

    tasks = _random_tasks(n_tasks=1)
    evaluate_mmeb(tasks, HashEncoder(), [(1, 1)], cache_dir=tmp_path, cache_key="model-a", progress=False)
    src, dst = cache_folder(tmp_path, "model-a"), cache_folder(tmp_path, "model-b")
    src.rename(dst)
    with pytest.raises(RuntimeError, match="model-a"):
        evaluate_mmeb(tasks, HashEncoder(), [(1, 1)], cache_dir=tmp_path, cache_key="model-b", progress=False)
    assert json.loads((dst / CACHE_MANIFEST).read_text())["cache_key"] == "model-a"


def test_cache_shards_of_another_dtype_with_nan_or_bad_records_are_refused(tmp_path):
    """Found by fuzzing (a review helper): a shard of int32 / float16 / bool embeddings was cast on load and changed
    the metrics silently; NaN in a shard surfaced as "scores contain NaN/inf" naming no file; a non-numeric sig
    and a manifest that is a JSON list raised bare ValueError / AttributeError."""
    from metaembed.evaluation import CACHE_MANIFEST, cache_folder

    tasks, budgets = _random_tasks(n_tasks=1), [(2, 4)]
    ref = evaluate_mmeb(tasks, HashEncoder(), budgets, progress=False)
    run = lambda: evaluate_mmeb(tasks, HashEncoder(), budgets, cache_dir=tmp_path, cache_key="k", progress=False)
    assert run().equals(ref)
    folder = cache_folder(tmp_path, "k")
    shard = next((folder / "candidate").glob("*.pt"))
    saved = shard.read_bytes()
    good = torch.load(shard, weights_only=True)
    edits = {"int32 embeddings": lambda s: s.update(embeddings=s["embeddings"].to(torch.int32)),
             "float16 embeddings": lambda s: s.update(embeddings=s["embeddings"].half()),
             "a non-numeric sig": lambda s: s.update(sigs=["abc"] * len(s["uids"])),
             "uids that are not strings": lambda s: s.update(uids=list(range(len(s["uids"]))))}
    for what, edit in edits.items():
        bad = {k: (list(v) if isinstance(v, list) else v.clone()) for k, v in good.items()}
        edit(bad)
        torch.save(bad, shard)
        with pytest.raises(RuntimeError, match=rf"embedding cache shard {re.escape(str(shard))} is malformed"):
            run()
    bad = {**good, "embeddings": good["embeddings"].clone()}
    bad["embeddings"][0, 0, 0] = float("nan")
    torch.save(bad, shard)
    with pytest.raises(RuntimeError, match=rf"shard {re.escape(str(shard))} holds NaN or Inf values"):
        run()
    shard.write_bytes(saved)
    assert run().equals(ref)
    (folder / CACHE_MANIFEST).write_text("[]")
    with pytest.raises(RuntimeError, match=r"cannot read embedding cache manifest .*: a JSON list, not an object"):
        run()
    (folder / CACHE_MANIFEST).write_text("[" * 10**5 + "]" * 10**5)
    with pytest.raises(RuntimeError, match=r"cannot read embedding cache manifest .*: maximum recursion depth"):
        run()


def test_a_bound_encode_method_is_keyed_by_its_owners_fingerprint(tmp_path):
    """``cache_dir`` without ``cache_key`` works for ``model.encode`` (a bound method: the fingerprint is its
    owner's, which a bound method does not forward) and uses the folder of that fingerprint."""
    from metaembed.evaluation import cache_folder

    class Model:
        def __init__(self):
            self.enc = HashEncoder()

        def fingerprint(self):
            return "fp-123"

        def encode(self, items, role):
            return self.enc(items, role)

    evaluate_mmeb(_random_tasks(n_tasks=1), Model().encode, [(1, 1)], cache_dir=tmp_path, progress=False)
    assert (cache_folder(tmp_path, "fp-123") / "encoder.json").exists()


def test_a_document_evaluation_resumed_from_the_cache_scores_the_cached_rows():
    """Rows already held (memory-mapped from the cache, or encoded by an earlier task) are copied into the
    stacked corpus: skipping the copy left uninitialised memory in their place and NDCG@5 was computed on it."""
    import tempfile

    task = _doc_task()
    ref = evaluate_doc_retrieval([task], HashEncoder(), [(1, 1), (4, 8)], progress=False)
    with tempfile.TemporaryDirectory() as d:
        evaluate_doc_retrieval([task], HashEncoder(), [(1, 1), (4, 8)], cache_dir=d, cache_key="h", progress=False)
        resumed = evaluate_doc_retrieval([task], HashEncoder(fail_after=0), [(1, 1), (4, 8)], cache_dir=d,
                                         cache_key="h", progress=False)
    pd.testing.assert_frame_equal(resumed, ref)
    # two document tasks sharing most of their corpus (ViDoRe's language subsets): the second one's shared pages
    # are known rows, its new pages (d03x, d07x) fall between them in docno order
    corpus = {**task.corpus, "d03x": _text("new page a"), "d07x": _text("new page b")}
    twin = DocRetrievalTask("Docs-2", {f"p{i}": _text(f"other query {i}") for i in range(3)}, corpus,
                            {"p0": {"d01": 1, "d03x": 2}, "p1": {"d07": 2, "d02": 1}, "p2": {"d07x": 1}})
    both = evaluate_doc_retrieval([task, twin], HashEncoder(), [(4, 8)], progress=False)
    alone = evaluate_doc_retrieval([twin], HashEncoder(), [(4, 8)], progress=False)
    assert both.value.iloc[1] == pytest.approx(alone.value.iloc[0], abs=1e-12)


def test_an_encoder_reusing_its_output_buffer_is_copied_with_a_cache_too():
    """With a cache, MMEB rows are kept per batch (not stacked): the rows of items without a uid (never cached)
    must still be copies, not views of the encoder's reused buffer (every such row would be the last batch)."""
    import tempfile

    apple, pear = Item(text="apple"), Item(text="pear")
    task = EvalTask("T", "vqa", "ind", [EvalQuery(Item(text="apple"), [apple, pear], "q0"),
                                        EvalQuery(Item(text="pear"), [pear, apple], "q1")])
    with tempfile.TemporaryDirectory() as d:
        df = evaluate_mmeb([task], _BufferEncoder(), None, batch_size=1, cache_dir=d, cache_key="buf",
                           progress=False, ties="pessimistic")
    assert df.value.tolist() == [100.0]


def test_evaluate_passes_k_to_the_document_tasks():
    """``evaluate(..., k=1)`` scores the document tasks at NDCG@1 (k was dropped for the fixed 5)."""
    bench = Benchmark(train=[], eval_tasks=_random_tasks(n_tasks=1), doc_tasks=[_doc_task()])
    df = evaluate(bench, HashEncoder(), [(4, 8)], progress=False, k=1)
    doc = df[df.task == "Docs"]
    ref = evaluate_doc_retrieval([_doc_task()], HashEncoder(), [(4, 8)], k=1, progress=False)
    assert doc.metric.tolist() == ["NDCG@1"] and doc.value.item() == pytest.approx(ref.value.item(), abs=1e-12)
