"""A procedurally generated, learnable stand-in for MMEB and ViDoRe ("ShapeWorld").

Real MMEB / ViDoRe cannot be downloaded here, so this module draws a small
benchmark with PIL, deterministically from a seed, in the shared record schema
(:mod:`metaembed.data.records`).  It is meant to be trained on from scratch by
tiny random-init VLMs on a CPU, so everything is coarse and word-level.

World
    A *scene* is a 2x2 grid of cells (``image_size`` px, default 56: one 28 px
    cell = one merged Qwen2-VL visual token) holding 1-4 *objects* (2-4 except
    for classification images, edit results and "remove" distractors); an object
    is a (colour, shape) pair from 8 colours x 8 shapes drawn on black.  Within
    a scene all colours and all shapes are distinct, so "the blue object", "the
    square" and "the object at the top-left" each pick exactly one object.
    A *page* (ViDoRe-like, ``2 * image_size`` px) has 4 rows; each row is one
    fact "key object -> value object" (key, arrow glyph, value).

Tasks (``list_tasks()``), each with an MMEB-style instruction prefix
    classification  Cls-Object: image of one object -> its label ("red circle").
    vqa             VQA-What: "What is the object at the top-left?" -> label;
                    VQA-Attr: "What color is the circle?" / "What shape is the
                    blue object?" -> "red" / "star".
    retrieval       Ret-T2I caption -> scene, Ret-I2T scene -> caption,
                    Ret-Composed scene + edit ("replace the red circle with a
                    blue star", "make ... blue", "move ...", "remove ...",
                    "add ...") -> edited scene.
    grounding       Ground: scene + referring expression (by position, colour
                    or shape) -> the crop of that object (cell crop upscaled
                    to ``image_size``); candidates are other crops.
    document        Doc-Pages: "Find the page where the red circle points to
                    the blue star" over the whole corpus of pages; graded qrels:
                    2 = the page with that fact, 1 = a page with the same key
                    object pointing to another value.

Hard negatives
    Evaluation candidate lists (positive first, ``n_candidates`` in [2, 8])
    are filled with distractors that differ from the positive in exactly one
    fact: one object recoloured / reshaped / moved (never added or removed, so
    every scene / caption candidate has as many objects as the positive:
    :func:`object_count_baseline`), the other objects of the same scene (wrong
    binding of position to object), the unedited source image (composed
    retrieval, whose "add" and "remove" edits are equally frequent), or labels
    sharing one attribute.
    Each training triple carries one such distractor as explicit hard negative.
    Each document query's target page has a sibling page in the corpus with the
    queried fact's value changed.

Held out of training
    No training triple uses an evaluation query, nor, in any role of any
    family, a scene an evaluation query shows or retrieves.

In-domain vs out-of-domain
    16 colour-shape compositions (two per colour and two per shape,
    :data:`OOD_PAIRS`) never occur in training, neither drawn nor named.  IND
    tasks only use the other 48 compositions; in each ``*-OOD`` task the object
    (or edit result, or page fact key) being asked about is a held-out one.
    Colours and shapes themselves are all seen in training, so OOD asks for
    compositional generalisation (Doc-Pages-OOD pages hold held-out objects in
    other rows too).  No OOD candidate stands out by novelty: every
    candidate of an OOD list holds as many held-out compositions as the positive
    (labels and crops are all held-out ones; VQA-What-OOD and Ground-OOD scenes are
    made of held-out objects; Ret-T2I-OOD and Ret-Composed-OOD scenes hold exactly
    one, the composed edit turning the source's held-out object into another), so a
    rule that picks "the never-seen candidate" without reading the query scores
    chance (:func:`novelty_baseline`).

Why several facts per item
    Every scene / page holds several independently queryable facts and the
    queries ask about one of them.  A single vector must squeeze all facts and
    their bindings into one point; several Meta Embeddings can specialise, which
    is where late interaction (MaxSim) can beat single-vector retrieval.

Learnability: word-level texts over a ~70-word vocabulary (:data:`VOCABULARY`),
flat colours on a plain background, one object per visual token, no jitter.

Determinism: one ``random.Random`` per (seed, task), so the same seed gives the
same records and pixel-identical images, and selecting a subset of tasks does
not change the others' evaluation queries (training triples skip the queries of
the selected evaluation tasks and every scene those queries show or retrieve, so
they depend on the selection).  Identical
contents share one ``uid`` (and one Item object): e.g. ``"scene@56:red-circle@tl|blue-star@br :: <|image_1|> Represent the
given image."`` or ``"text:red circle"``.
"""
from __future__ import annotations

import hashlib
import math
import operator
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..config import DataConfig
from .records import (
    IMAGE_PLACEHOLDER,
    Benchmark,
    DocRetrievalTask,
    EvalQuery,
    EvalTask,
    Item,
    TrainExample,
)

__all__ = [
    "COLORS",
    "INSTRUCTIONS",
    "MAX_CANDIDATES",
    "OOD_PAIRS",
    "POSITIONS",
    "SHAPES",
    "VOCABULARY",
    "benchmark_from_config",
    "list_tasks",
    "make_benchmark",
    "novelty_baseline",
    "object_count_baseline",
    "synthetic_sizes",
    "tasks_not_held_out",
]

# --------------------------------------------------------------------------- vocabulary
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 90, 255),
    "yellow": (245, 230, 30),
    "purple": (160, 50, 210),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
    "cyan": (0, 225, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "frame")
POSITIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
_POS_ABBR = ("tl", "tr", "bl", "br")
_COLOR_NAMES = tuple(COLORS)

#: Held-out compositions: colour i with shapes (3 i + 1) mod 8 and (3 i + 4) mod 8 -- two
#: permutations, so every colour and every shape has exactly 2 held-out and 6 in-domain
#: partners, and a held-out object has a held-out variant for each attribute (the other held-out
#: shape of its colour, the other held-out colour of its shape): OOD candidate lists can then be
#: made of held-out compositions only, with one-attribute hard negatives among them.
OOD_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (_COLOR_NAMES[i], SHAPES[(3 * i + k) % len(SHAPES)]) for i in range(len(_COLOR_NAMES)) for k in (1, 4)
)
_ALL_PAIRS = tuple((c, s) for c in _COLOR_NAMES for s in SHAPES)
_IND_PAIRS = tuple(p for p in _ALL_PAIRS if p not in OOD_PAIRS)

