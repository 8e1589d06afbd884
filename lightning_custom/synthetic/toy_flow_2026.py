"""Tiny, fully offline Z-Image, FLUX.2 [klein] and Qwen-Image components (issue 28), in diffusers' and transformers'
own classes with the sizes of diffusers' pipeline tests (``tests/pipelines/{z_image,flux2,qwenimage}``) and the
offline Qwen tokenizer (:mod:`lightning_custom.synthetic.offline_qwen_tokenizer`), and the ``embedded:tiny-z-image``,
``embedded:tiny-flux2`` and ``embedded:tiny-qwen-image`` models built from them on first use.

Below the families (which re-export the builders) and beside :mod:`lightning_custom.synthetic.toy_flow`, so that
:func:`lightning_custom.families.components.resolve_model_path` can build them without importing the families (no
upward import): a new family's tiny model is one entry in :data:`EMBEDDED_BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_custom.synthetic.offline_qwen_tokenizer import build_qwen_tokenizer
from lightning_custom.synthetic.toy_flow import build_embedded_model

__all__ = ["EMBEDDED_BUILDERS", "EMBEDDED_VERSION", "FLUX2_SCHEDULER", "QWEN_IMAGE_SCHEDULER", "Z_IMAGE_SCHEDULER",
           "build_embedded_model", "build_tiny_flux2_components", "build_tiny_qwen_image_components",
           "build_tiny_z_image_components", "embedded_model", "save_tiny_flux2", "save_tiny_qwen_image",
           "save_tiny_z_image"]

#: The scheduler config of Tongyi-MAI/Z-Image-Turbo (static shift 3, no dynamic shifting).
Z_IMAGE_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
#: The scheduler config of black-forest-labs/FLUX.2-klein-4B (dynamic shifting).
FLUX2_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential",
}
#: The scheduler config of Qwen/Qwen-Image (dynamic exponential shifting).
QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "time_shift_type": "exponential",
    "shift_terminal": 0.02,
}


def build_tiny_z_image_components(seed: int = 0, *, sample_size: int = 32, latent_channels: int = 4,
                                  text_width: int = 16) -> dict[str, Any]:
    """Tiny random Z-Image components (the sizes of diffusers' ``ZImagePipeline`` test, a narrower VAE).

    The VAE downsamples 8x like Z-Image's own (four blocks of width 4, so that ``ZImagePipeline``'s fixed default
    of 1024 px is 4096 image tokens, affordable on a CPU) and has ``latent_channels`` channels; the transformer (2
    layers, 1 refiner layer, width 32, RoPE tables for 256 tokens a side) patchifies them 2x2; the Qwen3 text
    encoder has 2 layers of ``text_width`` (its
    penultimate state is the caption feature, ``cap_feat_dim``) and an offline Qwen tokenizer.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=text_width,
        rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[512, 128, 128],
    ).eval()
    with torch.no_grad():  # initialised with torch.empty (diffusers' test fixes them the same way)
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    ).eval()
    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=text_width, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER)}


def save_tiny_z_image(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """:func:`build_tiny_z_image_components` saved as a ``ZImagePipeline`` folder."""
    from diffusers import ZImagePipeline

    path = Path(path)
    ZImagePipeline(**build_tiny_z_image_components(seed, **kwargs)).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux2_components(seed: int = 0, *, sample_size: int = 32, latent_channels: int = 1,
                                text_width: int = 8) -> dict[str, Any]:
    """Tiny random FLUX.2 [klein] components (the sizes of diffusers' ``Flux2KleinPipeline`` test).

    The VAE does not downsample and has ``latent_channels`` channels (4x after the 2x2 patchify, the transformer's
    ``in_channels``), with non-trivial batch-norm statistics so that the normalization is exercised. The Qwen3 causal
    LM has 28 layers of ``text_width`` (so that the pipeline's default layers 9, 18, 27 exist) and the offline Qwen
    tokenizer; the transformer reads ``3 * text_width`` features per text token.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_width, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        sample_size=sample_size, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=text_width, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=2, head_dim=4, vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )).eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)}


def save_tiny_flux2(path: str | Path, seed: int = 0, is_distilled: bool = False, **kwargs: Any) -> Path:
    """:func:`build_tiny_flux2_components` saved as a ``Flux2KleinPipeline`` folder."""
    from diffusers import Flux2KleinPipeline

    path = Path(path)
    pipe = Flux2KleinPipeline(**build_tiny_flux2_components(seed, **kwargs), is_distilled=is_distilled)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_qwen_image_components(seed: int = 0, *, text_width: int = 16) -> dict[str, Any]:
    """Tiny random Qwen-Image components (the sizes of diffusers' ``QwenImagePipeline`` test).

    ``AutoencoderKLQwenImage`` with ``z_dim`` 4 and 4x spatial downsampling, non-trivial ``latents_mean`` /
    ``latents_std`` (so that the normalization is exercised); a 2-layer ``QwenImageTransformer2DModel`` reading 2x2
    packed latents (16 channels); a Qwen2.5-VL of 2 text layers of ``text_width`` and the offline Qwen tokenizer.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    z_dim = 4
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=text_width, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.1, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0],
    ).eval()
    tokenizer = build_qwen_tokenizer(model_max_length=1024 + 34)  # QwenImagePipeline's max_length (1024 + template)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": text_width, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)}


def save_tiny_qwen_image(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """:func:`build_tiny_qwen_image_components` saved as a ``QwenImagePipeline`` folder."""
    from diffusers import QwenImagePipeline

    path = Path(path)
    QwenImagePipeline(**build_tiny_qwen_image_components(seed, **kwargs)).save_pretrained(path, safe_serialization=True)
    return path



#: ``embedded:<name>`` -> the function that writes its pipeline folder (seed 0).
EMBEDDED_BUILDERS: dict[str, Callable[[Path], Any]] = {
    "tiny-z-image": save_tiny_z_image,
    "tiny-flux2": save_tiny_flux2,
    "tiny-qwen-image": save_tiny_qwen_image,
}
#: Bump when a builder changes, so that stale caches are not reused.
EMBEDDED_VERSION = "v1"


def embedded_model(name: str) -> Path | None:
    """The folder of embedded model ``name`` (built on first use), or ``None`` when it is not one of these."""
    save = EMBEDDED_BUILDERS.get(name)
    return None if save is None else build_embedded_model(name, EMBEDDED_VERSION, save)
