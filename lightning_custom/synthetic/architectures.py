"""Published text-to-image architectures with random weights, built in-process (no download).

``pretrained_model_name_or_path: random:sd15`` (or ``random:sd21``, ``random:sdxl``, ``random:flux``,
``random:flux-schnell``, ``random:sd3``, ``random:sd35-large``) gives a model with the compute and memory of the
real checkpoint, for throughput benchmarks on a GPU machine that cannot download. The configs are those published
in the checkpoints' ``*/config.json`` files (each block below names its checkpoint).

The flow models are large (FLUX.1-dev: 11.9B transformer + 4.76B T5 parameters), so they are built directly on
the CUDA device when there is one, and ``device="meta"`` builds any architecture without memory (parameter
counts, shapes; see ``benchmarks/flow_memory.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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

# ---------------------------------------------------------------------------------------------- flow models
# black-forest-labs/FLUX.1-dev transformer/config.json (FluxTransformer2DModel): 19 double-stream and 38
# single-stream blocks of 24 heads x 128 = 3072 wide; 11,901,408,320 parameters (the checkpoint's 23.8 GB of bf16).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-schnell: the same without the guidance embedding (not guidance-distilled).
FLUX_SCHNELL_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, guidance_embeds=False)
# FLUX.1's vae/config.json: 16 latent channels, no quant convs, shift 0.1159, scale 0.3611 (83.8M parameters).
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)
# stabilityai/stable-diffusion-3.5-medium (and -large) vae/config.json: FLUX's layout, SD3's normalisation.
SD3_VAE = dict(FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)
# google/t5-v1_1-xxl encoder (FLUX's text_encoder_2, SD3's text_encoder_3): 4,762,310,656 parameters.
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X): 24 layers of 24 heads x 64, dual
# attention in layers 0-12, RMS QK-norm; 2,243,171,520 parameters plus the 226M-value stored positional-embedding
# buffer (pos_embed_max_size 384) = the checkpoint's 2.47B values (4.94 GB of bf16), Stability's "2.5B".
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-large transformer/config.json: 38 layers of 38 heads x 64, RMS QK-norm, no dual
# attention; 8.06B parameters + the 90M-value positional buffer = Stability's "8.1B".
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
# scheduler/scheduler_config.json of FLUX.1-dev (dynamic shifting by resolution), FLUX.1-schnell and SD3.5 (shift 3).
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER = dict(FLUX_DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# The T5 tokenizers' model_max_length in both checkpoints (the pipelines cut to max_sequence_length).
T5_MAX_LENGTH = 512
# Text encoders, in pipeline order: (kind, config, CLIP with projection). FLUX: CLIP-L (pooled) + T5; SD3: CLIP-L and
# CLIP-G with projections (their pooled outputs concatenate to 2048) + T5.
_FLUX_TEXT = (("clip", CLIP_L, False), ("t5", T5_XXL, False))
_SD3_TEXT = (("clip", CLIP_L, True), ("clip", OPENCLIP_BIGG, True), ("t5", T5_XXL, False))

FLOW_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "flux": {"family": "flux", "transformer_class": "FluxTransformer2DModel", "transformer": FLUX_DEV_TRANSFORMER,
             "vae": FLUX_VAE, "text_encoders": _FLUX_TEXT, "scheduler": FLUX_DEV_SCHEDULER},
    "flux-schnell": {"family": "flux", "transformer_class": "FluxTransformer2DModel",
                     "transformer": FLUX_SCHNELL_TRANSFORMER, "vae": FLUX_VAE, "text_encoders": _FLUX_TEXT,
                     "scheduler": FLUX_SCHNELL_SCHEDULER},
    "sd3": {"family": "sd3", "transformer_class": "SD3Transformer2DModel", "transformer": SD35_MEDIUM_TRANSFORMER,
            "vae": SD3_VAE, "text_encoders": _SD3_TEXT, "scheduler": SD3_SCHEDULER},
    "sd35-large": {"family": "sd3", "transformer_class": "SD3Transformer2DModel",
                   "transformer": SD35_LARGE_TRANSFORMER, "vae": SD3_VAE, "text_encoders": _SD3_TEXT,
                   "scheduler": SD3_SCHEDULER},
}
RANDOM_PREFIX = "random:"


def is_random_architecture(name_or_path: str) -> bool:
    """Whether ``name_or_path`` asks for a random-weight published architecture (``random:sd15``)."""
    return name_or_path.startswith(RANDOM_PREFIX)


def _family_architectures() -> dict[str, dict[str, Any]]:
    """The 2026 families' ``random:`` architectures (:mod:`~lightning_custom.synthetic.architectures_2026`):
    key -> entry."""
    from lightning_custom.synthetic.architectures_2026 import ARCHITECTURES as ARCHITECTURES_2026

    return ARCHITECTURES_2026


def architecture_names() -> list[str]:
    """Every ``random:<name>`` architecture (Stable Diffusion, flow, and the 2026 families')."""
    return [RANDOM_PREFIX + key for key in (*ARCHITECTURES, *FLOW_ARCHITECTURES, *_family_architectures())]


def architecture_family(name: str) -> str:
    """The model family of a random architecture: ``"sd"``, ``"sdxl"``, ``"flux"``, ``"sd3"``, ``"z_image"``..."""
    key = _architecture_key(name)
    if key in _family_architectures():
        return _family_architectures()[key]["family"]
    if key in FLOW_ARCHITECTURES:
        return FLOW_ARCHITECTURES[key]["family"]
    return "sdxl" if key == "sdxl" else "sd"


def _architecture_key(name: str) -> str:
    from lightning_custom.errors import UserInputError

    key = name.removeprefix(RANDOM_PREFIX)
    if key not in ARCHITECTURES and key not in FLOW_ARCHITECTURES and key not in _family_architectures():
        raise UserInputError(f"--model.pretrained_model_name_or_path: unknown architecture {name!r}; "
                             f"choose from {architecture_names()}")
    return key


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules built in the block are created on ``device`` in ``dtype`` (no full-precision copy on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def _resolve_device(device: str | torch.device | None, flow: bool) -> torch.device:
    # A flow model is 17B parameters with its T5: build it where it will run. SD keeps its CPU build.
    if device is None:
        device = "cuda" if flow and torch.cuda.is_available() else "cpu"
    return torch.device(device)


def build_random_components(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Tokenizer(s), text encoder(s), VAE, denoiser and scheduler of a published architecture, random weights.

    Args:
        name: ``sd15``, ``sd21``, ``sdxl``, ``flux``, ``flux-schnell``, ``sd3`` (SD3.5 Medium) or ``sd35-large``,
            with or without the ``random:`` prefix.
        seed: weight seed.
        dtype: dtype of the UNet and VAE (SD); of the transformer, VAE and T5 (flow models, whose CLIP encoders
            stay float32, as the flow families load them).
        device: where the modules are built; ``"meta"`` allocates nothing (parameter counts and shapes). Default:
            the CUDA device for the flow models when there is one, else the CPU.

    Returns:
        The diffusers pipeline's component names: ``{"tokenizer", "text_encoder", "vae", "unet", "scheduler"}``,
        plus ``tokenizer_2``/``text_encoder_2`` for SDXL; ``{"transformer", "vae", "text_encoder", "tokenizer",
        "text_encoder_2", "tokenizer_2", "scheduler"}`` for FLUX (``_2`` is T5), with ``text_encoder_3`` /
        ``tokenizer_3`` (T5) for SD3. The tokenizers are offline stand-ins: the package's CLIP tokenizer (token ids
        fit the 49408-row vocabulary) and a word-level T5 tokenizer (ids fit T5's 32128 rows).
    """
    key = _architecture_key(name)
    if key in _family_architectures():
        from lightning_custom.synthetic.architectures_2026 import build_random

        return build_random(key, seed=seed, dtype=dtype, device=device)
    if key in FLOW_ARCHITECTURES:
        return _build_flow(FLOW_ARCHITECTURES[key], seed, dtype, _resolve_device(device, flow=True))
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    arch = ARCHITECTURES[key]
    device = _resolve_device(device, flow=False)
    torch.manual_seed(seed)
    with _building(device, torch.float32):
        out: dict[str, Any] = {
            "unet": UNet2DConditionModel(**arch["unet"]).to(dtype),
            "vae": AutoencoderKL(**arch["vae"]).to(dtype),
        }
    out["scheduler"] = DDPMScheduler(**SCHEDULER, prediction_type=arch["prediction_type"])
    for index, text_config in enumerate(arch["text_encoders"]):
        suffix = "" if index == 0 else f"_{index + 1}"
        out[f"text_encoder{suffix}"], out[f"tokenizer{suffix}"] = _clip(text_config, index == 1, device)
    return out


def _clip(text_config: dict[str, Any], with_projection: bool, device: torch.device) -> tuple[Any, Any]:
    """A float32 CLIP text encoder of ``text_config`` and the package's offline CLIP tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lightning_custom.synthetic.offline_tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text_config)
    with _building(device, torch.float32):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model, tokenizer


def _t5(text_config: dict[str, Any], dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """A T5 encoder of ``text_config`` in ``dtype`` and an offline word-level tokenizer (``model_max_length`` 512)."""
    from transformers import T5Config, T5EncoderModel

    from lightning_custom.synthetic.offline_tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(T5_MAX_LENGTH)
    config = T5Config(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
                      **text_config)
    with _building(device, dtype):
        model = _in_dtype(T5EncoderModel(config), dtype)
    return model, tokenizer


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with every floating parameter in ``dtype`` (built so already: no cast, and no diffusers warning)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


def _build_flow(arch: dict[str, Any], seed: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The components of a FLUX.1 or SD3.5 architecture (see :func:`build_random_components`)."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    with _building(device, dtype):
        out: dict[str, Any] = {
            "transformer": _in_dtype(getattr(diffusers, arch["transformer_class"])(**arch["transformer"]), dtype),
            "vae": _in_dtype(AutoencoderKL(**arch["vae"]), dtype),
        }
    for index, (kind, text_config, with_projection) in enumerate(arch["text_encoders"]):
        suffix = "" if index == 0 else f"_{index + 1}"
        encoder, tokenizer = (_t5(text_config, dtype, device) if kind == "t5"
                              else _clip(text_config, with_projection, device))
        out[f"text_encoder{suffix}"], out[f"tokenizer{suffix}"] = encoder, tokenizer
    out["scheduler"] = FlowMatchEulerDiscreteScheduler(**arch["scheduler"])
    return out
