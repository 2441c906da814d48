"""Configuration as small dataclasses, loaded from YAML with strict key checking.

One :class:`RunConfig` holds everything a run needs: the model (backbone, Meta
Tokens, pooling, LoRA), the MMR loss (groups, ``tau``, ``w_g``), training and
data settings, and evaluation budgets.  Unknown keys raise :class:`ConfigError`
naming the full dotted key, so a typo never silently falls back to a default;
values are cast to the fields' type hints (``"1e-3"`` to a float for ``lr``) or
rejected with a :class:`ConfigError` naming the key (``max_steps: ten``).
"""
from __future__ import annotations

import copy
import dataclasses
import decimal
import math
import operator
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

#: The paper's G = 5 Matryoshka groups (r_q, r_c), §4.1.
DEFAULT_GROUPS: tuple[tuple[int, int], ...] = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))

POOLINGS = ("meta", "single-last", "single-mean", "split")
#: ``model.backbone`` families and the ``model.tiny_size`` names each builds without a checkpoint
#: (:data:`metaembed.backbones.BACKBONES` and each adapter's ``tiny_sizes``; kept here so that a config is
#: checked without importing ``transformers``; :func:`metaembed.backbones.register_backbone` adds a family to both).
TINY_SIZES: dict[str, tuple[str, ...]] = {
    "qwen2_5_vl": ("xs", "s", "m", "l"),
    "qwen2_vl": ("xs", "s", "m", "l"),
    "paligemma": ("xs", "s", "m"),
    "mllama": ("xs", "s", "m"),
}
#: What an unknown ``model.backbone`` error adds: where a family of one's own has to be registered.
UNKNOWN_BACKBONE_HINT = ("a family of your own must be registered in this process: metaembed.backbones."
                         "register_backbone in a module it imports, or an entry point of an installed package in "
                         "the 'metaembed.backbones' group; docs/CONTRACTS.md, 'Adding a backbone family'")
#: ``model.dtype`` names (:func:`metaembed.backbones.base._to_dtype`).
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
LAYOUTS = ("both", "role")
#: Largest ``model.image_size``: a 32768 x 32768 RGB image is already 3 GiB, far above any backbone's processor.
MAX_IMAGE_SIDE = 2**15
LR_SCHEDULES = ("constant", "cosine")
#: Values of ``train.final_weights``: the weights a run saves as its model.
FINAL_WEIGHTS = ("last", "best")


class ConfigError(ValueError):
    """A configuration file or dict does not describe a valid run."""


@dataclass
class ModelConfig:
    """Backbone and Meta Token settings (§3.2).

    ``pooling='meta'`` is MetaEmbed; ``single-last``, ``single-mean`` and
    ``split`` are the Table 5 baselines on the same backbone.  ``layout='both'``
    appends ``[M_q; M_c]`` to every input (the paper's ``[v; t; M_q; M_c]``) and
    reads the role's outputs; ``layout='role'`` appends only the role's tokens.
    """

    backbone: str = "qwen2_5_vl"
    backbone_path: str | None = None  # local checkpoint dir; None builds a tiny random model
    tiny_size: str = "s"
    R_q: int = 16
    R_c: int = 64
    pooling: str = "meta"
    layout: str = "both"
    lora: bool | None = None  # None: LoRA for pretrained checkpoints, full fine-tuning for tiny ones
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    max_text_length: int = 256
    image_size: int | None = None  # resize images to this square side before the processor (None: keep)
    seed: int = 0  # a tiny backbone's random weights and the Meta Token draw (LoRA's init follows train.seed)

    def validate(self) -> None:
        """Choices, counts (ints, never bools) and the LoRA settings (§4.1: r = alpha = 32)."""
        # a misspelt family, dtype or tiny size failed in the model build, after the data were loaded
        if self.backbone not in TINY_SIZES:
            from .backbones import load_plugins

            load_plugins()  # the families installed packages declare
        if self.backbone not in TINY_SIZES:
            raise ConfigError(f"model.backbone={self.backbone!r}; expected one of {tuple(TINY_SIZES)} "
                              f"({UNKNOWN_BACKBONE_HINT})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r}; expected one of {DTYPES}")
        if self.backbone_path is None and self.tiny_size not in TINY_SIZES[self.backbone]:
            raise ConfigError(f"model.tiny_size={self.tiny_size!r}; the tiny {self.backbone} sizes are "
                              f"{TINY_SIZES[self.backbone]} (model.backbone_path is null: a tiny random model)")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"model.pooling={self.pooling!r}; expected one of {POOLINGS}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"model.layout={self.layout!r}; expected one of {LAYOUTS}")
        for key in ("R_q", "R_c", "max_text_length", "lora_r"):  # max_text_length 0 would drop every word
            _check_count(getattr(self, key), f"model.{key}", 1)
        _check_count(self.image_size, "model.image_size", 1, optional=True)
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIDE:  # PIL: OverflowError, or terabytes
            raise ConfigError(f"model.image_size={short_repr(self.image_size)} is larger than any image a backbone "
                              f"processes; at most {MAX_IMAGE_SIDE} (a square side in pixels)")
        # LoRA's update is (alpha / r) * B A x: alpha 0 scales it to 0, dropout 1 zeroes its input, and
        # either leaves every LoRA gradient 0 (training silently updates the Meta Tokens alone)
        _check_count(self.lora_alpha, "model.lora_alpha", 1)
        _check_number(self.lora_dropout, "model.lora_dropout", positive=False)
        if self.lora_dropout >= 1:
            raise ConfigError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError("model.lora_target_modules is empty; LoRA would adapt no layer")
        _check_seed(self.seed, "model.seed")


