"""FLUX.1 (dev and schnell): a rectified-flow MMDiT conditioned on CLIP-L's pooled output and T5's states.

Everything follows diffusers' own FLUX code: ``FluxPipeline.encode_prompt`` for the text states, and
``examples/dreambooth/train_dreambooth_lora_flux.py`` for the objective (2x2 latent packing, ``timestep = sigma``,
the guidance input of FLUX.1-dev, velocity target ``noise - x``, ``compute_loss_weighting_for_sd3``). The math lives
in :mod:`lightning_custom.objectives.flow_matching`; this module wires it to the components.

Unlike SD3, FLUX cannot encode a prompt without T5 (its transformer reads only T5's states as the text sequence),
so a checkpoint without ``text_encoder_2`` is refused with a one-line error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_custom.objectives import flow_matching as fm
from lightning_custom.errors import UserInputError
from lightning_custom.families.base import (
    FamilyHost,
    FlowMatchingOptions,
    ModelFamily,
    ModelParts,
    matches_flow_denoiser,
)


__all__ = ["FluxFamily", "FLUX_LORA_TARGETS", "T5_MAX_SEQUENCE_LENGTH"]

#: diffusers' ``train_dreambooth_lora_flux.py`` default ``--lora_layers`` (the double-stream blocks' attention and
#: feed-forward layers; the single-stream blocks' ``attn.to_q/k/v`` match ``attn.to_*`` too).
FLUX_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
#: ``FluxPipeline``'s ``max_sequence_length`` default (FLUX.1-dev; schnell was trained with 256 but accepts 512).
T5_MAX_SEQUENCE_LENGTH = 512
_ARGUMENT = "--model.pretrained_model_name_or_path"


class FluxFamily(ModelFamily):
    """FLUX.1: ``FluxTransformer2DModel`` + ``FlowMatchEulerDiscreteScheduler`` (dynamic shifting), CLIP-L + T5.

    Noise levels are sigmas in (0, 1]; the transformer is given them as its ``timestep`` (it multiplies by 1000
    itself, as diffusers' FLUX script passes ``timesteps / 1000``).
    """

    name: ClassVar[str] = "flux"
    pipeline_class_name: ClassVar[str] = "FluxPipeline"
    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    optional_text_encoders: ClassVar[tuple[str, ...]] = ()
    embedding_keys: ClassVar[tuple[str, ...]] = ("clip_l", "t5")
    lora_targets: ClassVar[tuple[str, ...]] = FLUX_LORA_TARGETS
    supports_custom_diffusion: ClassVar[bool] = False
    is_flow: ClassVar[bool] = True
    #: ``FluxPipeline``'s default: the value of FLUX.1-dev's distilled guidance input.
    default_guidance_scale: ClassVar[float | None] = 3.5

    # ------------------------------------------------------------------------------------------ detection
    @classmethod
    def matches(cls, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> bool:
        """A ``FluxTransformer2DModel`` denoiser, with a ``FlowMatchEulerDiscreteScheduler`` where the index names one."""
        return matches_flow_denoiser(model_index, denoiser_config, "FluxTransformer2DModel")

    @classmethod
    def load(
        cls, source: str, *, revision: str | None = None, variant: str | None = None,
        dtype: torch.dtype = torch.float32, vae_name_or_path: str | None = None,
        options: FlowMatchingOptions | None = None,
    ) -> ModelParts:
        """Loads every FLUX part from a hub id or a folder, frozen.

        The transformer, the VAE and T5 are held in ``dtype`` (T5 is 4.7B parameters; Textual Inversion on it trains
        separate fp32 vectors); CLIP-L stays float32 because methods may train it.

        Raises:
            UserInputError: one line naming the source when a part cannot be loaded or T5 is missing.
        """
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        from lightning_custom.families.components import freeze, load_component, load_vae

        _require_t5(source, revision)
        common = {"revision": revision}
        transformer = load_component(FluxTransformer2DModel, source, "transformer", variant=variant,
                                     torch_dtype=dtype, **common)
        if vae_name_or_path:
            vae = load_vae(vae_name_or_path, dtype, revision)
        else:
            vae = load_component(AutoencoderKL, source, "vae", variant=variant, torch_dtype=dtype, **common)
        text_encoder = load_component(CLIPTextModel, source, "text_encoder", variant=variant,
                                      torch_dtype=torch.float32, **common)
        text_encoder_2 = load_component(T5EncoderModel, source, "text_encoder_2", variant=variant,
                                        torch_dtype=dtype, **common)
        tokenizer = load_component(CLIPTokenizer, source, "tokenizer", **common)
        tokenizer_2 = load_component(AutoTokenizer, source, "tokenizer_2", **common)
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, source, "scheduler", **common)
        for module in (transformer, vae, text_encoder, text_encoder_2):
            freeze(module)
        components = {
            "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "scheduler": scheduler,
        }
        return ModelParts(cls(scheduler, options), components=components)

    # ---------------------------------------------------------------------------------------------- text
    def tokenizer_max_length(self, tokenizer_name: str, tokenizer: Any) -> int:
        """Token ids per prompt: CLIP's ``model_max_length`` (77); T5 ``min(512, model_max_length)`` as FLUX.1-dev."""
        if tokenizer_name == "tokenizer_2":
            return min(T5_MAX_SEQUENCE_LENGTH, tokenizer.model_max_length)
        return tokenizer.model_max_length

    def encode_text(self, model: FamilyHost, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """CLIP-L's pooled output and T5's last hidden state, as ``FluxPipeline.encode_prompt``.

        Args:
            model: Provides ``text_encoder`` (CLIP-L), ``text_encoder_2`` (T5) and ``frozen_half_precision``.
            input_ids: ``[clip_ids (B, 77), t5_ids (B, L)]``, padded to max length.

        Returns:
            ``{"pooled_projections": (B, 768), "encoder_hidden_states": (B, L, 4096)}`` in each encoder's dtype.
        """
        if len(input_ids) != 2:
            raise ValueError(f"FLUX encodes CLIP-L and T5 token ids; got {len(input_ids)} tensor(s)")
        clip_ids, t5_ids = input_ids
        with model.frozen_half_precision("text_encoder"):
            clip_out = model.text_encoder(clip_ids.to(model.device), output_hidden_states=False)
        with model.frozen_half_precision("text_encoder_2"):
            t5_states = model.text_encoder_2(t5_ids.to(model.device), output_hidden_states=False)[0]
        return {"pooled_projections": clip_out.pooler_output, "encoder_hidden_states": t5_states}

    def denoiser_kwargs(
        self, model: FamilyHost, text: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, Any]:
        """``encoder_hidden_states``, ``pooled_projections``, ``txt_ids`` (zeros) and, for FLUX.1-dev, ``guidance``."""
        states = text["encoder_hidden_states"]
        kwargs: dict[str, Any] = {
            "encoder_hidden_states": states,
            "pooled_projections": text["pooled_projections"],
            "txt_ids": torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype),
        }
        guidance = fm.flux_guidance(bool(model.transformer.config.guidance_embeds), states.shape[0],
                                    self.options.guidance_scale, device=states.device)
        if guidance is not None:
            kwargs["guidance"] = guidance
        return kwargs

    # ------------------------------------------------------------------------------------------ noise levels
    def _image_seq_len(self, latent_size: tuple[int, int]) -> int | None:
        return fm.packed_sequence_length(*latent_size) if self.options.resolution_shift else None

    def sample_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, device: torch.device, latent_size: tuple[int, int]
    ) -> torch.Tensor:
        """Training sigmas ``(B,)`` from the weighting scheme's density, resolution-shifted when configured."""
        _, sigmas = fm.sample_sigmas(self.scheduler, batch_size, generator=generator,
                                     image_seq_len=self._image_seq_len(latent_size), **self.options.density_kwargs())
        return sigmas.to(device=device, dtype=torch.float32)

    def fixed_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, latent_size: tuple[int, int], resample: bool = False
    ) -> torch.Tensor:
        """DVAR's B distinct fixed sigmas from the training density and shift (CPU float32 ``(B,)``)."""
        draw = fm.sample_sigmas if resample else fm.fixed_evaluation_sigmas
        _, sigmas = draw(self.scheduler, batch_size, generator=generator,
                         image_seq_len=self._image_seq_len(latent_size), **self.options.density_kwargs())
        return sigmas.to(device="cpu", dtype=torch.float32)

    # ----------------------------------------------------------------------------------------------- loss
    def denoising_loss(
        self, model: FamilyHost, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
        conditioning: dict[str, Any], reduction: str = "mean",
    ) -> torch.Tensor:
        """Weighted velocity MSE of the transformer on packed ``x_t = (1 - s) x + s noise`` (diffusers' FLUX script).

        Args:
            model: Provides ``transformer``, ``module_dtype`` and ``frozen_half_precision``.
            latents: Scaled, unpacked latents ``(B, C, h, w)``.
            noise: Same shape.
            levels: Sigmas ``(B,)``.
            conditioning: :meth:`denoiser_kwargs`' output.
            reduction: ``"mean"`` or ``"none"`` (per-sample losses).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        dtype = model.module_dtype("transformer")
        transformer = model.transformer
        batch, _, height, width = latents.shape
        sigmas = levels.to(device=latents.device, dtype=torch.float32)
        noisy = fm.noisy_model_input(latents, noise, sigmas)
        kwargs = {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                  for key, value in conditioning.items()}
        if "guidance" not in kwargs:
            guidance = fm.flux_guidance(bool(transformer.config.guidance_embeds), batch, self.options.guidance_scale,
                                        device=latents.device)
            if guidance is not None:
                kwargs["guidance"] = guidance.to(dtype)
        image_ids = fm.latent_image_ids(height, width, device=latents.device, dtype=dtype)
        with model.frozen_half_precision("transformer"):
            prediction = transformer(
                hidden_states=fm.pack_latents(noisy).to(dtype), timestep=sigmas.to(dtype), img_ids=image_ids,
                return_dict=False, **kwargs,
            )[0]
        prediction = fm.unpack_latents(prediction, height, width)
        target = fm.flow_matching_target(latents, noise)
        weighting = fm.loss_weighting(self.options.weighting_scheme, sigmas)
        losses = fm.weighted_mse(prediction, target, weighting)
        return losses if reduction == "none" else losses.mean()

    # ---------------------------------------------------------------------------------------------- pipeline
    def pipeline(self, parts: Any, scheduler: Any | None = None) -> Any:
        """A ``FluxPipeline`` around the live components; by default a fresh copy of the training scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        return FluxPipeline(
            scheduler=scheduler, vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
            text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2, transformer=parts.transformer,
        )

    def save_lora(self, output_dir: Any, weight_name: str, layers: dict[str, dict[str, torch.Tensor]],
                  metadata: dict[str, dict[str, Any]]) -> None:
        """Writes ``weight_name`` with ``FluxPipeline.save_lora_weights`` (transformer and CLIP-L adapters).

        diffusers' FLUX LoRA format has no T5 part, so a ``text_encoder_2`` adapter is refused.
        """
        from diffusers import FluxPipeline

        from lightning_custom.runtime.io import atomic_path

        unknown = sorted(set(layers) - {"transformer", "text_encoder"})
        if unknown:
            raise UserInputError(f"--model.init_args: FLUX LoRA files hold the transformer and text_encoder (CLIP-L) "
                                 f"only; cannot save {unknown}")
        kwargs: dict[str, Any] = {}
        for name in ("transformer", "text_encoder"):
            if name in layers:
                kwargs[f"{name}_lora_layers"] = layers[name]
                if name in metadata:
                    kwargs[f"{name}_lora_adapter_metadata"] = metadata[name]
        with atomic_path(Path(output_dir) / weight_name) as tmp:
            FluxPipeline.save_lora_weights(str(tmp.parent), weight_name=tmp.name, **kwargs)


def _require_t5(source: str, revision: str | None) -> None:
    """FLUX cannot encode prompts without T5: refuse a folder (or hub model index) that has no ``text_encoder_2``."""
    path = Path(source).expanduser()
    if path.is_dir():
        missing = not (path / "text_encoder_2").is_dir() or not (path / "tokenizer_2").is_dir()
    else:
        from lightning_custom.families import read_model_configs

        index, _ = read_model_configs(source, revision)
        missing = any(not index.get(name) or index[name][-1] is None for name in ("text_encoder_2", "tokenizer_2"))
    if missing:
        raise UserInputError(f"{_ARGUMENT}: {source} has no T5 text encoder (text_encoder_2 / tokenizer_2); FLUX "
                             f"needs T5 to encode prompts")