#: The largest candidate list every task can fill (VQA-Attr answers are one of 8 colours / shapes).
MAX_CANDIDATES = 8

_SCENE_BG = (0, 0, 0)
_PAGE_BG = (22, 24, 44)
_PAGE_LINE = (80, 80, 100)
_ARROW = (150, 150, 150)

#: MMEB-style instruction prefixes (query side) and candidate prompts.
INSTRUCTIONS: dict[str, str] = {
    "cls": "Represent the given image for classification:",
    "vqa": "Represent the given image with the following question:",
    "t2i": "Find me an everyday image that matches the given caption:",
    "i2t": "Find an image caption describing the given everyday image.",
    "composed": "Given an image, find a similar everyday image with the described changes:",
    "ground": "Select the portion of the image that follows the language expression:",
    "doc_query": "Find the document page where",
    "image": "Represent the given image.",
    "crop": "Represent the given cropped image of the object.",
    "page": "Represent the given document page.",
}

#: Every word the generated texts use (lower case, split on non-letters; the image
#: placeholder excluded): pass it as ``extra_words`` to a word-level tokenizer.
_TEMPLATE_WORDS = ("a", "an", "and", "at", "the", "is", "what", "color", "shape", "object", "into", "turn",
                   "make", "move", "remove", "replace", "add", "with", "to", "points")
VOCABULARY: tuple[str, ...] = tuple(sorted(
    set(COLORS) | set(SHAPES) | set(_TEMPLATE_WORDS)
    | {w for p in POSITIONS for w in p.split("-")}
    | {w for text in INSTRUCTIONS.values() for w in re.findall(r"[a-z]+", text.lower())}
))

Obj = tuple[str, str]  # (colour, shape)
Scene = tuple[Obj | None, ...]  # one entry per position (len 4)
Fact = tuple[Obj, Obj]  # (key, value)
Page = tuple[Fact, ...]  # one fact per row (len 4)


@dataclass(frozen=True)
class _TaskSpec:
    name: str
    family: str  # the training family (= the IND task name)
    meta_task: str  # classification | vqa | retrieval | grounding | document
    split: str  # ind | ood
    description: str


_TASKS: tuple[_TaskSpec, ...] = (
    _TaskSpec("Cls-Object", "Cls-Object", "classification", "ind",
              "image with one object -> its colour-shape label"),
    _TaskSpec("Cls-Object-OOD", "Cls-Object", "classification", "ood",
              "Cls-Object on held-out colour-shape compositions"),
    _TaskSpec("VQA-What", "VQA-What", "vqa", "ind",
              "scene + 'What is the object at the <position>?' -> label"),
    _TaskSpec("VQA-Attr", "VQA-Attr", "vqa", "ind",
              "scene + 'What color is the <shape>?' / 'What shape is the <color> object?' -> attribute"),
    _TaskSpec("VQA-What-OOD", "VQA-What", "vqa", "ood",
              "VQA-What where the asked-about object is a held-out composition"),
    _TaskSpec("Ret-T2I", "Ret-T2I", "retrieval", "ind",
              "scene caption -> scene image; distractors change one object fact"),
    _TaskSpec("Ret-I2T", "Ret-I2T", "retrieval", "ind",
              "scene image -> caption; distractor captions change one fact"),
    _TaskSpec("Ret-Composed", "Ret-Composed", "retrieval", "ind",
              "scene + edit text (replace/recolor/reshape/move/remove/add) -> edited scene"),
    _TaskSpec("Ret-T2I-OOD", "Ret-T2I", "retrieval", "ood",
              "Ret-T2I with one held-out composition in every scene"),
    _TaskSpec("Ret-Composed-OOD", "Ret-Composed", "retrieval", "ood",
              "Ret-Composed whose edit creates a held-out composition"),
    _TaskSpec("Ground", "Ground", "grounding", "ind",
              "scene + referring expression -> crop of that object; other crops as candidates"),
    _TaskSpec("Ground-OOD", "Ground", "grounding", "ood",
              "Ground where the referred object is a held-out composition"),
    _TaskSpec("Doc-Pages", "Doc-Pages", "document", "ind",
              "text query about one 'key -> value' fact -> page (4 facts each), graded NDCG over the corpus"),
    _TaskSpec("Doc-Pages-OOD", "Doc-Pages", "document", "ood",
              "Doc-Pages where the queried fact's key is a held-out composition"),
)
_TASK_BY_NAME = {t.name: t for t in _TASKS}
_FAMILIES = tuple(dict.fromkeys(t.family for t in _TASKS))


def list_tasks() -> pd.DataFrame:
    """The available tasks: one row per task with ``name, meta_task, split, family, description``
    (``family``: the generator; in-domain tasks of one family share training triples)."""
    return pd.DataFrame(
        [(t.name, t.meta_task, t.split, t.family, t.description) for t in _TASKS],
        columns=["name", "meta_task", "split", "family", "description"],
    )


# --------------------------------------------------------------------------- text
def _label(o: Obj) -> str:
    return f"{o[0]} {o[1]}"


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article ("a red circle", "an orange star")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(scene: Scene) -> str:
    parts = [f"{_a(_label(o))} at the {POSITIONS[p]}" for p, o in enumerate(scene) if o is not None]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _fact_text(f: Fact) -> str:
    return f"the {_label(f[0])} points to the {_label(f[1])}"


def _with_image(text: str) -> str:
    return f"{IMAGE_PLACEHOLDER} {text}"


