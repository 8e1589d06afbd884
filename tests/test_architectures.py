"""Published architectures with random weights (lightning_custom.synthetic.architectures), built on the meta device.

The published sizes: FLUX.1-dev's transformer is 11.9B parameters (its bf16 checkpoint holds 23.8 GB), the T5-XXL
encoder 4.76B (9.52 GB of bf16 in FLUX's ``text_encoder_2``), SD3.5 Medium's transformer 2.47B stored values
(4.94 GB of bf16, Stability's "2.5B": 2.24B parameters + the stored positional-embedding buffer), SD3.5 Large 8.1B,
CLIP ViT-L/14's text tower 123M, the 16-channel VAE 83.8M (168 MB of bf16), SD 1.5's UNet 859.5M.
"""

from __future__ import annotations

import pytest
import torch

from lightning_custom.synthetic import architectures
from lightning_custom.synthetic.architectures import architecture_family, architecture_names, build_random_components
from lightning_custom.errors import UserInputError


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stored(module: torch.nn.Module) -> int:
    """Parameters plus persistent buffers: what a checkpoint file stores."""
    return sum(value.numel() for value in module.state_dict().values())


def _close(value: int, published: float, tolerance: float = 0.01) -> bool:
    return abs(value - published) <= tolerance * published


def _detected_family(parts: dict) -> str:
    """The family that ``load_model`` detects for these components (from the denoiser's config, as it does)."""
    from lightning_custom.families import FAMILIES

    denoiser = parts.get("transformer", parts.get("unet"))
    config = {**dict(denoiser.config), "_class_name": type(denoiser).__name__}
    return next(family for family in FAMILIES if family.matches({}, config)).name


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
    assert architecture_family("random:flux") == "flux" == _detected_family(parts)


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
    assert architecture_family("random:sd3") == "sd3" == _detected_family(parts)


def test_schnell_large_and_sd15_on_meta():
    schnell = build_random_components("flux-schnell", dtype=torch.bfloat16, device="meta")
    assert not schnell["transformer"].config.guidance_embeds
    assert not schnell["scheduler"].config.use_dynamic_shifting and schnell["scheduler"].config.shift == 1.0
    large = build_random_components("sd35-large", dtype=torch.bfloat16, device="meta")["transformer"]
    assert _close(_stored(large), 8.1e9) and large.config.num_layers == 38
    sd15 = build_random_components("sd15", device="meta")
    assert _params(sd15["unet"]) == 859_520_964 and _detected_family(sd15) == "sd"
    assert _detected_family(schnell) == "flux"
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


def test_sd3_build_on_the_cpu_in_bf16_runs(monkeypatch):
    """SD3.5's layout cut down to one dual-attention, QK-normed layer: dtypes and a forward on the CPU."""
    small_clip = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                      projection_dim=32)
    tiny = dict(architectures.FLOW_ARCHITECTURES["sd3"])
    tiny["transformer"] = dict(architectures.SD35_MEDIUM_TRANSFORMER, num_layers=1, num_attention_heads=2,
                               attention_head_dim=16, joint_attention_dim=64, caption_projection_dim=32,
                               pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(0,))
    tiny["vae"] = dict(architectures.SD3_VAE, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2)
    tiny["text_encoders"] = (("clip", dict(architectures.CLIP_L, **small_clip), True),
                             ("clip", dict(architectures.OPENCLIP_BIGG, **small_clip), True),
                             ("t5", dict(architectures.T5_XXL, d_model=64, d_ff=37, num_layers=1, num_heads=2, d_kv=16),
                              False))
    monkeypatch.setitem(architectures.FLOW_ARCHITECTURES, "sd3", tiny)
    parts = build_random_components("random:sd3", dtype=torch.bfloat16, device="cpu")
    assert torch.get_default_dtype() == torch.float32
    assert parts["transformer"].dtype == parts["text_encoder_3"].dtype == torch.bfloat16
    assert parts["text_encoder"].dtype == parts["text_encoder_2"].dtype == torch.float32
    pooled = torch.cat([parts[name](parts["tokenizer"]("a dog", return_tensors="pt").input_ids).text_embeds
                        for name in ("text_encoder", "text_encoder_2")], dim=-1)
    text = parts["text_encoder_3"](parts["tokenizer_3"]("a dog", return_tensors="pt").input_ids).last_hidden_state
    latents = torch.randn(1, 16, 8, 8, dtype=torch.bfloat16)
    out = parts["transformer"](hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled.bfloat16(),
                               timestep=torch.tensor([500.0])).sample
    assert out.shape == latents.shape and torch.isfinite(out.float()).all()


def test_unknown_architecture_is_a_one_line_error():
    with pytest.raises(UserInputError, match=r"^--model.pretrained_model_name_or_path: unknown architecture") as err:
        build_random_components("random:flux2")
    assert "\n" not in str(err.value) and "random:sd35-large" in str(err.value)
    assert set(architecture_names()) >= {"random:flux", "random:sd3", "random:sd15"}