@dataclass
class LossConfig:
    """MMR loss (Eq. 4-7): groups (r_q, r_c), temperature ``tau`` and weights ``w_g``.

    ``mmr=False`` is the paper's NoMMR ablation: only the last (largest) group.
    """

    groups: list[tuple[int, int]] = field(default_factory=lambda: [tuple(g) for g in DEFAULT_GROUPS])
    weights: list[float] | None = None
    tau: float = 0.03
    mmr: bool = True
    use_hard_negatives: bool = True
    # Queries per block of the loss (mmr_loss(query_chunk_size=...)): bounds the [b, r_q, N_c, r_c]
    # similarity block (fp32) at large batches; None computes all B queries at once. Same value and gradients.
    query_chunk_size: int | None = None
    # Beyond Eq. 6: leave the other copies of a query's positive in the batch (same text and image, e.g. a
    # class label two classification queries share) out of its denominator instead of counting them as negatives.
    mask_duplicate_candidates: bool = False

    def active_groups(self) -> list[tuple[int, int]]:
        """The groups the loss sums over (Eq. 7): all of them with MMR, only the last (full budget) without."""
        groups = [tuple(int(x) for x in g) for g in self.groups]
        return groups if self.mmr else groups[-1:]

    def active_weights(self) -> list[float]:
        """w_g of :meth:`active_groups` (Eq. 7): 1 each when ``weights`` is null."""
        if self.weights is None:
            return [1.0] * len(self.active_groups())
        if len(self.weights) != len(self.groups):
            raise ConfigError(f"loss.weights has {len(self.weights)} entries for {len(self.groups)} groups")
        return list(self.weights) if self.mmr else list(self.weights[-1:])

    def validate(self) -> None:
        """``tau`` finite and > 0; ``w_g`` finite and >= 0, the active ones not all zero (Eq. 5, 7)."""
        _check_number(self.tau, "loss.tau", positive=True)
        if self.weights is not None:
            for i, w in enumerate(self.weights):
                _check_number(w, f"loss.weights[{i}]", positive=False)
            if not any(self.active_weights()):
                raise ConfigError(f"loss.weights: every active group weight is 0 (weights={list(self.weights)}, "
                                  f"mmr={self.mmr}): the loss would be 0")
        _check_count(self.query_chunk_size, "loss.query_chunk_size", 1, optional=True)


