"""Tiny, fully offline FLUX.1- and SD3-style components for tests and demos (issue 13 groundwork).

Built in-process in diffusers' and transformers' own classes, with the sizes of diffusers' pipeline tests
(``tests/pipelines/flux/test_pipeline_flux.py`` and ``tests/pipelines/stable_diffusion_3/
test_pipeline_stable_diffusion_3.py``, ``get_dummy_components``): a ``FluxTransformer2DModel`` or
``SD3Transformer2DModel`` with one layer, an ``AutoencoderKL`` with ``shift_factor``, a
``FlowMatchEulerDiscreteScheduler`` (FLUX: dynamic shifting; SD3: ``shift=3.0``), CLIP text encoders with the
offline tokenizer of :func:`lightning_custom.synthetic.toy_models.build_clip_tokenizer`, and optionally a tiny T5 encoder
with an offline word-level tokenizer (T5 is optional in both pipelines, as in diffusers).

:func:`embedded_flow_model` builds the ``embedded:tiny-flux`` / ``embedded:tiny-sd3`` models (with T5) once into a
cache folder and reuses them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The scheduler configs of black-forest-labs/FLUX.1-dev and stabilityai/stable-diffusion-3.5-medium, kept once with the
# published architectures (the names here are the ones this module had).
from lightning_custom.synthetic.architectures import FLUX_DEV_SCHEDULER as FLUX_SCHEDULER
from lightning_custom.synthetic.architectures import SD3_SCHEDULER
from lightning_custom.synthetic.offline_tokenizers import build_clip_tokenizer, build_t5_tokenizer  # noqa: F401 - re-exported

__all__ = [
    "FLUX_SCHEDULER",
    "SD3_SCHEDULER",
    "build_t5_tokenizer",
    "build_tiny_flux_components",
    "build_tiny_sd3_components",
    "embedded_flow_model",
    "save_tiny_flux",
    "save_tiny_sd3",
]

# The flow VAEs' latent normalization in diffusers' tests (FLUX.1's own: shift 0.1159, scale 0.3611).
_VAE_SHIFT_FACTOR = 0.0609
_VAE_SCALING_FACTOR = 1.5035


def _tiny_vae(seed: int, latent_channels: int, sample_size: int) -> Any:
    """A one-block ``AutoencoderKL`` (no downsampling) with a ``shift_factor``, as diffusers' flow pipeline tests."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=_VAE_SHIFT_FACTOR, scaling_factor=_VAE_SCALING_FACTOR,
    ).eval()


def _tiny_clip(seed: int, width: int, with_projection: bool) -> tuple[Any, Any]:
    """A 2-layer CLIP text encoder of ``width`` and its offline tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=width,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model.eval(), tokenizer


def _tiny_t5(seed: int, width: int) -> tuple[Any, Any]:
    """A 2-layer ``T5EncoderModel`` of ``width`` and its offline tokenizer."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval(), tokenizer


def build_tiny_flux_components(
    seed: int = 0, *, sample_size: int = 16, width: int = 32, guidance_embeds: bool = False, with_t5: bool = True
) -> dict[str, Any]:
    """Builds tiny, randomly initialised FLUX.1 components (diffusers' ``FluxPipeline`` test sizes).

    The VAE does not downsample and has one latent channel, so latents are ``sample_size`` pixels square and
    pack (2x2) into ``4`` channels: the transformer's ``in_channels``. CLIP-L's pooled output (``width``) feeds
    ``pooled_projections``; the T5 states (``width``) feed ``encoder_hidden_states``.

    Args:
        seed: Seed applied (``torch.manual_seed``) before each module is built.
        sample_size: Image (and latent) side length in pixels.
        width: CLIP and T5 hidden size == the transformer's ``pooled_projection_dim`` and ``joint_attention_dim``.
        guidance_embeds: Build FLUX.1-dev's guidance embedding (guidance-distilled) instead of schnell's none.
        with_t5: Also build ``text_encoder_2`` / ``tokenizer_2`` (else ``None``: ``FluxPipeline`` then needs
            ``prompt_embeds`` passed in, as it cannot encode prompts without T5).

    Returns:
        Dict with ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2``,
        ``scheduler`` (``FluxPipeline``'s component names).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=width, pooled_projection_dim=width, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    text_encoder, tokenizer = _tiny_clip(seed, width, with_projection=False)
    text_encoder_2, tokenizer_2 = _tiny_t5(seed, width) if with_t5 else (None, None)
    return {
        "transformer": transformer,
        "vae": _tiny_vae(seed, latent_channels=1, sample_size=sample_size),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    }


def build_tiny_sd3_components(
    seed: int = 0, *, sample_size: int = 16, clip_width: int = 32, with_t5: bool = False
) -> dict[str, Any]:
    """Builds tiny, randomly initialised SD3 components (diffusers' ``StableDiffusion3Pipeline`` test sizes).

    Two ``CLIPTextModelWithProjection`` (CLIP-L, CLIP-G) of ``clip_width``: their pooled projections concatenate to
    ``pooled_projection_dim = 2 * clip_width`` and their hidden states to ``joint_attention_dim = 2 * clip_width``,
    which is also T5's width (the pipeline pads CLIP states to T5's). Latents have 4 channels and the VAE does not
    downsample, so latents are ``sample_size`` square; the transformer patchifies them 1x1.

    Args:
        seed: Seed applied (``torch.manual_seed``) before each module is built.
        sample_size: Image (and latent) side length in pixels.
        clip_width: Hidden size of each CLIP encoder.
        with_t5: Also build ``text_encoder_3`` / ``tokenizer_3`` (else ``None``).

    Returns:
        Dict with ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2``,
        ``text_encoder_3``, ``tokenizer_3``, ``scheduler`` (``StableDiffusion3Pipeline``'s component names).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=2 * clip_width,
        pooled_projection_dim=2 * clip_width, out_channels=4,
    ).eval()
    text_encoder, tokenizer = _tiny_clip(seed, clip_width, with_projection=True)
    text_encoder_2, tokenizer_2 = _tiny_clip(seed + 1, clip_width, with_projection=True)
    text_encoder_3, tokenizer_3 = _tiny_t5(seed, 2 * clip_width) if with_t5 else (None, None)
    return {
        "transformer": transformer,
        "vae": _tiny_vae(seed, latent_channels=4, sample_size=sample_size),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
    }


