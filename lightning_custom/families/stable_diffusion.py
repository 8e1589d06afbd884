"""Stable Diffusion 1.x / 2.x and SDXL: DDPM noise (epsilon or v-prediction) on a UNet.

The computations are the package's original ones, moved behind :class:`~lightning_custom.families.base.ModelFamily`
unchanged: the same draws from the same generators, so SD and SDXL runs are bit-identical to before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_custom.objectives import sdxl
from lightning_custom.objectives.diffusion import (
    add_noise,
    diffusion_mse,
    diffusion_target,
    distinct_timesteps,
    sample_timesteps,
)
from lightning_custom.families.base import FamilyHost, FlowMatchingOptions, ModelFamily, ModelParts


class StableDiffusionFamily(ModelFamily):
    """SD 1.x and 2.x: one CLIP text encoder, a ``UNet2DConditionModel`` and a DDPM schedule."""

    name: ClassVar[str] = "sd"
    pipeline_class_name: ClassVar[str] = "StableDiffusionPipeline"
    supports_custom_diffusion: ClassVar[bool] = True

    @classmethod
    def matches(cls, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> bool:
        """A ``UNet2DConditionModel`` without SDXL's ``text_time`` added conditioning."""
        return (denoiser_config.get("_class_name") == "UNet2DConditionModel"
                and denoiser_config.get("addition_embed_type") != "text_time")

    @classmethod
    def load(
        cls, source: str, *, revision: str | None = None, variant: str | None = None,
        dtype: torch.dtype = torch.float32, vae_name_or_path: str | None = None,
        options: FlowMatchingOptions | None = None,
    ) -> ModelParts:
        """SD / SDXL parts through :func:`lightning_custom.families.components.load_components` (SDXL is told by its UNet)."""
        from lightning_custom.families.components import load_components
        from lightning_custom.families import torch_dtype_name

        parts = load_components(source, revision=revision, variant=variant, weight_dtype=torch_dtype_name(dtype),
                                vae_name_or_path=vae_name_or_path)
        return sd_model_parts(parts, options)

    # ------------------------------------------------------------------------------------------------ text
    def encode_text(self, model: FamilyHost, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The CLIP text encoder's last hidden states (the UNet's cross-attention context)."""
        with model.frozen_half_precision("text_encoder"):
            return {"encoder_hidden_states": model.text_encoder(input_ids[0])[0]}

    def denoiser_kwargs(
        self, model: FamilyHost, text: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, Any]:
        """``encoder_hidden_states`` only."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    # ---------------------------------------------------------------------------------------- noise levels
    def module_buffers(self) -> dict[str, torch.Tensor]:
        """``alphas_cumprod``, kept on the module's device as a buffer (no host copy per step)."""
        return {"alphas_cumprod": torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float32)}

    @property
    def num_train_timesteps(self) -> int:
        """The DDPM schedule's length (1000 for Stable Diffusion)."""
        return int(self.scheduler.config.num_train_timesteps)

    def sample_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, device: torch.device, latent_size: tuple[int, int]
    ) -> torch.Tensor:
        """Uniform integer timesteps in ``[0, T)`` (DDPM training)."""
        return sample_timesteps(batch_size, self.num_train_timesteps, generator=generator, device=device)

    def fixed_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, latent_size: tuple[int, int], resample: bool = False
    ) -> torch.Tensor:
        """Distinct timesteps (``randperm(T)[:B]``); uniform ones when resampled (the ablation)."""
        if resample:
            return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)
        return distinct_timesteps(batch_size, self.num_train_timesteps, generator=generator)

    # ------------------------------------------------------------------------------------------------ loss
    def denoising_loss(
        self, model: FamilyHost, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
        conditioning: dict[str, Any], reduction: str = "mean",
    ) -> torch.Tensor:
        """MSE between the UNet's prediction on the noised latents and the prediction type's target."""
        alphas_cumprod = model.alphas_cumprod
        noisy = add_noise(alphas_cumprod, latents, noise, levels)
        dtype = model.module_dtype("unet")
        conditioning = to_dtype(conditioning, dtype)
        target = diffusion_target(self.scheduler.config.prediction_type, alphas_cumprod, latents, noise, levels)
        with model.frozen_half_precision("unet"):
            prediction = model.unet(noisy.to(dtype), levels, **conditioning).sample
        return diffusion_mse(prediction, target, reduction=reduction)

    # -------------------------------------------------------------------------------------------- pipeline
    def pipeline(self, parts: Any, scheduler: Any | None = None) -> Any:
        """``StableDiffusionPipeline`` (no safety checker) around the live components."""
        from lightning_custom.families.components import assemble_pipeline

        return assemble_pipeline(parts, scheduler if scheduler is not None else self.scheduler)

    def save_lora(self, output_dir: Any, weight_name: str, layers: dict[str, dict[str, torch.Tensor]],
                  metadata: dict[str, dict[str, Any]]) -> None:
        """``StableDiffusion(XL)Pipeline.save_lora_weights`` with each part's layers and adapter metadata."""
        import diffusers

        from lightning_custom.runtime.io import atomic_path

        kwargs: dict[str, Any] = {}
        for part, weights in layers.items():
            kwargs[f"{part}_lora_layers"] = weights
            kwargs[f"{part}_lora_adapter_metadata"] = metadata[part]
        pipeline_class = getattr(diffusers, self.pipeline_class_name)
        with atomic_path(Path(output_dir) / weight_name) as tmp:
            pipeline_class.save_lora_weights(str(tmp.parent), weight_name=tmp.name, **kwargs)


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders, the pooled text embedding and the size/crop time ids (see :mod:`sdxl`)."""

    name: ClassVar[str] = "sdxl"
    pipeline_class_name: ClassVar[str] = "StableDiffusionXLPipeline"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    trainable_text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")

    @classmethod
    def matches(cls, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> bool:
        """A ``UNet2DConditionModel`` with ``addition_embed_type == "text_time"``."""
        return (denoiser_config.get("_class_name") == "UNet2DConditionModel"
                and denoiser_config.get("addition_embed_type") == "text_time")

    def encode_text(self, model: FamilyHost, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states, concatenated, and the second one's pooled projection."""
        with model.frozen_half_precision("text_encoder"):
            hidden, pooled = sdxl.encode_prompts([model.text_encoder, model.text_encoder_2], input_ids)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def denoiser_kwargs(
        self, model: FamilyHost, text: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, Any]:
        """Hidden states plus ``added_cond_kwargs`` (pooled text, per-sample time ids from the batch's sizes)."""
        return sdxl.unet_kwargs(text, batch["original_size"], batch["crop_top_left"],
                                tuple(batch["pixel_values"].shape[-2:]), device=model.device)


def sd_model_parts(parts: Any, options: FlowMatchingOptions | None = None) -> ModelParts:
    """Wrap :class:`~lightning_custom.families.components.StableDiffusionComponents` as :class:`ModelParts`."""
    family = StableDiffusionXLFamily if parts.is_sdxl else StableDiffusionFamily
    components = {"tokenizer": parts.tokenizer, "text_encoder": parts.text_encoder, "tokenizer_2": parts.tokenizer_2,
                  "text_encoder_2": parts.text_encoder_2, "vae": parts.vae, "unet": parts.unet,
                  "scheduler": parts.noise_scheduler}
    return ModelParts(family(parts.noise_scheduler, options), components)


def to_dtype(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``value`` (nested dicts too, e.g. SDXL's ``added_cond_kwargs``) cast to ``dtype``."""
    if isinstance(value, dict):
        return {k: to_dtype(v, dtype) for k, v in value.items()}
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
