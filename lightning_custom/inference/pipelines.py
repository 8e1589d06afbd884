"""Loading pipelines to sample from: a finished run's (its base model with the method's artifacts put in, or the
pipeline it exported), a training module's (its live components), and the samplers of ``--scheduler``.

A finished run is read through its ``summary.json``: the base model (``pretrained_model_name_or_path``) is loaded
as a diffusers pipeline of the class its ``model_index.json`` names (``StableDiffusion(XL)Pipeline``,
``FluxPipeline``, ``StableDiffusion3Pipeline``), then the method puts its artifacts into it: through the method
class's ``load_into_pipeline(pipe, run_dir) -> pipe`` (a static or class method), else by artifact file name
(:data:`ARTIFACT_LOADERS`). A run that exported a complete pipeline (DreamBooth) is loaded from it directly.

Flow-matching models (FLUX.1, SD3/SD3.5) sample with their own ``FlowMatchEulerDiscreteScheduler``: the DDPM-family
samplers of ``--scheduler`` are refused on them in one line. The guidance scale defaults to each model's own
(:func:`default_guidance_scale`: FLUX 3.5, SD3 7.0, SD / SDXL 7.5).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_custom.errors import UserInputError
from lightning_custom.families import family_of_pipeline
from lightning_custom.runs.summary import SUMMARY_FILE, check_trained, read_summary

# The DDPM-family samplers of --scheduler (SD 1.x/2.x and SDXL); flow-matching models keep their own.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
#: Guidance scale when neither the call, the model folder nor the family (``ModelFamily.default_guidance_scale``:
#: FLUX 3.5, SD3 7.0, the pipelines' own defaults) gives one: SD and SDXL, as always here.
DEFAULT_GUIDANCE_SCALE = 7.5


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh inference scheduler called ``name`` (see :data:`SCHEDULERS`) built from a scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise UserInputError(f"--scheduler: {name!r} is not one of {['default', *SCHEDULERS]}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def is_flow_scheduler(class_name: str | None) -> bool:
    """Whether a scheduler class name is a flow-matching one (``FlowMatchEulerDiscreteScheduler``...)."""
    return bool(class_name) and str(class_name).startswith("FlowMatch")


def check_sampler(name: str, scheduler_class: str | None, model: str, argument: str = "--scheduler") -> None:
    """Refuse a DDPM-family sampler (``ddim``, ``euler``...) for a flow-matching model, in one line.

    Their ``from_config`` would accept a ``FlowMatchEulerDiscreteScheduler`` config and sample noise, silently.

    Args:
        name: the requested sampler (``"default"`` is always accepted).
        scheduler_class: the class name of the model's own scheduler.
        model: what the message calls the model (a run folder, a model id).
        argument: the option to name in the message.
    """
    if name != "default" and is_flow_scheduler(scheduler_class):
        raise UserInputError(f"{argument}: {name!r} is a DDPM-family sampler, but {model} is a flow-matching model "
                             f"that samples with its own {scheduler_class}; leave {argument} at 'default'")


def replace_scheduler(pipe: Any, name: str, model: str, argument: str = "--scheduler") -> Any:
    """Give ``pipe`` the sampler ``name`` (``"default"``: keep its own); refused on flow-matching models."""
    check_sampler(name, type(pipe.scheduler).__name__, model, argument)
    if name != "default":
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe


def pipeline_denoiser(pipe: Any) -> Any:
    """The pipeline's denoiser: ``pipe.unet`` (SD, SDXL) or ``pipe.transformer`` (FLUX, SD3)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
RECOMMENDED_ATTRIBUTE = "_lightning_custom_sampling_defaults"


def recommended_sampling(model_folder: str | Path | None) -> dict[str, Any]:
    """A model folder's own sampling recommendation (``sampling_defaults.json``: ``scheduler``, ``guidance_scale``,
    ``num_inference_steps``), as the embedded world model carries one; empty for any other model."""
    if not model_folder:
        return {}
    path = Path(model_folder) / SAMPLING_DEFAULTS_FILE
    try:
        loaded = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in loaded.items() if k in ("scheduler", "guidance_scale", "num_inference_steps")}


def remember_recommendation(pipe: Any, recommended: dict[str, Any]) -> Any:
    """Keep ``recommended`` on ``pipe`` for :func:`default_guidance_scale` and :func:`default_inference_steps`."""
    setattr(pipe, RECOMMENDED_ATTRIBUTE, dict(recommended))
    return pipe


def default_inference_steps(pipe: Any, fallback: int = 50) -> int:
    """Denoising steps when none are given: the model's recommendation, else ``fallback``."""
    return int(getattr(pipe, RECOMMENDED_ATTRIBUTE, {}).get("num_inference_steps", fallback))


