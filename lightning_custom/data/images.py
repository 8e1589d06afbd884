"""Reading concept images, with one-line errors that name the offending file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lightning_custom.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# 8-bit colour modes that convert to RGB without losing information or dropping an alpha channel.
_CONVERTIBLE_MODES = {"RGB", "CMYK", "YCbCr"}


def list_image_files(folder: str | Path, argument: str = "--data.instance_data_dir") -> list[Path]:
    """The image files of ``folder`` in sorted order; errors if it is missing, empty or holds other files."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise UserInputError(f"{argument}: folder {folder} does not exist")
    if not path.is_dir():
        raise UserInputError(f"{argument}: {folder} is a file, not a folder of images")
    try:
        entries = sorted(path.iterdir())
    except OSError as err:
        raise UserInputError(f"{argument}: cannot read folder {folder} ({err.strerror or type(err).__name__})") from err
    files, others = [], []
    for entry in entries:
        if entry.name.startswith(".") or entry.is_dir():
            continue  # hidden files (.DS_Store) and sub-folders are not part of the concept
        (files if entry.suffix.lower() in IMAGE_SUFFIXES else others).append(entry)
    if others:
        raise UserInputError(
            f"{argument}: {others[0]} is not an image file (expected {'/'.join(s[1:] for s in IMAGE_SUFFIXES)})"
        )
    if not files:
        raise UserInputError(f"{argument}: folder {folder} holds no images (expected png/jpg/jpeg/webp files)")
    return files


def load_rgb_image(path: str | Path) -> Image.Image:
    """Open an 8-bit RGB image, applying its EXIF orientation.

    Raises:
        UserInputError: the file is unreadable, not an image, grayscale, has an alpha channel or is 16-bit.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserInputError(f"concept image {path}: cannot be read as an image ({type(err).__name__})") from err
    mode = image.mode
    if mode == "P":
        if "transparency" in image.info:
            raise UserInputError(f"concept image {path}: has transparency (RGBA); save it as 8-bit RGB without alpha")
        image = image.convert("RGB")
    elif mode in ("L", "1", "LA", "La"):
        raise UserInputError(f"concept image {path}: is grayscale (mode {mode}); save it as 8-bit RGB")
    elif mode in ("RGBA", "RGBa", "PA"):
        raise UserInputError(f"concept image {path}: has an alpha channel (mode {mode}); save it as 8-bit RGB")
    elif mode.startswith("I") or mode == "F" or mode.endswith(("16", "16B", "16L")):
        raise UserInputError(f"concept image {path}: is 16-bit or floating point (mode {mode}); save it as 8-bit RGB")
    elif mode not in _CONVERTIBLE_MODES:
        raise UserInputError(f"concept image {path}: unsupported mode {mode}; save it as 8-bit RGB")
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side equals ``resolution`` (bilinear, like diffusers' examples)."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def crop_box(size: tuple[int, int], resolution: int, center: bool, rng: np.random.Generator | None) -> tuple[int, int]:
    """Top-left ``(top, left)`` of a ``resolution`` square crop: centered, or uniform random from ``rng``."""
    width, height = size
    if center or rng is None:
        return (height - resolution) // 2, (width - resolution) // 2
    return int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))


def to_tensor(image: Image.Image, top: int, left: int, resolution: int, flip: bool) -> torch.Tensor:
    """Crop, optionally mirror, and scale to a ``[-1, 1]`` CHW float tensor."""
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
