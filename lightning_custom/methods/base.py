"""The shared LightningModule: noise and timestep sampling, the target, the loss, and DVAR's deterministic loss."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lightning_custom.families.components import WeightDtype
from lightning_custom.dvar.eval_batch import EvalBatchSpec
from lightning_custom.objectives.diffusion import scale_learning_rate
from lightning_custom.runtime.ranges import check_ranges, check_resolution
from lightning_custom.families import FlowMatchingOptions, ModelFamily, ModelParts, load_model
from lightning_custom.objectives.flow_matching import WeightingScheme
from lightning_custom.methods.checkpointing import CheckpointedTraining
from lightning_custom.methods.encoding import FrozenEncoding
from lightning_custom.methods.tokens import batch_input_ids
from lightning_custom.runtime.optimizers import adamw_8bit, fused_adamw_applies
from lightning_custom.runtime.precision import autocast_off_for, match_frozen_weights_to_precision

log = logging.getLogger(__name__)


class PersonalizationModule(CheckpointedTraining, FrozenEncoding, L.LightningModule, ABC):
    """Base class of every personalization method.

    Subclasses implement :meth:`configure_trainable` (unfreeze what they train) and :meth:`export_artifacts`
    (write diffusers-native files). Everything else, the diffusion loss, DVAR's :meth:`deterministic_loss`, the
    optimizer and the checkpointed training RNG, is shared. What depends on the architecture (SD 1.x/2.x, SDXL,
    FLUX.1, SD3/SD3.5) is asked of :attr:`family` (:mod:`lightning_custom.families`), read from the checkpoint.

    Args:
        pretrained_model_name_or_path: diffusers model: hub id, local folder, or ``"embedded"`` for the
            small offline model shipped with the package (the world model; ``"embedded:tiny-sd"``: random, tiny).
        revision: hub revision (branch, tag or commit).
        variant: weight file variant, e.g. ``"fp16"``.
        weight_dtype: dtype of the frozen VAE and UNet; trainable parameters always stay fp32. (SDXL's VAE stays
            fp32, since it overflows in fp16, unless ``vae_name_or_path`` gives an fp16-safe one.)
        learning_rate: base learning rate, per sample.
        scale_lr: multiply the learning rate by batch size x gradient accumulation x devices (as the paper; on by
            default, so batch size 2 trains at twice ``learning_rate``; summary.json records both).
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        adam_epsilon: AdamW epsilon.
        seed: seed of the training noise, timesteps and VAE samples (offset by the rank under DDP).
        cache_latents: keep each augmented training image's VAE latent distribution after its first encoding and
            sample from it, instead of running the VAE encoder every step (the VAE is frozen).
        cache_eval_batch: compute the fixed evaluation batch's latents once, and its text states once when nothing
            in the text path trains.
        channels_last: put the UNet in channels-last memory format. Off by default: it speeds up convolutions on
            recent GPUs, but CUDA's GroupNorm wants NCHW, so it adds layout copies around the UNet's 61 GroupNorms;
            turn it on only where ``benchmarks/gpu_throughput.sh`` (row C against B) measures it faster.
        compile_unet: ``torch.compile`` the UNet: ``"regional"`` compiles only its repeated transformer blocks
            (seconds, not minutes, of compile time), ``"full"`` the whole UNet.
        optimizer: ``"adamw"`` (fused on CUDA) or ``"adamw_8bit"`` (bitsandbytes, where installed).
        vae_name_or_path: another VAE (hub id or folder), e.g. ``madebyollin/sdxl-vae-fp16-fix`` to run SDXL's VAE
            in ``weight_dtype``.
        gradient_checkpointing: recompute the denoiser's activations in the backward pass (less memory, ~30% more
            compute); what lets FLUX.1-dev LoRA fit a 24 GB card.
        weighting_scheme: flow models (FLUX, SD3) only: the sigma density and loss weighting of diffusers' flow
            scripts: ``none`` (uniform), ``logit_normal``, ``mode``, ``sigma_sqrt``, ``cosmap``.
        logit_mean: flow models: mean of ``logit_normal``.
        logit_std: flow models: standard deviation of ``logit_normal``.
        mode_scale: flow models: scale of ``mode``.
        guidance_scale: FLUX.1-dev (``guidance_embeds``): the guidance value fed to the transformer in training.
        resolution_shift: FLUX: shift the training sigmas by the image size as ``FluxPipeline`` does at inference.
        cache_text_states: compute each training caption's text states once and reuse them while nothing in the
            text path trains (each caption encoded alone, so the values do not depend on the batch). ``None``: on
            for FLUX and SD3, whose T5 encoder costs as much as a transformer step; off for SD / SDXL (their CLIP is
            cheap, and a caption encoded alone can differ from the batched value in the last bit).
        quantize_base: load the frozen denoiser quantized by bitsandbytes through diffusers (``"8bit"`` or
            ``"4bit"``, NF4 with ``weight_dtype`` compute), for LoRA and Textual Inversion on a card too small for
            the bf16 weights (FLUX.1-dev: 24 GB). Needs ``pip install bitsandbytes`` and a CUDA GPU.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = "embedded",
        revision: str | None = None,
        variant: str | None = None,
        weight_dtype: WeightDtype = "float32",
        learning_rate: float = 5e-3,
        scale_lr: bool = True,
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_epsilon: float = 1e-8,
        seed: int = 59,
        cache_latents: bool = True,
        cache_eval_batch: bool = True,
        channels_last: bool = False,
        compile_unet: Literal["none", "regional", "full"] = "none",
        optimizer: Literal["adamw", "adamw_8bit"] = "adamw",
        vae_name_or_path: str | None = None,
        gradient_checkpointing: bool = False,
        weighting_scheme: WeightingScheme = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        guidance_scale: float = 3.5,
        resolution_shift: bool = True,
        cache_text_states: bool | None = None,
        quantize_base: Literal["none", "8bit", "4bit"] = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_ranges("model", self.hparams)  # every method's numbers, before any weights load
        # Checkpoints hold only trainable weights (see on_save_checkpoint), so loading is non-strict.
        self.strict_loading = False
        self._generator: torch.Generator | None = None
        self._pending_rng_state: torch.Tensor | None = None
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._eval_cache: dict[tuple[str, str], torch.Tensor] = {}
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._text_path_trains_in_fit: bool | None = None
        self._module_dtypes: dict[str, torch.dtype] = {}
        self.configure_models()
        self.configure_trainable()
        self.configure_speed()

    # ----------------------------------------------------------------------------------------------- models
    def configure_models(self) -> None:
        """Load the frozen diffusers components (override :meth:`load_components` to use your own loader).

        Each component becomes an attribute under its diffusers pipeline name (``tokenizer``, ``text_encoder``,
        ``vae``, ``unet`` or ``transformer``...; the training scheduler is ``noise_scheduler``), and the family is
        :attr:`family`. ``tokenizer_2`` and ``text_encoder_2`` are ``None`` for SD 1.x and 2.x.
        """
        parts = self.load_components()
        self.family: ModelFamily = parts.family
        self.tokenizer_2 = self.text_encoder_2 = None
        for name, value in parts.components.items():
            setattr(self, "noise_scheduler" if name == "scheduler" else name, value)
        for name, tensor in self.family.module_buffers().items():
            self.register_buffer(name, tensor, persistent=False)

    def load_components(self) -> ModelParts:
        """The seam where the model parts come from (:func:`lightning_custom.families.load_model`)."""
        hp = self.hparams
        return load_model(
            hp.pretrained_model_name_or_path, revision=hp.revision, variant=hp.variant, weight_dtype=hp.weight_dtype,
            vae_name_or_path=hp.get("vae_name_or_path"), options=self.flow_matching_options(),
            quantize_denoiser=hp.get("quantize_base", "none"),
        )

    def flow_matching_options(self) -> FlowMatchingOptions:
        """The flow-model training settings from the hyperparameters (SD and SDXL ignore them)."""
        hp = self.hparams
        return FlowMatchingOptions(
            weighting_scheme=hp.get("weighting_scheme", "none"), logit_mean=hp.get("logit_mean", 0.0),
            logit_std=hp.get("logit_std", 1.0), mode_scale=hp.get("mode_scale", 1.29),
            guidance_scale=hp.get("guidance_scale", 3.5), resolution_shift=hp.get("resolution_shift", True),
        )

    def configure_speed(self) -> None:
        """Gradient checkpointing, memory format and compilation of the denoiser (after the trainables exist)."""
        hp = self.hparams
        if hp.get("gradient_checkpointing"):
            self.denoiser.enable_gradient_checkpointing()
        if hp.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if hp.compile_unet == "regional":
            self.denoiser.compile_repeated_blocks()
        elif hp.compile_unet == "full":
            self.denoiser.compile()

    @property
    def denoiser_name(self) -> str:
        """``"unet"`` (SD, SDXL) or ``"transformer"`` (FLUX, SD3): the attribute holding the denoiser."""
        return self.family.denoiser_name

    @property
    def denoiser(self) -> nn.Module:
        """The UNet or transformer that predicts the noise (or velocity)."""
        return getattr(self, self.family.denoiser_name)

    @property
    def is_sdxl(self) -> bool:
        """Whether the model is SDXL (two text encoders, pooled embedding and time ids in the UNet conditioning)."""
        return self.family.name == "sdxl"

    @property
    def text_path_trains(self) -> bool:
        """Whether anything outside the denoiser and VAE trains (text-encoder weights, LoRA or new token vectors)."""
        frozen_parts = (self.denoiser_name + ".", "vae.")
        return any(p.requires_grad for n, p in self.named_parameters() if not n.startswith(frozen_parts))

    def module_dtype(self, name: str) -> torch.dtype:
        """The dtype of submodule ``name`` (``"unet"``, ``"vae"``, ``"text_encoder"``...), read once.

        diffusers' ``ModelMixin.dtype`` walks every submodule (1.9 ms per call on SD 1.5, 5.5 ms with LoRA), too
        slow for every step. Moving the module (``.to()``, ``.half()``, Lightning's ``16-true``) clears the cache.
        """
        dtype = self._module_dtypes.get(name)
        if dtype is None:
            module = getattr(self, name)
            dtype = getattr(module, "dtype", None) or next(module.parameters()).dtype
            self._module_dtypes[name] = dtype
        return dtype

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> PersonalizationModule:
        self._module_dtypes = {}  # .to()/.half()/.float() may change them
        return super()._apply(fn, *args, **kwargs)

    def frozen_half_precision(self, name: str) -> contextlib.AbstractContextManager:
        """Run submodule ``name`` outside autocast when it is held in half precision (see :func:`autocast_off_for`)."""
        return autocast_off_for(self.module_dtype(name), self.device)

    @abstractmethod
    def configure_trainable(self) -> None:
        """Unfreeze or add the parameters this method trains."""

    @abstractmethod
    def export_artifacts(self, output_dir: Path) -> list[str]:
        """Write the method's diffusers-native artifacts into ``output_dir``; return their file names."""

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction, from the model's scheduler config; ``flow_matching`` for FLUX and SD3."""
        return "flow_matching" if self.family.is_flow else self.noise_scheduler.config.prediction_type

    def eval_batch_spec(self) -> EvalBatchSpec:
        """Latent shape, schedule length and the family's fixed noise levels, for the fixed evaluation batch."""
        channels, downsample = self.family.latent_spec(self.vae)
        return EvalBatchSpec(
            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
            latent_channels=channels,
            latent_downsample=downsample,
            noise_levels=self.family.fixed_noise_levels,
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def unet_conditioning(self, batch: dict[str, Any], text: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Keyword arguments of the denoiser besides the sample and the noise level (the family's).

        ``text`` is :meth:`encode_text` of the batch's captions (computed when not given). SDXL adds the pooled
        embedding and the time ids, per sample from the batch's ``original_size`` and ``crop_top_left`` and the
        size of its images.
        """
        if text is None:
            text = self.cached_text_states(batch) if self.caches_text_states() else self.encode_text(
                batch["caption"], batch_input_ids(batch))
        return self.family.denoiser_kwargs(self, text, batch)

    # ----------------------------------------------------------------------------------------------- losses
    def denoising_loss(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, Any],
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The family's loss: the denoiser's prediction on ``latents`` noised to ``timesteps`` (DDPM timesteps, or
        sigmas on flow models) against its target (noise, velocity...), weighted as in training."""
        return self.family.denoising_loss(self, latents, noise, timesteps, conditioning, reduction=reduction)

    def training_loss(self, batch: dict[str, Any], reduction: str = "mean") -> torch.Tensor:
        """The ordinary (noisy) diffusion loss: fresh VAE sample, noise and timesteps per step.

        ``reduction="none"`` returns one loss per sample (prior preservation splits instance and class samples).
        """
        latents, noise, timesteps = self.training_draws(batch)
        return self.denoising_loss(latents, noise, timesteps, self.unet_conditioning(batch), reduction=reduction)

    def training_draws(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training step's random inputs, drawn from :attr:`generator` in this order: the VAE latents' sample, the
        noise, the noise levels (timesteps, or sigmas on flow models)."""
        keys = batch.get("latent_key") if self.hparams.cache_latents else None
        latents = self.encode_latents(batch["pixel_values"], cache_keys=list(keys) if keys is not None else None)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        timesteps = self.family.sample_noise_levels(
            latents.shape[0], generator=self.generator, device=self.device, latent_size=tuple(latents.shape[-2:])
        )
        return latents, noise, timesteps

    @torch.no_grad()
    def deterministic_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """DVAR's L_det on a fixed evaluation batch (fixed images, captions, latents, noise and timesteps).

        Public so that the DVAR callback works with any module offering it, including your own subclass.
        """
        latents = self._eval_cached(
            "latents", batch.get("latents_cache_key"),
            lambda: self.encode_latents(batch["pixel_values"], batch["latent_noise"]),
        )
        text_key = None if self.text_path_trains else batch.get("text_cache_key")
        text = self._eval_cached("text", text_key, lambda: self.encode_text(batch["caption"]))
        conditioning = self.unet_conditioning(batch, text)
        return self.denoising_loss(latents, batch["noise"].to(latents), batch["timesteps"], conditioning)

    # ------------------------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimizer step's loss."""
        loss = self.training_loss(batch)
        self.log_training_losses({"train_loss": loss}, batch["pixel_values"].shape[0])
        return loss

    def log_training_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log the step's losses on the steps the loggers write (``log_every_n_steps``), with no host sync.

        Logging a tensor does not read it: the logger does, every ``log_every_n_steps``. ``prog_bar=True`` would
        read it after every batch (Lightning turns progress-bar metrics into Python numbers), a device sync per
        step, so the losses are not on the bar; a bar can show ``trainer.callback_metrics["train_loss"]`` when it
        refreshes. Skipping the other steps also skips ``self.log``'s own bookkeeping.
        """
        if self.logs_this_step():
            self.log_dict({name: loss.detach() for name, loss in losses.items()}, batch_size=batch_size)

    def logs_this_step(self) -> bool:
        """Whether the trainer's loggers write this training step (so that logging it is not wasted work)."""
        trainer = self._trainer
        if trainer is None or not trainer.loggers:
            return False
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Log DVAR's deterministic loss as ``dvar_loss`` (averaged over ranks, so every rank sees one value).

        With several concepts each fixed batch carries its concept's name, logged as ``dvar_loss/<name>``.
        """
        loss = self.deterministic_loss(batch)
        name = batch.get("concept")
        key = f"dvar_loss/{name}" if name else "dvar_loss"
        # logger=False: DVAREarlyStopping writes it to the loggers at the step it belongs to (Lightning would log
        # a validation inside training at the previous step's index: 4, 9, 14 for evaluations at 5, 10, 15)
        self.log(key, loss, prog_bar=True, sync_dist=True, batch_size=1, add_dataloader_idx=False, logger=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters, learning rate scaled by the effective batch."""
        hp = self.hparams
        lr = hp.learning_rate
        if hp.scale_lr and self._trainer is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            batch_size = getattr(datamodule, "batch_size", 1)
            lr = scale_learning_rate(lr, batch_size, self.trainer.accumulate_grad_batches, self.trainer.world_size)
        self.effective_learning_rate = lr
        params = self.trainable_parameters()
        kwargs = dict(lr=lr, betas=tuple(hp.adam_betas), eps=hp.adam_epsilon, weight_decay=hp.weight_decay)
        if hp.optimizer == "adamw_8bit":
            return adamw_8bit(params, **kwargs)
        fused = fused_adamw_applies(params, clips_gradients=self.clips_gradients())
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)

    def clips_gradients(self) -> bool:
        """Whether gradients are clipped before the optimizer step (the trainer's ``gradient_clip_val``)."""
        return self._trainer is not None and bool(self.trainer.gradient_clip_val)

    def setup(self, stage: str) -> None:
        """Hold the frozen weights in a dtype the trainer's precision runs on its device (float16 on a CPU does not;
        see :func:`~lightning_custom.runtime.precision.match_frozen_weights_to_precision`)."""
        if self._trainer is not None:
            device_type = self.trainer.strategy.root_device.type
            if match_frozen_weights_to_precision(self, self.trainer.precision, device_type):
                self._module_dtypes = {}  # the cached module dtypes changed
            datamodule = getattr(self.trainer, "datamodule", None)
            check_resolution(getattr(getattr(datamodule, "hparams", None), "resolution", None),
                             self.native_resolution(), str(self.hparams.pretrained_model_name_or_path))

    def native_resolution(self) -> int | None:
        """The image size the model was made for: its denoiser's latent ``sample_size`` x the VAE's downsampling
        (SD 1.5: 64 x 8 = 512; the embedded world model: 8 x 4 = 32); ``None`` when the config does not say."""
        sample_size = getattr(getattr(self.denoiser, "config", None), "sample_size", None)
        blocks = getattr(getattr(getattr(self, "vae", None), "config", None), "block_out_channels", None)
        if not isinstance(sample_size, int) or not blocks:
            return None
        return sample_size * 2 ** (len(blocks) - 1)
