"""Evaluate a finished run: N prompts x M images per prompt with fixed seeds, scored by CLIP-I, CLIP-T and DINO.

Image ``j`` of every prompt uses seed ``seed + j``, so two runs (or two stopping rules) evaluated with the same
settings are compared on the same initial noise. Writes the samples under ``<run>/eval/`` and ``metrics.json``.
Each concept of a multi-concept run is sampled with its own token and scored against its own images. On the
embedded world model the default metric is the world encoder's identity similarity, which needs no download.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from lightning_custom.data.images import list_image_files, load_rgb_image
from lightning_custom.errors import UserInputError
from lightning_custom.runtime.io import write_json
from lightning_custom.inference.options import SamplingOptions
from lightning_custom.inference.metrics import (
    MetricResult,
    clip_i,
    clip_t,
    dino,
    load_clip,
    load_dino,
    mean_similarity_to_references,
)
from lightning_custom.inference.grid import labelled_grid, write_png
from lightning_custom.inference.pipelines import (
    check_sampler,
    load_pipeline,
    load_run_pipeline,
    pipeline_source,
    replace_scheduler,
    resolve_device,
    scheduler_class_of,
)
from lightning_custom.inference.sampling import generate, run_concepts, sample_run
from lightning_custom.runs.summary import check_trained, read_summary

METRICS_FILE = "metrics.json"
METRIC_NAMES = ("clip_i", "clip_t", "dino", "identity")
HUB_METRICS = ("clip_i", "clip_t", "dino")
WORLD_METRICS = ("identity",)
# The world model knows only its own captions ("a photo of a red star on a grey background"), not the beach.
WORLD_PROMPTS = ("a photo of a {}", "a photo of a {} on a grey background")


def concept_images(run_dir: Path, summary: dict[str, Any], concept_dir: str | None,
                   concept: dict[str, Any] | None = None) -> list[Image.Image]:
    """The concept images: ``concept_dir``, else the ``instance_data_dir`` of ``concept`` (default: the run's
    first concept) recorded in the run's summary."""
    concept = concept if concept is not None else run_concepts(summary)[0]
    folder = concept_dir or concept.get("instance_data_dir")
    if not folder:
        raise UserInputError(f"--concept_dir: {run_dir / 'summary.json'} records no instance_data_dir for concept "
                             f"{concept.get('name')!r}; pass --concept_dir")
    return [load_rgb_image(f) for f in list_image_files(folder, "--concept_dir")]


def is_world_model_run(summary: dict[str, Any]) -> bool:
    """Whether the run's base model is the embedded world model (``embedded``, or the folder it resolves to)."""
    from lightning_custom.families.components import embedded_model_path, resolve_model_path

    name = summary.get("pretrained_model_name_or_path")
    if not name:
        return False
    try:
        return Path(resolve_model_path(str(name))).resolve() == Path(embedded_model_path()).resolve()
    except UserInputError:
        return False


