"""Regenerate tests/data/golden_embeddings.safetensors (run deliberately, after checking why embeddings moved).

    python tests/data/make_golden.py            # every key, recorded now
    python tests/data/make_golden.py --append   # only the keys the file lacks; the recorded ones stay as they are
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def golden_versions() -> dict[str, str]:
    """Versions of everything that can move the golden embeddings: the model fingerprint's libraries
    (:meth:`metaembed.model.MetaEmbedModel.library_versions`: metaembed, torch, transformers, tokenizers, Pillow,
    peft for the LoRA model) and numpy (the test images and the image processors' arithmetic)."""
    import numpy
    import peft
    import PIL
    import tokenizers
    import transformers

    from metaembed import __version__

    return {"metaembed": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
            "peft": peft.__version__}


def _set_lora_weights(model: torch.nn.Module, std: float = 0.05) -> int:
    """Overwrite every LoRA A / B matrix with seeded normal values, in parameter order; returns their count.

    peft starts B at zero (the adapter adds nothing) and draws A with its own init scheme: the golden LoRA model
    pins how a given adapter is applied (which layers, the ``alpha / r`` scaling, where it enters the forward), as
    a trained adapter loaded under an upgraded peft or transformers would be, not peft's initialisation."""
    g = torch.Generator().manual_seed(0)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def golden_embeddings() -> dict[str, torch.Tensor]:
    from conftest import random_image

    from metaembed.config import ModelConfig
    from metaembed.data.records import Item
    from metaembed.model import MetaEmbedModel

    items = [Item("<|image_1|> what shape is at the top left", random_image(0)), Item("a red circle"),
             Item("", random_image(1))]
    out = {}
    for family in ("qwen2_5_vl", "qwen2_vl", "paligemma", "mllama"):
        m = MetaEmbedModel.build(ModelConfig(backbone=family, R_q=2, R_c=4, seed=0))
        out[f"{family}/query"] = m.encode(items, "query").contiguous()
        out[f"{family}/candidate"] = m.encode(items, "candidate").contiguous()
    # the paper's recipe trains LoRA: alpha != r, so a change of scaling rule (alpha / r vs rsLoRA's alpha / sqrt(r))
    # moves these too
    m = MetaEmbedModel.build(ModelConfig(backbone="qwen2_5_vl", R_q=2, R_c=4, seed=0, lora=True, lora_r=4,
                                         lora_alpha=8))
    assert _set_lora_weights(m) > 0, "the LoRA model holds no lora_A / lora_B weights"
    out["qwen2_5_vl+lora/query"] = m.encode(items, "query").contiguous()
    out["qwen2_5_vl+lora/candidate"] = m.encode(items, "candidate").contiguous()
    return out


if __name__ == "__main__":
    from safetensors import safe_open

    path = HERE / "golden_embeddings.safetensors"
    emb = golden_embeddings()
    meta = golden_versions()
    # "versions": what recorded the numbers; "checked_with": the last versions test_golden found them unchanged with;
    # "added": {model key prefix: versions} for the keys a later --append recorded
    metadata = {"versions": json.dumps(meta), "checked_with": json.dumps(meta)}
    if "--append" in sys.argv[1:]:
        with safe_open(str(path), "pt") as f:
            old = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
        added = json.loads(metadata.get("added", "{}"))
        new = {k: v for k, v in emb.items() if k not in old}
        added.update({k.split("/")[0]: meta for k in new})
        emb = {**old, **new}
        metadata.update(added=json.dumps(added), checked_with=json.dumps(meta))
        print("appending", sorted(new))
    save_file(emb, str(path), metadata=metadata)
    print("wrote", path, meta)
