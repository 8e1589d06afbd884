"""Reading concept images, with one-line errors that name the offending file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from lightning_custom.dvar.eval_batch import content_key
from lightning_custom.errors import UserInputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Modes whose pixels are 16-bit integers (PNG's 16-bit grayscale opens as I;16; "I" is Pillow's 32-bit integer
# mode, which holds 16-bit data when it comes from an image file).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes with an alpha channel (premultiplied "La"/"RGBa" included), composited onto the background.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Everything else Pillow decodes from png/jpg/webp converts to RGB directly: RGB, L, 1, P, CMYK, YCbCr.
_DIRECT_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")

BackgroundColour = tuple[int, int, int]
WHITE: BackgroundColour = (255, 255, 255)


def parse_background(colour: str, argument: str = "--data.alpha_background") -> BackgroundColour:
    """``"white"``, ``"black"``, ``"#rrggbb"`` or any CSS colour name Pillow knows, as an RGB triple."""
    try:
        return ImageColor.getrgb(colour)[:3]
    except (ValueError, AttributeError) as err:
        raise UserInputError(f"{argument}: {colour!r} is not a colour (use white, black or #rrggbb)") from err


HEIF_SUFFIXES = (".heic", ".heif")  # iPhone photos: read once pillow-heif is installed
_WARNED: set[tuple[str, str]] = set()  # (folder, message): each said once per process, however often listed


def heif_readable() -> bool:
    """Whether HEIC/HEIF photos can be read: ``pillow-heif`` is installed (its opener is then registered)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _warn_once(folder: Path, message: str) -> None:
    if (str(folder), message) not in _WARNED:
        _WARNED.add((str(folder), message))
        log.warning(message)


def list_image_files(folder: str | Path, argument: str = "--data.instance_data_dir") -> list[Path]:
    """The image files of ``folder`` in sorted order. Other files (notes, a .heic photo without ``pillow-heif``)
    are skipped with one line naming them; a folder with no image left is refused, one with one image is warned
    about (3-5 are expected)."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise UserInputError(f"{argument}: folder {folder} does not exist")
    if not path.is_dir():
        raise UserInputError(f"{argument}: {folder} is a file, not a folder of images")
    try:
        entries = sorted(path.iterdir())
    except OSError as err:
        raise UserInputError(f"{argument}: cannot read folder {folder} ({err.strerror or type(err).__name__})") from err
    suffixes = IMAGE_SUFFIXES + (HEIF_SUFFIXES if any(e.suffix.lower() in HEIF_SUFFIXES for e in entries)
                                 and heif_readable() else ())
    files, others = [], []
    for entry in entries:
        if entry.name.startswith(".") or entry.is_dir():
            continue  # hidden files (.DS_Store) and sub-folders are not part of the concept
        (files if entry.suffix.lower() in suffixes else others).append(entry)
    heif = [o for o in others if o.suffix.lower() in HEIF_SUFFIXES]
    hint = (f"; {heif[0].name} is a HEIC photo: convert it to jpg/png, or pip install pillow-heif and it is read"
            if heif else "")
    if not files:
        raise UserInputError(f"{argument}: folder {folder} holds no images (expected png/jpg/jpeg/webp files)"
                             f"{hint}")
    if others:
        names = ", ".join(o.name for o in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        _warn_once(path, f"{argument}: skipping {len(others)} file(s) in {folder} that are not images ({names}; "
                         f"expected {'/'.join(s[1:] for s in IMAGE_SUFFIXES)}){hint}")
    if len(files) == 1:
        _warn_once(path, f"{argument}: {folder} holds one image; 3-5 images of the concept are expected (one "
                         "image teaches its background and pose as much as the concept)")
    return files


def load_rgb_image(path: str | Path, background: BackgroundColour = WHITE) -> Image.Image:
    """Open an image as 8-bit RGB, as forgivingly as diffusers' training scripts.

    The EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images are converted (16-bit values
    scaled by 255/65535); transparent images are composited onto ``background``. Use :func:`convert_to_rgb` to learn
    which conversion was made.

    Raises:
        UserInputError: the file is unreadable, truncated or not an image.
    """
    return convert_to_rgb(open_image(path), background, path)[0]


def open_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully and apply its EXIF orientation; a one-line error for what cannot be read."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, naming the file, not later in a worker
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        reason = "truncated" if "truncated" in str(err) else type(err).__name__
        raise UserInputError(f"concept image {path}: cannot be read as an image ({reason})") from err


def convert_to_rgb(
    image: Image.Image, background: BackgroundColour = WHITE, path: str | Path = "image"
) -> tuple[Image.Image, str | None]:
    """``image`` as 8-bit RGB and what was done to it: ``None``, ``"alpha"`` (composited), ``"16-bit"`` or ``"mode X"``.

    Raises:
        UserInputError: a mode no concept image can have (floating point, LAB, HSV).
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P" and "transparency" in image.info:
        mode, image = "PA", image.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB"), "alpha"
    if mode in _SIXTEEN_BIT_MODES:
        # 65535 -> 255 exactly: divide by 257 (= 65535 / 255), rounding; Pillow's own I;16 -> L conversion clips.
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        gray = np.rint(values / 257.0).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB"), "16-bit"
    if mode in _DIRECT_MODES:
        return image.convert("RGB"), f"mode {mode}"
    raise UserInputError(f"concept image {path}: unsupported pixel format (mode {mode}); save it as 8-bit RGB")


