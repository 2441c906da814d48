"""MetaEmbedModel: a VLM backbone + Meta Tokens -> multi-vector embeddings ``[B, R, D]``.

For an input ``(x, I)`` the backbone consumes ``z0 = [v; t; M_q; M_c]``
(``layout='both'``, the paper's layout) or ``[v; t; M_role]``
(``layout='role'``); the last-layer hidden states at the role's Meta Token
positions, L2-normalised in fp32, are the Meta Embeddings ``E_meta`` (§3.2).
The same class runs the Table 5 baselines (``pooling`` in ``single-last``,
``single-mean``, ``split``), which append no Meta Tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backbones import BackboneAdapter, get_adapter_class, load_backbone
from .backbones import base as _inputs
from .backbones.base import CheckpointError, _to_dtype, describe, load_image, loading
from .atomic import rename_all
from .checksums import changed_files, file_digests
from .config import ConfigError, ModelConfig, _coerce, check_int, short_repr
from .data.records import Item, Role
from .meta_tokens import MetaTokenEmbedding, meta_token_names
from .pooling import l2_normalize, pool_last, pool_mean, pool_meta, pool_split

CONFIG_FILE = "metaembed_config.json"
META_FILE = "meta_tokens.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
#: What :meth:`MetaEmbedModel.save_pretrained` writes into its folder (and replaces or removes on a re-save).
SAVED_ENTRIES = (CONFIG_FILE, META_FILE, ADAPTER_DIR, BACKBONE_DIR)
#: Key of ``metaembed_config.json`` holding the sha256 of every other file a save wrote.
CHECKSUM_KEY = "sha256"
#: Files a save writes but does not checksum: model cards (peft writes ``adapter/README.md``) are meant to be edited.
UNCHECKED_FILES = ("README.md",)
#: Name prefix of the temporary folder a save writes into (followed by ``<pid>@<host>`` of the saving process).
STAGING_PREFIX = ".metaembed-save-"
ROLES = ("query", "candidate")


class NonFiniteEmbeddingError(ValueError):
    """The backbone produced NaN/Inf for some rows of a batch."""

    def __init__(self, rows: list[int], message: str):
        super().__init__(message)
        self.rows = rows


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be 'query' or 'candidate', got {role!r}")


def _lm_target_regex(modules: Sequence[str], lm: str = "language_model") -> str:
    """peft ``target_modules`` regex: the listed projections of the language model (submodule ``lm``) only."""
    return rf".*{re.escape(lm)}.*\.({'|'.join(re.escape(m) for m in modules)})"


class MetaEmbedModel(nn.Module):
    """Backbone adapter + learnable Meta Tokens + pooling (see module docstring)."""

    def __init__(self, backbone: BackboneAdapter, config: ModelConfig):
        super().__init__()
        config.validate()
        _check_backbone_matches(backbone, config)
        self.config = config
        self.backbone = backbone
        self.meta: MetaTokenEmbedding | None = None
        if config.pooling == "meta":
            self.meta = self._install_meta_tokens()
        if self.use_lora:
            self._apply_lora()
        if config.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, config: ModelConfig) -> "MetaEmbedModel":
        """Tiny random backbone (no ``backbone_path``) or a local checkpoint, with fresh Meta Tokens."""
        backbone = load_backbone(
            config.backbone, config.backbone_path, size=config.tiny_size, seed=config.seed, dtype=config.dtype
        )
        return cls(backbone, config)

    @property
    def use_lora(self) -> bool:
        return bool(self.config.lora) if self.config.lora is not None else self.config.backbone_path is not None

    def _install_meta_tokens(self, first_id: int | None = None) -> MetaTokenEmbedding:
        tok = self.backbone.tokenizer
        q_names, c_names = meta_token_names(self.config.R_q, self.config.R_c)
        before = tok.get_vocab()
        missing = [t for t in q_names + c_names if t not in before]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": q_names + c_names}, replace_extra_special_tokens=False)
        ids = tok.convert_tokens_to_ids(q_names + c_names)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            held = [sum(1 for t in before if t.startswith(f"<meta_{r}_")) for r in "qc"]
            if not any(held):
                raise ValueError(f"Meta Token ids must be contiguous in the tokenizer, got {ids}")
            where = (f"Meta Token ids must be contiguous in the tokenizer: this {self.backbone.family} tokenizer "
                     f"({self.backbone.spec})")
            if held == [self.config.R_q, self.config.R_c]:  # the right tokens, with others among their ids
                raise ConfigError(f"{where} holds {q_names + c_names} at ids {ids}; build on a tokenizer without "
                                  "them (the original base checkpoint), where they are added one after another")
            raise ConfigError(
                f"{where} already holds {held[0]} query and {held[1]} candidate Meta Tokens, not "
                f"R_q={self.config.R_q}, R_c={self.config.R_c} (a saved MetaEmbed model's backbone/ used as the "
                "base?); build on the original base checkpoint, or with the R_q / R_c it was saved with")
        core = self.backbone.model
        base = core.get_input_embeddings()
        if isinstance(base, MetaTokenEmbedding):  # a backbone shared with another MetaEmbedModel
            if (base.first_id, base.R_q, base.R_c) != (ids[0], self.config.R_q, self.config.R_c):
                raise ValueError(
                    f"the backbone already carries Meta Tokens for R_q={base.R_q}, R_c={base.R_c} (from another "
                    f"MetaEmbedModel); this one needs R_q={self.config.R_q}, R_c={self.config.R_c}: build it on a "
                    "fresh backbone")
            return base  # the same Meta Tokens: both models share M_q / M_c, as they share the backbone
        meta = MetaTokenEmbedding(base, ids[0], self.config.R_q, self.config.R_c, seed=self.config.seed)
        core.set_input_embeddings(meta)
        return meta

    def _apply_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=_lm_target_regex(cfg.lora_target_modules, self.backbone.language_model_module),
        )
        self.backbone.model = get_peft_model(self.backbone.model, lora)
        self._check_lora_targets()
        if self.meta is not None:  # peft freezes everything but the adapters; Meta Tokens stay trainable
            self.meta.M_q.requires_grad_(True)
            self.meta.M_c.requires_grad_(True)

    def _check_lora_targets(self) -> None:
        """ConfigError naming each ``model.lora_target_modules`` entry that wrapped nothing: peft raises only
        when no name matches at all, so a misspelt one ("v_prj") or one of the vision tower only ("qkv")
        silently shrank what LoRA trains."""
        wrapped, linear = set(), set()
        for name, module in self.backbone.model.named_modules():
            last = name.rsplit(".", 1)[-1]
            if hasattr(module, "lora_A"):
                wrapped.add(last)
            elif (isinstance(module, nn.Linear) and self.backbone.language_model_module in name and ".lora_" not in name
                  and last != "base_layer"):  # peft's wrapped original
                linear.add(last)
        unmatched = [m for m in self.config.lora_target_modules if m not in wrapped]
        if unmatched:
            raise ConfigError(f"model.lora_target_modules: {unmatched} name(s) no linear layer of the "
                              f"{self.backbone.family} language model; its projections: {sorted(linear | wrapped)}")

    # ------------------------------------------------------------------ shapes
    def num_vectors(self, role: Role) -> int:
        """R_q or R_c: how many vectors :meth:`forward` returns for ``role``."""
        _check_role(role)
        if self.config.pooling in ("single-last", "single-mean"):
            return 1
        return self.config.R_q if role == "query" else self.config.R_c

    @property
    def embedding_dim(self) -> int:
        return self.backbone.hidden_size

    def meta_first_id(self, role: Role) -> int:
        """Token id of the role's first Meta Token (``<meta_q_0>`` or ``<meta_c_0>``): M_c's ids follow M_q's."""
        assert self.meta is not None
        return self.meta.first_id + (0 if role == "query" else self.config.R_q)

    def append_ids(self, role: Role) -> list[int]:
        """Meta Token ids appended to an input of ``role`` (empty for the baselines)."""
        _check_role(role)
        if self.meta is None:
            return []
        q = list(range(self.meta.first_id, self.meta.first_id + self.config.R_q))
        c = list(range(self.meta.first_id + self.config.R_q, self.meta.first_id + self.meta.num_meta))
        if self.config.layout == "both":
            return q + c
        return q if role == "query" else c

    # ------------------------------------------------------------------ data -> batch -> embeddings
    def collate(self, items: Sequence[Item], role: Role) -> dict[str, Tensor]:
        """Tokenize and process ``items`` into one padded batch (CPU tensors).

        With ``model.image_size`` set, images are first resized to that square side.
        """
        append = self.append_ids(role)
        side = self.config.image_size
        if side:
            items = [
                dataclasses.replace(it, image=load_image(it).resize((side, side), Image.BICUBIC))
                if it.has_image else it
                for it in items
            ]
        encoded = [self.backbone.encode_item(it, append, self.config.max_text_length) for it in items]
        return self.backbone.collate(encoded)

    def forward(self, batch: dict[str, Tensor], role: Role) -> Tensor:
        """Multi-vector embeddings of a collated batch. # [B, R, D], fp32, unit rows"""
        _check_role(role)
        pix = batch.get("pixel_values")
        if pix is not None and pix.is_floating_point() and not bool(torch.isfinite(pix).all()):
            raise NonFiniteEmbeddingError([], "NaN/Inf in pixel_values of the batch")
        hidden = self.backbone(batch)  # [B, L, D]
        mask = batch["attention_mask"]
        pooling = self.config.pooling
        if pooling == "meta":
            E = pool_meta(hidden, batch["input_ids"], mask, self.meta_first_id(role), self.num_vectors(role))
        elif pooling == "single-last":
            E = pool_last(hidden, mask)
        elif pooling == "single-mean":
            E = pool_mean(hidden, mask)
        else:
            E = pool_split(hidden, mask, self.num_vectors(role))
        bad = ~torch.isfinite(E).all(dim=-1).all(dim=-1)  # [B]
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten().tolist()
            raise NonFiniteEmbeddingError(rows, f"NaN/Inf in {role} embeddings for batch rows {rows}")
        return l2_normalize(E)

    @torch.no_grad()
    def encode(
        self, items: Sequence[Item], role: Role, batch_size: int = 32, progress: bool = False
    ) -> Tensor:
        """Embed ``items`` in eval mode. # [N, R, D] fp32 on CPU

        Each batch is written into one preallocated ``[N, num_vectors(role), embedding_dim]`` tensor, so the
        peak memory is the output plus one batch (a list of batches joined at the end held it twice).
        """
        _check_role(role)
        if batch_size < 1:  # range() would give no batches (< 0: silently no embeddings) or fail obscurely (0)
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.empty(len(items), self.num_vectors(role), self.embedding_dim)  # [N, R, D] fp32, CPU
        try:
            starts = range(0, len(items), batch_size)
            for s in tqdm(starts, desc=f"encode {role}s", disable=not progress, leave=False):
                chunk = list(items[s : s + batch_size])
                batch = {k: v.to(device) for k, v in self.collate(chunk, role).items()}
                try:
                    E = self(batch, role)  # [b, R, D] fp32 on device
                except NonFiniteEmbeddingError as e:
                    names = ", ".join(describe(chunk[r]) for r in e.rows) or ", ".join(describe(c) for c in chunk)
                    raise NonFiniteEmbeddingError(e.rows, f"{e} -> {names}") from None
                if E.shape != (len(chunk), *out.shape[1:]) or E.dtype != out.dtype:  # copy_ would broadcast/cast
                    raise RuntimeError(f"forward returned {tuple(E.shape)} {E.dtype} for a batch of {len(chunk)} "
                                       f"{role}s; expected {(len(chunk), *out.shape[1:])} {out.dtype}")
                out[s : s + len(chunk)].copy_(E)  # device -> CPU straight into the output
        finally:
            self.train(was_training)
        return out

    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries the embeddings depend on (saved with the model, part of :meth:`fingerprint`)."""
        import PIL
        import tokenizers
        import transformers

        from . import __version__

        # Pillow resizes the images and tokenizers splits the text before any weight is read
        versions = {"metaembed": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                    "tokenizers": tokenizers.__version__, "pillow": PIL.__version__}
        if self.use_lora:
            import peft

            versions["peft"] = peft.__version__
        return versions

    def fingerprint(self) -> str:
        """Content hash of everything :meth:`encode` depends on, the key of an evaluation embedding cache.

        Covers the config (backbone, R_q/R_c, pooling, layout, text length, image size, ...), the backbone's
        transformers config (rope, norms: non-persistent buffers such as ``inv_freq`` are no weights), the
        image processor's settings and the tokenizer's vocabulary (every token and its id), every weight and buffer bit
        for bit, the torch / transformers / tokenizers / Pillow / peft / metaembed versions (an upgrade may change
        embeddings) and :data:`~metaembed.backbones.base.INPUT_REVISION` (a fix to how items become inputs).
        Reads all weights once: seconds per GB.
        """
        h = hashlib.blake2b(digest_size=16)
        head = {"config": dataclasses.asdict(self.config), "family": self.backbone.family,
                "input_revision": _inputs.INPUT_REVISION,
                "versions": self.library_versions(), "image_processor": self.backbone.image_processor.to_dict(),
                "backbone_config": _architecture(self.backbone.model.config.to_dict()),
                "vocab": hashlib.blake2b(json.dumps(sorted(self.backbone.tokenizer.get_vocab().items()),
                                                    ensure_ascii=False).encode(), digest_size=16).hexdigest()}
        h.update(json.dumps(head, sort_keys=True, default=str).encode())
        _hash_tensors(h, self.state_dict())
        return f"{self.backbone.family}-{h.hexdigest()}"

    def placeholder_image(self) -> Image.Image:
        """A plain grey image used to keep the vision tower active on image-less batches (Appendix A)."""
        return Image.new("RGB", (56, 56), (128, 128, 128))

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Save config, Meta Tokens and backbone weights (full) or LoRA adapter; round-trips bit-exactly.

        A save into a folder holding an earlier one leaves exactly this model: everything is written to a
        temporary folder inside ``directory`` first, then swapped in for the entries a save owns
        (:data:`SAVED_ENTRIES`: ``metaembed_config.json``, ``meta_tokens.safetensors``, ``adapter/``,
        ``backbone/``), those this model does not write included (the ``adapter/`` of an earlier LoRA save, the
        full weights in ``backbone/`` of an earlier full save).  Files the library did not write there (a
        README, a training run's ``run_config.yaml``) are kept.  A save that fails leaves the earlier one intact.
        A LoRA model whose base checkpoint lies in one of those entries (``DIR/backbone`` of an earlier full save)
        is refused (``ValueError``): the save would delete the base its adapter needs; so is a LoRA model whose base
        the load could not find again (:meth:`_check_base_is_recorded`).
        """
        directory = Path(directory)
        self._check_base_is_recorded()
        if self.use_lora and self.config.backbone_path:
            base = Path(self.config.backbone_path).resolve()
            for name in SAVED_ENTRIES:
                owned = (directory / name).resolve()
                if base == owned or owned in base.parents:
                    raise ValueError(
                        f"the LoRA model's base checkpoint {self.config.backbone_path} is inside {directory / name}, "
                        "which this save replaces; save the model to another folder (or copy the base elsewhere)")
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_staging_owner()}-", dir=directory))  # renames
        try:
            self._write(staging / "new")
            _swap_in(staging / "new", directory, staging / "old")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # only now: after a save killed mid-swap, its staging folder may hold the one complete model there
        _remove_stale_staging(directory)
        return directory

    def _check_base_is_recorded(self) -> None:
        """ValueError unless a LoRA save names the base :meth:`from_pretrained` will put its adapter on.

        The adapter holds the LoRA weights alone: the base is ``model.backbone_path`` when set, else the tiny
        backbone rebuilt from its spec.  A checkpoint or random (``from_config``) backbone without
        ``backbone_path`` saved a model that could not be loaded; a tiny backbone with ``backbone_path`` set
        loaded the adapter onto that checkpoint (another model, silently).
        """
        if not self.use_lora:
            return
        kind = self.backbone.spec.get("kind")
        if self.config.backbone_path is None and kind != "tiny":
            raise ValueError(
                f"this LoRA model's {kind or 'unknown'} {self.backbone.family} backbone is not recorded: set "
                "model.backbone_path to its local checkpoint (the saved adapter holds the LoRA weights alone and "
                "loads onto that base), or merge it (backbone.model = backbone.model.merge_and_unload(), "
                "model.lora=False) and save a full model")
        if self.config.backbone_path is not None and kind == "tiny":
            raise ValueError(
                f"model.backbone_path={self.config.backbone_path!r}, but this LoRA model's backbone is a tiny random "
                f"one ({self.backbone.spec}): the saved adapter would be loaded onto that checkpoint instead; "
                "set model.backbone_path=None")

    def _write(self, directory: Path) -> None:
        """Write every entry of :meth:`save_pretrained` into the fresh folder ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        meta_info: dict[str, Any] = {}
        core = self.backbone.model
        if self.meta is not None:
            save_file(
                {"M_q": self.meta.M_q.detach().contiguous().cpu(), "M_c": self.meta.M_c.detach().contiguous().cpu()},
                str(directory / META_FILE),
            )
            meta_info = {"first_id": self.meta.first_id}
        tiny_base: str | None = None
        base_fingerprint: str | None = None
        if self.use_lora:
            core.save_pretrained(directory / ADAPTER_DIR)  # peft: adapter weights only
            self.backbone.save(directory / BACKBONE_DIR, weights=False)
            if self.backbone.spec.get("kind") == "tiny":  # no base checkpoint: rebuilt from its spec on load
                spec = self.backbone.spec
                fresh = load_backbone(self.backbone.family, None, size=spec["size"], seed=spec["seed"],
                                      dtype=self.config.dtype, extra_words=spec.get("extra_words", ()))
                self._check_frozen_base_is(fresh.model, spec)
                tiny_base = _weights_digest(fresh.model)
            elif self.config.backbone_path:
                base_fingerprint = checkpoint_fingerprint(self.config.backbone_path)
        else:
            # save a standard transformers checkpoint: unwrap the Meta Token embedding while saving
            if self.meta is not None:
                core.set_input_embeddings(self.meta.base)
            try:
                self.backbone.save(directory / BACKBONE_DIR, weights=True)
            finally:
                if self.meta is not None:
                    core.set_input_embeddings(self.meta)
        info = {
            "model": dataclasses.asdict(self.config),
            "meta": meta_info,
            "family": self.backbone.family,
            "backbone_spec": self.backbone.spec,
            "versions": self.library_versions(),
        }
        if tiny_base is not None:
            info["tiny_base_digest"] = tiny_base
        if base_fingerprint is not None:
            info["base_fingerprint"] = base_fingerprint
        # every file written above, checked by from_pretrained (a same-size file with other bytes loads otherwise)
        info[CHECKSUM_KEY] = file_digests(directory, skip=UNCHECKED_FILES)
        (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2))

    def _frozen_base_state(self) -> dict[str, Tensor]:
        """The LoRA model's frozen base weights under the names of the bare backbone: without the adapters
        (``lora_*``), peft's ``base_layer`` level and the Meta Token wrapper (``M_q`` / ``M_c``, ``.base.``)."""
        core = self.backbone.model
        base = core.get_base_model() if hasattr(core, "get_base_model") else core
        wrapper = next((n for n, m in base.named_modules() if isinstance(m, MetaTokenEmbedding)), None)
        out = {}
        for name, t in base.state_dict().items():
            if ".lora_" in name or (wrapper is not None and name in (f"{wrapper}.M_q", f"{wrapper}.M_c")):
                continue
            name = name.replace(".base_layer.", ".")
            if wrapper is not None and name.startswith(f"{wrapper}.base."):
                name = f"{wrapper}." + name[len(f"{wrapper}.base."):]
            out[name] = t
        return out

    def _check_frozen_base_is(self, fresh: nn.Module, spec: dict[str, Any]) -> None:
        """ValueError unless the frozen base under the LoRA adapter is ``fresh`` (the tiny backbone rebuilt from
        ``spec``, up to the dtype training cast it to): the adapter alone is saved and loads onto that rebuild,
        so another base (changed before LoRA, or built with options the spec lacks) loaded without an error and
        gave other embeddings."""
        mine, want = self._frozen_base_state(), fresh.state_dict()
        differs = sorted(set(mine) ^ set(want)) or [
            k for k, t in want.items()
            if mine[k].shape != t.shape or not torch.equal(mine[k].detach().cpu(), t.to(mine[k].dtype))]
        if differs:
            raise ValueError(
                f"cannot save this LoRA model's adapter alone: its frozen base differs from the tiny "
                f"{self.backbone.family} backbone rebuilt from {spec} (first: {differs[0]}), which is what a load "
                "would put under it; merge the adapter (backbone.model = backbone.model.merge_and_unload(), then "
                "config.lora = False) and save the full model")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", *,
                        backbone_path: str | Path | None = None, check_base: bool = True,
                        verify: bool = True) -> "MetaEmbedModel":
        """Load a model written by :meth:`save_pretrained`.

        A LoRA model loads its adapter onto the base checkpoint it was trained on, found at the saved
        ``model.backbone_path`` or at ``backbone_path`` (a copy elsewhere).  That checkpoint must match
        the :func:`checkpoint_fingerprint` saved with the adapter (:class:`ConfigError` otherwise: an
        adapter on another base gives embeddings of a model nobody trained); ``check_base=False``
        skips the check (e.g. the same weights re-saved in another shard layout).

        A file of the save that is missing is a :class:`FileNotFoundError`, one that cannot be read (truncated,
        corrupt, Meta Tokens of the wrong shape) a :class:`CheckpointError`; both name the file.  ``verify``
        compares each file the save wrote with the sha256 recorded in ``metaembed_config.json`` (one more read
        of the files, under a progress bar from 1 GiB: tens of seconds for full weights at real size, little for
        a LoRA adapter): a file of the right size and format with other bytes (a copy interrupted
        over an older checkpoint, a hand edit, a bit flip) is a :class:`CheckpointError` naming it, not another
        model.  ``verify=False`` (``metaembed eval --skip-verify``) loads such edits; saves made before the
        checksums were recorded load unchecked.  Model cards (``README.md``) are not checked.
        """
        directory = Path(directory)
        cfg_path = directory / CONFIG_FILE
        try:
            cfg_bytes = cfg_path.read_bytes()  # compared again once everything is loaded
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"{directory} is not a saved MetaEmbed model (missing {CONFIG_FILE})"
                                    f"{_staging_hint(directory)}") from None
        try:
            info = json.loads(cfg_bytes)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e}); the file is truncated or corrupt") from None
        if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
            raise CheckpointError(f"{cfg_path}: no 'model' settings; not a file written by save_pretrained")
        try:
            config: ModelConfig = _coerce(info["model"], ModelConfig, "model")
            config.validate()  # an edited file: bad choices and counts are named here, not as odd failures later
        except ConfigError as e:
            raise ConfigError(f"{cfg_path}: {e}") from None
        adapter_cls = get_adapter_class(config.backbone)
        dtype = _to_dtype(config.dtype)
        use_lora = bool(config.lora) if config.lora is not None else config.backbone_path is not None
        if backbone_path is not None:
            if not (use_lora and config.backbone_path):
                raise ConfigError(f"{directory}: backbone_path={str(backbone_path)!r} is for LoRA models trained on "
                                  "a local checkpoint; this one loads its backbone from "
                                  f"{'its own folder' if not use_lora else 'the tiny spec it was built from'}")
            config = dataclasses.replace(config, backbone_path=str(Path(backbone_path).resolve()))
        _check_saved_files(directory, use_lora, config.pooling == "meta")
        if verify and CHECKSUM_KEY in info:
            try:
                changed = changed_files(directory, info[CHECKSUM_KEY], str(cfg_path))
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            if changed:
                raise CheckpointError(
                    f"{directory}: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} differ"
                    f"{'s' if len(changed) == 1 else ''} from the sha256 recorded when the model was saved "
                    f"({CONFIG_FILE}): changed or corrupted since (e.g. a copy interrupted over an older "
                    "checkpoint); copy the model again, or verify=False / --skip-verify to load it as it is")
        if use_lora:
            from peft import PeftModel

            spec = info.get("backbone_spec") or {}
            if not isinstance(spec, dict):
                raise CheckpointError(f"{cfg_path}: backbone_spec is a {type(spec).__name__}, not a mapping")
            if config.backbone_path:
                if not (Path(config.backbone_path) / "config.json").is_file():
                    raise FileNotFoundError(
                        f"{cfg_path}: the base checkpoint this LoRA adapter was trained on is not at "
                        f"{config.backbone_path} (no config.json there); pass where it is now (metaembed eval "
                        "--backbone PATH, from_pretrained(backbone_path=...))")
                saved = info.get("base_fingerprint")
                if check_base and saved is not None and not _base_matches(config.backbone_path, saved):
                    raise ConfigError(
                        f"{cfg_path}: the base checkpoint {config.backbone_path} is not the one this LoRA adapter "
                        "was trained on (its config or weight files differ from the fingerprint saved with the "
                        "adapter); pass the right one (metaembed eval --backbone PATH, from_pretrained("
                        "backbone_path=...)), or check_base=False / --skip-base-check if it holds the same weights")
                with loading(Path(config.backbone_path), "the base checkpoint"):
                    backbone = adapter_cls.from_pretrained(config.backbone_path, dtype=dtype)
            elif spec.get("kind") == "tiny" and "tiny_base_digest" in info:
                # the frozen base of a tiny LoRA model is a pure function of (size, seed, dtype): rebuild it, and
                # check it is bit-identical to the one trained on (library upgrades may change random init)
                try:
                    backbone = load_backbone(config.backbone, None, size=spec["size"], seed=spec["seed"],
                                             dtype=dtype, extra_words=spec.get("extra_words", ()))
                except (KeyError, TypeError, ValueError, OverflowError) as e:  # an edited spec
                    raise CheckpointError(f"{cfg_path}: backbone_spec {short_repr(spec)} cannot rebuild the tiny "
                                          f"base model ({type(e).__name__}: {e})") from None
                if _weights_digest(backbone.model) != info["tiny_base_digest"]:
                    raise ConfigError(
                        f"{cfg_path}: the tiny base model rebuilt from {spec} differs from the one this adapter was "
                        f"trained on (saved with {info.get('versions')}); load it with those library versions"
                    )
            else:
                raise ConfigError(f"{cfg_path}: a LoRA model needs model.backbone_path (the base checkpoint)")
            # the tokenizer and image processor saved with the model (a capped max_pixels changes the image tokens)
            with loading(directory / BACKBONE_DIR, "the tokenizer and image processor"):
                backbone.tokenizer = type(backbone.tokenizer).from_pretrained(directory / BACKBONE_DIR)
                backbone.image_processor = type(backbone.image_processor).from_pretrained(directory / BACKBONE_DIR)
        else:
            with loading(directory / BACKBONE_DIR, "the backbone"):
                backbone = adapter_cls.from_pretrained(directory / BACKBONE_DIR, dtype=dtype)
        backbone.spec = info.get("backbone_spec", backbone.spec)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config, model.backbone, model.meta = config, backbone, None
        if config.pooling == "meta":
            with loading(directory / META_FILE, "the Meta Tokens"):
                tensors = load_file(str(directory / META_FILE))
            rows = {name: None if tensors.get(name) is None else tuple(tensors[name].shape) for name in ("M_q", "M_c")}
            if (rows["M_q"] is None or rows["M_c"] is None or len(rows["M_q"]) != 2 or len(rows["M_c"]) != 2
                    or (rows["M_q"][0], rows["M_c"][0]) != (config.R_q, config.R_c)):
                raise CheckpointError(  # before the tokenizer is touched (its Meta Token ids follow R_q, R_c)
                    f"{directory / META_FILE}: M_q {rows['M_q']} and M_c {rows['M_c']} do not hold the "
                    f"R_q={config.R_q}, R_c={config.R_c} Meta Tokens {CONFIG_FILE} asks for")
            model.meta = model._install_meta_tokens()
            with torch.no_grad():
                for name, param in (("M_q", model.meta.M_q), ("M_c", model.meta.M_c)):  # [R_q, D], [R_c, D]
                    got = tensors.get(name)
                    if got is None or got.shape != param.shape:  # copy_ would broadcast a [1, D] row
                        raise CheckpointError(
                            f"{directory / META_FILE}: {name} has shape "
                            f"{None if got is None else tuple(got.shape)}, the model's config needs "
                            f"{tuple(param.shape)}")
                    # copy_ casts: a model saved in bf16 (precision bf16-true) loads, but ints and bools do not
                    # (an F32 -> I32 header edit of one byte loaded silently), nor NaN or Inf
                    if not got.is_floating_point() or not torch.isfinite(got).all():
                        raise CheckpointError(
                            f"{directory / META_FILE}: {name} is {got.dtype}"
                            f"{' with NaN or Inf values' if got.is_floating_point() else ''}; Meta Tokens are "
                            "finite floating-point vectors; the file is corrupt")
                    param.copy_(got)
        if use_lora:
            with loading(directory / ADAPTER_DIR, "the LoRA adapter"):
                backbone.model = PeftModel.from_pretrained(backbone.model, directory / ADAPTER_DIR,
                                                           is_trainable=True)
            if model.meta is not None:
                model.meta.M_q.requires_grad_(True)
                model.meta.M_c.requires_grad_(True)
        if config.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        # a save into this folder during the load: the files read may come from two saves (the config leaves a
        # folder first and comes back last, so an unchanged config means no swap overlapped the reads)
        try:
            unchanged = cfg_path.read_bytes() == cfg_bytes
        except OSError:
            unchanged = False
        if not unchanged:
            raise CheckpointError(f"{directory}: a save into this folder ran while the model was loading "
                                  f"({CONFIG_FILE} changed), so its files may come from two saves; load it again")
        return model.to(device)


