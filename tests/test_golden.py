"""Dependency upgrades must not silently change embeddings.

The tiny seeded backbones of every family are embedded and compared with
embeddings recorded by ``tests/data/make_golden.py``.  A failure means a
dependency (torch, transformers, tokenizers, Pillow, numpy, ...) or our code
changed what the same weights produce: find out why before regenerating the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from data.make_golden import golden_embeddings, golden_versions

GOLDEN = Path(__file__).parent / "data" / "golden_embeddings.safetensors"


def _recorded_versions() -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({model key prefix: the versions that recorded its numbers}, ``checked_with``: the last versions that
    reproduced them); keys a later ``make_golden.py --append`` added carry their own versions."""
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata() or {}
        prefixes = {k.split("/")[0] for k in f.keys()}
    first, added = json.loads(meta.get("versions", "{}")), json.loads(meta.get("added", "{}"))
    return {p: added.get(p, first) for p in prefixes}, json.loads(meta.get("checked_with", "{}"))


def _version_changes(then: dict[str, str], now: dict[str, str]) -> str:
    changed = [f"{k} {then.get(k, '?')} -> {now[k]}" for k in now if then.get(k) != now[k]]
    return ", ".join(changed) or "none"


def test_golden_file_records_every_version_that_can_move_the_embeddings():
    """make_golden recorded only torch and transformers; tokenizers and Pillow (in the model fingerprint) and
    numpy move the embeddings too, so a failure could not say which upgrade to suspect."""
    _, checked = _recorded_versions()
    assert set(golden_versions()) <= set(checked), (
        f"{GOLDEN.name} 'checked_with' lacks {sorted(set(golden_versions()) - set(checked))}")


def test_embeddings_match_recorded_golden():
    with safe_open(str(GOLDEN), "pt") as f:
        recorded = {k: f.get_tensor(k) for k in f.keys()}
    versions, checked = _recorded_versions()
    now = golden_embeddings()
    current = golden_versions()
    assert recorded.keys() == now.keys()
    for k in recorded:
        diff = (recorded[k] - now[k]).abs().max().item()
        assert diff < 1e-4, (
            f"{k}: embeddings moved by {diff:.2e} since they were recorded with {versions[k.split('/')[0]]} "
            f"(last reproduced with {checked}); running with {current}, changed since then: "
            f"{_version_changes(checked, current)}; a dependency upgrade or code change altered the model's outputs"
        )
