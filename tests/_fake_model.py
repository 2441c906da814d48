"""A tiny stand-in for ``MetaEmbedModel`` (same contract, milliseconds per step).

Text -> hashed word ids -> ``EmbeddingBag``; image -> 4x4 RGB thumbnail ->
linear; the sum is combined with learnable Meta Token vectors ``M_q [R_q, H]``
/ ``M_c [R_c, H]`` through a small MLP (with dropout, so RNG handling is
exercised) and L2-normalised: ``forward(batch, role) -> [B, R, D]``.
Also a small benchmark of ``TrainExample`` triples for training tests.
"""
from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from metaembed.data.records import IMAGE_PLACEHOLDER, Benchmark, Item, TrainExample
from PIL import Image
from torch import Tensor, nn

_THUMB = 4


class FakeMetaEmbedModel(nn.Module):
    """Hashed bag-of-words + thumbnail encoder with Meta Tokens; ``[B, R, D]`` L2-normalised."""

    def __init__(self, R_q: int = 4, R_c: int = 8, dim: int = 16, hidden: int = 32,
                 vocab: int = 997, dropout: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.config = {"R_q": R_q, "R_c": R_c, "dim": dim, "hidden": hidden, "vocab": vocab,
                       "dropout": dropout, "seed": seed}
        self.R_q, self.R_c, self.vocab = R_q, R_c, vocab
        g = torch.Generator().manual_seed(seed)
        self.tokens = nn.EmbeddingBag(vocab, hidden, mode="mean")
        self.vision = nn.Linear(3 * _THUMB * _THUMB, hidden)
        self.meta_q = nn.Parameter(torch.randn(R_q, hidden, generator=g) * 0.1)  # M_q
        self.meta_c = nn.Parameter(torch.randn(R_c, hidden, generator=g) * 0.1)  # M_c
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        with torch.no_grad():
            for p in list(self.tokens.parameters()) + list(self.vision.parameters()) + list(self.mlp.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.01))
        self.vision_calls = 0  # forwards in which the "vision tower" ran

    @classmethod
    def build(cls, config=None) -> FakeMetaEmbedModel:
        if config is None:
            return cls()
        return cls(R_q=config.R_q, R_c=config.R_c, seed=config.seed)

    # ------------------------------------------------------------------ data
    def _ids(self, text: str) -> list[int]:
        words = text.replace(IMAGE_PLACEHOLDER, " ").lower().split() or ["<empty>"]
        return [zlib.crc32(w.encode()) % self.vocab for w in words]

    @staticmethod
    def _pixels(image) -> Tensor:
        img = image if isinstance(image, Image.Image) else Image.open(image)
        img = img.convert("RGB").resize((_THUMB, _THUMB))
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).flatten() / 255.0  # [48]

    def collate(self, items: Sequence[Item], role: str) -> dict[str, Tensor]:
        if role not in ("query", "candidate"):
            raise ValueError(f"role must be 'query' or 'candidate', got {role!r}")
        ids = [self._ids(it.text) for it in items]
        pixels = [self._pixels(it.image) if it.image is not None else torch.zeros(3 * _THUMB * _THUMB)
                  for it in items]
        return {
            "ids": torch.tensor([i for row in ids for i in row], dtype=torch.long),
            "offsets": torch.tensor([0] + [len(r) for r in ids[:-1]], dtype=torch.long).cumsum(0),
            "pixels": torch.stack(pixels),  # [B, 48]
            "has_image": torch.tensor([it.image is not None for it in items]),  # [B]
        }

    def placeholder_image(self) -> Image.Image:
        return Image.new("RGB", (8, 8), (128, 128, 128))

    # ------------------------------------------------------------------ model
    def forward(self, batch: dict[str, Tensor], role: str) -> Tensor:
        h = self.tokens(batch["ids"], batch["offsets"])  # [B, H]
        if bool(batch["has_image"].any()):
            self.vision_calls += 1
            h = h + self.vision(batch["pixels"]) * batch["has_image"][:, None].float()
        meta = self.meta_q if role == "query" else self.meta_c  # [R, H]
        z = self.mlp(h[:, None, :] + meta[None])  # [B, R, D]
        return F.normalize(z, dim=-1)

    @torch.no_grad()
    def encode(self, items: Sequence[Item], role: str, batch_size: int = 32, progress: bool = False) -> Tensor:
        was = self.training
        self.eval()
        out = [self(self.collate(items[i : i + batch_size], role), role) for i in range(0, len(items), batch_size)]
        self.train(was)
        return torch.cat(out).float()

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "fake_config.json").write_text(json.dumps(self.config))
        torch.save(self.state_dict(), path / "fake_model.pt")

    @classmethod
    def from_pretrained(cls, path) -> FakeMetaEmbedModel:
        path = Path(path)
        model = cls(**json.loads((path / "fake_config.json").read_text()))
        model.load_state_dict(torch.load(path / "fake_model.pt"))
        return model


COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]


def _swatch(color: str) -> Image.Image:
    rgb = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20),
           "purple": (150, 20, 150), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (5, 5, 5)}[color]
    return Image.new("RGB", (8, 8), rgb)


def _row_words(i: int) -> str:
    """Row ``i`` spelled in colour words (base ``len(COLORS)``): distinct per row without a rare token per row,
    whose tiny Adam-normalised updates would make runs that should agree differ by float noise."""
    digits = []
    while True:
        i, d = divmod(i, len(COLORS))
        digits.append(COLORS[d])
        if i == 0:
            return " ".join(digits)


def make_fake_benchmark(n_train: int = 64, seed: int = 0, negatives: bool = True,
                        images: bool = True) -> Benchmark:
    """Triples from two subsets: color-of-image (image query) and shape captions (text only).

    Every (query, positive) pair is distinct (the query names its row in colour words): held_out_split keeps copies of a pair
    on one side, so repeated pairs would move whole groups and change the 1-in-10 split the tests count on."""
    rng = random.Random(seed)
    train = []
    for i in range(n_train):
        if images and i % 2 == 0:
            color, other = rng.sample(COLORS, 2)
            ex = TrainExample(Item(f"{IMAGE_PLACEHOLDER} what color is this, {_row_words(i)}", _swatch(color)),
                              Item(f"the color {color}"), Item(f"the color {other}") if negatives else None,
                              task="color")
        else:
            color, shape = rng.choice(COLORS), rng.choice(SHAPES)
            other = rng.choice([s for s in SHAPES if s != shape])
            ex = TrainExample(Item(f"find a {color} {shape}, {_row_words(i)}"), Item(f"a picture of a {color} {shape}"),
                              Item(f"a picture of a {color} {other}") if negatives else None, task="shape")
        train.append(ex)
    return Benchmark(train=train)