def _architecture(config: Any) -> Any:
    """A transformers config dict without what does not shape the embeddings or is hashed elsewhere: the folder it
    was read from (``_name_or_path``), the library version, ``architectures`` (set by a save) and the dtypes
    (``ModelConfig.dtype`` is hashed)."""
    if isinstance(config, dict):
        return {k: _architecture(v) for k, v in config.items()
                if k not in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")}
    if isinstance(config, (list, tuple)):
        return [_architecture(v) for v in config]
    return config


def _check_backbone_matches(backbone: BackboneAdapter, config: ModelConfig) -> None:
    """ValueError unless ``backbone`` is of ``config.backbone``'s family with weights in ``config.dtype``.

    :meth:`MetaEmbedModel.from_pretrained` rebuilds the backbone from the saved config: another family
    saved a model that could not be loaded, another dtype one that loaded in the config's dtype and gave
    other embeddings.  Meta Tokens and LoRA weights a shared backbone already carries are fp32 whatever the dtype.
    """
    if backbone.family != config.backbone:
        raise ValueError(f"model.backbone={config.backbone!r} but the backbone given is a {backbone.family!r} "
                         f"one; set model.backbone={backbone.family!r}")
    meta = {id(p) for m in backbone.model.modules() if isinstance(m, MetaTokenEmbedding) for p in (m.M_q, m.M_c)}
    found = {p.dtype for name, p in backbone.model.named_parameters()
             if p.is_floating_point() and id(p) not in meta and ".lora_" not in name}
    want = _to_dtype(config.dtype)
    if found - {want}:
        names = sorted(str(d).removeprefix("torch.") for d in found)
        raise ValueError(f"model.dtype={config.dtype!r} but the backbone's weights are {', '.join(names)}; "
                         f"set model.dtype to the backbone's (a saved model reloads in model.dtype)")


def _check_saved_files(directory: Path, use_lora: bool, meta: bool) -> None:
    """:class:`FileNotFoundError` naming the first file of a :meth:`MetaEmbedModel.save_pretrained` folder that is
    missing (peft and transformers report a missing local folder as an invalid Hub repo id)."""
    need = [directory / BACKBONE_DIR / "tokenizer_config.json"]
    if meta:
        need.append(directory / META_FILE)
    if use_lora:
        adapter = directory / ADAPTER_DIR
        need.append(adapter / "adapter_config.json")
        weights = [adapter / "adapter_model.safetensors", adapter / "adapter_model.bin"]
        if not any(w.is_file() for w in weights):
            need.append(weights[0])
    else:
        backbone = directory / BACKBONE_DIR
        need.append(backbone / "config.json")
        weights = [backbone / f"{n}{index}" for n in ("model.safetensors", "pytorch_model.bin")
                   for index in ("", ".index.json")]
        if not any(w.is_file() for w in weights):
            need.append(weights[0])
    for path in need:
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: the saved model is incomplete: {path} is missing")


#: Staging folders of another host (or container) are removed only when older than this (seconds): their process
#: cannot be asked whether it still runs.
FOREIGN_STAGING_AGE = 24 * 3600


def _staging_owner() -> str:
    """``<pid>@<host>`` of this process, as staging folder names record it (the host in ``[A-Za-z0-9_.]``)."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9_.]', '_', socket.gethostname()) or 'host'}"


def _staging_state(path: Path) -> str:
    """``"live"`` (a save running now, or one of another host not yet :data:`FOREIGN_STAGING_AGE` old) or
    ``"dead"`` (its process is gone: killed mid-save) for the staging folder ``path``."""
    owner = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
    pid, _, host = owner.partition("@")
    if not pid.isdigit():  # named before the process id was recorded
        return "dead"
    if host and host != _staging_owner().partition("@")[2]:  # another host's pid means nothing here
        try:
            return "live" if time.time() - path.stat().st_mtime < FOREIGN_STAGING_AGE else "dead"
        except OSError:
            return "dead"
    return "live" if _process_alive(int(pid)) else "dead"


def _staging_hint(directory: Path) -> str:
    """What the staging folders in ``directory`` say about a missing config: a save in progress, or one killed."""
    staged = sorted(directory.glob(f"{STAGING_PREFIX}*")) if directory.is_dir() else []
    if not staged:
        return ""
    live = [p.name for p in staged if _staging_state(p) == "live"]
    if live:
        return f"; a save into it is in progress ({live[0]}): load it again once the save has finished"
    for part, what in (("new", "the model that save was writing"), ("old", "the model saved before it")):
        if (staged[0] / part / CONFIG_FILE).is_file():
            return (f"; {staged[0].name} is left from a save that was interrupted: its {part}/ folder holds {what} "
                    f"with its {CONFIG_FILE}; move the entries of {part}/ into {directory} to recover it (the next "
                    "save into the folder deletes it)")
    return f"; {staged[0].name} is left from a save that was interrupted (the next save into the folder deletes it)"


def _remove_stale_staging(directory: Path) -> None:
    """Delete the staging folders of earlier saves into ``directory`` whose process is gone (killed mid-save);
    those of a live process (a concurrent save, this one's on another thread) stay, and those of another host
    (a shared file system) until they are :data:`FOREIGN_STAGING_AGE` old."""
    for path in directory.glob(f"{STAGING_PREFIX}*"):
        if _staging_state(path) == "dead":
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _swap_in(new: Path, directory: Path, trash: Path) -> None:
    """Replace the :data:`SAVED_ENTRIES` of ``directory`` by those in ``new`` (renames; absent ones removed).

    The old entries are moved into ``trash`` (the caller deletes it; a symlinked entry goes as the link, its
    target untouched).  The config leaves first and comes back last: a folder caught mid-swap fails to load
    instead of loading a mix of two models.  A rename that fails undoes the ones before it (the earlier save
    was deleted with ``trash``).
    """
    trash.mkdir()
    rename_all([*[(directory / name, trash / name) for name in SAVED_ENTRIES  # CONFIG_FILE first
                  if (directory / name).exists() or (directory / name).is_symlink()],
                *[(new / name, directory / name) for name in reversed(SAVED_ENTRIES)  # CONFIG_FILE last
                  if (new / name).exists()]])


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Prefix of the current :func:`checkpoint_fingerprint`; a saved fingerprint without it is the v1 one.
FINGERPRINT_PREFIX = "v2-"


def checkpoint_fingerprint(path: str | Path, samples: int = 16, sample_bytes: int = 65536,
                           tensor_bytes: int = 4096) -> str:
    """Sampled content hash of a local checkpoint folder: ``config.json`` and, for every weight file
    ``transformers`` loads (the ``*.safetensors`` files, else ``*.bin`` / ``*.pt`` / ``*.pth``), its name,
    size, safetensors header, ``samples`` evenly spaced ``sample_bytes`` reads and the first and last
    ``tensor_bytes`` of every tensor the header lists.  A few MiB read per model: it tells another model,
    or one in which any whole tensor was re-trained (one layer, the vision tower), from the original, not a
    change confined to the middle of a tensor.  Unused ``.bin`` files beside the safetensors
    (``training_args.bin``, a second format) do not count.

    ``tensor_bytes=0`` gives the v1 fingerprint saved by earlier versions (every weight file, no per-tensor
    reads, no ``v2-`` prefix).  :class:`ConfigError` when ``path`` holds no ``config.json`` or no weight file;
    ``samples`` and ``sample_bytes`` below 1 or a negative ``tensor_bytes`` are a ``ValueError`` (a weaker or
    v1 hash that no saved fingerprint matches), non-ints a ``TypeError``.
    """
    check_int(samples, "samples", 1)
    check_int(sample_bytes, "sample_bytes", 1)
    check_int(tensor_bytes, "tensor_bytes", 0)
    root = Path(path)
    if not (root / "config.json").is_file():
        raise ConfigError(f"{root}: not a checkpoint folder (no config.json)")
    h = hashlib.blake2b(digest_size=16)
    h.update((root / "config.json").read_bytes())
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ConfigError(f"{root}: no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    if tensor_bytes > 0 and any(f.suffix == ".safetensors" for f in files):
        files = [f for f in files if f.suffix == ".safetensors"]  # what from_pretrained reads
    for f in files:
        size = f.stat().st_size
        h.update(f"\n{f.name}|{size}\n".encode())
        with f.open("rb") as fh:
            start, header = 0, b""
            if f.suffix == ".safetensors" and size >= 8:
                start = 8 + int.from_bytes(fh.read(8), "little")  # u64 header length, then the JSON header
                header = fh.read(min(start, size) - 8)
                h.update(header)
            span = max(size - start, 0)
            for k in range(samples if span else 0):
                fh.seek(start + (span - min(sample_bytes, span)) * k // max(samples - 1, 1))
                h.update(fh.read(sample_bytes))
            if tensor_bytes > 0:
                for b, e in _tensor_spans(header):  # byte ranges in the data section, from the header
                    for off in sorted({b, max(e - tensor_bytes, b)}):  # head and tail of each tensor
                        fh.seek(start + off)
                        h.update(fh.read(min(tensor_bytes, e - off)))
    return (FINGERPRINT_PREFIX if tensor_bytes > 0 else "") + h.hexdigest()


def _tensor_spans(header: bytes) -> list[tuple[int, int]]:
    """``(begin, end)`` data offsets of the tensors of a safetensors JSON header, sorted; ``[]`` if unreadable."""
    try:
        entries = json.loads(header)
        spans = [(int(v["data_offsets"][0]), int(v["data_offsets"][1]))
                 for k, v in entries.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return []
    return sorted((b, e) for b, e in spans if 0 <= b < e)


def _base_matches(path: str | Path, saved: str) -> bool:
    """Whether the checkpoint at ``path`` has the :func:`checkpoint_fingerprint` ``saved`` (v2, or v1 if unprefixed)."""
    if saved.startswith(FINGERPRINT_PREFIX):
        return checkpoint_fingerprint(path) == saved
    return checkpoint_fingerprint(path, tensor_bytes=0) == saved  # saved by a version before v2


def _hash_tensors(h: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Feed names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name) into hash ``h``."""
    for name, t in sorted(tensors.items()):
        t = t.detach()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).cpu().contiguous().view(torch.uint8).numpy())  # raw bytes


def _weights_digest(module: nn.Module) -> str:
    """Hash of every weight and buffer of ``module`` (names, dtypes, shapes, raw bytes)."""
    h = hashlib.blake2b(digest_size=16)
    _hash_tensors(h, module.state_dict())
    return h.hexdigest()
