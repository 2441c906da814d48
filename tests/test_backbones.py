"""Backbone adapters: family quirks, padding-side and batch-composition invariance, bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import random_image
from PIL import Image

from metaembed.backbones import BACKBONES, CheckpointError, InputError, load_backbone
from metaembed.backbones.qwen_vl import TINY_SIZES
from metaembed.config import ConfigError, ModelConfig
from metaembed.data.records import Item
from metaembed.model import MetaEmbedModel

FAMILIES = sorted(BACKBONES)


def _items():
    return [
        Item("<|image_1|> what is the red circle", random_image(0)),
        Item("a blue square at top left and a green star below it"),
        Item("", random_image(1)),
        Item("short"),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return MetaEmbedModel.build(ModelConfig(backbone=request.param, R_q=4, R_c=8))


@pytest.mark.parametrize("role", ["query", "candidate"])
def test_padding_side_and_batch_composition_do_not_change_embeddings(model, role):
    items = _items()
    alone = torch.cat([model.encode([it], role) for it in items])  # [4, R, D]
    for side in ("right", "left"):
        model.backbone.padding_side = side
        batched = model.encode(items, role, batch_size=4)
        torch.testing.assert_close(batched, alone, atol=2e-5, rtol=0)
        # a different batch composition: reversed order, mixed image / text-only rows
        rev = model.encode(items[::-1], role, batch_size=3)
        torch.testing.assert_close(rev.flip(0), alone, atol=2e-5, rtol=0)
    model.backbone.padding_side = "right"


def test_meta_tokens_are_real_ids_and_see_the_image(model):
    """Meta Tokens are placeholder ids in input_ids; their embeddings change when only the image changes."""
    ids = model.append_ids("candidate")
    batch = model.collate([Item("what is here", random_image(0))], "candidate")
    assert batch["input_ids"][0, -len(ids):].tolist() == ids
    a = model.encode([Item("what is here", random_image(0))], "candidate")
    b = model.encode([Item("what is here", random_image(3))], "candidate")
    assert (a - b).abs().max() > 1e-4


def test_special_token_strings_in_item_text_are_plain_text(model):
    """Text spelling a reserved token (a Meta Token's name, the image token) never becomes that id: a query
    quoting "<meta_c_0>" must not get a learned candidate vector, a text-only PaliGemma item no <image> row."""
    tok = model.backbone.tokenizer
    reserved = set(model.append_ids("query")) | set(model.append_ids("candidate")) | set(tok.all_special_ids)
    names = tok.convert_ids_to_tokens(sorted(reserved)) + ["<image>", "<|image|>", "<|image_pad|>"]
    text = "see " + " and ".join(names) + " here"
    reserved |= {model.backbone.model.config.image_token_id}
    assert not set(model.backbone.text_ids(text)) & reserved
    for role in ("query", "candidate"):  # the assembled sequence adds only the family's own (e.g. <bos>)
        plain, quoted = (model.collate([Item(t)], role)["input_ids"][0].tolist() for t in ("see here", text))
        assert sorted(i for i in quoted if i in reserved) == sorted(i for i in plain if i in reserved)
    model.encode([Item(text)], "query")  # encodes: exactly R_q Meta Tokens, all appended


def test_family_specific_masks():
    m = MetaEmbedModel.build(ModelConfig(backbone="mllama", R_q=2, R_c=3))
    b = m.collate([Item("a red circle", random_image(0)), Item("text only")], "query")
    n_meta = len(m.append_ids("query"))
    # Mllama: cross-attention mask covers the appended Meta Token positions of the image row
    assert b["cross_attention_mask"][0, b["attention_mask"][0].bool()][-n_meta:].all()
    assert not b["cross_attention_mask"][1].any()
    p = MetaEmbedModel.build(ModelConfig(backbone="paligemma", R_q=2, R_c=3))
    b = p.collate([Item("a red circle", random_image(0))], "query")
    # PaliGemma: Meta Tokens are the causal suffix, the image + prompt the bidirectional prefix
    assert b["token_type_ids"][0, -n_meta:].eq(1).all() and b["token_type_ids"][0, :-n_meta].eq(0).all()
    q = MetaEmbedModel.build(ModelConfig(backbone="qwen2_5_vl", R_q=2, R_c=3))
    b = q.collate([Item("a red circle", random_image(0))], "query")
    assert b["mm_token_type_ids"][0, -n_meta:].eq(0).all() and b["mm_token_type_ids"][0].sum() > 0


def test_paligemma_prefix_ends_in_the_processor_newline():
    """PaliGemmaProcessor builds ``<image>*n <bos> prompt \\n``: the pretrained model reads the newline as the end
    of the prefix, so Meta Tokens (the suffix) come after it.  A Gemma-like tokenizer ("\\n" is id 108)."""
    from types import SimpleNamespace

    a = load_backbone("paligemma")
    real = a.tokenizer

    class GemmaLike:
        bos_token_id = real.bos_token_id

        def __call__(self, text, **kw):
            return SimpleNamespace(input_ids=[108]) if text == "\n" else real(text, **kw)

    a.tokenizer = GemmaLike()
    enc = a.assemble([5], [9, 9], [6], [100, 101], None)
    assert enc.input_ids.tolist() == [9, 9, real.bos_token_id, 5, 6, 108, 100, 101]
    assert enc.seq["token_type_ids"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_positions_ignore_padding():
    a = load_backbone("paligemma")
    mask_right = torch.tensor([[1, 1, 1, 0, 0]])
    mask_left = torch.tensor([[0, 0, 1, 1, 1]])
    assert a.positions_from_mask(mask_right, 1)[0, :3].tolist() == [1, 2, 3]
    assert a.positions_from_mask(mask_left, 1)[0, 2:].tolist() == [1, 2, 3]


def test_tiny_sizes_scale_and_are_deterministic():
    counts = [sum(p.numel() for p in load_backbone("qwen2_5_vl", size=s).parameters()) for s in TINY_SIZES]
    assert counts == sorted(counts) and len(set(counts)) == len(counts) >= 3
    a, b, c = (load_backbone("qwen2_5_vl", seed=s) for s in (0, 0, 1))
    for (k, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), k
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_drawing_random_weights_leaves_the_global_rngs_alone(monkeypatch):
    """`seeded` restores the CPU generator, and forks the CUDA ones when the draw is on a CUDA device
    (``torch.manual_seed`` reseeds every CUDA device) without initialising CUDA otherwise."""
    from metaembed.backbones import base

    torch.manual_seed(123)
    before = torch.get_rng_state()
    load_backbone("qwen2_5_vl", seed=7)
    assert torch.equal(torch.get_rng_state(), before)

    forked = []
    real_fork = torch.random.fork_rng

    def recording_fork(devices=None, **kw):
        forked.append(list(devices))
        return real_fork(devices=[], **kw)

    monkeypatch.setattr(torch.random, "fork_rng", recording_fork)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for device in ("cpu", "meta", "cuda", torch.device("cuda", 1)):
        with base.seeded(0, device):
            pass
    assert forked == [[], [], [0, 1], [0, 1]]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with base.seeded(0):
        pass
    assert forked[-1] == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_weight_draw_on_cuda_restores_the_cuda_generator():
    from metaembed.backbones import base

    torch.cuda.manual_seed_all(5)
    before = torch.cuda.get_rng_state()
    with base.seeded(0, "cuda"):
        torch.randn(8, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_local_checkpoint_round_trip(tmp_path):
    a = load_backbone("qwen2_5_vl")
    a.save(tmp_path)
    b = load_backbone("qwen2_5_vl", tmp_path)
    assert type(b.image_processor).__name__.endswith("Pil")  # no torchvision needed
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone("qwen2_5_vl", tmp_path / "nope")


@pytest.mark.parametrize(
    "item, match",
    [
        (Item(""), "empty item"),
        (Item("   "), "empty item"),
        (Item("x", "/nonexistent/img.png", uid="q7"), "q7.*not found"),
        (Item("x", Image.new("RGB", (0, 10))), "has no pixels"),
        (Item("<|image_1|> a <|image_1|>", random_image(0)), "one <\\|image_1\\|>"),
    ],
)
def test_bad_items_raise_clear_errors(item, match):
    m = MetaEmbedModel.build(ModelConfig(R_q=2, R_c=2))
    with pytest.raises(InputError, match=match):
        m.encode([item], "query")


def test_an_image_the_qwen_processor_refuses_is_an_input_error_naming_the_item():
    """Qwen's smart_resize refuses an aspect ratio of 200 or more with a bare ValueError that named no item and
    escaped the CLI's clean exit for bad data (InputError); other families resize such an image."""
    from PIL import Image

    m = MetaEmbedModel.build(ModelConfig(backbone="qwen2_5_vl", R_q=1, R_c=1, tiny_size="xs"))
    with pytest.raises(InputError, match=r"item 'd9': the qwen2_5_vl image processor cannot take its 28x6000 "
                                         r"image: .*aspect ratio"):
        m.encode([Item("a page", Image.new("RGB", (28, 6000)), uid="d9")], "candidate")
    assert m.encode([Item("a page", Image.new("RGB", (28, 5000)))], "candidate").shape == (1, 1, m.embedding_dim)

def test_max_text_length_below_one_is_refused():
    """``model.config.max_text_length = 0`` (set after validation) silently dropped every word: all
    text-only items encoded to the same Meta Token outputs."""
    m = MetaEmbedModel.build(ModelConfig(R_q=2, R_c=2, tiny_size="xs"))
    m.config.max_text_length = 0
    with pytest.raises(ValueError, match="max_text_length must be >= 1, got 0"):
        m.encode([Item("a red circle"), Item("a blue square")], "query")
    with pytest.raises(ValueError, match="got -1"):
        m.backbone.encode_item(Item("a red circle"), [], -1)
    m.config.max_text_length = 2  # the text is cut to its first tokens; the Meta Tokens are kept
    enc = m.backbone.encode_item(Item("a red circle"), m.append_ids("query"), 2)
    assert enc.input_ids.tolist() == m.backbone.text_ids("a red circle")[:2] + m.append_ids("query")


def test_corrupt_image_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    m = MetaEmbedModel.build(ModelConfig(R_q=2, R_c=2))
    with pytest.raises(InputError, match="corrupt"):
        m.encode([Item("x", bad)], "query")


def test_images_become_rgb_as_the_family_processors_make_them(tmp_path, monkeypatch):
    """Transparent pixels over white, as transformers' convert_to_rgb (do_convert_rgb) does: convert("RGB")
    dropped the alpha and left them black (a logo's embedding moved by up to 0.34), and kept a PNG's transparent
    key colour; 16-bit grayscale scaled,
    not clipped (98% of a 0..65535 gradient came out white); an oversized image is an InputError naming the item,
    not PIL's DecompressionBombError (a review helper)."""
    import io

    import numpy as np
    import transformers
    from packaging.version import Version
    from PIL import Image, ImageDraw
    from transformers.image_transforms import convert_to_rgb

    from metaembed.backbones.base import load_image

    disc = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(disc).ellipse((16, 16, 48, 48), fill=(200, 0, 0, 255))
    # and PNG's tRNS colour key: RGB / grayscale images with one transparent colour (kept as that colour before)
    keyed = Image.new("RGB", (64, 64), (10, 20, 30))
    ImageDraw.Draw(keyed).ellipse((16, 16, 48, 48), fill=(200, 0, 0))
    for img, key in ((disc, None), (disc.convert("LA"), None), (keyed, (10, 20, 30)), (keyed.convert("L"), 18)):
        buf = io.BytesIO()
        img.save(buf, format="PNG", **({"transparency": key} if key is not None else {}))
        got = load_image(Item("x", buf.getvalue()))
        assert got.mode == "RGB" and got.getpixel((0, 0)) == (255, 255, 255)
        rgba = Image.open(io.BytesIO(buf.getvalue())).convert("RGBA")
        over_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        assert np.array_equal(np.asarray(got), np.asarray(over_white))
        # transformers' own convert_to_rgb composites over white from 5.21 on; 5.18-5.20 (allowed by pyproject)
        # still made convert("RGB") (transparent -> black): load_image does not depend on it either way
        if Version(transformers.__version__) >= Version("5.21"):
            theirs = convert_to_rgb(Image.open(io.BytesIO(buf.getvalue())), return_numpy=True)
            assert np.array_equal(np.asarray(got), theirs)
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))  # [4, 256]
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    row = np.asarray(load_image(Item("x", path)))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row.astype(int)) >= 0).all() and (row == 255).mean() < 0.01
    rgb = random_image(32, 40)
    assert np.array_equal(np.asarray(load_image(Item("x", rgb))), np.asarray(rgb.convert("RGB")))  # unchanged
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    big = tmp_path / "big.png"
    Image.new("1", (40, 40)).save(big)  # 1,600 pixels > 2 x 100
    with pytest.raises(InputError, match=r"big.png too large: .*MAX_IMAGE_PIXELS"):
        load_image(Item("x", big))
    # between 1x and 2x the limit PIL only warns and decodes (the README says over the limit is an error)
    Image.new("1", (12, 10)).save(over := tmp_path / "over.png")  # 120 pixels
    for image in (over, over.read_bytes(), Image.open(over)):
        with pytest.raises(InputError, match=r"too large: 12x10 = 120 pixels, over PIL's limit of 100") as e:
            load_image(Item("x", image))
        assert "corrupt" not in str(e.value)  # not re-worded as unreadable by the ValueError a damaged image raises
    assert load_image(Item("x", Image.new("1", (10, 10)))).size == (10, 10)  # at the limit


