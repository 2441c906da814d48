"""Shared fixtures: small deterministic images and items."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels then run in Triton's interpreter on CPU tensors (tests/test_triton.py); Triton reads
    # this when its own library functions are decorated, i.e. before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")


def random_image(seed: int, size: int = 56) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


@pytest.fixture
def images():
    return [random_image(i) for i in range(4)]