def default_guidance_scale(pipe: Any) -> float:
    """The guidance scale used when none is given: the model folder's recommendation, the family's own
    (``default_guidance_scale``), else 7.5."""
    recommended = getattr(pipe, RECOMMENDED_ATTRIBUTE, {}).get("guidance_scale")
    if recommended is not None:
        return float(recommended)
    family = family_of_pipeline(pipe)
    own = family.default_guidance_scale
    return DEFAULT_GUIDANCE_SCALE if own is None else float(own)


# ------------------------------------------------------------------------------------------------ artifacts
def _load_textual_inversion(pipe: Any, run_dir: Path, file: str) -> Any:
    from lightning_custom.methods.token_files import load_token_files

    load_token_files(pipe, run_dir / file)  # one file per encoder (or the older one-file clip_l/clip_g format)
    return pipe


def _load_lora(pipe: Any, run_dir: Path, file: str) -> Any:
    pipe.load_lora_weights(str(run_dir), weight_name=file)
    return pipe


def _load_custom_diffusion(pipe: Any, run_dir: Path, file: str) -> Any:
    # diffusers 0.42 installs the processors only when `_pipeline` is passed (huggingface/diffusers#9320)
    pipe.unet.load_attn_procs(str(run_dir), weight_name=file, _pipeline=pipe)
    return pipe


# File name -> loader, for methods without their own ``load_into_pipeline`` (diffusers' artifact names).
ARTIFACT_LOADERS: dict[str, Callable[[Any, Path, str], Any]] = {
    "learned_embeds.safetensors": _load_textual_inversion,
    "pytorch_lora_weights.safetensors": _load_lora,
    "pytorch_custom_diffusion_weights.bin": _load_custom_diffusion,
    "pytorch_custom_diffusion_weights.safetensors": _load_custom_diffusion,
}


def method_class(summary: dict[str, Any]) -> type | None:
    """The run's LightningModule class, from ``method_class_path`` or by name in ``lightning_custom.methods``."""
    path = summary.get("method_class_path")
    if path and "." in path:
        module_name, _, name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            pass
    methods = importlib.import_module("lightning_custom.methods")
    return getattr(methods, str(summary.get("method")), None)


def exported_pipeline(run_dir: Path, summary: dict[str, Any]) -> Path | None:
    """A complete diffusers pipeline the run exported (DreamBooth's ``pipeline/``), if any."""
    for candidate in [run_dir, *(run_dir / a for a in summary.get("artifacts", []))]:
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def pipeline_source(run_dir: Path, summary: dict[str, Any], base_model: str | None) -> str:
    """Where the pipeline loads from: ``base_model``, a full pipeline the run exported, else the base model."""
    from lightning_custom.families.components import resolve_model_path

    if base_model:
        return resolve_model_path(base_model)
    exported = exported_pipeline(run_dir, summary)
    if exported is not None:
        return str(exported)
    source = summary.get("pretrained_model_name_or_path")
    if not source:
        raise UserInputError(f"run_dir: {run_dir / SUMMARY_FILE} names no pretrained_model_name_or_path; pass --base_model")
    return resolve_model_path(source)


def load_run_artifacts(pipe: Any, run_dir: Path, summary: dict[str, Any]) -> Any:
    """Put the run's learned weights into ``pipe``: the method's own hook, or dispatch on artifact names."""
    cls = method_class(summary)
    hook = getattr(cls, "load_into_pipeline", None) if cls is not None else None
    if hook is not None:
        return hook(pipe, run_dir)
    for name in summary.get("artifacts", []):
        loader = ARTIFACT_LOADERS.get(Path(name).name)
        if loader is not None:
            pipe = loader(pipe, run_dir, name)
    return pipe


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def scheduler_class_of(source: str) -> str | None:
    """The scheduler class a pipeline folder or hub id names in its ``model_index.json`` (``None`` if unreadable)."""
    import diffusers

    try:
        entry = diffusers.DiffusionPipeline.load_config(source).get("scheduler") or [None, None]
    except (OSError, ValueError):
        return None
    return entry[-1] if isinstance(entry, (list, tuple)) else None


def absent_optional_parts(source: str, index: dict[str, Any]) -> dict[str, None]:
    """``{name: None}`` for the parts the family can run without (SD3's T5: ``text_encoder_3`` and
    ``tokenizer_3``) that the model lacks: saved as ``null`` in (or missing from) ``model_index.json``, or listed
    there but absent from a local folder. ``from_pretrained`` then builds the pipeline without them, as diffusers
    runs SD3 without T5 (it does not count them as optional by itself)."""
    from lightning_custom.families import FAMILIES

    family = next((f for f in FAMILIES if f.pipeline_class_name == index.get("_class_name")), None)
    if family is None:
        return {}
    folder = Path(source).expanduser()
    tokenizers = dict(zip(family.text_encoder_names, family.tokenizer_names))
    optional = {*family.optional_text_encoders, *(tokenizers[name] for name in family.optional_text_encoders)}

    def absent(name: str) -> bool:
        entry = index.get(name)
        if not isinstance(entry, (list, tuple)) or entry[-1] is None:
            return True
        return folder.is_dir() and not (folder / name).is_dir()

    return {name: None for name in sorted(optional) if absent(name)}


