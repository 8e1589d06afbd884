"""Published Stable Diffusion architectures with random weights, built in-process (no download).

``pretrained_model_name_or_path: random:sd15`` (or ``random:sd21``, ``random:sdxl``) gives a model with the
compute and memory of the real checkpoint, for throughput benchmarks on a GPU machine that cannot download.
The configs are those published in the checkpoints' ``*/config.json`` files.
"""

from __future__ import annotations

from typing import Any

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)
SD21_UNET = dict(SD15_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  projection_dim=1024, hidden_act="gelu")
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     projection_dim=1280, hidden_act="gelu")
# Stable Diffusion's training schedule (SD 1.x, 2.x and XL share it); the tiny test models use it too.
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, steps_offset=1)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": {"unet": SD15_UNET, "text_encoders": (CLIP_L,), "vae": SD_VAE, "prediction_type": "epsilon"},
    "sd21": {"unet": SD21_UNET, "text_encoders": (OPENCLIP_H,), "vae": SD_VAE, "prediction_type": "v_prediction"},
    "sdxl": {"unet": SDXL_UNET, "text_encoders": (CLIP_L, OPENCLIP_BIGG), "vae": dict(SD_VAE, scaling_factor=0.13025),
             "prediction_type": "epsilon"},
}
RANDOM_PREFIX = "random:"


def is_random_architecture(name_or_path: str) -> bool:
    """Whether ``name_or_path`` asks for a random-weight published architecture (``random:sd15``)."""
    return name_or_path.startswith(RANDOM_PREFIX)


def build_random_components(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Tokenizer(s), text encoder(s), VAE, UNet and DDPM scheduler of a published architecture, random weights.

    Args:
        name: ``sd15``, ``sd21`` or ``sdxl`` (with or without the ``random:`` prefix).
        seed: weight seed.
        dtype: dtype of the UNet and VAE.

    Returns:
        ``{"tokenizer", "text_encoder", "vae", "unet", "scheduler"}``, plus ``tokenizer_2``/``text_encoder_2``
        for SDXL. The tokenizer is the package's offline CLIP tokenizer; token ids fit the 49408-row vocabulary.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lightning_custom.errors import UserInputError
    from lightning_custom.toy_models import build_clip_tokenizer

    key = name.removeprefix(RANDOM_PREFIX)
    if key not in ARCHITECTURES:
        raise UserInputError(f"--model.pretrained_model_name_or_path: unknown architecture {name!r}; "
                             f"choose from {[RANDOM_PREFIX + k for k in ARCHITECTURES]}")
    arch = ARCHITECTURES[key]
    torch.manual_seed(seed)
    out: dict[str, Any] = {
        "unet": UNet2DConditionModel(**arch["unet"]).to(dtype),
        "vae": AutoencoderKL(**arch["vae"]).to(dtype),
        "scheduler": DDPMScheduler(**SCHEDULER, prediction_type=arch["prediction_type"]),
    }
    for index, text_config in enumerate(arch["text_encoders"]):
        tokenizer = build_clip_tokenizer()
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **text_config)
        cls = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
        suffix = "" if index == 0 else f"_{index + 1}"
        out[f"tokenizer{suffix}"] = tokenizer
        out[f"text_encoder{suffix}"] = cls(config)
    return out
