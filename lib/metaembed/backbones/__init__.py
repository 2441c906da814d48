"""Vision-language backbones behind one adapter interface (Qwen2-VL, Qwen2.5-VL, PaliGemma, Mllama)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import UNKNOWN_BACKBONE_HINT
from .base import BackboneAdapter, CheckpointError, EncodedItem, InputError, _to_dtype, load_image
from .mllama import MllamaAdapter
from .paligemma import PaliGemmaAdapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

#: Family name -> adapter class.
BACKBONES: dict[str, type[BackboneAdapter]] = {
    cls.family: cls for cls in (Qwen2_5_VLAdapter, Qwen2VLAdapter, PaliGemmaAdapter, MllamaAdapter)
}


def register_backbone(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Make ``cls`` a ``model.backbone`` family: :data:`BACKBONES` and the config check's
    :data:`metaembed.config.TINY_SIZES` (from ``cls.tiny_sizes``).  Usable as a class decorator, so a family
    defined in a fork or a notebook needs no edit of the library; docs/CONTRACTS.md, "Adding a backbone family".

    Raises:
        TypeError: ``cls`` is not a concrete :class:`BackboneAdapter` subclass with a ``family`` name.
        ValueError: another class is registered under that name.
    """
    from .. import config

    if not (isinstance(cls, type) and issubclass(cls, BackboneAdapter)) or getattr(cls, "__abstractmethods__", ()):
        raise TypeError(f"register_backbone needs a concrete BackboneAdapter subclass, got {cls!r}")
    family = getattr(cls, "family", None)
    if not isinstance(family, str) or not family:
        raise TypeError(f"{cls.__name__} has no 'family' name (a class attribute such as 'qwen2_5_vl')")
    if BACKBONES.get(family, cls) is not cls:
        raise ValueError(f"backbone family {family!r} is already {BACKBONES[family].__name__}")
    BACKBONES[family] = cls
    config.TINY_SIZES[family] = tuple(cls.tiny_sizes)
    return cls


#: The entry-point group through which an installed package adds backbone families (see :func:`load_plugins`).
ENTRY_POINT_GROUP = "metaembed.backbones"
_plugins_loaded = False


def load_plugins() -> list[str]:
    """Register the families installed packages declare in the ``metaembed.backbones`` entry-point group.

    A family registered from a fork's own module (:func:`register_backbone`) exists only in a process that
    imported it: the ``metaembed`` command, a fresh :meth:`MetaEmbedModel.from_pretrained` and papermill's
    kernels did not know it.  A package that declares it, e.g. in its ``pyproject.toml``::

        [project.entry-points."metaembed.backbones"]
        myfam = "myfam:MyFamAdapter"

    is found by every process once installed (``pip install -e .``).  Called when a family name is not
    known (:func:`get_adapter_class`, the ``model.backbone`` check), once per process.  Returns the families
    it registered; an entry point that fails to load is a warning naming it, not an error for every family.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    import warnings
    from importlib.metadata import entry_points

    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if ep.name in BACKBONES and BACKBONES[ep.name] is cls:
                continue  # registered by its import (the decorator)
            if getattr(cls, "family", None) != ep.name:
                raise ValueError(f"the class's family is {getattr(cls, 'family', None)!r}, not {ep.name!r}")
            register_backbone(cls)
        except Exception as e:  # noqa: BLE001 -- one broken plugin must not hide the others
            warnings.warn(f"backbone entry point {ep.name} = {ep.value!r} ({ENTRY_POINT_GROUP}) failed to load: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            continue
        added.append(ep.name)
    return added


def get_adapter_class(family: str) -> type[BackboneAdapter]:
    """The :class:`BackboneAdapter` subclass of ``family`` (a key of :data:`BACKBONES`, after
    :func:`load_plugins`); ValueError naming the known families otherwise."""
    if family not in BACKBONES:
        load_plugins()
    try:
        return BACKBONES[family]
    except KeyError:
        raise ValueError(f"unknown backbone family {family!r}; choose from {sorted(BACKBONES)} "
                         f"({UNKNOWN_BACKBONE_HINT})") from None


def load_backbone(
    family: str,
    path: str | Path | None = None,
    *,
    size: str = "s",
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    extra_words: Sequence[str] = (),
) -> BackboneAdapter:
    """A real checkpoint from a local directory (``path``) or a tiny random model of ``size`` (``extra_words``:
    words its tokenizer adds, see :meth:`BackboneAdapter.tiny`)."""
    cls = get_adapter_class(family)
    if path is None:
        target, previous = _to_dtype(dtype), torch.get_default_dtype()
        torch.set_default_dtype(target)  # built as from_pretrained(dtype=...) builds: buffers made in that dtype
        try:
            adapter = cls.tiny(size=size, seed=seed, extra_words=tuple(extra_words))
        finally:
            torch.set_default_dtype(previous)
        _cast_weights(adapter.model, target)
        return adapter
    return cls.from_pretrained(path, dtype=dtype)


def _cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and persistent buffers to ``dtype`` as ``from_pretrained(dtype=...)`` loads them.

    Non-persistent buffers keep the dtype they were made in (rotary ``inv_freq`` is fp32 in a model
    loaded from a checkpoint); ``model.to(dtype)`` would cast them too and change the rotation angles.
    """
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_floating_point() and b.dtype != dtype and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)


__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "CheckpointError",
    "ENTRY_POINT_GROUP",
    "EncodedItem",
    "InputError",
    "MllamaAdapter",
    "PaliGemmaAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "get_adapter_class",
    "load_backbone",
    "load_image",
    "load_plugins",
    "register_backbone",
]
