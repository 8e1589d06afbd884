"""Load and freeze the parts of a diffusers-format Stable Diffusion model.

This module is the one seam between the package and the checkpoints: every method gets its tokenizer, text
encoder, VAE, UNet and noise scheduler from :func:`load_components`, from a hub id or a local folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lightning_custom.architectures import build_random_components, is_random_architecture
from lightning_custom.errors import UserInputError

WeightDtype = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def embedded_model_path() -> str:
    """Path of the small SD-architecture model shipped inside the package (runs offline)."""
    return str(resources.files("lightning_custom") / "assets" / "tiny-sd")


def embedded_concept_path() -> str:
    """Path of the example concept images shipped inside the package."""
    return str(resources.files("lightning_custom") / "assets" / "concepts" / "cat-toy")


def resolve_model_path(name_or_path: str) -> str:
    """Expand the alias ``"embedded"`` to the shipped model; leave hub ids and folders as they are."""
    return embedded_model_path() if name_or_path in ("embedded", "embedded:tiny-sd") else name_or_path


def torch_dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` etc., with a one-line error for anything else."""
    if name not in _DTYPES:
        raise UserInputError(f"--model.weight_dtype: {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class StableDiffusionComponents:
    """The five parts a personalization method trains against."""

    tokenizer: object
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: object


def check_model_source(name_or_path: str, subfolders: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> None:
    """Fail early, in one line, when ``name_or_path`` is neither a diffusers folder nor a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"--model.pretrained_model_name_or_path: {name_or_path} is a file, not a diffusers folder")
        missing = [s for s in subfolders if not (path / s).is_dir()]
        if missing:
            raise UserInputError(
                f"--model.pretrained_model_name_or_path: {name_or_path} is not a diffusers model folder "
                f"(missing subfolder(s): {', '.join(missing)})"
            )
        return
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise UserInputError(
            f"--model.pretrained_model_name_or_path: no such folder {name_or_path!r} (and it is not a hub id like org/name)"
        )


def load_component(cls, name_or_path: str, subfolder: str, **kwargs):
    """``cls.from_pretrained(name_or_path, subfolder=...)`` with a one-line error instead of a deep traceback."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return cls.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserInputError(
            f"--model.pretrained_model_name_or_path: cannot load {subfolder!r} of {name_or_path!r}{offline}: {first_line}"
        ) from err


def load_components(
    pretrained_model_name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    weight_dtype: WeightDtype = "float32",
) -> StableDiffusionComponents:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM training scheduler (SD 1.x / 2.x layout).

    ``random:sd15`` / ``random:sd21`` build the published architecture with random weights instead (benchmarks).

    The scheduler's ``prediction_type`` (epsilon or v_prediction) comes from the model's own scheduler config.
    Every part is returned frozen (``requires_grad=False``); the methods unfreeze what they train.
    The VAE and UNet are held in ``weight_dtype``; the text encoder stays fp32 because most methods train inside it.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = torch_dtype(weight_dtype)
    if is_random_architecture(pretrained_model_name_or_path):
        parts = build_random_components(pretrained_model_name_or_path, dtype=dtype)
        for module in (parts["text_encoder"], parts["vae"], parts["unet"]):
            freeze(module)
        return StableDiffusionComponents(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                                         parts["scheduler"])
    source = resolve_model_path(pretrained_model_name_or_path)
    check_model_source(source)
    common = {"revision": revision}
    tokenizer = load_component(CLIPTokenizer, source, "tokenizer", **common)
    text_encoder = load_component(CLIPTextModel, source, "text_encoder", variant=variant, **common)
    vae = load_component(AutoencoderKL, source, "vae", variant=variant, torch_dtype=dtype, **common)
    unet = load_component(UNet2DConditionModel, source, "unet", variant=variant, torch_dtype=dtype, **common)
    noise_scheduler = load_component(DDPMScheduler, source, "scheduler", **common)
    for module in (text_encoder, vae, unet):
        freeze(module)
    return StableDiffusionComponents(tokenizer, text_encoder, vae, unet, noise_scheduler)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of ``module``."""
    module.requires_grad_(False)
    return module


def cast_trainable_to_fp32(*modules: nn.Module) -> None:
    """Trainable parameters stay fp32 under mixed precision (as diffusers' ``cast_training_params``)."""
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
