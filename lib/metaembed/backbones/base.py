"""The backbone adapter interface: one vision-language family behind one small API.

An adapter owns a ``transformers`` base model (no LM head), its tokenizer and
image processor.  It turns one :class:`~metaembed.data.records.Item` into
token ids (image tokens where the item's image goes, then the text, then the
caller's appended ids, e.g. Meta Tokens), pads a batch, and runs the model to
get last-layer hidden states ``[B, L, D]``.  Everything family-specific
(position ids, attention-mask layout, vision inputs) lives in the subclasses,
so that results do not depend on padding side or batch composition.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..config import ConfigError
from ..data.records import IMAGE_PLACEHOLDER, Item
from ..meta_tokens import MetaTokenEmbedding


class InputError(ValueError):
    """An input item cannot be encoded (empty, a missing or corrupt image, an image the processor refuses)."""


class CheckpointError(ValueError):
    """A local checkpoint directory is not the family asked for, or lacks weights the model needs."""


#: What :func:`loading` lets through: the library's own clear errors, and running out of memory.
_PASS_THROUGH = (CheckpointError, ConfigError, FileNotFoundError, MemoryError, torch.OutOfMemoryError)


@contextlib.contextmanager
def loading(path: Path | str, what: str) -> Iterator[None]:
    """Re-raise what a library loading ``what`` from ``path`` raises (transformers, tokenizers, peft and
    safetensors raise ZeroDivisionError, KeyError, AttributeError, ... for a malformed file) as a
    :class:`CheckpointError` naming ``path``; the original stays chained as its cause."""
    try:
        yield
    except _PASS_THROUGH:
        raise
    except SafetensorError as e:
        raise CheckpointError(f"{path}: a weight file cannot be read ({e}); it is truncated or corrupt") from None
    except Exception as e:  # noqa: BLE001 - re-raised, naming the file
        raise CheckpointError(f"{path}: {what} cannot be loaded ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:500]})") from e


@dataclass
class EncodedItem:
    """One tokenized item before padding: ids ``[L]`` plus sequence-aligned and image tensors."""

    input_ids: Tensor  # [L]
    seq: dict[str, Tensor] = field(default_factory=dict)  # each [L, ...]
    image: dict[str, Tensor] | None = None


def describe(item: Item) -> str:
    """Short human-readable name of an item for error messages."""
    path = str(item.image) if isinstance(item.image, (str, Path)) else None
    where = ", ".join(x for x in (path and f"image {path}", item.source and f"from {item.source}") if x) or None
    if item.uid:  # the image file too: a uid alone does not say which file to look at
        return f"item {item.uid!r}" + (f" ({where})" if where else "")
    text = (item.text or "")[:40]
    img = path or (f"<{len(item.image)} image bytes>" if isinstance(item.image, bytes) else
                   "<PIL image>" if item.image is not None else None)
    return f"item(text={text!r}, image={img!r})" + (f" from {item.source}" if item.source else "")


#: Revision of how items become model inputs (image decoding, token layout: this module and the family adapters).
#: Part of :meth:`metaembed.model.MetaEmbedModel.fingerprint`, so an embedding cache made from the old inputs is
#: recomputed, not served: bump it with any change that makes some item encode differently (the package version
#: does not move between commits).  2: PNG transparency keys, RGBA palettes, 16-bit keys, ``La`` images and the
#: PIL image processor of a checkpoint wherever torchvision is installed.
INPUT_REVISION = 2

#: Image modes with an alpha channel, composited over white like the families' processors do.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _has_alpha(img: Image.Image) -> bool:
    """An alpha channel, a PNG / GIF tRNS key (a palette's transparent entries, or the one transparent colour of
    an RGB or grayscale image), or a palette with alpha: an in-memory ``P`` image made from an RGBA one
    (``convert("P")``, ``quantize()``) has no ``transparency`` key, only an RGBA palette (PNG stores it as tRNS)."""
    return (img.mode in _ALPHA_MODES or "transparency" in img.info
            or (img.mode == "P" and img.palette is not None and img.palette.mode.endswith("A")))


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB with transparent pixels over white, where ``Image.convert("RGB")`` drops the alpha
    and leaves them black (transformers' ``convert_to_rgb``, the families' ``do_convert_rgb``, does the same
    from 5.21 on; 5.18-5.20 made ``convert("RGB")``: this does not depend on the installed version).
    16-bit grayscale is scaled to 8 bits (``convert`` clips it: a 0..65535 gradient came out 98% white), its
    tRNS key colour white too; ``I`` mode is read as 16-bit when a value exceeds 255.
    """
    if img.mode == "La":  # premultiplied LA: PIL converts it to LA only (to RGBA / RGB it raises ValueError)
        img = img.convert("LA")
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img)
        top = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, int):  # a 16-bit PNG's tRNS key, compared at full depth before scaling
            gray[arr == key] = 255
        return Image.fromarray(gray, "L").convert("RGB")
    if _has_alpha(img):  # convert("RGBA") applies a tRNS key or a palette's alpha
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_pixels(item: Item, img: Image.Image, what: str) -> None:
    """An :class:`InputError` naming ``item`` when ``img`` has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``
    (read from the header, before decoding): PIL raises only above twice the limit and otherwise decodes a
    possible decompression bomb with a warning."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise InputError(f"{describe(item)}: {what} too large: {img.width}x{img.height} = {img.width * img.height:,} "
                         f"pixels, over PIL's limit of {limit:,} (if the image is trusted, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS)")


def _open_rgb(item: Item, source: Path | io.BytesIO, what: str) -> Image.Image:
    """Decode an image file or its bytes whole, as RGB (:func:`to_rgb`); an :class:`InputError` naming
    ``item`` and ``what`` (``"image file <path>"``, ``"image bytes"``) if it cannot be read."""
    try:
        with Image.open(source) as f:
            _check_pixels(item, f, what)  # PIL itself refuses only above twice its limit (a warning below)
            f.load()
            img = to_rgb(f)
            return f.copy() if img is f else img  # an RGB file: a copy that outlives the closed file
    except InputError:  # _check_pixels' own (an InputError is a ValueError)
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{describe(item)}: {what} too large: {e} (if the image is trusted, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # ValueError: e.g. a PNG's short IHDR
        raise InputError(f"{describe(item)}: corrupt or unreadable {what}: {e}") from None


def load_image(item: Item) -> Image.Image:
    """Open an item's image as RGB (:func:`to_rgb`), with clear errors for missing, corrupt, oversized or
    empty images.

    Small images are kept as they are: every backbone's image processor resizes them (Qwen's
    ``smart_resize`` scales a side below 28 px up to its ``min_pixels``; SigLIP and Mllama resize to their
    fixed tile), as it does for the published checkpoints.
    """
    img = item.image
    if isinstance(img, (str, Path)):
        path = Path(img)
        if not path.exists():
            raise InputError(f"{describe(item)}: image file not found: {path}")
        img = _open_rgb(item, path, f"image file {path}")
    elif isinstance(img, bytes):  # decoded here, each time: the item keeps only the encoded file
        img = _open_rgb(item, io.BytesIO(img), "image bytes")
    elif isinstance(img, Image.Image):
        _check_pixels(item, img, "image")
        try:
            img.load()  # a lazily opened image: its pixels (convert used to read them here)
            img = to_rgb(img)
        except (OSError, SyntaxError) as e:  # a lazily opened image whose data are cut off
            raise InputError(f"{describe(item)}: corrupt or unreadable image: {e}") from None
    else:
        raise InputError(f"{describe(item)}: image must be a PIL image, a path or image file bytes, got "
                         f"{type(img).__name__}")
    if min(img.size) < 1:
        raise InputError(f"{describe(item)}: image of size {img.size[0]}x{img.size[1]} has no pixels")
    return img


def tiny_spec(size: str, seed: int, extra_words: Sequence[str] = ()) -> dict[str, Any]:
    """``BackboneAdapter.spec`` of a tiny random backbone: what rebuilds it (``extra_words`` only when given,
    so the specs saved before it existed read alike)."""
    spec: dict[str, Any] = {"kind": "tiny", "size": size, "seed": seed}
    if extra_words:
        spec["extra_words"] = list(extra_words)
    return spec


class BackboneAdapter(nn.Module, ABC):
    """A ``transformers`` VLM behind the interface MetaEmbed needs."""

    family: ClassVar[str]
    model_cls: ClassVar[Any]  # the transformers base model class (no LM head)
    #: config attribute -> the tokenizer token it names (the ids this adapter puts in the sequence)
    config_tokens: ClassVar[dict[str, str]] = {}
    #: whether inputs start with the tokenizer's bos token (then it must be the config's bos_token_id)
    bos_in_prompt: ClassVar[bool] = False
    #: ``from_pretrained(key_mapping=...)``: weight names of published layouts -> this model's names
    checkpoint_key_mapping: ClassVar[dict[str, str] | None] = None
    #: parts of the parameter names of the modules only an image reaches (vision tower, projector)
    image_only_modules: ClassVar[tuple[str, ...]] = ()
    #: name of the base model's decoder submodule: LoRA wraps the ``model.lora_target_modules`` projections under it
    #: only (Idefics2 / Idefics3 / SmolVLM call it ``text_model``)
    language_model_module: ClassVar[str] = "language_model"
    #: tiny random sizes :meth:`tiny` builds: name -> the family's own spec (widths, depths)
    tiny_sizes: ClassVar[Mapping[str, Any]] = {}
    #: set by the training module under multi-process FSDP: an adapter whose forward runs a varying number of
    #: model passes (Mllama's image and text-only sub-batches) then runs the same passes on every rank, since
    #: each pass all-gathers every block's shard and the ranks must issue the same collectives
    uniform_forwards: bool = False

    def image_only_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters a text-only forward leaves without a gradient: those of :attr:`image_only_modules`.
        Under DDP without ``find_unused_parameters`` their gradients must come from every rank's last
        backward, or ranks whose batch had images wait on the others (GradCache, :func:`build_trainer`)."""
        parts = self._image_only_name_parts()
        return [(n, p) for n, p in self.named_parameters() if any(part in f".{n}" for part in parts)]

    def _image_only_name_parts(self) -> tuple[str, ...]:
        return self.image_only_modules

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, spec: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.spec = dict(spec)  # how it was built: {"kind": "tiny", "size": "s", ...} or {"kind": "pretrained", "path": ...}
        self.padding_side = "right"

    # ------------------------------------------------------------------ construction
    @classmethod
    @abstractmethod
    def tiny(cls, size: str = "s", seed: int = 0, extra_words: tuple[str, ...] = ()) -> "BackboneAdapter":
        """A tiny random-weight model from the real ``transformers`` config class."""

    @classmethod
    def from_config(
        cls, config: Any, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu", image_side: int = 448,
    ) -> "BackboneAdapter":
        """Random weights for a full-size ``config`` (e.g. ``published_config("metaembed-3b")``).

        For size and speed checks without a checkpoint (``metaembed train-bench``): the architecture, dtype
        and parameter count are the config's; the tokenizer is the tiny word-level one with the family's
        image tokens (:attr:`config_tokens`), whose ids replace the config's (the embedding table keeps its
        published size).  ``device="meta"`` builds shapes only.  ``image_side``: the largest image side for
        families with a variable image grid (Qwen); PaliGemma and Mllama resize to their config's fixed tiles.
        """
        from .tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer(special_tokens=cls._tokenizer_specials())
        config = copy.deepcopy(config)
        vocab = int(config.get_text_config().vocab_size)
        if len(tok) > vocab:
            raise ValueError(f"config vocab_size={vocab} is smaller than the tiny tokenizer ({len(tok)} tokens)")
        cls._use_tokenizer_ids(config, tok)
        with seeded(seed, device), torch.device(device):
            model = cls.model_cls._from_config(config, dtype=dtype)
        cls._after_random_draw(model)
        model.eval()
        spec = {"kind": "random", "config": getattr(config, "_name_or_path", "") or config.model_type, "seed": seed}
        return cls(model, tok, cls._random_image_processor(config, image_side), spec)

    @classmethod
    def _tokenizer_specials(cls) -> list[str]:
        """The special tokens a tiny tokenizer of this family holds (its image tokens)."""
        return list(dict.fromkeys(cls.config_tokens.values()))

    @classmethod
    def _use_tokenizer_ids(cls, config: Any, tok: Any) -> None:
        """Point a full-size ``config`` at the tiny tokenizer: its :attr:`config_tokens` ids and, where inputs
        start with bos, the decoder's bos / eos / pad ids."""
        for attr, token in cls.config_tokens.items():
            setattr(config, attr, tok.convert_tokens_to_ids(token))
        if cls.bos_in_prompt:
            text = config.get_text_config()
            for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(text, attr, getattr(tok, attr))

    @classmethod
    def _after_random_draw(cls, model: nn.Module) -> None:
        """Fix what a random draw gets wrong for this family (see docs/CONTRACTS.md, "Adding a backbone family":
        modules transformers zero-initialises, modules no forward reads)."""

    @classmethod
    def _random_image_processor(cls, config: Any, image_side: int) -> Any:
        """The image processor of a random-weight build of ``config``."""
        raise NotImplementedError(f"{cls.family}: no random-weight builds (from_config)")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = torch.float32) -> "BackboneAdapter":
        """Load a real checkpoint (model, tokenizer, image processor) from a local directory.

        The checkpoint's ``config.json`` ``model_type`` must be this family's, and every weight of
        the base model must come from the checkpoint: ``transformers`` would otherwise build the
        requested architecture and randomly initialise what it cannot find (a PaliGemma or Mllama
        checkpoint loaded as ``qwen2_5_vl`` gives a random model, with only a log message).  A missing
        tokenizer or image processor file, a corrupt ``config.json`` / ``tokenizer.json`` / weight shard, or a
        tokenizer whose image token ids are not the config's raises an error naming the file (transformers would
        build an empty tokenizer, or report a corrupt shard without its name).
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{cls.family}: checkpoint directory not found: {path}")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cls.family}: {path} has no config.json (not a transformers checkpoint)")
        try:
            model_type = json.loads(cfg_file.read_text()).get("model_type")
        except (ValueError, RecursionError, AttributeError) as e:  # AttributeError: not a JSON object
            raise CheckpointError(f"{cfg_file}: not a valid JSON config ({e})") from None
        expected = cls.model_cls.config_class.model_type
        if model_type != expected:
            raise CheckpointError(
                f"{cfg_file}: model_type {model_type!r} is not a {cls.family!r} checkpoint (expected {expected!r}); "
                f"set model.backbone to the checkpoint's family"
            )
        if not any((path / f).is_file() for f in TOKENIZER_FILES):  # else transformers builds an empty tokenizer
            raise FileNotFoundError(f"{cls.family}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        present = ", ".join(f for f in (*TOKENIZER_FILES, *TOKENIZER_CONFIG_FILES) if (path / f).is_file())
        with loading(path, f"the tokenizer ({present})"):  # a corrupt tokenizer.json, a null tokenizer_config.json
            tok = AutoTokenizer.from_pretrained(path)
        with loading(cfg_file, "the model config"):
            config = cls.model_cls.config_class.from_pretrained(path)
        cls._check_tokenizer(tok, config, path)
        if not any((path / f).is_file() for f in PROCESSOR_FILES):
            raise FileNotFoundError(f"{cls.family}: {path} has no image processor config "
                                    f"(none of {', '.join(PROCESSOR_FILES)})")
        # the PIL backend on every machine: with torchvision installed transformers picks its torchvision
        # processors, which resize otherwise, so one checkpoint embedded the same image differently there
        with loading(path, "the image processor"):
            proc = AutoImageProcessor.from_pretrained(path, backend="pil")
        _check_weight_index(path)
        kwargs = {"key_mapping": cls.checkpoint_key_mapping} if cls.checkpoint_key_mapping else {}
        with loading(path, "the model"):
            try:
                model, info = cls.model_cls.from_pretrained(path, dtype=_to_dtype(dtype), output_loading_info=True,
                                                            **kwargs)
            except SafetensorError as e:  # name the damaged shard (a CheckpointError passes through loading)
                bad = [f for f in sorted(path.glob("*.safetensors")) if not _readable(f)]
                raise CheckpointError(f"{', '.join(map(str, bad)) or path}: weight file cannot be read ({e}); it is "
                                      "truncated or corrupt") from None
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} weights of the {cls.family} model are not in the checkpoint and would be "
                f"random, e.g. {missing[:3]}"
            )
        return cls(model, tok, proc, {"kind": "pretrained", "path": str(path)})

    @classmethod
    def _check_tokenizer(cls, tok: Any, config: Any, path: Path) -> None:
        """The tokenizer's image tokens must be the ids the checkpoint's config gives the model, and its bos token
        the config's where inputs start with one (a ``tokenizer.json`` without ``tokenizer_config.json`` /
        ``special_tokens_map.json`` loads with no bos, and every PaliGemma / Mllama input silently lost it)."""
        if cls.bos_in_prompt:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            want = getattr(text, "bos_token_id", None)
            if want is None:
                want = getattr(config, "bos_token_id", None)
            if want is not None and tok.bos_token_id != want:
                raise CheckpointError(
                    f"{path}: the tokenizer's bos token id is {tok.bos_token_id!r} but config.json's bos_token_id is "
                    f"{want!r}; the tokenizer lacks its special tokens (tokenizer_config.json / "
                    "special_tokens_map.json missing or not this checkpoint's)")
        for attr, token in cls.config_tokens.items():
            want, got = getattr(config, attr, None), tok.convert_tokens_to_ids(token)
            if got is None or got == tok.unk_token_id or (want is not None and got != want):
                raise CheckpointError(
                    f"{path}: the tokenizer gives {token!r} the id {got!r} but config.json's {attr} is {want!r}; "
                    "the tokenizer files do not belong to this checkpoint")

    @staticmethod
    def check_size(size: str, sizes: dict[str, Any]) -> Any:
        """The tiny-size spec named ``size``; ValueError naming the known sizes otherwise."""
        if size not in sizes:
            raise ValueError(f"unknown tiny size {size!r}; choose from {sorted(sizes)}")
        return sizes[size]

    def save(self, directory: str | Path, weights: bool = True) -> None:
        """Save tokenizer, image processor and (optionally) the backbone weights.

        The weights form a standard ``transformers`` checkpoint even with Meta Tokens installed: the
        original embedding table is saved under its own name (``embed_tokens.weight``, not
        ``embed_tokens.base.weight``); ``M_q`` / ``M_c`` are :class:`~metaembed.model.MetaEmbedModel`'s to save.
        A LoRA-wrapped backbone is refused with ``weights=True`` (peft would write the adapter alone).
        """
        if weights and hasattr(self.model, "peft_config"):  # peft's save_pretrained writes the adapter only
            raise ValueError(
                f"{self.family}: this backbone carries a LoRA adapter, and saving it writes the adapter alone, "
                "not a checkpoint; save the model with MetaEmbedModel.save_pretrained, or merge the adapter "
                "first (backbone.model = backbone.model.merge_and_unload())")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if weights:
            emb = self.model.get_input_embeddings()
            wrapped = isinstance(emb, MetaTokenEmbedding)
            if wrapped:
                self.model.set_input_embeddings(emb.base)
            try:
                self.model.save_pretrained(directory)
            finally:
                if wrapped:
                    self.model.set_input_embeddings(emb)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        (directory / "metaembed_backbone.json").write_text(json.dumps({"family": self.family, **self.spec}))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def pad_token_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else 0)

    def token_id(self, token: str) -> int:
        """Id of ``token`` in this backbone's tokenizer; KeyError if the tokenizer lacks it."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise KeyError(f"token {token!r} is not in the {self.family} tokenizer")
        return int(tid)

    def enable_gradient_checkpointing(self) -> None:
        """Non-reentrant activation checkpointing of the backbone's layers, without input-grad hooks.

        transformers also hooks every input embedding (``enable_input_require_grads``), which only
        reentrant checkpointing needs: on the vision tower's patch embedding it makes a frozen
        ViT's activations require grad, so the whole tower is recomputed and backpropagated for
        gradients nobody uses.  Non-reentrant checkpointing gives LoRA weights and Meta Tokens
        their gradients without the hooks, so they are removed.
        """
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(self.model, "disable_input_require_grads"):
            self.model.disable_input_require_grads()

    # ------------------------------------------------------------------ encoding one item
    def text_ids(self, text: str) -> list[int]:
        """Token ids of item text, read as plain text: a special token's string in it (``<image>``, a Meta
        Token's name, ``<|im_start|>``) is spelled out, never turned into the reserved id itself."""
        if not text.strip():
            return []
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def encode_item(self, item: Item, append_ids: list[int], max_text_length: int = 256) -> EncodedItem:
        """Token ids for ``item`` = family prefix/image tokens + text + ``append_ids`` (e.g. Meta Tokens).

        The item's text is cut to its first ``max_text_length`` (>= 1) tokens; image and appended ids are kept.
        """
        if max_text_length < 1:  # 0 (or less) would drop every word: all text-only items would encode alike
            raise ValueError(f"max_text_length must be >= 1, got {max_text_length!r}")
        text = item.text or ""
        if text.count(IMAGE_PLACEHOLDER) > 1:
            raise InputError(f"{describe(item)}: only one {IMAGE_PLACEHOLDER} placeholder per item is supported")
        before, _, after = text.partition(IMAGE_PLACEHOLDER) if IMAGE_PLACEHOLDER in text else ("", "", text)
        if not item.has_image and not (before + after).strip():
            raise InputError(f"{describe(item)}: empty item (no text and no image)")
        before_ids, after_ids = self.text_ids(before), self.text_ids(after)
        if len(before_ids) + len(after_ids) > max_text_length:  # truncate the text, never the image or appended ids
            keep = max(max_text_length - len(before_ids), 0)
            after_ids = after_ids[:keep]
            before_ids = before_ids[:max_text_length]
        image_inputs, image_ids = None, []
        if item.has_image:
            pil = load_image(item)
            try:
                image_inputs, image_ids = self.process_image(pil)
            except ValueError as e:  # the processor refuses the image (Qwen: aspect ratio of 200 or more)
                raise InputError(f"{describe(item)}: the {self.family} image processor cannot take its "
                                 f"{pil.size[0]}x{pil.size[1]} image: {e}") from e
        return self.assemble(before_ids, image_ids, after_ids, list(append_ids), image_inputs)

    @abstractmethod
    def process_image(self, image: Image.Image) -> tuple[dict[str, Tensor], list[int]]:
        """Vision inputs for one image and the token ids that stand for it in the sequence."""

    @abstractmethod
    def assemble(
        self,
        before: list[int],
        image_ids: list[int],
        after: list[int],
        append: list[int],
        image_inputs: dict[str, Tensor] | None,
    ) -> EncodedItem:
        """Put the pieces in the family's order and build its sequence-aligned extras."""

    # ------------------------------------------------------------------ batching
    def collate(self, items: list[EncodedItem]) -> dict[str, Tensor]:
        """Pad a list of encoded items on ``self.padding_side`` and merge their vision inputs."""
        if not items:
            raise InputError("cannot collate an empty batch")
        L = max(len(e.input_ids) for e in items)
        left = self.padding_side == "left"
        ids = torch.full((len(items), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), L), dtype=torch.long)
        seq: dict[str, Tensor] = {}
        for b, e in enumerate(items):
            n = len(e.input_ids)
            sl = slice(L - n, L) if left else slice(0, n)
            ids[b, sl] = e.input_ids
            mask[b, sl] = 1
            for k, v in e.seq.items():
                if k not in seq:
                    seq[k] = torch.zeros((len(items), L, *v.shape[1:]), dtype=v.dtype)
                seq[k][b, sl] = v
        batch = {"input_ids": ids, "attention_mask": mask, **seq}
        batch.update(self.collate_images(items))
        return batch

    @abstractmethod
    def collate_images(self, items: list[EncodedItem]) -> dict[str, Tensor]:
        """Merge the per-item vision inputs of a batch (items without images contribute nothing)."""

    # ------------------------------------------------------------------ running
    @abstractmethod
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Last-layer hidden states ``[B, L, D]`` for a collated batch."""

    @staticmethod
    def positions_from_mask(attention_mask: Tensor, start: int = 0) -> Tensor:
        """Position ids that count only real tokens, so padding side never changes them. # [B, L]"""
        pos = attention_mask.long().cumsum(-1) - 1 + start
        return pos.clamp(min=start).masked_fill(attention_mask == 0, start)


