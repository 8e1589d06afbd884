"""Generate images with a learned concept: from a finished run's artifacts, or from a module while it trains.

A finished run is read through its ``summary.json``: the base model (``pretrained_model_name_or_path``) is loaded
as a diffusers pipeline of the class its ``model_index.json`` names (``StableDiffusion(XL)Pipeline``,
``FluxPipeline``, ``StableDiffusion3Pipeline``), then the method puts its artifacts into it: through the method
class's ``load_into_pipeline(pipe, run_dir) -> pipe`` (a static or class method), else by artifact file name
(:data:`ARTIFACT_LOADERS`). A run that exported a complete pipeline (DreamBooth) is loaded from it directly.

Flow-matching models (FLUX.1, SD3/SD3.5) sample with their own ``FlowMatchEulerDiscreteScheduler``: the DDPM-family
samplers of ``--scheduler`` are refused on them in one line. The guidance scale defaults to each model's own
(:func:`default_guidance_scale`: FLUX 3.5, SD3 7.0, SD / SDXL 7.5).

Every image has its own seed (a CPU ``torch.Generator``), so an image depends only on its prompt and seed, on any
device and in any batch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from lightning_custom.errors import UserInputError
from lightning_custom.runs.summary import SUMMARY_FILE, read_summary  # noqa: F401 - re-exported
from lightning_custom.runtime.io import atomic_path, write_json
from lightning_custom.inference.metrics import without_placeholder
from lightning_custom.methods.tokens import pipeline_prompts

SAMPLES_FILE = "samples.json"
GRID_FILE = "grid.png"
# Object prompts in the style of DreamBooth's evaluation list; "{}" stands for the learned concept.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of {}",
    "{} on the beach",
    "{} in the jungle",
    "{} in the snow",
    "{} on top of a wooden floor",
    "{} with a city in the background",
    "a red {}",
    "a watercolor painting of {}",
)
# The DDPM-family samplers of --scheduler (SD 1.x/2.x and SDXL); flow-matching models keep their own.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
#: Guidance scale when none is given: the pipelines' own defaults for the flow families (``FluxPipeline`` 3.5:
#: FLUX.1-dev's distilled guidance input; ``StableDiffusion3Pipeline`` 7.0), and 7.5 for SD and SDXL as always here.
FAMILY_GUIDANCE_SCALES: dict[str, float] = {"flux": 3.5, "sd3": 7.0}
DEFAULT_GUIDANCE_SCALE = 7.5


# ------------------------------------------------------------------------------------------------ run folders
def check_trained(summary: dict[str, Any], run_dir: str | Path, argument: str = "run_dir") -> None:
    """Refuse a run that ended without its trained weights: an interrupted one, or one whose weights were withheld
    (non-finite values). Sampling it would silently show the base model.

    Raises:
        UserInputError: naming the run, why it stopped, and how to go on.
    """
    if summary.get("artifacts"):
        return
    stopped_by = summary.get("stopped_by")
    if stopped_by == "interrupted":
        checkpoint = summary.get("resume_checkpoint")
        hint = f"resume it with --ckpt_path {checkpoint}" if checkpoint else "resume it from its checkpoint"
    elif summary.get("artifacts_withheld"):
        hint = str(summary["artifacts_withheld"]).rstrip(".")
    else:
        return  # a method without artifacts (the base model samples)
    raise UserInputError(f"{argument}: {run_dir} has no trained artifacts (stopped_by: {stopped_by}; {hint})")


def fill_prompt(template: str, phrase: str | None) -> str:
    """``"{} on the beach"`` -> ``"<cat-toy> on the beach"`` (or ``"sks dog on the beach"`` with a class noun); a
    prompt without ``{}`` is kept as written."""
    if "{}" in template and not phrase:
        raise UserInputError(f"prompt {template!r}: the run has no placeholder token to put in place of '{{}}'")
    return template.replace("{}", phrase or "")


def run_concepts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every concept a run trained: ``name``, ``placeholder_token``, ``class_noun`` and ``instance_data_dir``.

    From ``summary["concepts"]``; summaries written before it existed give one concept from the top-level fields,
    or one per token of a multi-concept token ``"<new1>+<new2>"`` (only the first with an image folder).
    """
    if summary.get("concepts"):
        return [dict(concept) for concept in summary["concepts"]]
    token = summary.get("placeholder_token")
    tokens = token.split("+") if token and "+" in token else [token]
    return [{"name": "concept" if len(tokens) == 1 else f"concept{i}", "placeholder_token": t,
             "class_noun": summary.get("class_noun") if len(tokens) == 1 else None,
             "instance_data_dir": summary.get("instance_data_dir") if i == 0 else None}
            for i, t in enumerate(tokens)]


