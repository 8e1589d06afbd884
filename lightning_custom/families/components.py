"""Load and freeze the parts of a diffusers-format Stable Diffusion model (SD 1.x, SD 2.x or SDXL).

This module is the one seam between the package and the checkpoints: every method gets its tokenizer(s), text
encoder(s), VAE, UNet and noise scheduler from :func:`load_components`, from a hub id or a local folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_custom.synthetic.architectures import build_random_components, is_random_architecture
from lightning_custom.errors import UserInputError
from lightning_custom.runtime.precision import (  # noqa: F401 - re-exported: their home before issue 26
    cast_trainable_to_fp32,
    frozen_dtype_for_precision,
    match_frozen_weights_to_precision,
)
from lightning_custom.synthetic.embedded import (  # noqa: F401 - re-exported: their home before issue 26
    BUILT_EMBEDDED_MODELS,
    EMBEDDED_CONCEPTS,
    EMBEDDED_MODELS,
    embedded_concept_path,
    embedded_model_path,
    embedded_sdxl_path,
)


WeightDtype = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(name_or_path: str) -> str:
    """Expand the aliases ``"embedded"`` (the world model) and ``"embedded:<name>"`` (``world-sd``, ``tiny-sd``,
    ``tiny-sdxl``, and the tiny random ``tiny-flux`` and ``tiny-sd3``, built offline into a cache folder on first
    use) to the models' folders; keep anything else."""
    if name_or_path == "embedded":
        return embedded_model_path()
    if name_or_path.startswith("embedded:"):
        name = name_or_path.split(":", 1)[1]
        if name not in EMBEDDED_MODELS:
            from lightning_custom.synthetic.toy_flow_2026 import EMBEDDED_BUILDERS, embedded_model

            built = embedded_model(name)  # Z-Image, FLUX.2 [klein], Qwen-Image (issue 28): their own table
            if built is not None:
                return str(built)
            known = [*EMBEDDED_MODELS, *EMBEDDED_BUILDERS]
            raise UserInputError(f"--model.pretrained_model_name_or_path: unknown embedded model {name!r}; choose "
                                 f"from {['embedded:' + n for n in known]}")
        if name in BUILT_EMBEDDED_MODELS:
            from lightning_custom.synthetic.toy_flow import embedded_flow_model

            return str(embedded_flow_model(name))
        return embedded_model_path(name)
    return name_or_path