@dataclass
class TrainConfig:
    """Optimisation and Lightning trainer settings (Appendix A)."""

    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 100
    max_epochs: int = -1
    precision: str = "32-true"  # or "bf16-mixed"
    strategy: str = "auto"  # "ddp", "fsdp", ...
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    val_fraction: float = 0.01
    # validate every n training batches (Lightning's count; None: at each epoch end).  With accumulation a run of
    # max_steps takes about max_steps * accumulate_grad_batches batches, and a validation may fall mid-step
    val_check_interval: int | None = None
    early_stopping_patience: int | None = None
    num_workers: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    log_every_n_steps: int = 10
    gather_across_ranks: bool = True
    placeholder_image: bool = False  # image-less batches get an extra placeholder-image row, out of the loss (Appendix A)
    progress_bar: bool = True
    lr_schedule: str = "constant"  # after linear warmup: "constant" or "cosine" (to max_steps)
    grad_cache_chunk_size: int | None = None  # GradCache: encode in chunks of this size (None: plain path)
    checkpoint_every_n_steps: int | None = None  # also save last.ckpt every n optimizer steps (resume)
    # the weights <output_dir>/model holds: "last" (where training stopped) or "best" (the lowest val/loss of the
    # held-out split; needs val_fraction > 0); after early stopping, "last" is `patience` validations past the best
    final_weights: str = "last"

    def validate(self) -> None:
        """Ranges the trainer would otherwise reject late or misread silently (e.g. a negative clip value)."""
        for key in ("batch_size", "num_nodes", "accumulate_grad_batches"):
            _check_count(getattr(self, key), f"train.{key}", 1)
        for key in ("warmup_steps", "num_workers", "log_every_n_steps"):  # 0 logs nothing (Lightning)
            _check_count(getattr(self, key), f"train.{key}", 0)
        for key in ("val_check_interval", "grad_cache_chunk_size", "checkpoint_every_n_steps"):
            _check_count(getattr(self, key), f"train.{key}", 1, optional=True)
        _check_count(self.early_stopping_patience, "train.early_stopping_patience", 0, optional=True)
        if self.final_weights not in FINAL_WEIGHTS:
            raise ConfigError(f"train.final_weights={self.final_weights!r}; expected one of {FINAL_WEIGHTS}")
        if self.final_weights == "best" and not self.val_fraction:
            raise ConfigError("train.final_weights='best' needs a held-out split to pick the best weights on; "
                              "set train.val_fraction > 0 (or train.final_weights=last)")
        _check_count(self.max_steps, "train.max_steps", 1, unlimited=True)
        _check_count(self.max_epochs, "train.max_epochs", 1, unlimited=True)
        if self.max_steps == -1 and self.max_epochs == -1 and (self.early_stopping_patience is None
                                                                or self.val_fraction == 0):
            # Lightning reads max_epochs=-1 as infinite training: nothing would ever end the run
            raise ConfigError("train.max_steps=-1 and train.max_epochs=-1: the run would never stop; set "
                              "train.max_steps or train.max_epochs (or early stopping: train.early_stopping_patience "
                              "with train.val_fraction > 0)")
        if not isinstance(self.devices, str):
            _check_count(self.devices, "train.devices", 1, unlimited=True)
        elif not _DEVICES_STR.fullmatch(self.devices.replace(" ", "")):  # '1.5' failed in L.Trainer after the build
            raise ConfigError(f"train.devices must be an integer >= 1, -1, 'auto' or a list of device ids like '0,1', "
                              f"got {_describe(self.devices)}")
        _check_seed(self.seed, "train.seed")
        _check_number(self.lr, "train.lr", positive=False)  # 0 freezes the weights (a baseline)
        _check_number(self.weight_decay, "train.weight_decay", positive=False)
        if self.gradient_clip_val is not None:  # 0 and null: no clipping (as Lightning reads them)
            _check_number(self.gradient_clip_val, "train.gradient_clip_val", positive=False)
        _check_number(self.val_fraction, "train.val_fraction", positive=False)
        if self.val_fraction >= 1:
            raise ConfigError(f"train.val_fraction must be in [0, 1), got {self.val_fraction}")
        check_lr_schedule(self.lr_schedule, self.max_steps, self.warmup_steps)