def world_identity(encoder: Any, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> MetricResult:
    """The world encoder's cosine similarity of each generated image to the concept images (CLIP-I's form)."""
    from lightning_custom.synthetic.world_encoder import judge

    return mean_similarity_to_references(judge(encoder, generated).embeddings, judge(encoder, references).embeddings)


def evaluate_run(
    run_dir: str | Path,
    *,
    concept_dir: str | None = None,
    prompts: Sequence[str] | None = None,
    sampling: SamplingOptions | None = None,
    clip_model: str = "openai/clip-vit-base-patch32",
    dino_model: str = "facebook/dino-vits16",
    metrics: Sequence[str] | None = None,
    output: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Sample the run's concept(s) and score them; write ``metrics.json`` (default: in the run folder), return it.

    ``metrics`` defaults to ``identity`` (the world encoder) on the embedded world model, else CLIP-I, CLIP-T and
    DINO. Each concept's images are compared with that concept's own images. See
    :func:`lightning_custom.inference.sampling.sample_run` for the sampling arguments (``guidance_scale`` ``None``: the
    model's own, e.g. 3.5 on FLUX, 7.0 on SD3, 7.5 on SD / SDXL; flow-matching models refuse a DDPM ``scheduler``):
    ``sampling`` (:class:`~lightning_custom.inference.options.SamplingOptions`), with ``**options`` changing its
    fields (``seed=3``).
    """
    start = time.perf_counter()
    sampling = replace(sampling or SamplingOptions(), **options)
    images_per_prompt, seed, scheduler = sampling.images_per_prompt, sampling.seed, sampling.scheduler
    base_model, device = sampling.base_model, sampling.device
    run = Path(run_dir).expanduser()
    summary = read_summary(run)
    check_trained(summary, run)
    world = is_world_model_run(summary) if base_model is None else False
    metrics = list(metrics) if metrics else list(WORLD_METRICS if world else HUB_METRICS)
    unknown = sorted(set(metrics) - set(METRIC_NAMES))
    if unknown:
        raise UserInputError(f"--metrics: {unknown} not among {list(METRIC_NAMES)}")
    if prompts is None and world:
        prompts = list(WORLD_PROMPTS)
    concepts = run_concepts(summary)
    if concept_dir is not None and len(concepts) > 1:
        raise UserInputError(f"--concept_dir: the run has {len(concepts)} concepts; each one's images come from its "
                             f"instance_data_dir in summary.json")
    needs_references = bool({"clip_i", "dino", "identity"} & set(metrics))
    references = {c["name"]: concept_images(run, summary, concept_dir, c) for c in concepts} if needs_references \
        else {}
    # A DDPM sampler on a flow model, and a bad model path, fail in a second, not after minutes of loading.
    check_sampler(scheduler, scheduler_class_of(pipeline_source(run, summary, base_model)), run)
    torch_device = resolve_device(device)
    # Load the scorers before sampling, so a bad model path fails in a second, not after minutes of sampling.
    clip_scorer = load_clip(clip_model, torch_device) if {"clip_i", "clip_t"} & set(metrics) else None
    dino_scorer = load_dino(dino_model, torch_device) if "dino" in metrics else None
    world_encoder = None
    if "identity" in metrics:
        from lightning_custom.synthetic.world_encoder import WorldEncoder

        world_encoder = WorldEncoder.load()
    samples_dir = run / "eval" / "samples"
    manifest = sample_run(
        run, prompts, sampling=sampling, output_dir=samples_dir,
    )
    records = manifest["images"]
    for record in records:
        record["concept"] = manifest["prompts"][record["prompt_index"]]["concept"]
    generated = [load_rgb_image(samples_dir / r["file"]) for r in records]
    texts = [manifest["prompts"][r["prompt_index"]]["text"] for r in records]
    image_metrics = {"clip_i": lambda g, r: clip_i(clip_scorer, g, r), "dino": lambda g, r: dino(dino_scorer, g, r),
                     "identity": lambda g, r: world_identity(world_encoder, g, r)}
    overall: dict[str, float] = {}  # a metric computed over every image in one call keeps that call's own mean
    for name in [m for m in METRIC_NAMES if m in metrics]:
        if name == "clip_t":
            scored = clip_t(clip_scorer, generated, texts)
            for record, value in zip(records, scored.per_image):
                record["clip_t"] = value
            overall[name] = scored.mean
            continue
        # Each concept's samples against that concept's own images (a prompt without '{}': the first concept's).
        for concept in concepts:
            indices = [i for i, r in enumerate(records) if (r["concept"] or concepts[0]["name"]) == concept["name"]]
            if indices:
                scored = image_metrics[name]([generated[i] for i in indices], references[concept["name"]])
                for i, value in zip(indices, scored.per_image):
                    records[i][name] = value
                if len(indices) == len(records):
                    overall[name] = scored.mean
    scored_names = [m for m in METRIC_NAMES if m in metrics]
    per_prompt = []
    for index, prompt in enumerate(manifest["prompts"]):
        rows = [r for r in records if r["prompt_index"] == index]
        per_prompt.append({"prompt": prompt["prompt"], "text": prompt["text"], "concept": prompt["concept"],
                           **{name: _mean(r[name] for r in rows) for name in scored_names}})
    per_concept = [
        {"name": c["name"], "placeholder_token": c.get("placeholder_token"),
         "concept_images": len(references.get(c["name"], [])),
         **{name: _mean(r[name] for r in records if r["concept"] == c["name"]) for name in scored_names}}
        for c in concepts
    ]
    result = {
        **{name: overall.get(name, _mean(r[name] for r in records)) for name in scored_names},
        "metrics": scored_names,
        "run_dir": str(run),
        "method": summary.get("method"),
        "stop_step": summary.get("stop_step"),
        "stopped_by": summary.get("stopped_by"),
        "num_prompts": len(manifest["prompts"]),
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "guidance_scale": manifest["guidance_scale"],  # the model's default when none was given
        "num_inference_steps": manifest["num_inference_steps"],  # the model's recommendation when none was given
        "scheduler": manifest.get("scheduler", scheduler),
        "height": sampling.height,
        "width": sampling.width,
        "clip_model": clip_model if clip_scorer is not None else None,
        "dino_model": dino_model if dino_scorer is not None else None,
        "world_encoder": "embedded" if world_encoder is not None else None,
        "concept_images": sum(len(images) for images in references.values()),
        "per_concept": per_concept,
        "samples_dir": str(samples_dir),
        "per_prompt": per_prompt,
        "per_image": records,
        "seconds": round(time.perf_counter() - start, 3),
        "sampling_seconds": manifest["seconds"],
    }
    write_json(Path(output) if output is not None else run / METRICS_FILE, result)
    return result


def is_flow_run(run_dir: str | Path, summary: dict[str, Any]) -> bool:
    """Whether the run's model samples with a flow-matching scheduler (FLUX.1, SD3/SD3.5), from its model index."""
    from lightning_custom.inference.pipelines import is_flow_scheduler

    return is_flow_scheduler(scheduler_class_of(pipeline_source(Path(run_dir), summary, None)))


def before_after_run(
    run_dir: str | Path,
    *,
    before_word: str,
    prompts: Sequence[str] = ("a photo of a {}",),
    num_images: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    scheduler: str = "default",
    encoder: str | None = None,
) -> dict[str, Any]:
    """The run's concept before and after training, side by side, with the same sampler on both sides.

    For any pipeline class, flow-matching models included: "before" is the base model prompted with
    ``before_word``, "after" the run's pipeline prompted with the learned token and class noun; image ``i`` uses
    seed ``seed + i`` on both sides. Scored by the world encoder's identity similarity to the concept images (a
    meaningful number on the world model only). :func:`lightning_custom.world.quickstart.before_after` is this
    with DDIM at the concept images' size.

    Args:
        run_dir: a finished fit (``summary.json`` + artifacts).
        before_word: the word standing for the concept before training.
        prompts: templates with ``{}`` for the concept.
        num_images: samples per prompt and per side.
        num_inference_steps: denoising steps.
        guidance_scale: guidance scale (``None``: the model's own; FLUX 3.5, SD3 7.0).
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        out: PNG path of the grid (default ``<run_dir>/before_after.png``).
        seed: the first seed.
        scheduler: ``"default"`` (each model's own sampler) or a name in
            :data:`lightning_custom.inference.sampling.SCHEDULERS`, used on both sides.
        encoder: world encoder folder (default: the shipped one).

    Returns:
        ``{"identity_before", "identity_after", "grid", "prompts"}`` (``prompts``: the prompts of each side).
    """
    from lightning_custom.families.components import resolve_model_path
    from lightning_custom.data.templates import concept_phrase
    from lightning_custom.synthetic.world_encoder import WorldEncoder, identity_similarity

    run = Path(run_dir)
    summary = read_summary(run)
    check_trained(summary, run)
    concept = run_concepts(summary)[0]  # a multi-concept run: its first concept
    token = concept_phrase(concept["placeholder_token"], concept.get("class_noun"))  # "sks toy" for DreamBooth
    after_pipe, _ = load_run_pipeline(run, scheduler=scheduler, device="cpu")
    # The base model through the same loader as the run (any pipeline class), with the same sampler.
    before_pipe = load_pipeline(resolve_model_path(summary["pretrained_model_name_or_path"]),
                                argument="summary.json pretrained_model_name_or_path")
    replace_scheduler(before_pipe, scheduler, str(run))
    before_pipe.set_progress_bar_config(disable=True)
    references = concept_images(run, summary, None)
    model = WorldEncoder.load(encoder)
    seeds = [seed + i for i in range(num_images)]
    images, labels, scores, used = [], [], {}, {"before": [], "after": []}
    for side, pipe, word in (("before", before_pipe, before_word), ("after", after_pipe, token)):
        side_images = []
        for template in prompts:
            prompt = template.format(word)
            batch = generate(pipe, [prompt] * num_images, seeds, guidance_scale=guidance_scale,
                             num_inference_steps=num_inference_steps, height=height, width=width,
                             batch_size=num_images)
            side_images += batch
            labels.append(f"{side}: {prompt}")
            used[side].append(prompt)
        images += side_images
        scores[f"identity_{side}"] = identity_similarity(model, side_images, references)
    images += references[:num_images]
    labels.append("concept images")
    grid = labelled_grid(images, labels, columns=num_images, cell=96)
    path = write_png(grid, Path(out) if out else run / "before_after.png")
    return {**scores, "grid": str(path), "prompts": used}


def _mean(values: Any) -> float | None:
    """The mean of the values (``None`` when there are none)."""
    values = list(values)
    return sum(values) / len(values) if values else None
