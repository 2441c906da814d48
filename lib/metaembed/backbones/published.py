"""The published backbone configurations of the paper's five MetaEmbed variants, sized on the meta device.

Table 4 / §4.1 of the paper: MetaEmbed-3B, -7B and -32B use Qwen2.5-VL-{3B,7B,32B}-Instruct,
MetaEmbed-3B^Gemma uses PaliGemma-3B and MetaEmbed-11B uses Llama-3.2-11B-Vision.  The
``config.json`` values below were copied from the published Hugging Face files (looked up, not
downloaded); keys the files rely on as class defaults are spelled out and marked.  Choices:

* PaliGemma: ``google/paligemma-3b-pt-448`` (the pretrained 448px checkpoint, as ColPali uses;
  ``paligemma-3b-mix-448`` has the identical architecture and parameter count).
* Llama: ``meta-llama/Llama-3.2-11B-Vision-Instruct`` (the base ``-Vision`` model differs only in
  token ids, not in shapes).

:func:`instantiate_on_meta` builds the class the file's ``architectures`` names
(``<Family>ForConditionalGeneration``) under ``torch.device("meta")``: shapes only, no weights, no
memory, well under a second.
:func:`size_report` counts parameters, LoRA-trainable parameters (peft's ``get_peft_model``
applied to the meta model; an analytic ``r * (in + out)`` count over the matched ``nn.Linear``
layers cross-checks it and is used if peft fails) and per-token encoding FLOPs of the language
model.  Note that the recipes' target names (``q,k,v,o,gate,up,down_proj``; ours, the paper names
none) also match Linear layers of the vision towers (Qwen2.5-VL's ViT MLP, SigLIP's q/k/v, Mllama's
vision attention); the report gives both the all-module count and the language-model-only count.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Qwen2_5_VLVisionConfig values the published 3B file omits (it relies on the class defaults);
# the same ViT is used by every Qwen2.5-VL size except for the MLP width of 32B/72B.
_QWEN_VIT_IMPLIED = {
    "depth": 32, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
}


def _qwen25_vl(
    *, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool, window_layers: int,
    vit_inter: int, rope_scaling: dict[str, Any], bos: bool = True,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 128000,
        "max_window_layers": window_layers,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-06,
        "rope_scaling": rope_scaling,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
        "vision_config": {
            **_QWEN_VIT_IMPLIED,
            "hidden_size": 1280,
            "in_chans": 3,
            "intermediate_size": vit_inter,
            "out_hidden_size": hidden,
            "spatial_patch_size": 14,
            "tokens_per_second": 2,
        },
    }
    if bos:
        cfg["bos_token_id"] = 151643
    return cfg


#: ``Qwen/Qwen2.5-VL-3B-Instruct`` config.json (vision depth/heads/MLP width are the implied defaults).
QWEN25_VL_3B: dict[str, Any] = _qwen25_vl(
    hidden=2048, inter=11008, layers=36, heads=16, kv=2, vocab=151936, tie=True, window_layers=70, vit_inter=3420,
    rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]},
)
#: ``Qwen/Qwen2.5-VL-7B-Instruct`` config.json.
QWEN25_VL_7B: dict[str, Any] = _qwen25_vl(
    hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064, tie=False, window_layers=28, vit_inter=3420,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
#: ``Qwen/Qwen2.5-VL-32B-Instruct`` config.json (ViT MLP width 3456).
QWEN25_VL_32B: dict[str, Any] = _qwen25_vl(
    hidden=5120, inter=27648, layers=64, heads=40, kv=8, vocab=152064, tie=False, window_layers=64, vit_inter=3456,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)

#: ``google/paligemma-3b-pt-448`` config.json.
PALIGEMMA_3B_PT_448: dict[str, Any] = {
    "architectures": ["PaliGemmaForConditionalGeneration"],
    "model_type": "paligemma",
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "hidden_size": 2048,
    "ignore_index": -100,
    "image_token_index": 257152,
    "projection_dim": 2048,
    "torch_dtype": "float32",
    "vocab_size": 257216,
    "text_config": {
        "model_type": "gemma",
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_attention_heads": 8,
        "num_hidden_layers": 18,
        "num_image_tokens": 1024,
        "num_key_value_heads": 1,
        "torch_dtype": "float32",
        "vocab_size": 257216,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "image_size": 448,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "num_image_tokens": 1024,
        "patch_size": 14,
        "projection_dim": 2048,
        "projector_hidden_act": "gelu_fast",
        "vision_use_head": False,
    },
}

#: ``meta-llama/Llama-3.2-11B-Vision-Instruct`` config.json (non-default keys).
LLAMA32_11B_VISION_INSTRUCT: dict[str, Any] = {
    "architectures": ["MllamaForConditionalGeneration"],
    "model_type": "mllama",
    "image_token_index": 128256,
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "mllama_text_model",
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "dropout": 0,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 128256,
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "attention_heads": 16,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "image_size": 560,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "intermediate_size": 5120,
        "max_num_tiles": 4,
        "norm_eps": 1e-05,
        "num_channels": 3,
        "num_global_layers": 8,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "vision_output_dim": 7680,
    },
}


@dataclass(frozen=True)
class PublishedBackbone:
    """One published backbone: its Hugging Face id, family, MetaEmbed variant and config.json.

    ``family`` is the ``model.backbone`` adapter family (a key of :data:`metaembed.backbones.BACKBONES`);
    the config's own ``model_type`` and ``architectures`` say which ``transformers`` classes build it.
    """

    name: str
    hf_id: str
    family: str  # metaembed adapter family
    variant: str  # the MetaEmbed row of Table 4
    embedding_dim: int  # Table 4 "Embedding Dim" (= the language model's hidden size)
    config: dict[str, Any] = field(repr=False)
    aliases: tuple[str, ...] = ()


PUBLISHED: dict[str, PublishedBackbone] = {
    b.name: b
    for b in (
        PublishedBackbone("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", "MetaEmbed-3B", 2048,
                          QWEN25_VL_3B, ("3b", "metaembed-3b")),
        PublishedBackbone("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", "MetaEmbed-7B", 3584,
                          QWEN25_VL_7B, ("7b", "metaembed-7b")),
        PublishedBackbone("qwen2.5-vl-32b", "Qwen/Qwen2.5-VL-32B-Instruct", "qwen2_5_vl", "MetaEmbed-32B", 5120,
                          QWEN25_VL_32B, ("32b", "metaembed-32b")),
        PublishedBackbone("paligemma-3b", "google/paligemma-3b-pt-448", "paligemma", "MetaEmbed-3B-Gemma", 2048,
                          PALIGEMMA_3B_PT_448, ("3b-gemma", "metaembed-3b-gemma", "paligemma-3b-pt-448")),
        PublishedBackbone("llama-3.2-11b-vision", "meta-llama/Llama-3.2-11B-Vision-Instruct", "mllama",
                          "MetaEmbed-11B", 4096, LLAMA32_11B_VISION_INSTRUCT,
                          ("11b", "metaembed-11b", "llama-3.2-11b-vision-instruct")),
    )
}


def resolve(name: str) -> PublishedBackbone:
    """Look a backbone up by key, Hugging Face id or MetaEmbed variant name (case-insensitive)."""
    key = name.strip().lower()
    for b in PUBLISHED.values():
        if key in (b.name, b.hf_id.lower(), *b.aliases):
            return b
    known = [f"{b.name} ({b.hf_id}; {b.variant})" for b in PUBLISHED.values()]
    raise KeyError(f"unknown published backbone {name!r}; known: {known}")


def published_config(name: str) -> PretrainedConfig:
    """A fresh ``transformers`` config built from the published config.json dict."""
    b = resolve(name)
    return CONFIG_MAPPING[b.config["model_type"]].from_dict(copy.deepcopy(b.config))


def instantiate_on_meta(name: str) -> nn.Module:
    """The class config.json's ``architectures`` names (``<Family>ForConditionalGeneration``), built on the meta
    device (shapes only, no memory)."""
    b = resolve(name)
    cls = getattr(transformers, b.config["architectures"][0])
    config = published_config(name)
    with torch.device("meta"):
        return cls(config)


def _numel(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _unique(module: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for p in module.parameters()}


def _decoder_name(family: str) -> str:
    """The decoder submodule's name in ``family``'s base model (the adapter's ``language_model_module``)."""
    from . import get_adapter_class

    return get_adapter_class(family).language_model_module


def _language_model(model: nn.Module, family: str) -> nn.Module:
    attr = _decoder_name(family)
    lm = getattr(getattr(model, "model", None), attr, None)
    if lm is None:
        raise TypeError(f"{type(model).__name__}: cannot find the language model at .model.{attr}")
    return lm


def _lora_analytic(model: nn.Module, r: int, targets: Sequence[str], decoder: str) -> dict[str, int]:
    """``r * (in + out)`` for each ``nn.Linear`` whose name ends with a target (peft's suffix rule); the
    ``language_model`` count is those under the submodule named ``decoder``."""
    counts = {"all": 0, "language_model": 0}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n = r * (mod.in_features + mod.out_features)
            counts["all"] += n
            if f".{decoder}." in f".{name}.":
                counts["language_model"] += n
    return counts


def _lora_peft(model: nn.Module, r: int, alpha: int, targets: Sequence[str], decoder: str) -> dict[str, int]:
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                      target_modules=list(targets)))
    counts = {"all": 0, "language_model": 0}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            counts["all"] += p.numel()
            if f".{decoder}." in f".{name}.":
                counts["language_model"] += p.numel()
    return counts


