"""Qwen-Image (Qwen/Qwen-Image, Qwen-Image-2512): a 20B MMDiT conditioned on a Qwen2.5-VL model's last hidden state,
with a video VAE (``AutoencoderKLQwenImage``) used one frame at a time.

Everything follows diffusers' own Qwen-Image code:

* text states as ``QwenImagePipeline._get_qwen_prompt_embeds``: the caption put into the pipeline's fixed template (a
  system message asking to describe the image, then the caption as the user message), tokenized to at most ``1024 +
  34`` tokens, the ``Qwen2_5_VLForConditionalGeneration`` run with the attention mask, its **last** hidden state, each
  prompt's valid tokens kept and the template's first 34 dropped, then zero-padded to the batch's longest with an
  ``encoder_hidden_states_mask`` (``None`` when nothing is padded), and cut to ``max_sequence_length`` (512, the
  ``__call__`` default);
* latents as ``examples/dreambooth/train_dreambooth_lora_qwen_image.py``: the VAE's one-frame latents ``(B, C, 1, h,
  w)`` normalized per channel by ``latents_mean`` / ``latents_std`` of its config; the script samples the latent
  distribution (``.sample()``), as the package does with its fixed draw;
* the objective as that script: sigmas from ``compute_density_for_timestep_sampling`` on the scheduler's own training
  schedule (Qwen-Image's scheduler shifts dynamically, so training is unshifted), ``x_t = (1 - sigma) x + sigma *
  noise`` packed 2x2 (``QwenImagePipeline._pack_latents``) with ``img_shapes = [(1, h / 2, w / 2)]`` for the RoPE,
  ``timestep = t / 1000``, target ``noise - x`` weighted by ``compute_loss_weighting_for_sd3``;
* LoRA on the script's default ``--lora_layers``: ``to_k``, ``to_q``, ``to_v``, ``to_out.0``, saved with
  ``QwenImagePipeline.save_lora_weights``.

The frame axis is kept out of the package's latents (they are ``(B, C, h, w)`` like every other family's) and put
back around the VAE and the transformer call; the loss, a mean over all elements, is the script's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from lightning_custom.families.base import FamilyHost
from lightning_custom.families.qwen_flow import QwenFlowFamily
from lightning_custom.families.qwen_text import padding_mask, set_prompt_format
from lightning_custom.synthetic.toy_flow_2026 import (  # noqa: F401 - re-exported
    QWEN_IMAGE_SCHEDULER,
    build_tiny_qwen_image_components,
    save_tiny_qwen_image,
)

__all__ = ["PROMPT_TEMPLATE", "PROMPT_TEMPLATE_START", "QWEN_IMAGE_SCHEDULER", "QwenImageFamily",
           "build_tiny_qwen_image_components", "save_tiny_qwen_image"]

#: ``QwenImagePipeline.prompt_template_encode`` and ``prompt_template_encode_start_idx`` (tokens dropped after).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_START = 34
#: ``QwenImagePipeline.tokenizer_max_length``: prompt tokens after the template's.
TOKENIZER_MAX_LENGTH = 1024


def _template(caption: str) -> str:
    return PROMPT_TEMPLATE.format(caption)


class QwenImageFamily(QwenFlowFamily):
    """Qwen-Image: ``QwenImageTransformer2DModel`` + ``AutoencoderKLQwenImage``, a Qwen2.5-VL text encoder."""

    name: ClassVar[str] = "qwen_image"
    pipeline_class_name: ClassVar[str] = "QwenImagePipeline"
    transformer_class: ClassVar[str] = "QwenImageTransformer2DModel"
    vae_class: ClassVar[str] = "AutoencoderKLQwenImage"
    text_encoder_class: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    #: ``QwenImagePipeline.__call__``'s ``max_sequence_length`` (text states kept after the template).
    max_sequence_length: ClassVar[int] = 512
    #: One transformer token per 2x2 latents (``_pack_latents``).
    latent_patch: ClassVar[int] = 2
    #: ``QwenImagePipeline`` guides by ``true_cfg_scale`` with a negative prompt; ``guidance_scale`` only feeds
    #: guidance-distilled transformers. The package passes this value, which the stock model ignores (as diffusers).
    default_guidance_scale: ClassVar[float] = 4.0

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """``QwenImagePipeline``'s prompt: the fixed system/user template around the caption."""
        set_prompt_format(tokenizer, _template)

    def tokenizer_max_length(self, tokenizer_name: str, tokenizer: Any) -> int:
        """``tokenizer_max_length + prompt_template_encode_start_idx`` (1058), the pipeline's ``max_length``."""
        return TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_START

    # ---------------------------------------------------------------------------------------------- text
    def encode_text(self, model: FamilyHost, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``QwenImagePipeline._get_qwen_prompt_embeds`` on token ids, kept at a fixed length (so cached states stack).

        Returns:
            ``{"prompt_embeds": (B, L, D), "prompt_mask": (B, L)}``: each prompt's valid states after the template's
            first 34 tokens, left-aligned and zero-padded to ``L = 1024``; :meth:`denoiser_kwargs` trims them to the
            batch's longest (what the pipeline returns) and to 512.
        """
        if len(input_ids) != 1:
            raise ValueError(f"Qwen-Image encodes one token-id tensor (Qwen2.5-VL); got {len(input_ids)}")
        ids = input_ids[0].to(model.device)
        mask = padding_mask(ids, model.tokenizer).long()
        with model.frozen_half_precision("text_encoder"):
            states = model.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        length = ids.shape[1] - PROMPT_TEMPLATE_START
        embeds = states.new_zeros(ids.shape[0], length, states.shape[-1])
        kept = torch.zeros(ids.shape[0], length, dtype=torch.long, device=ids.device)
        for i in range(ids.shape[0]):
            valid = states[i][mask[i].bool()][PROMPT_TEMPLATE_START:]
            embeds[i, : valid.shape[0]] = valid
            kept[i, : valid.shape[0]] = 1
        return {"prompt_embeds": embeds, "prompt_mask": kept}

    def denoiser_kwargs(
        self, model: FamilyHost, text: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, Any]:
        """``encoder_hidden_states`` and ``encoder_hidden_states_mask`` as ``QwenImagePipeline.encode_prompt``
        returns them: padded to the batch's longest prompt, cut to 512, the mask ``None`` when nothing is padded."""
        mask = text["prompt_mask"]
        longest = int(mask.sum(dim=1).max().item())
        length = min(longest, self.max_sequence_length)
        mask = mask[:, :length]
        return {"encoder_hidden_states": text["prompt_embeds"][:, :length],
                "encoder_hidden_states_mask": None if bool(mask.all()) else mask}

    # --------------------------------------------------------------------------------------------- latents
    def latent_spec(self, vae: Any) -> tuple[int, int]:
        """``(z_dim, 2 ** len(temperal_downsample))``: ``QwenImagePipeline``'s latent channels and VAE scale."""
        return int(vae.config.z_dim), 2 ** len(vae.temperal_downsample)

    def latent_distribution(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The video VAE on one-frame clips ``(B, 3, 1, H, W)``; the frame axis dropped from its latents."""
        dist = vae.encode(pixel_values.unsqueeze(2)).latent_dist
        return dist.mean.float().squeeze(2), dist.std.float().squeeze(2)

    def scale_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """``(z - latents_mean) / latents_std`` per channel (the script's, with its frame axis dropped)."""
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=latents.device).view(1, channels, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=latents.device).view(1, channels, 1, 1)
        return (latents.float() - mean) * (1.0 / std)

    # ----------------------------------------------------------------------------------------------- loss
    def velocity_prediction(
        self, model: FamilyHost, noisy: torch.Tensor, sigmas: torch.Tensor, conditioning: dict[str, Any]
    ) -> torch.Tensor:
        """The transformer on 2x2-packed one-frame latents at ``t / 1000`` with ``img_shapes``, unpacked."""
        from diffusers import QwenImagePipeline

        dtype = model.module_dtype("transformer")
        batch, channels, height, width = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy.unsqueeze(1), batch, channels, height, width)
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        kwargs = {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                  for key, value in conditioning.items()}
        with model.frozen_half_precision("transformer"):
            prediction = model.transformer(hidden_states=packed.to(dtype), timestep=(timesteps / 1000).to(dtype),
                                           img_shapes=[(1, height // 2, width // 2)] * batch, return_dict=False,
                                           **kwargs)[0]
        # _unpack_latents takes pixel sizes and the VAE scale; scale 1 makes them the latent sizes
        return QwenImagePipeline._unpack_latents(prediction, height, width, 1).squeeze(2).float()
