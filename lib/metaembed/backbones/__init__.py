"""Vision-language backbones behind one adapter interface (Qwen2-VL, Qwen2.5-VL, PaliGemma, Mllama)."""
from __future__ import annotations

from pathlib import Path

import torch

from .base import BackboneAdapter, EncodedItem, InputError, load_image
from .mllama import MllamaAdapter
from .paligemma import PaliGemmaAdapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

#: Family name -> adapter class.
BACKBONES: dict[str, type[BackboneAdapter]] = {
    cls.family: cls for cls in (Qwen2_5_VLAdapter, Qwen2VLAdapter, PaliGemmaAdapter, MllamaAdapter)
}


def get_adapter_class(family: str) -> type[BackboneAdapter]:
    try:
        return BACKBONES[family]
    except KeyError:
        raise ValueError(f"unknown backbone family {family!r}; choose from {sorted(BACKBONES)}") from None


def load_backbone(
    family: str,
    path: str | Path | None = None,
    *,
    size: str = "s",
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
) -> BackboneAdapter:
    """A real checkpoint from a local directory (``path``) or a tiny random model of ``size``."""
    cls = get_adapter_class(family)
    if path is None:
        return cls.tiny(size=size, seed=seed)
    return cls.from_pretrained(path, dtype=dtype)


__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "EncodedItem",
    "InputError",
    "MllamaAdapter",
    "PaliGemmaAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "get_adapter_class",
    "load_backbone",
    "load_image",
]