@dataclass
class DataConfig:
    """Where the training and evaluation data come from.

    ``n_train`` / ``n_eval_queries`` size the ``synthetic`` benchmark (``None``: 512
    triples, 40 queries per task); file sources ignore them (older saved configs
    spell 512 / 40 there).  ``max_train`` / ``max_eval_queries`` cap ``mmeb``
    data: a ``seed``-seeded sample of the training triples and the first N
    queries of each MMEB-eval task (``None``: everything); ``max_doc_queries`` /
    ``max_doc_pages`` cap the ViDoRe tasks of ``vidore_path`` (smoke runs; the
    NDCG@k of a capped corpus is not comparable with the paper's, see
    :func:`metaembed.data.vidore.cap_task`).  Relative paths are
    read from the working directory; a trained model's saved run config holds
    them absolute.
    """

    #: The keys holding file-system paths (made absolute in a trained model's saved run config).
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("path", "eval_path", "image_root", "eval_image_root", "vidore_path",
                                            "vidore_train", "vidore_train_image_dir")
    #: Values of ``negatives`` and ``negative_choice``.
    NEGATIVES: ClassVar[tuple[str, ...]] = ("auto", "single", "list")
    NEGATIVE_CHOICES: ClassVar[tuple[str, ...]] = ("first", "random")
    UNKNOWN_ID_CHOICES: ClassVar[tuple[str, ...]] = ("error", "skip")
    SOURCES: ClassVar[tuple[str, ...]] = ("synthetic", "mmeb")

    source: str = "synthetic"  # synthetic | mmeb
    path: str | None = None
    eval_path: str | None = None
    n_train: int | None = None  # synthetic training triples (None: 512); not used by mmeb
    n_eval_queries: int | None = None  # synthetic queries per task (None: 40); not used by mmeb
    n_candidates: int = 8
    image_size: int = 56
    seed: int = 0
    subsets: list[str] | None = None
    max_per_subset: int | None = None
    subset_weights: dict[str, float] | None = None
    max_train: int | None = None  # mmeb: a seeded sample of this many training triples (None: all)
    max_eval_queries: int | None = None  # mmeb: the first N queries of each MMEB-eval task (None: all)
    max_doc_queries: int | None = None  # vidore_path: the first N queries of each ViDoRe task (None: all)
    max_doc_pages: int | None = None  # vidore_path: pages per ViDoRe corpus, judged ones first (None: all)
    split: str = "original"  # MMEB-train parquet prefix: "original" (MMEB), "diverse_instruction" or "train" (mmE5/MoCa)
    image_root: str | None = None  # root the parquet image paths (images/<Subset>/...) are relative to (default: path)
    negatives: str = "auto"  # neg_text/neg_image_path cells: auto | single (one string) | list (MoCa stringified lists)
    negative_choice: str = "first"  # the hard negative kept from a list: first | random (seeded by data.seed)
    skip_missing: bool = False  # MMEB-train rows whose image file is missing: error (False) or counted skip
    check_images: bool = True  # MMEB-train/-eval image paths exist at load; ViDoRe-train pages decode when written
    eval_tasks: list[str] | None = None  # MMEB-eval task subset (None: all 36)
    eval_image_root: str | None = None  # root the MMEB-eval image paths are relative to (default: eval_path)
    vidore_path: str | None = None  # local ViDoRe v1 / v2 root for document retrieval evaluation
    vidore_unknown_ids: str = "error"  # v2 qrels naming a query / page id not in the files: error | skip (counted)
    vidore_train: str | None = None  # mmeb: local ViDoRe-train (vidore/colpali_train_set), trained with MMEB-train
    vidore_train_image_dir: str | None = None  # its pages, written once (None: <vidore_train>/.metaembed-pages)
    # ViDoRe items carry no instruction as loaded (MMEB items keep their parquet's); the paper states none.
    # Prepended to every ViDoRe query / the text of every page, in training and evaluation
    # (metaembed.data.vidore.instruct_task), e.g. VLM2Vec-V2's "Find a document image that matches the given
    # query: " and "Understand the content of the provided document image."
    vidore_query_instruction: str = ""
    vidore_page_instruction: str = ""

    def validate(self) -> "DataConfig":
        """Choices and counts the loaders would otherwise reject late (or read silently)."""
        for key, value, choices in (("source", self.source, self.SOURCES),
                                    ("negatives", self.negatives, self.NEGATIVES),
                                    ("negative_choice", self.negative_choice, self.NEGATIVE_CHOICES),
                                    ("vidore_unknown_ids", self.vidore_unknown_ids, self.UNKNOWN_ID_CHOICES)):
            if value not in choices:
                raise ConfigError(f"data.{key}={value!r}; expected one of {choices}")
        for key, minimum in (("n_train", 0), ("n_eval_queries", 1), ("max_per_subset", 0), ("max_train", 0),
                             ("max_eval_queries", 1), ("max_doc_queries", 1), ("max_doc_pages", 1)):
            _check_count(getattr(self, key), f"data.{key}", minimum, optional=True)
        for name, w in (self.subset_weights or {}).items():
            _check_number(w, f"data.subset_weights.{name}", positive=False)
        _check_seed(self.seed, "data.seed")
        if self.source == "synthetic":  # its generator's limits, here rather than after the model has loaded
            from .data.synthetic import MAX_CANDIDATES

            _check_count(self.n_candidates, "data.n_candidates", 2)
            _check_count(self.image_size, "data.image_size", 16)
            if self.n_candidates > MAX_CANDIDATES or self.image_size % 2:
                raise ConfigError(f"data.n_candidates={self.n_candidates}, data.image_size={self.image_size}: the "
                                  f"synthetic tasks take 2..{MAX_CANDIDATES} candidates and an even image size")
        for key in ("vidore_query_instruction", "vidore_page_instruction"):
            value = getattr(self, key)
            if not isinstance(value, str):
                raise ConfigError(f"data.{key} must be a string ('' for none), got {type(value).__name__} {value!r}")
            if value and not (self.vidore_path or self.vidore_train):
                raise ConfigError(f"data.{key}={value!r} is an instruction for ViDoRe items, but neither "
                                  "data.vidore_path nor data.vidore_train is set")
        return self


@dataclass
class EvalConfig:
    """Evaluation budgets (r_q, r_c) scored from one encoding pass."""

    budgets: list[tuple[int, int]] | None = None  # None: the loss groups
    batch_size: int = 32
    cache_dir: str | None = None
    ndcg_k: int = 5
    # P@1 when the positive ties the best other candidate: "first" counts a hit (VLM2Vec's argmax),
    # "pessimistic" a miss, "expected" 1 / (number tied); see evaluation.precision_at_1
    ties: str = "first"

    def validate(self) -> None:
        """``batch_size`` and ``ndcg_k`` ints >= 1, ``ties`` one of :data:`TIE_MODES`: checked before training."""
        _check_count(self.batch_size, "eval.batch_size", 1)
        _check_count(self.ndcg_k, "eval.ndcg_k", 1)
        if self.ties not in TIE_MODES:
            raise ConfigError(f"eval.ties={self.ties!r}; expected one of {TIE_MODES}")


#: How Precision@1 counts a tie between the positive and the best other candidate (``eval.ties``).
TIE_MODES = ("first", "pessimistic", "expected")


