"""Training and encoding cost at real model size: step time, tokens/s and peak memory per batch size.

``metaembed train-bench`` builds a backbone at its published size with random weights
(:meth:`~metaembed.backbones.base.BackboneAdapter.from_config` on
:func:`~metaembed.backbones.published.published_config`; or a local checkpoint with
``--backbone-path``), wraps it exactly as training does (Meta Tokens, LoRA r=32 on the language
model, gradient checkpointing; :class:`~metaembed.model.MetaEmbedModel`) and times MMR training
steps (Eq. 7, one hard negative per query) through the same
:class:`~metaembed.training.MetaEmbedLightningModule` code paths Lightning runs: the plain path,
or GradCache (``B/chunk``) for global batches larger than one forward pass.  Then it runs the
evaluation path (:func:`metaembed.evaluation.evaluate`, every budget from one encoding pass) on
the synthetic benchmark at that size (its texts kept whole: up to 256 text tokens, not ``--text-tokens``;
``--image-size`` must then be even and >= 16).

What a step is: zero_grad, the loss forward and backward (under ``--dtype`` autocast on CUDA unless
float32; base weights in ``--dtype``, LoRA and Meta Tokens in fp32), gradient clipping, AdamW.  Timed with
:func:`metaembed.bench.time_ms` (CUDA events on GPU, ``perf_counter`` on CPU), mean and std over
``--steps`` after ``--warmup`` (no std for one step: ``step_s_std`` is null).
Tokens per step count every non-padding language-model input token of the queries, positives and hard
negatives: visual tokens (after the vision merger) with their markers, text and the ``R_q + R_c`` Meta Tokens.
Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (not reported on CPU).

Sequence lengths (the paper gives none; ours, stated in the report): every query, positive and
hard negative holds one ``--image-size`` px image (Qwen2.5-VL: ``(image_size / 28) ** 2`` visual
tokens, 256 at 448 px, plus 2 markers; PaliGemma resizes every image to its 448 px input, 1024 visual
tokens; Llama-3.2-Vision to 560 px tiles read by cross-attention, one image token in the sequence),
``--text-tokens`` words and the ``R_q + R_c`` Meta Tokens (layout ``both``).  Images are random noise,
texts random words; batches larger than ``--pool`` triples repeat collated chunks (content does not
change the cost).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch import Tensor

from .bench import _DTYPES, _is_oom, _resolve_device, sync, time_ms
from .config import DEFAULT_GROUPS, LossConfig, ModelConfig, TrainConfig
from .data.records import IMAGE_PLACEHOLDER, Item, TrainExample
from .efficiency import GIB, markdown_table, write_json

__all__ = ["TrainBenchConfig", "add_arguments", "build_model", "format_report", "parse_batches", "run",
           "run_train_bench", "tiny_backbone"]

TINY_PREFIX = "tiny-"
EVAL_MAX_TEXT_LENGTH = ModelConfig().max_text_length  # 256: the eval path's text budget (see _measure_eval)


@dataclass
class TrainBenchConfig:
    """What ``metaembed train-bench`` measures (see the module docstring)."""

    backbone: str = "metaembed-3b"  # a published name (backbones.published) or "tiny-[<family>-]xs|s|m|l"
    backbone_path: str | None = None  # a local checkpoint of that family instead of random weights
    device: str = "auto"
    dtype: str = "bfloat16"  # frozen backbone weights
    batches: list[tuple[int, int | None]] = field(default_factory=lambda: [(8, None), (32, None)])  # (B, chunk)
    query_chunk_size: int | None = None  # loss.query_chunk_size for the MMR loss
    steps: int = 3
    warmup: int = 1
    image_size: int = 448
    text_tokens: int = 64
    R_q: int = 16
    R_c: int = 64
    lora_r: int = 32
    gradient_checkpointing: bool = True
    hard_negatives: bool = True
    pool: int = 64  # distinct triples collated; larger batches repeat them chunk-wise
    eval_queries_per_task: int = 4  # synthetic benchmark queries per task (0: skip the evaluation path)
    eval_batch_size: int = 32
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """ValueError for settings the benchmark cannot run: dtype, batch sizes, a checkpoint path for a tiny
        backbone, counts below their minimum (before any model is built)."""
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {tuple(_DTYPES)}")
        if not self.batches:
            raise ValueError("no batch sizes given")
        if self.backbone.startswith(TINY_PREFIX) and self.backbone_path is not None:
            # build_model never reads it for a tiny backbone: the report would time random weights, not the checkpoint
            raise ValueError(f"--backbone-path {self.backbone_path} needs a published --backbone (e.g. metaembed-3b), "
                             f"not {self.backbone} (random weights)")
        if self.backbone.startswith(TINY_PREFIX):
            tiny_backbone(self.backbone)  # an unknown family or size, before anything is built
        for B, chunk in self.batches:
            if B < 1 or (chunk is not None and not 1 <= chunk <= B):
                raise ValueError(f"batch {B}/{chunk}: need B >= 1 and 1 <= chunk <= B")
            if chunk is None and B > self.pool:  # make_batch's own check, here before any model build or timing
                raise ValueError(f"plain batch {B} > --pool {self.pool}: use GradCache (B/chunk) or a larger --pool")
        minimum = {"steps": 1, "image_size": 1, "R_q": 1, "R_c": 1, "lora_r": 1, "pool": 1, "eval_batch_size": 1,
                   "warmup": 0, "text_tokens": 0, "eval_queries_per_task": 0,
                   "query_chunk_size": 1 if self.query_chunk_size is not None else None}
        bad = [f"{k}={getattr(self, k)} (< {lo})" for k, lo in minimum.items() if lo is not None and getattr(self, k) < lo]
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)}")
        if self.eval_queries_per_task > 0 and (self.image_size < 16 or self.image_size % 2):
            # checked here, not at the eval step after every timing (make_benchmark's own check)
            raise ValueError(f"image_size={self.image_size}: the evaluation path (synthetic benchmark) needs an "
                             f"even number >= 16; pass --eval-queries 0 to skip it")


def parse_batches(specs: Sequence[str]) -> list[tuple[int, int | None]]:
    """``["8", "256/32"]`` -> ``[(8, None), (256, 32)]``: batch size, GradCache chunk size (plain if absent)."""
    out: list[tuple[int, int | None]] = []
    for spec in specs:
        head, sep, tail = str(spec).partition("/")
        try:
            B, chunk = int(head), (int(tail) if sep else None)
        except ValueError:
            raise ValueError(f"batch {spec!r}: expected B or B/chunk, e.g. 32 or 2048/32") from None
        out.append((B, chunk))
    return out


def _groups(cfg: TrainBenchConfig) -> list[tuple[int, int]]:
    """The paper's MMR groups that fit ``(R_q, R_c)``: trained as loss groups, scored as budgets."""
    return [tuple(g) for g in DEFAULT_GROUPS if g[0] <= cfg.R_q and g[1] <= cfg.R_c]


