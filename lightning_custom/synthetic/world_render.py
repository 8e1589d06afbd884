"""A procedural image world: coloured, patterned shapes on plain backgrounds, with template captions.

Every image is a pure function of its :class:`Attributes` and a seed, so the world is reproducible bit for bit.
The vocabulary (:data:`SHAPES`, :data:`COLOURS`, :data:`PATTERNS`, :data:`BACKGROUNDS`) is what captions can say;
held-out concepts (:mod:`lightning_custom.synthetic.world_concepts`) are built from parts outside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "arrow")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (250, 140, 20), "yellow": (245, 220, 40), "green": (40, 170, 60),
    "blue": (40, 70, 220), "purple": (130, 40, 180), "white": (245, 245, 245), "black": (25, 25, 25),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "white": (232, 232, 232), "black": (15, 15, 15),
    "blue": (120, 160, 235), "green": (130, 200, 130), "yellow": (240, 225, 140),
}
TEMPLATES: tuple[str, ...] = (
    "a photo of a {object} on a {background} background",
    "a {object} on a {background} background",
    "a rendering of a {object} on a {background} background",
    "a picture of a {object} in front of a {background} background",
)
NO_BACKGROUND_TEMPLATES: tuple[str, ...] = ("a photo of a {object}", "a {object}", "a rendering of a {object}")
SUPERSAMPLE = 4


def vocabulary() -> tuple[str, ...]:
    """Every word a world caption can hold (pass it to ``build_clip_tokenizer(extra_words)``)."""
    words = [*SHAPES, *COLOURS, *PATTERNS, *BACKGROUNDS, "photo", "rendering", "picture", "front", "background"]
    for template in TEMPLATES + NO_BACKGROUND_TEMPLATES:
        words += [w for w in template.replace("{object}", "").replace("{background}", "").split() if w.isalpha()]
    return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class Attributes:
    """What one image shows. ``colour`` / ``second_colour`` may be vocabulary names or ``"#rrggbb"``; ``shape`` may
    be a vocabulary name or ``"poly:<seed>"`` (a random star-shaped polygon that no caption can name)."""

    shape: str
    colour: str
    pattern: str = "plain"
    background: str = "grey"
    second_colour: str | None = None  # None: the pattern is a lighter / darker shade of ``colour``

    def as_dict(self) -> dict[str, str | None]:
        """Plain dict (JSON-friendly)."""
        return asdict(self)

    @property
    def describable(self) -> bool:
        """Whether a caption can name every part (it lies inside the vocabulary)."""
        return (self.shape in SHAPES and self.colour in COLOURS and self.pattern in PATTERNS
                and self.background in BACKGROUNDS and self.second_colour is None)


def rgb(colour: str) -> tuple[int, int, int]:
    """RGB of a palette name or ``#rrggbb``."""
    if colour in COLOURS:
        return COLOURS[colour]
    if colour.startswith("#") and len(colour) == 7:
        return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    raise ValueError(f"unknown colour {colour!r}")


def shade(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pattern's second colour when none is given: a tint of a dark colour, a shade of a light one."""
    c = np.asarray(colour, dtype=float)
    luminance = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255
    out = c + (255 - c) * 0.6 if luminance < 0.45 else c * 0.45
    return tuple(int(round(v)) for v in out)  # type: ignore[return-value]


def training_combinations() -> list[Attributes]:
    """Every describable (shape, colour, pattern, background) the base model trains on; the object's colour is
    never its background's (a blue star on a blue background would be hard to see)."""
    return [Attributes(s, c, p, b) for s in SHAPES for c in COLOURS for p in PATTERNS for b in BACKGROUNDS if c != b]


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """One uniformly drawn training combination."""
    combos = _COMBOS
    return combos[int(rng.integers(len(combos)))]


def _star_polygon(n: int, inner: float) -> list[tuple[float, float]]:
    return [((1.0 if i % 2 == 0 else inner) * math.sin(math.pi * i / n), -(1.0 if i % 2 == 0 else inner)
             * math.cos(math.pi * i / n)) for i in range(2 * n)]


def _heart(points: int = 48) -> list[tuple[float, float]]:
    out = []
    for i in range(points):
        t = 2 * math.pi * i / points
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 17, -(y + 2.5) / 17))
    return out


def random_polygon(seed: int) -> list[tuple[float, float]]:
    """A star-shaped polygon with 5-9 vertices at seeded radii: an unnamed shape for held-out concepts."""
    rng = np.random.default_rng(seed + 7919)
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n) + np.arange(n) * 0.0)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.35, 0.35, n) * (2 * np.pi / n)
    radii = rng.uniform(0.35, 1.0, n)
    radii[int(rng.integers(n))] = 1.0
    return [(float(r * math.cos(a)), float(r * math.sin(a))) for r, a in zip(radii, angles)]