@dataclass
class RunConfig:
    """A whole run: ``model``, ``loss``, ``train``, ``data`` and ``eval`` sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "run"

    def validate(self) -> "RunConfig":
        """Check every section and the groups against the model's R_q / R_c; returns ``self``."""
        from .groups import validate_groups

        _check_no_empty_paths(self)
        self.model.validate()
        self.data.validate()  # choices and counts: before a model is loaded or built, not in load_benchmark after it
        R_q, R_c = self.model_vector_counts()
        try:  # every group, also for NoMMR (mmr=False trains the last one, but all are the default eval budgets)
            validate_groups(self.loss.groups, R_q=R_q, R_c=R_c)
        except ValueError as e:
            hint = ""
            if self.model.pooling in ("single-last", "single-mean"):
                hint = (f" (model.pooling={self.model.pooling!r} gives one vector per item, whatever model.R_q / "
                        f"model.R_c say: set loss.groups=[[1,1]] and loss.mmr=false, as the notebooks' "
                        f"{self.model.pooling} method does)")
            raise ConfigError(f"loss.groups: {e}{hint}") from None
        self.loss.validate()
        self.train.validate()
        self.eval.validate()
        return self

    def model_vector_counts(self) -> tuple[int, int]:
        """(R_q, R_c) actually produced by the configured pooling."""
        if self.model.pooling in ("single-last", "single-mean"):
            return 1, 1
        return self.model.R_q, self.model.R_c

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (what :func:`config_to_yaml` writes)."""
        return dataclasses.asdict(self)


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as a Python int ``>= minimum``: TypeError for bools, floats and strings, ValueError below."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


class _ShortRepr(reprlib.Repr):
    """:mod:`reprlib` limits, and an int too long for ``repr`` (over ``sys.get_int_max_str_digits()``) by its size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 6, 6
        self.maxstring, self.maxlong, self.maxother = 80, 40, 80

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            return f"<int of {len(format(x, 'x')) * 4} bits>"


def short_repr(value: Any, limit: int = 300) -> str:
    """``repr(value)`` shortened for an error message to ``limit`` characters, built without the whole ``repr``
    (a YAML alias bomb of 560 bytes reads as a list whose ``repr`` is gigabytes long)."""
    text = _ShortRepr().repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    """``"<type> <value>"`` for error messages; a number typed on ``--set`` (:func:`with_text`) as its builtin."""
    kind = int if isinstance(value, _IntWithText) else float if isinstance(value, _FloatWithText) else type(value)
    return f"{kind.__name__} {short_repr(value)}"


#: ``train.devices`` as a string: ``auto`` or device ids (``0,1``); integer strings are cast to int on load.
_DEVICES_STR = re.compile(r"auto|\d+(,\d+)*,?")

#: Lightning 2.x ``Trainer(precision=...)`` values, used when its own list cannot be imported.
_LIGHTNING_PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                         "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")


def check_trainer_settings(train: TrainConfig, *, here: bool = True) -> None:
    """:class:`ConfigError` unless Lightning knows ``train.precision``, ``train.accelerator`` and ``train.strategy``,
    and (``here``) this machine has the accelerator (:func:`check_accelerator_available`).

    ``L.Trainer`` rejects a misspelt name (``bf16mixed``, ``dpp``) only once the
    data are loaded and the model is built, with a traceback; call this where a
    training run starts.  Names are matched exactly (Lightning lower-cases a
    strategy, but the trainer's ``ddp`` / ``fsdp`` handling would not see ``FSDP``).
    Imports Lightning, so it is not part of :meth:`TrainConfig.validate`.
    """
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    try:
        from lightning.fabric.connector import _PRECISION_INPUT

        precisions = tuple(dict.fromkeys(str(v) for part in typing.get_args(_PRECISION_INPUT)
                                         for v in typing.get_args(part)))
    except ImportError:  # a private name: fall back to the documented list
        precisions = _LIGHTNING_PRECISIONS
    choices = (("precision", train.precision, precisions),
               ("accelerator", train.accelerator, ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))),
               ("strategy", train.strategy, ("auto", *sorted(StrategyRegistry.available_strategies()))))
    for key, value, known in choices:
        if value not in known:
            raise ConfigError(f"train.{key}={value!r} is not a Lightning {key}; expected one of {', '.join(known)}")
    if here:
        check_accelerator_available(train)


def check_accelerator_available(train: TrainConfig) -> None:
    """:class:`ConfigError` when ``train.accelerator`` names a device this machine lacks (``gpu`` without CUDA).

    ``L.Trainer`` refuses it only once the data are loaded and the model is built, with a traceback; every
    recipe sets ``accelerator: gpu``.  :func:`check_trainer_settings` calls it (where a run starts).
    """
    from lightning.pytorch.accelerators import AcceleratorRegistry

    name = train.accelerator
    if name == "auto" or name not in ("gpu", *AcceleratorRegistry.available_accelerators()):
        return  # auto picks what exists; an unknown name is check_trainer_settings' error
    names = ("cuda", "mps") if name == "gpu" else (name,)
    if not any(AcceleratorRegistry[n]["accelerator"].is_available() for n in names):
        raise ConfigError(f"train.accelerator={name!r} but this machine has no such device "
                          f"({'no CUDA GPU is visible' if name in ('gpu', 'cuda') else 'not available'}); "
                          "use --set train.accelerator=cpu (or auto)")


