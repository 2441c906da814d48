"""Regenerate tests/data/golden_embeddings.safetensors (run deliberately, after checking why embeddings moved).

    python tests/data/make_golden.py
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
    (:meth:`metaembed.model.MetaEmbedModel.library_versions`: metaembed, torch, transformers, tokenizers, Pillow)
    and numpy (the test images and the image processors' arithmetic)."""
    import numpy
    import PIL
    import tokenizers
    import transformers

    from metaembed import __version__

    return {"metaembed": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__}


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
    return out


if __name__ == "__main__":
    emb = golden_embeddings()
    meta = golden_versions()
    # "versions": what recorded the numbers; "checked_with": the last versions test_golden found them unchanged with
    save_file(emb, str(HERE / "golden_embeddings.safetensors"),
              metadata={"versions": json.dumps(meta), "checked_with": json.dumps(meta)})
    print("wrote", HERE / "golden_embeddings.safetensors", meta)
