"""Tiny, fully offline Stable-Diffusion-style components for tests and demos.

Everything here is built in-process (no downloads): a small byte-level BPE
``CLIPTokenizer``, a tiny ``CLIPTextModel``, ``UNet2DConditionModel``,
``AutoencoderKL`` and a ``DDPMScheduler``, mirroring diffusers'
``get_dummy_components()`` test helpers. Also provides procedural example
concept images for personalization (Textual Inversion / DreamBooth) demos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from lightning_custom.synthetic.architectures import SCHEDULER as SD_SCHEDULER
# The offline tokenizers' home before they moved (issue 26: they made architectures <-> toy_models a cycle).
from lightning_custom.synthetic.offline_tokenizers import (  # noqa: F401 - re-exported
    BOS_TOKEN,
    COMMON_WORDS,
    EOS_TOKEN,
    TEMPLATE_WORDS,
    build_clip_tokenizer,
    bytes_to_unicode,
)

__all__ = [
    "TEMPLATE_WORDS",
    "COMMON_WORDS",
    "bytes_to_unicode",
    "build_clip_tokenizer",
    "build_tiny_sd_components",
    "build_tiny_sdxl_components",
    "vae_downsample_factor",
    "save_tiny_sd",
    "save_tiny_sdxl",
    "make_example_concept_images",
    "save_tiny_clip",
    "save_tiny_dino",
]


def build_tiny_sd_components(
    seed: int = 0,
    *,
    sample_size: int = 8,
    prediction_type: str = "epsilon",
    cross_attention_dim: int = 32,
) -> dict[str, Any]:
    """Builds tiny, randomly initialised Stable Diffusion components.

    The VAE has ``block_out_channels=(32, 64)``, i.e. a spatial downsample factor
    of ``2 ** (2 - 1) = 2`` (see :func:`vae_downsample_factor`), so images are
    ``2 * sample_size`` pixels square and latents are ``sample_size`` square.

    Args:
        seed: Seed applied (``torch.manual_seed``) before each module is built.
        sample_size: UNet latent resolution (``unet.config.sample_size``).
        prediction_type: Scheduler prediction type (``"epsilon"``, ``"v_prediction"``...).
        cross_attention_dim: Text hidden size == UNet cross-attention dim.

    Returns:
        Dict with keys ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``
        (directly usable as ``StableDiffusionPipeline(**components, ...)``).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=2 * sample_size,
    )
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cross_attention_dim,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def vae_downsample_factor(vae: Any) -> int:
    """Returns the VAE's spatial downsample factor, ``2 ** (len(block_out_channels) - 1)``.

    Args:
        vae: An ``AutoencoderKL`` (or anything with ``config.block_out_channels``).

    Returns:
        Pixels per latent cell along each spatial axis (2 for the tiny VAE).
    """
    return 2 ** (len(vae.config.block_out_channels) - 1)


