"""Lessons from the field: what users of colpali-engine, VLM2Vec and PyLate report breaking most.

Each test here closes a gap found by mutating the library (a copy of it) and seeing the existing
guards still pass:

1. in-batch negatives gathered across ranks under GradCache (Eq. 6 over the *global* batch);
2. hard negatives read from a MoCa parquet reaching the MMR loss (Eq. 6's ``c^-`` term) through
   ``train()``, on the plain and the GradCache step;
3. padding side and batch composition for the Table 5 baseline poolings and for images of
   different resolutions in one batch (every backbone family, query and candidate side);
5. ``MultiVectorIndex.add`` growing its storage geometrically (amortised copies, bounded peak);
6. golden embeddings of inputs the processors resize and the tokenizer normalises.

(4, MMEB P@1 ties and NDCG@5 against pytrec_eval, is guarded in ``test_evaluation.py``.)
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _fake_model import FakeMetaEmbedModel, make_fake_benchmark
from PIL import Image

from metaembed.backbones import BACKBONES
from metaembed.config import LossConfig, ModelConfig, TrainConfig, config_from_dict
from metaembed.data.mmeb import TRAIN_FIELDS
from metaembed.data.records import Item
from metaembed.index import MultiVectorIndex
from metaembed.model import MetaEmbedModel
from metaembed.training import MetaEmbedLightningModule, TripletCollator, train

GROUPS = [[1, 1], [2, 4], [4, 8]]
FAMILIES = sorted(BACKBONES)


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- 1. gathering under GradCache


def _grad_cache_gather_worker(rank: int, world: int, port: int, B: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = FakeMetaEmbedModel(dropout=0.0)
        local = make_fake_benchmark(world * B, seed=3).train[rank * B : (rank + 1) * B]
        batch = TripletCollator(model.collate, chunk_size=3)(local)  # chunks of 3 and 1
        module = MetaEmbedLightningModule(model, LossConfig(groups=GROUPS), TrainConfig(grad_cache_chunk_size=3))
        out = module.grad_cache_loss(batch, gather=True)
        grads = _grads(model)
        for g in grads.values():  # what DDP does with each rank's local gradients
            dist.all_reduce(g)
            g /= world
        torch.save({"loss": out.loss.detach(), "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_grad_cache_gathers_in_batch_candidates_across_ranks(tmp_path):
    """GradCache on 2 gloo ranks x 4 queries == the plain step on 1 process x 8 queries (Eq. 6 over the
    global batch): same loss (mean over ranks) and same averaged gradients.  Scoring the cached embeddings
    against the local positives only (the multi-GPU contrastive-loss bug) passed every other test."""
    B, world = 4, 2
    mp.start_processes(_grad_cache_gather_worker, args=(world, _free_port(), B, str(tmp_path)), nprocs=world,
                       join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    model = FakeMetaEmbedModel(dropout=0.0)
    batch = TripletCollator(model.collate)(make_fake_benchmark(world * B, seed=3).train)
    ref = MetaEmbedLightningModule(model, LossConfig(groups=GROUPS), TrainConfig()).batch_loss(batch)
    ref.loss.backward()
    g_ref = _grads(model)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), ref.loss.detach())
    for name in g_ref:
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], g_ref[name], atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------- 2. hard negatives end to end


def _write_moca_parquet(root: Path) -> Path:
    """A MoCa / mmE5 hard-negative subset: ``neg_*`` hold stringified lists; every third row has none."""
    rows = []
    for i in range(12):
        negs = "[]" if i % 3 == 2 else str([f"a picture of thing {i} number two", f"other thing {i}"])
        rows.append(dict(zip(TRAIN_FIELDS, (f"find thing {i}", "", f"a picture of thing {i}", "", negs,
                                            "[]" if i % 3 == 2 else str(["", ""])))))
    path = root / "MSCOCO_t2i" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in TRAIN_FIELDS}), path)
    return root


@pytest.mark.parametrize("chunk", [None, 3], ids=["plain", "grad-cache"])
def test_moca_hard_negatives_reach_the_loss_through_train(tmp_path, monkeypatch, chunk):
    """data.split=train / data.negatives=list -> load_benchmark -> DataModule -> module -> mmr_loss: the
    first negative of each list is scored as that query's own ``c^-`` (Eq. 6), the rows without one are
    masked out, on the plain and the GradCache step."""
    import metaembed.training.module as module_mod

    model = FakeMetaEmbedModel(dropout=0.0)
    negs = {k: [Item(f"a picture of thing {i} number two" if k == "first" else f"other thing {i}")
                for i in range(12) if i % 3 != 2] for k in ("first", "second")}
    with torch.no_grad():  # before the optimizer step: what the loss must see
        want = {k: model(model.collate(v, "candidate"), "candidate") for k, v in negs.items()}  # [8, R_c, D]
    seen = []
    real = module_mod.mmr_loss

    def spy(q, c, hard_neg=None, **kw):
        seen.append((None if hard_neg is None else hard_neg.detach().float().clone(), kw.get("hard_neg_mask")))
        return real(q, c, hard_neg, **kw)

    monkeypatch.setattr(module_mod, "mmr_loss", spy)
    root = _write_moca_parquet(tmp_path / "hardneg")
    cfg = config_from_dict({
        "model": {"R_q": 4, "R_c": 8}, "loss": {"groups": GROUPS},
        "data": {"source": "mmeb", "path": str(root), "split": "train", "negatives": "list", "check_images": False,
                 "subsets": ["MSCOCO_t2i"]},
        "train": {"batch_size": 12, "max_steps": 1, "val_fraction": 0.0, "output_dir": str(tmp_path / "run"),
                  "progress_bar": False, "grad_cache_chunk_size": chunk, "seed": 0, "log_every_n_steps": 1},
    })
    train(cfg, model=model)
    assert len(seen) == 1
    hard_neg, mask = seen[0]
    assert hard_neg is not None and hard_neg.shape == (12, 8, 16)  # [B, R_c, D]: one per query
    assert mask is not None and mask.shape == (12,) and int(mask.sum()) == 8  # rows of "[]" lists masked out
    rows = hard_neg[mask.bool()]  # [8, R_c, D]
    match = (rows[:, None] - want["first"][None]).abs().amax(dim=(2, 3)) < 1e-5  # [8, 8]
    assert match.any(1).all() and match.any(0).all()  # each query's first negative, every one once
    assert not ((rows[:, None] - want["second"][None]).abs().amax(dim=(2, 3)) < 1e-5).any()


# ---------------------------------------------------------------------------------- 3. padding and batch composition


def _mixed_items() -> list[Item]:
    """Different lengths, image-less rows and three image resolutions (Qwen: three image grids)."""
    return [Item("<|image_1|> what is the red circle", _image(0, 56, 56)),
            Item("a blue square at top left and a green star below it"),
            Item("", _image(1, 112, 56)),
            Item("short"),
            Item("tall one <|image_1|> here", _image(2, 56, 84))]


@pytest.mark.parametrize("pooling", ["meta", "single-last", "single-mean", "split"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_pooling_is_padding_side_and_batch_invariant(family, pooling):
    """Each item alone == in a left- or right-padded batch == in a reversed batch of another size, for the
    Meta Token pooling and the Table 5 baselines (``single-last``, ``single-mean``, ``split``), with images of
    several resolutions in one batch.  ``single-last`` reading the last *position* (padding, under right
    padding) and a Qwen rope index built from the first image's grid passed ``test_backbones``."""
    items = _mixed_items()
    model = MetaEmbedModel.build(ModelConfig(backbone=family, R_q=4, R_c=8, pooling=pooling))
    for role in ("query", "candidate"):
        alone = torch.cat([model.encode([it], role) for it in items])  # [5, R, D]
        try:
            for side in ("right", "left"):
                model.backbone.padding_side = side
                batched = model.encode(items, role, batch_size=5)  # [5, R, D]
                torch.testing.assert_close(batched, alone, atol=2e-5, rtol=0, msg=f"{role} {side}")
            rev = model.encode(items[::-1], role, batch_size=2).flip(0)  # [5, R, D], left padded
            torch.testing.assert_close(rev, alone, atol=2e-5, rtol=0, msg=f"{role} reversed")
        finally:
            model.backbone.padding_side = "right"


