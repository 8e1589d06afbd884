"""Quality metrics of personalization: CLIP-I, CLIP-T and DINO (PAPER.md, "Evaluation in the paper").

- CLIP-I: cosine similarity of CLIP image embeddings, each generated image against every concept image.
- CLIP-T: cosine similarity of a generated image's CLIP embedding and its prompt's, the pseudo-token removed.
- DINO: cosine similarity of DINO ViT-S/16 CLS embeddings, generated against concept images (Ruiz et al., 2023).

Models load from a hub id or a local folder through transformers. Preprocessing (resize, center crop,
normalise) is done here with torch, following the model's ``preprocessor_config.json`` when it has one, so that
no image-processor backend (torchvision) is needed. Cosines come from ``torchmetrics.functional``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional import cosine_similarity, pairwise_cosine_similarity

from lightning_custom.errors import UserInputError

# The normalisation constants of OpenAI CLIP and of ImageNet (transformers.image_utils).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL's resampling codes, as stored in preprocessor_config.json, mapped to torch interpolation modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ImageTransform:
    """Resize, center crop and normalise PIL images into a model's ``pixel_values``.

    Args:
        size: the shorter side after resizing (``exact=False``), or the square size (``exact=True``).
        crop: the square center crop (``None``: no crop).
        mean: per-channel mean of ``[0, 1]`` pixels.
        std: per-channel standard deviation.
        mode: torch interpolation mode (``"bicubic"``, ``"bilinear"`` or ``"nearest"``).
        exact: resize to ``size x size`` ignoring the aspect ratio (ViT processors) instead of the shorter side.
    """

    size: int
    crop: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "bicubic"
    exact: bool = False

    def resize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Resize a ``(3, H, W)`` tensor of ``[0, 1]`` values; an image already at the target size is unchanged."""
        height, width = pixels.shape[-2:]
        if self.exact:
            target = (self.size, self.size)
        else:
            scale = self.size / min(height, width)
            target = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        if target == (height, width):
            return pixels
        antialias = self.mode != "nearest"
        kwargs = {"antialias": antialias, "align_corners": False} if antialias else {}
        resized = F.interpolate(pixels[None], size=target, mode=self.mode, **kwargs)[0]
        return resized.clamp(0.0, 1.0)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A ``(N, 3, crop, crop)`` float tensor for ``images``."""
        out = []
        for image in images:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            pixels = self.resize(torch.from_numpy(array).permute(2, 0, 1))
            if self.crop is not None:
                height, width = pixels.shape[-2:]
                top, left = (height - self.crop) // 2, (width - self.crop) // 2
                pixels = pixels[:, top : top + self.crop, left : left + self.crop]
            mean = torch.tensor(self.mean).view(3, 1, 1)
            std = torch.tensor(self.std).view(3, 1, 1)
            out.append((pixels - mean) / std)
        return torch.stack(out)


def _side(value: Any, default: int) -> tuple[int, bool]:
    """``(pixels, exact)`` from a processor ``size``/``crop_size`` entry (an int or a dict)."""
    if value is None:
        return default, False
    if isinstance(value, int):
        return value, False
    if "shortest_edge" in value:
        return int(value["shortest_edge"]), False
    if "height" in value:
        return int(value["height"]), True
    return default, False


def image_transform(processor: dict[str, Any], image_size: int, mean: tuple[float, ...],
                    std: tuple[float, ...], exact_default: bool) -> ImageTransform:
    """The transform a ``preprocessor_config.json`` describes (defaults where a key is absent)."""
    size, exact = _side(processor.get("size"), image_size)
    exact = exact or (exact_default and not isinstance(processor.get("size"), dict))
    crop = None
    if processor.get("do_center_crop", not exact):
        crop, _ = _side(processor.get("crop_size"), image_size)
    return ImageTransform(
        size=size,
        crop=crop,
        mean=tuple(processor.get("image_mean", mean)),
        std=tuple(processor.get("image_std", std)),
        mode=_RESAMPLE.get(processor.get("resample", 3), "bicubic"),
        exact=exact,
    )


def check_source(name_or_path: str, argument: str) -> None:
    """One-line error when ``name_or_path`` is neither an existing folder nor a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserInputError(f"{argument}: {name_or_path} is not a transformers model folder (no config.json)")
        return
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise UserInputError(f"{argument}: no such folder {name_or_path!r} (and it is not a hub id like org/name)")


def load_pretrained(cls, name_or_path: str, argument: str, **kwargs):
    """``cls.from_pretrained(name_or_path)`` with a one-line error instead of a deep traceback."""
    check_source(name_or_path, argument)
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserInputError(f"{argument}: cannot load {name_or_path!r}{offline}: {first_line}") from err


