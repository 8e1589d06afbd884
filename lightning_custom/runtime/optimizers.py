"""The optimizers a method can train with: AdamW, fused where it applies, or bitsandbytes' 8-bit AdamW."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_custom.errors import UserInputError


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