def auto_dtype(device: torch.device, scheduler_class: str | None) -> str:
    """``--dtype auto``: float32 off CUDA; on CUDA float16, or bfloat16 for flow-matching models (FLUX.1 and SD3.5
    overflow in float16; diffusers runs them in bfloat16)."""
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if is_flow_scheduler(scheduler_class) else "float16"


def load_pipeline(source: str, dtype: torch.dtype | None = None, argument: str = "--base_model") -> Any:
    """A diffusers pipeline from a folder or hub id, of the class its ``model_index.json`` names, without a safety
    checker where the pipeline class has one (SDXL's does not, and warns about the keyword), and without the
    optional parts a folder lacks (:func:`absent_optional_parts`); errors are one line naming ``argument``."""
    import inspect

    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(source)
        class_name = index.get("_class_name", "")
        parameters = inspect.signature(getattr(diffusers, class_name, diffusers.DiffusionPipeline).__init__).parameters
        no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in parameters \
            else {}
        return diffusers.DiffusionPipeline.from_pretrained(source, dtype=dtype, **no_checker,
                                                           **absent_optional_parts(source, index))
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"{argument}: cannot load the pipeline {source!r}: {first_line}") from err


def load_run_pipeline(
    run_dir: str | Path,
    *,
    base_model: str | None = None,
    scheduler: str = "default",
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[Any, dict[str, Any]]:
    """A diffusers pipeline with the run's learned concept, and the run's summary.

    Args:
        run_dir: the folder of a finished fit (holding ``summary.json`` and the artifacts).
        base_model: load this model instead of the one named in the summary.
        scheduler: ``"default"`` (the model's own) or a name in :data:`SCHEDULERS` (not on flow-matching models).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        dtype: ``"auto"`` (on CUDA float16, bfloat16 for flow-matching models; else float32), ``"float32"``,
            ``"float16"`` or ``"bfloat16"``.
    """
    from lightning_custom.families.components import torch_dtype

    run = Path(run_dir).expanduser()
    summary = read_summary(run)
    check_trained(summary, run)
    torch_device = resolve_device(device)
    source = pipeline_source(run, summary, base_model)
    scheduler_class = scheduler_class_of(source)
    check_sampler(scheduler, scheduler_class, run)  # before loading a 12B model, where the index tells
    dtype = auto_dtype(torch_device, scheduler_class) if dtype == "auto" else dtype
    pipe = load_pipeline(source, torch_dtype(dtype))
    if source != str(exported_pipeline(run, summary)):  # an exported full pipeline already holds everything
        pipe = load_run_artifacts(pipe, run, summary)
    recommended = recommended_sampling(source)
    if scheduler == "default":
        scheduler = recommended.get("scheduler", "default")
    replace_scheduler(pipe, scheduler, str(run))
    remember_recommendation(pipe, recommended)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch_device), summary


def pipeline_from_module(module: Any, scheduler: str = "default", argument: str = "--scheduler") -> Any:
    """The family's pipeline (SD, SDXL, FLUX, SD3) sharing the (training) module's live components; nothing is
    copied.

    A method may provide its own ``inference_pipeline()`` (DreamBooth, ...). The training noise scheduler is never
    used for sampling: a fresh one is built from its config. A DDPM-family ``scheduler`` on a flow-matching model
    is refused in one line naming ``argument``.
    """
    what = f"{type(module).__name__}'s model"
    check_sampler(scheduler, type(module.noise_scheduler).__name__, what, argument)
    if hasattr(module, "inference_pipeline"):
        pipe = replace_scheduler(module.inference_pipeline(), scheduler, what, argument)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    recommended = module_sampling_defaults(module)
    if scheduler == "default":
        scheduler = recommended.get("scheduler", "default")
    config = module.noise_scheduler.config
    sampler = type(module.noise_scheduler).from_config(config) if scheduler == "default" else make_scheduler(
        scheduler, config
    )
    pipe = module.family.pipeline(module, sampler)  # the family's: StableDiffusion(XL)Pipeline, FluxPipeline...
    pipe.set_progress_bar_config(disable=True)
    return remember_recommendation(pipe, recommended)


def module_sampling_defaults(module: Any) -> dict[str, Any]:
    """The sampling recommendation of the model a (training) module was loaded from."""
    from lightning_custom.families.components import resolve_model_path

    name = getattr(getattr(module, "hparams", None), "get", lambda *_: None)("pretrained_model_name_or_path")
    try:
        return recommended_sampling(resolve_model_path(str(name))) if name else {}
    except UserInputError:
        return {}