def _attention_width(text_cfg: PretrainedConfig) -> int:
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    return int(text_cfg.num_attention_heads * head_dim)


def size_report(
    name: str,
    lora_r: int = 32,
    lora_alpha: int = 32,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    *,
    seq_len: int = 1024,
    n_meta_tokens: int = 16 + 64,
    use_peft: bool = True,
) -> dict[str, Any]:
    """Parameter counts, LoRA-trainable parameters and per-token LM encoding FLOPs of a published backbone.

    FLOPs per token (forward, language model only, Kaplan-style): ``2 * N`` with ``N`` the
    non-embedding language-model parameters (input embeddings and the unused LM head excluded),
    plus ``4 * layers * seq_len * n_heads * head_dim`` for ``QK^T`` and ``AV`` over a full
    ``seq_len`` context (no causal discount).  For Mllama the cross-attention layers attend to
    ``max_num_tiles * (patches + 1)`` vision tokens instead of ``seq_len``, and their ``k_proj`` /
    ``v_proj`` (``cross_attention_kv_params``) run once per vision token, not per text token, so they
    are left out of the per-token linear term.  ``meta_token_params``
    is ``n_meta_tokens * D`` (the learnable Meta Tokens, trainable in addition to LoRA).
    """
    b = resolve(name)
    model = instantiate_on_meta(name)
    all_params = _unique(model)
    decoder = _decoder_name(b.family)
    lm = _language_model(model, b.family)
    lm_params = _unique(lm)
    embed_params = _unique(lm.get_input_embeddings())
    head = model.get_output_embeddings()
    head_params = {k: v for k, v in _unique(head).items() if k not in lm_params} if head is not None else {}
    other = {k: v for k, v in all_params.items() if k not in lm_params and k not in head_params}

    cfg = model.config
    text_cfg = cfg.get_text_config()
    width = _attention_width(text_cfg)
    n_layers = int(text_cfg.num_hidden_layers)
    cross_layers = list(getattr(text_cfg, "cross_attention_layers", None) or [])
    lm_non_embedding = _numel(list(lm_params.values())) - _numel(list(embed_params.values()))
    cross_kv = _numel([p for k, p in lm.named_parameters() if ".cross_attn.k_proj." in f".{k}" or
                       ".cross_attn.v_proj." in f".{k}"])  # applied to vision states, once per image
    attention = 4 * (n_layers - len(cross_layers)) * seq_len * width
    cross_kv_len = 0
    if cross_layers:
        vc = cfg.vision_config
        cross_kv_len = int(vc.max_num_tiles * ((vc.image_size // vc.patch_size) ** 2 + 1))
        attention += 4 * len(cross_layers) * cross_kv_len * width

    analytic = _lora_analytic(model, lora_r, target_modules, decoder)
    method, note = "analytic", "peft not used"
    lora = analytic
    if use_peft:
        try:
            lora = _lora_peft(model, lora_r, lora_alpha, target_modules, decoder)
            method, note = "peft", "peft.get_peft_model on the meta-device model"
        except Exception as e:  # noqa: BLE001 - any peft failure falls back to the analytic count
            method, note = "analytic", f"peft failed ({type(e).__name__}: {e}); analytic r*(in+out) count"

    D = int(text_cfg.hidden_size)
    return {
        "name": b.name,
        "hf_id": b.hf_id,
        "family": b.family,
        "variant": b.variant,
        "hidden_size": D,
        "embedding_dim_paper": b.embedding_dim,
        "total_params": _numel(list(all_params.values())),
        "language_model_params": _numel(list(lm_params.values())),
        "language_model_non_embedding_params": lm_non_embedding,
        "input_embedding_params": _numel(list(embed_params.values())),
        "lm_head_params": _numel(list(head_params.values())),
        "vision_and_projector_params": _numel(list(other.values())),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False) or not head_params),
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_target_modules": list(target_modules),
        "lora_trainable_params": lora["all"],
        "lora_trainable_params_language_model": lora["language_model"],
        "lora_trainable_params_analytic": analytic["all"],
        "lora_method": method,
        "lora_note": note,
        "meta_token_params": n_meta_tokens * D,
        "seq_len": seq_len,
        "cross_attention_kv_len": cross_kv_len,
        "cross_attention_kv_params": cross_kv,
        "flops_per_token_linear": 2 * (lm_non_embedding - cross_kv),
        "flops_per_token_attention": attention,
        "flops_per_token": 2 * (lm_non_embedding - cross_kv) + attention,
    }
