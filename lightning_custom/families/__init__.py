"""Model families: detection from the checkpoint itself, and loading. See :mod:`lightning_custom.families.base`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lightning_custom.errors import UserInputError
from lightning_custom.families.base import FlowMatchingOptions, ModelFamily, ModelParts

__all__ = ["FAMILIES", "FlowMatchingOptions", "ModelFamily", "ModelParts", "detect_family", "family_named",
           "family_of_pipeline",
           "load_model", "read_model_configs"]


def _families() -> list[type[ModelFamily]]:
    from lightning_custom.families.flux import FluxFamily
    from lightning_custom.families.flux2 import Flux2KleinFamily
    from lightning_custom.families.qwen_image import QwenImageFamily
    from lightning_custom.families.sd3 import SD3Family
    from lightning_custom.families.stable_diffusion import StableDiffusionFamily, StableDiffusionXLFamily
    from lightning_custom.families.z_image import ZImageFamily

    # Most specific first: SDXL's UNet is also a UNet2DConditionModel.
    return [StableDiffusionXLFamily, StableDiffusionFamily, FluxFamily, SD3Family, ZImageFamily, Flux2KleinFamily,
            QwenImageFamily]


class _Registry:
    """The known families, imported on first use (the family modules import diffusers lazily too)."""

    def __iter__(self):
        return iter(_families())

    def names(self) -> list[str]:
        return [family.name for family in _families()]


#: Every family, most specific first. A new family is added in :func:`_families`.
FAMILIES = _Registry()


def family_of_pipeline(pipe: Any) -> type[ModelFamily]:
    """The model family of a diffusers pipeline, by its class name (``FluxImg2ImgPipeline`` is FLUX's); Stable
    Diffusion 1.x/2.x for a class no family names."""
    from lightning_custom.families.stable_diffusion import StableDiffusionFamily

    name = type(pipe).__name__
    matches = [f for f in FAMILIES if name.startswith(f.pipeline_class_name.removesuffix("Pipeline"))]
    return max(matches, key=lambda f: len(f.pipeline_class_name), default=StableDiffusionFamily)


def family_named(name: str) -> type[ModelFamily]:
    """The family called ``name`` (``"sd"``, ``"sdxl"``, ``"flux"``, ``"sd3"``)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UserInputError(f"unknown model family {name!r}; choose from {FAMILIES.names()}")


def read_model_configs(source: str, revision: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_index.json, the denoiser's config.json)`` of a diffusers folder or hub id, as dicts.

    The denoiser is whichever of ``unet`` / ``transformer`` the folder holds (a folder saved part by part may have
    no model index: ``{}`` then). One-line errors name the source.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        index = _read_json(source, "model_index.json", revision) if (path / "model_index.json").is_file() else {}
        names = [name for name in ("transformer", "unet") if (path / name / "config.json").is_file()]
    else:
        index = _read_json(source, "model_index.json", revision)
        names = [name for name in ("transformer", "unet") if name in index]
    if not names:
        raise UserInputError(f"--model.pretrained_model_name_or_path: {source} is not a diffusers model folder "
                             f"(missing subfolder(s): unet or transformer)")
    return index, _read_json(source, f"{names[0]}/config.json", revision)


def detect_family(source: str, revision: str | None = None) -> type[ModelFamily]:
    """The family of the checkpoint at ``source`` (folder or hub id), from its own configs (as SDXL is detected)."""
    index, denoiser_config = read_model_configs(source, revision)
    for family in FAMILIES:
        if family.matches(index, denoiser_config):
            return family
    raise UserInputError(
        f"--model.pretrained_model_name_or_path: {source} is a {index.get('_class_name', 'pipeline')} with a "
        f"{denoiser_config.get('_class_name', 'denoiser')}; supported: "
        f"{', '.join(f'{family.name} ({family.pipeline_class_name})' for family in FAMILIES)}"
    )


def load_model(
    name_or_path: str, *, revision: str | None = None, variant: str | None = None, weight_dtype: str = "float32",
    vae_name_or_path: str | None = None, options: FlowMatchingOptions | None = None,
    quantize_denoiser: str = "none",
) -> ModelParts:
    """Load a model of any family from a hub id, a folder, ``embedded[:name]`` or ``random:<arch>``, frozen.

    ``quantize_denoiser`` (``"8bit"``, ``"4bit"``) loads the UNet / transformer quantized by bitsandbytes
    (:func:`lightning_custom.families.components.denoiser_quantization`).

    The family is read from the checkpoint itself (:func:`detect_family`). A folder without a ``transformer``, or a
    hub id whose model index cannot be read, goes down the Stable Diffusion path, whose loader tells SD from SDXL
    by the UNet and gives the one-line errors for a wrong path.
    """
    from lightning_custom.synthetic.architectures import build_random_components, is_random_architecture
    from lightning_custom.families.components import freeze, resolve_model_path, torch_dtype

    dtype = torch_dtype(weight_dtype)
    if is_random_architecture(name_or_path):
        components = build_random_components(name_or_path, dtype=dtype)
        denoiser = components.get("transformer", components.get("unet"))
        config = {**dict(denoiser.config), "_class_name": type(denoiser).__name__}
        family = next(f for f in FAMILIES if f.matches({}, config))
        for value in components.values():
            if isinstance(value, torch.nn.Module):
                freeze(value)
        if family.name == "sdxl":
            components["vae"].to(torch.float32)  # the stock SDXL VAE overflows in fp16
        return ModelParts(family.from_components(components, options), components)
    from lightning_custom.families.components import denoiser_quantization

    source = resolve_model_path(name_or_path)
    family = family_for_source(source, revision)
    with denoiser_quantization(quantize_denoiser, dtype):
        return family.load(source, revision=revision, variant=variant, dtype=dtype,
                           vae_name_or_path=vae_name_or_path, options=options)


def family_for_source(source: str, revision: str | None = None) -> type[ModelFamily]:
    """The family of a resolved folder or hub id; Stable Diffusion where nothing says otherwise (see load_model)."""
    from lightning_custom.families.stable_diffusion import StableDiffusionFamily

    path = Path(source).expanduser()
    if path.is_dir():
        return detect_family(source, revision) if (path / "transformer" / "config.json").is_file() else (
            StableDiffusionFamily)
    if path.exists() or source.startswith((".", "/", "~")):
        return StableDiffusionFamily
    try:
        return detect_family(source, revision)
    except UserInputError:
        return StableDiffusionFamily


def _read_json(source: str, file: str, revision: str | None) -> dict[str, Any]:
    path = Path(source).expanduser()
    if path.is_dir():
        target = path / file
        if not target.is_file():
            raise UserInputError(f"--model.pretrained_model_name_or_path: {source} is not a diffusers model folder "
                                 f"(no {file})")
    else:
        from huggingface_hub import hf_hub_download

        try:
            target = Path(hf_hub_download(source, file, revision=revision))
        except Exception as err:  # noqa: BLE001 - hub errors come in many classes; all become one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise UserInputError(f"--model.pretrained_model_name_or_path: cannot read {file} of {source!r}{offline}: "
                                 f"{first}") from err
    try:
        return json.loads(target.read_text())
    except (OSError, ValueError) as err:
        raise UserInputError(f"--model.pretrained_model_name_or_path: {target} is not readable JSON: {err}") from err


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
