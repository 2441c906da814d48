"""Qwen2-VL and Qwen2.5-VL adapters.

Quirk handled here: Qwen's multimodal RoPE (mrope) needs 3-D position ids
computed from ``input_ids`` (the image grid decides the positions of image
tokens).  Meta Tokens are therefore real token ids in the sequence (typed as
text, ``mm_token_type_ids == 0``), and positions are computed from the
attention mask so that left and right padding give identical positions.
Text-only batches get ordinary 1-D positions counted over real tokens (the
model's own fallback, ``arange``, would shift with left padding).

The vision tower's patch embedding (a ``Conv3d`` whose stride equals its kernel) runs as
the equivalent ``F.linear`` over the flattened patches: cuDNN picks pathologically slow
bf16 kernels for that convolution on some GPU / version combinations (transformers#45750,
pytorch#174051).  Same weights, same state dict.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLModel,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLModel,
)

from .base import BackboneAdapter, EncodedItem, seeded, tiny_spec
from .tokenizer import build_tiny_tokenizer

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"

#: Tiny sizes: (hidden, layers, heads, kv_heads, intermediate, vision_hidden, vision_depth)
TINY_SIZES: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "xs": (32, 2, 2, 1, 64, 32, 1),
    "s": (64, 2, 4, 2, 128, 32, 2),
    "m": (128, 3, 4, 2, 256, 64, 2),
    "l": (256, 4, 8, 4, 512, 64, 2),
}


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen's 16/24/24 of 64."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _tiny_text_config(size: str, vocab: int) -> dict[str, Any]:
    """The Qwen2 decoder of a tiny size (shared by Qwen2-VL and Qwen2.5-VL)."""
    hidden, layers, heads, kv, inter, _, _ = TINY_SIZES[size]
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(hidden // heads)},
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )


def _special_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
                vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END])


def tiny_image_processor(max_side: int = 224) -> Qwen2VLImageProcessorPil:
    """Qwen image processor for tiny models: 14 px patches, 2x2 merge, one LM token per 28x28 px."""
    return Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=max_side * max_side, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def _linear_patch_embed(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """``Conv3d(stride=kernel)`` over ``[n_patches, C*T*P*P]`` rows as one matmul -> ``[n_patches, E]``."""
    w = self.proj.weight  # [E, C, T, P, P]; a patch row is laid out (C, T, P, P) like the kernel
    x = hidden_states.to(w.dtype).reshape(-1, w[0].numel())  # [n_patches, C*T*P*P]
    return F.linear(x, w.reshape(w.shape[0], -1), self.proj.bias)


def use_linear_patch_embed(model: nn.Module) -> int:
    """Run every non-overlapping ``patch_embed.proj`` Conv3d of ``model`` as ``F.linear``; returns how many."""
    n = 0
    for name, module in model.named_modules():
        proj = getattr(module, "proj", None)
        if not (name.endswith("patch_embed") and isinstance(proj, nn.Conv3d)):
            continue
        if (tuple(proj.stride) != tuple(proj.kernel_size) or any(proj.padding) or proj.groups != 1
                or any(d != 1 for d in proj.dilation)):
            continue
        # a partial, not types.MethodType: a bound method pickles as getattr(module, name), which the module's
        # class lacks, so a pickled adapter (ddp_spawn, torch.save(model)) could not be loaded back
        module.forward = functools.partial(_linear_patch_embed, module)
        n += 1
    return n


class _QwenVLBase(BackboneAdapter):
    """Shared logic for Qwen2-VL and Qwen2.5-VL (same prompt format and mrope)."""

    tiny_sizes = TINY_SIZES

    image_only_modules = (".visual.",)
    # transformers >= 4.52 writes (and fine-tuning tools export) model.visual.* / model.language_model.*; the
    # base model class read the vision tower's weights under other names and the load was refused as incomplete
    checkpoint_key_mapping = {r"^model\.visual\.": "visual.", r"^model\.language_model\.": "language_model."}
    config_tokens = {"image_token_id": IMAGE_PAD, "vision_start_token_id": VISION_START,
                     "vision_end_token_id": VISION_END}
    config_cls: Any
    model_cls: Any

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, spec: dict[str, Any]):
        super().__init__(model, tokenizer, image_processor, spec)
        use_linear_patch_embed(self.model)

    @classmethod
    def _tiny_config(cls, size: str, vocab: int, ids: dict[str, int]) -> Any:
        raise NotImplementedError

    @classmethod
    def tiny(cls, size: str = "s", seed: int = 0, extra_words: tuple[str, ...] = ()) -> "_QwenVLBase":
        cls.check_size(size, TINY_SIZES)
        tok = build_tiny_tokenizer(extra_words, special_tokens=cls._tokenizer_specials())
        ids = {t: tok.convert_tokens_to_ids(t) for t in cls._tokenizer_specials()}
        config = cls._tiny_config(size, len(tok), ids)
        with seeded(seed):
            model = cls.model_cls(config)
        model.eval()
        return cls(model, tok, tiny_image_processor(), tiny_spec(size, seed, extra_words))

    @classmethod
    def _tokenizer_specials(cls) -> list[str]:
        return [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

    @classmethod
    def _use_tokenizer_ids(cls, config: Any, tok: Any) -> None:
        ids = {t: tok.convert_tokens_to_ids(t) for t in cls._tokenizer_specials()}
        for key, value in _special_ids(ids).items():
            setattr(config, key, value)

    @classmethod
    def _random_image_processor(cls, config: Any, image_side: int) -> Qwen2VLImageProcessorPil:
        return tiny_image_processor(image_side)  # at most image_side px square: (image_side / 28) ** 2 tokens

    # ------------------------------------------------------------------ items
    def process_image(self, image: Image.Image) -> tuple[dict[str, Tensor], list[int]]:
        out = self.image_processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]  # [1, 3]
        merge = int(getattr(self.image_processor, "merge_size", 2))
        n_tokens = int(grid.prod()) // (merge * merge)
        ids = [self.token_id(VISION_START)] + [self.token_id(IMAGE_PAD)] * n_tokens + [self.token_id(VISION_END)]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, ids

    def assemble(self, before, image_ids, after, append, image_inputs) -> EncodedItem:
        ids = torch.tensor(before + image_ids + after + append, dtype=torch.long)
        mm_types = (ids == self.token_id(IMAGE_PAD)).long()  # 1 = image token, 0 = text (Meta Tokens are text)
        return EncodedItem(ids, {"mm_token_type_ids": mm_types}, image_inputs)

    def collate_images(self, items: list[EncodedItem]) -> dict[str, Tensor]:
        with_img = [e.image for e in items if e.image is not None]
        if not with_img:
            return {}
        return {
            "pixel_values": torch.cat([im["pixel_values"] for im in with_img], 0),  # [sum patches, C*T*p*p]
            "image_grid_thw": torch.cat([im["image_grid_thw"] for im in with_img], 0),  # [n_images, 3]
        }

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
        grid = batch.get("image_grid_thw")
        if grid is not None:
            core = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            pos, _ = core.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask)
        else:
            pos = self.positions_from_mask(mask)[None].expand(3, -1, -1)  # [3, B, L]
        pixels = batch.get("pixel_values")
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            pixel_values=None if pixels is None else pixels.to(self.model.dtype),
            image_grid_thw=grid,
            mm_token_type_ids=mm,
            use_cache=False,
        )
        return out.last_hidden_state  # [B, L, D]


class Qwen2_5_VLAdapter(_QwenVLBase):
    """Qwen2.5-VL (the paper's main backbone family: MetaEmbed-3B/7B/32B)."""

    family = "qwen2_5_vl"
    config_cls = Qwen2_5_VLConfig
    model_cls = Qwen2_5_VLModel

    @classmethod
    def _tiny_config(cls, size: str, vocab: int, ids: dict[str, int]) -> Qwen2_5_VLConfig:
        hidden, _, _, _, _, v_hidden, v_depth = TINY_SIZES[size]
        return Qwen2_5_VLConfig(
            text_config=_tiny_text_config(size, vocab),
            vision_config=dict(
                depth=v_depth, hidden_size=v_hidden, intermediate_size=2 * v_hidden, num_heads=2,
                out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                window_size=56, fullatt_block_indexes=[v_depth - 1],
            ),
            **_special_ids(ids),
        )


class Qwen2VLAdapter(_QwenVLBase):
    """Qwen2-VL (same prompt format and mrope as Qwen2.5-VL, different vision tower)."""

    family = "qwen2_vl"
    config_cls = Qwen2VLConfig
    model_cls = Qwen2VLModel

    @classmethod
    def _tiny_config(cls, size: str, vocab: int, ids: dict[str, int]) -> Qwen2VLConfig:
        hidden, _, _, _, _, v_hidden, v_depth = TINY_SIZES[size]
        return Qwen2VLConfig(
            text_config=_tiny_text_config(size, vocab),
            vision_config=dict(
                depth=v_depth, embed_dim=v_hidden, hidden_size=hidden, mlp_ratio=2, num_heads=2,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            ),
            **_special_ids(ids),
        )