def _save_pipeline(pipeline_class: Any, components: dict[str, Any], path: str | Path) -> Path:
    """Saves ``components`` as a ``pipeline_class`` folder; ``None`` parts are left out (pass ``None`` on load)."""
    path = Path(path)
    pipeline_class(**components).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_flux(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Builds tiny FLUX components (:func:`build_tiny_flux_components`) and saves them as a ``FluxPipeline`` folder.

    Args:
        path: Output folder (created if needed).
        seed: Seed passed to :func:`build_tiny_flux_components`.
        **kwargs: Extra keyword arguments for :func:`build_tiny_flux_components`.

    Returns:
        The output folder, loadable with ``FluxPipeline.from_pretrained`` (``text_encoder_2=None,
        tokenizer_2=None`` when built without T5).
    """
    from diffusers import FluxPipeline

    return _save_pipeline(FluxPipeline, build_tiny_flux_components(seed, **kwargs), path)


def save_tiny_sd3(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Builds tiny SD3 components (:func:`build_tiny_sd3_components`) and saves them as a pipeline folder.

    Args:
        path: Output folder (created if needed).
        seed: Seed passed to :func:`build_tiny_sd3_components`.
        **kwargs: Extra keyword arguments for :func:`build_tiny_sd3_components`.

    Returns:
        The output folder, loadable with ``StableDiffusion3Pipeline.from_pretrained`` (``text_encoder_3=None,
        tokenizer_3=None`` when built without T5).
    """
    from diffusers import StableDiffusion3Pipeline

    return _save_pipeline(StableDiffusion3Pipeline, build_tiny_sd3_components(seed, **kwargs), path)


#: Bump when the embedded models' construction changes, so that stale caches are not reused.
EMBEDDED_FLOW_VERSION = "v2"  # v2: SD3 with 2 layers (the last one lacks attn.to_add_out, a LoRA target)
_EMBEDDED_FLOW_BUILDERS = {"tiny-flux": "flux", "tiny-sd3": "sd3"}


def embedded_flow_cache_dir() -> Path:
    """The cache folder of the embedded flow models: ``$LIGHTNING_CUSTOM_CACHE`` or ``~/.cache/lightning_custom``."""
    return Path(os.environ.get("LIGHTNING_CUSTOM_CACHE") or Path.home() / ".cache" / "lightning_custom").expanduser()


def embedded_flow_model(name: str) -> Path:
    """The folder of the embedded tiny flow model ``name`` (``"tiny-flux"`` or ``"tiny-sd3"``), built on first use.

    Built deterministically (seed 0) with T5 (and, for FLUX, FLUX.1-dev's guidance embedding) into
    ``<cache>/<name>-v2`` (:func:`embedded_flow_cache_dir`): written to a temporary folder beside it, then renamed,
    so a reader never sees a half-written model; when a concurrent builder renamed first, its folder is used. The
    global RNG is left as it was.

    Raises:
        UserInputError: For an unknown ``name``.
    """
    from lightning_custom.errors import UserInputError

    if name not in _EMBEDDED_FLOW_BUILDERS:
        raise UserInputError(f"--model.pretrained_model_name_or_path: unknown embedded flow model {name!r}; choose "
                             f"from {['embedded:' + n for n in _EMBEDDED_FLOW_BUILDERS]}")
    builder = _EMBEDDED_FLOW_BUILDERS[name]

    def save(folder: Path) -> None:
        if builder == "flux":
            save_tiny_flux(folder, seed=0, with_t5=True, guidance_embeds=True)
        else:
            save_tiny_sd3(folder, seed=0, with_t5=True)

    return build_embedded_model(name, EMBEDDED_FLOW_VERSION, save)


def build_embedded_model(name: str, version: str, save: Callable[[Path], Any]) -> Path:
    """The folder of embedded tiny model ``name``, built by ``save(folder)`` on first use.

    Into ``<cache>/<name>-<version>`` (:func:`embedded_flow_cache_dir`), written to a temporary folder beside it and
    renamed, so a reader never sees half a model (when a concurrent builder renamed first, its folder is used); the
    global RNG is left as it was (the builders seed it).
    """
    target = embedded_flow_cache_dir() / f"{name}-{version}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            save(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
