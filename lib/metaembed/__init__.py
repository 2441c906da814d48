"""metaembed: Meta Tokens and Matryoshka Multi-Vector Retrieval (Xiao et al., 2025).

The top-level names are imported lazily, so ``import metaembed`` is cheap and
submodules that do not need torch (``metaembed.kernels.build``) stay light.

>>> from metaembed import MetaEmbedModel, ModelConfig, maxsim, mmr_loss
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # configuration
    "RunConfig": "config", "ModelConfig": "config", "LossConfig": "config", "TrainConfig": "config",
    "DataConfig": "config", "EvalConfig": "config", "ConfigError": "config", "load_config": "config",
    "DEFAULT_GROUPS": "config",
    # model
    "MetaEmbedModel": "model", "MetaTokenEmbedding": "meta_tokens", "load_backbone": "backbones",
    # groups, scoring, loss
    "validate_groups": "groups", "validate_budget": "groups", "GroupError": "groups",
    "maxsim": "maxsim", "maxsim_reference": "maxsim", "pairwise_maxsim": "maxsim",
    "mmr_loss": "losses", "MMRLossOutput": "losses",
    # index and efficiency
    "MultiVectorIndex": "index", "efficiency_table": "efficiency", "scoring_flops": "efficiency",
    "index_memory_bytes": "efficiency",
    # data and evaluation
    "Item": "data.records", "TrainExample": "data.records", "EvalTask": "data.records",
    "DocRetrievalTask": "data.records", "Benchmark": "data.records", "make_benchmark": "data.synthetic",
    "evaluate": "evaluation", "summarize": "evaluation", "budget_table": "evaluation",
    "precision_at_1": "evaluation", "ndcg_at_k": "evaluation",
    # training and pipelines
    "train": "training", "train_and_evaluate": "pipeline", "run_quickstart": "pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metaembed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
