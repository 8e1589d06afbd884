"""Published architectures with random weights (lightning_custom.architectures), built on the meta device.

The published sizes: FLUX.1-dev's transformer is 11.9B parameters (its bf16 checkpoint holds 23.8 GB), the T5-XXL
encoder 4.76B (9.52 GB of bf16 in FLUX's ``text_encoder_2``), SD3.5 Medium's transformer 2.47B stored values
(4.94 GB of bf16, Stability's "2.5B": 2.24B parameters + the stored positional-embedding buffer), SD3.5 Large 8.1B,
CLIP ViT-L/14's text tower 123M, the 16-channel VAE 83.8M (168 MB of bf16), SD 1.5's UNet 859.5M.
"""

from __future__ import annotations

import pytest
import torch

from lightning_custom import architectures
from lightning_custom.architectures import architecture_family, architecture_names, build_random_components
from lightning_custom.errors import UserInputError


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stored(module: torch.nn.Module) -> int:
    """Parameters plus persistent buffers: what a checkpoint file stores."""
    return sum(value.numel() for value in module.state_dict().values())


def _close(value: int, published: float, tolerance: float = 0.01) -> bool:
    return abs(value - published) <= tolerance * published


def test_flux_dev_on_meta_has_the_published_sizes_and_config():
    parts = build_random_components("random:flux", dtype=torch.bfloat16, device="meta")
    transformer, t5, clip, vae = parts["transformer"], parts["text_encoder_2"], parts["text_encoder"], parts["vae"]
    assert type(transformer).__name__ == "FluxTransformer2DModel"
    assert type(t5).__name__ == "T5EncoderModel"
    assert type(clip).__name__ == "CLIPTextModel"
    assert type(parts["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert all(p.device.type == "meta" for p in transformer.parameters())
    assert _params(transformer) == 11_901_408_320 and _close(_params(transformer), 11.9e9)
    assert _params(t5) == 4_762_310_656 and _close(_params(t5), 4.76e9)
    assert _close(_params(clip), 123.06e6) and _close(_params(vae), 83.8e6)
    config = transformer.config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads, config.attention_head_dim) == (
        19, 38, 24, 128)
    assert config.guidance_embeds and tuple(config.axes_dims_rope) == (16, 56, 56)
    assert (config.in_channels, config.joint_attention_dim, config.pooled_projection_dim) == (64, 4096, 768)
    assert (vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor) == (16, 0.3611, 0.1159)
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert (t5.config.d_model, t5.config.d_ff, t5.config.num_heads, t5.config.num_layers) == (4096, 10240, 64, 24)
    assert t5.config.is_gated_act and t5.config.vocab_size == 32128
    scheduler = parts["scheduler"].config
    assert scheduler.use_dynamic_shifting and (scheduler.base_shift, scheduler.max_shift, scheduler.shift) == (
        0.5, 1.15, 3.0)
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)
    # Frozen-weight dtypes as the flow families load them: transformer, VAE, T5 in the weight dtype, CLIP float32.
    assert transformer.dtype == vae.dtype == t5.dtype == torch.bfloat16 and clip.dtype == torch.float32
    assert parts["tokenizer"].model_max_length == 77 and parts["tokenizer_2"].model_max_length == 512
    assert architecture_family("random:flux") == "flux"


