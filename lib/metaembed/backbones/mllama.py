"""Llama-3.2-Vision (Mllama) adapter (the paper's MetaEmbed-11B backbone).

Quirks handled here:

* Images enter through cross-attention layers gated by a per-token
  ``cross_attention_mask [B, L, n_images, n_tiles]``.  A token whose row is all
  zero does not see the image, so the mask must cover every appended position:
  we build it after the Meta Tokens are appended (rows from the image token to
  the end are 1), otherwise the Meta Tokens would never see the image.
* The image token goes first (``<|image|><|begin_of_text|> text``, the
  model's own prompt format), so no real token has an all-masked row (such rows
  attend uniformly to every tile, padded tiles included).
* Text-only items in a batch that also holds images would go through the
  cross-attention layers with a fully masked row (which in ``transformers``
  is not a no-op), while alone they skip them; :meth:`forward` therefore runs
  image and text-only rows as two sub-batches so results never depend on
  batch composition.  Under multi-process FSDP (:attr:`uniform_forwards`) a batch with
  images always runs both passes, a stand-in text-only pass of one image row whose output
  stays out of the result when it has no text row: every pass all-gathers each block's shard, and
  a rank with a mixed batch would otherwise wait in a collective that a rank with image rows only
  never issues.
* Position ids are counted over real tokens (the default ``arange`` shifts
  with left padding).
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import MllamaConfig, MllamaImageProcessorPil, MllamaModel

from .base import BackboneAdapter, EncodedItem, seeded, tiny_spec
from .tokenizer import build_tiny_tokenizer

IMAGE_TOKEN = "<|image|>"

#: Tiny sizes: (hidden, layers, heads, kv_heads, intermediate, vision_hidden, vision_layers)
TINY_SIZES = {
    "xs": (32, 3, 2, 1, 64, 32, 1),
    "s": (64, 3, 4, 2, 128, 32, 2),
    "m": (128, 4, 4, 2, 256, 64, 2),
}


class MllamaAdapter(BackboneAdapter):
    """Llama-3.2-Vision: a Llama decoder with gated cross-attention to vision tiles."""

    family = "mllama"
    tiny_sizes = TINY_SIZES
    model_cls = MllamaModel
    image_only_modules = (".vision_model.", ".multi_modal_projector.")
    config_tokens = {"image_token_id": IMAGE_TOKEN}
    bos_in_prompt = True

    @classmethod
    def tiny(cls, size: str = "s", seed: int = 0, extra_words: tuple[str, ...] = ()) -> "MllamaAdapter":
        hidden, layers, heads, kv, inter, v_hidden, v_layers = cls.check_size(size, TINY_SIZES)
        tok = build_tiny_tokenizer(extra_words, special_tokens=[IMAGE_TOKEN])
        image_size = 56
        config = MllamaConfig(
            text_config=dict(
                vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, cross_attention_layers=[1],
                max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            ),
            vision_config=dict(
                hidden_size=v_hidden, intermediate_size=2 * v_hidden, num_hidden_layers=v_layers,
                num_global_layers=1, attention_heads=2, image_size=image_size, patch_size=14, max_num_tiles=1,
                intermediate_layers_indices=[0], vision_output_dim=2 * v_hidden,
                supported_aspect_ratios=[[1, 1]],
            ),
            image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        )
        with seeded(seed):
            model = MllamaModel(config)
        cls._after_random_draw(model)
        model.eval()
        return cls(model, tok, cls._random_image_processor(config, image_size), tiny_spec(size, seed, extra_words))

    @classmethod
    def _after_random_draw(cls, model: nn.Module) -> None:
        # transformers initialises the tanh gates of the cross-attention layers to 0 (a no-op); a random
        # backbone should actually route the image into the text stream, so open them.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(1.0)

    @classmethod
    def _random_image_processor(cls, config: Any, image_side: int) -> MllamaImageProcessorPil:
        v = config.vision_config  # fixed square tiles, up to max_num_tiles of them
        return MllamaImageProcessorPil(size={"height": int(v.image_size), "width": int(v.image_size)},
                                       max_image_tiles=int(v.max_num_tiles))

    def _image_only_name_parts(self) -> tuple[str, ...]:
        # the decoder's cross-attention layers are skipped for text-only rows, so they are image-only too
        layers = getattr(self.model.config.text_config, "cross_attention_layers", None) or []
        return self.image_only_modules + tuple(f".{self.language_model_module}.layers.{i}." for i in layers)

    @property
    def max_tiles(self) -> int:
        return int(self.model.config.vision_config.max_num_tiles)

    def process_image(self, image: Image.Image) -> tuple[dict[str, Tensor], list[int]]:
        out = self.image_processor(images=[[image]], return_tensors="pt")
        T = self.max_tiles
        pix = out["pixel_values"][0]  # [1 image, tiles, 3, H, W]
        pad = T - pix.shape[1]
        if pad > 0:
            pix = torch.cat([pix, pix.new_zeros(1, pad, *pix.shape[2:])], 1)
        ar_mask = out["aspect_ratio_mask"][0][:, :T]  # [1, tiles]
        if ar_mask.shape[1] < T:
            ar_mask = torch.cat([ar_mask, ar_mask.new_zeros(1, T - ar_mask.shape[1])], 1)
        n_tiles = int(out["num_tiles"][0][0])
        inputs = {"pixel_values": pix, "aspect_ratio_ids": out["aspect_ratio_ids"][0], "aspect_ratio_mask": ar_mask,
                  "n_tiles": torch.tensor(n_tiles)}
        return inputs, [self.model.config.image_token_id]

    def assemble(self, before, image_ids, after, append, image_inputs) -> EncodedItem:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = torch.tensor(image_ids + bos + before + after + append, dtype=torch.long)
        cross = torch.zeros(len(ids), 1, self.max_tiles, dtype=torch.long)  # [L, n_images=1, tiles]
        if image_inputs is not None:
            # every token from the image token to the end (Meta Tokens included) attends to the real tiles
            cross[:, 0, : int(image_inputs["n_tiles"])] = 1
        return EncodedItem(ids, {"cross_attention_mask": cross}, image_inputs)

    def collate_images(self, items: list[EncodedItem]) -> dict[str, Tensor]:
        has = torch.tensor([e.image is not None for e in items])
        if not has.any():
            return {"has_image": has}
        ref = next(e.image for e in items if e.image is not None)
        pix, ar_ids, ar_mask = [], [], []
        for e in items:
            im = e.image
            pix.append(im["pixel_values"] if im is not None else torch.zeros_like(ref["pixel_values"]))
            ar_ids.append(im["aspect_ratio_ids"] if im is not None else torch.zeros_like(ref["aspect_ratio_ids"]))
            ar_mask.append(im["aspect_ratio_mask"] if im is not None else torch.zeros_like(ref["aspect_ratio_mask"]))
        return {
            "pixel_values": torch.stack(pix),  # [B, 1, tiles, 3, H, W]
            "aspect_ratio_ids": torch.stack(ar_ids),  # [B, 1]
            "aspect_ratio_mask": torch.stack(ar_mask),  # [B, 1, tiles]
            "has_image": has,
        }

    def _run(self, batch: dict[str, Tensor], with_images: bool) -> Tensor:
        mask = batch["attention_mask"]
        kwargs = {}
        if with_images:
            kwargs = dict(
                pixel_values=batch["pixel_values"].to(self.model.dtype),
                aspect_ratio_ids=batch["aspect_ratio_ids"],
                aspect_ratio_mask=batch["aspect_ratio_mask"],
                cross_attention_mask=batch["cross_attention_mask"],
            )
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=self.positions_from_mask(mask),
            use_cache=False, **kwargs,
        )
        return out.last_hidden_state  # [B, L, D]

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        has = batch.get("has_image")
        if has is None or not bool(has.any()):
            return self._run(batch, with_images=False)
        if bool(has.all()) and not self.uniform_forwards:
            return self._run(batch, with_images=True)
        rows = {k: v for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(has)}
        h_img = self._run({k: v[has] for k, v in rows.items()}, with_images=True)
        text = ~has if not bool(has.all()) else torch.arange(len(has), device=has.device) == 0  # stand-in: row 0
        h_txt = self._run({k: v[text] for k, v in rows.items()}, with_images=False)
        if bool(has.all()):  # stand-in pass: in the graph with zero rows (zero gradient), so the backward runs it too
            return torch.cat([h_img, h_txt[:0]])
        h = h_img.new_empty(len(has), *h_img.shape[1:])
        h[has], h[~has] = h_img, h_txt
        return h
