"""Precision plumbing: trainable weights in fp32, frozen weights in a dtype the device runs, and when a frozen
half-precision model runs outside autocast."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

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


def cast_trainable_to_fp32(*modules: nn.Module) -> None:
    """Trainable parameters stay fp32 under mixed precision (as diffusers' ``cast_training_params``)."""
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()


def frozen_dtype_for_precision(weight_dtype: torch.dtype, precision: str, device_type: str) -> torch.dtype:
    """The dtype to hold frozen weights of ``weight_dtype`` in, under the trainer's ``precision`` on ``device_type``.

    A CPU runs float16 poorly: its kernels are slow, and under autocast, which is bfloat16 there (Lightning turns
    ``16-mixed`` into ``bf16-mixed`` on a CPU), float16 weights meet bfloat16 activations in the normalisation layers
    ("RuntimeError: mixed dtype (CPU)"). So on a CPU float16 follows the precision: bfloat16 under a bf16 precision,
    float32 otherwise. Anything else is kept.
    """
    if device_type == "cpu" and weight_dtype == torch.float16:
        return torch.bfloat16 if str(precision).startswith("bf16") else torch.float32
    return weight_dtype


def match_frozen_weights_to_precision(module: nn.Module, precision: str, device_type: str) -> str | None:
    """Cast ``module``'s frozen float16 parameters and buffers to :func:`frozen_dtype_for_precision`.

    Trainable parameters are left alone (they stay float32). Returns the one line that says what changed, also
    logged at INFO, or ``None`` when nothing had to.
    """
    frozen = [p for p in module.parameters() if not p.requires_grad and p.dtype == torch.float16]
    frozen += [b for b in module.buffers() if b.dtype == torch.float16]
    target = frozen_dtype_for_precision(torch.float16, precision, device_type)
    if not frozen or target == torch.float16:
        return None
    for tensor in frozen:
        tensor.data = tensor.data.to(target)
    name = str(target).removeprefix("torch.")
    note = (f"--model.init_args.weight_dtype float16 on a CPU under precision {precision}: the frozen weights are "
            f"held in {name} instead (set weight_dtype: {name} to say so; on a CPU, --trainer.precision 32-true with "
            f"weight_dtype float32 is faster)")
    log.info(note)
    return note