def check_lr_schedule(kind: str, max_steps: int | None, warmup_steps: int) -> None:
    """:class:`ConfigError` unless ``kind`` is in :data:`LR_SCHEDULES` and a cosine decay has steps after the warmup."""
    if kind not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule={kind!r}; expected one of {LR_SCHEDULES}")
    if kind == "cosine" and (max_steps is None or max_steps <= warmup_steps):
        raise ConfigError(f"train.lr_schedule='cosine' needs train.max_steps > train.warmup_steps, "
                          f"got max_steps={max_steps}, warmup_steps={warmup_steps}")


def _check_count(value: Any, key: str, minimum: int, *, unlimited: bool = False, optional: bool = False) -> None:
    """:class:`ConfigError` naming ``key`` unless ``value`` is an int ``>= minimum`` (or -1 if ``unlimited``,
    or None if ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
    if value < minimum and not (unlimited and value == -1):
        raise ConfigError(f"{key} must be >= {minimum}{' or -1 (no limit)' if unlimited else ''}, got {value}")


def _check_seed(value: Any, key: str) -> None:
    """:class:`ConfigError` naming ``key`` unless ``value`` is an int in ``[0, 2**32 - 1]`` (what every RNG seeded
    from it accepts: NumPy refuses negative seeds, Lightning's ``seed_everything`` larger ones)."""
    _check_count(value, key, 0)
    if value > 2**32 - 1:
        raise ConfigError(f"{key} must be <= 2**32 - 1, got {value}")


def _check_number(value: Any, key: str, positive: bool) -> None:
    """:class:`ConfigError` naming ``key`` unless ``value`` is a finite number > 0 (``positive``) or >= 0."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ConfigError(f"{key} must be a finite number {'> 0' if positive else '>= 0'}, got {_describe(value)}")


def _scalar(value: Any, tp: type, key: str) -> Any:
    """``value`` cast to ``tp`` (int, float, bool or str) or :class:`ConfigError` naming ``key``.

    Casts: integral floats up to 2**53 (above, a float need not be the integer written) and numeric strings
    whose exact value is an integer (``"1e3"``) to int; ints and numeric strings (YAML reads ``1e-3`` as a
    string) to float; numbers to str.  Bools are never numbers, and nothing else becomes a bool.
    """
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
    kind = {int: "an integer", float: "a number", str: "a string"}[tp]
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be {kind}, got {_describe(value)}")
    if tp in (int, float):
        exact = isinstance(value, int) or (isinstance(value, float) and (
            tp is float or (value.is_integer() and abs(value) <= 2**53)))
        if exact or isinstance(value, str):
            try:
                return tp(value.strip() if isinstance(value, str) else value)
            except (ValueError, OverflowError):  # OverflowError: an int of 400 digits as a float
                pass
        if tp is int and isinstance(value, str):  # "1e3": YAML 1.1 reads it as a string (1.0e3 as a float)
            try:  # exactly: through a float, "1e23" was 99999999999999991611392
                number = decimal.Decimal(value.strip())
            except decimal.InvalidOperation:
                number = decimal.Decimal("NaN")
            if number.is_finite() and number.adjusted() < 4000 and number == number.to_integral_value():
                return int(number)
        raise ConfigError(f"{key} must be {kind}, got {_describe(value)}")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return getattr(value, "text", None) or str(value)  # --set name=1.10 keeps "1.10" (with_text)
    raise ConfigError(f"{key} must be a string, got {_describe(value)}")


class _IntWithText(int):
    text: str


class _FloatWithText(float):
    text: str


def with_text(value: Any, text: str) -> Any:
    """``value`` (read from ``text``, e.g. a ``--set`` value) marked with its text when it is a number, so that a
    string field keeps what was typed (``1.10``, ``0x1f``, ``010``) instead of the number's spelling; every
    other field casts it as before."""
    plain = text.strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or any(c.isspace() or c == "#" for c in plain):
        return value  # not a lone number (e.g. "1.10 # a comment"): YAML's value, as before
    out = (_IntWithText if isinstance(value, int) else _FloatWithText)(value)
    out.text = plain
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Recursively build dataclasses from dicts and cast values to their type hints.

    Unknown keys and values that do not fit the hint (``int``, ``float``,
    ``bool``, ``str``, ``X | None``, ``list[X]``, ``tuple[X, Y]``,
    ``dict[K, V]``) raise :class:`ConfigError` naming the dotted key.
    """
    where = key or "config"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names, key=str)  # a YAML int / null key beside a misspelt one
        if unknown:
            prefix = f"{key}." if key else ""
            raise ConfigError(
                f"unknown config key(s) {', '.join(prefix + str(u) for u in unknown)}; "
                f"valid keys{' under ' + key if key else ''}: {', '.join(sorted(names))}"
            )
        return tp(**{k: _coerce(v, hints[k], f"{key}.{k}" if key else k) for k, v in value.items()})
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise ConfigError(f"{where} must not be null")
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        errors = []
        for arg in args:  # first member that accepts the value: int | str reads 2 as 2 and "auto" as "auto"
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where} must be one of {' | '.join(_type_name(a) for a in typing.get_args(tp))}, "
                          f"got {_describe(value)}")
    if value is None:
        raise ConfigError(f"{where} must not be null (expected {_type_name(tp)})")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            hint = ""
            if isinstance(value, str) and value.lstrip().startswith("("):  # YAML reads [(1,1)] as strings
                hint = "; write each pair as a list [r_q, r_c]: [[1,1],[2,4]], not [(1,1),(2,4)]"
            elif _is_pair_list(tp):  # "--set eval.budgets=1,1": one pair, but a list of pairs is expected
                hint = "; write a list of [r_q, r_c] pairs: [[1,1]] or [[1,1],[2,4]]"
            raise ConfigError(f"{where} must be a list ({_type_name(tp)}), got {_describe(value)}{hint}")
        args = typing.get_args(tp)
        if _is_pair_list(tp) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in value):
            pair = f"[{value[0]},{value[1]}]"
            raise ConfigError(f"{where} must be a list of [r_q, r_c] pairs, got the single pair {pair}; "
                              f"write [{pair}]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} entries ({_type_name(tp)}), got {short_repr(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping ({_type_name(tp)}), got {_describe(value)}")
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, f"{key} key"): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp in (int, float, bool, str):
        return _scalar(value, tp, where)
    return value