def test_transparency_reads_alike_from_a_pil_image_a_path_and_bytes(tmp_path):
    """Transparent pixels over white whatever form the image takes: an in-memory P image with an RGBA palette
    (rgba.convert("P"), quantize(); no 'transparency' key, where its PNG has tRNS) came out black as a PIL image
    and white as a path or bytes; a 16-bit grayscale PNG's tRNS key was kept (the 16-bit branch went first); a
    premultiplied 'La' image raised a bare ValueError (PIL converts La to LA only)."""
    import io

    import numpy as np
    from PIL import Image

    from metaembed.backbones.base import load_image

    def over_white(im):
        rgba = im.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))

    logo = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    logo.paste((200, 0, 0, 255), (4, 4, 12, 12))
    for pal in (logo.convert("P"), logo.quantize(method=Image.Quantize.FASTOCTREE)):
        assert pal.mode == "P" and "transparency" not in pal.info
        pal.save(path := tmp_path / "pal.png")
        got = [np.asarray(load_image(Item("x", src))) for src in (pal, path, path.read_bytes())]
        assert tuple(got[0][0, 0]) == (255, 255, 255) and tuple(got[0][8, 8]) == (200, 0, 0)
        assert all(np.array_equal(g, got[0]) for g in got) and np.array_equal(got[0], over_white(logo))
    la = logo.convert("LA")
    assert np.array_equal(np.asarray(load_image(Item("x", la.convert("La")))), over_white(la))
    ramp = (np.arange(64).reshape(4, 16) * 1000).astype(np.uint16)  # 0..63000
    buf = io.BytesIO()
    try:
        Image.fromarray(ramp).save(buf, format="PNG", transparency=int(ramp[1, 3]))
    except OSError as e:  # Pillow 10 cannot write (or read) a 16-bit grayscale tRNS key
        pytest.skip(f"this Pillow cannot write a 16-bit grayscale PNG with a tRNS key: {e}")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    got = np.asarray(load_image(Item("x", buf.getvalue())))[..., 0]
    scaled = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    assert got[1, 3] == 255 and np.array_equal(np.delete(got.ravel(), 19), np.delete(scaled.ravel(), 19))