# --------------------------------------------------------------------------- model
def tiny_backbone(name: str) -> tuple[str, str]:
    """``(family, size)`` of a tiny random backbone name: ``tiny-<size>`` is Qwen2.5-VL (``tiny-xs``),
    ``tiny-<family>-<size>`` any family of :data:`~metaembed.backbones.BACKBONES` (``tiny-paligemma-s``);
    ValueError naming the known families or sizes otherwise."""
    from .backbones import BACKBONES, get_adapter_class

    if not name.startswith(TINY_PREFIX):
        raise ValueError(f"{name!r} is not a tiny backbone name ({TINY_PREFIX}[<family>-]<size>)")
    family, _, size = name[len(TINY_PREFIX):].rpartition("-")
    family = family or "qwen2_5_vl"
    try:
        cls = get_adapter_class(family)  # also a family an installed package declares (load_plugins)
    except ValueError:
        raise ValueError(f"{name}: unknown backbone family {family!r}; {TINY_PREFIX}<family>-<size> with a family "
                         f"of {sorted(BACKBONES)}") from None
    try:
        cls.check_size(size, cls.tiny_sizes)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return family, size


def _model_config(cfg: TrainBenchConfig, family: str) -> ModelConfig:
    return ModelConfig(backbone=family, backbone_path=cfg.backbone_path, R_q=cfg.R_q, R_c=cfg.R_c, pooling="meta",
                       layout="both", lora=True, lora_r=cfg.lora_r, lora_alpha=cfg.lora_r,
                       gradient_checkpointing=cfg.gradient_checkpointing, max_text_length=max(cfg.text_tokens, 1),
                       dtype=cfg.dtype, seed=cfg.seed)


