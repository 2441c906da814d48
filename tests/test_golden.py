"""Dependency upgrades must not silently change embeddings.

The tiny seeded backbones of every family are embedded and compared with
embeddings recorded by ``tests/data/make_golden.py``.  A failure means a
dependency (torch, transformers, ...) or our code changed what the same
weights produce: find out why before regenerating the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from data.make_golden import golden_embeddings

GOLDEN = Path(__file__).parent / "data" / "golden_embeddings.safetensors"


def test_embeddings_match_recorded_golden():
    with safe_open(str(GOLDEN), "pt") as f:
        recorded = {k: f.get_tensor(k) for k in f.keys()}
        versions = json.loads(f.metadata()["versions"])
    now = golden_embeddings()
    assert recorded.keys() == now.keys()
    for k in recorded:
        diff = (recorded[k] - now[k]).abs().max().item()
        assert diff < 1e-4, (
            f"{k}: embeddings moved by {diff:.2e} since they were recorded with {versions}; "
            "a dependency upgrade or code change altered the model's outputs"
        )