# --------------------------------------------------------------------------- drawing
def _draw_object(draw: ImageDraw.ImageDraw, x0: int, y0: int, cell: int, obj: Obj) -> None:
    """Draw ``obj`` centred in the square cell at (x0, y0) of side ``cell``."""
    color, shape = COLORS[obj[0]], obj[1]
    m = max(1, round(cell * 0.15))
    l, t, r, b = x0 + m, y0 + m, x0 + cell - m - 1, y0 + cell - m - 1
    w = r - l
    cx, cy = (l + r) / 2, (t + b) / 2
    line = max(2, round(w / 5))
    if shape == "circle":
        draw.ellipse((l, t, r, b), fill=color)
    elif shape == "square":
        d = round(w * 0.08)
        draw.rectangle((l + d, t + d, r - d, b - d), fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, t), (r, b), (l, b)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, t), (r, cy), (cx, b), (l, cy)], fill=color)
    elif shape == "cross":
        h = w / 6
        draw.rectangle((round(cx - h), t, round(cx + h), b), fill=color)
        draw.rectangle((l, round(cy - h), r, round(cy + h)), fill=color)
    elif shape == "star":
        ro, ri = w / 2 + 0.5, w * 0.21
        pts = []
        for k in range(10):
            rad = ro if k % 2 == 0 else ri
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.08 * w + rad * math.sin(a)))
        draw.polygon(pts, fill=color)
    elif shape == "ring":
        draw.ellipse((l, t, r, b), outline=color, width=line)
    elif shape == "frame":
        draw.rectangle((l, t, r, b), outline=color, width=line)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _render_scene(scene: Scene, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), _SCENE_BG)
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for p, o in enumerate(scene):
        if o is not None:
            _draw_object(draw, (p % 2) * cell, (p // 2) * cell, cell, o)
    return img


def _render_crop(obj: Obj, size: int) -> Image.Image:
    """The cell crop of ``obj`` (as drawn in a scene of side ``size``) upscaled to ``size``."""
    cell = size // 2
    img = Image.new("RGB", (cell, cell), _SCENE_BG)
    _draw_object(ImageDraw.Draw(img), 0, 0, cell, obj)
    return img.resize((size, size), Image.NEAREST)


def _render_page(page: Page, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), _PAGE_BG)
    draw = ImageDraw.Draw(img)
    cell = size // len(page)
    for row, (key, value) in enumerate(page):
        y = row * cell
        if row:
            draw.line((0, y, size - 1, y), fill=_PAGE_LINE, width=1)
        _draw_object(draw, 0, y, cell, key)
        ym = y + cell // 2
        draw.line((cell + cell // 6, ym, 2 * cell - cell // 3, ym), fill=_ARROW, width=max(1, cell // 10))
        hx = 2 * cell - cell // 6
        draw.polygon([(hx, ym), (hx - cell // 4, ym - cell // 5), (hx - cell // 4, ym + cell // 5)], fill=_ARROW)
        _draw_object(draw, 2 * cell, y, cell, value)
    return img


def _scene_key(scene: Scene, size: int) -> str:
    body = "|".join(f"{o[0]}-{o[1]}@{_POS_ABBR[p]}" for p, o in enumerate(scene) if o is not None)
    return f"scene@{size}:{body}"


def _crop_key(obj: Obj, size: int) -> str:
    return f"crop@{size}:{obj[0]}-{obj[1]}"


def _page_key(page: Page, size: int) -> str:
    return f"page@{size}:" + "|".join(f"{k[0]}-{k[1]}>{v[0]}-{v[1]}" for k, v in page)


class _Factory:
    """Builds Items, sharing one image and one Item object per unique content."""

    def __init__(self, image_size: int):
        self.size = image_size
        self.images: dict[str, Image.Image] = {}
        self.items: dict[str, Item] = {}
        self.scenes: dict[str, Scene] = {}  # image key -> the scene it draws

    def _image(self, key: str, draw: Callable[[], Image.Image]) -> Image.Image:
        img = self.images.get(key)
        if img is None:
            img = self.images[key] = draw()
        return img

    def _item(self, text: str, key: str | None, draw: Callable[[], Image.Image] | None) -> Item:
        uid = f"text:{text}" if key is None else (f"{key} :: {text}" if text else key)
        item = self.items.get(uid)
        if item is None:
            image = None if key is None else self._image(key, draw)
            item = self.items[uid] = Item(text=text, image=image, uid=uid)
        return item

    def text(self, text: str) -> Item:
        return self._item(text, None, None)

    def scene(self, scene: Scene, text: str) -> Item:
        key = _scene_key(scene, self.size)
        self.scenes[key] = scene
        return self._item(text, key, lambda: _render_scene(scene, self.size))

    def crop(self, obj: Obj, text: str) -> Item:
        return self._item(text, _crop_key(obj, self.size), lambda: _render_crop(obj, self.size))

    def page(self, page: Page, text: str) -> Item:
        size = 2 * self.size
        return self._item(text, _page_key(page, size), lambda: _render_page(page, size))


# --------------------------------------------------------------------------- scenes
def _allowed(split: str) -> frozenset[Obj]:
    return frozenset(_IND_PAIRS if split == "ind" else _ALL_PAIRS)


def _random_scene(rng: random.Random, n_objects: int, allowed: frozenset[Obj],
                  include: Obj | None = None) -> Scene:
    """A scene of ``n_objects`` with distinct colours and shapes (``include`` placed first)."""
    for _ in range(1000):
        cells: list[Obj | None] = [None] * 4
        positions = rng.sample(range(4), n_objects)
        used_c: set[str] = set()
        used_s: set[str] = set()
        ok = True
        for i, p in enumerate(positions):
            if i == 0 and include is not None:
                o = include
            else:
                options = [o for o in _ALL_PAIRS if o in allowed and o[0] not in used_c and o[1] not in used_s]
                if not options:
                    ok = False
                    break
                o = rng.choice(options)
            cells[p] = o
            used_c.add(o[0])
            used_s.add(o[1])
        if ok:
            return tuple(cells)
    raise RuntimeError("could not sample a scene")  # pragma: no cover


def _fits(scene: Scene, obj: Obj, skip: int | None = None) -> bool:
    """``obj`` shares neither colour nor shape with the scene's objects (other than position ``skip``)."""
    return all(o is None or p == skip or (o[0] != obj[0] and o[1] != obj[1]) for p, o in enumerate(scene))


def _replace(scene: Scene, pos: int, obj: Obj | None) -> Scene:
    cells = list(scene)
    cells[pos] = obj
    return tuple(cells)


def _mutations(scene: Scene, allowed: frozenset[Obj]) -> list[Scene]:
    """All scenes differing from ``scene`` in exactly one fact *with as many objects*: one object recoloured,
    reshaped or moved to an empty cell (deterministic order).

    These are the distractors of the scene / caption retrieval tasks. Edits that add or remove an object are left
    out: with them (Ret-I2T drew "add" only), "pick the candidate with the fewest objects", a rule that never reads
    the query, scored 25.7% on Ret-I2T at 8 candidates against 12.5% chance (:func:`object_count_baseline`).
    """
    out: list[Scene] = []
    for p, o in enumerate(scene):
        if o is None:
            continue
        out += [_replace(scene, p, (c, o[1])) for c in _COLOR_NAMES  # recolour
                if c != o[0] and (c, o[1]) in allowed and _fits(scene, (c, o[1]), skip=p)]
        out += [_replace(scene, p, (o[0], s)) for s in SHAPES  # reshape
                if s != o[1] and (o[0], s) in allowed and _fits(scene, (o[0], s), skip=p)]
        out += [_replace(_replace(scene, p, None), q, o) for q in range(4) if scene[q] is None]  # move
    return list(dict.fromkeys(out))


def _one_fact_labels(o: Obj, allowed: frozenset[Obj]) -> list[Obj]:
    """Objects sharing the colour or the shape of ``o`` (one attribute changed)."""
    return [(c, o[1]) for c in _COLOR_NAMES if c != o[0] and (c, o[1]) in allowed] + \
           [(o[0], s) for s in SHAPES if s != o[1] and (o[0], s) in allowed]


def _pick(rng: random.Random, positive, pools: Sequence[Sequence], n: int, task: str) -> list:
    """``[positive] + n - 1`` distinct distractors, taken from ``pools`` in priority order."""
    out, seen = [positive], {positive}
    for pool in pools:
        pool = [x for x in dict.fromkeys(pool) if x not in seen]
        rng.shuffle(pool)
        for x in pool[: n - len(out)]:
            out.append(x)
            seen.add(x)
        if len(out) == n:
            return out
    raise ValueError(f"task {task}: only {len(out) - 1} distractors available for n_candidates={n}")


# --------------------------------------------------------------------------- task generators
# Each returns (query Item, [positive Item, distractor Items...]) with n candidates.
def _gen_cls(rng, f: _Factory, split: str, n: int, task: str):
    labels_of = _label_set(split)  # OOD: held-out labels only (one of them would be the positive)
    target = rng.choice(sorted(OOD_PAIRS) if split == "ood" else _IND_PAIRS)
    scene = _replace((None,) * 4, rng.randrange(4), target)
    labels = _pick(rng, target, [_one_fact_labels(target, labels_of), sorted(labels_of)], n, task)
    return f.scene(scene, _with_image(INSTRUCTIONS["cls"])), [f.text(_label(o)) for o in labels]


def _label_set(split: str) -> frozenset[Obj]:
    """Objects an object-candidate list (labels, crops) of ``split`` draws from: in-domain ones for IND, held-out
    ones for OOD (where an in-domain candidate beside the held-out positive would give the answer away to any rule
    that spots "never seen in training", :func:`novelty_baseline`)."""
    return frozenset(_IND_PAIRS) if split == "ind" else OOD_PAIRS


def _n_held_out(scene: Scene) -> int:
    return sum(o in OOD_PAIRS for o in scene if o is not None)


def _scene_with_target(rng, split: str, min_objects: int = 2, all_held_out: bool = False) -> tuple[Scene, int]:
    """An IND scene and a target position; for OOD a scene with one held-out object (the target) among in-domain
    ones, or with ``all_held_out`` a scene of held-out objects only (the target one of them)."""
    n_obj = rng.randint(min_objects, 4)
    if split == "ood" and all_held_out:
        scene = _random_scene(rng, n_obj, OOD_PAIRS)
        pos = rng.choice([p for p, o in enumerate(scene) if o is not None])
    elif split == "ood":
        scene = _random_scene(rng, n_obj, _allowed("ind"), include=rng.choice(sorted(OOD_PAIRS)))
        pos = next(p for p, o in enumerate(scene) if o in OOD_PAIRS)
    else:
        scene = _random_scene(rng, n_obj, _allowed("ind"))
        pos = rng.choice([p for p, o in enumerate(scene) if o is not None])
    return scene, pos


def _gen_vqa_what(rng, f: _Factory, split: str, n: int, task: str):
    scene, pos = _scene_with_target(rng, split, all_held_out=True)  # OOD: the other objects are answers too
    target = scene[pos]
    others = [o for p, o in enumerate(scene) if o is not None and p != pos]
    labels_of = _label_set(split)
    labels = _pick(rng, target, [others, _one_fact_labels(target, labels_of), sorted(labels_of)], n, task)
    q = f"{INSTRUCTIONS['vqa']} What is the object at the {POSITIONS[pos]}?"
    return f.scene(scene, _with_image(q)), [f.text(_label(o)) for o in labels]


def _gen_vqa_attr(rng, f: _Factory, split: str, n: int, task: str):
    scene, pos = _scene_with_target(rng, split)
    target = scene[pos]
    others = [o for p, o in enumerate(scene) if o is not None and p != pos]
    if rng.random() < 0.5:
        q, answer = f"What color is the {target[1]}?", target[0]
        pools = [[o[0] for o in others], list(_COLOR_NAMES)]
    else:
        q, answer = f"What shape is the {target[0]} object?", target[1]
        pools = [[o[1] for o in others], list(SHAPES)]
    answers = _pick(rng, answer, pools, n, task)
    return f.scene(scene, _with_image(f"{INSTRUCTIONS['vqa']} {q}")), [f.text(a) for a in answers]


def _gen_t2i(rng, f: _Factory, split: str, n: int, task: str):
    scene, _ = _scene_with_target(rng, split)
    distractors = _mutations(scene, _allowed(split))
    # OOD: as many held-out objects as the positive (one), or counting them would tell it apart
    distractors = [d for d in distractors if _n_held_out(d) == _n_held_out(scene)]
    scenes = _pick(rng, scene, [distractors], n, task)
    query = f.text(f"{INSTRUCTIONS['t2i']} {_caption(scene)}")
    return query, [f.scene(s, _with_image(INSTRUCTIONS["image"])) for s in scenes]


def _gen_i2t(rng, f: _Factory, split: str, n: int, task: str):
    scene, _ = _scene_with_target(rng, split)
    distractors = _mutations(scene, _allowed(split))
    scenes = _pick(rng, scene, [distractors], n, task)
    return f.scene(scene, _with_image(INSTRUCTIONS["i2t"])), [f.text(_caption(s)) for s in scenes]


def _gen_composed(rng, f: _Factory, split: str, n: int, task: str):
    ind = _allowed("ind")
    # OOD: the edit turns the source's one held-out object into another (replace / recolor / reshape), so
    # source, target and distractors each hold one held-out object and none stands out by novelty
    ops = ["replace", "recolor", "reshape"] + (["add", "move", "remove"] if split == "ind" else [])
    # the edit first, then a source it applies to: "add" and "remove" are equally frequent, so the one candidate
    # whose object count differs (the unedited source) has fewer objects as often as more
    op = rng.choice(ops)
    for _ in range(1000):
        source = _random_scene(rng, rng.randint(2, 3 if op in ("add", "move") else 4), ind)
        occupied = [p for p, o in enumerate(source) if o is not None]
        empty = [p for p, o in enumerate(source) if o is None]
        new_pool = sorted(OOD_PAIRS) if split == "ood" else list(_IND_PAIRS)
        p = rng.choice(empty if op == "add" else occupied)
        if split == "ood":
            source = _replace(source, p, rng.choice(sorted(OOD_PAIRS)))
            if not _fits(source, source[p], skip=p):
                continue
        old = source[p]
        if op == "replace":
            opts = [o for o in new_pool if o[0] != old[0] and o[1] != old[1] and _fits(source, o, skip=p)]
        elif op == "recolor":
            opts = [o for o in new_pool if o[1] == old[1] and o[0] != old[0] and _fits(source, o, skip=p)]
        elif op == "reshape":
            opts = [o for o in new_pool if o[0] == old[0] and o[1] != old[1] and _fits(source, o, skip=p)]
        elif op == "add":
            opts = [o for o in new_pool if _fits(source, o)]
        else:
            opts = [None]
        if not opts:
            continue
        new = rng.choice(opts)
        if op == "replace":
            target, edit = _replace(source, p, new), f"replace the {_label(old)} with {_a(_label(new))}"
        elif op == "recolor":
            target, edit = _replace(source, p, new), f"make the {_label(old)} {new[0]}"
        elif op == "reshape":
            target, edit = _replace(source, p, new), f"turn the {_label(old)} into {_a(new[1])}"
        elif op == "add":
            target, edit = _replace(source, p, new), f"add {_a(_label(new))} at the {POSITIONS[p]}"
        elif op == "move":
            q = rng.choice(empty)
            target, edit = _replace(_replace(source, p, None), q, old), f"move the {_label(old)} to the {POSITIONS[q]}"
        else:
            target, edit = _replace(source, p, None), f"remove the {_label(old)}"
        break
    else:  # pragma: no cover
        raise RuntimeError(f"task {task}: could not sample an edit")
    distractors = _mutations(target, _allowed(split))
    distractors = [d for d in distractors if _n_held_out(d) == _n_held_out(target)]  # OOD: one each, as the target
    scenes = _pick(rng, target, [[source], distractors], n, task)
    query = f.scene(source, _with_image(f"{INSTRUCTIONS['composed']} {edit}"))
    return query, [f.scene(s, _with_image(INSTRUCTIONS["image"])) for s in scenes]


def _gen_ground(rng, f: _Factory, split: str, n: int, task: str):
    scene, pos = _scene_with_target(rng, split, all_held_out=True)  # OOD: the other crops are held-out too
    target = scene[pos]
    others = [o for p, o in enumerate(scene) if o is not None and p != pos]
    labels_of = _label_set(split)
    variants = _one_fact_labels(target, labels_of)
    rest = sorted(labels_of)  # OOD: few held-out variants exist; fill with other held-out objects
    mode = rng.choice(("position", "color", "shape"))
    if mode == "position":
        ref, pools = f"the object at the {POSITIONS[pos]}", [others, variants, rest]
    elif mode == "color":
        ref, pools = f"the {target[0]} object", [[v for v in variants if v[0] == target[0]], others, variants, rest]
    else:
        ref, pools = f"the {target[1]}", [[v for v in variants if v[1] == target[1]], others, variants, rest]
    crops = _pick(rng, target, pools, n, task)
    query = f.scene(scene, _with_image(f"{INSTRUCTIONS['ground']} {ref}"))
    return query, [f.crop(o, _with_image(INSTRUCTIONS["crop"])) for o in crops]


_GENERATORS = {
    "Cls-Object": _gen_cls,
    "VQA-What": _gen_vqa_what,
    "VQA-Attr": _gen_vqa_attr,
    "Ret-T2I": _gen_t2i,
    "Ret-I2T": _gen_i2t,
    "Ret-Composed": _gen_composed,
    "Ground": _gen_ground,
}


# --------------------------------------------------------------------------- documents
def _random_page(rng: random.Random, allowed: Sequence[Obj], rows: int = 4) -> list[Fact]:
    """``rows`` facts with distinct keys, distinct values and no object pointing to itself."""
    keys = rng.sample(list(allowed), rows)
    while True:
        values = rng.sample(list(allowed), rows)
        if all(k != v for k, v in zip(keys, values)):
            return list(zip(keys, values))


#: Doc-Pages-OOD's corpus, like Doc-Pages', shows 48 objects: the 16 held-out ones and 32 of the in-domain ones
#: (:data:`_OOD_DOC_IND_OBJECTS`, drawn per corpus). Its queried keys are held-out and its queried values in-domain,
#: so the other rows give a key slot to a held-out object with probability 1/9 and a value slot with probability
#: 4/9 (the rest uniform over the 32). Then, for n queries, every object shows in key slots and in value slots on
#: n / 6 pages in expectation, as in Doc-Pages, and a query's key has 8 n / 48 + 1 grade-1 pages, as in Doc-Pages:
#: shallow rankers that ignore binding score alike on both (``tests/test_synthetic.py``). With in-domain other rows
#: only, a held-out key showed on about 8 pages and never as a value, and "rank the pages showing the query's key
#: or value" scored NDCG@5 74.8 on Doc-Pages-OOD against 63.6 on Doc-Pages (seed 0, 48 queries).
_OOD_REST_HELD_OUT = (1 / 9, 4 / 9)
_OOD_DOC_IND_OBJECTS = 32


def _random_ood_rows(rng: random.Random, exclude: Sequence[Obj], ind: Sequence[Obj], rows: int = 3) -> list[Fact]:
    """``rows`` facts as :func:`_random_page` draws them, each key (value) held-out with probability
    :data:`_OOD_REST_HELD_OUT` [0] ([1]), else one of ``ind``; never an object of ``exclude``."""
    held_out = sorted(OOD_PAIRS)

    def draw(p: float) -> list[Obj]:
        out: list[Obj] = []
        for _ in range(rows):
            pool = held_out if rng.random() < p else ind
            out.append(rng.choice([o for o in pool if o not in exclude and o not in out]))
        return out

    while True:
        keys, values = draw(_OOD_REST_HELD_OUT[0]), draw(_OOD_REST_HELD_OUT[1])
        if all(k != v for k, v in zip(keys, values)):
            return list(zip(keys, values))


def _doc_pages(rng: random.Random, split: str, n_queries: int, task: str) -> tuple[list[Page], list[Fact]]:
    """Target pages with a sibling each (queried fact's value changed) and the queried facts.

    A queried fact occurs on exactly one page; pages never repeat an earlier queried fact.
    """
    pages: list[Page] = []
    facts: list[Fact] = []
    present: set[Fact] = set()  # every fact on the pages so far
    values_pool = list(_IND_PAIRS)
    if split == "ood":  # 48 objects in all, as in Doc-Pages (see _OOD_REST_HELD_OUT)
        values_pool = sorted(rng.sample(values_pool, _OOD_DOC_IND_OBJECTS))
    for i in range(n_queries):
        if split == "ood":  # few held-out facts exist (16 keys x 32 values): pick among the unused ones
            options = [(k, v) for k in sorted(OOD_PAIRS) for v in values_pool if (k, v) not in present]
        found = None
        for _ in range(1000):
            if split == "ood":
                if not options:
                    break
                fact = rng.choice(options)
            else:
                fact = (rng.choice(_IND_PAIRS), rng.choice(_IND_PAIRS))
                if fact[0] == fact[1] or fact in present:
                    continue
            # OOD: held-out objects fill other rows too, so the query's key is no rarer a sight than in Doc-Pages
            rest = (_random_ood_rows(rng, fact, values_pool) if split == "ood"
                    else _random_page(rng, [o for o in _IND_PAIRS if o not in fact], 3))
            if set(facts) & set(rest):
                continue
            j = rng.randrange(4)
            page = [*rest[:j], fact, *rest[j:]]
            values = {v for _, v in page}
            new_values = [v for v in values_pool if v not in values and v != fact[0] and (fact[0], v) not in facts]
            sibling = list(page)
            sibling[j] = (fact[0], rng.choice(new_values))
            found = (page, sibling, fact)
            break
        if found is None:
            raise ValueError(
                f"task {task}: cannot build {n_queries} queries whose facts are unique in the corpus "
                f"(stopped after {i}); lower n_eval_queries"
            )
        page, sibling, fact = found
        pages += [tuple(page), tuple(sibling)]
        present.update(page, sibling)
        facts.append(fact)
    return pages, facts


def _gen_doc_task(rng: random.Random, f: _Factory, spec: _TaskSpec, n_queries: int) -> DocRetrievalTask:
    pages, facts = _doc_pages(rng, spec.split, n_queries, spec.name)
    rng.shuffle(pages)
    width = len(str(len(pages) - 1))
    docids = [f"page-{i:0{width}d}" for i in range(len(pages))]
    corpus = {d: f.page(pg, _with_image(INSTRUCTIONS["page"])) for d, pg in zip(docids, pages)}
    queries: dict[str, Item] = {}
    qrels: dict[str, dict[str, int]] = {}
    qwidth = len(str(n_queries - 1))
    for i, (key, value) in enumerate(facts):
        qid = f"q-{i:0{qwidth}d}"
        queries[qid] = f.text(f"{INSTRUCTIONS['doc_query']} {_fact_text((key, value))}")
        rel = {}
        for d, pg in zip(docids, pages):
            if (key, value) in pg:
                rel[d] = 2
            elif any(k == key for k, _ in pg):
                rel[d] = 1
        qrels[qid] = rel
    return DocRetrievalTask(name=spec.name, queries=queries, corpus=corpus, qrels=qrels, split=spec.split)


def _doc_train(rng: random.Random, f: _Factory) -> tuple[Item, Item, Item]:
    (page, sibling), (fact,) = _doc_pages(rng, "ind", 1, "Doc-Pages")
    text = _with_image(INSTRUCTIONS["page"])
    return f.text(f"{INSTRUCTIONS['doc_query']} {_fact_text(fact)}"), f.page(page, text), f.page(sibling, text)


# --------------------------------------------------------------------------- public API
#: Consecutive draws that may hit an already used query before a task stops drawing.
_MAX_DRAWS = 1000
#: ``make_benchmark``'s sizes, also used where ``data.n_train`` / ``data.n_eval_queries`` are ``None``.
DEFAULT_N_TRAIN = 512
DEFAULT_N_EVAL_QUERIES = 40


def _gen_eval_task(rng: random.Random, f: _Factory, spec: _TaskSpec, n_queries: int, n_candidates: int) -> EvalTask:
    """``n_queries`` distinct queries (fewer when the task has fewer: Cls-Object-OOD has 16 x 4 = 64)."""
    width = len(str(n_queries - 1))
    queries: list[EvalQuery] = []
    used: set[str] = set()
    misses = 0
    while len(queries) < n_queries and misses < _MAX_DRAWS:
        q, cands = _GENERATORS[spec.family](rng, f, spec.split, n_candidates, spec.name)
        if q.uid in used:
            misses += 1
            continue
        misses = 0
        used.add(q.uid)
        queries.append(EvalQuery(query=q, candidates=cands, qid=f"{spec.name}/{len(queries):0{width}d}"))
    return EvalTask(name=spec.name, meta_task=spec.meta_task, split=spec.split, queries=queries)


def tasks_not_held_out(trained: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """The in-domain tasks of ``tasks`` whose evaluation queries ``make_benchmark(tasks=trained)`` may have
    trained on (same seed and ``n_candidates``), in ``tasks``' order.

    Training holds out the queries of the selected tasks, and every scene they show or retrieve from every
    family, nothing else.  So an added in-domain Doc-Pages task was not held out when the Doc-Pages family
    trained, and an added in-domain scene task when any family other than Doc-Pages trained (conservatively: a
    Cls-Object-only training draws one-object scenes, which no other task evaluates).  Out-of-domain tasks use
    compositions training never draws.
    """
    unknown = [t for t in [*trained, *tasks] if t not in _TASK_BY_NAME]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; available: {[t.name for t in _TASKS]}")
    families = {_TASK_BY_NAME[t].family for t in trained}
    scene_families = families - {"Doc-Pages"}
    out = []
    for name in dict.fromkeys(tasks):
        spec = _TASK_BY_NAME[name]
        if name in trained or spec.split != "ind":
            continue
        if spec.family in families or (spec.meta_task != "document" and scene_families):
            out.append(name)
    return out


def _image_key(item: Item) -> str:
    """The image part of an image item's uid (``"scene@56:..."``), whatever its text."""
    return item.uid.split(" :: ", 1)[0]


def _is_scene(item: Item) -> bool:
    """``item`` shows a scene (not a crop, a page or no image)."""
    return item.uid.startswith("scene@")


def _integer(value: object, name: str) -> int:
    """``value`` as an ``int`` (numpy integers too); TypeError naming ``name`` for bools, floats and the like."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def _rng(seed: int, name: str) -> random.Random:
    digest = hashlib.sha256(f"metaembed-synthetic:{seed}:{name}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def make_benchmark(
    n_train: int = DEFAULT_N_TRAIN,
    n_eval_queries: int = DEFAULT_N_EVAL_QUERIES,
    n_candidates: int = 8,
    image_size: int = 56,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    progress: bool = False,
) -> Benchmark:
    """Generate the synthetic benchmark (deterministic in all arguments).

    ``n_train`` training triples are spread round-robin over the training
    families of the selected tasks (IND compositions only), and never use a
    query of the selected evaluation tasks, nor, in any role of any family, a
    scene such a query shows or retrieves (its query image or positive scene);
    triples may repeat each other (the Cls-Object space is small).  Every selected task gets ``n_eval_queries``
    distinct queries, or all it has when its space is smaller (Cls-Object-OOD:
    16 held-out objects x 4 positions = 64; drawing stops after
    ``_MAX_DRAWS`` repeats in a row); a ValueError when the evaluation queries
    leave a training family none (Cls-Object: all 192 evaluated) or a Doc-Pages
    corpus cannot hold that many unique facts.  Doc-Pages training pages are
    drawn independently of the evaluation corpus: a training query never names
    an evaluation query's fact, but its pages may show one.  MMEB-style tasks
    have ``n_candidates`` candidates per query (positive first, 2..8).  ``tasks`` selects task names
    from :func:`list_tasks` (``None``: all).  Scenes are ``image_size`` px,
    pages ``2 * image_size`` px.
    """
    if isinstance(tasks, str):
        raise ValueError(f"tasks={tasks!r}; expected a list of task names (or None for all)")
    n_train, n_eval_queries, n_candidates, image_size, seed = (
        _integer(v, k) for k, v in (("n_train", n_train), ("n_eval_queries", n_eval_queries),
                                    ("n_candidates", n_candidates), ("image_size", image_size), ("seed", seed)))
    names = [t.name for t in _TASKS] if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in _TASK_BY_NAME]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; available: {[t.name for t in _TASKS]}")
    if not names:
        raise ValueError("tasks is empty; pass None for all tasks")
    if not 2 <= n_candidates <= MAX_CANDIDATES:
        raise ValueError(f"n_candidates={n_candidates}; the synthetic tasks support 2..{MAX_CANDIDATES}")
    if image_size < 16 or image_size % 2:
        raise ValueError(f"image_size={image_size}; expected an even number >= 16 (default 56)")
    if n_train < 0 or n_eval_queries < 1:
        raise ValueError(f"need n_train >= 0 and n_eval_queries >= 1, got {n_train}, {n_eval_queries}")

    f = _Factory(image_size)
    specs = [_TASK_BY_NAME[n] for n in names]
    families = [fam for fam in _FAMILIES if any(s.family == fam for s in specs)]
    bar = tqdm(total=n_train + n_eval_queries * len(specs), desc="synthetic benchmark", disable=not progress)

    eval_tasks: list[EvalTask] = []
    doc_tasks: list[DocRetrievalTask] = []
    for spec in specs:
        rng = _rng(seed, f"eval/{spec.name}")
        if spec.meta_task == "document":
            doc_tasks.append(_gen_doc_task(rng, f, spec, n_eval_queries))
        else:
            eval_tasks.append(_gen_eval_task(rng, f, spec, n_eval_queries, n_candidates))
        bar.update(n_eval_queries)

    # training never shows an evaluation query (Cls-Object has only 48 x 4 = 192 distinct images; a Doc-Pages
    # query names one of 48 x 47 = 2256 facts)
    held_out = {q.query.uid for t in eval_tasks for q in t.queries}
    held_out |= {q.uid for t in doc_tasks for q in t.queries.values()}
    # nor, in any role of any family, a scene an evaluation query shows or retrieves (its query image, or its
    # positive scene: Ret-T2I, Ret-Composed): another family's triple on that scene would train its answer (a
    # VQA-What triple naming the object a VQA-Attr query asks about; Ret-T2I read backwards is Ret-I2T)
    # -- nor, for the retrieval tasks, any candidate: their positives were held out and some distractors were
    # not, so "prefer the candidate seen in training" scored 7.3-9.1 there and its reverse 13.2-14.5 (chance 12.5)
    retrieval = [q for t in eval_tasks if t.meta_task == "retrieval" for q in t.queries]
    held_out |= {c.uid for q in retrieval for c in q.candidates}
    held_scenes = {_image_key(it) for t in eval_tasks for q in t.queries for it in (q.query, q.candidates[0])
                   if _is_scene(it)}
    held_scenes |= {_image_key(c) for q in retrieval for c in q.candidates if _is_scene(c)}
    # nor their captions (a Ret-I2T training distractor caption could describe an evaluation scene)
    held_captions = {f"text:{_caption(f.scenes[k])}" for k in held_scenes}
    train: list[TrainExample] = []
    rngs = {fam: _rng(seed, f"train/{fam}") for fam in families}
    for i in range(n_train):
        fam = families[i % len(families)]
        for _ in range(_MAX_DRAWS):
            if fam == "Doc-Pages":
                q, pos, neg = _doc_train(rngs[fam], f)
            else:
                q, (pos, neg) = _GENERATORS[fam](rngs[fam], f, "ind", 2, fam)
            if q.uid not in held_out and not any((_is_scene(it) and _image_key(it) in held_scenes)
                                                 or it.uid in held_captions or it.uid in held_out
                                                 for it in (q, pos, neg)):
                break
        else:
            raise ValueError(f"{fam}: {_MAX_DRAWS} training draws in a row were evaluation queries or scenes: "
                             f"n_eval_queries={n_eval_queries} leaves (almost) no {fam} query to train on; "
                             f"lower n_eval_queries")
        train.append(TrainExample(query=q, positive=pos, negative=neg, task=fam))
        bar.update()
    bar.close()
    return Benchmark(train=train, eval_tasks=eval_tasks, doc_tasks=doc_tasks)


_OBJECT_RE = re.compile(r"\b(" + "|".join(_COLOR_NAMES) + r")[ -](" + "|".join(SHAPES) + r")\b")


def _held_out_count(item: Item) -> int:
    """How many distinct held-out compositions ``item`` draws or names (its uid lists the drawn objects and the
    text)."""
    return len({(m.group(1), m.group(2)) for m in _OBJECT_RE.finditer(item.uid)} & OOD_PAIRS)


def novelty_baseline(benchmark: Benchmark) -> pd.DataFrame:
    """P@1 (%) of a rule that never reads the query: pick uniformly among the candidates that draw or name the
    most held-out compositions (:data:`OOD_PAIRS`; all candidates when none does).

    The ceiling of what spotting "compositions never seen in training" earns on each evaluation task, next to
    chance.  The generator builds every OOD candidate list so that all candidates hold equally many held-out
    compositions, and this rule scores chance everywhere (a test keeps it so).  Before that, in Cls-Object-OOD,
    VQA-What-OOD and Ground-OOD the positive was the only held-out candidate and the rule scored 100%.
    """
    rows = [{**_task_columns(t), "novelty P@1": _query_blind_p1(t, _held_out_count, max), "chance P@1": _chance_p1(t)}
            for t in benchmark.eval_tasks]
    return pd.DataFrame(rows, columns=["task", "split", "meta_task", "novelty P@1", "chance P@1"])


def _object_count(item: Item) -> int:
    """How many objects ``item`` draws (a scene or crop) or names (a caption): the objects its uid lists before
    the text part."""
    return len(_OBJECT_RE.findall(item.uid.split(" :: ")[0]))


def object_count_baseline(benchmark: Benchmark) -> pd.DataFrame:
    """P@1 (%) of two rules that never read the query: pick uniformly among the candidates that draw or name the
    fewest (``fewest objects P@1``), or the most (``most objects P@1``), objects; next to chance.

    Far from chance, a task can be answered in part by counting objects in each candidate, a prior an encoder
    can learn without binding the query to its candidate.  The generator keeps every task at chance or below
    (a test keeps it so): retrieval distractors keep the positive's object count, and only Ret-Composed's unedited
    source differs, with fewer objects as often as more (both rules about 10.8% at 8 candidates, chance 12.5%).
    Before, distractors added objects more often than they removed them (Ret-I2T never removed one), and
    ``fewest objects`` scored 25.7% on Ret-I2T and 17.6% / 21.4% on Ret-Composed / -OOD.
    """
    rows = [{**_task_columns(t), "fewest objects P@1": _query_blind_p1(t, _object_count, min),
             "most objects P@1": _query_blind_p1(t, _object_count, max), "chance P@1": _chance_p1(t)}
            for t in benchmark.eval_tasks]
    return pd.DataFrame(rows, columns=["task", "split", "meta_task", "fewest objects P@1", "most objects P@1",
                                       "chance P@1"])


def _task_columns(t: EvalTask) -> dict[str, str]:
    return {"task": t.name, "split": t.split, "meta_task": t.meta_task}


def _query_blind_p1(t: EvalTask, feature: Callable[[Item], int], pick: Callable[[list[int]], int]) -> float:
    """P@1 (%) of picking uniformly among each query's candidates whose ``feature`` is ``pick``-extreme (the
    positive is candidate 0)."""
    hits = 0.0
    for q in t.queries:
        values = [feature(c) for c in q.candidates]
        best = pick(values)
        pool = [i for i, v in enumerate(values) if v == best]
        hits += (0 in pool) / len(pool)
    return 100.0 * hits / max(len(t.queries), 1)


def _chance_p1(t: EvalTask) -> float:
    return 100.0 * sum(1 / len(q.candidates) for q in t.queries) / max(len(t.queries), 1)


def synthetic_sizes(cfg: DataConfig) -> tuple[int, int]:
    """``(n_train, n_eval_queries)`` the synthetic source uses for ``cfg`` (``None``: the defaults)."""
    return (DEFAULT_N_TRAIN if cfg.n_train is None else cfg.n_train,
            DEFAULT_N_EVAL_QUERIES if cfg.n_eval_queries is None else cfg.n_eval_queries)


def benchmark_from_config(cfg: DataConfig) -> Benchmark:
    """Build the benchmark a :class:`DataConfig` with ``source='synthetic'`` describes.

    ``cfg.subsets`` selects tasks by name; ``n_train`` / ``n_eval_queries`` =
    ``None`` are :func:`make_benchmark`'s defaults (512, 40); ``path``, ``eval_path``,
    ``max_per_subset`` and ``subset_weights`` concern real data and are ignored.
    """
    if cfg.source != "synthetic":
        raise ValueError(f"data.source={cfg.source!r}; benchmark_from_config only builds 'synthetic'")
    n_train, n_eval_queries = synthetic_sizes(cfg)
    return make_benchmark(
        n_train=n_train,
        n_eval_queries=n_eval_queries,
        n_candidates=cfg.n_candidates,
        image_size=cfg.image_size,
        seed=cfg.seed,
        tasks=cfg.subsets,
    )