def concept_prompts(templates: Sequence[str], concepts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each template filled in for each concept (its token and class noun: "a photo of sks dog"), concept by
    concept; a template without ``{}`` is used once. Entries: ``template``, ``prompt``, ``text`` (the prompt without
    the token, for CLIP-T) and ``concept`` (the concept's name, ``None`` for a template without ``{}``)."""
    from lightning_custom.data.templates import concept_phrase

    entries = []
    for index, concept in enumerate(concepts):
        token = concept.get("placeholder_token")
        phrase = concept_phrase(token, concept.get("class_noun")) if token else None
        for template in templates:
            if "{}" not in template and index > 0:
                continue
            prompt = fill_prompt(template, phrase)
            entries.append({"template": template, "prompt": prompt, "text": without_placeholder(prompt, token),
                            "concept": concept.get("name") if "{}" in template else None})
    return entries


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


def pipeline_family(pipe: Any) -> type:
    """The model family whose pipeline class ``pipe`` is (:func:`lightning_custom.families.family_of_pipeline`)."""
    from lightning_custom.families import family_of_pipeline

    return family_of_pipeline(pipe)


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
    """The guidance scale used when none is given: the model folder's recommendation, the family's
    (:data:`FAMILY_GUIDANCE_SCALES`), else 7.5."""
    recommended = getattr(pipe, RECOMMENDED_ATTRIBUTE, {}).get("guidance_scale")
    if recommended is not None:
        return float(recommended)
    family = pipeline_family(pipe)
    own = getattr(family, "default_guidance_scale", None)  # a family may name its own
    if own is not None:
        return float(own)
    return FAMILY_GUIDANCE_SCALES.get(getattr(family, "name", ""), DEFAULT_GUIDANCE_SCALE)


# ------------------------------------------------------------------------------------------------ artifacts
def _load_textual_inversion(pipe: Any, run_dir: Path, file: str) -> Any:
    from lightning_custom.methods.tokens import load_token_files

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


# ------------------------------------------------------------------------------------------------ generating
def _mixed_dtype_context(pipe: Any) -> contextlib.AbstractContextManager:
    """Autocast when the text encoder (fp32 while training) and the denoiser (fp16/bf16) differ in dtype."""
    denoiser = pipeline_denoiser(pipe)
    denoiser_dtype, text_dtype = denoiser.dtype, pipe.text_encoder.dtype
    if denoiser_dtype == text_dtype or torch.is_autocast_enabled(denoiser.device.type):
        return contextlib.nullcontext()
    return torch.autocast(denoiser.device.type, dtype=denoiser_dtype)


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    output_type: str = "pil",
) -> list:
    """One image per ``(prompt, seed)`` pair, in order; each image's initial noise comes from its own seed.

    Images are PIL images, or ``(H, W, 3)`` float arrays in ``[0, 1]`` with ``output_type="np"``. ``guidance_scale``
    ``None`` is the model's own default (:func:`default_guidance_scale`).

    The global RNG is left as it was (sampling during training must not change training).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size < 1:
        raise UserInputError(f"--batch_size: must be at least 1, got {batch_size}")
    device = pipeline_denoiser(pipe).device
    guidance_scale = default_guidance_scale(pipe) if guidance_scale is None else guidance_scale
    num_inference_steps = default_inference_steps(pipe) if num_inference_steps is None else num_inference_steps
    images: list[Image.Image] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _mixed_dtype_context(pipe):
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            # SD3's pipeline has no textual-inversion loader and does not write a multi-vector token out: the
            # prompts per text encoder do (a plain {"prompt": chunk} for SD, SDXL and FLUX).
            out = pipe(
                **pipeline_prompts(pipe, chunk), generator=generators, guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps, height=height, width=width, output_type=output_type,
            )
            images.extend(list(out.images))
    return images


def write_png(image: Image.Image, path: str | Path) -> Path:
    """Save ``image`` as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


LABEL_SIZE = 11  # px, Pillow's bundled font


def label_font() -> ImageFont.ImageFont:
    """Pillow's bundled font at :data:`LABEL_SIZE` (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=LABEL_SIZE)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def word_gap(font: ImageFont.ImageFont) -> float:
    """The gap drawn between words: the font's own space is 2 px at this size, which reads as no space at all."""
    return max(float(font.getlength(" ")), 0.4 * LABEL_SIZE)


def wrap_label(text: str, font: ImageFont.ImageFont, width: float, max_lines: int = 3) -> list[list[str]]:
    """``text`` in lines of words that fit ``width`` pixels; a word is never split (one too long gets a line of its
    own and is clipped at the edge)."""
    lines: list[list[str]] = [[]]
    used = 0.0
    for word in text.split():
        length = float(font.getlength(word))
        if lines[-1] and used + word_gap(font) + length > width:
            lines.append([])
            used = 0.0
        used += (word_gap(font) if lines[-1] else 0.0) + length
        lines[-1].append(word)
    return lines[:max_lines]


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int, cell: int = 128) -> Image.Image:
    """One row per label (``columns`` images each), the label written above its row as typed (whole words, visible
    spaces); small images are enlarged."""
    font = label_font()
    wrapped = [wrap_label(label, font, columns * cell - 8) for label in labels]
    line = LABEL_SIZE + 3
    heights = [len(lines) * line + 6 + cell for lines in wrapped]
    grid = Image.new("RGB", (columns * cell, sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for row, lines in enumerate(wrapped):
        for k, words in enumerate(lines):
            x = 4.0
            for word in words:
                draw.text((x, top + 2 + k * line), word, fill="black", font=font)
                x += float(font.getlength(word)) + word_gap(font)
        band = len(lines) * line + 6
        for col in range(columns):
            index = row * columns + col
            if index >= len(images):
                break
            image = images[index]
            resample = Image.Resampling.NEAREST if max(image.size) < cell else Image.Resampling.LANCZOS
            grid.paste(image.convert("RGB").resize((cell, cell), resample), (col * cell, top + band))
        top += heights[row]
    return grid


def sample_run(
    run_dir: str | Path,
    prompts: Sequence[str] | None = None,
    *,
    images_per_prompt: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    output_dir: str | Path | None = None,
    base_model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    pipe: Any = None,
) -> dict[str, Any]:
    """Generate ``images_per_prompt`` images per prompt with a finished run's concept; write PNGs and a grid.

    Each template is filled in with each concept's token and class noun (:func:`concept_prompts`); a single string
    is one template. Image ``j`` of every prompt uses seed ``seed + j``. Writes ``<output_dir>/pNN-sSEED.png``,
    ``grid.png`` (one labelled row per prompt) and ``samples.json`` (prompts, seeds, files and settings); returns
    the latter.
    ``guidance_scale`` ``None`` is the model's own (:func:`default_guidance_scale`: FLUX 3.5, SD3 7.0, else 7.5).
    ``pipe`` reuses an already loaded pipeline (from :func:`load_run_pipeline`).
    """
    start = time.perf_counter()
    run = Path(run_dir).expanduser()
    if images_per_prompt < 1:
        raise UserInputError(f"--images_per_prompt: must be at least 1, got {images_per_prompt}")
    if num_inference_steps is not None and num_inference_steps < 1:
        raise UserInputError(f"--num_inference_steps: must be at least 1, got {num_inference_steps}")
    if pipe is None:
        pipe, summary = load_run_pipeline(run, base_model=base_model, scheduler=scheduler, device=device, dtype=dtype)
    else:
        summary = read_summary(run)
    guidance_scale = default_guidance_scale(pipe) if guidance_scale is None else guidance_scale
    num_inference_steps = default_inference_steps(pipe) if num_inference_steps is None else num_inference_steps
    token = summary.get("placeholder_token")
    templates = [prompts] if isinstance(prompts, str) else list(prompts) if prompts else list(DEFAULT_PROMPTS)
    entries = concept_prompts(templates, run_concepts(summary))
    filled = [entry["prompt"] for entry in entries]
    jobs = [(i, seed + j) for i in range(len(filled)) for j in range(images_per_prompt)]
    images = generate(
        pipe, [filled[i] for i, _ in jobs], [s for _, s in jobs], guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps, height=height, width=width, batch_size=batch_size,
    )
    out = Path(output_dir) if output_dir is not None else run / "samples"
    records = []
    for (i, s), image in zip(jobs, images):
        name = f"p{i:02d}-s{s}.png"
        write_png(image, out / name)
        records.append({"file": name, "prompt_index": i, "seed": s})
    write_png(labelled_grid(images, filled, images_per_prompt), out / GRID_FILE)
    manifest = {
        "run_dir": str(run),
        "method": summary.get("method"),
        "placeholder_token": token,
        "prompts": entries,
        "images": records,
        "grid": GRID_FILE,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "scheduler": type(pipe.scheduler).__name__ if scheduler == "default" else scheduler,  # what sampled
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out / SAMPLES_FILE, manifest)
    return manifest