def build_model(cfg: TrainBenchConfig, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The MetaEmbed model to measure (on ``device``) and a description of its backbone."""
    from .backbones import get_adapter_class, load_backbone
    from .model import MetaEmbedModel

    dtype = _DTYPES[cfg.dtype]
    if cfg.backbone.startswith(TINY_PREFIX):
        family, size = tiny_backbone(cfg.backbone)
        what = f"tiny {family} ({size}, random weights)"
        adapter = load_backbone(family, size=size, seed=cfg.seed, dtype=dtype)  # weights cast as a checkpoint loads
        # Qwen: images at most --image-size px; PaliGemma and Mllama resize to their config's fixed tiles
        try:
            adapter.image_processor = type(adapter)._random_image_processor(adapter.model.config, cfg.image_size)
        except NotImplementedError:  # a family with tiny() but no from_config: tiny()'s own processor
            warnings.warn(f"train-bench: {family} has no random-build image processor (_random_image_processor), so "
                          f"its tiny() processor sizes the images: --image-size {cfg.image_size} is not applied",
                          stacklevel=2)
        adapter.model.to(device)
    else:
        from .backbones.published import published_config, resolve

        try:
            pub = resolve(cfg.backbone)
        except KeyError as e:  # the message, not KeyError's quoted repr, and the names resolve does not know
            raise ValueError(f"{e.args[0]}; or {TINY_PREFIX}[<family>-]xs|s|m|l for a tiny random backbone") from None
        family = pub.family
        if cfg.backbone_path is not None:
            adapter = get_adapter_class(family).from_pretrained(cfg.backbone_path, dtype=dtype)
            adapter.model.to(device)
            what = f"{pub.variant} checkpoint {cfg.backbone_path}"
        else:
            adapter = get_adapter_class(family).from_config(published_config(pub.name), seed=cfg.seed, dtype=dtype,
                                                            device=device, image_side=cfg.image_size)
            what = f"{pub.hf_id} architecture ({pub.variant}), random weights"
    model = MetaEmbedModel(adapter, _model_config(cfg, family)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = adapter.model.config
    attn = {"text": getattr(config.get_text_config(), "_attn_implementation", None),
            "vision": getattr(getattr(config, "vision_config", None), "_attn_implementation", None)}
    return model, {"backbone": cfg.backbone, "family": family, "what": what, "parameters": n_params,
                   "trainable_parameters": n_train, "hidden_size": model.embedding_dim, "attention": attn}


# --------------------------------------------------------------------------- data
def _words() -> list[str]:
    from .data.synthetic import VOCABULARY

    return sorted(VOCABULARY)


def _item(rng: random.Random, words: list[str], cfg: TrainBenchConfig, tag: str) -> Item:
    side = cfg.image_size
    pixels = np.frombuffer(rng.randbytes(side * side * 3), dtype=np.uint8).reshape(side, side, 3)
    text = " ".join(rng.choice(words) for _ in range(cfg.text_tokens))
    return Item(text=f"{IMAGE_PLACEHOLDER} {text}", image=Image.fromarray(pixels), uid=tag)


def make_triples(cfg: TrainBenchConfig, n: int) -> list[TrainExample]:
    """``n`` random (query, positive, hard negative) triples (``cfg.seed``), each item an image plus text."""
    rng, words = random.Random(cfg.seed), _words()
    return [TrainExample(*(_item(rng, words, cfg, f"{i}/{r}") for r in ("q", "p", "n")), task="train-bench")
            for i in range(n)]


def _tokens(x: Any) -> int:
    if x is None:
        return 0
    if isinstance(x, (list, tuple)):
        return sum(_tokens(v) for v in x)
    return int(x["attention_mask"].sum())


def make_batch(model: Any, cfg: TrainBenchConfig, B: int, chunk: int | None) -> dict[str, Any]:
    """A collated training batch of ``B`` triples (a list of GradCache chunks when ``chunk`` is set)."""
    from .training.datamodule import TripletCollator

    collate = TripletCollator(model.collate, use_negatives=cfg.hard_negatives, chunk_size=chunk)
    if chunk is None:
        if B > cfg.pool:
            raise ValueError(f"plain batch {B} > --pool {cfg.pool}: use GradCache (B/chunk) or a larger --pool")
        return collate(make_triples(cfg, B))
    n_chunks = math.ceil(B / chunk)
    distinct = max(1, min(n_chunks, cfg.pool // chunk))
    pool = collate(make_triples(cfg, distinct * chunk))  # {role: [chunk, ...]}
    last = B - (n_chunks - 1) * chunk
    out: dict[str, Any] = {}
    for role, chunks in pool.items():
        if chunks is None:
            out[role] = None
            continue
        picked = [chunks[i % distinct] for i in range(n_chunks)]
        if last < chunk:  # a smaller final chunk, as TripletCollator makes for B % chunk != 0
            picked[-1] = {k: _first_rows(k, v, last, picked[-1]) for k, v in picked[-1].items()}
        out[role] = picked
    return out


def _first_rows(key: str, value: Tensor, n: int, batch: dict[str, Tensor]) -> Tensor:
    """The first ``n`` items of a collated chunk (vision tensors are per patch / per image).

    Qwen2.5-VL's ``pixel_values`` are patch rows (``[sum patches, C*T*p*p]``, counted by
    ``image_grid_thw``); PaliGemma's are one row per image and Llama-3.2-Vision's one per item, so per item
    here, where every item (:func:`make_triples`) has one image, like every other key.
    """
    if key == "image_grid_thw":
        return value[:n]
    if key == "pixel_values" and "image_grid_thw" in batch:
        patches = batch["image_grid_thw"][:n].prod(dim=-1).sum()
        return value[: int(patches)]
    return value[:n]


# --------------------------------------------------------------------------- measuring
def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _measure_batch(model: Any, cfg: TrainBenchConfig, device: torch.device, B: int, chunk: int | None) -> dict[str, Any]:
    from .training import MetaEmbedLightningModule

    row: dict[str, Any] = {"batch_size": B, "grad_cache_chunk": chunk}
    t0 = time.perf_counter()
    batch = make_batch(model, cfg, B, chunk)
    row["collate_s"] = time.perf_counter() - t0
    row["tokens_per_step"] = sum(_tokens(batch[r]) for r in ("query", "positive", "negative"))
    row["max_seq_len"] = max(int(c["attention_mask"].shape[1]) for r in ("query", "positive", "negative")
                             if batch[r] is not None for c in (batch[r] if chunk else [batch[r]]))
    loss_cfg = LossConfig(groups=_groups(cfg), tau=0.03, use_hard_negatives=cfg.hard_negatives,
                          query_chunk_size=cfg.query_chunk_size)
    lm = MetaEmbedLightningModule(model, loss_cfg, TrainConfig(batch_size=B, grad_cache_chunk_size=chunk))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, _DTYPES[cfg.dtype]):
            if chunk is not None:
                out = lm.grad_cache_loss(batch, gather=False)
            else:
                out = lm.batch_loss(batch, gather=False)
                out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))

    model.train()
    try:
        batch = move_data_to_device(batch, device)  # whole GradCache batches too: an OOM here is this row's
        for _ in range(cfg.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        mean_ms, std_ms = time_ms(step, device, cfg.steps, 0)
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        row["status"] = "OOM"
        return row
    finally:
        opt.zero_grad(set_to_none=True)
        opt.state.clear()  # free optimizer state and the device batch before the next batch size
        batch.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite MMR loss at batch {B}: {losses}")
    mean = mean_ms / 1e3
    std = None if std_ms is None else std_ms / 1e3  # one timed step has no spread
    row.update(status="ok", step_s=mean, step_s_std=std, tokens_per_s=row["tokens_per_step"] / mean,
               triples_per_s=B / mean, loss=losses[-1])
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return row


def _measure_eval(model: Any, cfg: TrainBenchConfig, device: torch.device) -> dict[str, Any]:
    """Encode the synthetic benchmark at ``cfg.image_size`` and score every budget (the eval path).

    Its texts are encoded with :data:`EVAL_MAX_TEXT_LENGTH` text tokens (the main path's default
    ``model.max_text_length``), not the training items' ``--text-tokens``: truncated to a few tokens,
    distractors could become the positive's exact input, and the tie (``ties="first"``, positive
    first) would count as a hit, inflating P@1.
    """
    from .data.synthetic import make_benchmark
    from .evaluation import evaluate, summarize

    bench = make_benchmark(n_train=0, n_eval_queries=cfg.eval_queries_per_task, n_candidates=4,
                           image_size=cfg.image_size, seed=cfg.seed)
    counted = {"items": 0, "encode_s": 0.0}

    def encode(items: Sequence[Item], role: str, batch_size: int = 32, progress: bool = False) -> Tensor:
        with _autocast(device, _DTYPES[cfg.dtype]):
            sync(device)
            t = time.perf_counter()
            # evaluate() hands over cfg.eval_batch_size items at a time: encode them as one batch
            out = model.encode(items, role, batch_size=cfg.eval_batch_size, progress=progress)
            sync(device)
        counted["items"] += len(items)
        counted["encode_s"] += time.perf_counter() - t
        return out

    budgets = _groups(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_length = model.config.max_text_length
    model.config.max_text_length = max(EVAL_MAX_TEXT_LENGTH, train_length)
    try:
        t0 = time.perf_counter()
        df = evaluate(bench, encode, budgets, batch_size=cfg.eval_batch_size, progress=cfg.progress)
        total = time.perf_counter() - t0
    finally:
        model.config.max_text_length = train_length
    summary = summarize(df)
    overall = summary[summary["group"] == "Overall"]
    out = {"tasks": len(bench.eval_tasks) + len(bench.doc_tasks), "items_encoded": counted["items"],
           "encode_s": counted["encode_s"], "items_per_s": counted["items"] / max(counted["encode_s"], 1e-12),
           "total_s": total, "overall_p1": dict(zip(overall["budget"], overall["value"].round(2)))}
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def run_train_bench(cfg: TrainBenchConfig, on_result: Callable[[str, dict[str, Any]], None] | None = None
                    ) -> dict[str, Any]:
    """Build the model, time every batch size, run the eval path; a JSON-able dict.

    ``on_result(kind, value)`` is called as soon as each part is known (``"config"``, ``"device"``,
    ``"model"``, ``"row"``, ``"eval"``), so a run cut short by a time limit still leaves its
    setting and finished measurements.
    """
    report = on_result or (lambda kind, value: None)
    cfg.validate()
    device = _resolve_device(cfg.device)
    config = asdict(cfg)
    config["batches"] = [f"{B}/{c}" if c else str(B) for B, c in cfg.batches]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    device_info = {"type": device.type, "name": name, "torch": torch.__version__, "threads": torch.get_num_threads()}
    report("config", config)
    report("device", device_info)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, info = build_model(cfg, device)
    info["build_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        info["weights_gib"] = torch.cuda.memory_allocated(device) / GIB
    report("model", info)
    rows = []
    for B, chunk in cfg.batches:
        rows.append(_measure_batch(model, cfg, device, B, chunk))
        report("row", rows[-1])
    evaluation = _measure_eval(model, cfg, device) if cfg.eval_queries_per_task else None
    if evaluation is not None:
        report("eval", evaluation)
    return {"config": config, "model": info, "device": device_info, "rows": rows, "eval": evaluation}


# --------------------------------------------------------------------------- report / CLI
def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    """Markdown: model and settings, one row per batch size, the evaluation path."""
    c, m, d = result["config"], result["model"], result["device"]
    lines = [
        f"## Training cost at real size: {m['what']}",
        "",
        f"- device: {d['name']} ({d['type']}), torch {d['torch']}; weights {c['dtype']}"
        + (f", {c['dtype']} autocast" if d["type"] == "cuda" and c["dtype"] != "float32" else "")
        + f"; build {m['build_s']:.1f} s" + (f", weights {m['weights_gib']:.2f} GiB" if "weights_gib" in m else ""),
        f"- parameters {m['parameters']:,} (trainable: {m['trainable_parameters']:,} = LoRA r={c['lora_r']} "
        f"+ {c['R_q'] + c['R_c']} Meta Tokens x {m['hidden_size']}); gradient checkpointing "
        f"{'on' if c['gradient_checkpointing'] else 'off'}"
        + (f"; attention: text {m['attention']['text']}, vision {m['attention']['vision']}" if "attention" in m
           else ""),
        f"- each query / positive / hard negative: one {c['image_size']} px image + {c['text_tokens']} words "
        f"+ {c['R_q'] + c['R_c']} Meta Tokens; loss query_chunk_size={c['query_chunk_size']}",
        f"- step = forward + backward + clip + AdamW; mean{' ± std' if c['steps'] > 1 else ''} over {c['steps']} "
        f"timed step(s) after {c['warmup']} warm-up; peak = torch.cuda.max_memory_allocated over the timed steps",
        "",
    ]
    table = []
    for r in result["rows"]:
        ok = r.get("status") == "ok"
        table.append({
            "batch": r["batch_size"], "GradCache chunk": r["grad_cache_chunk"] or "-",
            "tokens/step": f"{r['tokens_per_step']:,}", "max len": r["max_seq_len"],
            "step (s)": (f"{r['step_s']:.3f}" + (f" ± {r['step_s_std']:.3f}" if r.get("step_s_std") is not None
                                                  else "") if ok else r.get("status", "?")),
            "tokens/s": _fmt(r.get("tokens_per_s"), 0), "triples/s": _fmt(r.get("triples_per_s"), 2),
            "peak alloc (GiB)": _fmt(r.get("peak_allocated_gib")), "peak reserved (GiB)": _fmt(r.get("peak_reserved_gib")),
            "loss": _fmt(r.get("loss"), 3),
        })
    lines.append(markdown_table(table, list(table[0]) if table else []))
    e = result.get("eval")
    if e:
        p1 = ", ".join(f"{b} {v}" for b, v in e["overall_p1"].items())
        lines += ["", f"Evaluation path ({e['tasks']} synthetic tasks, {c['eval_queries_per_task']} queries each): "
                      f"{e['items_encoded']} items encoded in {e['encode_s']:.1f} s ({e['items_per_s']:.1f} items/s), "
                      f"{e['total_s']:.1f} s in all"
                      + (f", peak {e['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in e else "")
                      + f"; Overall P@1 (random weights, near chance): {p1}"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``metaembed train-bench``."""
    d = TrainBenchConfig()
    parser.add_argument("--backbone", default=d.backbone,
                        help="published backbone (metaembed-3b, metaembed-7b, metaembed-32b, ...) or a tiny random "
                             "one: tiny-xs|s|m|l (Qwen2.5-VL) or tiny-<family>-<size>, e.g. tiny-paligemma-s "
                             "(PaliGemma and Mllama: xs|s|m) (default: %(default)s)")
    parser.add_argument("--backbone-path", default=None, metavar="DIR",
                        help="load this local checkpoint of the backbone's family instead of random weights")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=d.dtype, choices=sorted(_DTYPES), help="backbone weight dtype")
    parser.add_argument("--batches", nargs="+", default=["8", "32"], metavar="B[/CHUNK]",
                        help="batch sizes; B/CHUNK uses GradCache with CHUNK triples per forward (default: 8 32)")
    parser.add_argument("--query-chunk-size", type=int, default=None, help="loss.query_chunk_size (default: none)")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per batch size (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="image side in px (default %(default)s)")
    parser.add_argument("--text-tokens", type=int, default=d.text_tokens, help="words per item (default %(default)s)")
    parser.add_argument("--R-q", type=int, default=d.R_q, dest="R_q")
    parser.add_argument("--R-c", type=int, default=d.R_c, dest="R_c")
    parser.add_argument("--lora-r", type=int, default=d.lora_r, dest="lora_r")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--no-hard-negatives", action="store_true")
    parser.add_argument("--pool", type=int, default=d.pool, help="distinct triples collated (default %(default)s)")
    parser.add_argument("--eval-queries", type=int, default=d.eval_queries_per_task,
                        help="synthetic eval queries per task; 0 skips the evaluation path (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the results as JSON ('-': stdout, after the report)")