def _is_pair_list(tp: Any) -> bool:
    """``list[tuple[int, int]]``: budgets and groups, lists of ``(r_q, r_c)`` pairs."""
    return typing.get_origin(tp) is list and typing.get_args(tp) == (tuple[int, int],)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (``train.max_steps``) in the nested dict ``data`` in place; returns ``data``.

    A missing or null section becomes a mapping; a section holding a scalar or
    a list raises :class:`ConfigError`.  A mapping given for a whole section
    (``train={max_steps: 2}``) is merged into it: replaced, the section's other
    keys fell back to their defaults without a word.  A mapping-valued field
    (``data.subset_weights``) is replaced.
    """
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                section = ".".join(parents[: i + 1])
                raise ConfigError(f"cannot set {dotted}: {section} is {_describe(node)}, not a mapping")
        if not parents and isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update({str(k): v for k, v in value.items()})  # one level: a mapping field is replaced
        else:
            node[last] = value
    return data


#: The sections of a :class:`RunConfig` (its nested dataclasses).
SECTIONS = ("model", "loss", "train", "data", "eval")


def dotted_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``overrides`` with each whole-section mapping (``loss={mmr: false}``) spelled as dotted keys
    (``loss.mmr``), the form :func:`apply_overrides` merges it as: checks of which keys an override sets
    (``quickstart`` refusing ``loss.mmr``, notebooks refusing a parameter's key) missed the mapping form."""
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _check_no_empty_paths(config: RunConfig) -> None:
    """An empty path (``--set model.backbone_path=``, ``--backbone "$CKPT"`` with ``CKPT`` unset) is a
    :class:`ConfigError`: it read as the working directory (``. has no config.json``), and for an
    optional path ``null`` is what means none."""
    for section in ("model", "data", "train", "eval"):
        part = getattr(config, section)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            optional = f.type == "str | None"
            if (optional or f.name == "output_dir") and isinstance(value, str) and not value.strip():
                raise ConfigError(f"{section}.{f.name} is empty" + (": write null (or leave it out) for none"
                                                                   if optional else ""))


def config_from_dict(data: dict[str, Any] | None, *, validate: bool = True) -> RunConfig:
    """Build (and ``validate``) a :class:`RunConfig` from a nested dict (unknown keys and mistyped values raise)."""
    cfg = _coerce(data or {}, RunConfig, "")
    return cfg.validate() if validate else cfg


#: Plain scalars read as bools, ints and floats by :func:`read_yaml` (YAML 1.2 core schema style): ``true`` /
#: ``false`` only (``yes``, ``no``, ``on``, ``off`` stay strings); decimal ints with leading zeros are decimal
#: (``010`` is 10), ``0o17`` octal, ``0x1f`` hex; no sexagesimal (``1:30`` stays a string), no ``_`` separators, no
#: ``0b``; floats need a dot (``1.5``, ``1.0e-3``, ``.inf``; ``1e-3`` stays a string that the config casts to a
#: number for a numeric field and keeps as written for a string field); no timestamps (``2024-05-01`` stays a string).
_YAML12_RESOLVERS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), "tTfF"),
    ("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), "-+0123456789"),
    ("tag:yaml.org,2002:float",
     re.compile(r"^(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+][0-9]+)?|\.[0-9]+(?:[eE][-+][0-9]+)?"
                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), "-+0123456789."),
)
_YAML11_ONLY = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                "tag:yaml.org,2002:timestamp"}