def test_exif_orientation_is_not_applied_as_in_the_mmeb_loaders(tmp_path):
    """README: a photo tagged with an EXIF Orientation is embedded as stored, as VLM2Vec's MMEB loaders read it
    (plain Image.open), not turned as transformers' load_image turns it."""
    from PIL import Image

    from metaembed.backbones.base import load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 200, 30)).save(path := tmp_path / "photo.jpg", exif=exif.tobytes())
    assert Image.open(path).getexif().get(0x0112) == 6
    for src in (path, path.read_bytes()):
        assert load_image(Item("x", src)).size == (40, 20)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown backbone family"):
        load_backbone("clip")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_patch_embedding_runs_as_linear_and_matches_the_conv3d(family):
    """The vision patch embedding (Conv3d, stride == kernel) runs as F.linear, with the Conv3d's result."""
    bb = load_backbone(family, size="s", seed=0)
    core = bb.model.get_base_model() if hasattr(bb.model, "get_base_model") else bb.model
    pe = core.visual.patch_embed
    assert pe.forward.func.__name__ == "_linear_patch_embed" and pe.forward.args == (pe,)
    x = torch.randn(7, pe.proj.weight[0].numel())  # [n_patches, C*T*P*P]
    want = type(pe).forward(pe, x)  # the class's own Conv3d forward
    torch.testing.assert_close(pe(x), want, atol=1e-5, rtol=1e-5)
    assert pe(x).shape == want.shape == (7, pe.proj.out_channels)



