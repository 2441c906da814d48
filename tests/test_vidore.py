"""ViDoRe v1 (QA format) and v2 (BEIR format) loaders on tiny parquet fixtures with PNG bytes."""
from __future__ import annotations

import io
import re
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from metaembed.data.records import DocRetrievalTask
from metaembed.data.vidore import (
    VIDORE_V1_TASKS,
    VIDORE_V2_TASKS,
    ViDoReDataWarning,
    ViDoReFormatError,
    cap_task,
    load_vidore_v1,
    load_vidore_v2,
    load_vidore_v1_suite,
    load_vidore_v2_suite,
)

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _size(item) -> tuple[int, int]:
    """Size of a page item's image (kept as the encoded bytes, decoded on use)."""
    from metaembed.backbones.base import load_image

    return load_image(item).size


def png_bytes(size: tuple[int, int], color=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, columns: dict[str, pa.Array | list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def image_col(sizes: list[tuple[int, int]]) -> pa.Array:
    """The ``datasets`` Image feature: a struct of PNG bytes and a file name."""
    return pa.array([{"bytes": png_bytes(s), "path": f"p{i}.png"} for i, s in enumerate(sizes)], type=IMAGE_STRUCT)


def v1_file(path: Path, queries, filenames, sizes, image=None, extra=None) -> Path:
    cols = {"query": pa.array(queries, type=pa.string()), "image": image if image is not None else image_col(sizes),
            "image_filename": filenames}
    cols.update(extra or {})
    return write(path, cols)


def test_v1_round_trip(tmp_path: Path):
    f = v1_file(
        tmp_path / "docvqa_test_subsampled" / "data" / "test-00000-of-00001.parquet",
        queries=["What is the total?", "Who signed?", None, "What is the total?", "When?"],
        filenames=["a.pdf_1", "b.pdf_2", "c.pdf_3", "a.pdf_1", "b.pdf_2"],
        sizes=[(40, 50), (41, 50), (42, 50), (40, 50), (41, 50)],
        extra={"answer": ["10", "Bob", None, "10", "May"]},
    )
    task = load_vidore_v1(f.parent.parent)
    assert isinstance(task, DocRetrievalTask)
    assert task.name == "docvqa_test_subsampled" and task.split == "ind"
    # pages de-duplicated by image_filename; the null-query page is corpus-only
    assert list(task.corpus) == ["a.pdf_1", "b.pdf_2", "c.pdf_3"]
    assert [_size(task.corpus[d]) for d in task.corpus] == [(40, 50), (41, 50), (42, 50)]
    assert all(item.text == "" for item in task.corpus.values())
    # duplicated query string with the same page collapses into one query
    assert [q.text for q in task.queries.values()] == ["What is the total?", "Who signed?", "When?"]
    assert list(task.qrels.values()) == [{"a.pdf_1": 1}, {"b.pdf_2": 1}, {"b.pdf_2": 1}]
    assert set(task.qrels) == set(task.queries)
    uids = [i.uid for i in list(task.queries.values()) + list(task.corpus.values())]
    assert len(set(uids)) == len(uids)
    # keep mode (colpali-engine): one query per non-null row
    kept = load_vidore_v1(f, name="docvqa", duplicate_queries="keep")
    assert kept.name == "docvqa" and len(kept.queries) == 4


def test_v1_duplicate_query_modes_and_raw_bytes(tmp_path: Path):
    sizes = [(30, 30), (31, 30), (32, 30)]
    f = v1_file(
        tmp_path / "t.parquet",
        queries=["same question", "same question", "other"],
        filenames=["p1", "p2", "p3"],
        sizes=sizes,
        image=pa.array([png_bytes(s) for s in sizes], type=pa.binary()),
    )
    with pytest.warns(ViDoReDataWarning, match="1 duplicated query string"):
        last = load_vidore_v1(f)
    assert list(last.qrels.values()) == [{"p2": 1}, {"p3": 1}]  # vidore-benchmark: last row's page wins
    with pytest.warns(ViDoReDataWarning):
        union = load_vidore_v1(f, duplicate_queries="union")
    assert list(union.qrels.values()) == [{"p1": 1, "p2": 1}, {"p3": 1}]
    assert _size(union.corpus["p3"]) == (32, 30)
    with pytest.raises(ValueError, match="duplicate_queries"):
        load_vidore_v1(f, duplicate_queries="first")


def test_pages_are_checked_whole_and_kept_encoded(tmp_path: Path):
    """A page cut off after its header passed loading (only the header was read) and stopped `metaembed eval` with a
    traceback when it was encoded; and a page opened at load time kept its decoded pixels on the item once encoded
    (15.5 MB per 1654x2339 page for the whole run).  Pages are now decoded once at load, and kept as their bytes."""
    from metaembed.backbones.base import load_image

    whole = png_bytes((64, 64), color=(200, 10, 10))
    cut = pa.array([{"bytes": whole[: len(whole) // 2], "path": None}], type=IMAGE_STRUCT)
    f = v1_file(tmp_path / "cut" / "test-0.parquet", ["q"], ["x"], [(64, 64)], image=cut)
    with pytest.raises(ViDoReFormatError, match=r"test-0.parquet: row 0: field 'image': bytes are not a readable image"):
        load_vidore_v1(f)
    task = load_vidore_v1(v1_file(tmp_path / "ok" / "test-0.parquet", ["q"], ["x"], [(30, 20)]))
    page = task.corpus["x"]
    assert isinstance(page.image, bytes)
    assert load_image(page).size == (30, 20) and isinstance(page.image, bytes)  # decoded on use, not kept


# a PNG whose IHDR chunk is cut short: PIL raises a plain ValueError ("Truncated IHDR chunk"), not an OSError
SHORT_IHDR = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x00IHDR" + b"\x00" * 8


def test_every_damaged_page_is_a_format_error_whether_given_as_bytes_or_as_a_file(tmp_path: Path):
    """Found by fuzzing (a review helper): a page PIL rejects with a plain ``ValueError`` (a PNG's short IHDR; 209
    of 9,600 byte-mutated images in 8 formats) escaped every ViDoRe loader unwrapped, naming no file or row; and a
    page given only as a file beside the parquet was never decoded at load, so a truncated or non-image file
    passed and failed hours into encoding."""
    from metaembed.backbones.base import InputError, load_image
    from metaembed.data.records import Item
    from metaembed.data.vidore import load_vidore_train

    with pytest.raises(InputError, match="corrupt or unreadable image bytes: Truncated IHDR"):
        load_image(Item(image=SHORT_IHDR, uid="u"))
    short = pa.array([{"bytes": png_bytes((8, 8)), "path": None}, {"bytes": SHORT_IHDR, "path": None}],
                     type=IMAGE_STRUCT)
    f = v1_file(tmp_path / "short" / "test-0.parquet", ["q0", "q1"], ["a", "b"], [], image=short)
    with pytest.raises(ViDoReFormatError, match=r"test-0.parquet: row 1: field 'image': bytes are not a readable "
                                                r"image \(Truncated IHDR"):
        load_vidore_v1(f)
    with pytest.raises(ViDoReFormatError, match=r"row 1: field 'image': bytes are not a readable image"):
        load_vidore_train(f.parent, split="test", image_dir=tmp_path / "pages", progress=False)

    folder = tmp_path / "files"
    folder.mkdir()
    whole = png_bytes((40, 40))
    (folder / "good.png").write_bytes(whole)
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.png").write_text("not an image")
    for i, name in enumerate(["cut.png", "notes.png"]):
        image = pa.array([{"bytes": None, "path": "good.png"}, {"bytes": None, "path": name}], type=IMAGE_STRUCT)
        f = v1_file(folder / f"test-{i}.parquet", ["q0", "q1"], ["a", "b"], [], image=image)
        with pytest.raises(ViDoReFormatError, match=rf"test-{i}.parquet: row 1: field 'image': image file "
                                                    rf"\S*{name} is not a readable image"):
            load_vidore_v1(f)
        with pytest.raises(ViDoReFormatError, match=rf"row 1: field 'image': image file \S*{name} is not"):
            load_vidore_train(f, image_dir=tmp_path / "pages", progress=False)
        kept = load_vidore_train(f, image_dir=tmp_path / "pages", check_images=False, progress=False)
        assert [ex.positive.image for ex in kept] == [folder / "good.png", folder / name]  # not decoded when asked
    good = pa.array([{"bytes": None, "path": "good.png"}], type=IMAGE_STRUCT)
    page = load_vidore_v1(v1_file(folder / "test-ok.parquet", ["q"], ["a"], [], image=good)).corpus["a"]
    assert page.image == folder / "good.png" and _size(page) == (40, 40)
    write(folder / "corpus" / "test-0.parquet", {"corpus-id": [0, 1], "image": pa.array(
        [{"bytes": None, "path": "../good.png"}, {"bytes": None, "path": "../notes.png"}], type=IMAGE_STRUCT)})
    write(folder / "queries" / "test-0.parquet", {"query-id": [0], "query": ["q"]})
    write(folder / "qrels" / "test-0.parquet", {"query-id": [0], "corpus-id": [0], "score": [1]})
    with pytest.raises(ViDoReFormatError, match=r"corpus/test-0.parquet: row 1: field 'image': image file \S*notes"):
        load_vidore_v2(folder)


def test_a_page_failing_at_encoding_names_its_file_and_row(tmp_path: Path):
    """A page's uid is a content hash: a page the backbone cannot take was reported as
    "item 'vidore/img/3f2a...'", which says nothing about where to look."""
    from metaembed.backbones.base import InputError
    from metaembed.config import ModelConfig
    from metaembed.model import MetaEmbedModel

    m = MetaEmbedModel.build(ModelConfig(R_q=1, R_c=1))  # Qwen: refuses an aspect ratio of 200 or more
    v1 = load_vidore_v1(v1_file(tmp_path / "v1" / "test-0.parquet", ["q", "r"], ["x", "thin.png"],
                                [(30, 30), (300, 1)]))
    m.collate([v1.corpus["x"]], "candidate")
    with pytest.raises(InputError, match=r"item 'vidore/img/\w+' \(from \S*test-0.parquet: row 1: field 'image' "
                                         r"\(thin.png\)\): the qwen2_5_vl image processor cannot take its 300x1"):
        m.collate([v1.corpus["thin.png"]], "candidate")
    v2 = load_vidore_v2(beir(tmp_path / "v2", corpus_ids=[7, 8], queries=[(1, "q")], qrels=[(1, 8, 1)],
                             sizes=[(20, 20), (1, 300)]))
    with pytest.raises(InputError, match=r"test-00000-of-00001.parquet: row 1: field 'image' \(corpus-id '8'\)"):
        m.collate([v2.corpus["8"]], "candidate")


def test_v1_bad_inputs(tmp_path: Path):
    f = write(tmp_path / "a" / "test-0.parquet", {"query": ["q"], "image_filename": ["x"]})
    with pytest.raises(ViDoReFormatError, match=r"test-0.parquet: missing column\(s\) \['image'\]"):
        load_vidore_v1(f)
    broken = pa.array([{"bytes": b"not a png", "path": None}], type=IMAGE_STRUCT)
    f = v1_file(tmp_path / "b" / "test-0.parquet", ["q"], ["x"], [(8, 8)], image=broken)
    with pytest.raises(ViDoReFormatError, match=r"row 0: field 'image': bytes are not a readable image"):
        load_vidore_v1(f)
    nothing = pa.array([{"bytes": None, "path": "gone.png"}], type=IMAGE_STRUCT)
    f = v1_file(tmp_path / "c" / "test-0.parquet", ["q"], ["x"], [(8, 8)], image=nothing)
    with pytest.raises(ViDoReFormatError, match="row 0: field 'image'.*gone.png"):
        load_vidore_v1(f)
    f = v1_file(tmp_path / "d" / "test-0.parquet", [None, None], ["x", "y"], [(8, 8), (9, 9)])
    with pytest.raises(ViDoReFormatError, match="no query"):
        load_vidore_v1(f)
    with pytest.raises(ViDoReFormatError, match="d: no 'dev-\\*.parquet' file"):
        load_vidore_v1(tmp_path / "d", split="dev")


def beir(root: Path, *, corpus_ids, queries, qrels, languages=None, sizes=None, split="test") -> Path:
    """queries: [(query-id, text)], qrels: [(query-id, corpus-id, score)], sizes: page sizes (w, h)."""
    write(root / "corpus" / f"{split}-00000-of-00001.parquet",
          {"corpus-id": pa.array(corpus_ids, type=pa.int64()),
           "image": image_col(sizes or [(20 + i, 20) for i in range(len(corpus_ids))])})
    qcols = {"query-id": pa.array([q for q, _ in queries], type=pa.int64()), "query": [t for _, t in queries]}
    if languages is not None:
        qcols["language"] = languages
    write(root / "queries" / f"{split}-00000-of-00001.parquet", qcols)
    write(root / "qrels" / f"{split}-00000-of-00001.parquet",
          {"query-id": pa.array([q for q, _, _ in qrels], type=pa.int64()),
           "corpus-id": pa.array([c for _, c, _ in qrels], type=pa.int64()),
           "score": pa.array([float(s) for _, _, s in qrels], type=pa.float64())})
    return root


def test_v2_reads_corpus_queries_and_qrels_of_the_split_asked_for(tmp_path: Path):
    """A folder holding two splits: ``split="dev"`` reads dev's corpus, queries and qrels, none of test's (only
    the default split was ever loaded in a test; a corpus read from test-* passed; a review helper)."""
    root = beir(tmp_path / "two_splits", corpus_ids=[0, 1], queries=[(0, "test query")], qrels=[(0, 1, 1)])
    beir(root, corpus_ids=[10, 11, 12], queries=[(5, "dev query"), (6, "another")], qrels=[(5, 12, 2), (6, 10, 1)],
         split="dev")
    dev = load_vidore_v2(root, split="dev")
    assert list(dev.corpus) == ["10", "11", "12"] and {q: it.text for q, it in dev.queries.items()} == {
        "5": "dev query", "6": "another"}
    assert dev.qrels == {"5": {"12": 2}, "6": {"10": 1}}
    test = load_vidore_v2(root)
    assert list(test.corpus) == ["0", "1"] and test.qrels == {"0": {"1": 1}}


def test_v2_round_trip_graded_and_language(tmp_path: Path):
    root = beir(
        tmp_path / "esg_reports_v2",
        corpus_ids=[0, 1, 2, 3],
        queries=[(0, "What is the CO2 target?"), (1, "Quel est l'objectif ?"), (2, "Water usage?"), (3, "Unjudged?")],
        qrels=[(0, 0, 2), (0, 3, 1), (1, 0, 2), (2, 2, 1), (2, 1, 0), (3, 1, 0)],
        languages=["english", "french", "English", "english"],
    )
    with pytest.warns(ViDoReDataWarning) as record:
        task = load_vidore_v2(root)
    messages = " | ".join(str(w.message) for w in record)
    # as pytrec_eval: grades <= 0 kept (no gain); query 3, judged only with 0, is evaluated and scores 0
    assert "1 quer(y/ies) judged only with grades <= 0 score NDCG 0" in messages and "'3'" in messages
    assert "dropped" not in messages
    assert task.name == "esg_reports_v2" and task.split == "ood"
    assert list(task.corpus) == ["0", "1", "2", "3"]
    assert _size(task.corpus["2"]) == (22, 20)
    # ids are decimal strings; query 0 keeps corpus doc "0" (no ignore_identical_ids)
    assert task.qrels == {"0": {"0": 2, "3": 1}, "1": {"0": 2}, "2": {"2": 1, "1": 0}, "3": {"1": 0}}
    assert task.queries["1"].text == "Quel est l'objectif ?"
    with pytest.warns(ViDoReDataWarning):
        english = load_vidore_v2(root, name="ESG_Syn", language="english")
    assert english.name == "ESG_Syn"
    assert set(english.queries) == {"0", "2", "3"} and set(english.qrels) == {"0", "2", "3"}
    assert english.corpus.keys() == task.corpus.keys()  # the corpus is shared across languages
    with pytest.warns(ViDoReDataWarning) as record:
        dropped = load_vidore_v2(root, keep_nonpositive=False, language="english")
    messages = " | ".join(str(w.message) for w in record)
    assert "dropped 2 judgement(s) with grade <= 0" in messages
    assert "dropped 1 quer(y/ies) without a positive judgement (first: '3')" in messages
    assert dropped.qrels == {"0": {"0": 2, "3": 1}, "2": {"2": 1}}


def test_v2_ndcg_counts_queries_judged_only_nonpositive_like_pytrec_eval(tmp_path: Path):
    """A query whose qrels rows are all grade 0 scores 0 and counts in the mean (pytrec_eval / mteb);
    a query with no qrels row is not evaluated.  Checked end to end: loader -> evaluate_doc_retrieval."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    import torch
    from metaembed.evaluation import evaluate_doc_retrieval

    n_docs = 8
    qrels_rows = [(0, 1, 2), (0, 2, 0), (1, 3, 1), (2, 4, 0), (3, 5, 1), (3, 6, 0)]  # query 2: grade 0 only
    root = beir(tmp_path / "x", corpus_ids=list(range(n_docs)),
                queries=[(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "no qrels")], qrels=qrels_rows)
    gen = torch.Generator().manual_seed(0)
    vecs: dict[str, torch.Tensor] = {}

    def encode(items, role):  # random unit multi-vectors, fixed per item
        return torch.stack([vecs.setdefault(it.uid, torch.nn.functional.normalize(
            torch.randn(2, 8, generator=gen), dim=-1)) for it in items])

    with pytest.warns(ViDoReDataWarning) as record:
        task = load_vidore_v2(root)
    messages = " | ".join(str(w.message) for w in record)
    assert "judged only with grades <= 0" in messages and "dropped 1 quer(y/ies) without a judgement" in messages
    res = evaluate_doc_retrieval([task], encode, None, progress=False)
    qids = ["0", "1", "2", "3"]
    Q = encode([task.queries[q] for q in qids], "query")
    D = encode([task.corpus[d] for d in task.corpus], "candidate")
    s = torch.einsum("qid,njd->qnij", Q.double(), D.double()).amax(-1).sum(-1)  # MaxSim [nq, N]
    run = {q: {d: float(s[i, j]) for j, d in enumerate(task.corpus)} for i, q in enumerate(qids)}
    qrels = {str(q): {} for q, _, _ in qrels_rows}
    for q, d, g in qrels_rows:
        qrels[str(q)][str(d)] = g
    official = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5"}).evaluate(run)
    assert len(official) == 4 and official["2"]["ndcg_cut_5"] == 0.0
    assert int(res.n_queries.item()) == 4
    assert res.value.item() == pytest.approx(100 * sum(v["ndcg_cut_5"] for v in official.values()) / 4, abs=1e-9)


def test_v2_unknown_ids_scores_and_layout(tmp_path: Path):
    root = beir(tmp_path / "bio", corpus_ids=[10, 11], queries=[(0, "q0"), (1, "q1")],
                qrels=[(0, 10, 1), (1, 11, 1), (1, 99, 1), (7, 10, 1)])
    with pytest.raises(ViDoReFormatError, match=r"qrels/test-00000-of-00001.parquet: row 2: field 'corpus-id'.*'99'"):
        load_vidore_v2(root)
    with pytest.warns(ViDoReDataWarning, match=r"skipped 2 judgement\(s\) with unknown ids"):
        task = load_vidore_v2(root, on_unknown="skip")
    assert task.qrels == {"0": {"10": 1}, "1": {"11": 1}}

    bad_score = beir(tmp_path / "s", corpus_ids=[0], queries=[(0, "q")], qrels=[(0, 0, 1.5)])
    with pytest.raises(ViDoReFormatError, match=r"row 0: field 'score': non-integer relevance grade 1.5"):
        load_vidore_v2(bad_score)

    no_lang = beir(tmp_path / "nl", corpus_ids=[0], queries=[(0, "q")], qrels=[(0, 0, 1)])
    with pytest.raises(ViDoReFormatError, match=r"queries/test-00000-of-00001.parquet: missing column\(s\) \['language'\]"):
        load_vidore_v2(no_lang, language="english")
    assert load_vidore_v2(no_lang).qrels == {"0": {"0": 1}}

    dup = beir(tmp_path / "dup", corpus_ids=[0, 0], queries=[(0, "q")], qrels=[(0, 0, 1)])
    with pytest.raises(ViDoReFormatError, match=r"corpus/.*row 1: field 'corpus-id': duplicate corpus id '0'"):
        load_vidore_v2(dup)
    (tmp_path / "half" / "corpus").mkdir(parents=True)
    with pytest.raises(ViDoReFormatError, match="queries: directory not found"):
        load_vidore_v2(tmp_path / "half")


def test_v2_suite_and_task_tables(tmp_path: Path):
    assert len(VIDORE_V1_TASKS) == 10 and len(VIDORE_V2_TASKS) == 7
    assert VIDORE_V2_TASKS["ESG_Syn_Mul"] == ("vidore/esg_reports_v2", None)
    assert VIDORE_V2_TASKS["Bio"] == ("vidore/biomedical_lectures_v2", "english")
    beir(tmp_path / "esg_reports_v2", corpus_ids=[0, 1], queries=[(0, "co2"), (1, "eau")],
         qrels=[(0, 1, 1), (1, 0, 1)], languages=["english", "french"])
    syn, mul = load_vidore_v2_suite(tmp_path, ["ESG_Syn", "ESG_Syn_Mul"])
    assert (syn.name, list(syn.queries)) == ("ESG_Syn", ["0"])
    assert (mul.name, list(mul.queries)) == ("ESG_Syn_Mul", ["0", "1"])
    # content uids: the shared corpus is encoded once across the two tasks
    assert [d.uid for d in syn.corpus.values()] == [d.uid for d in mul.corpus.values()]
    assert syn.corpus["0"].uid != syn.corpus["1"].uid
    with pytest.raises(ViDoReFormatError, match="unknown ViDoRe v2 task"):
        load_vidore_v2_suite(tmp_path, ["ESG"])
    with pytest.raises(ViDoReFormatError, match="economics_reports_v2/corpus: directory not found"):
        load_vidore_v2_suite(tmp_path, ["Eco"])


def test_v1_suite(tmp_path: Path):
    v1_file(tmp_path / "tatdqa_test" / "data" / "test-00000-of-00001.parquet",
            queries=["q1", None], filenames=["f1", "f2"], sizes=[(10, 10), (11, 10)])
    (task,) = load_vidore_v1_suite(tmp_path, ["tatdqa"])
    assert task.name == "tatdqa" and list(task.corpus) == ["f1", "f2"] and list(task.qrels.values()) == [{"f1": 1}]
    with pytest.raises(ViDoReFormatError, match="docvqa_test_subsampled: file or directory not found"):
        load_vidore_v1_suite(tmp_path, ["docvqa"])


def _doc_task(n_queries: int, n_pages: int, qrels: dict[str, dict[str, int]]) -> DocRetrievalTask:
    from metaembed.data.records import Item

    return DocRetrievalTask(name="T", queries={f"q{i}": Item(text=f"query {i}") for i in range(n_queries)},
                            corpus={f"d{j}": Item(text=f"page {j}") for j in range(n_pages)}, qrels=qrels,
                            split="ood")


def test_cap_task_keeps_the_first_queries_their_judged_pages_and_the_first_others():
    """data.max_doc_queries / max_doc_pages (smoke runs): the first queries with their qrels; the corpus keeps
    every page they judge (graded 0 too) and fills up with the first other pages, in corpus order."""
    qrels = {"q0": {"d7": 1}, "q1": {"d5": 2, "d9": 0}, "q2": {"d1": 1}, "q3": {"d3": 1}}
    task = _doc_task(4, 10, qrels)
    small = cap_task(task, max_queries=2, max_pages=5)
    assert list(small.queries) == ["q0", "q1"] and small.qrels == {"q0": {"d7": 1}, "q1": {"d5": 2, "d9": 0}}
    assert list(small.corpus) == ["d0", "d1", "d5", "d7", "d9"] and small.split == "ood" and small.name == "T"
    assert small.corpus["d5"] is task.corpus["d5"] and len(task.corpus) == 10 and len(task.queries) == 4
    assert list(cap_task(task, max_queries=1).corpus) == list(task.corpus)  # pages: None keeps all
    with pytest.warns(ViDoReDataWarning, match="first 4 queries judge 5 pages, more than max_pages=4"):
        over = cap_task(task, max_pages=4)
    assert list(over.queries) == ["q0", "q1", "q2", "q3"] and list(over.corpus) == ["d1", "d3", "d5", "d7", "d9"]
    unchanged = cap_task(task, max_queries=9, max_pages=10)
    assert (unchanged.queries, unchanged.corpus, unchanged.qrels) == (task.queries, task.corpus, task.qrels)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            cap_task(task, max_queries=bad)
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            cap_task(task, max_pages=bad)


def test_max_doc_queries_and_pages_cap_the_vidore_tasks_of_a_benchmark(tmp_path: Path, caplog):
    from metaembed.config import ConfigError, DataConfig
    from metaembed.pipeline import load_benchmark

    v1_file(tmp_path / "vd" / "tatdqa_test" / "data" / "test-00000-of-00001.parquet",
            queries=["q1", "q2", None, "q4"], filenames=["f1", "f2", "f3", "f4"], sizes=[(10 + i, 10) for i in range(4)])
    cfg = DataConfig(n_train=4, n_eval_queries=2, n_candidates=2, subsets=["Ret-T2I"], vidore_path=str(tmp_path / "vd"))
    with pytest.warns(ViDoReDataWarning, match="scoring 1 of the 10"):
        (full,) = load_benchmark(cfg, train=False).doc_tasks
    assert (len(full.queries), len(full.corpus)) == (3, 4)
    with pytest.warns(ViDoReDataWarning), caplog.at_level("WARNING", logger="metaembed.pipeline"):
        (capped,) = load_benchmark(replace(cfg, max_doc_queries=1, max_doc_pages=2), train=False).doc_tasks
    assert [q.text for q in capped.queries.values()] == ["q1"] and list(capped.corpus) == ["f1", "f2"]
    assert "data.max_doc_queries=1, data.max_doc_pages=2" in caplog.text and "not comparable" in caplog.text
    for key in ("max_doc_queries", "max_doc_pages"):
        with pytest.raises(ConfigError, match="cap the ViDoRe tasks of data.vidore_path, which is not set"):
            load_benchmark(DataConfig(n_train=4, n_eval_queries=2, subsets=["Ret-T2I"], **{key: 3}), train=False)
        load_benchmark(DataConfig(n_train=4, n_eval_queries=2, subsets=["Ret-T2I"], **{key: 3}), evaluation=False)
        with pytest.raises(ValueError, match=f"data.{key} must be >= 1"):
            load_benchmark(replace(cfg, **{key: 0}), train=False)


def test_suite_task_lists_empty_or_repeated_are_errors(tmp_path: Path):
    """tasks=[] silently loaded every task (``tasks or all``); a repeated task counted twice in the NDCG mean."""
    for loader, known in ((load_vidore_v1_suite, VIDORE_V1_TASKS), (load_vidore_v2_suite, VIDORE_V2_TASKS)):
        key = next(iter(known))
        with pytest.raises(ViDoReFormatError, match="empty ViDoRe v[12] task list"):
            loader(tmp_path, [])
        with pytest.raises(ViDoReFormatError, match=rf"task\(s\) \['{key}'\] named more than once"):
            loader(tmp_path, [key, key])


def test_parquet_damaged_past_its_footer_is_a_format_error_naming_the_file(tmp_path: Path):
    """Damage inside the data (the footer reads) failed mid-read with a bare OSError and no file name."""
    path = tmp_path / "doc" / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    table = pa.table({"query": [f"q{i}" for i in range(8)], "image": image_col([(8 + i, 8) for i in range(8)]),
                      "image_filename": [f"f{i}" for i in range(8)]})
    pq.write_table(table, path, row_group_size=4)
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    off = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    data[off : off + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(ViDoReFormatError, match="test-00000-of-00001.parquet: unreadable parquet data"):
        load_vidore_v1(tmp_path / "doc")


def test_v2_duplicate_judgement_keeps_the_last_grade_with_a_warning(tmp_path: Path):
    """A (query, doc) judged twice raised, so a qrels file that vidore-benchmark and mteb load (a dict built
    over the rows: the last grade wins) could not be evaluated at all (a review helper).  The last grade is kept,
    as there, whatever the order and keep_nonpositive, and the repeat is reported."""
    for n, (rows, last) in enumerate((([(0, 0, 0), (0, 0, 2)], 2), ([(0, 0, 2), (0, 0, 0)], 0))):
        root = beir(tmp_path / f"d{n}", corpus_ids=[0, 1], queries=[(0, "q")], qrels=rows + [(0, 1, 1)])
        for keep in (True, False):
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                task = load_vidore_v2(root, keep_nonpositive=keep)
            msgs = [str(w.message) for w in rec]
            assert any(re.search(r"1 qrels row\(s\) judge a \(query, page\) pair judged before, 1 with another "
                                 r"grade; the last row's grade is kept.*qrels/\S+: row 1: \('0', '0'\)", m)
                       for m in msgs), msgs
            want = {"0": last, "1": 1} if keep or last > 0 else {"1": 1}
            assert task.qrels == {"0": want}
    same = beir(tmp_path / "same", corpus_ids=[0, 1], queries=[(0, "q")], qrels=[(0, 0, 1), (0, 0, 1)])
    with pytest.warns(ViDoReDataWarning, match=r"1 qrels row\(s\) judge .* judged before, 0 with another grade"):
        assert load_vidore_v2(same).qrels == {"0": {"0": 1}}


def test_v2_unknown_corpus_id_is_caught_whatever_the_language_filter(tmp_path: Path):
    """A judgement of a filtered-out (French) query naming a page not in the corpus loaded silently with
    language='english' and raised without it: whether a bad file was caught depended on the column loaded."""
    root = beir(tmp_path / "v2", corpus_ids=[1, 2], queries=[(1, "q"), (2, "r")], qrels=[(1, 1, 1), (2, 99, 1)],
                languages=["english", "french"])
    for lang in (None, "english", "french"):
        with pytest.raises(ViDoReFormatError, match=r"row 1: field 'corpus-id': unknown corpus id '99'"):
            load_vidore_v2(root, language=lang)
    with pytest.warns(ViDoReDataWarning, match="skipped 1 judgement"):
        assert load_vidore_v2(root, language="english", on_unknown="skip").qrels == {"1": {"1": 1}}


def test_suite_loaders_name_the_arguments_they_set_themselves(tmp_path: Path):
    """Passing language= (v2) or name= on through **kwargs was Python's "got multiple values for keyword
    argument"; the suites set them per task."""
    with pytest.raises(TypeError, match=r"\['language'\] cannot be passed: .*load_vidore_v2\(path, language"):
        load_vidore_v2_suite(tmp_path, ["ESG_Syn_Mul"], language="french")
    with pytest.raises(TypeError, match=r"\['name'\] cannot be passed"):
        load_vidore_v1_suite(tmp_path, name="x")


def test_v1_rows_of_one_filename_with_different_images_are_reported(tmp_path: Path):
    """Only the first row's image of an image_filename is kept; vidore-benchmark scores every row and keeps
    the best per filename, so differing images there changed the scores without a word."""
    f = v1_file(tmp_path / "x" / "test-0.parquet", queries=["q1", "q2", "q3"], filenames=["p", "p", "p"],
                sizes=[(30, 30), (60, 40), (30, 30)])
    with pytest.warns(ViDoReDataWarning, match=r"1 image_filename\(s\) appear with different images "
                                               r"\(first: 'p' at .*test-0.parquet: row 1: field 'image'\)"):
        task = load_vidore_v1(f)
    assert _size(task.corpus["p"]) == (30, 30)
    same = v1_file(tmp_path / "y" / "test-0.parquet", queries=["q1", "q2"], filenames=["p", "p"],
                   sizes=[(30, 30), (30, 30)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(load_vidore_v1(same).corpus) == ["p"]  # identical duplicates: silent, as before
    broken = pa.array([{"bytes": png_bytes((8, 8)), "path": None}, {"bytes": b"junk", "path": None}],
                      type=IMAGE_STRUCT)
    bad = v1_file(tmp_path / "z" / "test-0.parquet", ["q1", "q2"], ["p", "p"], [(8, 8)] * 2, image=broken)
    with pytest.raises(ViDoReFormatError, match=r"row 1: field 'image': bytes are not a readable image"):
        load_vidore_v1(bad)


def test_suite_tasks_as_one_string_is_a_clear_error(tmp_path: Path):
    # list("Bio") was the tasks "B", "i", "o": "unknown ViDoRe v2 task 'B'"
    for loader, name in ((load_vidore_v1_suite, "docvqa"), (load_vidore_v2_suite, "Bio")):
        with pytest.raises(ValueError, match=rf"tasks must be a list of ViDoRe v[12] task names.*'{name}'"):
            loader(tmp_path, name)


# ---------------------------------------------------------------------------------------------
# mutation testing of the readers (helper 91): each test below kills mutants that the tests above let through


def test_v1_names_blank_queries_keep_mode_and_silent_identical_duplicates(tmp_path: Path):
    f = v1_file(tmp_path / "docs" / "test-0.parquet", queries=["q", "  ", "q", "r"], filenames=["a", "b", "a", "c"],
                sizes=[(10, 10), (11, 10), (10, 10), (12, 10)])
    with pytest.warns(ViDoReDataWarning, match=r"^ViDoRe v1 'test-0': 1 row\(s\) with an empty query string") as rec:
        task = load_vidore_v1(f)  # a file: named by its stem
    assert len(rec) == 1  # "q" twice on one page is no conflict
    assert task.name == "test-0" and [q.text for q in task.queries.values()] == ["q", "r"]
    assert list(task.corpus) == ["a", "b", "c"]  # the blank-query row's page stays in the corpus
    with pytest.warns(ViDoReDataWarning):
        kept = load_vidore_v1(f, duplicate_queries="keep")
    assert list(kept.qrels.values()) == [{"a": 1}, {"a": 1}, {"c": 1}]  # grade 1, one query per row
    bad = v1_file(tmp_path / "bad" / "test-0.parquet", queries=["q"], filenames=[""], sizes=[(8, 8)])
    with pytest.raises(ViDoReFormatError, match="row 0: field 'image_filename': expected a non-empty string"):
        load_vidore_v1(bad)


def test_image_stored_as_a_file_beside_the_parquet(tmp_path: Path):
    """``{"bytes": empty, "path": rel}``: the file is read relative to the parquet file, and its uid changes
    when the file is replaced (a uid-keyed embedding cache must not serve the old page)."""
    import os

    folder = tmp_path / "doc"
    folder.mkdir()
    Image.new("RGB", (9, 7)).save(folder / "page.png")
    image = pa.array([{"bytes": b"", "path": "page.png"}], type=IMAGE_STRUCT)
    f = v1_file(folder / "test-0.parquet", ["q"], ["page"], [(1, 1)], image=image)
    page = load_vidore_v1(f).corpus["page"]
    assert page.image == folder / "page.png"
    st = (folder / "page.png").stat()
    Image.new("RGB", (9, 7), (255, 0, 0)).save(folder / "page.png")
    os.utime(folder / "page.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_vidore_v1(f).corpus["page"].uid != page.uid


def test_v2_bad_ids_grades_queries_and_languages(tmp_path: Path):
    def write_v2(root: Path, *, corpus_ids=(0,), queries=None, qrels=None):
        write(root / "corpus" / "test-0.parquet", {"corpus-id": list(corpus_ids),
                                                   "image": image_col([(8, 8)] * len(corpus_ids))})
        write(root / "queries" / "test-0.parquet", queries or {"query-id": [0], "query": ["q"]})
        write(root / "qrels" / "test-0.parquet", qrels or {"query-id": [0], "corpus-id": [0], "score": [1]})
        return root

    for i, (kw, match) in enumerate([
        (dict(corpus_ids=[1.5]), r"corpus/test-0.parquet: row 0: field 'corpus-id': non-integer id 1.5"),
        (dict(corpus_ids=[True]), r"corpus/test-0.parquet: row 0: field 'corpus-id': expected an id, got True"),
        (dict(corpus_ids=[" "]), r"corpus/test-0.parquet: row 0: field 'corpus-id': expected an int or string id"),
        (dict(qrels={"query-id": [0], "corpus-id": [0], "score": [float("inf")]}),
         r"row 0: field 'score': expected a number, got inf"),
        (dict(qrels={"query-id": [0], "corpus-id": [0], "score": [True]}),
         r"row 0: field 'score': expected a number, got True"),
        (dict(queries={"query-id": [0], "query": ["  "]}), r"row 0: field 'query': expected a non-empty string"),
    ]):
        with pytest.raises(ViDoReFormatError, match=match):
            load_vidore_v2(write_v2(tmp_path / f"b{i}", **kw))
    # an integral float reads as its integer id (ids stored as floats)
    assert list(load_vidore_v2(write_v2(tmp_path / "f", corpus_ids=[0.0])).corpus) == ["0"]
    langs = write_v2(tmp_path / "l", queries={"query-id": [0, 1, 0], "query": ["q", "r", "again"],
                                              "language": ["french", "English", "english"]},
                     qrels={"query-id": [1], "corpus-id": [0], "score": [1]})
    with pytest.raises(ViDoReFormatError, match=r"row 2: field 'query-id': duplicate query id '0'"):
        load_vidore_v2(langs, language="english")  # a filtered-out id is still taken
    langs = write_v2(tmp_path / "l2", queries={"query-id": [0, 1], "query": ["q", "r"], "language": ["french", "English"]},
                     qrels={"query-id": [1, 0], "corpus-id": [0, 0], "score": [1, 1]})
    assert list(load_vidore_v2(langs, language="English").queries) == ["1"]  # case-insensitive on both sides
    nolang = write_v2(tmp_path / "l3", queries={"query-id": [0], "query": ["q"], "language": [None]})
    with pytest.raises(ViDoReFormatError, match=r"row 0: field 'language': expected a string, got None"):
        load_vidore_v2(nolang, language="english")


def test_v2_qrels_follow_query_order_and_task_table(tmp_path: Path):
    root = beir(tmp_path / "x", corpus_ids=[0, 1], queries=[(5, "a"), (3, "b")], qrels=[(3, 0, 1), (5, 1, 2)])
    task = load_vidore_v2(root)
    assert list(task.queries) == list(task.qrels) == ["5", "3"]
    assert VIDORE_V2_TASKS == {  # paper Table 2 columns; the "Mul" columns and ESG_Human keep every language
        "ESG_Human": ("vidore/esg_reports_human_labeled_v2", None),
        "Eco_Mul": ("vidore/economics_reports_v2", None),
        "Bio": ("vidore/biomedical_lectures_v2", "english"),
        "ESG_Syn": ("vidore/esg_reports_v2", "english"),
        "ESG_Syn_Mul": ("vidore/esg_reports_v2", None),
        "Bio_Mul": ("vidore/biomedical_lectures_v2", None),
        "Eco": ("vidore/economics_reports_v2", "english"),
    }


# ---------------------------------------------------------------------------------------------
# ViDoRe-train (vidore/colpali_train_set)


def colpali_train_set(root: Path, queries=("what is the revenue?", "who signed?", None, "what year?"),
                      colors=((200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 0, 0))) -> Path:
    """``data/train-0000k-of-00002.parquet`` with the release's columns; rows 0 and 3 show the same page."""
    pages = [{"bytes": png_bytes((40, 56), c), "path": f"page{i}.png"} for i, c in enumerate(colors)]
    n = len(queries)
    for k, rows in enumerate((range(0, n // 2), range(n // 2, n))):
        write(root / "data" / f"train-0000{k}-of-00002.parquet", {
            "image": pa.array([pages[i] for i in rows], type=IMAGE_STRUCT),
            "image_filename": [f"images/{i}.png" for i in rows], "query": pa.array([queries[i] for i in rows],
                                                                                   type=pa.string()),
            "answer": ["a"] * len(rows), "source": ["docvqa"] * len(rows)})
    write(root / "data" / "test-00000-of-00001.parquet", {  # the 500-row test split: not read as training data
        "image": pa.array([pages[1]], type=IMAGE_STRUCT), "image_filename": ["t.png"], "query": ["held out?"],
        "answer": ["a"], "source": ["docvqa"]})
    return root


def test_vidore_train_pairs_pages_written_once_and_reused(tmp_path: Path):
    from metaembed.data.vidore import VIDORE_TRAIN_TASK, load_vidore_train

    root = colpali_train_set(tmp_path / "colpali_train_set")
    with pytest.warns(ViDoReDataWarning, match="skipped 1 row"):
        pairs = load_vidore_train(root, progress=False)
    assert [p.query.text for p in pairs] == ["what is the revenue?", "who signed?", "what year?"]
    assert all(p.negative is None and p.task == VIDORE_TRAIN_TASK == "ViDoRe-train" for p in pairs)
    pages = [p.positive.image for p in pairs]
    assert all(isinstance(f, Path) and f.is_file() and f.suffix == ".png" for f in pages)
    assert pages[0] == pages[2] and pages[0] != pages[1]  # one file per distinct page
    assert sorted((root / ".metaembed-pages").rglob("*.png")) == sorted(set(pages))
    assert pages[1].read_bytes() == png_bytes((40, 56), (0, 200, 0))
    assert _size(pairs[1].positive) == (40, 56)
    assert "train-00000-of-00002.parquet: row 1: field 'image'" in pairs[1].positive.source
    # the uid is the evaluation loaders' content hash: a page shared with a ViDoRe v1 task has one uid
    v1 = load_vidore_v1(v1_file(tmp_path / "v1.parquet", ["q"], ["x.png"], [(1, 1)],
                                image=pa.array([{"bytes": pages[1].read_bytes(), "path": "x"}], type=IMAGE_STRUCT)))
    assert pairs[1].positive.uid == v1.corpus["x.png"].uid
    # a second load writes nothing and gives the same pairs
    stamps = {f: f.stat().st_mtime_ns for f in set(pages)}
    with pytest.warns(ViDoReDataWarning):
        again = load_vidore_train(root, progress=False)
    def fields(ps):
        return [(p.query.text, p.query.uid, p.positive.image, p.positive.uid, p.positive.source, p.task) for p in ps]

    assert fields(again) == fields(pairs) and {f: f.stat().st_mtime_ns for f in set(pages)} == stamps
    # image_dir elsewhere; the test split is its own
    test = load_vidore_train(root, split="test", image_dir=tmp_path / "pages", progress=False)
    assert [p.query.text for p in test] == ["held out?"] and test[0].positive.image.parent.parent == tmp_path / "pages"


def test_vidore_train_skips_a_blank_query(tmp_path: Path):
    """A whitespace-only query is skipped and counted like a null one (only null was tested; a review helper)."""
    from metaembed.data.vidore import load_vidore_train

    root = colpali_train_set(tmp_path / "blank", queries=("a real question", "   "),
                             colors=((200, 0, 0), (0, 200, 0)))
    with pytest.warns(ViDoReDataWarning, match="skipped 1 row"):
        pairs = load_vidore_train(root, progress=False)
    assert [p.query.text for p in pairs] == ["a real question"]


def test_vidore_train_bad_inputs(tmp_path: Path):
    from metaembed.data.vidore import load_vidore_train

    root = colpali_train_set(tmp_path / "ok")
    bad = tmp_path / "bad" / "train-0.parquet"
    write(bad, {"image": pa.array([{"bytes": png_bytes((8, 8)), "path": None}, {"bytes": b"\x89PNG\r\n\x1a\nxx",
                                                                               "path": None}], type=IMAGE_STRUCT),
                "query": ["fine", "broken page"]})
    with pytest.raises(ViDoReFormatError, match=r"train-0.parquet: row 1: field 'image': bytes are not a readable"):
        load_vidore_train(bad, image_dir=tmp_path / "p", progress=False)
    truncated = png_bytes((64, 64))[:-30]
    write(bad, {"image": pa.array([{"bytes": truncated, "path": None}], type=IMAGE_STRUCT), "query": ["cut off"]})
    with pytest.raises(ViDoReFormatError, match=r"row 0: field 'image'"):  # decoded whole, not only the header
        load_vidore_train(bad, image_dir=tmp_path / "p", progress=False)
    assert load_vidore_train(bad, image_dir=tmp_path / "p", check_images=False, progress=False)[0].query.text == "cut off"
    write(bad, {"image": pa.array([{"bytes": png_bytes((8, 8)), "path": None}], type=IMAGE_STRUCT),
                "question": ["wrong column name"]})
    with pytest.raises(ViDoReFormatError, match=r"train-0.parquet: missing column\(s\) \['query'\]"):
        load_vidore_train(bad, progress=False)
    write(bad, {"image": pa.array([{"bytes": png_bytes((8, 8)), "path": None}], type=IMAGE_STRUCT),
                "query": pa.array([None], type=pa.string())})
    with pytest.raises(ViDoReFormatError, match="no ViDoRe-train row with a query"), pytest.warns(ViDoReDataWarning):
        load_vidore_train(bad, progress=False)
    with pytest.raises(ViDoReFormatError, match="no 'validation-\\*.parquet' file"):
        load_vidore_train(tmp_path / "ok" / "data", split="validation", progress=False)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "file").write_text("")  # a file where the page folder would go
    with pytest.raises(ViDoReFormatError, match="cannot write ViDoRe-train page images.*data.vidore_train_image_dir"):
        load_vidore_train(root, image_dir=tmp_path / "ro" / "file", progress=False)


def test_vidore_train_writers_sharing_a_pid_do_not_collide(tmp_path: Path):
    """Every rank loads the data: two writers of one page folder whose pids are equal (threads here; ranks of
    two hosts in their own pid namespaces) used one temporary name, and one failed on the other's rename."""
    import threading

    from metaembed.data.vidore import load_vidore_train

    n = 300
    write(tmp_path / "data" / "train-0.parquet", {
        "image": pa.array([{"bytes": png_bytes((8, 8), (i % 256, i // 256, 7)), "path": None} for i in range(n)],
                          type=IMAGE_STRUCT), "query": [f"q{i}" for i in range(n)]})
    results: list = [None, None]

    def load(k: int) -> None:
        try:
            results[k] = load_vidore_train(tmp_path, image_dir=tmp_path / "pages", check_images=False, progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            results[k] = e

    threads = [threading.Thread(target=load, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, list) and len(r) == n for r in results), results
    files = sorted((tmp_path / "pages").rglob("*"))
    assert len([f for f in files if f.is_file()]) == n and not [f for f in files if f.name.endswith(".tmp")]


def test_an_oversized_page_is_a_format_error_naming_its_row(tmp_path: Path, monkeypatch):
    """PIL's DecompressionBombError is not an OSError: it went through the loaders' checks as a traceback."""
    from metaembed.data.vidore import load_vidore_train

    f = v1_file(tmp_path / "t.parquet", ["q"], ["p.png"], [(40, 40)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels > 2 x 100
    with pytest.raises(ViDoReFormatError, match=r"t.parquet: row 0: field 'image': bytes are not a readable image"):
        load_vidore_v1(f)
    with pytest.raises(ViDoReFormatError, match=r"t.parquet: row 0: field 'image'"):
        load_vidore_train(f, image_dir=tmp_path / "pages", progress=False)


# --------------------------------------------------------------------------- instructions

QUERY_INSTRUCTION = "Find a document image that matches the given query: "
PAGE_INSTRUCTION = "Understand the content of the provided document image."


def test_instructions_reach_every_vidore_query_and_page_with_new_uids(tmp_path: Path):
    """ViDoRe items had no instruction and no way to give one (paper-fidelity review): a model trained on MMEB's
    instructed items was scored on bare ViDoRe queries, unlike VLM2Vec-V2's and MoCa's visual-document evaluations."""
    from metaembed.data.vidore import _query_uid, instruct_examples, instruct_task, load_vidore_train

    task = load_vidore_v2(beir(tmp_path / "esg_reports_v2", corpus_ids=[0, 1], queries=[(0, "CO2 target?")],
                               qrels=[(0, 1, 2)]))
    both = instruct_task(task, QUERY_INSTRUCTION, PAGE_INSTRUCTION)
    assert both.queries["0"].text == QUERY_INSTRUCTION + "CO2 target?"
    assert both.queries["0"].uid == _query_uid(QUERY_INSTRUCTION + "CO2 target?") != task.queries["0"].uid
    for d, page in both.corpus.items():
        assert page.text == PAGE_INSTRUCTION and page.image is task.corpus[d].image
        assert page.source == task.corpus[d].source and page.uid.startswith(task.corpus[d].uid + "/t/")
    assert len({p.uid for p in both.corpus.values()}) == 2  # still one uid per page
    assert both.qrels == task.qrels and (both.name, both.split) == (task.name, task.split)
    assert instruct_task(task, page="Another page instruction.").corpus["0"].uid != both.corpus["0"].uid
    only_query = instruct_task(task, QUERY_INSTRUCTION)
    assert only_query.corpus is task.corpus and only_query.queries["0"].text.startswith(QUERY_INSTRUCTION)
    assert instruct_task(task) is task and task.queries["0"].text == "CO2 target?"  # the input is not changed
    with pytest.raises(TypeError, match="the page instruction must be a string"):
        instruct_task(task, page=None)
    with pytest.warns(ViDoReDataWarning):
        pairs = load_vidore_train(colpali_train_set(tmp_path / "colpali_train_set"), progress=False)
    taught = instruct_examples(pairs, QUERY_INSTRUCTION, PAGE_INSTRUCTION)
    assert [p.query.text for p in taught] == [QUERY_INSTRUCTION + p.query.text for p in pairs]
    assert all(t.positive.text == PAGE_INSTRUCTION and t.positive.image == p.positive.image and t.negative is None
               and t.task == p.task for t, p in zip(taught, pairs))
    assert [t.positive.uid for t in taught] == [instruct_task(
        DocRetrievalTask("x", {}, {"p": p.positive}, {}), page=PAGE_INSTRUCTION).corpus["p"].uid for p in pairs]


def test_instructions_in_the_data_config_reach_the_benchmark_and_the_cache_serves_no_bare_vector(tmp_path: Path):
    """data.vidore_query_instruction / data.vidore_page_instruction apply to the ViDoRe tasks a benchmark scores;
    an embedding cache written without them is not read for the instructed items (their uids differ)."""
    import torch

    from metaembed.config import ConfigError, DataConfig
    from metaembed.data.records import Benchmark
    from metaembed.evaluation import evaluate
    from metaembed.pipeline import load_benchmark

    beir(tmp_path / "vd" / "esg_reports_human_labeled_v2", corpus_ids=[0, 1, 2],
         queries=[(0, "CO2 target?"), (1, "water?")], qrels=[(0, 1, 2), (1, 2, 1)])
    cfg = DataConfig(n_train=4, n_eval_queries=2, n_candidates=2, subsets=["Ret-T2I"], vidore_path=str(tmp_path / "vd"),
                     vidore_query_instruction=QUERY_INSTRUCTION, vidore_page_instruction=PAGE_INSTRUCTION)
    with pytest.warns(ViDoReDataWarning):
        (task,) = load_benchmark(cfg, train=False).doc_tasks
        (bare,) = load_benchmark(replace(cfg, vidore_query_instruction="", vidore_page_instruction=""),
                                 train=False).doc_tasks
    assert [q.text for q in task.queries.values()] == [QUERY_INSTRUCTION + "CO2 target?", QUERY_INSTRUCTION + "water?"]
    assert {p.text for p in task.corpus.values()} == {PAGE_INSTRUCTION}

    def encode(items, role):  # text-dependent vectors: an instruction changes every embedding
        # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), and with 3 pages the instructed and
        # the bare NDCG then coincided now and then (1 seed in 24), failing the `!=` below
        keys = [f"{role}|{it.text}|{str(it.uid).split('/t/')[0]}" for it in items]
        g = [torch.Generator().manual_seed(zlib.crc32(k.encode())) for k in keys]
        return torch.nn.functional.normalize(torch.stack([torch.randn(2, 8, generator=x) for x in g]), dim=-1)

    def score(t, cache):
        return evaluate(Benchmark(train=[], doc_tasks=[t]), encode, [(1, 1), (2, 2)], cache_dir=cache,
                        cache_key="k", progress=False)["value"].tolist()

    cache = tmp_path / "cache"
    assert score(bare, cache) == score(bare, None)
    assert score(task, cache) == score(task, None) != score(bare, None)
    for key in ("vidore_query_instruction", "vidore_page_instruction"):
        with pytest.raises(ConfigError, match=f"data.{key}='x' is an instruction for ViDoRe items, but neither"):
            DataConfig(**{key: "x"}).validate()
        with pytest.raises(ConfigError, match=f"data.{key} must be a string"):
            DataConfig(vidore_path="vd", **{key: 3}).validate()


def test_the_training_set_of_data_vidore_train_carries_the_instructions(tmp_path: Path):
    """_mmeb_train's instruct_examples had no test: ViDoRe-train pairs trained without the instructions the
    evaluated ViDoRe items carry (dropping the call left every test passing)."""
    from metaembed.config import DataConfig
    from metaembed.pipeline import load_benchmark

    cfg = DataConfig(source="mmeb", vidore_train=str(colpali_train_set(tmp_path / "colpali_train_set")),
                     vidore_train_image_dir=str(tmp_path / "pages"), vidore_query_instruction=QUERY_INSTRUCTION,
                     vidore_page_instruction=PAGE_INSTRUCTION)
    with pytest.warns(ViDoReDataWarning):
        train = load_benchmark(cfg, evaluation=False).train
    assert train and all(ex.query.text.startswith(QUERY_INSTRUCTION) and ex.positive.text == PAGE_INSTRUCTION
                         and ex.task == "ViDoRe-train" for ex in train)


def test_either_vidore_cap_alone_caps_the_benchmark(tmp_path: Path):
    """data.max_doc_queries or data.max_doc_pages given alone caps the ViDoRe tasks (only both together were
    tested: a cap applied only with the other one set was ignored without a word)."""
    from metaembed.config import DataConfig
    from metaembed.pipeline import load_benchmark

    v1_file(tmp_path / "vd" / "tatdqa_test" / "data" / "test-00000-of-00001.parquet",
            queries=["q1", "q2", None, "q4"], filenames=["f1", "f2", "f3", "f4"], sizes=[(10 + i, 10) for i in range(4)])
    cfg = DataConfig(n_train=4, n_eval_queries=2, n_candidates=2, subsets=["Ret-T2I"], vidore_path=str(tmp_path / "vd"))
    with pytest.warns(ViDoReDataWarning):
        (by_queries,) = load_benchmark(replace(cfg, max_doc_queries=1), train=False).doc_tasks
        (by_pages,) = load_benchmark(replace(cfg, max_doc_pages=3), train=False).doc_tasks
    assert (len(by_queries.queries), len(by_queries.corpus)) == (1, 4)
    assert len(by_pages.corpus) == 3


# ---- mutation-review gap tests ----------------------------------------------------------------
def test_a_split_held_in_one_unsharded_file_is_found(tmp_path: Path):
    """``data/test.parquet`` (one file, no ``-NNNNN-of-NNNNN`` shard suffix) is the v1 split, and
    ``corpus/test.parquet`` etc. the v2 one, as ``test-*.parquet`` shards are."""
    v1_file(tmp_path / "v1" / "data" / "test.parquet", queries=["q1"], filenames=["a"], sizes=[(20, 20)])
    assert list(load_vidore_v1(tmp_path / "v1").corpus) == ["a"]
    root = beir(tmp_path / "v2", corpus_ids=[0, 1], queries=[(0, "q")], qrels=[(0, 1, 1)])
    for sub in ("corpus", "queries", "qrels"):
        (root / sub / "test-00000-of-00001.parquet").rename(root / sub / "test.parquet")
    assert load_vidore_v2(root).qrels == {"0": {"1": 1}}


def test_v1_differing_images_warning_names_the_first_differing_row(tmp_path: Path):
    """With several rows of one image_filename differing from the kept image, the warning points at the first of
    them (row 1), not a later one."""
    f = v1_file(tmp_path / "x" / "test-0.parquet", queries=["q1", "q2", "q3"], filenames=["p", "p", "p"],
                sizes=[(30, 30), (60, 40), (50, 50)])
    with pytest.warns(ViDoReDataWarning, match=r"1 image_filename\(s\) appear with different images "
                                               r"\(first: 'p' at .*test-0.parquet: row 1: field 'image'\)"):
        load_vidore_v1(f)


def test_v2_suite_without_a_task_list_loads_all_seven_columns(tmp_path: Path):
    """``tasks=None`` is every column of VIDORE_V2_TASKS, in table order (the default a benchmark run uses)."""
    for ds in ("esg_reports_human_labeled_v2", "economics_reports_v2", "biomedical_lectures_v2", "esg_reports_v2"):
        beir(tmp_path / ds, corpus_ids=[0, 1], queries=[(0, "co2"), (1, "eau")], qrels=[(0, 1, 1), (1, 0, 1)],
             languages=["english", "french"])
    assert [t.name for t in load_vidore_v2_suite(tmp_path)] == list(VIDORE_V2_TASKS)


def test_v1_suite_without_a_task_list_loads_all_ten_tasks(tmp_path: Path):
    """``tasks=None`` is every task of VIDORE_V1_TASKS, in table order: the ViDoRe v1 mean runs over ten tasks."""
    for ds in VIDORE_V1_TASKS.values():
        v1_file(tmp_path / ds.split("/", 1)[1] / "data" / "test-00000-of-00001.parquet", queries=["q"],
                filenames=["f"], sizes=[(10, 10)])
    assert [t.name for t in load_vidore_v1_suite(tmp_path)] == list(VIDORE_V1_TASKS)


def test_v2_with_no_judged_query_left_is_an_error_not_an_empty_task(tmp_path: Path):
    """Every query judged only with grades <= 0 and ``keep_nonpositive=False``: no query is left, which must raise
    (an empty task would give a mean over no query)."""
    root = beir(tmp_path / "t", corpus_ids=[0, 1], queries=[(0, "a"), (1, "b")], qrels=[(0, 0, 0), (1, 1, 0)])
    with pytest.warns(ViDoReDataWarning), pytest.raises(ViDoReFormatError, match="no query has a positive judgement"):
        load_vidore_v2(root, keep_nonpositive=False)


def test_instruct_examples_gives_a_hard_negative_page_the_page_instruction():
    """A ViDoRe-train pair with a hard negative page: the negative gets the page instruction (and a new uid) as the
    positive does, so training never contrasts an instructed positive with a bare negative."""
    from metaembed.data.records import Item, TrainExample
    from metaembed.data.vidore import instruct_examples

    ex = TrainExample(query=Item(text="q", uid="q0"), positive=Item(image=b"p", uid="p0"),
                      negative=Item(image=b"n", uid="n0"), task="ViDoRe-train")
    (out,) = instruct_examples([ex], query="Query: ", page="Page.")
    assert out.positive.text == "Page." and out.negative.text == "Page."
    assert out.negative.uid not in (None, "n0") and out.negative.uid.startswith("n0/t/")


def test_cap_task_keeps_pages_in_corpus_order_not_id_order():
    """The capped corpus keeps the task's corpus order (file order), also where ids do not sort that way
    ("d10" before "d2" as strings): pages are encoded and listed in the order the task holds them."""
    from metaembed.data.records import Item

    corpus = {d: Item(text=d) for d in ("d2", "d10", "d1", "d30", "d4")}
    task = DocRetrievalTask(name="T", queries={"q0": Item(text="q")}, corpus=corpus, qrels={"q0": {"d30": 1}},
                            split="ood")
    assert list(cap_task(task, max_pages=3).corpus) == ["d2", "d10", "d30"]
