"""Stable Diffusion 3 / 3.5 (Medium, Large): an MMDiT ``SD3Transformer2DModel`` trained by rectified flow.

Three text encoders, as ``StableDiffusion3Pipeline``: CLIP-L and CLIP-G (both ``CLIPTextModelWithProjection``),
whose penultimate hidden states are concatenated on the feature axis and padded to the transformer's
``joint_attention_dim``, then joined along the sequence with T5-XXL's states; the pooled condition is the two CLIP
projections side by side. T5 is optional (diffusers runs SD3 without it, on zeros in its place).

The objective is that of diffusers' ``examples/dreambooth/train_dreambooth_lora_sd3.py`` without
``--precondition_outputs``: ``x_t = (1 - sigma) x + sigma * noise``, the target ``noise - x``, the transformer
conditioned on the timestep ``1000 * sigma``; sigmas come from the scheduler's statically shifted schedule
(``shift=3.0``) by the density of ``weighting_scheme`` (:mod:`lightning_custom.objectives.flow_matching`). SD3 has no
resolution-dependent shift. Nothing here depends on the transformer's size: SD3.5 Medium's dual-attention and
QK-norm layers and SD3.5 Large use the same classes and code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lightning_custom.objectives import flow_matching
from lightning_custom.families.base import (
    FamilyHost,
    FlowMatchingOptions,
    ModelFamily,
    ModelParts,
    matches_flow_denoiser,
)


__all__ = ["LORA_COMPONENTS", "SD3Family", "T5_MAX_SEQUENCE_LENGTH", "peft_lora_keys"]

#: ``StableDiffusion3Pipeline``'s default ``max_sequence_length``: T5 tokens per caption, and the length of the
#: zeros that stand in for an absent T5.
T5_MAX_SEQUENCE_LENGTH = 256
#: The components whose LoRA ``StableDiffusion3Pipeline.load_lora_weights`` reads (T5 has no LoRA slot).
LORA_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")


class SD3Family(ModelFamily):
    """SD3 / SD3.5: CLIP-L + CLIP-G + optional T5, ``SD3Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler``."""

    name: ClassVar[str] = "sd3"
    pipeline_class_name: ClassVar[str] = "StableDiffusion3Pipeline"
    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2", "tokenizer_3")
    optional_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder_3",)
    #: diffusers' SD3 script trains LoRA on both CLIP encoders with --train_text_encoder, never on T5.
    trainable_text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    embedding_keys: ClassVar[tuple[str, ...]] = ("clip_l", "clip_g", "t5")
    # diffusers' train_dreambooth_lora_sd3.py defaults (--lora_layers unset): the joint attention of each block.
    lora_targets: ClassVar[tuple[str, ...]] = (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    )
    supports_custom_diffusion: ClassVar[bool] = False
    is_flow: ClassVar[bool] = True
    default_guidance_scale: ClassVar[float | None] = 7.0  # ``StableDiffusion3Pipeline``'s default

    # ------------------------------------------------------------------------------------------ detection
    @classmethod
    def matches(cls, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> bool:
        """An ``SD3Transformer2DModel`` with (where the model index names one) a flow-matching Euler scheduler."""
        return matches_flow_denoiser(model_index, denoiser_config, "SD3Transformer2DModel")

    @classmethod
    def load(
        cls, source: str, *, revision: str | None = None, variant: str | None = None,
        dtype: torch.dtype = torch.float32, vae_name_or_path: str | None = None,
        options: FlowMatchingOptions | None = None,
    ) -> ModelParts:
        """Loads every component, frozen, from a hub id or a folder (one-line errors).

        The transformer, the VAE and T5 are held in ``dtype``; both CLIP encoders in float32 (methods may train
        them). T5 (``text_encoder_3`` / ``tokenizer_3``) is ``None`` when the model index does not list it or the
        folder lacks it.
        """
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        from lightning_custom.families.components import freeze, load_component, load_vae, resolve_model_path
        from lightning_custom.families import read_model_configs

        source = resolve_model_path(source)
        index, _ = read_model_configs(source, revision)
        common = {"revision": revision}
        weights = {"variant": variant, **common}
        components: dict[str, Any] = {
            "transformer": load_component(SD3Transformer2DModel, source, "transformer", torch_dtype=dtype, **weights),
            "vae": (load_vae(vae_name_or_path, dtype, revision) if vae_name_or_path
                    else load_component(AutoencoderKL, source, "vae", torch_dtype=dtype, **weights)),
            "tokenizer": load_component(CLIPTokenizer, source, "tokenizer", **common),
            "text_encoder": load_component(CLIPTextModelWithProjection, source, "text_encoder", **weights),
            "tokenizer_2": load_component(CLIPTokenizer, source, "tokenizer_2", **common),
            "text_encoder_2": load_component(CLIPTextModelWithProjection, source, "text_encoder_2", **weights),
            "tokenizer_3": None,
            "text_encoder_3": None,
        }
        if _lists_part(source, index, "text_encoder_3") and _lists_part(source, index, "tokenizer_3"):
            components["tokenizer_3"] = load_component(AutoTokenizer, source, "tokenizer_3", **common)
            components["text_encoder_3"] = load_component(T5EncoderModel, source, "text_encoder_3",
                                                          torch_dtype=dtype, **weights)
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                freeze(module)
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, source, "scheduler", **common)
        components["scheduler"] = scheduler
        return ModelParts(cls(scheduler, options), components=components)

    # ---------------------------------------------------------------------------------------------- text
    def tokenizer_max_length(self, tokenizer_name: str, tokenizer: Any) -> int:
        """Token ids per caption: 77 for the CLIP tokenizers, ``min(256, model_max_length)`` for T5 (the pipeline's
        default ``max_sequence_length``)."""
        if tokenizer_name == "tokenizer_3":
            return min(T5_MAX_SEQUENCE_LENGTH, tokenizer.model_max_length)
        return tokenizer.model_max_length

    def encode_text(
        self, model: FamilyHost, input_ids: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``StableDiffusion3Pipeline.encode_prompt`` (``clip_skip=None``) on token ids.

        Args:
            model: Holds ``text_encoder``, ``text_encoder_2`` and ``text_encoder_3`` (may be ``None``).
            input_ids: CLIP-L, CLIP-G and (when T5 is loaded) T5 ids, each ``(B, max_length)``.

        Returns:
            ``encoder_hidden_states`` ``(B, 77 + T5 length, joint_attention_dim)`` and ``pooled_projections``
            ``(B, 2 * CLIP width)``, the transformer's keyword arguments.
        """
        present = self.present_text_encoders(model)
        if len(input_ids) != len(present):
            raise ValueError(f"SD3 needs one token-id tensor per text encoder {present}, got {len(input_ids)}")
        hidden_states, pooled = [], []
        for name, ids in zip(("text_encoder", "text_encoder_2"), input_ids):
            with model.frozen_half_precision(name):
                output = getattr(model, name)(ids.to(model.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])  # penultimate layer (clip_skip None)
            pooled.append(output.text_embeds)
        clip_states = torch.cat(hidden_states, dim=-1)
        joint_dim = model.transformer.config.joint_attention_dim
        if model.text_encoder_3 is not None:
            with model.frozen_half_precision("text_encoder_3"):
                t5_states = model.text_encoder_3(input_ids[2].to(model.device))[0]
        else:  # the pipeline's stand-in for a missing T5
            t5_states = clip_states.new_zeros(clip_states.shape[0], T5_MAX_SEQUENCE_LENGTH, joint_dim)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip_states, t5_states], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def denoiser_kwargs(
        self, model: FamilyHost, text: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, Any]:
        """``encoder_hidden_states`` and ``pooled_projections`` (SD3 has no size or guidance conditioning)."""
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "pooled_projections": text["pooled_projections"]}

    # ------------------------------------------------------------------------------------------ noise levels
    def sample_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, device: torch.device,
        latent_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Training sigmas ``(B,)``: the density of ``weighting_scheme`` on the shifted schedule, drawn on the
        generator's device and returned on ``device``. ``latent_size`` is unused (SD3 has no resolution shift)."""
        _, sigmas = flow_matching.sample_sigmas(self.scheduler, batch_size, generator=generator,
                                                **self.options.density_kwargs())
        return sigmas.to(device)

    def fixed_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, latent_size: tuple[int, int] | None = None,
        resample: bool = False,
    ) -> torch.Tensor:
        """DVAR's fixed sigmas (B distinct, from the training density and shift), CPU float32 ``(B,)``.

        ``resample=True`` draws them like training (:meth:`sample_noise_levels`), repeats allowed.
        """
        draw = flow_matching.sample_sigmas if resample else flow_matching.fixed_evaluation_sigmas
        _, sigmas = draw(self.scheduler, batch_size, generator=generator, **self.options.density_kwargs())
        return sigmas.float().cpu()

    # ----------------------------------------------------------------------------------------------- loss
    def denoising_loss(
        self, model: FamilyHost, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
        conditioning: dict[str, Any], reduction: str = "mean",
    ) -> torch.Tensor:
        """Weighted velocity MSE of the transformer (diffusers' SD3 script, no preconditioning).

        Args:
            model: Holds ``transformer``; its ``module_dtype`` / ``frozen_half_precision`` set the precision.
            latents: Scaled latents ``(B, C, h, w)``.
            noise: Standard normal noise, same shape.
            levels: Sigmas ``(B,)`` in (0, 1].
            conditioning: :meth:`denoiser_kwargs`.
            reduction: ``"mean"`` or ``"none"`` (one loss per sample).

        Returns:
            A float32 scalar, or ``(B,)`` for ``reduction="none"``.
        """
        sigmas = levels.to(device=latents.device, dtype=torch.float32)
        noisy = flow_matching.noisy_model_input(latents.float(), noise.float(), sigmas)
        # The scheduler's timesteps are sigma * num_train_timesteps; kept float32 as diffusers' script passes them.
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        dtype = model.module_dtype("transformer")
        kwargs = {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                  for key, value in conditioning.items()}
        with model.frozen_half_precision("transformer"):
            prediction = model.transformer(hidden_states=noisy.to(dtype), timestep=timesteps, return_dict=False,
                                           **kwargs)[0]
        target = flow_matching.flow_matching_target(latents.float(), noise.float())
        weighting = flow_matching.loss_weighting(self.options.weighting_scheme, sigmas)
        losses = flow_matching.weighted_mse(prediction, target, weighting)
        if reduction == "none":
            return losses
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return losses.mean()

    # ---------------------------------------------------------------------------------------------- pipeline
    def pipeline(self, parts: Any, scheduler: Any | None = None) -> Any:
        """A ``StableDiffusion3Pipeline`` around the live components (no copies); T5 may be ``None``.

        ``scheduler`` defaults to a fresh copy of the training scheduler's config (sampling changes its state).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        return StableDiffusion3Pipeline(
            transformer=parts.transformer, scheduler=scheduler, vae=parts.vae,
            text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
            text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
            text_encoder_3=getattr(parts, "text_encoder_3", None), tokenizer_3=getattr(parts, "tokenizer_3", None),
        )

    def save_lora(self, output_dir: Any, weight_name: str, layers: dict[str, dict[str, torch.Tensor]],
                  metadata: dict[str, dict[str, Any]]) -> None:
        """Writes ``output_dir/weight_name`` with ``StableDiffusion3Pipeline.save_lora_weights`` (atomically).

        ``layers`` may hold ``transformer``, ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (CLIP-G): the parts
        ``StableDiffusion3Pipeline.load_lora_weights`` puts back. Keys are written in peft's naming, as diffusers'
        SD3 script saves them (:func:`peft_lora_keys`).

        Raises:
            ValueError: For any other component (T5 has no LoRA slot in diffusers' SD3 loader) or no layers.
        """
        from diffusers import StableDiffusion3Pipeline

        from lightning_custom.runtime.io import atomic_path

        unknown = sorted(set(layers) - set(LORA_COMPONENTS))
        if unknown or not layers:
            raise ValueError(f"SD3 LoRA files hold {list(LORA_COMPONENTS)}; got {sorted(layers)}")
        kwargs: dict[str, Any] = {}
        for name, weights in layers.items():
            kwargs[f"{name}_lora_layers"] = peft_lora_keys(weights)
            if metadata.get(name) is not None:
                kwargs[f"{name}_lora_adapter_metadata"] = metadata[name]
        with atomic_path(Path(output_dir) / weight_name) as tmp:
            StableDiffusion3Pipeline.save_lora_weights(str(tmp.parent), weight_name=tmp.name, **kwargs)


def peft_lora_keys(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA weights under peft's ``lora_A`` / ``lora_B`` names (undoing ``convert_state_dict_to_diffusers``).

    diffusers' SD3 and FLUX scripts save ``get_peft_model_state_dict`` as is. The SD-style diffusers naming
    (``to_q.lora.down``, ``q_proj.lora_linear_layer.up``) must not reach a transformer: its loader converts a state
    dict only when the *first* key lacks ``lora_A``, so a mix of both namings silently drops the renamed layers.
    """
    renames = ((".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),
               (".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."))
    converted = {}
    for key, value in layers.items():
        for old, new in renames:
            key = key.replace(old, new)
        converted[key] = value
    return converted


def _lists_part(source: str, model_index: dict[str, Any], name: str) -> bool:
    """Whether the checkpoint has component ``name``: listed (not ``[null, null]``) in the model index and, for a
    folder, present as a subfolder; a folder without a model index only needs the subfolder."""
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / name).is_dir():
        return False
    if not model_index:
        return folder.is_dir()
    entry = model_index.get(name)
    return bool(entry) and all(part is not None for part in entry)