def torch_dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` etc., with a one-line error for anything else."""
    if name not in _DTYPES:
        raise UserInputError(f"--model.weight_dtype: {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class StableDiffusionComponents:
    """The parts a personalization method trains against; SDXL adds a second tokenizer and text encoder.

    ``tokenizer_2`` / ``text_encoder_2`` (OpenCLIP bigG with projection) are ``None`` for SD 1.x and 2.x.
    """

    tokenizer: object
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: object
    tokenizer_2: object = None
    text_encoder_2: nn.Module | None = None

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet takes SDXL's ``text_time`` added conditioning (pooled text + size/crop time ids)."""
        return is_sdxl_unet(self.unet)


def is_sdxl_unet(unet: nn.Module) -> bool:
    """Whether ``unet`` is an SDXL UNet (``addition_embed_type == "text_time"``)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


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


_DENOISER_QUANTIZATION: contextvars.ContextVar[Any] = contextvars.ContextVar("denoiser_quantization", default=None)
DENOISER_SUBFOLDERS = ("unet", "transformer")


@contextlib.contextmanager
def denoiser_quantization(mode: str, compute_dtype: torch.dtype) -> Iterator[None]:
    """Inside the block, :func:`load_component` loads a denoiser (``unet`` / ``transformer``) quantized.

    ``mode``: ``"none"``, ``"8bit"`` (LLM.int8) or ``"4bit"`` (NF4, double quantization, ``compute_dtype`` compute),
    through diffusers' ``BitsAndBytesConfig``, as diffusers' FLUX QLoRA recipe. One-line errors where bitsandbytes
    is missing or the mode is unknown.
    """
    if mode in (None, "none"):
        yield
        return
    if mode not in ("8bit", "4bit"):
        raise UserInputError(f"--model.init_args.quantize_base: {mode!r} is not one of none, 8bit, 4bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UserInputError(f"--model.init_args.quantize_base {mode}: needs bitsandbytes (pip install bitsandbytes) "
                             f"and a CUDA GPU") from err
    if not torch.cuda.is_available():  # diffusers' bitsandbytes quantizer refuses deep inside from_pretrained
        raise UserInputError(f"--model.init_args.quantize_base {mode}: diffusers quantizes with bitsandbytes on a CUDA "
                             f"GPU only, and none is visible; use quantize_base: none on this machine")
    from diffusers import BitsAndBytesConfig

    if mode == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute_dtype)
    token = _DENOISER_QUANTIZATION.set(config)
    try:
        yield
    finally:
        _DENOISER_QUANTIZATION.reset(token)


def load_component(cls, name_or_path: str, subfolder: str, **kwargs):
    """``cls.from_pretrained(name_or_path, subfolder=...)`` with a one-line error instead of a deep traceback.

    A denoiser loaded inside :func:`denoiser_quantization` is quantized.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    quantization = _DENOISER_QUANTIZATION.get()
    if quantization is not None and subfolder in DENOISER_SUBFOLDERS:
        kwargs["quantization_config"] = quantization
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
    vae_name_or_path: str | None = None,
) -> StableDiffusionComponents:
    """Load tokenizer(s), text encoder(s), VAE, UNet and a DDPM training scheduler (SD 1.x, 2.x or SDXL).

    SDXL is recognised by its UNet (``addition_embed_type == "text_time"``); its second tokenizer and text encoder
    (``CLIPTextModelWithProjection``) are then loaded too. ``random:sd15`` / ``random:sd21`` / ``random:sdxl`` build
    the published architecture with random weights instead (benchmarks). This is the Stable Diffusion family's
    loader; :func:`lightning_custom.families.load_model` loads any family (also FLUX.1, SD3.5 and their
    ``random:flux`` / ``random:flux-schnell`` / ``random:sd3`` / ``random:sd35-large`` architectures).

    The scheduler's ``prediction_type`` (epsilon or v_prediction) comes from the model's own scheduler config.
    Every part is returned frozen (``requires_grad=False``); the methods unfreeze what they train.
    The UNet is held in ``weight_dtype``; the text encoders stay fp32 because most methods train inside them. The
    VAE is held in ``weight_dtype`` too, except SDXL's, which overflows in fp16 and stays fp32 unless
    ``vae_name_or_path`` names an fp16-safe one (e.g. ``madebyollin/sdxl-vae-fp16-fix``).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype = torch_dtype(weight_dtype)
    if is_random_architecture(pretrained_model_name_or_path):
        parts = build_random_components(pretrained_model_name_or_path, dtype=dtype)
        parts = StableDiffusionComponents(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                                          parts["scheduler"], parts.get("tokenizer_2"), parts.get("text_encoder_2"))
        if parts.is_sdxl:
            parts.vae.to(torch.float32)
        return _frozen(parts)
    source = resolve_model_path(pretrained_model_name_or_path)
    check_model_source(source)
    common = {"revision": revision}
    unet = load_component(UNet2DConditionModel, source, "unet", variant=variant, torch_dtype=dtype, **common)
    sdxl = is_sdxl_unet(unet)
    tokenizer = load_component(CLIPTokenizer, source, "tokenizer", **common)
    text_encoder = load_component(CLIPTextModel, source, "text_encoder", variant=variant, **common)
    tokenizer_2 = text_encoder_2 = None
    if sdxl:
        tokenizer_2 = load_component(CLIPTokenizer, source, "tokenizer_2", **common)
        text_encoder_2 = load_component(CLIPTextModelWithProjection, source, "text_encoder_2", variant=variant,
                                        **common)
    if vae_name_or_path:
        vae = load_vae(vae_name_or_path, dtype, revision)
    else:
        vae_dtype = torch.float32 if sdxl else dtype  # the stock SDXL VAE overflows in fp16
        vae = load_component(AutoencoderKL, source, "vae", variant=variant, torch_dtype=vae_dtype, **common)
    noise_scheduler = load_component(DDPMScheduler, source, "scheduler", **common)
    return _frozen(StableDiffusionComponents(tokenizer, text_encoder, vae, unet, noise_scheduler, tokenizer_2,
                                             text_encoder_2))


def load_vae(name_or_path: str, dtype: torch.dtype, revision: str | None = None) -> nn.Module:
    """A replacement VAE (a standalone VAE folder or hub id, or a model folder with a ``vae`` subfolder)."""
    from diffusers import AutoencoderKL

    path = Path(name_or_path).expanduser()
    subfolder = "vae" if (path / "vae").is_dir() else None
    try:
        return AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=dtype, revision=revision)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(
            f"--model.vae_name_or_path: cannot load a VAE from {name_or_path!r}: {first_line}"
        ) from err


def _frozen(parts: StableDiffusionComponents) -> StableDiffusionComponents:
    for module in (parts.text_encoder, parts.text_encoder_2, parts.vae, parts.unet):
        if module is not None:
            freeze(module)
    return parts


def assemble_pipeline(parts: object, scheduler: object) -> object:
    """A diffusers pipeline around live components (nothing is copied), for sampling or ``save_pretrained``.

    ``parts`` is anything with ``tokenizer``, ``text_encoder``, ``vae``, ``unet`` and, for SDXL, ``tokenizer_2`` and
    ``text_encoder_2`` (a personalization module, :class:`StableDiffusionComponents`): a ``StableDiffusionXLPipeline``
    for SDXL (no watermarker), else a ``StableDiffusionPipeline`` without safety checker.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
                  scheduler=scheduler)
    if getattr(parts, "text_encoder_2", None) is not None:
        return StableDiffusionXLPipeline(**common, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                                         add_watermarker=False)
    return StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)


def pipeline_class_of(folder: str | Path) -> type:
    """The pipeline class a saved folder names in its ``model_index.json`` (``FluxPipeline``...); without one,
    ``StableDiffusionXLPipeline`` for a folder holding ``text_encoder_2``, else ``StableDiffusionPipeline``."""
    import json

    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = Path(folder) / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if hasattr(diffusers, name):
            return getattr(diffusers, name)
    return StableDiffusionXLPipeline if (Path(folder) / "text_encoder_2").is_dir() else StableDiffusionPipeline


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of ``module``."""
    module.requires_grad_(False)
    return module
