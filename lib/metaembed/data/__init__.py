"""Datasets: the shared record schema, the embedded synthetic benchmark and local MMEB/ViDoRe loaders.

The loaders are imported lazily (``metaembed.data.make_benchmark`` etc.).
"""
from __future__ import annotations

import importlib
from typing import Any

from .records import (
    IMAGE_PLACEHOLDER,
    Benchmark,
    DocRetrievalTask,
    EvalQuery,
    EvalTask,
    Item,
    TrainExample,
)

_LAZY = {
    "make_benchmark": "synthetic", "benchmark_from_config": "synthetic", "list_tasks": "synthetic",
    "VOCABULARY": "synthetic",
    "load_mmeb_train": "mmeb", "load_mmeb_eval": "mmeb", "held_out_split": "mmeb", "mix_subsets": "mmeb",
    "MMEB_TASKS": "mmeb",
    "load_vidore_v1": "vidore", "load_vidore_v2": "vidore", "load_vidore_v1_suite": "vidore",
    "load_vidore_v2_suite": "vidore", "load_vidore_train": "vidore", "instruct_task": "vidore",
    "instruct_examples": "vidore",
}

__all__ = [
    "IMAGE_PLACEHOLDER", "Benchmark", "DocRetrievalTask", "EvalQuery", "EvalTask", "Item", "TrainExample",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'metaembed.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