def test_sd35_medium_on_meta_has_the_published_sizes_and_config():
    parts = build_random_components("sd3", dtype=torch.bfloat16, device="meta")
    transformer = parts["transformer"]
    assert type(transformer).__name__ == "SD3Transformer2DModel"
    assert [type(parts[name]).__name__ for name in ("text_encoder", "text_encoder_2", "text_encoder_3")] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert _params(transformer) == 2_243_171_520
    assert _close(_stored(transformer), 2.47e9)  # 4.94 GB of bf16
    assert _close(_params(parts["text_encoder_2"]), 694.66e6) and _close(_params(parts["text_encoder_3"]), 4.76e9)
    config = transformer.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (24, 24, 64)
    assert tuple(config.dual_attention_layers) == tuple(range(13)) and config.qk_norm == "rms_norm"
    assert (config.joint_attention_dim, config.pooled_projection_dim, config.pos_embed_max_size) == (4096, 2048, 384)
    assert (config.patch_size, config.in_channels) == (2, 16)
    assert (parts["vae"].config.scaling_factor, parts["vae"].config.shift_factor) == (1.5305, 0.0609)
    assert parts["text_encoder_2"].config.hidden_size == 1280 and parts["text_encoder_2"].config.num_hidden_layers == 32
    assert parts["scheduler"].config.shift == 3.0 and not parts["scheduler"].config.use_dynamic_shifting
    assert architecture_family("random:sd3") == "sd3"


def test_schnell_large_and_sd15_on_meta():
    schnell = build_random_components("flux-schnell", dtype=torch.bfloat16, device="meta")
    assert not schnell["transformer"].config.guidance_embeds
    assert not schnell["scheduler"].config.use_dynamic_shifting and schnell["scheduler"].config.shift == 1.0
    large = build_random_components("sd35-large", dtype=torch.bfloat16, device="meta")["transformer"]
    assert _close(_stored(large), 8.1e9) and large.config.num_layers == 38
    sd15 = build_random_components("sd15", device="meta")
    assert _params(sd15["unet"]) == 859_520_964
    assert architecture_family("sdxl") == "sdxl" and architecture_family("random:sd21") == "sd"


def test_flow_build_on_the_cpu_in_bf16_runs_and_restores_the_default_dtype(monkeypatch):
    """The real (non-meta) build path, on a FLUX layout cut down to one block: dtypes, a forward, the default."""
    tiny = dict(architectures.FLOW_ARCHITECTURES["flux"])
    tiny["transformer"] = dict(architectures.FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=1,
                               num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                               pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    tiny["vae"] = dict(architectures.FLUX_VAE, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2)
    tiny["text_encoders"] = (("clip", dict(architectures.CLIP_L, hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=1, num_attention_heads=2, projection_dim=32), False),
                             ("t5", dict(architectures.T5_XXL, d_model=32, d_ff=37, num_layers=1, num_heads=2, d_kv=16),
                              False))
    monkeypatch.setitem(architectures.FLOW_ARCHITECTURES, "flux", tiny)
    parts = build_random_components("random:flux", dtype=torch.bfloat16, device="cpu")
    assert torch.get_default_dtype() == torch.float32
    assert parts["transformer"].dtype == parts["vae"].dtype == parts["text_encoder_2"].dtype == torch.bfloat16
    assert parts["text_encoder"].dtype == torch.float32
    ids = parts["tokenizer_2"]("a photo of a dog", return_tensors="pt").input_ids
    text = parts["text_encoder_2"](ids).last_hidden_state
    pooled = parts["text_encoder"](parts["tokenizer"]("a dog", return_tensors="pt").input_ids).pooler_output
    latents = torch.randn(1, 16, 64, dtype=torch.bfloat16)  # 4x4 packed latent tokens of 64 channels
    img_ids = torch.zeros(16, 3)
    out = parts["transformer"](hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled.bfloat16(),
                               timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(text.shape[1], 3),
                               guidance=torch.tensor([3.5])).sample
    assert out.shape == latents.shape and torch.isfinite(out.float()).all()
    again = build_random_components("random:flux", dtype=torch.bfloat16, device="cpu")
    assert torch.equal(next(again["transformer"].parameters()), next(parts["transformer"].parameters()))


def test_unknown_architecture_is_a_one_line_error():
    with pytest.raises(UserInputError, match=r"^--model.pretrained_model_name_or_path: unknown architecture") as err:
        build_random_components("random:flux2")
    assert "\n" not in str(err.value) and "random:sd35-large" in str(err.value)
    assert set(architecture_names()) >= {"random:flux", "random:sd3", "random:sd15"}