# ---------------------------------------------------------------------------------- 5. index build memory


def test_index_add_grows_geometrically_past_the_first_allocation():
    """``add`` in batches: O(log N) reallocations, so the rows copied are amortised O(N) and the rows alive
    during a reallocation (old + new storage) stay within a small multiple of N.  The test in ``test_index``
    stays under the first 1024-row allocation, where reallocating to the exact size on every add (O(N^2 / batch)
    copies: 2 million rows for this build) also passed."""
    N, batch = 20_000, 100
    idx = MultiVectorIndex(1, 2, dtype=torch.float32)
    caps = [idx.capacity]
    for a in range(0, N, batch):
        idx.add(torch.full((batch, 1, 2), float(a)))  # [batch, R_c=1, D=2]
        if idx.capacity != caps[-1]:
            caps.append(idx.capacity)
    assert len(idx) == N and torch.equal(idx.embeddings[::batch, 0, 0], torch.arange(0, N, batch).float())
    growths = list(zip(caps[1:], caps[2:]))  # (old, new) capacities of each reallocation
    assert len(growths) <= 40, caps
    assert sum(old for old, _ in growths) <= 5 * N, caps  # rows copied by all reallocations
    assert max(old + new for old, new in growths) <= 3 * N, caps  # peak rows allocated at once
    assert idx.capacity <= 2 * N, caps


