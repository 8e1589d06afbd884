"""Generate images with a learned concept: from a finished run's artifacts, or from a module while it trains.

Pipelines are loaded by :mod:`lightning_custom.inference.pipelines` (a finished run's, or a training module's) and
grids drawn by :mod:`lightning_custom.inference.grid`; their names are re-exported here, where they were before.

Every image has its own seed (a CPU ``torch.Generator``), so an image depends only on its prompt and seed, on any
device and in any batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lightning_custom.errors import UserInputError
from lightning_custom.runs.summary import SUMMARY_FILE, check_trained, read_summary  # noqa: F401 - re-exported
from lightning_custom.runtime.io import write_json
from lightning_custom.inference.grid import (  # noqa: F401 - re-exported: their home before issue 26
    label_font,
    LABEL_SIZE,
    labelled_grid,
    word_gap,
    wrap_label,
    write_png,
)
from lightning_custom.inference.pipelines import (  # noqa: F401 - re-exported: their home before issue 26
    _load_custom_diffusion,
    _load_lora,
    _load_textual_inversion,
    absent_optional_parts,
    ARTIFACT_LOADERS,
    auto_dtype,
    check_sampler,
    DEFAULT_GUIDANCE_SCALE,
    default_guidance_scale,
    default_inference_steps,
    exported_pipeline,
    is_flow_scheduler,
    load_pipeline,
    load_run_artifacts,
    load_run_pipeline,
    make_scheduler,
    method_class,
    module_sampling_defaults,
    pipeline_denoiser,
    pipeline_from_module,
    pipeline_source,
    RECOMMENDED_ATTRIBUTE,
    recommended_sampling,
    remember_recommendation,
    replace_scheduler,
    resolve_device,
    SAMPLING_DEFAULTS_FILE,
    scheduler_class_of,
    SCHEDULERS,
)
from lightning_custom.inference.metrics import without_placeholder
from lightning_custom.inference.options import SamplingOptions
from lightning_custom.methods.token_files import pipeline_prompts

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


# ------------------------------------------------------------------------------------------------ run folders
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


def sample_run(
    run_dir: str | Path,
    prompts: Sequence[str] | None = None,
    *,
    sampling: SamplingOptions | None = None,
    output_dir: str | Path | None = None,
    pipe: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Generate ``images_per_prompt`` images per prompt with a finished run's concept; write PNGs and a grid.

    Each template is filled in with each concept's token and class noun (:func:`concept_prompts`); a single string
    is one template. Image ``j`` of every prompt uses seed ``seed + j``. Writes ``<output_dir>/pNN-sSEED.png``,
    ``grid.png`` (one labelled row per prompt) and ``samples.json`` (prompts, seeds, files and settings); returns
    the latter.
    ``guidance_scale`` ``None`` is the model's own (:func:`default_guidance_scale`: FLUX 3.5, SD3 7.0, else 7.5).
    ``pipe`` reuses an already loaded pipeline (from :func:`load_run_pipeline`).

    Args:
        run_dir: the run folder (holding summary.json and the artifacts).
        prompts: templates with ``{}`` for the concept (default: :data:`DEFAULT_PROMPTS`).
        sampling: the sampling settings (:class:`~lightning_custom.inference.options.SamplingOptions`).
        output_dir: where to write (default: ``<run_dir>/samples``).
        pipe: an already loaded pipeline of the run.
        **options: fields of ``sampling`` to change (``seed=3, images_per_prompt=2``).
    """
    start = time.perf_counter()
    o = replace(sampling or SamplingOptions(), **options)
    images_per_prompt, seed, guidance_scale = o.images_per_prompt, o.seed, o.guidance_scale
    num_inference_steps, scheduler = o.num_inference_steps, o.scheduler
    run = Path(run_dir).expanduser()
    if images_per_prompt < 1:
        raise UserInputError(f"--images_per_prompt: must be at least 1, got {images_per_prompt}")
    if num_inference_steps is not None and num_inference_steps < 1:
        raise UserInputError(f"--num_inference_steps: must be at least 1, got {num_inference_steps}")
    if pipe is None:
        pipe, summary = load_run_pipeline(run, base_model=o.base_model, scheduler=scheduler, device=o.device,
                                          dtype=o.dtype)
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
        num_inference_steps=num_inference_steps, height=o.height, width=o.width, batch_size=o.batch_size,
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
