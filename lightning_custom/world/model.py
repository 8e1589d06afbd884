"""The micro text-to-image model of the world, in diffusers' own classes and folder layout.

A VAE (32 px -> 8 x 8 x 4), a small CLIP text encoder with the world's tokenizer, and a small latent UNet, saved
with ``save_pretrained`` so every loader and method of the package uses it exactly as a real Stable Diffusion.
:func:`attribute_bar` measures the issue's bar: how often the samples show the prompted shape, colour and
background, as judged by the world's encoder.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np
import torch

from lightning_custom.synthetic.world_render import Attributes, caption, training_combinations, vocabulary

IMAGE_SIZE = 32
MAX_TOKENS = 32
TEXT_DIM = 64


def staging_model_path() -> str:
    """Where the trained model is exported: the embedded default (``"embedded"``), shipped in the package."""
    return str(resources.files("lightning_custom") / "assets" / "world-sd")


def build_world_tokenizer() -> Any:
    """The offline CLIP tokenizer with every world word (and the template words) as one token, 32 tokens long."""
    from lightning_custom.synthetic.offline_tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(vocabulary())
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def build_world_vae(seed: int = 0, latent_channels: int = 4) -> Any:
    """AutoencoderKL, 32 x 32 x 3 -> 8 x 8 x ``latent_channels`` (about 1M parameters)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def build_world_text_encoder(tokenizer: Any, seed: int = 0) -> Any:
    """A 2-layer CLIPTextModel, width 64."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_world_unet(seed: int = 0, channels: int = 4) -> Any:
    """A latent UNet on 8 x 8 x ``channels`` with cross-attention at both levels (about 2.8M parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=channels, out_channels=channels, block_out_channels=(64, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=32,
        cross_attention_dim=TEXT_DIM,
    )


def build_world_scheduler() -> Any:
    """Stable Diffusion 1.x's DDPM training schedule (epsilon prediction)."""
    from diffusers import DDPMScheduler

    from lightning_custom.synthetic.architectures import SCHEDULER

    return DDPMScheduler(**SCHEDULER, prediction_type="epsilon")


def assemble_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any | None = None) -> Any:
    """A ``StableDiffusionPipeline`` from the parts (DDIM sampler unless given), no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = scheduler or DDIMScheduler.from_config(build_world_scheduler().config)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_world_pipeline(name_or_path: str = "embedded") -> Any:
    """A saved world model (default: the embedded one) as a ``StableDiffusionPipeline`` with the DDIM sampler, no
    safety checker and no progress bar, as :func:`attribute_bar` and the quickstart's grid sample it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lightning_custom.families.components import resolve_model_path

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path(name_or_path), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bar_prompts(n: int, seed: int = 123) -> list[tuple[str, Attributes]]:
    """``n`` full captions of uniformly drawn training combinations, with their attributes."""
    rng = np.random.default_rng(seed)
    combos = training_combinations()
    picks = [combos[int(i)] for i in rng.integers(len(combos), size=n)]
    return [(caption(a, int(rng.integers(4))), a) for a in picks]


@torch.no_grad()
def attribute_bar(pipe: Any, encoder: Any, n: int = 64, *, steps: int = 25, guidance_scale: float = 2.5,
                  seed: int = 123, batch_size: int = 32) -> dict[str, float]:
    """The issue's bar: the fraction of samples (prompted with seen attribute combinations) whose shape, colour and
    background the encoder names as prompted; per attribute and ``"all"`` (the bar is ``all >= 0.9``).

    The guidance scale 2.5 was chosen on other prompts (``seed=7``, 256 samples: 2.0 -> 0.926, 2.5 -> 0.953,
    3.0 -> 0.934, 4.0 -> 0.914, 6.0 -> 0.879, 7.5 -> 0.840 of samples all right): strong guidance distorts
    this small model's shapes. The default ``seed=123`` prompts are the reported ones."""
    from lightning_custom.inference.sampling import generate
    from lightning_custom.synthetic.world_encoder import attribute_accuracy, judge

    pairs = bar_prompts(n, seed)
    images = generate(pipe, [p for p, _ in pairs], [seed + i for i in range(n)], guidance_scale=guidance_scale,
                      num_inference_steps=steps, height=IMAGE_SIZE, width=IMAGE_SIZE, batch_size=batch_size)
    return attribute_accuracy(judge(encoder, images), [a for _, a in pairs])
