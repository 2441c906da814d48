"""MMEB loaders on tiny parquet + PNG fixtures written in the MMEB-train, MoCa and MMEB-eval layouts."""
from __future__ import annotations

import builtins
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from metaembed.data.mmeb import (
    EVAL_FIELDS,
    MMEB_TASKS,
    MMEB_TRAIN_SUBSETS,
    TRAIN_FIELDS,
    MMEBDataWarning,
    MMEBFormatError,
    held_out_split,
    load_mmeb_eval,
    load_mmeb_train,
    mix_subsets,
    parse_negative_field,
)
from metaembed.data.records import IMAGE_PLACEHOLDER, Item, TrainExample

PH = IMAGE_PLACEHOLDER


def T(item: Item | None):
    """Items compare by identity (records.Item has eq=False): compare their content."""
    return None if item is None else (item.text, item.image)


def png(root: Path, rel: str, color=(200, 10, 10)) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 28), color).save(path)
    return rel


def write_parquet(path: Path, rows: list[dict], columns: tuple[str, ...] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or tuple(rows[0])
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    pq.write_table(table, path)
    return path


def train_row(qry, qimg="", pos="", pimg="", neg="", nimg=""):
    return dict(zip(TRAIN_FIELDS, (qry, qimg, pos, pimg, neg, nimg)))


@pytest.fixture()
def train_root(tmp_path: Path) -> Path:
    root = tmp_path / "MMEB-train"
    a = png(root, "images/VOC2007/a.png")
    b = png(root, "images/VOC2007/b.png", (0, 0, 255))
    write_parquet(root / "VOC2007" / "original-00000-of-00001.parquet", [
        train_row(f"{PH} Identify the object shown in the image.", a, "dog", "", "cat", ""),
        train_row(f"{PH}\nRepresent the text.", "", f"{PH} Represent the given image.", b, "", ""),
    ])
    write_parquet(root / "CIRR" / "original-00000-of-00001.parquet", [
        train_row(f"{PH} Find a similar image.", a, f"{PH} Represent the given image.", b, f"{PH} neg", a),
    ])
    # files of other splits must be ignored
    write_parquet(root / "CIRR" / "diverse_instruction-00000-of-00001.parquet", [train_row("x", "", "y")])
    return root


def test_task_table_matches_mmeb():
    assert len(MMEB_TASKS) == 36
    meta = Counter(t.meta_task for t in MMEB_TASKS.values())
    assert meta == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    split = Counter(t.split for t in MMEB_TASKS.values())
    assert split == {"ind": 20, "ood": 16}
    assert len(MMEB_TRAIN_SUBSETS) == 20 and "ImageNet_1K" in MMEB_TRAIN_SUBSETS
    assert all((t.train_subset is None) == (t.split == "ood") for t in MMEB_TASKS.values())
    assert MMEB_TASKS["RefCOCO"].meta_task == "grounding" and MMEB_TASKS["MSCOCO"].split == "ind"
    assert {n for n, t in MMEB_TASKS.items() if t.split == "ood" and t.meta_task == "retrieval"} == {
        "OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"}


def test_task_table_is_the_published_membership():
    """Each task's meta-task and IND / OOD split as MMEB's Table 1 (Jiang et al., 2024) lists them.  The counts
    alone let SUN397 <-> Place365 or Visual7W <-> ScienceQA swap: the IND / OOD columns, which the paper reports,
    were then silently wrong (IND 52.0 -> 48.0 on one set of task scores; a review helper)."""
    published = {
        ("classification", "ind"): "ImageNet-1K N24News HatefulMemes VOC2007 SUN397",
        ("classification", "ood"): "Place365 ImageNet-A ImageNet-R ObjectNet Country211",
        ("vqa", "ind"): "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W",
        ("vqa", "ood"): "ScienceQA VizWiz GQA TextVQA",
        ("retrieval", "ind"): "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA",
        ("retrieval", "ood"): "OVEN FashionIQ EDIS Wiki-SS-NQ",
        ("grounding", "ind"): "MSCOCO",
        ("grounding", "ood"): "Visual7W-Pointing RefCOCO RefCOCO-Matching",
    }
    got: dict[tuple[str, str], set[str]] = {}
    for name, task in MMEB_TASKS.items():
        got.setdefault((task.meta_task, task.split), set()).add(name)
    assert got == {key: set(names.split()) for key, names in published.items()}


def test_train_round_trip_original_format(train_root: Path):
    exs = load_mmeb_train(train_root)
    assert [e.task for e in exs] == ["CIRR", "VOC2007", "VOC2007"]  # sorted subset dirs, file order inside
    cirr, voc0, voc1 = exs
    # image query keeps the placeholder and gets the resolved path
    assert T(voc0.query) == (f"{PH} Identify the object shown in the image.", train_root / "images/VOC2007/a.png")
    assert T(voc0.positive) == ("dog", None)
    assert T(voc0.negative) == ("cat", None)
    # text-only query: only the placeholder removed (MoCa's loader keeps the newline after it);
    # image positive keeps it; empty negative -> None
    assert T(voc1.query) == ("\nRepresent the text.", None)
    assert T(voc1.positive) == (f"{PH} Represent the given image.", train_root / "images/VOC2007/b.png")
    assert voc1.negative is None
    assert T(cirr.negative) == (f"{PH} neg", train_root / "images/VOC2007/a.png")
    assert isinstance(cirr.query.image, Path) and cirr.query.image.is_file()
    # an explicit subset list and a separate image root
    only = load_mmeb_train(train_root, ["VOC2007"], image_root=train_root)
    assert [e.task for e in only] == ["VOC2007", "VOC2007"]


def test_train_moca_stringified_negative_lists(tmp_path: Path, monkeypatch):
    root = tmp_path / "hardneg"
    imgs = [png(root, f"images/MSCOCO_t2i/{i}.png", (i * 40, 0, 0)) for i in range(4)]
    rows = [
        # image negatives with empty texts borrow the positive's instruction (MoCa)
        train_row("a dog on a sofa", "", f"{PH} Represent the given image.", imgs[0],
                  "['', '', '']", str([imgs[1], imgs[2], imgs[3]])),
        # text negatives, JSON-style list
        train_row(f"{PH} caption it", imgs[0], "a dog", "", '["a cat", "a car"]', "[]"),
        # empty list: no negative
        train_row("q", "", "p", "", "[]", "[]"),
    ]
    write_parquet(root / "MSCOCO_t2i" / "train-00000-of-00001.parquet", rows)
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval must never be used"))
    first = load_mmeb_train(root, split="train", negatives="list")
    assert T(first[0].negative) == (f"{PH} Represent the given image.", root / imgs[1])
    assert T(first[1].negative) == ("a cat", None)
    assert first[2].negative is None
    auto = load_mmeb_train(root, split="train")  # "auto" detects the lists
    assert [T(e.negative) for e in auto] == [T(e.negative) for e in first]

    picks = set()
    for seed in range(12):
        ex = load_mmeb_train(root, split="train", negative_choice="random", seed=seed)
        again = load_mmeb_train(root, split="train", negative_choice="random", seed=seed)
        assert [T(e.negative) for e in ex] == [T(e.negative) for e in again]  # deterministic by seed
        picks.add(ex[0].negative.image)
    assert picks == {root / imgs[1], root / imgs[2], root / imgs[3]}


def test_parse_negative_field_modes():
    assert parse_negative_field("a [b]", "auto") == ["a [b]"]
    assert parse_negative_field("[b]", "single") == ["[b]"]
    assert parse_negative_field("['x', None]", "list") == ["x", ""]
    assert parse_negative_field(["x", "y"], "single") == ["x", "y"]
    assert parse_negative_field(None) == []
    with pytest.raises(MMEBFormatError, match="f.parquet: row 3"):
        parse_negative_field("['unclosed", "list", where="f.parquet: row 3: field 'neg_text'")
    with pytest.raises(MMEBFormatError, match="cannot parse"):
        parse_negative_field("[__import__('os').system('true')]", "auto")
    with pytest.raises(MMEBFormatError, match="expected a list"):
        parse_negative_field("{'a': 1}", "list")


def test_train_bad_inputs(train_root: Path, tmp_path: Path):
    with pytest.raises(MMEBFormatError, match="Nope.*subset directory not found"):
        load_mmeb_train(train_root, ["VOC2007", "Nope"])
    with pytest.raises(MMEBFormatError, match="directory not found"):
        load_mmeb_train(tmp_path / "absent")

    bad = tmp_path / "bad"
    write_parquet(bad / "S" / "original-0.parquet", [train_row("q", "", "p")], columns=TRAIN_FIELDS[:-1])
    with pytest.raises(MMEBFormatError, match=r"original-0.parquet: missing column\(s\) \['neg_image_path'\]"):
        load_mmeb_train(bad)

    corrupt = tmp_path / "corrupt" / "S" / "original-0.parquet"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(MMEBFormatError, match="original-0.parquet: not a readable parquet file"):
        load_mmeb_train(tmp_path / "corrupt")

    missing = tmp_path / "missing"
    png(missing, "images/ok.png")
    write_parquet(missing / "S" / "original-0.parquet", [
        train_row("q0", "images/ok.png", "p"),
        train_row("q1", "images/gone.png", "p"),
        train_row("q2", "", "p", "images/gone2.png"),
    ])
    with pytest.raises(MMEBFormatError, match=r"original-0.parquet: row 1: field 'qry_image_path'.*gone.png") as info:
        load_mmeb_train(missing)
    # and which setting moves the root (a newcomer unzipped the images elsewhere)
    assert f"relative to the image root {missing}: set data.image_root (MMEB-train) or data.eval_image_root" \
        in str(info.value)
    with pytest.warns(MMEBDataWarning, match=r"'S': skipped 2 row\(s\)"):
        kept = load_mmeb_train(missing, skip_missing=True)
    assert [e.query.text for e in kept] == ["q0"]
    assert len(load_mmeb_train(missing, check_images=False)) == 3

    misaligned = tmp_path / "misaligned"
    write_parquet(misaligned / "S" / "original-0.parquet", [train_row("q", "", "p", "", "['a', 'b']", "['x.png']")])
    with pytest.raises(MMEBFormatError, match="row 0.*2 entries but neg_image_path has 1"):
        load_mmeb_train(misaligned, check_images=False)

    empty_q = tmp_path / "emptyq"
    write_parquet(empty_q / "S" / "original-0.parquet", [train_row("  ", "", "p")])
    with pytest.raises(MMEBFormatError, match="row 0: field 'qry'.*neither text nor image"):
        load_mmeb_train(empty_q)


def make_examples(sizes: dict[str, int]) -> list[TrainExample]:
    return [TrainExample(Item(f"{t}-q{i}"), Item(f"{t}-p{i}"), task=t) for t, n in sizes.items() for i in range(n)]


def test_mix_subsets_caps_weights_and_seed():
    exs = make_examples({"A": 50, "B": 10, "C": 3})
    capped = mix_subsets(exs, max_per_subset=5, seed=1)
    assert Counter(e.task for e in capped) == {"A": 5, "B": 5, "C": 3}
    assert capped == mix_subsets(exs, max_per_subset=5, seed=1)
    assert capped != mix_subsets(exs, max_per_subset=5, seed=2)
    weighted = mix_subsets(exs, subset_weights={"A": 0.5, "B": 2.5, "C": 0.0}, seed=0)
    counts = Counter(e.task for e in weighted)
    assert counts == {"A": 25, "B": 25}
    b_items = Counter(e.query.text for e in weighted if e.task == "B")
    assert set(b_items.values()) == {2, 3}  # two full passes plus 5 distinct extras
    # the cap is the pool a weight draws from: cap 5 at weight 3 drew 15 examples from all 10 rows of B
    both = mix_subsets(exs, max_per_subset=5, subset_weights={"B": 3.0, "A": 0.6}, seed=1)
    b = Counter(e.query.text for e in both if e.task == "B")
    assert b == Counter({e.query.text: 3 for e in capped if e.task == "B"})
    a = {e.query.text for e in both if e.task == "A"}
    assert len(a) == 3 and a < {e.query.text for e in capped if e.task == "A"}
    assert mix_subsets(exs, max_per_subset=0, subset_weights={"B": 3.0}) == []
    with pytest.raises(ValueError, match="unknown subset"):
        mix_subsets(exs, subset_weights={"D": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        mix_subsets(exs, subset_weights={"A": -1.0})


def test_caps_through_loader(train_root: Path):
    exs = load_mmeb_train(train_root, max_per_subset=1, subset_weights={"CIRR": 2.0})
    assert Counter(e.task for e in exs) == {"CIRR": 2, "VOC2007": 1}


def test_held_out_split_per_subset():
    exs = make_examples({"A": 1000, "B": 150, "C": 2, "D": 1})
    train, val = held_out_split(exs, fraction=0.01, seed=3)
    assert Counter(e.task for e in val) == {"A": 10, "B": 2, "C": 1}
    assert len(train) + len(val) == len(exs)
    assert {id(e) for e in train}.isdisjoint(id(e) for e in val)
    assert [e for e in exs if e in val] == val  # original order kept
    assert held_out_split(exs, 0.01, seed=3) == (train, val)
    assert held_out_split(exs, 0.01, seed=4)[1] != val
    assert held_out_split(exs, 0.0) == (exs, [])
    with pytest.raises(ValueError):
        held_out_split(exs, 1.0)


def eval_row(qtext, qimg, texts, imgs):
    return dict(zip(EVAL_FIELDS, (qtext, qimg, texts, imgs)))


def test_eval_round_trip(tmp_path: Path):
    root = tmp_path / "MMEB-eval"
    imgs = tmp_path / "eval_images"
    q = png(imgs, "ImageNet-1K/q.png")
    c1 = png(imgs, "MSCOCO_t2i/c1.png")
    c2 = png(imgs, "MSCOCO_t2i/c2.png")
    write_parquet(root / "ImageNet-1K" / "test-00000-of-00001.parquet", [
        eval_row(f"{PH} Represent the given image for classification", q, ["tench", "goldfish", "tench"], ["", "", ""]),
    ])
    write_parquet(root / "MSCOCO_t2i" / "test-00000-of-00001.parquet", [
        eval_row("Find me an everyday image that matches the given caption: a dog.", "",
                 [f"{PH} Represent the given image.", f"{PH} Represent the given image."], [c1, c2]),
        eval_row(f"{PH} no image here", "", ["a", "b"], ["", ""]),
    ])
    tasks = load_mmeb_eval(root, image_root=imgs)
    assert [t.name for t in tasks] == ["ImageNet-1K", "MSCOCO_t2i"]  # MMEB table order
    inet, coco = tasks
    assert (inet.meta_task, inet.split) == ("classification", "ind")
    assert (coco.meta_task, coco.split) == ("retrieval", "ind")
    (iq,) = inet.queries
    assert iq.query.text == f"{PH} Represent the given image for classification"
    assert iq.query.image == imgs / q
    assert [c.text for c in iq.candidates] == ["tench", "goldfish", "tench"]
    assert all(c.image is None for c in iq.candidates)
    # identical candidates share a uid (VLM2Vec encodes each (text, img_path) once)
    assert iq.candidates[0].uid == iq.candidates[2].uid != iq.candidates[1].uid
    assert iq.query.uid != iq.candidates[0].uid
    cq0, cq1 = coco.queries
    assert T(cq0.query) == ("Find me an everyday image that matches the given caption: a dog.", None)
    assert [c.image for c in cq0.candidates] == [imgs / c1, imgs / c2]  # positive first
    assert cq0.candidates[0].text == f"{PH} Represent the given image."
    assert cq0.candidates[0].uid != cq0.candidates[1].uid
    assert cq1.query.text == " no image here"  # only the placeholder goes (MoCa's EvalDataset)
    assert cq0.qid != cq1.qid
    assert len(load_mmeb_eval(root, ["MSCOCO_t2i"], image_root=imgs, max_queries=1)[0].queries) == 1
    # an image replaced on disk gets a new uid (a uid-keyed embedding cache must not serve the old one)
    st = (imgs / c1).stat()
    png(imgs, c1, color=(0, 0, 255))
    os.utime(imgs / c1, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_mmeb_eval(root, ["MSCOCO_t2i"], image_root=imgs)[0].queries[0]
    assert again.candidates[0].uid != cq0.candidates[0].uid
    assert again.candidates[1].uid == cq0.candidates[1].uid and again.query.uid == cq0.query.uid


def test_eval_bad_inputs(tmp_path: Path):
    root = tmp_path / "ev"
    write_parquet(root / "VizWiz" / "test-0.parquet", [eval_row("q", "", [], [])])
    with pytest.raises(MMEBFormatError, match=r"test-0.parquet: row 0: field 'tgt_text'.*empty candidate list"):
        load_mmeb_eval(root)
    write_parquet(root / "VizWiz" / "test-0.parquet", [eval_row("q", "", ["a"], ["x/missing.png"])])
    with pytest.raises(MMEBFormatError, match=r"row 0: field 'tgt_img_path'.*missing.png"):
        load_mmeb_eval(root)
    write_parquet(root / "VizWiz" / "test-0.parquet", [eval_row("q", "", ["a", "b"], [""])])
    with pytest.raises(MMEBFormatError, match="1 image paths for 2 candidate texts"):
        load_mmeb_eval(root)
    write_parquet(root / "VizWiz" / "test-0.parquet", [eval_row("q", "", ["a"], [""])], columns=EVAL_FIELDS[:3])
    with pytest.raises(MMEBFormatError, match=r"missing column\(s\) \['tgt_img_path'\]"):
        load_mmeb_eval(root)
    with pytest.raises(MMEBFormatError, match="GQA: task directory not found"):
        load_mmeb_eval(root, ["GQA"])
    with pytest.raises(MMEBFormatError, match="unknown MMEB task 'Foo'"):
        load_mmeb_eval(root, ["Foo"])
    (root / "TextVQA").mkdir()
    with pytest.raises(MMEBFormatError, match="no 'test-\\*.parquet' file"):
        load_mmeb_eval(root, ["TextVQA"])


def test_held_out_split_after_upsampling_never_leaks():
    # subset_weights > 1 repeats examples (mix_subsets); a repeated example must not land in both halves
    exs = mix_subsets(make_examples({"A": 40, "B": 30}), subset_weights={"A": 2.5, "B": 3.0}, seed=0)
    for seed in range(20):
        train, val = held_out_split(exs, fraction=0.05, seed=seed)
        assert val and len(train) + len(val) == len(exs)
        assert {id(e) for e in train}.isdisjoint(id(e) for e in val)
        assert {e.task for e in val} == {"A", "B"}


def test_rows_repeated_in_the_source_file_stay_on_one_side_of_the_held_out_split(tmp_path: Path):
    # a row the parquet holds twice is two objects of equal content: one copy in validation and one in
    # training made the validation loss (early stopping, Appendix A) score examples the model trained on
    root = tmp_path / "dups"
    img = png(root, "images/S/a.png")
    rows = [train_row(f"{PH} q{i % 5}", img, f"p{i % 5}", "", f"n{i % 5}", "") for i in range(200)]
    rows += [train_row(f"q{i}", "", f"p{i}") for i in range(100)]  # distinct rows
    write_parquet(root / "S" / "original-0.parquet", rows)
    exs = load_mmeb_train(root)

    def content(e):
        return T(e.query), T(e.positive), T(e.negative)

    for seed in range(10):
        train, val = held_out_split(exs, fraction=0.05, seed=seed)
        assert val and len(train) + len(val) == len(exs)
        assert {content(e) for e in train}.isdisjoint(content(e) for e in val), f"seed {seed}"
    # equal pixels count as equal content, distinct pixels do not
    red = [TrainExample(Item("x", Image.new("RGB", (4, 4), "red")), Item("y"), task="S") for _ in range(30)]
    other = [TrainExample(Item("x", Image.new("RGB", (4, 4), (i, 0, 0))), Item("y"), task="S") for i in range(30)]
    train, val = held_out_split(red + other, fraction=0.1, seed=0)
    assert len(val) in (3, 32) and sum(e in val for e in red) in (0, 30)


def test_a_random_negative_keeps_copies_of_a_row_together(tmp_path: Path):
    """negative_choice='random' was seeded by file and row number: a row held twice (in one file or two) got
    different negatives, its copies were no longer equal, and held_out_split put 81 of them on both sides over
    10 seeds (a review helper).  The pick is seeded by the row's content: copies keep one negative."""
    root = tmp_path / "moca"
    rows = [train_row(f"q{i}", "", f"p{i}", "", json.dumps([f"n{i}-{j}" for j in range(4)]), "") for i in range(60)]
    write_parquet(root / "S" / "train-0.parquet", rows + rows)  # every row twice in one file
    write_parquet(root / "S" / "train-1.parquet", rows[:20])  # and a third time in another
    exs = load_mmeb_train(root, split="train", negatives="list", negative_choice="random", seed=3)
    negs: dict = {}
    for e in exs:
        negs.setdefault(e.query.text, set()).add(e.negative.text)
    assert all(len(n) == 1 for n in negs.values())
    assert len({n for s in negs.values() for n in s if n.endswith("-0")}) < 60  # random, not always the first

    def content(e):
        return T(e.query), T(e.positive), T(e.negative)

    for seed in range(10):
        train, val = held_out_split(exs, fraction=0.05, seed=seed)
        assert {content(e) for e in train}.isdisjoint(content(e) for e in val), f"seed {seed}"


def test_a_pair_with_several_negatives_stays_on_one_side_of_the_held_out_split():
    """Copies were matched on query, positive *and* negative: a pair seen with several hard negatives (the
    quickstart's Cls-Object queries, about 28 negatives each) was held out once and trained on in its other
    copies -- every Cls-Object validation example of the quickstart was a trained pair (a review helper)."""
    from metaembed.data.records import item_key
    from metaembed.data.synthetic import make_benchmark

    def pair(e):
        return item_key(e.query), item_key(e.positive)

    exs = [TrainExample(Item(f"q{i}"), Item(f"p{i}"), Item(f"n{i}-{j}"), task="S") for i in range(40) for j in range(5)]
    for seed in range(5):
        train, val = held_out_split(exs, fraction=0.1, seed=seed)
        assert len(val) == 4 * 5 and {pair(e) for e in train}.isdisjoint(pair(e) for e in val), f"seed {seed}"
    bm = make_benchmark(n_train=4000, n_eval_queries=8, seed=0)
    train, val = held_out_split(bm.train, 0.01, 0)
    assert val and {pair(e) for e in train}.isdisjoint(pair(e) for e in val)


def test_placeholder_only_or_blank_items_are_errors_not_empty_items(tmp_path: Path):
    """``<|image_1|>`` without an image is removed, so such a text is empty: never an ``Item("")`` in the loss."""
    for i, (row, field) in enumerate([
        (train_row(PH, "", "p"), "qry"),
        (train_row("q", "", f" {PH} "), "pos_text"),
    ]):
        root = tmp_path / f"t{i}"
        write_parquet(root / "S" / "original-0.parquet", [row])
        with pytest.raises(MMEBFormatError, match=f"row 0: field '{field}'.*neither text nor image"):
            load_mmeb_train(root)
    root = tmp_path / "negs"
    write_parquet(root / "S" / "original-0.parquet", [
        train_row("q", "", "p", "", "   ", ""),
        train_row("q", "", "p", "", PH, ""),
        train_row("q", "", "p", "", f"['  ', '{PH}', 'real']", "['', '', '']"),
    ])
    assert [T(e.negative) for e in load_mmeb_train(root)] == [None, None, ("real", None)]
    for i, row in enumerate([eval_row(PH, "", ["a"], [""]), eval_row("q", "", ["a", PH], ["", ""])]):
        root = tmp_path / f"e{i}"
        write_parquet(root / "VizWiz" / "test-0.parquet", [row])
        with pytest.raises(MMEBFormatError, match="row 0: field '(qry_text|tgt_text)'.*neither text nor image"):
            load_mmeb_eval(root)


def test_subset_named_twice_is_rejected(train_root: Path):
    # two copies of every row would straddle the validation split
    with pytest.raises(MMEBFormatError, match=r"\['VOC2007'\] named more than once"):
        load_mmeb_train(train_root, ["VOC2007", "CIRR", "VOC2007"])


def test_held_out_split_is_the_split_training_uses():
    from metaembed.training import split_train_val

    exs = mix_subsets(make_examples({"A": 250, "B": 150, "C": 7}), subset_weights={"B": 2.0}, seed=0)
    for seed in range(5):
        for fraction in (0.01, 0.05, 0.3):
            mine, theirs = held_out_split(exs, fraction, seed), split_train_val(exs, fraction, seed)
            assert [[id(e) for e in half] for half in mine] == [[id(e) for e in half] for half in theirs]


def test_negative_lists_that_python_would_merge_or_cannot_parse():
    # a missing comma: literal_eval would join the two strings into one negative
    for cell in ("['hard neg one' 'hard neg two']", '["a" "b"]', "['a',\n 'b' 'c']"):
        with pytest.raises(MMEBFormatError, match="cannot parse"):
            parse_negative_field(cell, "list", where="f.parquet: row 0: field 'neg_text'")
    assert parse_negative_field("['a',\n 'b']", "list") == ["a", "b"]
    assert parse_negative_field('["it\'s", "x [1]"]', "list") == ["it's", "x [1]"]
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(MMEBFormatError, match="f.parquet: row 7.*cannot parse"):
        parse_negative_field(deep, "list", where="f.parquet: row 7: field 'neg_text'")


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_eval_max_queries_must_be_positive(tmp_path: Path, bad):
    root = tmp_path / "ev"
    write_parquet(root / "VizWiz" / "test-0.parquet", [eval_row("q", "", ["a"], [""])])
    with pytest.raises(ValueError, match="max_queries must be a positive integer"):
        load_mmeb_eval(root, max_queries=bad)



def test_data_config_reaches_the_loaders(tmp_path: Path):
    """`data.negatives`, `negative_choice`, `skip_missing` and `check_images` are honoured by load_benchmark."""
    from metaembed.config import DataConfig
    from metaembed.pipeline import load_benchmark

    root = tmp_path / "train"
    write_parquet(root / "S" / "original-0.parquet", [
        train_row("q0", "", "p", "", "['a', 'b', 'c']", "['', '', '']"),
        train_row("q1", "images/gone.png", "p"),
    ])
    cfg = DataConfig(source="mmeb", path=str(root), skip_missing=True)
    with pytest.warns(MMEBDataWarning, match="skipped 1 row"):
        (ex,) = load_benchmark(cfg).train
    assert ex.negative.text == "a"
    assert len(load_benchmark(DataConfig(source="mmeb", path=str(root), check_images=False)).train) == 2
    single = load_benchmark(DataConfig(source="mmeb", path=str(root), negatives="single", check_images=False))
    assert single.train[0].negative.text == "['a', 'b', 'c']"
    picks = {load_benchmark(DataConfig(source="mmeb", path=str(root), negative_choice="random", seed=s,
                                       check_images=False)).train[0].negative.text for s in range(10)}
    assert picks == {"a", "b", "c"}
    with pytest.raises(MMEBFormatError, match="row 1: field 'qry_image_path'"):
        load_benchmark(DataConfig(source="mmeb", path=str(root)))


def test_load_benchmark_reports_hard_negative_coverage(tmp_path: Path, caplog):
    """Hard negatives that the data does not have must not go unnoticed (the loss silently uses in-batch only)."""
    from metaembed.config import DataConfig
    from metaembed.pipeline import load_benchmark

    root = tmp_path / "train"
    write_parquet(root / "S" / "original-0.parquet", [train_row("q0", "", "p0", ""), train_row("q1", "", "p1", "")])
    with caplog.at_level("INFO", logger="metaembed.pipeline"):
        load_benchmark(DataConfig(source="mmeb", path=str(root), check_images=False))
    assert "0 of 2 training triples carry a hard negative" in caplog.text
    assert any(r.levelname == "WARNING" and "data.split=train" in r.getMessage() for r in caplog.records)
    caplog.clear()
    write_parquet(root / "S" / "original-0.parquet", [train_row("q0", "", "p0", "", "n0", "")])
    with caplog.at_level("INFO", logger="metaembed.pipeline"):
        load_benchmark(DataConfig(source="mmeb", path=str(root), check_images=False))
    assert "1 of 1 training triples" in caplog.text and not any(r.levelname == "WARNING" for r in caplog.records)


def test_partial_eval_folder_warns_and_names_stray_task_folders(tmp_path: Path):
    """A misnamed task folder must not silently drop a meta-task from 'Overall'."""
    root = tmp_path / "ev"
    write_parquet(root / "VizWiz" / "test-0.parquet", [eval_row("q", "", ["a", "b"], ["", ""])])
    write_parquet(root / "MSCOCO-t2i" / "test-0.parquet", [eval_row("q", "", ["a", "b"], ["", ""])])
    (root / "eval_images").mkdir()  # an image folder is not a stray task
    with pytest.warns(MMEBDataWarning, match=r"loading 1 of the 36 .*ignored\): \['MSCOCO-t2i'\]"):
        assert [t.name for t in load_mmeb_eval(root)] == ["VizWiz"]
    (root / "VizWiz" / "test-0.parquet").unlink()
    (root / "VizWiz").rmdir()
    with pytest.raises(MMEBFormatError, match=r"none of the 36 .*\['MSCOCO-t2i'\]"):
        load_mmeb_eval(root)


def test_mmeb_sizes_sample_training_triples_and_cap_eval_queries(tmp_path: Path, caplog):
    """`data.max_train` keeps a data.seed-seeded sample, `data.max_eval_queries` the first N queries of each
    task, `data.eval_image_root` roots the MMEB-eval images; None (the default) is all of them.  The
    synthetic sizes n_train / n_eval_queries, which older saved configs spell 512 / 40, cap nothing."""
    from metaembed.config import DataConfig
    from metaembed.pipeline import load_benchmark

    assert DataConfig().max_train is None and DataConfig().max_eval_queries is None
    root = tmp_path / "train"
    write_parquet(root / "S" / "original-0.parquet", [train_row(f"q{i}", "", f"p{i}") for i in range(20)])
    ev, imgs = tmp_path / "eval", tmp_path / "eval_images"
    write_parquet(ev / "ImageNet-1K" / "test-0.parquet",
                  [eval_row(f"{PH} c{i}", png(imgs, f"i{i}.png"), ["a", "b"], ["", ""]) for i in range(5)])
    base = dict(source="mmeb", path=str(root), eval_path=str(ev), eval_image_root=str(imgs))

    def load(**kw):
        with pytest.warns(MMEBDataWarning, match="loading 1 of the 36"):
            return load_benchmark(DataConfig(**{**base, **kw}))

    full = load()
    assert [ex.query.text for ex in full.train] == [f"q{i}" for i in range(20)]
    assert len(full.eval_tasks[0].queries) == 5 and full.eval_tasks[0].queries[0].query.image == imgs / "i0.png"
    picks = [[ex.query.text for ex in load(max_train=6, seed=s).train] for s in (0, 0, 1)]
    assert picks[0] == picks[1] != picks[2] and len(picks[0]) == 6 and len(set(picks[0])) == 6
    assert picks[0] == sorted(picks[0], key=lambda t: int(t[1:]))  # file order kept
    capped = load(max_eval_queries=2)
    assert [q.query.text for q in capped.eval_tasks[0].queries] == [f"{PH} c0", f"{PH} c1"]
    assert len(capped.train) == 20
    with caplog.at_level("WARNING", logger="metaembed.pipeline"):
        assert len(load(max_train=50).train) == 20
    assert "data.max_train=50 but" in caplog.text and "using all of them" in caplog.text
    old_style = load(n_train=2, n_eval_queries=1)  # a run config saved before max_* existed
    assert len(old_style.train) == 20 and len(old_style.eval_tasks[0].queries) == 5
    with pytest.raises(ValueError, match="data.max_eval_queries must be >= 1"):
        load_benchmark(DataConfig(**{**base, "max_eval_queries": 0}))


def test_notebook_sizes_are_synthetic_only_and_mmeb_caps_go_through_overrides():
    """n_train / n_eval_queries = None keep the synthetic base's sizes; MMEB is capped by overrides."""
    from metaembed import ablations

    syn = ablations.config_from_params(n_train=None, n_eval_queries=None, n_candidates=None)
    assert (syn.data.n_train, syn.data.n_eval_queries) == (32000, 48)  # the packaged quickstart base
    quick = ablations.config_from_params(data_source="mmeb", data_path="d", max_steps=20,
                                         overrides={"data.max_train": 2000, "data.max_eval_queries": 100})
    assert (quick.data.max_train, quick.data.max_eval_queries) == (2000, 100)


def _damage_row_group(path: Path, group: int) -> None:
    """Overwrite the first page header of row group ``group``: the footer still reads, that group does not."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(0)
    off = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    data[off : off + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def test_parquet_damaged_past_its_footer_is_a_format_error_naming_the_file(tmp_path: Path):
    """A truncated download or bad sector inside the data (not the footer) fails mid-read: an MMEBFormatError
    naming the file, not a bare OSError('Couldn't deserialize thrift') without a path."""
    path = tmp_path / "tr" / "VOC2007" / "original-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({f: [f"{f} {i}" for i in range(8)] for f in TRAIN_FIELDS}), path, row_group_size=4)
    _damage_row_group(path, 1)
    with pytest.raises(MMEBFormatError, match="original-00000-of-00001.parquet: unreadable parquet data"):
        load_mmeb_train(tmp_path / "tr", check_images=False)
    path = tmp_path / "ev" / "N24News" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"qry_text": [f"q {i}" for i in range(8)], "qry_img_path": [""] * 8,
                             "tgt_text": [["a", "b"]] * 8, "tgt_img_path": [["", ""]] * 8}), path, row_group_size=4)
    _damage_row_group(path, 1)
    with pytest.raises(MMEBFormatError, match="test-00000-of-00001.parquet: unreadable parquet data"):
        load_mmeb_eval(tmp_path / "ev", check_images=False)


def test_eval_task_list_empty_or_repeated_is_an_error(tmp_path: Path):
    """A task named twice weighed double in the meta-task / IND / OOD / Overall means (and the summary then
    refused it after the whole evaluation); an empty list loaded nothing and the evaluation failed late."""
    write_parquet(tmp_path / "N24News" / "test-00000-of-00001.parquet",
                  [dict(zip(EVAL_FIELDS, ("q", "", ["a", "b"], ["", ""])))])
    assert [t.name for t in load_mmeb_eval(tmp_path, ["N24News"])] == ["N24News"]
    with pytest.raises(MMEBFormatError, match=r"task\(s\) \['N24News'\] named more than once"):
        load_mmeb_eval(tmp_path, ["N24News", "N24News"])
    with pytest.raises(MMEBFormatError, match="empty task list"):
        load_mmeb_eval(tmp_path, [])


def test_held_out_split_of_a_subset_ignores_the_other_subsets():
    # Appendix A's 1% of *each* subset: adding, dropping, capping or re-weighting subset A must not change
    # which B examples are held out (one generator shared by all subsets made B's split depend on A's size)
    exs = make_examples({"A": 1000, "B": 300})
    only_b = [e for e in exs if e.task == "B"]
    for seed in range(3):
        def b_val(examples):
            return [e.query.text for e in held_out_split(examples, 0.01, seed)[1] if e.task == "B"]
        ref = b_val(exs)
        assert len(ref) == 3
        assert b_val(only_b) == ref
        assert b_val(mix_subsets(exs, max_per_subset=500, seed=seed)) == ref
        assert b_val(mix_subsets(exs, subset_weights={"A": 0.3}, seed=seed)) == ref
        assert b_val(make_examples({"B": 300, "A": 1000})) == ref  # subset order
        assert b_val(make_examples({"A0": 7, "A": 1000, "B": 300})) == ref


def test_empty_subset_or_subsets_as_one_string_are_clear_errors(train_root: Path):
    # an empty subset silently contributed nothing (and a weight for it said "unknown subset")
    empty = pa.table({c: pa.array([], pa.string()) for c in TRAIN_FIELDS})
    (train_root / "NIGHTS").mkdir()
    pq.write_table(empty, train_root / "NIGHTS" / "original-00000-of-00001.parquet")
    for subsets in (None, ["VOC2007", "NIGHTS"]):
        with pytest.raises(MMEBFormatError, match=r"NIGHTS: subset has no rows in \['original-00000-of-00001"):
            load_mmeb_train(train_root, subsets)
    # `subsets: VOC2007` in YAML is a string: it was read as the subsets "V", "O", "C", ...
    with pytest.raises(ValueError, match="subsets must be a list.*'VOC2007'"):
        load_mmeb_train(train_root, "VOC2007")


def test_eval_uid_is_that_of_the_item_after_the_placeholder_is_dropped(tmp_path: Path):
    """``"<|image_1|> yes"`` without an image becomes the item ``" yes"`` (only the placeholder goes, as in
    MoCa's EvalDataset), but its uid hashed the raw cell: two identical candidates had two uids
    (encoded apart, so not bit-identical: a tie with the positive could go either way)."""
    write_parquet(tmp_path / "VizWiz" / "test-00000-of-00001.parquet", [
        eval_row(f"{PH} Is it blue?", "", [" yes", f"{PH} yes", "yes", "no"], ["", "", "", ""]),
        eval_row(" Is it blue?", "", [" yes", "no"], ["", ""]),
    ])
    q0, q1 = load_mmeb_eval(tmp_path, ["VizWiz"])[0].queries
    assert [c.text for c in q0.candidates] == [" yes", " yes", "yes", "no"]
    assert q0.candidates[0].uid == q0.candidates[1].uid == q1.candidates[0].uid != q0.candidates[2].uid
    assert q0.candidates[2].uid != q0.candidates[3].uid
    assert q0.query.text == q1.query.text and q0.query.uid == q1.query.uid


def test_eval_tasks_as_one_string_is_a_clear_error(tmp_path: Path):
    # `eval_tasks: VizWiz` in YAML is a string: it was read as the tasks "V", "i", "z", ... and reported as
    # "task(s) ['i', 'z'] named more than once" (or "unknown MMEB task 'G'" for "GQA")
    write_parquet(tmp_path / "VizWiz" / "test-00000-of-00001.parquet", [eval_row("q", "", ["a"], [""])])
    for name in ("VizWiz", "GQA"):
        with pytest.raises(ValueError, match=rf"tasks must be a list of MMEB task names.*'{name}'"):
            load_mmeb_eval(tmp_path, name)


def test_json_written_negative_lists_are_read_as_json():
    # json.dumps writes an emoji as a surrogate pair and may escape "/": ast.literal_eval read the pair as two
    # lone surrogates (UnicodeEncodeError when the text was hashed) and "\/" as a backslash and a slash
    import json

    negs = ["a \U0001F600 face", "images/MSCOCO_t2i/x.jpg", "caf\u00e9 \"quoted\""]
    assert parse_negative_field(json.dumps(negs), "list") == negs
    assert parse_negative_field('["images\\/MSCOCO_t2i\\/x.jpg"]', "auto") == ["images/MSCOCO_t2i/x.jpg"]
    # str(list), the MoCa cells, reads as before (single quotes, \x / \U escapes, backslashes)
    py = ["it's", 'say "hi"', "tab\there", "back\\slash", "\x85", "\U000e0001", "\U0001F600"]
    assert parse_negative_field(str(py), "list") == py


def test_eval_candidates_repeated_across_queries_are_built_once(tmp_path: Path, monkeypatch):
    """MMEB-eval lists up to 1000 candidates per query, repeated across queries: one Item (stat, stamp and
    hash) per candidate cell took ~0.9 KB and ~37 us each, tens of GB for the 36 tasks."""
    import metaembed.data.mmeb as mmeb

    imgs = tmp_path / "img"
    paths = [png(imgs, f"MSCOCO_t2i/{i}.png", (i * 60, 0, 0)) for i in range(3)]
    cand = f"{PH} Represent the given image."
    write_parquet(tmp_path / "ev" / "MSCOCO_t2i" / "test-00000-of-00001.parquet", [
        eval_row(f"caption {i}", "", [cand] * 3, paths[i:] + paths[:i]) for i in range(3)])
    write_parquet(tmp_path / "ev" / "VisualNews_t2i" / "test-00000-of-00001.parquet", [
        eval_row("caption 0", "", [cand, cand], paths[:2])])
    stamped: list[Path] = []
    real = mmeb.file_stamp
    monkeypatch.setattr(mmeb, "file_stamp", lambda p: stamped.append(p) or real(p))
    coco, news = load_mmeb_eval(tmp_path / "ev", ["MSCOCO_t2i", "VisualNews_t2i"], image_root=imgs)
    assert sorted(stamped) == sorted(imgs / p for p in paths)  # each distinct image once, across tasks
    by_path = {c.image: c for c in coco.queries[0].candidates}
    assert all(c is by_path[c.image] for q in coco.queries + news.queries for c in q.candidates)
    assert [c.image for c in coco.queries[1].candidates] == [imgs / p for p in paths[1:] + paths[:1]]
    assert all(c.text == cand for c in by_path.values()) and len({c.uid for c in by_path.values()}) == 3
    assert news.queries[0].query is coco.queries[0].query  # same (text, image) query: one item
    # a cell seen before does not hide a new missing image: the error still names its row
    write_parquet(tmp_path / "ev2" / "MSCOCO_t2i" / "test-00000-of-00001.parquet", [
        eval_row("c0", "", [cand], paths[:1]), eval_row("c1", "", [cand, cand], [paths[0], "gone.png"])])
    with pytest.raises(MMEBFormatError, match=r"row 1: field 'tgt_img_path'.*gone.png"):
        load_mmeb_eval(tmp_path / "ev2", ["MSCOCO_t2i"], image_root=imgs)


def test_train_folder_lacking_some_mmeb_subsets_warns(train_root: Path, tmp_path: Path):
    """A download missing subsets (or a subset folder without original-*.parquet) silently trained on another
    mixture; MMEB-eval warned in the same case."""
    (train_root / "NIGHTS").mkdir()  # a subset folder without files of this split
    with pytest.warns(MMEBDataWarning, match=r"loading 2 of the 20 MMEB-train subsets; missing .*'NIGHTS'"):
        assert {e.task for e in load_mmeb_train(train_root)} == {"CIRR", "VOC2007"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_mmeb_train(train_root, ["CIRR", "VOC2007"])  # named subsets: what was asked for
        other = tmp_path / "other"  # folders that are not MMEB-train subsets: nothing to compare with
        write_parquet(other / "S" / "original-0.parquet", [train_row("q", "", "p")])
        assert len(load_mmeb_train(other)) == 1


def test_train_folder_with_subsets_beyond_mmeb_train_warns(tmp_path: Path):
    """The hard-negative release (intfloat/mmE5-MMEB-hardneg) holds MMEB-train's 20 subsets plus TAT-DQA, ArxivQA,
    InfoSeek_it2t and InfoSeek_it2it; without data.subsets all 24 were trained on without a word (the paper
    trains on MMEB-train's 20).  Named subsets, and a folder holding none of the 20, do not warn."""
    root = tmp_path / "hardneg"
    for subset in ("VOC2007", "CIRR", "TAT-DQA", "ArxivQA"):
        write_parquet(root / subset / "train-0.parquet", [train_row(f"q {subset}", "", "p")])
    with pytest.warns(MMEBDataWarning) as record:
        assert len(load_mmeb_train(root, split="train")) == 4
    (extra,) = [str(w.message) for w in record if "not among the 20" in str(w.message)]
    assert "2 subset folder(s)" in extra and "['ArxivQA', 'TAT-DQA']" in extra and "data.subsets" in extra
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_mmeb_train(root, ["VOC2007", "CIRR"], split="train")) == 2


# ---------------------------------------------------------------------------------------------
# mutation testing of the readers (helper 91): each test below kills mutants that the tests above let through


def test_train_cells_keep_their_text_and_bad_cells_name_their_field(tmp_path: Path):
    """Only the placeholder of an image-less item is removed (the text around it kept as written, as MoCa's
    loader does); a text without it is kept as written; a null or non-string ``qry`` and a missing positive or negative image name their field."""
    root = tmp_path / "t"
    write_parquet(root / "S" / "original-0.parquet", [train_row("  q ", "", " p  ", "", f"{PH} a cat", "")])
    (ex,) = load_mmeb_train(root)
    assert (T(ex.query), T(ex.positive), T(ex.negative)) == (("  q ", None), (" p  ", None), (" a cat", None))
    for i, (rows, field, what) in enumerate([
        ([train_row(None, "", "p")], "qry", "expected a string, got NoneType"),  # not an empty (image-only) query
        ([train_row(None, "images/a.png", "p")], "qry", "expected a string, got NoneType"),
        ([dict(train_row("q", "", "p"), pos_text=7)], "pos_text", "expected a string, got int"),
        ([train_row("q", "", "", "images/gone.png")], "pos_image_path", "gone.png"),
        ([train_row("q", "", "p", "", "", "images/gone.png")], "neg_image_path", "gone.png"),
    ]):
        bad = tmp_path / f"b{i}"
        png(bad, "images/a.png")
        cols = {c: pa.array([r[c] for r in rows], pa.int64() if c == "pos_text" and i == 2 else pa.string())
                for c in TRAIN_FIELDS}
        bad.joinpath("S").mkdir(parents=True)
        pq.write_table(pa.table(cols), bad / "S" / "original-0.parquet")
        with pytest.raises(MMEBFormatError, match=rf"original-0.parquet: row 0: field '{field}'.*{what}"):
            load_mmeb_train(bad)
    # a missing negative image is a missing image like the others: skipped and counted with skip_missing
    with pytest.warns(MMEBDataWarning, match=r"skipped 1 row\(s\).*field 'neg_image_path'"):
        assert load_mmeb_train(tmp_path / "b4", skip_missing=True) == []


def test_train_image_root_and_bare_split_file(tmp_path: Path):
    """``image_root`` roots the image paths (default: the data root); ``original.parquet`` (no shard suffix)
    is read, a file of another split whose name starts with the split name is not."""
    root, imgs = tmp_path / "data", tmp_path / "imgs"
    a = png(imgs, "images/S/a.png")
    write_parquet(root / "S" / "original.parquet", [train_row(f"{PH} q", a, "p")])
    write_parquet(root / "S" / "original_old.parquet", [train_row("stale", "", "p")])
    (ex,) = load_mmeb_train(root, image_root=imgs)
    assert T(ex.query) == (f"{PH} q", imgs / a)
    with pytest.raises(MMEBFormatError, match="row 0: field 'qry_image_path'.*a.png"):
        load_mmeb_train(root)


def test_negative_text_and_image_lists_of_different_lengths(tmp_path: Path):
    """One empty cell stands for "no text" / "no image" beside a list; any other length mismatch is an error
    (a single *non-empty* text beside several images must not be dropped)."""
    def negative(i, text, image, negatives="auto"):
        root = tmp_path / f"n{i}"
        write_parquet(root / "S" / "original-0.parquet", [train_row("q", "", "p", "pos.png", text, image)])
        return T(load_mmeb_train(root, check_images=False, negatives=negatives)[0].negative)

    assert negative(0, "", "['a.png', 'b.png']") == ("p", tmp_path / "n0" / "a.png")  # text borrowed (MoCa)
    assert negative(1, "['x', 'y']", "") == ("x", None)
    # the same cells with negatives='list' (the MoCa release's setting) failed: '' is not a stringified list
    assert negative(4, " ", "['a.png', 'b.png']", "list") == ("p", tmp_path / "n4" / "a.png")
    assert negative(5, "['x', 'y']", "", "list") == ("x", None)
    assert negative(6, "['x', 'y']", "[' ', 'b.png']", "list") == ("x", None)  # a blank path is no image
    with pytest.raises(MMEBFormatError, match="row 0.*neg_text has 1 entries but neg_image_path has 2"):
        negative(2, "x", "['a.png', 'b.png']")
    with pytest.raises(MMEBFormatError, match="row 0.*neg_text has 2 entries but neg_image_path has 1"):
        negative(3, "['x', 'y']", "a.png")


def test_parse_negative_field_edge_cells():
    import numpy as np

    assert parse_negative_field("[draft] notes", "auto") == ["[draft] notes"]  # starts with "[" only: text
    assert parse_negative_field("[draft", "auto") == ["[draft"]
    assert parse_negative_field(np.array(["x", "y"]), "auto") == ["x", "y"]  # a pandas / numpy list cell
    with pytest.raises(MMEBFormatError, match="w: list element 1 is not a string"):
        parse_negative_field("['a', 1]", "list", where="w")
    # found by fuzzing (a review helper): the error message itself raised ValueError for an int of over 4,300
    # digits (repr refuses it), and quoted a megabyte-long element whole
    with pytest.raises(MMEBFormatError, match=r"w: list element <int of 16000 bits> is not a string"):
        parse_negative_field("[0x" + "f" * 4000 + "]", "list", where="w")
    with pytest.raises(MMEBFormatError) as long:
        parse_negative_field("[['a', " + "'b', " * 10**5 + "]]", "auto", where="w")
    assert str(long.value) == "w: list element ['a', 'b', 'b', 'b', 'b', 'b', ...] is not a string"


def test_moca_negatives_image_only_text_and_random_pick_per_row(tmp_path: Path):
    """An image-only negative borrows the positive's text only when the positive has an image (MoCa); a text
    negative without an image loses its placeholder; the seeded random pick is drawn per row."""
    root = tmp_path / "hn"
    imgs = [png(root, f"images/S/{i}.png", (i * 40, 0, 0)) for i in range(3)]
    rows = [
        train_row("q", "", "a dog", "", "['', '']", str(imgs[1:])),  # text-only positive: nothing to borrow
        train_row(f"{PH} q", imgs[0], "p", "", f"['{PH} a cat', 'x']", "['', '']"),
    ]
    rows += [train_row(f"q{i}", "", f"p{i}", "", "['n0', 'n1', 'n2', 'n3']", "") for i in range(16)]
    write_parquet(root / "S" / "train-0.parquet", rows)
    exs = load_mmeb_train(root, split="train")
    assert T(exs[0].negative) == ("", root / imgs[1])
    assert T(exs[1].negative) == (" a cat", None)
    for seed in range(3):
        picks = [e.negative.text for e in load_mmeb_train(root, split="train", negative_choice="random", seed=seed)[2:]]
        assert len(set(picks)) > 1, picks  # one generator per row, not one pick for the whole file


def test_loader_caps_weights_and_subset_list(train_root: Path):
    both = ["CIRR", "VOC2007"]
    assert Counter(e.task for e in load_mmeb_train(train_root, both, max_per_subset=1)) == {"CIRR": 1, "VOC2007": 1}
    assert Counter(e.task for e in load_mmeb_train(train_root, both, subset_weights={"VOC2007": 0.5})) == {
        "CIRR": 1, "VOC2007": 1}
    with pytest.raises(MMEBFormatError, match="empty subset list"):
        load_mmeb_train(train_root, [])


def test_mix_subsets_rounding_order_and_independent_subsets():
    exs = make_examples({"A": 5, "B": 4, "C": 3})
    # half up (2.5 -> 3, 1.5 -> 2, 1.4 -> 1), not floor or banker's rounding
    counts = Counter(e.task for e in mix_subsets(exs, subset_weights={"A": 0.5, "B": 0.375, "C": 0.5}))
    assert counts == {"A": 3, "B": 2, "C": 2}
    assert Counter(e.task for e in mix_subsets(exs, subset_weights={"A": 0.28})) == {"A": 1, "B": 4, "C": 3}
    # exact halves the float product misses (45 * 0.7 = 31.499999..., 50 * 1.15 = 57.4999...; a review helper)
    big = make_examples({"A": 45, "B": 50})
    assert Counter(e.task for e in mix_subsets(big, subset_weights={"A": 0.7, "B": 1.15})) == {"A": 32, "B": 58}
    # whole passes first, then the sampled extras; original order within each part
    up = [int(e.query.text.split("q")[1]) for e in mix_subsets(exs, subset_weights={"B": 2.5}, seed=0) if e.task == "B"]
    assert up[:8] == [0, 1, 2, 3] * 2 and len(up) == 10 and up[8] < up[9]
    for seed in range(5):
        picked = [int(e.query.text.split("q")[1]) for e in mix_subsets(exs, subset_weights={"A": 0.8}, seed=seed)
                  if e.task == "A"]
        assert picked == sorted(picked) and len(picked) == 4
    # each subset draws from its own generator: two subsets of one size do not pick the same positions
    same = make_examples({"X": 40, "Y": 40})
    for seed in range(3):
        pos = {t: [int(e.query.text.split("q")[1]) for e in mix_subsets(same, max_per_subset=5, seed=seed)
                   if e.task == t] for t in "XY"}
        assert pos["X"] != pos["Y"]
    assert mix_subsets(exs, max_per_subset=0) == []
    with pytest.raises(ValueError, match="max_per_subset must be >= 0"):
        mix_subsets(exs, max_per_subset=-1)
    for w in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            mix_subsets(exs, subset_weights={"A": w})


def test_held_out_split_keeps_one_for_training_draws_per_subset_and_keys_the_negative():
    two = make_examples({"A": 2})
    train, val = held_out_split(two, fraction=0.9, seed=0)
    assert len(train) == 1 and len(val) == 1  # round(0.9 * 2) = 2 would leave nothing to train on
    # two subsets of one size: their own generators hold out different positions
    same = make_examples({"X": 200, "Y": 200})
    for seed in range(3):
        val = held_out_split(same, 0.05, seed)[1]
        pos = {t: [int(e.query.text.split("q")[1]) for e in val if e.task == t] for t in "XY"}
        assert len(pos["X"]) == len(pos["Y"]) == 10 and pos["X"] != pos["Y"]
    # triples that differ only in the hard negative are copies of one pair: one distinct pair stays in training
    negs = [TrainExample(Item("q"), Item("p"), Item(f"n{i}"), task="S") for i in range(20)]
    assert len(held_out_split(negs, 0.1, seed=0)[1]) == 0


def test_eval_reader_details(tmp_path: Path):
    """Query ids are unique over a task's files; table order of tasks; an image-only candidate may have a null
    text; a task without rows, a blank query and a blank candidate are errors naming the right field."""
    root, imgs = tmp_path / "ev", tmp_path / "img"
    c = png(imgs, "c.png")
    write_parquet(root / "SUN397" / "test-00000-of-00002.parquet", [eval_row("q0", "", ["a", "b"], ["", ""])])
    write_parquet(root / "SUN397" / "test-00001-of-00002.parquet", [eval_row("q1", "", [None, "b"], [c, ""])])
    write_parquet(root / "OK-VQA" / "test-0.parquet", [eval_row("a", "", ["a", "q0"], ["", ""])])
    with pytest.warns(MMEBDataWarning, match=r"loading 2 of the 36 .*missing: \['ImageNet-1K', 'N24News'") as rec:
        sun, vqa = load_mmeb_eval(root, image_root=imgs)
    assert "'SUN397'" not in str(rec[0].message) and "'OK-VQA'" not in str(rec[0].message)
    assert (sun.name, vqa.name) == ("SUN397", "OK-VQA")  # MMEB table order, not alphabetical
    assert [q.qid for q in sun.queries] == ["SUN397:0", "SUN397:1"]
    assert T(sun.queries[1].candidates[0]) == ("", imgs / c)
    # a query and a candidate of equal content are encoded in their roles: distinct uids
    assert vqa.queries[0].query.text == vqa.queries[0].candidates[0].text
    assert vqa.queries[0].query.uid != vqa.queries[0].candidates[0].uid
    empty = tmp_path / "empty"
    (empty / "VizWiz").mkdir(parents=True)
    pq.write_table(pa.table({"qry_text": pa.array([], pa.string()), "qry_img_path": pa.array([], pa.string()),
                             "tgt_text": pa.array([], pa.list_(pa.string())),
                             "tgt_img_path": pa.array([], pa.list_(pa.string()))}),
                   empty / "VizWiz" / "test-0.parquet")
    with pytest.raises(MMEBFormatError, match="VizWiz: task has no rows"):
        load_mmeb_eval(empty, ["VizWiz"])
    for i, (row, field, what) in enumerate([(eval_row(PH, "", ["a"], [""]), "qry_text", "query"),
                                            (eval_row("q", "", ["a", PH], ["", ""]), "tgt_text", "a candidate")]):
        bad = tmp_path / f"e{i}"
        write_parquet(bad / "VizWiz" / "test-0.parquet", [row])
        with pytest.raises(MMEBFormatError, match=f"row 0: field '{field}': {what} has neither text nor image"):
            load_mmeb_eval(bad, ["VizWiz"])
    with pytest.raises(ValueError, match="tasks must be a list of MMEB task names"):
        load_mmeb_eval(root, b"VizWiz")


def test_file_stamp_changes_with_size_or_mtime(tmp_path: Path):
    """A uid-keyed embedding cache must not serve an image replaced on disk, even by one of equal size or
    with an equal mtime."""
    from metaembed.data.records import file_stamp

    p = tmp_path / "x.png"
    p.write_bytes(b"a" * 10)
    st = p.stat()
    before = file_stamp(p)
    p.write_bytes(b"b" * 10)  # same size, new mtime
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_stamp(p) != before
    same_time = file_stamp(p)
    p.write_bytes(b"c" * 11)  # new size, same mtime
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_stamp(p) != same_time


def test_an_unreadable_image_names_its_parquet_row_and_field(tmp_path: Path):
    """check_images only checks that a file exists: a corrupt MMEB image failed at encoding naming the image
    path alone, not the parquet row that refers to it (a review helper).  Train and eval items now carry their
    row (``Item.source``, formatted only for a message)."""
    from metaembed.backbones.base import InputError, load_image

    root = tmp_path / "MMEB-train"
    (root / "images").mkdir(parents=True)
    (root / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    good = png(root, "images/good.png")
    f = write_parquet(root / "S" / "original-0.parquet", [train_row("text only", "", "p", good, "n", good),
                                                          train_row(f"{PH} q", "images/bad.jpg", "p", "", "n", "")])
    exs = load_mmeb_train(root)
    assert exs[0].query.source is None and str(exs[0].negative.source) == f"{f}: row 0: field 'neg_image_path'"
    with pytest.raises(InputError, match=rf"image \S*bad.jpg, from {f}: row 1: field 'qry_image_path'\): corrupt"):
        load_image(Item(exs[1].query.text, exs[1].query.image, uid="x", source=exs[1].query.source))
    with pytest.raises(InputError, match=rf"from {f}: row 1: field 'qry_image_path': corrupt"):
        load_image(exs[1].query)
    ev = tmp_path / "MMEB-eval"
    (ev / "imgs").mkdir(parents=True)
    (ev / "imgs" / "bad.jpg").write_bytes(b"not a jpeg")
    g = write_parquet(ev / "SUN397" / "test-0.parquet", [eval_row("q0", "", ["a", "b"], ["", ""]),
                                                          eval_row("q1", "", ["a", "c"], ["", "bad.jpg"])])
    with pytest.warns(Warning):
        (task,) = load_mmeb_eval(ev, image_root=ev / "imgs")
    with pytest.raises(InputError, match=rf"from {g}: row 1: field 'tgt_img_path'\): corrupt"):
        load_image(task.queries[1].candidates[1])


def test_parquet_rows_are_numbered_across_reader_batches(tmp_path: Path):
    """Row numbers in error messages count from the file's start, not from each reader batch (4,096 rows for
    MMEB, 256 for ViDoRe: every test file was smaller than one batch; a review helper's mutant said row 24 for
    row 280)."""
    from metaembed.data.records import iter_parquet_rows

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"a": list(range(7)), "b": ["x"] * 7}), path, row_group_size=3)
    rows = list(iter_parquet_rows(path, ["a"], batch_size=2))
    assert rows == [(i, {"a": i}) for i in range(7)]


