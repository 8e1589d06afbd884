"""Z-Image (Tongyi-MAI/Z-Image, Z-Image-Turbo): a single-stream flow DiT conditioned on a Qwen3 model's states.

Everything follows diffusers' own Z-Image code:

* text states as ``ZImagePipeline._encode_prompt``: the caption as one user message through the tokenizer's chat
  template (``enable_thinking=True``), padded to ``max_sequence_length`` (512), the text encoder (a ``Qwen3Model``)
  run with the attention mask, its **second-to-last** hidden state, and each prompt's padding dropped, so the
  transformer gets a list of variable-length ``(L_i, D)`` states;
* the objective as ``examples/dreambooth/train_dreambooth_lora_z_image.py``: latents ``(z - shift_factor) *
  scaling_factor``, sigmas from ``compute_density_for_timestep_sampling`` on the scheduler's own (statically shifted,
  ``shift=3.0``) training schedule, ``x_t = (1 - sigma) x + sigma * noise``, the transformer called on the list of
  ``(C, 1, h, w)`` latents with the **reversed, normalized** time ``(1000 - t) / 1000`` and its output **negated**
  (Z-Image predicts ``x - noise``), target ``noise - x`` weighted by ``compute_loss_weighting_for_sd3``;
* LoRA on the script's default ``--lora_layers``: ``to_k``, ``to_q``, ``to_v``, ``to_out.0`` (every attention of the
  noise/context refiners and the main layers), saved with ``ZImagePipeline.save_lora_weights``.

The transformer patchifies 2x2 latents itself (``all_patch_size=(2,)``), so a resolution must be a multiple of 2x the
VAE's downsampling. ``embedded:tiny-z-image`` is a tiny random model in these classes (diffusers' pipeline-test sizes,
``tests/pipelines/z_image/test_z_image.py``) with an offline Qwen tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from lightning_custom.families.base import FamilyHost
from lightning_custom.families.qwen_flow import QwenFlowFamily
from lightning_custom.families.qwen_text import chat_prompt, padding_mask, set_prompt_format
from lightning_custom.synthetic.toy_flow_2026 import (  # noqa: F401 - re-exported
    Z_IMAGE_SCHEDULER,
    build_tiny_z_image_components,
    save_tiny_z_image,
)

__all__ = ["Z_IMAGE_LORA_TARGETS", "Z_IMAGE_SCHEDULER", "ZImageFamily", "build_tiny_z_image_components",
           "save_tiny_z_image"]

#: ``train_dreambooth_lora_z_image.py``'s default ``--lora_layers``.
Z_IMAGE_LORA_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")


class ZImageFamily(QwenFlowFamily):
    """Z-Image: ``ZImageTransformer2DModel`` + ``FlowMatchEulerDiscreteScheduler``, a Qwen3 text encoder."""

    name: ClassVar[str] = "z_image"
    pipeline_class_name: ClassVar[str] = "ZImagePipeline"
    transformer_class: ClassVar[str] = "ZImageTransformer2DModel"
    text_encoder_class: ClassVar[str] = "Qwen3Model"
    lora_targets: ClassVar[tuple[str, ...]] = Z_IMAGE_LORA_TARGETS
    #: ``ZImagePipeline.__call__``'s ``guidance_scale`` default (Z-Image-Turbo's model card samples with 0).
    default_guidance_scale: ClassVar[float] = 5.0
    #: One transformer token per 2x2 latents (the transformer's own patchify).
    latent_patch: ClassVar[int] = 2

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """``ZImagePipeline``'s prompt: one user message, chat template with ``enable_thinking=True``."""
        set_prompt_format(tokenizer, chat_prompt(tokenizer, enable_thinking=True))

    # ---------------------------------------------------------------------------------------------- text
    def encode_text(self, model: FamilyHost, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``ZImagePipeline._encode_prompt`` on token ids: the penultimate hidden state under the attention mask.

        Returns:
            ``{"prompt_embeds": (B, L, D), "prompt_mask": (B, L) bool}``; the pipeline's list is
            ``[embeds[i][mask[i]] for i in range(B)]`` (:meth:`denoiser_kwargs`). Kept padded here so that batches
            of cached states stack.
        """
        if len(input_ids) != 1:
            raise ValueError(f"Z-Image encodes one token-id tensor (Qwen3); got {len(input_ids)}")
        ids = input_ids[0].to(model.device)
        mask = padding_mask(ids, model.tokenizer)
        with model.frozen_half_precision("text_encoder"):
            states = model.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": states, "prompt_mask": mask}

    def denoiser_kwargs(
        self, model: FamilyHost, text: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, Any]:
        """``cap_feats``: each prompt's states without its padding (a list of ``(L_i, D)``)."""
        embeds, mask = text["prompt_embeds"], text["prompt_mask"].bool()
        return {"cap_feats": [embeds[i][mask[i]] for i in range(embeds.shape[0])]}

    # ----------------------------------------------------------------------------------------------- loss
    def velocity_prediction(
        self, model: FamilyHost, noisy: torch.Tensor, sigmas: torch.Tensor, conditioning: dict[str, Any]
    ) -> torch.Tensor:
        """The negated transformer output on ``(C, 1, h, w)`` latents at ``(1000 - t) / 1000`` (the script's)."""
        dtype = model.module_dtype("transformer")
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        normalized = (1000 - timesteps) / 1000
        latents = list(noisy.to(dtype).unsqueeze(2).unbind(dim=0))
        captions = [states.to(dtype) for states in conditioning["cap_feats"]]
        with model.frozen_half_precision("transformer"):
            output = model.transformer(latents, normalized.to(dtype), captions, return_dict=False)[0]
        return -torch.stack(output, dim=0).squeeze(2)