@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_pickled_qwen_model_loads_back_and_encodes_alike(family):
    """The linear patch embedding was a bound method: pickle stores it as ``getattr(patch_embed,
    "_linear_patch_embed")``, which the class lacks, so unpickling failed (``strategy: ddp_spawn`` pickles the
    model into every worker; ``torch.load`` of a ``torch.save(model)`` file)."""
    import copy
    import pickle

    m = MetaEmbedModel.build(ModelConfig(backbone=family, R_q=2, R_c=3, tiny_size="xs"))
    items = [Item("<|image_1|> a red circle", random_image(0)), Item("a blue square")]
    want = m.encode(items, "candidate")
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        pe = clone.backbone.model.visual.patch_embed
        assert pe.forward.func.__name__ == "_linear_patch_embed" and pe.forward.args[0] is pe  # bound to the copy
        assert torch.equal(clone.encode(items, "candidate"), want)

#: ``<Family>ForConditionalGeneration``: what the published checkpoints hold.
_FULL_CLASS = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "paligemma": "PaliGemmaForConditionalGeneration", "mllama": "MllamaForConditionalGeneration"}


#: (current name pattern, published name) per family
_LEGACY_NAMES = {
    "qwen2_vl": [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")],
    "qwen2_5_vl": [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")],
    "paligemma": [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
                  (r"^(model\.)?vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
                  (r"^model\.multi_modal_projector\.", "multi_modal_projector.")],
    "mllama": [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
               (r"^model\.vision_model\.", "vision_model."),
               (r"^model\.multi_modal_projector\.", "multi_modal_projector.")],
}


def _published_layout_checkpoint(family: str, directory, names: str = "legacy") -> dict[str, torch.Tensor]:
    """A tiny checkpoint as the Hugging Face repositories publish it: ``<Family>ForConditionalGeneration``
    weights under the legacy names (``model.layers.*`` / ``visual.*`` for Qwen, ``language_model.model.*`` for
    PaliGemma and Mllama, SigLIP under ``vision_tower.vision_model.*``), or with ``names="in-memory"`` under the
    names transformers >= 4.52 uses in memory (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``: what
    fine-tuning tools export), and the processor type names of the published ``preprocessor_config.json``.
    Returns the base model's expected state dict."""
    import json
    import re

    import transformers
    from safetensors.torch import load_file, save_file

    tiny = load_backbone(family)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        full = getattr(transformers, _FULL_CLASS[family])(tiny.model.config)
    full.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    tiny.image_processor.save_pretrained(directory)
    weights = load_file(str(directory / "model.safetensors"))  # transformers 5 already writes most legacy names
    for pattern, legacy in _LEGACY_NAMES[family]:
        weights = {re.sub(pattern, legacy, k): v for k, v in weights.items()}
    if names == "in-memory":
        weights = {k: v.detach().clone().contiguous() for k, v in full.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    pp = directory / "preprocessor_config.json"
    cfg = json.loads(pp.read_text())
    cfg["image_processor_type"] = cfg["image_processor_type"].removesuffix("Pil")  # e.g. "Qwen2VLImageProcessor"
    pp.write_text(json.dumps(cfg))
    return {k[len("model."):]: v for k, v in full.state_dict().items() if k.startswith("model.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_published_checkpoint_layout_loads_every_weight(tmp_path, family):
    """A checkpoint in the published layout loads bit-exactly into the adapter and encodes."""
    want = _published_layout_checkpoint(family, tmp_path)
    bb = load_backbone(family, tmp_path)
    got = bb.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    m = MetaEmbedModel(bb, ModelConfig(backbone=family, backbone_path=str(tmp_path), R_q=2, R_c=3, lora=False))
    assert m.encode([Item("a red circle", random_image(0))], "candidate").shape == (1, 3, bb.hidden_size)


def test_a_checkpoint_image_processor_is_the_pil_one_whether_or_not_torchvision_is_installed(tmp_path, monkeypatch):
    """A published checkpoint names the backend-neutral class (Qwen2VLImageProcessor): transformers resolves it to
    its torchvision processor when torchvision is importable (another resize, other pixels) and to the PIL one
    otherwise, so one checkpoint embedded images differently on a GPU machine with torchvision than here. The
    PIL backend is requested explicitly (this machine has no torchvision: the request is what can be checked)."""
    from transformers import AutoImageProcessor

    _published_layout_checkpoint("qwen2_5_vl", tmp_path)
    asked = []
    real = AutoImageProcessor.from_pretrained.__func__
    monkeypatch.setattr(AutoImageProcessor, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: asked.append(kw) or real(cls, *a, **kw)))
    bb = load_backbone("qwen2_5_vl", tmp_path)
    assert asked == [{"backend": "pil"}] and type(bb.image_processor).__name__ == "Qwen2VLImageProcessorPil"

@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_with_the_in_memory_weight_names_loads_every_weight(tmp_path, family):
    """Qwen2-VL / Qwen2.5-VL checkpoints written with the transformers >= 4.52 names (model.visual.*,
    model.language_model.*: LlamaFactory, FSDP exports) were refused: the base model class read the vision tower
    under other names and reported 18-19 weights missing, though every weight was in the file."""
    want = _published_layout_checkpoint(family, tmp_path, names="in-memory")
    got = load_backbone(family, tmp_path).model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_checkpoint_of_another_family_or_with_missing_weights_is_refused(tmp_path):
    """transformers builds the requested architecture and randomly initialises what it cannot find: a PaliGemma
    checkpoint loaded as qwen2_5_vl (the default family) used to give a random model with only a log line."""
    from safetensors.torch import load_file, save_file

    _published_layout_checkpoint("paligemma", tmp_path)
    for family in ("qwen2_5_vl", "qwen2_vl", "mllama"):
        with pytest.raises(CheckpointError, match=r"model_type 'paligemma' is not a '" + family):
            load_backbone(family, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = next(k for k in sorted(weights) if k.startswith("language_model.model.layers.1."))
    del weights[dropped]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 weights of the paligemma model are not in the checkpoint"):
        load_backbone("paligemma", tmp_path)


def test_qwen_mrope_positions_ignore_padding_side_and_continue_after_the_image():
    """Qwen's 3-D (t, h, w) positions: the same for every real token under left and right padding; the
    appended Meta Tokens are text positions counting on from the image's compressed extent."""
    m = MetaEmbedModel.build(ModelConfig(backbone="qwen2_vl", R_q=2, R_c=3, tiny_size="xs"))
    items = [Item("<|image_1|> red", random_image(0, size=112)), Item("a much longer text only item here")]
    core = m.backbone.model
    pos = {}
    for side in ("right", "left"):
        m.backbone.padding_side = side
        b = m.collate(items, "query")
        p, _ = core.get_rope_index(b["input_ids"], mm_token_type_ids=b["mm_token_type_ids"],
                                   image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"])
        pos[side] = [p[:, i, b["attention_mask"][i].bool()] for i in range(len(items))]  # [3, n_real] per row
    m.backbone.padding_side = "right"
    for a, c in zip(pos["right"], pos["left"]):
        assert torch.equal(a, c)
    img_row = pos["right"][0]  # <|vision_start|> + 4x4 image tokens (112 px, merge 2) + <|vision_end|> + text + Meta
    n_meta = len(m.append_ids("query"))
    assert img_row[:, 1:17].amax(1).tolist() == [1, 4, 4]  # t, h, w of the 4x4 grid, offset by vision_start
    tail = img_row[:, -(n_meta + 2):]  # <|vision_end|> ... Meta Tokens: plain text positions, all three equal
    assert (tail == tail[0]).all() and tail[0].tolist() == list(range(5, 5 + n_meta + 2))
    assert pos["right"][1][0].tolist() == list(range(pos["right"][1].shape[1]))  # text only: 0..n-1


def test_backbone_forward_takes_only_the_batch():
    """``inputs_embeds`` was accepted and silently ignored by every adapter."""
    bb = load_backbone("paligemma", size="xs")
    m = MetaEmbedModel(bb, ModelConfig(backbone="paligemma", R_q=1, R_c=1))
    batch = m.collate([Item("a red circle")], "query")
    with pytest.raises(TypeError):
        bb(batch, inputs_embeds=torch.zeros(1, batch["input_ids"].shape[1], bb.hidden_size))


def test_a_checkpoint_missing_or_corrupt_file_is_named(tmp_path):
    """Each broken file of a local checkpoint gives an error naming it.  Before: a folder without tokenizer files
    loaded an empty Qwen2Tokenizer (every text -> no ids) and a tokenizer of another checkpoint loaded silently;
    a corrupt config.json, tokenizer.json or weight shard raised a bare JSONDecodeError / SafetensorError."""
    import shutil

    good = tmp_path / "good"
    bb = load_backbone("qwen2_5_vl", size="xs")
    bb.model.save_pretrained(good, max_shard_size="100KB")  # sharded, with model.safetensors.index.json
    bb.tokenizer.save_pretrained(good)
    bb.image_processor.save_pretrained(good)
    shards = sorted(good.glob("model-*.safetensors"))
    assert len(shards) > 1 and (good / "model.safetensors.index.json").is_file()
    from metaembed.backbones.qwen_vl import Qwen2_5_VLAdapter

    other = Qwen2_5_VLAdapter.tiny("xs", extra_words=("zzword",)).tokenizer  # its image ids are shifted by one

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d

    cases = [
        (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
         FileNotFoundError, r"has no tokenizer \(none of tokenizer.json"),
        (lambda d: (d / "tokenizer.json").write_text("{"), CheckpointError,
         r"tokenizer \(tokenizer.json, tokenizer_config.json\) cannot be"),
        (lambda d: (d / "tokenizer_config.json").write_text("{"), CheckpointError,  # named tokenizer.json only
         r"tokenizer \(tokenizer.json, tokenizer_config.json\) cannot be"),
        (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {'), CheckpointError,
         r"model.safetensors.index.json: not valid JSON"),  # a bare JSONDecodeError before
        (lambda d: (d / "model.safetensors.index.json").write_text("[]"), CheckpointError,
         r"model.safetensors.index.json: expected a JSON object with a 'weight_map'"),  # a bare TypeError
        (lambda d: (d / "config.json").write_text('{"model_type": "qwen2_5_vl", '), CheckpointError,
         r"config.json: not a valid JSON config"),
        (lambda d: (d / shards[1].name).write_bytes(shards[1].read_bytes()[:100]), CheckpointError,
         rf"{shards[1].name}: weight file cannot be read .* truncated or corrupt"),
        (lambda d: (d / "preprocessor_config.json").unlink(), FileNotFoundError,
         r"no image processor config \(none of preprocessor_config.json, processor_config.json\)"),
        (lambda d: [(d / "tokenizer.json").unlink(), other.save_pretrained(d)], CheckpointError,
         r"gives '<\|image_pad\|>' the id \d+ but config.json's image_token_id is \d+"),
    ]
    for i, (edit, exc, match) in enumerate(cases):
        with pytest.raises(exc, match=match):
            load_backbone("qwen2_5_vl", broken(f"case{i}", edit))
    assert load_backbone("qwen2_5_vl", good).tokenizer.convert_tokens_to_ids("<|image_pad|>") == \
        bb.model.config.image_token_id


@pytest.mark.parametrize("family", ["paligemma", "mllama"])
def test_a_tokenizer_without_its_special_tokens_is_refused(tmp_path, family):
    """tokenizer.json without tokenizer_config.json / special_tokens_map.json loads with no bos token: every
    PaliGemma / Mllama input lost its <bos> and the embeddings changed (max |diff| 0.016 / 0.085), silently."""
    _published_layout_checkpoint(family, tmp_path)
    assert load_backbone(family, tmp_path).tokenizer.bos_token_id is not None
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / f).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"bos token id is None but config.json's bos_token_id is \d+"):
        load_backbone(family, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_position_ids_given_to_the_model_count_real_tokens_only(family):
    """Every adapter passes the model position ids of its own (the models' defaults are ``arange`` over the padded
    row): the same for every real token under left and right padding, text-only and image rows, starting at the
    family's first position (PaliGemma 1, the others 0).  RoPE hides a uniform shift in exact arithmetic, so the
    embeddings alone do not show it; in bf16 a padding-dependent shift changes the rounding."""
    m = MetaEmbedModel.build(ModelConfig(backbone=family, R_q=2, R_c=3, tiny_size="xs"))
    start = 1 if family == "paligemma" else 0
    seen = []
    hook = m.backbone.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True)
    batches = ([Item("a red circle here and there"), Item("short")],  # text only
               [Item("<|image_1|> red", random_image(0)), Item("a much longer text item here", random_image(1))])
    try:
        for items in batches:
            per_side = {}
            for side in ("right", "left"):
                m.backbone.padding_side = side
                b = m.collate(items, "query")
                seen.clear()
                with torch.no_grad():
                    m.backbone(b)
                assert len(seen) == 1 and seen[0] is not None, f"{family}: no position ids passed"
                real = b["attention_mask"].bool()  # [B, L]
                per_side[side] = [seen[0][..., i, real[i]] for i in range(len(items))]  # [(3,) n_real] per row
            for right, left in zip(per_side["right"], per_side["left"]):
                assert torch.equal(right, left)
                assert (right[..., 0] == start).all()
    finally:
        hook.remove()
        m.backbone.padding_side = "right"


@pytest.mark.parametrize("pad", ["<pad>", "<eos>"])
def test_collate_pads_on_the_padding_side_with_the_pad_id(pad):
    """Padding takes the tokenizer's pad id, which published tokenizers do not put at 0 (Qwen's <|endoftext|>, Llama's
    <|finetune_right_pad_id|>; the tiny one's <pad> is 0), and the sequence-aligned extras pad with 0 (text, not
    image tokens)."""
    a = load_backbone("qwen2_5_vl", size="xs")
    a.tokenizer.pad_token = pad
    assert a.pad_token_id == a.tokenizer.convert_tokens_to_ids(pad)
    long, short = (a.encode_item(Item(t), [], 256) for t in ("a red circle here and there", "red"))
    n, k = len(long.input_ids), len(short.input_ids)
    assert 0 < k < n
    for side in ("right", "left"):
        a.padding_side = side
        b = a.collate([long, short])
        real = slice(0, k) if side == "right" else slice(n - k, n)
        pad = slice(k, n) if side == "right" else slice(0, n - k)
        assert b["attention_mask"][1, real].eq(1).all() and b["attention_mask"][1, pad].eq(0).all()
        assert torch.equal(b["input_ids"][1, real], short.input_ids)
        assert b["input_ids"][1, pad].eq(a.tokenizer.pad_token_id).all()
        assert b["mm_token_type_ids"][1, pad].eq(0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_item_text_gets_no_special_tokens_from_the_tokenizer(family):
    """Published tokenizers add <bos> (Llama-3, Gemma) and more when asked to: item text is tokenized without them and
    the adapter places the family's own <bos> (PaliGemma, Mllama: one).  The tiny tokenizer adds nothing, which hid
    text_ids asking for special tokens."""
    from tokenizers.processors import TemplateProcessing

    a = load_backbone(family, size="xs")
    tok = a.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)])
    assert tok("red", add_special_tokens=True).input_ids == [bos, *tok("red", add_special_tokens=False).input_ids, eos]
    assert a.text_ids("a red circle") == tok("a red circle", add_special_tokens=False).input_ids
    ids = a.encode_item(Item("a red circle"), [7], 256).input_ids.tolist()
    assert eos not in ids and ids.count(bos) == (1 if a.bos_in_prompt else 0)


def test_text_around_the_image_placeholder_is_cut_to_max_text_length_in_all():
    """``max_text_length`` bounds the text before and after the placeholder together (the text before first)."""
    a = load_backbone("qwen2_5_vl", size="xs")
    item = Item("red blue green <|image_1|> circle square star")
    before, after = a.text_ids("red blue green "), a.text_ids(" circle square star")
    assert len(before) == len(after) == 3
    for limit, want in ((4, before + after[:1]), (2, before[:2]), (6, before + after)):
        assert a.encode_item(item, [7], limit).input_ids.tolist() == want + [7], limit


def test_mllama_cross_attention_mask_covers_the_real_tiles_only():
    """An image split in fewer tiles than ``max_num_tiles`` (4 in Llama-3.2-Vision; 1 in the tiny model) is
    padded with zero tiles: every token's row of the cross-attention mask holds 1 for the real tiles only."""
    a = load_backbone("mllama", size="xs")
    a.model.config.vision_config.max_num_tiles = 4
    image_id = a.model.config.image_token_id
    enc = a.assemble([5, 6], [image_id], [7], [100, 101], {"n_tiles": torch.tensor(2)})
    cross = enc.seq["cross_attention_mask"]  # [L, 1, 4]
    assert cross.shape == (len(enc.input_ids), 1, 4)
    assert cross[:, 0, :2].eq(1).all() and cross[:, 0, 2:].eq(0).all()
    assert not a.assemble([5], [], [], [100], None).seq["cross_attention_mask"].any()  # text only: no tile


@pytest.mark.parametrize("family", FAMILIES)
def test_image_only_modules_are_exactly_what_text_rows_leave_without_gradient(family):
    """An image row reaches every trainable parameter and a text-only row all but ``image_only_parameters()``: what
    DDP without find_unused_parameters (placeholder images on) and the GradCache-under-DDP check rely on.  The tiny
    PaliGemma kept SigLIP's pooling head (SiglipVisionConfig's default; the published config has
    vision_use_head=False), which no forward reads: a 2-rank DDP run failed at its first step."""
    m = MetaEmbedModel.build(ModelConfig(backbone=family, R_q=2, R_c=3, tiny_size="xs"))

    def untouched(items):
        m.zero_grad(set_to_none=True)
        m(m.collate(items, "query"), "query").sum().backward()
        return {n for n, p in m.backbone.named_parameters() if p.requires_grad and p.grad is None}

    assert untouched([Item("a red circle", random_image(0))]) == set()
    assert untouched([Item("a red circle")]) == {n for n, _ in m.backbone.image_only_parameters()}


def test_register_backbone_adds_a_family_without_editing_the_library(monkeypatch):
    """A new family was two hand-kept registries (BACKBONES and config.TINY_SIZES, which the config check reads) and
    a module-level TINY_SIZES that ablations found by module name: register_backbone sets both from the class."""
    from metaembed import ablations, backbones, config
    from metaembed.backbones import register_backbone
    from metaembed.backbones.base import BackboneAdapter
    from metaembed.backbones.qwen_vl import Qwen2_5_VLAdapter

    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))
    monkeypatch.setattr(config, "TINY_SIZES", dict(config.TINY_SIZES))
    with pytest.raises(ConfigError, match="model.backbone='fork_vl'"):
        ModelConfig(backbone="fork_vl").validate()

    @register_backbone
    class ForkAdapter(Qwen2_5_VLAdapter):
        family = "fork_vl"
        tiny_sizes = {"xs": TINY_SIZES["xs"]}

    assert backbones.get_adapter_class("fork_vl") is ForkAdapter and config.TINY_SIZES["fork_vl"] == ("xs",)
    ModelConfig(backbone="fork_vl", tiny_size="xs").validate()
    with pytest.raises(ConfigError, match="tiny_size"):
        ModelConfig(backbone="fork_vl", tiny_size="s").validate()
    m = MetaEmbedModel.build(ModelConfig(backbone="fork_vl", tiny_size="xs", R_q=2, R_c=3))
    assert isinstance(m.backbone, ForkAdapter) and m.encode([Item("a red circle")], "query").shape[:2] == (1, 2)
    assert ablations.tiny_models(["fork_vl"], ["xs"]) == [("fork_vl", "xs")]
    assert register_backbone(ForkAdapter) is ForkAdapter  # registering the same class again is harmless
    with pytest.raises(ValueError, match="already ForkAdapter"):
        register_backbone(type("Other", (ForkAdapter,), {}))
    with pytest.raises(TypeError, match="concrete BackboneAdapter"):
        register_backbone(BackboneAdapter)
    with pytest.raises(TypeError, match="no 'family' name"):
        register_backbone(type("Nameless", (Qwen2_5_VLAdapter,), {"family": ""}))


def test_a_family_declared_as_an_entry_point_is_known_to_every_process(tmp_path):
    """A family registered from a fork's module existed only in the process that imported it: ``metaembed
    train --set model.backbone=myfam`` and a fresh ``from_pretrained`` of its saved model stopped with
    "expected one of (...)" (fork review).  An installed package's ``metaembed.backbones`` entry point is loaded
    when a name is not known; a broken entry point is a warning, not an error for the others."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    site = tmp_path / "site"
    (site / "plugfam-0.1.dist-info").mkdir(parents=True)
    (site / "plugfam-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: plugfam\nVersion: 0.1\n")
    (site / "plugfam-0.1.dist-info" / "entry_points.txt").write_text(
        "[metaembed.backbones]\nplug_vl = plugfam:PlugAdapter\nbroken_vl = plugfam_missing:Nothing\n"
        "misnamed_vl = plugfam:PlugAdapter\n")
    (site / "plugfam.py").write_text(
        "from metaembed.backbones.qwen_vl import Qwen2_5_VLAdapter\n\n\n"
        "class PlugAdapter(Qwen2_5_VLAdapter):  # not decorated: the entry point registers it\n"
        "    family = 'plug_vl'\n")
    lib = Path(__file__).resolve().parents[1] / "lib"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{lib}"}
    save = (
        "import warnings\n"
        "from metaembed.config import ModelConfig\n"
        "from metaembed.model import MetaEmbedModel\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    cfg = ModelConfig(backbone='plug_vl', tiny_size='xs', R_q=2, R_c=3)\n"
        "    cfg.validate()\n"
        "print(sorted(str(x.message).split(' (')[0] for x in w))\n"
        f"MetaEmbedModel.build(cfg).save_pretrained({str(tmp_path / 'model')!r})\n")
    out = subprocess.run([sys.executable, "-c", save], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backbone entry point broken_vl = 'plugfam_missing:Nothing'" in out.stdout
    assert "backbone entry point misnamed_vl = 'plugfam:PlugAdapter'" in out.stdout
    load = ("from metaembed.model import MetaEmbedModel\nfrom metaembed.data.records import Item\n"
            f"m = MetaEmbedModel.from_pretrained({str(tmp_path / 'model')!r})\n"
            "print(type(m.backbone).__name__, tuple(m.encode([Item('a red circle')], 'query').shape[:2]))\n")
    out = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["PlugAdapter", "(1,", "2)"]


def test_tiny_tokenizer_ids_normalization_and_unknown_words():
    """The tiny tokenizer as its module docstring describes it (a mutation review: nothing read it directly):
    <pad> <unk> <bos> <eos> are ids 0-3 (tiny configs take pad 0); text is NFKC-normalized and lowercased
    ("RED", fullwidth "ｒｅｄ" -> "red"); known and extra words (lowercased) are one token each and keep their
    ids whatever the extra words; an unknown ASCII word up to 64 characters falls back to character pieces, a
    longer one or one with other characters is one <unk>; special tokens come after the words, once each,
    never split and marked special."""
    from metaembed.backbones.tokenizer import BOS, EOS, PAD, UNK, build_tiny_tokenizer
    from metaembed.data.synthetic import VOCABULARY

    plain = build_tiny_tokenizer()
    tok = build_tiny_tokenizer(extra_words=("Zebra",), special_tokens=["<image>", "<meta_x>", "<image>"])
    assert tok.convert_tokens_to_ids([PAD, UNK, BOS, EOS]) == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)

    def ids(text, t=tok):
        return t(text, add_special_tokens=False).input_ids

    red = tok.convert_tokens_to_ids("red")
    assert ids("RED Circle") == ids("red circle") == [red, tok.convert_tokens_to_ids("circle")]
    assert ids("ｒｅｄ") == [red]
    assert ids("zebra") == ids("ZEBRA") == [tok.convert_tokens_to_ids("zebra")] != [tok.unk_token_id]
    assert all(len(ids(w)) == 1 for w in VOCABULARY)
    assert all(tok.convert_tokens_to_ids(w) == plain.convert_tokens_to_ids(w) for w in ("the", "red", *VOCABULARY))
    assert ids("café") == ids("北京") == ids("q" * 65) == [tok.unk_token_id]
    assert tok.convert_ids_to_tokens(ids("q" * 64)) == ["q"] + ["##q"] * 63
    assert tok.convert_ids_to_tokens(ids("xqz,")) == ["x", "##q", "##z", ","]
    assert len(tok) == len(plain) + 1 + 2  # zebra, and the two special tokens once each
    assert tok.convert_tokens_to_ids(["<image>", "<meta_x>"]) == [len(tok) - 2, len(tok) - 1]
    assert {"<image>", "<meta_x>"} <= set(tok.all_special_tokens)
    assert ids("a<image>b") == [tok.convert_tokens_to_ids("a"), len(tok) - 2, tok.convert_tokens_to_ids("b")]