# ---- mutation-review gap tests ----------------------------------------------------------------
def test_several_blank_negative_texts_beside_more_images_are_an_error(tmp_path: Path):
    """Only a single blank text cell stands for "no text" beside a list of images; a *list* of blank texts of
    another length than the image list is a misaligned row (an error), not broadcast to the images' length."""
    root = tmp_path / "r"
    write_parquet(root / "S" / "original-0.parquet",
                  [train_row("q", "", "p", "pos.png", "['', '']", "['a.png', 'b.png', 'c.png']")])
    with pytest.raises(MMEBFormatError, match="row 0.*neg_text has 2 entries but neg_image_path has 3"):
        load_mmeb_train(root, check_images=False)
    write_parquet(root / "S" / "original-0.parquet",
                  [train_row("q", "", "p", "", "['x', 'y', 'z']", "['', '']")])
    with pytest.raises(MMEBFormatError, match="row 0.*neg_text has 3 entries but neg_image_path has 2"):
        load_mmeb_train(root, check_images=False)


def test_all_36_eval_tasks_present_load_without_a_coverage_warning(tmp_path: Path):
    """Every MMEB-eval task folder present (a full run): no partial-coverage warning, all 36 in table order."""
    for name in MMEB_TASKS:
        write_parquet(tmp_path / name / "test-00000-of-00001.parquet",
                      [dict(qry_text="q", qry_img_path="", tgt_text=["a", "b"], tgt_img_path=["", ""])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks = load_mmeb_eval(tmp_path, check_images=False)
    assert [t.name for t in tasks] == list(MMEB_TASKS)


def test_parse_negative_field_rejects_an_unknown_format():
    """A format other than auto / single / list is an error, also for a cell that looks like a list (it was parsed
    as one)."""
    for cell in ("['a', 'b']", "x"):
        with pytest.raises(ValueError, match="negatives format must be"):
            parse_negative_field(cell, "lists")


def test_an_image_path_naming_a_directory_is_a_missing_image(tmp_path: Path):
    """An image path resolving to a folder (e.g. an empty path component, ``images/VOC2007/``) is not an image:
    a format error naming the row and field (with check_images), not an item the encoder fails on later."""
    root = tmp_path / "r"
    (root / "images" / "S").mkdir(parents=True)
    write_parquet(root / "S" / "original-0.parquet", [train_row("q", "images/S", "p")])
    with pytest.raises(MMEBFormatError, match="row 0: field 'qry_image_path': image 'images/S' not found"):
        load_mmeb_train(root)
