"""FLUX.2 [klein] (black-forest-labs/FLUX.2-klein-4B, -9B and their base models): a rectified-flow MMDiT conditioned
on three stacked hidden layers of a Qwen3 causal LM.

Everything follows diffusers' own FLUX.2 code:

* text states as ``Flux2KleinPipeline._get_qwen3_prompt_embeds``: the caption as one user message through the chat
  template with ``enable_thinking=False``, padded to ``max_sequence_length`` (512) with its attention mask, the
  ``Qwen3ForCausalLM`` run with that mask, hidden states ``(9, 18, 27)`` stacked and laid side by side per token
  (``(B, L, 3 * D)``), and 4-axis text position ids ``(0, 0, 0, l)`` (``_prepare_text_ids``). diffusers'
  ``train_dreambooth_lora_flux2_klein.py`` defaults ``--text_encoder_out_layers`` to ``10 20 30`` instead; this
  package keeps the pipeline's layers so that the stock pipeline samples with the states the LoRA was trained on;
* latents as that script: the VAE's (``AutoencoderKLFlux2``) latents patchified 2x2 into 4x the channels
  (``_patchify_latents``) and normalized by the VAE's batch-norm running statistics, ``(z - mean) / sqrt(var +
  eps)``; they are packed to ``(B, h * w, C)`` tokens (``_pack_latents``) with ``(0, row, col, 0)`` position ids
  (``_prepare_latent_ids``) for the transformer, and unpacked after;
* the objective as the script: sigmas from ``compute_density_for_timestep_sampling`` on the scheduler's own training
  schedule (FLUX.2's scheduler shifts dynamically, so the training schedule is unshifted, as the script trains; the
  pipeline's ``compute_empirical_mu`` shift is applied at inference only), ``timestep = t / 1000``, ``guidance`` only
  where the transformer has guidance embeddings (klein has none), target ``noise - x`` weighted by
  ``compute_loss_weighting_for_sd3``;
* LoRA on the script's default targets: ``to_k``, ``to_q``, ``to_v``, ``to_out.0`` (double-stream attention),
  ``to_qkv_mlp_proj`` and ``single_transformer_blocks.{i}.attn.to_out`` for the first 24 single-stream blocks (those
  the model has), saved with ``Flux2KleinPipeline.save_lora_weights``.

FLUX.2 [dev] (``Flux2Pipeline``, a Mistral text encoder) is not covered here: it needs its own text path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from lightning_custom.families.base import FamilyHost, FlowMatchingOptions, ModelParts
from lightning_custom.families.qwen_flow import QwenFlowFamily
from lightning_custom.families.qwen_text import chat_prompt, padding_mask, set_prompt_format
from lightning_custom.synthetic.toy_flow_2026 import (  # noqa: F401 - re-exported
    FLUX2_SCHEDULER,
    build_tiny_flux2_components,
    save_tiny_flux2,
)

__all__ = ["FLUX2_SCHEDULER", "Flux2KleinFamily", "build_tiny_flux2_components", "flux2_lora_targets",
           "save_tiny_flux2"]



def flux2_lora_targets(num_single_layers: int = 24) -> tuple[str, ...]:
    """``train_dreambooth_lora_flux2_klein.py``'s default targets, its 24 single-block ``attn.to_out`` cut to the
    blocks a model has (the script names 24 whatever the model; peft skips the missing ones silently)."""
    return ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
            *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(min(24, num_single_layers))))


class Flux2KleinFamily(QwenFlowFamily):
    """FLUX.2 [klein]: ``Flux2Transformer2DModel`` + ``AutoencoderKLFlux2``, a ``Qwen3ForCausalLM`` text encoder."""

    name: ClassVar[str] = "flux2"
    pipeline_class_name: ClassVar[str] = "Flux2KleinPipeline"
    transformer_class: ClassVar[str] = "Flux2Transformer2DModel"
    vae_class: ClassVar[str] = "AutoencoderKLFlux2"
    text_encoder_class: ClassVar[str] = "Qwen3ForCausalLM"
    #: The script's default targets for a 24-single-block model (FLUX.2 [klein] 9B); :meth:`load` cuts them to the
    #: loaded transformer's blocks (klein 4B has 20).
    lora_targets: ClassVar[tuple[str, ...]] = flux2_lora_targets(24)
    #: ``Flux2KleinPipeline.__call__``'s default (ignored by the step-distilled models).
    default_guidance_scale: ClassVar[float] = 4.0
    #: One transformer token per 2x2 VAE latents (the patchify before packing).
    latent_patch: ClassVar[int] = 2
    #: ``Flux2KleinPipeline.encode_prompt``'s ``text_encoder_out_layers``.
    text_encoder_out_layers: ClassVar[tuple[int, ...]] = (9, 18, 27)
    #: ``Flux2KleinPipeline``'s guidance input for models with guidance embeddings (the script's ``--guidance_scale``).
    guidance_scale: ClassVar[float] = 3.5

    def __init__(self, scheduler: Any, options: FlowMatchingOptions | None = None) -> None:
        super().__init__(scheduler, options)
        self.is_distilled = False

    @classmethod
    def load(cls, source: str, **kwargs: Any) -> ModelParts:
        """:meth:`QwenFlowFamily.load`, plus the pipeline's ``is_distilled`` flag from ``model_index.json``."""
        from lightning_custom.families import read_model_configs

        parts = super().load(source, **kwargs)
        index, _ = read_model_configs(source, kwargs.get("revision"))
        parts.family.is_distilled = bool(index.get("is_distilled", False))
        return parts

    @classmethod
    def from_components(cls, components: dict[str, Any], options: FlowMatchingOptions | None = None) -> Any:
        """The family around built components, with the LoRA targets of their transformer's single blocks."""
        family = super().from_components(components, options)
        family.lora_targets = flux2_lora_targets(components["transformer"].config.num_single_layers)
        return family

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """``Flux2KleinPipeline``'s prompt: one user message, chat template with ``enable_thinking=False``."""
        set_prompt_format(tokenizer, chat_prompt(tokenizer, enable_thinking=False))

    # ---------------------------------------------------------------------------------------------- text
    def encode_text(self, model: FamilyHost, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``Flux2KleinPipeline._get_qwen3_prompt_embeds`` on token ids.

        Returns:
            ``{"encoder_hidden_states": (B, L, 3 * D)}``: layers 9, 18 and 27 side by side per token.
        """
        if len(input_ids) != 1:
            raise ValueError(f"FLUX.2 [klein] encodes one token-id tensor (Qwen3); got {len(input_ids)}")
        ids = input_ids[0].to(model.device)
        mask = padding_mask(ids, model.tokenizer).long()
        with model.frozen_half_precision("text_encoder"):
            output = model.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        stacked = torch.stack([output.hidden_states[k] for k in self.text_encoder_out_layers], dim=1)
        batch, layers, length, width = stacked.shape
        return {"encoder_hidden_states": stacked.permute(0, 2, 1, 3).reshape(batch, length, layers * width)}

    def denoiser_kwargs(
        self, model: FamilyHost, text: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, Any]:
        """``encoder_hidden_states`` and ``txt_ids`` (``Flux2KleinPipeline._prepare_text_ids``: ``(B, L, 4)``)."""
        from diffusers import Flux2KleinPipeline

        states = text["encoder_hidden_states"]
        return {"encoder_hidden_states": states,
                "txt_ids": Flux2KleinPipeline._prepare_text_ids(states).to(states.device)}

    # --------------------------------------------------------------------------------------------- latents
    def scale_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents normalized as the script does (2x2 patchify, then the VAE's batch-norm statistics), kept in
        the VAE's layout ``(B, C, h, w)`` (unpatchified again): the package draws noise and fixed latents in that
        shape. Patchifying is a permutation, so the loss (a mean over all elements) is the script's."""
        from diffusers import Flux2KleinPipeline

        patched = Flux2KleinPipeline._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patched.device, torch.float32)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps).to(patched.device)
        return Flux2KleinPipeline._unpatchify_latents((patched.float() - mean) / std)

    # ----------------------------------------------------------------------------------------------- loss
    def velocity_prediction(
        self, model: FamilyHost, noisy: torch.Tensor, sigmas: torch.Tensor, conditioning: dict[str, Any]
    ) -> torch.Tensor:
        """The transformer on patchified, packed tokens at ``t / 1000`` (guidance only where embedded), unpacked by
        its ids and unpatchified to ``noisy``'s layout."""
        from diffusers import Flux2KleinPipeline

        dtype = model.module_dtype("transformer")
        transformer = model.transformer
        patched = Flux2KleinPipeline._patchify_latents(noisy)
        ids = Flux2KleinPipeline._prepare_latent_ids(patched).to(noisy.device)
        packed = Flux2KleinPipeline._pack_latents(patched)
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), self.guidance_scale, device=noisy.device, dtype=dtype)
        kwargs = {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                  for key, value in conditioning.items()}
        with model.frozen_half_precision("transformer"):
            prediction = transformer(hidden_states=packed.to(dtype), timestep=(timesteps / 1000).to(dtype),
                                     guidance=guidance, img_ids=ids, return_dict=False, **kwargs)[0]
        prediction = prediction[:, : packed.shape[1]]
        unpacked = Flux2KleinPipeline._unpack_latents_with_ids(prediction, ids)
        return Flux2KleinPipeline._unpatchify_latents(unpacked).float()

    # ---------------------------------------------------------------------------------------------- pipeline
    def pipeline(self, parts: Any, scheduler: Any | None = None) -> Any:
        """A ``Flux2KleinPipeline`` around the live components, ``is_distilled`` as the checkpoint says."""
        pipe = super().pipeline(parts, scheduler)
        pipe.register_to_config(is_distilled=self.is_distilled)
        return pipe
