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
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_custom.components import WeightDtype, match_frozen_weights_to_precision
from lightning_custom.data.concept import EvalBatchSpec
from lightning_custom.diffusion import sample_latents, scale_learning_rate
from lightning_custom.errors import UserInputError
from lightning_custom.ranges import check_ranges
from lightning_custom.families import FlowMatchingOptions, ModelFamily, ModelParts, load_model
from lightning_custom.flow_matching import WeightingScheme
from lightning_custom.methods.tokens import CaptionTokenizer, batch_input_ids, tokenize_captions

log = logging.getLogger(__name__)

_RNG_KEY = "lightning_custom_train_rng"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def adamw_8bit(params: list[nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (optimizer states in 8 bits), with a one-line error where it is missing."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise UserInputError("--model.optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes") from err
    return bnb.optim.AdamW8bit(params, **kwargs)


def fused_adamw_applies(params: list[torch.Tensor], *, clips_gradients: bool) -> bool:
    """Whether to use AdamW's fused kernel, which updates every parameter in one launch.

    It needs every parameter on CUDA in fp32. It also unscales fp16 gradients itself, so Lightning's mixed
    precision refuses to clip gradients before it ("does not allow for gradient clipping"): clipped runs use the
    foreach implementation instead.
    """
    return bool(params) and not clips_gradients and all(p.is_cuda and p.dtype == torch.float32 for p in params)


class PersonalizationModule(L.LightningModule, ABC):
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
    def text_encoder_names(self) -> list[str]:
        """Attribute names of the loaded text encoders, in the pipeline's order (an absent optional one skipped)."""
        return self.family.present_text_encoders(self)

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoder(s): one for SD 1.x / 2.x, two for SDXL and FLUX, two or three for SD3."""
        return [getattr(self, name) for name in self.text_encoder_names]

    @property
    def trainable_text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders ``train_text_encoder`` trains, by pipeline name (CLIP ones; never T5).

        Raises:
            UserInputError: on a family that trains none (Z-Image, FLUX.2 [klein], Qwen-Image: their Qwen encoders
                have no slot in the LoRA format and diffusers' scripts never train them), instead of training
                nothing more in silence.
        """
        if not self.family.trainable_text_encoder_names:
            raise UserInputError(f"--model.init_args.train_text_encoder: {self.family.name} models train no text "
                                 f"encoder (diffusers' scripts never train it, and its pipeline's LoRA files have no "
                                 f"slot for it); set it to false")
        return {name: getattr(self, name) for name in self.family.trainable_text_encoder_names
                if getattr(self, name, None) is not None}

    @property
    def tokenizers(self) -> list[Any]:
        """The tokenizer of each text encoder."""
        return [getattr(self, name) for name in self.family.present_tokenizers(self)]

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

    # --------------------------------------------------------------------------------------------- encoding
    def prepare_captions(self, captions: list[str]) -> list[str]:
        """Hook to rewrite captions before tokenizing (e.g. expand a multi-vector placeholder)."""
        return captions

    def tokenize(self, captions: list[str], tokenizer: Any = None) -> torch.Tensor:
        """Token ids padded to the pipeline's length for ``tokenizer`` (default the first), as pipelines do."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        return tokenize_captions(tokenizer, self.prepare_captions(list(captions)),
                                 self.token_max_length(tokenizer)).to(self.device)

    def token_max_length(self, tokenizer: Any) -> int:
        """The padded caption length of ``tokenizer`` (CLIP 77; T5 256 for SD3, 512 for FLUX)."""
        names = self.family.present_tokenizers(self)
        name = next((n for n in names if getattr(self, n) is tokenizer), names[0])
        return self.family.tokenizer_max_length(name, tokenizer)

    def caption_tokenizer(self) -> CaptionTokenizer:
        """What the data loader's collate calls to tokenize the batch's captions (``input_ids``, ``input_ids_2``).

        Tokenizing in the loader (in its workers, when it has some) takes it off the training step; the data
        module asks for this at setup. Captions go through :meth:`prepare_captions` first.
        """
        return CaptionTokenizer(self.tokenizers, self.prepare_captions,
                                [self.token_max_length(tokenizer) for tokenizer in self.tokenizers])

    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder hidden states for ``captions`` (the UNet's cross-attention context).

        For SDXL, both encoders' penultimate hidden states, concatenated (as ``StableDiffusionXLPipeline``).
        """
        return self.encode_text(captions)["encoder_hidden_states"]

    def encode_text(
        self, captions: list[str], input_ids: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The text part of the denoiser's conditioning (the family's: SD ``encoder_hidden_states``, SDXL adds the
        pooled ``text_embeds``, FLUX and SD3 their prompt and pooled embeddings).

        ``input_ids`` (one tensor per text encoder, e.g. from the data loader) spares tokenizing ``captions``.
        """
        if input_ids is None:
            input_ids = [self.tokenize(captions, tokenizer) for tokenizer in self.tokenizers]
        return self.family.encode_text(self, [ids.to(self.device) for ids in input_ids])

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

    def caches_text_states(self) -> bool:
        """Whether training reuses text states (``cache_text_states``; never while the text path trains)."""
        wanted = self.hparams.get("cache_text_states")
        wanted = self.family.is_flow if wanted is None else wanted
        if not wanted:
            return False
        if self._text_path_trains_in_fit is None:  # walking every parameter each step would cost ms on FLUX
            return not self.text_path_trains
        return not self._text_path_trains_in_fit

    def cached_text_states(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's text states, each caption encoded alone on first sight and then reused.

        Keyed by the caption text: every caption of a run is one of the templates with the concept's words, so the
        cache holds a few dozen entries.
        """
        captions = list(batch["caption"])
        missing = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        for caption in missing:
            with torch.no_grad():
                states = self.encode_text([caption])
            self._text_cache[caption] = {k: v.detach() for k, v in states.items()}
        rows = [self._text_cache[c] for c in captions]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    def encode_latents(
        self,
        pixel_values: torch.Tensor,
        standard_normal: torch.Tensor | None = None,
        cache_keys: list[str] | None = None,
    ) -> torch.Tensor:
        """VAE latents, scaled: ``(mean + std * eps) * scaling_factor``.

        ``standard_normal`` fixes ``eps`` (DVAR's fixed latents); otherwise it is drawn from the training generator.
        With ``cache_keys`` (one name per augmented image), each image's latent distribution is encoded once, alone,
        and reused: the VAE is frozen, and encoding one image at a time makes the cached values independent of
        which images happen to share a batch.
        """
        with torch.no_grad():
            if cache_keys is not None:
                mean, std = self._cached_latent_distribution(pixel_values, cache_keys)
            else:
                with self.frozen_half_precision("vae"):
                    mean, std = self.family.latent_distribution(self.vae, pixel_values.to(self.module_dtype("vae")))
            if standard_normal is None:
                standard_normal = torch.randn(mean.shape, generator=self.generator, device=self.device)
            latents = sample_latents(mean, std, standard_normal)
        return self.family.scale_latents(self.vae, latents)

    def _cached_latent_distribution(
        self, pixel_values: torch.Tensor, keys: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for index, key in enumerate(keys):
            if key not in self._latent_cache:
                with self.frozen_half_precision("vae"):
                    mean, std = self.family.latent_distribution(
                        self.vae, pixel_values[index : index + 1].to(self.module_dtype("vae")))
                self._latent_cache[key] = (mean[0], std[0])
        pairs = [self._latent_cache[key] for key in keys]
        return torch.stack([m for m, _ in pairs]).to(self.device), torch.stack([s for _, s in pairs]).to(self.device)

    def _eval_cached(self, kind: str, key: str | None, compute) -> Any:
        """``compute()`` once per ``(kind, key)`` when evaluation caching is on and ``key`` is given."""
        if key is None or not self.hparams.cache_eval_batch:
            return compute()
        if (kind, key) not in self._eval_cache:
            self._eval_cache[(kind, key)] = compute()
        return self._eval_cache[(kind, key)]

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

    @property
    def generator(self) -> torch.Generator:
        """The training RNG: seeded per rank, saved in checkpoints, never shared with DVAR's fixed batch."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.hparams.seed + self.global_rank)
            if self._pending_rng_state is not None:
                state = rank_generator_state(self._pending_rng_state, self.global_rank)
                if state is not None:
                    self._generator.set_state(state)
                self._pending_rng_state = None
        return self._generator

    def setup(self, stage: str) -> None:
        """Hold the frozen weights in a dtype the trainer's precision runs on its device (float16 on a CPU does not;
        see :func:`~lightning_custom.components.match_frozen_weights_to_precision`)."""
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

    def generator_states(self) -> list[torch.Tensor]:
        """Every rank's training-RNG state, indexed by global rank (call it on all ranks: under DDP it gathers).

        Each rank draws its own noise, timesteps and VAE samples, so an exact resume needs each rank's state back.
        """
        state = self.generator.get_state()
        if self._trainer is None or self.trainer.world_size == 1:
            return [state]
        # Gathered on the module's device: NCCL only moves CUDA tensors. Each row is copied out of the gathered
        # stack: Generator.set_state reads from the start of the storage, so a row view crashes or restores garbage.
        return [row.cpu().clone() for row in self.all_gather(state.to(self.device))]

    def on_fit_start(self) -> None:
        """Start each fit with empty latent caches (a notebook may fit one module on several concepts).

        The cache keys name the images and draws they came from, so this is for memory, and for a VAE or text
        encoder swapped between fits.
        """
        self._latent_cache.clear()
        self._eval_cache.clear()
        self._text_cache.clear()
        self._text_path_trains_in_fit = self.text_path_trains

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights (a checkpoint of a full SD model per save would be GBs) and each rank's RNG.

        Lightning calls this on every rank (only rank 0 writes the file), so the ranks' RNG states are gathered.
        """
        trainable = self.trained_weight_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint[_RNG_KEY] = self.generator_states()

    def trained_weight_names(self) -> set[str]:
        """The names of the weights this run trains, as its checkpoints store them."""
        from lightning_custom.strategies import plain_parameter_name  # FSDP prefixes the wrapped blocks' names

        return {plain_parameter_name(name) for name, p in self.named_parameters() if p.requires_grad}

    def check_checkpoint_weights(self, saved: Any) -> None:
        """Refuse, in one line, a checkpoint that lacks weights this run trains.

        Checkpoints leave the frozen model out, so ``strict_loading`` is off, and Lightning would resume from such a
        checkpoint (another method's, another model's) silently with the base weights: a run calling itself resumed
        that is not.

        Args:
            saved: the checkpoint's ``state_dict`` (or its keys).
        """
        trained = self.trained_weight_names()
        missing = sorted(trained - set(saved))
        if missing:
            where = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            raise UserInputError(f"--ckpt_path {where}: the checkpoint lacks {len(missing)} of the {len(trained)} "
                                 f"weights this run trains (e.g. {missing[0]}); it was saved by another method, "
                                 "model or setting")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint holds every trained weight, and restore the training RNG so a resumed run draws the
        same noise as an uninterrupted one, on every rank."""
        if "state_dict" in checkpoint:  # FSDP has taken it out already: its strategy checks it (strategies.py)
            self.check_checkpoint_weights(checkpoint["state_dict"])
        if _RNG_KEY in checkpoint:
            states = checkpoint[_RNG_KEY]
            saved = 1 if torch.is_tensor(states) else len(states)
            world_size = self.trainer.world_size if self._trainer is not None else 1
            if saved != world_size:
                rank_zero_warn(f"the checkpoint holds the training RNG of {saved} process(es) and this run has "
                               f"{world_size}: the resumed run will not repeat the uninterrupted one exactly")
            self._pending_rng_state = states
            self._generator = None


RESOLUTION_LIMIT = 4  # x the model's own size: beyond, a step costs (limit^2)x more and the model sees nothing it knows


def check_resolution(resolution: int | None, native: int | None, model: str) -> None:
    """Refuse a training resolution far above the model's own (``RESOLUTION_LIMIT`` x) in one line, before the
    first step (2048 px on the 32 px embedded model sat at step 0 for minutes); warn above 2x."""
    if not resolution or not native:
        return
    if resolution > RESOLUTION_LIMIT * native:
        raise UserInputError(
            f"--data.resolution: {resolution} px is {resolution / native:.0f}x the {native} px that {model} was made "
            f"for (its config's sample size); train at {native} px (or up to {RESOLUTION_LIMIT * native})")
    if resolution > 2 * native:
        log.warning("--data.resolution: %d px is %.1fx the %d px that %s was made for; each step costs about "
                    "%.0fx more than at its own size", resolution, resolution / native, native, model,
                    (resolution / native) ** 2)


def autocast_off_for(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(enabled=False)`` when autocast is on and ``dtype`` is fp16/bf16; a no-op otherwise.

    A frozen model held in half precision gains nothing from autocast: its matmuls and convolutions already run in
    half precision, and autocast only adds casts and upcasts every norm's output to fp32, which doubles the bytes
    the elementwise ops after it move (SD 1.5 at CUDA's cast rules: 4095 ops per step inside autocast, 3389 outside;
    ``benchmarks/throughput.py --profile-ops``). diffusers' examples keep their fp16 UNet outside autocast too. The
    caller casts the inputs to ``dtype``; fp32 trainables inside (LoRA, Custom Diffusion's K/V) cast their own
    input and output, so their gradients stay fp32.
    """
    if dtype in _HALF_DTYPES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def rank_generator_state(states: torch.Tensor | list[torch.Tensor], rank: int) -> torch.Tensor | None:
    """Rank ``rank``'s saved RNG state: ``states`` is one per rank (a bare tensor: rank 0's, older checkpoints).

    ``None`` (keep the fresh seed) for a rank the checkpoint has no state for: resuming on more processes than
    were saved cannot be exact, but giving that rank another rank's state would repeat that rank's noise.
    """
    states = [states] if torch.is_tensor(states) else list(states)
    return states[rank] if rank < len(states) else None