#: Files a published tokenizer is read from (one of them must be present).
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.json")
#: Files that give a tokenizer its special tokens (bos, pad, ...) beside ``TOKENIZER_FILES``.
TOKENIZER_CONFIG_FILES: tuple[str, ...] = ("tokenizer_config.json", "special_tokens_map.json")
#: Files a published image processor is read from (transformers 5 nests it in ``processor_config.json``).
PROCESSOR_FILES: tuple[str, ...] = ("preprocessor_config.json", "processor_config.json")


def _check_weight_index(path: Path) -> None:
    """:class:`CheckpointError` naming ``model.safetensors.index.json`` when it is not a JSON object with a
    ``weight_map`` object (transformers raised a bare JSONDecodeError / TypeError naming no file)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        data = json.loads(index.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4,300 digits
        raise CheckpointError(f"{index}: not valid JSON ({e}); the weight index is truncated or corrupt") from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' object (weight name -> shard "
                              "file); the weight index is corrupt")


def _readable(file: Path) -> bool:
    """Whether a safetensors file's header and every tensor in it can be read."""
    try:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                f.get_slice(key)
        return True
    except (SafetensorError, OSError):
        return False


def _to_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """Draw random weights under ``torch.manual_seed(seed)``, then restore the global RNGs.

    ``torch.manual_seed`` also reseeds every CUDA device, so their generators are forked and
    restored too when CUDA is already in use or ``device`` is a CUDA device (a weight draw must not
    change later sampling); CUDA is never initialised just for this (that would break fork-based DDP).
    """
    on_cuda = device is not None and torch.device(device).type == "cuda"
    devices = list(range(torch.cuda.device_count())) if (on_cuda or torch.cuda.is_initialized()) else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