def is_small(size: tuple[int, int], resolution: int) -> bool:
    """Whether an image's shorter side is under half of the training ``resolution`` (it will be upscaled > 2x)."""
    return min(size) * 2 < resolution


def warn_small_images(folder: str | Path, small: list[tuple[Path, tuple[int, int]]], total: int,
                      resolution: int) -> None:
    """One line for all the concept images far smaller than the training resolution (``small``: path, size)."""
    if not small:
        return
    smallest = sorted(small, key=lambda item: min(item[1]))
    named = ", ".join(f"{Path(path).name} {size[0]}x{size[1]}" for path, size in smallest[:5])
    more = f" and {len(small) - 5} more" if len(small) > 5 else ""
    log.warning("%s: %d of %d concept images are far smaller than the training resolution %d px (%s%s; upscaled "
                "up to %.1fx)", folder, len(small), total, resolution, named, more,
                resolution / min(smallest[0][1]))


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


class ConceptImages:
    """Concept images decoded and resized once, with a deterministic augmentation per (seed, index)."""

    def __init__(
        self, folder: str, resolution: int, center_crop: bool, random_flip: bool, argument: str,
        files: Sequence[Path] | None = None, background: BackgroundColour = WHITE,
    ) -> None:
        self.files = list(files) if files is not None else list_image_files(folder, argument)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.images: list[Image.Image] = []
        self.original_sizes: list[tuple[int, int]] = []
        composited, small = 0, []
        for file in self.files:
            image, conversion = convert_to_rgb(open_image(file), background, file)
            composited += conversion == "alpha"
            if is_small(image.size, resolution):
                small.append((file, image.size))
            self.original_sizes.append((image.height, image.width))
            self.images.append(resize_shorter_side(image, resolution))
        warn_small_images(folder, small, len(self.files), resolution)
        if composited:
            log.info("%s: %d of %d images have transparency; composited onto the background %s "
                     "(--data.alpha_background)", folder, composited, len(self.files), "#%02x%02x%02x" % background)

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def content_ids(self) -> list[str]:
        """A digest of each resized image's pixels: names what it is, whichever file (or file version) it came from."""
        return [content_key(image.size, image.mode, np.asarray(image)) for image in self.images]

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Image ``index`` with a crop and flip drawn from ``rng``, plus its SDXL micro-conditioning sizes."""
        image = self.images[index % len(self.images)]
        top, left = crop_box(image.size, self.resolution, self.center_crop, rng)
        flip = bool(self.random_flip and rng.random() < 0.5)
        return {
            "pixel_values": to_tensor(image, top, left, self.resolution, flip),
            "original_size": torch.tensor(self.original_sizes[index % len(self.images)]),
            # The crop in the frame the model sees: a mirrored crop starts at width - left - resolution (as the
            # crop of the flipped image in diffusers' SDXL training examples).
            "crop_top_left": torch.tensor((top, image.width - left - self.resolution if flip else left)),
            # Names this exact augmented image by content, so the module can cache its VAE latent distribution
            # (a new concept, or a file edited in place, gets new keys).
            "latent_key": f"{self.content_ids[index % len(self.images)]}|{top}|{left}|{int(flip)}|{self.resolution}",
        }
