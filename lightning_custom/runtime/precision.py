"""Precision plumbing: when a frozen half-precision model runs outside autocast."""

from __future__ import annotations

import contextlib

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def autocast_off_for(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(enabled=False)`` when autocast is on and ``dtype`` is fp16/bf16; a no-op otherwise.

    A frozen model held in half precision gains nothing from autocast: its matmuls and convolutions already run in
    half precision, and autocast only adds casts and upcasts every norm's output to fp32, which doubles the bytes
    the elementwise ops after it move (SD 1.5 at CUDA's cast rules: 4095 ops per step inside autocast, 3389 outside;
    ``benchmarks/throughput.py --profile-ops``). diffusers' examples keep their fp16 UNet outside autocast too. The
    caller casts the inputs to ``dtype``; fp32 trainables inside (LoRA, Custom Diffusion's K/V) cast their own
    input and output, so their gradients stay fp32.
    """
    if dtype in HALF_DTYPES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
