"""Held-out concepts: objects the base model never saw and no prompt can describe.

Each concept is one object (a shape, a colour or two, a pattern) that lies outside the caption vocabulary in at
least one part: an unnamed random polygon, a colour off the palette, or a pattern of two palette colours (training
patterns are always shades of one colour). It comes with 4-6 example images on two backgrounds, and evaluation
prompts that put it on the other backgrounds (new contexts), scored by the world's encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_custom.synthetic.world_render import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, Attributes, render

KINDS: tuple[str, ...] = ("new_shape", "two_colour", "off_palette", "new_shape_two_colour")
EVAL_TEMPLATE = "a photo of a {} on a {} background"
TRAIN_PROMPT = "a photo of a {}"


@dataclass(frozen=True)
class Concept:
    """One held-out concept.

    Attributes:
        name: folder-friendly name, e.g. ``"c007-off_palette"``.
        kind: one of :data:`KINDS`.
        attrs: the object (its ``background`` is that of the first image).
        image_backgrounds: the background of each example image.
        image_seeds: the render seed of each example image.
        eval_backgrounds: backgrounds of the evaluation prompts (none of them is in ``image_backgrounds``).
        initializer_token: a word to start a learned token from (the shape's name, or ``"shape"``).
        class_word: the class noun for prior preservation.
    """

    name: str
    kind: str
    attrs: Attributes
    image_backgrounds: tuple[str, ...]
    image_seeds: tuple[int, ...]
    eval_backgrounds: tuple[str, ...]
    initializer_token: str
    class_word: str = "shape"

    @property
    def placeholder_token(self) -> str:
        """The concept's own token, e.g. ``"<c007>"``."""
        return f"<{self.name.split('-')[0]}>"

    def images(self, size: int = 32) -> list[Image.Image]:
        """The example images, deterministic."""
        return [render(replace(self.attrs, background=b), s, size) for b, s in zip(self.image_backgrounds, self.image_seeds)]

    def eval_prompts(self, token: str | None = None) -> list[tuple[str, Attributes]]:
        """``(prompt, target)`` pairs: the concept on each evaluation background."""
        token = token or self.placeholder_token
        return [(EVAL_TEMPLATE.format(token, b), replace(self.attrs, background=b)) for b in self.eval_backgrounds]

    def write_images(self, folder: str | Path, size: int = 32) -> Path:
        """Writes ``NN.png`` files to ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(self.images(size)):
            img.save(folder / f"{i:02d}.png")
        return folder


def _off_palette_colour(rng: np.random.Generator, min_distance: float = 90.0) -> str:
    """A random colour at least ``min_distance`` (RGB Euclidean) from every palette and background colour."""
    palette = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=float)
    while True:
        c = rng.integers(0, 256, 3)
        if np.min(np.linalg.norm(palette - c, axis=1)) >= min_distance:
            return "#" + "".join(f"{int(v):02x}" for v in c)


def make_concept(index: int, seed: int = 2024) -> Concept:
    """The ``index``-th held-out concept (its kind cycles through :data:`KINDS`); deterministic."""
    rng = np.random.default_rng([seed, index])
    kind = KINDS[index % len(KINDS)]
    colours = list(COLOURS)
    shape = str(rng.choice(SHAPES))
    colour = str(rng.choice(colours))
    pattern = str(rng.choice(PATTERNS))
    second = None
    if kind in ("new_shape", "new_shape_two_colour"):
        shape = f"poly:{seed * 1000 + index}"
    if kind in ("two_colour", "new_shape_two_colour"):
        pattern = str(rng.choice(PATTERNS[1:]))
        second = str(rng.choice([c for c in colours if c != colour]))
    if kind == "off_palette":
        colour = _off_palette_colour(rng)
    used = {colour, second}
    backgrounds = [b for b in BACKGROUNDS if b not in used]
    order = [str(b) for b in rng.permutation(backgrounds)]
    image_backgrounds, eval_backgrounds = order[:2], tuple(order[2:])
    n = 4 + int(rng.integers(3))
    attrs = Attributes(shape, colour, pattern, image_backgrounds[0], second)
    return Concept(
        name=f"c{index:03d}-{kind}",
        kind=kind,
        attrs=attrs,
        image_backgrounds=tuple(image_backgrounds[i % 2] for i in range(n)),
        image_seeds=tuple(int(s) for s in rng.integers(0, 2**31 - 1, n)),
        eval_backgrounds=eval_backgrounds,
        initializer_token=shape if shape in SHAPES else "shape",
    )


def heldout_concepts(n: int = 120, seed: int = 2024) -> list[Concept]:
    """The first ``n`` held-out concepts (the benchmark uses a prefix of this list)."""
    return [make_concept(i, seed) for i in range(n)]