def save_tiny_sd(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Builds tiny components and saves them as a diffusers pipeline folder.

    Args:
        path: Output folder (created if needed).
        seed: Seed passed to :func:`build_tiny_sd_components`.
        **kwargs: Extra keyword arguments for :func:`build_tiny_sd_components`.

    Returns:
        The output folder, loadable with ``StableDiffusionPipeline.from_pretrained``.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    components = build_tiny_sd_components(seed, **kwargs)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sdxl_components(
    seed: int = 0,
    *,
    sample_size: int = 8,
    prediction_type: str = "epsilon",
    text_dims: tuple[int, int] = (32, 32),
    addition_time_embed_dim: int = 8,
) -> dict[str, Any]:
    """Builds tiny, randomly initialised Stable Diffusion XL components (as diffusers' SDXL pipeline tests).

    The UNet has SDXL's ``text_time`` added conditioning: six time ids (original size, crop top-left, target size)
    embedded with ``addition_time_embed_dim`` each, plus the pooled projection of the second text encoder, so
    ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + projection_dim``; its cross-attention
    width is the two encoders' hidden sizes summed (SDXL: 768 + 1280). The VAE has SDXL's scaling factor 0.13025
    and a downsample factor of 2, so images are ``2 * sample_size`` pixels square.

    Args:
        seed: Seed applied (``torch.manual_seed``) before each module is built.
        sample_size: UNet latent resolution.
        prediction_type: Scheduler prediction type.
        text_dims: hidden sizes of the ``CLIPTextModel`` and of the ``CLIPTextModelWithProjection`` (whose
            projection has the same width).
        addition_time_embed_dim: width of each time id's sinusoidal embedding.

    Returns:
        Dict with keys ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``,
        ``scheduler`` (directly usable as ``StableDiffusionXLPipeline(**components)``).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_dims[1],
        cross_attention_dim=sum(text_dims),
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=2 * sample_size,
        scaling_factor=0.13025,
    )
    parts: dict[str, Any] = {"unet": unet.eval(), "vae": vae.eval()}
    for index, (cls, width) in enumerate(zip((CLIPTextModel, CLIPTextModelWithProjection), text_dims)):
        tokenizer = build_clip_tokenizer()
        torch.manual_seed(seed + index)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=width,
            hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        suffix = "_2" if index else ""
        parts[f"text_encoder{suffix}"] = cls(config).eval()
        parts[f"tokenizer{suffix}"] = tokenizer
    parts["scheduler"] = DDPMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    return parts


def save_tiny_sdxl(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Builds tiny SDXL components and saves them as a ``StableDiffusionXLPipeline`` folder.

    Args:
        path: Output folder (created if needed).
        seed: Seed passed to :func:`build_tiny_sdxl_components`.
        **kwargs: Extra keyword arguments for :func:`build_tiny_sdxl_components`.

    Returns:
        The output folder, loadable with ``StableDiffusionXLPipeline.from_pretrained``.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed, **kwargs), add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _concept_sprite(rng: np.random.Generator, px: int) -> Image.Image:
    """Draws the striped orange/purple cat-toy sprite (RGBA, ``px`` square)."""
    orange, purple = (255, 140, 20), (120, 40, 170)
    tex = Image.new("RGB", (px, px), orange)
    d = ImageDraw.Draw(tex)
    band = max(2, px // 8)
    for y in range(0, px, 2 * band):
        d.rectangle([0, y + band, px, y + 2 * band - 1], fill=purple)
    eye_r = px // 14
    for ex in (0.38, 0.62):
        cx, cy = int(ex * px), int(0.55 * px)
        d.ellipse([cx - eye_r, cy - eye_r, cx + eye_r, cy + eye_r], fill=(20, 20, 20))
    mask = Image.new("L", (px, px), 0)
    m = ImageDraw.Draw(mask)
    m.ellipse([int(0.15 * px), int(0.3 * px), int(0.85 * px), int(0.92 * px)], fill=255)
    m.polygon([(0.18 * px, 0.5 * px), (0.22 * px, 0.08 * px), (0.45 * px, 0.33 * px)], fill=255)
    m.polygon([(0.82 * px, 0.5 * px), (0.78 * px, 0.08 * px), (0.55 * px, 0.33 * px)], fill=255)
    sprite = tex.convert("RGBA")
    sprite.putalpha(mask)
    return sprite.rotate(float(rng.uniform(-30, 30)), resample=Image.BICUBIC)


def make_example_concept_images(
    out_dir: str | Path, n: int = 5, size: int = 64, seed: int = 0
) -> list[Path]:
    """Writes ``n`` procedural RGB PNGs of one concept: a striped orange/purple cat toy.

    Each image shows the same toy (cat head with ears, orange/purple stripes,
    dark eyes) at a random position, scale and rotation on a random plain
    pastel background. Deterministic given ``seed``.

    Args:
        out_dir: Output folder (created if needed).
        n: Number of images.
        size: Image side length in pixels.
        seed: Seed for the numpy random generator.

    Returns:
        Paths of the written ``NN.png`` files, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ss = 4  # supersampling for smooth edges
    paths = []
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(150, 256, size=3))
        canvas = Image.new("RGBA", (size * ss, size * ss), bg + (255,))
        px = int(size * ss * rng.uniform(0.55, 0.95))
        sprite = _concept_sprite(rng, px)
        x = int(rng.integers(0, size * ss - px + 1))
        y = int(rng.integers(0, size * ss - px + 1))
        canvas.alpha_composite(sprite, (x, y))
        img = canvas.convert("RGB").resize((size, size), Image.LANCZOS)
        path = out / f"{i:02d}.png"
        img.save(path)
        paths.append(path)
    return paths


def save_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Builds a tiny ``CLIPModel`` (width 32, 2 layers per tower) and its tokenizer; saves both to ``path``.

    Loadable with ``CLIPModel.from_pretrained(path)`` / ``CLIPTokenizer.from_pretrained(path)``, like
    ``openai/clip-vit-base-patch32``; the vocabulary is the offline one of :func:`build_clip_tokenizer`.
    """
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    tokenizer = build_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_dino(path: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Builds a tiny ViT with DINO ViT-S/16's layout (a ``ViTModel`` without pooler; width 32) and saves it."""
    from transformers import ViTConfig, ViTModel

    path = Path(path)
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=image_size, patch_size=patch_size)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(path)
    return path