def outline(shape: str) -> list[tuple[float, float]] | None:
    """The shape's polygon in [-1, 1]^2 (``None`` for the circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)]
    if shape == "star":
        return _star_polygon(5, 0.42)
    if shape == "heart":
        return _heart()
    if shape == "cross":
        a, b = 0.32, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    if shape == "arrow":
        return [(-0.95, -0.22), (0.15, -0.22), (0.15, -0.62), (0.95, 0.0), (0.15, 0.62), (0.15, 0.22), (-0.95, 0.22)]
    if shape.startswith("poly:"):
        return random_polygon(int(shape.split(":", 1)[1]))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(px: int, pattern: str, first: tuple[int, int, int], second: tuple[int, int, int]) -> Image.Image:
    tex = Image.new("RGB", (px, px), first)
    d = ImageDraw.Draw(tex)
    band = max(2, px // 6)
    if pattern == "striped":
        for y in range(0, px, 2 * band):
            d.rectangle([0, y + band, px, y + 2 * band - 1], fill=second)
    elif pattern == "dotted":
        r = band * 0.55
        for j, y in enumerate(range(band // 2, px + band, band * 2 - band // 3)):
            for x in range(band // 2 + (j % 2) * band, px + band, 2 * band):
                d.ellipse([x - r, y - r, x + r, y + r], fill=second)
    elif pattern == "checkered":
        for j, y in enumerate(range(0, px, band)):
            for i, x in enumerate(range(0, px, band)):
                if (i + j) % 2:
                    d.rectangle([x, y, x + band - 1, y + band - 1], fill=second)
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}")
    return tex


def render(attrs: Attributes, seed: int, size: int = 32, *, jitter: bool = True) -> Image.Image:
    """Draws ``attrs`` as a ``size`` x ``size`` RGB image; position, scale (50-90% of the side), rotation (+-30
    degrees) and a small colour jitter come from ``seed``. Deterministic."""
    rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE

    def colour_of(name: str, table: dict = COLOURS) -> tuple[int, int, int]:
        c = np.asarray(table.get(name) or rgb(name), dtype=float) + (rng.uniform(-12, 12, 3) if jitter else 0)
        return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]

    background = colour_of(attrs.background, BACKGROUNDS)
    first = colour_of(attrs.colour)
    second = colour_of(attrs.second_colour) if attrs.second_colour else shade(first)
    scale = rng.uniform(0.5, 0.9)
    angle = float(rng.uniform(-30, 30))
    px = int(big * scale)
    sprite = _texture(px, attrs.pattern, first, second).convert("RGBA")
    mask = Image.new("L", (px, px), 0)
    poly = outline(attrs.shape)
    m = ImageDraw.Draw(mask)
    half = (px - 1) / 2
    if poly is None:
        m.ellipse([px * 0.08, px * 0.08, px * 0.92, px * 0.92], fill=255)
    else:
        m.polygon([(half + x * half * 0.98, half + y * half * 0.98) for x, y in poly], fill=255)
    sprite.putalpha(mask)
    sprite = sprite.rotate(angle, resample=Image.BICUBIC)
    canvas = Image.new("RGBA", (big, big), background + (255,))
    x = int(rng.integers(0, big - px + 1))
    y = int(rng.integers(0, big - px + 1))
    canvas.alpha_composite(sprite, (x, y))
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


def object_phrase(attrs: Attributes, *, with_pattern: bool = True, with_colour: bool = True) -> str:
    """``"red striped star"``; a plain pattern is left unsaid."""
    words = []
    if with_colour:
        words.append(attrs.colour)
    if with_pattern and attrs.pattern != "plain":
        words.append(attrs.pattern)
    words.append(attrs.shape)
    return " ".join(words)


def caption(attrs: Attributes, template: int = 0) -> str:
    """The full caption, e.g. ``"a photo of a red striped star on a grey background"``."""
    return TEMPLATES[template % len(TEMPLATES)].format(object=object_phrase(attrs), background=attrs.background)


def random_caption(attrs: Attributes, rng: np.random.Generator, drop: float = 0.15) -> str:
    """A caption with a random template; colour, pattern and background are each left out with probability
    ``drop``, so the model also learns prompts that say less (as personalization prompts do)."""
    phrase = object_phrase(attrs, with_pattern=rng.random() >= drop, with_colour=rng.random() >= drop)
    if rng.random() < drop:
        templates = NO_BACKGROUND_TEMPLATES
        return templates[int(rng.integers(len(templates)))].format(object=phrase)
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(object=phrase, background=attrs.background)


def render_dataset(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[Attributes]]:
    """``n`` uniformly drawn training images (uint8, N x H x W x 3) and their attributes; deterministic."""
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(n)]
    seeds = rng.integers(0, 2**31 - 1, n)
    images = np.stack([np.asarray(render(a, int(s), size)) for a, s in zip(attrs, seeds)])
    return images, attrs


def with_background(attrs: Attributes, background: str) -> Attributes:
    """The same object on another background."""
    return replace(attrs, background=background)


def grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images pasted into a plain grid (no labels)."""
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    out = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        out.paste(img, ((i % columns) * w, (i // columns) * h))
    return out


_COMBOS = training_combinations()
