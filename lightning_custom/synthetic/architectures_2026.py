"""Published architectures of the 2026 families with random weights (``random:z-image``, ``random:flux2-klein-4b``,
``random:flux2-klein-9b``, ``random:qwen-image``), for throughput and memory benchmarks without a download (issue 28,
item 6). Below the families and beside :mod:`lightning_custom.synthetic.architectures`, which finds them in
:data:`ARCHITECTURES` (no import cycle): a new family's architecture is one entry there.

Configs (each checked against its source):

* Z-Image (Tongyi-MAI/Z-Image-Turbo): ``ZImageTransformer2DModel``'s defaults, which are the checkpoint's
  ``transformer/config.json`` (dim 3840, 30 layers + 2 + 2 refiner layers, 30 heads, ``cap_feat_dim`` 2560): 6.15B
  parameters, Tongyi's "6B"; text encoder Qwen3-4B (36 layers of 2560, 8 KV heads, tied embeddings): 4.02B; the
  FLUX.1 VAE (16 channels).
* FLUX.2 [klein] 4B / 9B: diffusers' ``scripts/convert_flux2_to_diffusers.py`` (``klein-4b``: 5 double + 20 single
  blocks of 24 x 128; ``klein-9b``: 8 + 24 blocks of 32 x 128; ``in_channels`` 128, no guidance embedding):
  3.88B and 9.08B parameters, BFL's "4B" and "9B"; text encoders Qwen3-4B (joint width 3 x 2560 = 7680) and Qwen3-8B
  (36 layers of 4096: 3 x 4096 = 12288), 4.02B and 8.19B; ``AutoencoderKLFlux2``'s defaults (32 channels, the
  converter's ``AutoencoderKLFlux2()``).
* Qwen-Image (Qwen/Qwen-Image): ``QwenImageTransformer2DModel``'s defaults (60 layers of 24 x 128, joint width 3584):
  20.4B parameters, Qwen's "20B"; text encoder Qwen2.5-VL-7B (28 text layers of 3584, 4 KV heads, untied; vision tower
  of 32 blocks): 8.29B; ``AutoencoderKLQwenImage``'s defaults.

The counts above are what ``tests/test_families_2026_random.py`` asserts (built on the meta device).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ARCHITECTURES", "QWEN25_VL_7B", "QWEN3_4B", "QWEN3_8B", "build_random"]




def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module

QWEN3_4B: dict[str, Any] = dict(
    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True,
)
QWEN3_8B: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False,
)
QWEN25_VL_7B: dict[str, Any] = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1000000.0,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24], "rope_type": "default"},
                     tie_word_embeddings=False),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, in_chans=3),
    vocab_size=152064, tie_word_embeddings=False, image_token_id=151655, video_token_id=151656,
    vision_start_token_id=151652, vision_end_token_id=151653,
)
FLUX2_KLEIN_4B: dict[str, Any] = dict(
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
FLUX2_KLEIN_9B: dict[str, Any] = dict(FLUX2_KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32,
                                      joint_attention_dim=12288)
# black-forest-labs/FLUX.1-dev vae/config.json, which Z-Image uses.
FLUX1_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "z-image": {"family": "z_image", "pipeline": "ZImagePipeline", "transformer": ("ZImageTransformer2DModel", {}),
                "vae": ("AutoencoderKL", FLUX1_VAE), "text_encoder": ("Qwen3Model", "Qwen3Config", QWEN3_4B),
                "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}},
    "flux2-klein-4b": {"family": "flux2", "pipeline": "Flux2KleinPipeline",
                       "transformer": ("Flux2Transformer2DModel", FLUX2_KLEIN_4B),
                       "vae": ("AutoencoderKLFlux2", {}),
                       "text_encoder": ("Qwen3ForCausalLM", "Qwen3Config", QWEN3_4B), "scheduler": "flux2"},
    "flux2-klein-9b": {"family": "flux2", "pipeline": "Flux2KleinPipeline",
                       "transformer": ("Flux2Transformer2DModel", FLUX2_KLEIN_9B),
                       "vae": ("AutoencoderKLFlux2", {}),
                       "text_encoder": ("Qwen3ForCausalLM", "Qwen3Config", QWEN3_8B), "scheduler": "flux2"},
    "qwen-image": {"family": "qwen_image", "pipeline": "QwenImagePipeline",
                   "transformer": ("QwenImageTransformer2DModel", {}),
                   "vae": ("AutoencoderKLQwenImage", {}),
                   "text_encoder": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", QWEN25_VL_7B),
                   "scheduler": "qwen_image"},
}


def build_random(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> dict[str, Any]:
    """The pipeline components of architecture ``name`` (a key of :data:`ARCHITECTURES`) with random weights.

    Built on ``device`` (default: CUDA when available, else the CPU; ``"meta"`` allocates nothing) in ``dtype``;
    the tokenizer is the offline Qwen tokenizer (its ids fit every Qwen vocabulary).
    """
    import diffusers
    import transformers

    from lightning_custom.synthetic.architectures import _building  # imports this module lazily: no cycle
    from lightning_custom.synthetic.offline_qwen_tokenizer import build_qwen_tokenizer
    from lightning_custom.synthetic.toy_flow_2026 import FLUX2_SCHEDULER, QWEN_IMAGE_SCHEDULER

    arch = ARCHITECTURES[name]
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    transformer_class, transformer_config = arch["transformer"]
    vae_class, vae_config = arch["vae"]
    encoder_class, config_class, encoder_config = arch["text_encoder"]
    with _building(device, dtype):
        components: dict[str, Any] = {
            "transformer": _in_dtype(getattr(diffusers, transformer_class)(**transformer_config), dtype),
            "vae": _in_dtype(getattr(diffusers, vae_class)(**vae_config), dtype),
            "text_encoder": _in_dtype(getattr(transformers, encoder_class)(
                getattr(transformers, config_class)(**encoder_config)), dtype),
        }
    components["tokenizer"] = build_qwen_tokenizer()
    scheduler = arch["scheduler"]
    if isinstance(scheduler, str):  # the family's published scheduler config, kept with its tiny model
        scheduler = {"flux2": FLUX2_SCHEDULER, "qwen_image": QWEN_IMAGE_SCHEDULER}[scheduler]
    components["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(**scheduler)
    return components