def read_preprocessor_config(name_or_path: str) -> dict[str, Any]:
    """The model's ``preprocessor_config.json`` (local, or from the hub cache), or ``{}``."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        file = local / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, "preprocessor_config.json")).read_text())
    except Exception:  # noqa: BLE001 - offline or no such file: the defaults apply
        return {}


def _features(output: Any) -> torch.Tensor:
    """Projected features from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def _embed_in_batches(
    model: Any, transform: ImageTransform, images: Sequence[Image.Image], batch_size: int,
    embed: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``embed`` applied to the transformed images, ``batch_size`` at a time, as one float32 ``(N, D)`` tensor."""
    parameter = next(model.parameters())
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = transform(images[start : start + batch_size]).to(parameter.device, parameter.dtype)
        chunks.append(embed(pixels).float())
    return torch.cat(chunks)


@dataclass
class CLIPScorer:
    """A CLIP model with its tokenizer and image transform: image and text embeddings."""

    model: Any
    tokenizer: Any
    transform: ImageTransform
    name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """``(N, D)`` projected image embeddings (float32, not normalised)."""
        return _embed_in_batches(
            self.model, self.transform, images, batch_size,
            lambda pixels: _features(self.model.get_image_features(pixel_values=pixels)),
        )

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` projected text embeddings (float32, not normalised); texts are truncated to the context."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(**tokens)).float()


@dataclass
class DINOScorer:
    """A (DINO) ViT and its image transform: the CLS token of the last layer as the image embedding."""

    model: Any
    transform: ImageTransform
    name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """``(N, D)`` CLS embeddings (float32, not normalised)."""
        return _embed_in_batches(
            self.model, self.transform, images, batch_size,
            lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0],
        )


def load_clip(name_or_path: str = "openai/clip-vit-base-patch32", device: str | torch.device = "cpu",
              argument: str = "--clip_model") -> CLIPScorer:
    """A :class:`CLIPScorer` from a hub id or a folder holding a ``CLIPModel`` and its tokenizer."""
    from transformers import CLIPModel, CLIPTokenizer

    model = load_pretrained(CLIPModel, name_or_path, argument).eval().requires_grad_(False).to(device)
    tokenizer = load_pretrained(CLIPTokenizer, name_or_path, argument)
    image_size = model.config.vision_config.image_size
    transform = image_transform(read_preprocessor_config(name_or_path), image_size, CLIP_MEAN, CLIP_STD, False)
    return CLIPScorer(model, tokenizer, transform, name_or_path)


def load_dino(name_or_path: str = "facebook/dino-vits16", device: str | torch.device = "cpu",
              argument: str = "--dino_model") -> DINOScorer:
    """A :class:`DINOScorer` from a hub id or a folder holding a ViT (``ViTModel``, ``Dinov2Model``, ...)."""
    from transformers import AutoConfig, AutoModel, ViTModel

    config = load_pretrained(AutoConfig, name_or_path, argument)
    # The CLS token of the last layer is the embedding; a ViT's pooler (absent from DINO checkpoints) is not needed.
    cls, kwargs = (ViTModel, {"add_pooling_layer": False}) if config.model_type == "vit" else (AutoModel, {})
    model = load_pretrained(cls, name_or_path, argument, config=config, **kwargs).eval().requires_grad_(False)
    model = model.to(device)
    image_size = getattr(model.config, "image_size", 224)
    transform = image_transform(read_preprocessor_config(name_or_path), image_size, IMAGENET_MEAN, IMAGENET_STD, True)
    return DINOScorer(model, transform, name_or_path)


@dataclass
class MetricResult:
    """A metric's mean and its value per generated image (in input order)."""

    mean: float
    per_image: list[float] = field(default_factory=list)


def mean_similarity_to_references(embeddings: torch.Tensor, references: torch.Tensor) -> MetricResult:
    """Each row's cosine similarity averaged over all ``references``; the mean over all pairs."""
    matrix = pairwise_cosine_similarity(embeddings.double(), references.double())
    per_image = matrix.mean(dim=1)
    return MetricResult(float(per_image.mean()), per_image.tolist())


def clip_i(scorer: CLIPScorer, generated: Sequence[Image.Image], concept: Sequence[Image.Image]) -> MetricResult:
    """CLIP-I: CLIP image similarity of each generated image to the concept images (mean over them)."""
    return mean_similarity_to_references(scorer.image_embeddings(generated), scorer.image_embeddings(concept))


def clip_t(scorer: CLIPScorer, generated: Sequence[Image.Image], texts: Sequence[str]) -> MetricResult:
    """CLIP-T: CLIP similarity of each generated image to its text (one text per image, pseudo-token removed)."""
    if len(texts) != len(generated):
        raise ValueError(f"clip_t: {len(generated)} images but {len(texts)} texts")
    image = scorer.image_embeddings(generated).double()
    text = scorer.text_embeddings(texts).double()
    per_image = cosine_similarity(image, text, reduction="none")
    return MetricResult(float(per_image.mean()), per_image.tolist())


def dino(scorer: DINOScorer, generated: Sequence[Image.Image], concept: Sequence[Image.Image]) -> MetricResult:
    """DINO: ViT CLS similarity of each generated image to the concept images (mean over them)."""
    return mean_similarity_to_references(scorer.image_embeddings(generated), scorer.image_embeddings(concept))


def without_placeholder(prompt: str, placeholder_token: str | None) -> str:
    """The prompt with ``{}`` and the pseudo-token (and its ``_1``, ``_2`` ... vectors) removed, spaces collapsed.

    ``"a photo of <cat-toy> on the beach"`` -> ``"a photo of on the beach"``; CLIP-T scores this text.
    """
    text = prompt.replace("{}", " ")
    if placeholder_token:
        text = re.sub(re.escape(placeholder_token) + r"(_\d+)?", " ", text)
    return " ".join(text.split())