def _config_from_args(args: argparse.Namespace) -> TrainBenchConfig:
    return TrainBenchConfig(
        backbone=args.backbone, backbone_path=args.backbone_path, device=args.device, dtype=args.dtype,
        batches=parse_batches(args.batches), query_chunk_size=args.query_chunk_size, steps=args.steps,
        warmup=args.warmup, image_size=args.image_size, text_tokens=args.text_tokens, R_q=args.R_q, R_c=args.R_c,
        lora_r=args.lora_r, gradient_checkpointing=not args.no_gradient_checkpointing,
        hard_negatives=not args.no_hard_negatives, pool=args.pool, eval_queries_per_task=args.eval_queries,
        seed=args.seed, progress=not args.no_progress and sys.stderr.isatty(),  # no bars in pipes and logs
    )


def run(args: argparse.Namespace) -> int:
    """Run ``metaembed train-bench``; prints the markdown report."""
    so_far: dict[str, Any] = {"complete": False, "rows": []}

    def partial(kind: str, value: dict[str, Any]) -> None:
        print(f"[train-bench] {kind}: {json.dumps(value)}", file=sys.stderr, flush=True)
        if kind == "row":
            so_far["rows"].append(value)
        else:
            so_far[kind] = value
        if args.json and args.json != "-":  # a run cut short by a time limit still leaves its finished parts
            write_json(so_far, args.json)  # (not on stdout: one JSON document there, after the report)

    try:
        result = run_train_bench(_config_from_args(args), on_result=partial)
    except (ValueError, KeyError) as e:
        print(f"metaembed train-bench: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        write_json({"complete": True, **result}, args.json)
    return 0


if __name__ == "__main__":  # python -m metaembed.train_bench == metaembed train-bench
    from .cli import main

    raise SystemExit(main(["train-bench", *sys.argv[1:]]))
