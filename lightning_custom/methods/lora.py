"""LoRA (Hu et al., 2022) through peft on the UNet and the text encoder, exported in diffusers' LoRA format."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_custom.runtime.precision import cast_trainable_to_fp32
from lightning_custom.errors import UserInputError
from lightning_custom.runtime.ranges import check_value

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER = "default"
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def lora_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers peft can wrap with LoRA (linear, convolution, embedding)."""
    return [name for name, module in model.named_modules() if isinstance(module, _LORA_LAYER_TYPES)]


def check_target_modules(model: nn.Module, targets: Sequence[str], argument: str, model_name: str) -> None:
    """Every target must match a layer the way peft matches names (exact, or a ``.``-separated suffix).

    peft itself only fails when *no* target matches; a misspelt one among several would silently train less.
    """
    if not targets:
        raise UserInputError(f"{argument}: give at least one module name, e.g. {list(UNET_TARGETS)}")
    names = lora_layer_names(model)
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            examples = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                               for n in names})[:8]
            raise UserInputError(
                f"{argument}: no layer of the {model_name} is named {target!r}; choose layer names such as {examples}"
            )


def add_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str], argument: str, model_name: str,
    adapter: str = ADAPTER,
) -> None:
    """Inject a trainable LoRA adapter into ``model``'s ``targets``; the wrapped base weights stay untouched.

    Uses ``peft.inject_adapter_in_model`` directly (``transformers``' ``add_adapter`` needs a newer peft), then
    records the config as ``model.peft_config`` the way diffusers' and transformers' ``add_adapter`` do, so that
    ``get_peft_model_state_dict`` works. LoRA weights stay fp32; dropout layers are put in training mode.
    ``adapter`` names the adapter; a model may hold several (a fleet: one per concept), every one trainable.
    """
    from peft import LoraConfig, inject_adapter_in_model

    check_value("model", "rank", rank)  # also for callers other than the methods, which check their hparams
    check_value("model", "lora_dropout", dropout)
    if not getattr(model, "peft_config", None):  # a further adapter wraps the same (already checked) layers
        check_target_modules(model, targets, argument, model_name)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=list(targets))
    with warnings.catch_warnings():  # "multiple adapters in the model": what a fleet (one per concept) wants
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter)
    model.peft_config = {**getattr(model, "peft_config", {}), adapter: config}
    model._hf_peft_config_loaded = True
    for name, param in model.named_parameters():
        if f".{adapter}." in name and ".lora_" in name:
            param.requires_grad_(True)  # peft leaves a model's other adapters inactive (frozen) when it adds one
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            module.train()  # the DVAR evaluation runs in eval mode (Lightning restores the modes after it)
    cast_trainable_to_fp32(model)


@contextlib.contextmanager
def lora_dropout_disabled(*models: nn.Module) -> Iterator[None]:
    """Turn LoRA dropout off inside the block (restoring each layer's mode after)."""
    layers = [m for model in models for name, m in model.named_modules() if "lora_dropout" in name]
    modes = [m.training for m in layers]
    try:
        for layer in layers:
            layer.training = False
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode


def lora_layers(model: nn.Module, peft_naming: bool = False, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights, on the CPU: under diffusers' key names (``lora.down``/``lora.up``, what SD / SDXL
    files hold), or with ``peft_naming`` under peft's (``lora_A``/``lora_B``), what diffusers' FLUX and SD3 scripts
    save: diffusers' conversion renames only some of a flow transformer's layers, and its loader, seeing the first
    key already converted, would then drop the others."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter)
    if not peft_naming:
        state = convert_state_dict_to_diffusers(state)
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def save_lora(output_dir: str | Path, family: Any, models: dict[str, nn.Module], adapter: str = ADAPTER) -> str:
    """Write ``pytorch_lora_weights.safetensors`` (with the adapters' rank/alpha metadata) for ``load_lora_weights``.

    ``models`` maps each pipeline component name that carries an adapter (``"unet"`` or ``"transformer"``,
    ``"text_encoder"``, ``"text_encoder_2"``) to the module. The family's pipeline class writes the file
    (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``FluxPipeline``, ``StableDiffusion3Pipeline``),
    so its ``load_lora_weights(folder)`` puts each part back where it came from. ``adapter``: which of the
    models' adapters (a fleet holds one per concept).
    """
    layers = {name: lora_layers(model, peft_naming=family.is_flow, adapter=adapter) for name, model in models.items()}
    metadata = {name: model.peft_config[adapter].to_dict() for name, model in models.items()}
    family.save_lora(output_dir, LORA_WEIGHT_NAME, layers, metadata)
    return LORA_WEIGHT_NAME
