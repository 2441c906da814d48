"""Capture and restore every RNG a training step may draw from (exact resume, GradCache replay)."""
from __future__ import annotations

import hashlib
import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "seed_rank_stream", "set_rng_state"]


def get_rng_state(cuda: bool = True) -> dict[str, Any]:
    """Python, NumPy, torch CPU (and all CUDA devices when ``cuda`` and available) RNG states.

    Only tensors, ints, floats and strings, so checkpoints load with ``weights_only=True``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state` (missing entries are left untouched)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved, n = list(state["cuda"]), torch.cuda.device_count()
        if len(saved) != n:  # e.g. saved with 8 visible GPUs per process, resumed with one per task
            warnings.warn(f"RNG state holds {len(saved)} CUDA generator(s) but {n} device(s) are visible: "
                          f"restoring the first {min(len(saved), n)}; CUDA random draws on the others "
                          "will not repeat the interrupted run", stacklevel=2)
        for i, s in enumerate(saved[:n]):
            torch.cuda.set_rng_state(s, i)


def seed_rank_stream(seed: int, rank: int, step: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from ``(seed, rank, step)``.

    ``seed_everything`` gives every rank the same stream, so rank ``k``'s row ``b`` would get the
    same dropout mask as rank 0's row ``b``; ranks above 0 of a distributed run (and ranks a resume
    adds) draw from their own stream instead.
    """
    digest = hashlib.blake2b(f"{int(seed)}|{int(rank)}|{int(step)}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little") % (2**63)
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)  # also seeds every CUDA device
