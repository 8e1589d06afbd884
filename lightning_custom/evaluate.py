"""Evaluate a finished run: N prompts x M images per prompt with fixed seeds, scored by CLIP-I, CLIP-T and DINO.

Image ``j`` of every prompt uses seed ``seed + j``, so two runs (or two stopping rules) evaluated with the same
settings are compared on the same initial noise. Writes the samples under ``<run>/eval/`` and ``metrics.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lightning_custom.data.images import list_image_files, load_rgb_image
from lightning_custom.errors import UserInputError
from lightning_custom.io import write_json
from lightning_custom.metrics import clip_i, clip_t, dino, load_clip, load_dino
from lightning_custom.sampling import read_summary, resolve_device, sample_run

METRICS_FILE = "metrics.json"
METRIC_NAMES = ("clip_i", "clip_t", "dino")


def concept_images(run_dir: Path, summary: dict[str, Any], concept_dir: str | None) -> list[Image.Image]:
    """The concept images: ``concept_dir``, else the ``instance_data_dir`` recorded in the run's summary."""
    folder = concept_dir or summary.get("instance_data_dir")
    if not folder:
        raise UserInputError(f"--concept_dir: {run_dir / 'summary.json'} records no instance_data_dir; pass --concept_dir")
    return [load_rgb_image(f) for f in list_image_files(folder, "--concept_dir")]


def evaluate_run(
    run_dir: str | Path,
    *,
    concept_dir: str | None = None,
    prompts: Sequence[str] | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    scheduler: str = "default",
    clip_model: str = "openai/clip-vit-base-patch32",
    dino_model: str = "facebook/dino-vits16",
    metrics: Sequence[str] = METRIC_NAMES,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    base_model: str | None = None,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Sample the run's concept and score it; write ``metrics.json`` (default: in the run folder) and return it.

    See :func:`lightning_custom.sampling.sample_run` for the sampling arguments.
    """
    start = time.perf_counter()
    run = Path(run_dir).expanduser()
    summary = read_summary(run)
    unknown = sorted(set(metrics) - set(METRIC_NAMES))
    if unknown or not metrics:
        raise UserInputError(f"--metrics: {unknown or 'none'} not among {list(METRIC_NAMES)}")
    references = concept_images(run, summary, concept_dir) if {"clip_i", "dino"} & set(metrics) else []
    torch_device = resolve_device(device)
    # Load the scorers before sampling, so a bad model path fails in a second, not after minutes of sampling.
    clip_scorer = load_clip(clip_model, torch_device) if {"clip_i", "clip_t"} & set(metrics) else None
    dino_scorer = load_dino(dino_model, torch_device) if "dino" in metrics else None
    samples_dir = run / "eval" / "samples"
    manifest = sample_run(
        run, prompts, images_per_prompt=images_per_prompt, seed=seed, guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps, scheduler=scheduler, batch_size=batch_size, output_dir=samples_dir,
        base_model=base_model, device=device, dtype=dtype,
    )
    records = manifest["images"]
    generated = [load_rgb_image(samples_dir / r["file"]) for r in records]
    texts = [manifest["prompts"][r["prompt_index"]]["text"] for r in records]
    scores: dict[str, Any] = {}
    if "clip_i" in metrics:
        scores["clip_i"] = clip_i(clip_scorer, generated, references)
    if "clip_t" in metrics:
        scores["clip_t"] = clip_t(clip_scorer, generated, texts)
    if "dino" in metrics:
        scores["dino"] = dino(dino_scorer, generated, references)
    for name, result in scores.items():
        for record, value in zip(records, result.per_image):
            record[name] = value
    per_prompt = []
    for index, prompt in enumerate(manifest["prompts"]):
        rows = [r for r in records if r["prompt_index"] == index]
        per_prompt.append({"prompt": prompt["prompt"], "text": prompt["text"],
                           **{name: sum(r[name] for r in rows) / len(rows) for name in scores}})
    result = {
        **{name: value.mean for name, value in scores.items()},
        "run_dir": str(run),
        "method": summary.get("method"),
        "stop_step": summary.get("stop_step"),
        "stopped_by": summary.get("stopped_by"),
        "num_prompts": len(manifest["prompts"]),
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "scheduler": scheduler,
        "clip_model": clip_model if clip_scorer is not None else None,
        "dino_model": dino_model if dino_scorer is not None else None,
        "concept_images": len(references),
        "samples_dir": str(samples_dir),
        "per_prompt": per_prompt,
        "per_image": records,
        "seconds": round(time.perf_counter() - start, 3),
        "sampling_seconds": manifest["seconds"],
    }
    write_json(Path(output) if output is not None else run / METRICS_FILE, result)
    return result