# ---------------------------------------------------------------------------------- 6. golden: resize and text


#: Recorded with these versions (an upgrade that moves a value names them in the failure).
GOLDEN_VERSIONS = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "tokenizers": "0.23.3", "pillow": "13.0.0",
                   "numpy": "2.4.6"}
#: ``<E, u>`` for each item x vector of :func:`_golden_projections` (queries R_q=2, candidates R_c=4).
GOLDEN = {
    "mllama": {"query": [[-0.186947, 0.066106], [-0.103691, 0.120932], [-0.013076, 0.130056]],
               "candidate": [[-0.075087, 0.118129, -0.076006, 0.051428], [-0.013281, 0.152442, -0.052011, 0.081819],
                             [0.023579, 0.181651, -0.016549, 0.068389]]},
    "paligemma": {"query": [[-0.165547, 0.104361], [-0.166294, 0.109332], [-0.157741, 0.110209]],
                  "candidate": [[-0.045681, 0.156123, -0.076048, 0.064675], [-0.044681, 0.162782, -0.073775, 0.066217],
                                [-0.039271, 0.161264, -0.070693, 0.06945]]},
    "qwen2_5_vl": {"query": [[-0.254779, 0.039662], [-0.190466, 0.030601], [-0.216388, 0.008109]],
                   "candidate": [[-0.053022, 0.114177, -0.124476, 0.004921], [-0.038907, 0.107525, -0.117132, 0.005092],
                                 [-0.048296, 0.083942, -0.109862, 0.002732]]},
    "qwen2_vl": {"query": [[-0.139629, 0.098328], [-0.278054, -0.014221], [-0.075529, 0.149683]],
                 "candidate": [[-0.088297, 0.135738, -0.054611, 0.068862], [-0.167702, 0.035187, -0.12793, 0.008226],
                               [-0.01418, 0.18572, 0.05057, 0.137457]]},
}


def _golden_projections(family: str) -> dict[str, torch.Tensor]:
    """Embeddings of inputs the image processors must resize (non-square, off-grid sizes) and text the
    tokenizer must normalise (case, punctuation), projected on one fixed unit direction. # {role: [3, R]}"""
    items = [Item("Find The RED Circle, please! <|image_1|>", _image(10, 70, 45)),
             Item("What's NEAR the Blue-Star?"),
             Item("", _image(11, 90, 60))]
    model = MetaEmbedModel.build(ModelConfig(backbone=family, R_q=2, R_c=4, seed=0))
    u = torch.nn.functional.normalize(torch.randn(model.embedding_dim, generator=torch.Generator().manual_seed(0)),
                                      dim=0)  # [D]
    return {role: model.encode(items, role) @ u for role in ("query", "candidate")}


def _versions() -> dict[str, str]:
    import PIL
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_embeddings_of_resized_images_and_cased_text(family):
    """``test_golden`` feeds 56x56 images (no processor resizes them) and lowercase text: a changed resampling
    filter (Pillow, a "fast" torchvision processor) or lost lowercasing left it passing."""
    now = _golden_projections(family)
    for role, got in now.items():
        want = torch.tensor(GOLDEN[family][role])
        diff = float((got - want).abs().max())
        assert diff < 1e-4, (f"{family} {role}: golden embeddings moved by {diff:.2e}; recorded with "
                             f"{GOLDEN_VERSIONS}, now {_versions()}")
