"""Image grids with wrapped labels, written atomically as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lightning_custom.runtime.io import atomic_path


def write_png(image: Image.Image, path: str | Path) -> Path:
    """Save ``image`` as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


LABEL_SIZE = 11  # px, Pillow's bundled font


def label_font() -> ImageFont.ImageFont:
    """Pillow's bundled font at :data:`LABEL_SIZE` (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=LABEL_SIZE)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def word_gap(font: ImageFont.ImageFont) -> float:
    """The gap drawn between words: the font's own space is 2 px at this size, which reads as no space at all."""
    return max(float(font.getlength(" ")), 0.4 * LABEL_SIZE)


def wrap_label(text: str, font: ImageFont.ImageFont, width: float, max_lines: int = 3) -> list[list[str]]:
    """``text`` in lines of words that fit ``width`` pixels; a word is never split (one too long gets a line of its
    own and is clipped at the edge)."""
    lines: list[list[str]] = [[]]
    used = 0.0
    for word in text.split():
        length = float(font.getlength(word))
        if lines[-1] and used + word_gap(font) + length > width:
            lines.append([])
            used = 0.0
        used += (word_gap(font) if lines[-1] else 0.0) + length
        lines[-1].append(word)
    return lines[:max_lines]


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int, cell: int = 128) -> Image.Image:
    """One row per label (``columns`` images each), the label written above its row as typed (whole words, visible
    spaces); small images are enlarged."""
    font = label_font()
    wrapped = [wrap_label(label, font, columns * cell - 8) for label in labels]
    line = LABEL_SIZE + 3
    heights = [len(lines) * line + 6 + cell for lines in wrapped]
    grid = Image.new("RGB", (columns * cell, sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for row, lines in enumerate(wrapped):
        for k, words in enumerate(lines):
            x = 4.0
            for word in words:
                draw.text((x, top + 2 + k * line), word, fill="black", font=font)
                x += float(font.getlength(word)) + word_gap(font)
        band = len(lines) * line + 6
        for col in range(columns):
            index = row * columns + col
            if index >= len(images):
                break
            image = images[index]
            resample = Image.Resampling.NEAREST if max(image.size) < cell else Image.Resampling.LANCZOS
            grid.paste(image.convert("RGB").resize((cell, cell), resample), (col * cell, top + band))
        top += heights[row]
    return grid