def _with_resolvers(base: dict[str, list[tuple[str, re.Pattern[str]]]], keep_yaml11: bool
                    ) -> dict[str, list[tuple[str, re.Pattern[str]]]]:
    """``base`` (PyYAML's YAML 1.1 implicit resolvers) with :data:`_YAML12_RESOLVERS` added, and the 1.1
    bool / int / float / timestamp ones dropped unless ``keep_yaml11`` (the dumper: quote what either reads)."""
    out = {first: [(tag, rx) for tag, rx in rs if keep_yaml11 or tag not in _YAML11_ONLY] for first, rs in base.items()}
    for tag, rx, firsts in _YAML12_RESOLVERS:
        for first in firsts:
            out.setdefault(first, []).insert(0, (tag, rx))
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading plain scalars as YAML 1.2 does (:data:`_YAML12_RESOLVERS`: ``010`` is 10,
    ``1:30``, ``yes`` and ``2024-05-01`` stay strings) that refuses a key given twice in one mapping (PyYAML
    silently keeps the last).

    A second ``max_steps:`` further down a file would otherwise override the first without a word.
    Merge keys (``<<``) may still be overridden by explicit keys.
    """

    yaml_implicit_resolvers = _with_resolvers(yaml.SafeLoader.yaml_implicit_resolvers, keep_yaml11=False)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """YAML 1.2 ints: ``010`` is decimal 10 (PyYAML: octal 8), ``0o17`` octal, ``0x1f`` hex (also ``!!int``)."""
        text = str(self.construct_scalar(node)).strip()
        try:
            if re.fullmatch(r"0o[0-7]+", text):
                return int(text[2:], 8)
            if re.fullmatch(r"[-+]?0x[0-9a-fA-F]+", text):
                return int(text, 16)
            if re.fullmatch(r"[-+]?[0-9]+", text):
                return int(text, 10)
        except ValueError:
            pass
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 integer", node.start_mark)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error below names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


class _QuotingDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes a string which YAML 1.1 *or* :func:`read_yaml` would read as a non-string
    (``'09'``, ``'0o17'`` as well as ``'yes'``), so a dumped config reads back equal with either."""

    yaml_implicit_resolvers = _with_resolvers(yaml.SafeDumper.yaml_implicit_resolvers, keep_yaml11=True)


def read_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` with YAML-1.2-like plain scalars (:data:`_YAML12_RESOLVERS`: ``010`` is 10, ``1:30``,
    ``yes``, ``off`` and ``2024-05-01`` stay strings; a float needs a dot and an exponent a sign, so ``1e-3`` and
    ``1.0e3`` stay strings where ``1.0e-3`` and ``1.0e+3`` are floats); a key given twice in one mapping is a
    ``yaml.YAMLError``.
    Used for config files and ``--set`` values alike; nesting past Python's recursion limit is a ``yaml.YAMLError``
    too."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except RecursionError:
        raise yaml.YAMLError("collections nested too deeply to read") from None


def dump_yaml(data: Any) -> str:
    """``yaml.safe_dump(data, sort_keys=False)`` whose output :func:`read_yaml` (and YAML 1.1 readers) read back
    equal: strings such as ``"09"`` or ``"yes"`` are quoted."""
    return yaml.dump(data, Dumper=_QuotingDumper, sort_keys=False)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config; ``overrides`` maps dotted keys (``train.max_steps``) to values.

    Values are cast to the dataclass field types (``lr: 1e-3``, which YAML reads
    as a string, becomes a float); a value that does not fit raises
    :class:`ConfigError` naming the file and the key.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path.read_text()) or {}  # a key given twice is an error, not the last one silently
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if {"notebook", "parameters"} <= set(data):  # experiments/quickstart.yaml for the packaged config quickstart
        raise ConfigError(f"{path} is a parameter set of `metaembed reproduce` (a notebook and its parameters), not "
                          f"a run config: run it with `metaembed reproduce {data.get('name', path.stem)}`, or pass a "
                          "run config (a packaged name such as quickstart, or experiments/configs/*.yaml)")
    try:
        return config_from_dict(apply_overrides(copy.deepcopy(data), overrides))
    except ConfigError as e:
        if overrides:  # an error of the overrides (--set) is not the file's
            try:
                config_from_dict(data)
            except ConfigError:
                pass
            else:
                raise ConfigError(f"{e} (an override / --set, applied to {path})") from None
        raise ConfigError(f"{path}: {e}") from None
