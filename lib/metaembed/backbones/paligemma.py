"""PaliGemma adapter (the paper's MetaEmbed-3B^Gemma backbone).

Quirks handled here:

* PaliGemma's default position ids are ``arange`` over the padded sequence,
  so left padding would shift every position: we pass positions counted over
  real tokens (1-indexed, as PaliGemma expects).
* Its attention is bidirectional over the prefix (image tokens, ``<bos>``,
  prompt: ``token_type_ids == 0``) and causal over the suffix.  Meta Tokens are
  appended as the *suffix* (``token_type_ids == 1``), so they read the whole
  prefix while the prefix representation stays what the backbone was trained on.
* The image always comes first and the prefix ends in a newline
  (``<image> * n + <bos> + text + "\n"``), as ``PaliGemmaProcessor`` builds
  it: the pretrained model reads ``"\n"`` as the end of the prefix.  An MMEB
  ``<|image_1|>`` placeholder is removed.  (The tiny test tokenizer has no
  newline token, so tiny models get no separator.)
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import PaliGemmaConfig, PaliGemmaModel, SiglipImageProcessorPil

from .base import BackboneAdapter, EncodedItem, seeded, tiny_spec
from .tokenizer import build_tiny_tokenizer

IMAGE_TOKEN = "<image>"

#: Tiny sizes: (hidden, layers, heads, kv_heads, intermediate, vision_hidden, vision_layers)
TINY_SIZES = {
    "xs": (32, 2, 2, 1, 64, 32, 1),
    "s": (64, 2, 4, 1, 128, 32, 2),
    "m": (128, 3, 4, 1, 256, 64, 2),
}


class PaliGemmaAdapter(BackboneAdapter):
    """PaliGemma (SigLIP vision tower + Gemma decoder with a bidirectional prefix)."""

    family = "paligemma"
    tiny_sizes = TINY_SIZES
    model_cls = PaliGemmaModel
    image_only_modules = (".vision_tower.", ".multi_modal_projector.")
    config_tokens = {"image_token_id": IMAGE_TOKEN}
    bos_in_prompt = True

    @classmethod
    def tiny(cls, size: str = "s", seed: int = 0, extra_words: tuple[str, ...] = ()) -> "PaliGemmaAdapter":
        hidden, layers, heads, kv, inter, v_hidden, v_layers = cls.check_size(size, TINY_SIZES)
        tok = build_tiny_tokenizer(extra_words, special_tokens=[IMAGE_TOKEN])
        image_size = 56
        config = PaliGemmaConfig(
            text_config=dict(
                model_type="gemma", vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=hidden // heads, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            ),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=v_hidden, intermediate_size=2 * v_hidden,
                num_hidden_layers=v_layers, num_attention_heads=2, image_size=image_size, patch_size=14,
                projection_dim=hidden,
            ),
            image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vocab_size=len(tok),
            projection_dim=hidden, hidden_size=hidden,
        )
        with seeded(seed):
            model = PaliGemmaModel(config)
        cls._after_random_draw(model)
        model.eval()
        return cls(model, tok, cls._random_image_processor(config, image_size), tiny_spec(size, seed, extra_words))

    @classmethod
    def _after_random_draw(cls, model: nn.Module) -> None:
        # SiglipVisionConfig defaults to a pooling head that PaliGemma never reads (the published config sets
        # vision_use_head=False): its weights got no gradient, and DDP without find_unused_parameters (placeholder
        # images on) failed at the first step.  Dropped after the draw, so every other weight is what it was.
        if getattr(model.vision_tower, "head", None) is not None:
            del model.vision_tower.head
        model.vision_tower.use_head = False
        model.config.vision_config.vision_use_head = False

    @classmethod
    def _random_image_processor(cls, config: Any, image_side: int) -> SiglipImageProcessorPil:
        side = int(config.vision_config.image_size)  # SigLIP's fixed square input
        return SiglipImageProcessorPil(size={"height": side, "width": side})

    @property
    def num_image_tokens(self) -> int:
        v = self.model.config.vision_config
        return (v.image_size // v.patch_size) ** 2

    def process_image(self, image: Image.Image) -> tuple[dict[str, Tensor], list[int]]:
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
        return {"pixel_values": pixels}, [self.model.config.image_token_id] * self.num_image_tokens

    def assemble(self, before, image_ids, after, append, image_inputs) -> EncodedItem:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        newline = list(self.tokenizer("\n", add_special_tokens=False).input_ids)  # Gemma: [108]
        prefix = image_ids + bos + before + after + newline
        ids = torch.tensor(prefix + append, dtype=torch.long)
        types = torch.cat([torch.zeros(len(prefix), dtype=torch.long), torch.ones(len(append), dtype=torch.long)])
        return EncodedItem(ids, {"token_type_ids": types}, image_inputs)

    def collate_images(self, items: list[EncodedItem]) -> dict[str, Tensor]:
        with_img = [e.image["pixel_values"] for e in items if e.image is not None]
        return {"pixel_values": torch.cat(with_img, 0)} if with_img else {}  # [n_images, 3, H, W]

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        pixels = batch.get("pixel_values")
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=self.positions_from_mask(mask, start=1),  # PaliGemma positions are 1-indexed
            token_type_ids=batch["token_type_ids"],
            pixel_values=None if pixels is None else pixels.to(self.model.dtype),
            use_cache=False,
        )
        return out.last_hidden_state  # [B, L, D]
