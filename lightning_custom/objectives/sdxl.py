"""Stable Diffusion XL conditioning: two text encoders, the pooled text embedding and the micro-conditioning time ids.

Pure functions, no Lightning. The same computation as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and
``_get_add_time_ids`` (Podell et al., "SDXL", Section 2.2: conditioning on the original image size and on the
crop coordinates), but per sample, from the size and crop each training image actually had.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def encode_prompts(
    text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled_prompt_embeds)`` as SDXL's pipeline computes them.

    Each encoder's penultimate hidden states, concatenated along the feature axis (768 + 1280 = 2048 for SDXL), and
    the projected pooled output (``text_embeds``) of the last encoder, a ``CLIPTextModelWithProjection``.
    """
    hidden = []
    pooled = None
    for encoder, ids in zip(text_encoders, input_ids):
        register_recordable_outputs(encoder)
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("SDXL needs a text encoder with projection (CLIPTextModelWithProjection) for the pooled "
                         "embedding")
    return torch.cat(hidden, dim=-1), pooled


def register_recordable_outputs(encoder: nn.Module) -> None:
    """Make ``output_hidden_states=True`` work on a text encoder unpickled in another process.

    transformers 5 records hidden states through a per-process registry that a model's ``__init__`` fills; a model
    sent to a ``ddp_spawn`` worker is unpickled without ``__init__``, is missing from the registry there, and would
    silently return ``hidden_states=None``. A no-op where the registry does not exist (older transformers).
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - transformers < 5
        return
    outputs = getattr(encoder, "_can_record_outputs", None)
    if outputs and not _CAN_RECORD_REGISTRY.get(encoder):
        _CAN_RECORD_REGISTRY[encoder] = outputs


def time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per sample: ``original (h, w) + crop (top, left) + target (h, w)``.

    Args:
        original_size: ``(B, 2)`` height and width of each source image before resizing.
        crop_top_left: ``(B, 2)`` top and left of each crop (in the resized image, as diffusers' SDXL examples).
        target_size: ``(h, w)`` of the training images, shared by the batch.
    """
    original_size = torch.as_tensor(original_size).reshape(-1, 2)
    crop_top_left = torch.as_tensor(crop_top_left, device=original_size.device).reshape(-1, 2)
    target = torch.as_tensor(list(target_size), device=original_size.device).reshape(1, 2)
    target = target.expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()


def unet_kwargs(
    text: dict[str, torch.Tensor], original_size: torch.Tensor, crop_top_left: torch.Tensor,
    target_size: Sequence[int], device: torch.device | None = None,
) -> dict[str, Any]:
    """The SDXL UNet's keyword arguments from the text conditioning (:func:`encode_prompts`) and the batch's sizes."""
    ids = time_ids(original_size, crop_top_left, target_size)
    return {
        "encoder_hidden_states": text["encoder_hidden_states"],
        "added_cond_kwargs": {"text_embeds": text["text_embeds"], "time_ids": ids.to(device or ids.device)},
    }