# ------------------------------------------------------------------------------ benchmarks/flow_memory.py
def _flow_memory():
    import importlib.util
    import sys
    from pathlib import Path

    if "flow_memory" not in sys.modules:  # its dataclasses resolve their annotations through sys.modules
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "flow_memory.py"
        spec = importlib.util.spec_from_file_location("flow_memory", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["flow_memory"] = module
        spec.loader.exec_module(module)
    return sys.modules["flow_memory"]


def test_flow_memory_estimate_on_a_known_case():
    """1B transformer parameters (0.9B in Linear weights with 1M rows), 10M LoRA, 1 GiB-scale activations."""
    fm = _flow_memory()
    gib = 2**30
    act = fm.ActivationBytes(total=8 * gib, outside_blocks=gib // 4, block_inputs=gib, largest_block=gib // 2)
    sizes = fm.ModelSizes(name="toy", transformer_params=10**9, transformer_buffers=10**6, linear_weights=9 * 10**8,
                          linear_rows=10**6, lora_params=10**7, vae_params=10**8, clip_params=10**8,
                          t5_params=5 * 10**9, activations={"lora": act, "ti": act, "full": act})
    # Frozen weights: bf16 2 bytes each (buffers too); int8 1 byte + 4 per row for Linear weights; nf4 0.5625 bytes.
    assert fm.frozen_transformer_bytes(sizes, "bf16") == 2 * (10**9 + 10**6)
    assert fm.frozen_transformer_bytes(sizes, "int8") == 9 * 10**8 + 4 * 10**6 + 2 * (10**8 + 10**6)
    assert fm.frozen_transformer_bytes(sizes, "nf4") == 0.5625 * 9 * 10**8 + 2 * (10**8 + 10**6)
    # Activations: all + one block; checkpointed: outside + inputs + twice the largest block.
    assert fm.activation_bytes(act, checkpointing=False) == 8.5 * gib
    assert fm.activation_bytes(act, checkpointing=True) == 2.25 * gib
    parts = fm.estimate_memory(sizes, fm.Setting("lora", "bf16", True, "adamw", text_resident=True))
    assert parts["trainable"] == 16 * 10**7 and parts["t5"] == 10**10 and parts["clip"] == 4 * 10**8
    subtotal = 2 * (10**9 + 10**6) + 16 * 10**7 + 2 * 10**8 + 4 * 10**8 + 10**10 + 2.25 * gib
    assert parts["total"] == pytest.approx(subtotal * 1.1 + gib)
    lean = fm.estimate_memory(sizes, fm.Setting("lora", "nf4", True, "adamw8bit", text_resident=False))
    assert lean["trainable"] == 10 * 10**7 and lean["t5"] == lean["clip"] == 0
    ti = fm.estimate_memory(sizes, fm.Setting("ti", "bf16", True, "adamw", text_resident=False))
    assert ti["trainable"] == 0 and ti["clip"] == 4 * 10**8  # TI trains through CLIP: it stays resident
    full = fm.estimate_memory(sizes, fm.Setting("full", "bf16", False, "adamw"))
    assert full["trainable"] == 16 * 10**9 and full["transformer"] == 2 * 10**6
    with pytest.raises(ValueError, match="quantized"):
        fm.estimate_memory(sizes, fm.Setting("full", "nf4"))
    assert fm.smallest_card(23.9 * gib) == 24 and fm.smallest_card(24.1 * gib) == 48 and fm.smallest_card(81 * gib) is None


def test_flow_memory_counts_saved_activations_of_a_known_block():
    """The meta-device count on one Linear + GELU: full training saves the Linear's input and the GELU's input."""
    fm = _flow_memory()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 256)

        def forward(self, hidden_states):
            return torch.nn.functional.gelu(self.linear(hidden_states))

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([Block(), Block()])
            self.proj = torch.nn.Linear(256, 64)

        def forward(self, hidden_states, return_dict=False):
            for block in self.transformer_blocks:
                hidden_states = self.proj(block(hidden_states))
            return (hidden_states,)

    with torch.device("meta"):
        toy = Toy().to(torch.bfloat16)
    x = torch.empty(1, 100, 64, device="meta", dtype=torch.bfloat16)
    act = fm.count_saved_activations(toy, {"hidden_states": x})
    # Per block: its input (100x64) and the GELU input (100x256), bf16. Outside: proj's inputs (2 x 100x256) and the
    # loss's float32 difference (100x64).
    assert act.largest_block == 2 * (100 * 64 + 100 * 256)
    assert act.outside_blocks == 2 * 2 * 100 * 256 + 4 * 100 * 64
    assert act.total == 2 * act.largest_block + act.outside_blocks
    assert act.block_inputs == 2 * 2 * 100 * 64


def test_flow_memory_quantized_bytes_match_bitsandbytes():
    """BASE_BYTES against what bitsandbytes stores for one layer (nf4 at its default 64-value blocks; int8 rows)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    fm = _flow_memory()
    rows, columns = 512, 256
    weight = torch.randn(rows, columns, dtype=torch.bfloat16)
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    nf4 = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    assert nf4 == fm.BASE_BYTES["nf4"][0] * rows * columns
    quantized, row_stats, _ = functional.int8_vectorwise_quant(weight.float())
    int8 = quantized.numel() * quantized.element_size() + row_stats.numel() * row_stats.element_size()
    assert int8 == fm.BASE_BYTES["int8"][0] * rows * columns + fm.BASE_BYTES["int8"][1] * rows
