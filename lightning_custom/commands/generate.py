"""``sample`` and ``evaluate``: images of a finished run's concept, and their scores."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_custom.errors import UserInputError


def _read_prompts(prompts: list[str] | str | None, prompts_file: str | None) -> list[str] | None:
    """Prompts given inline (one string or a list), then one per line of ``prompts_file`` (blank lines and ``#``
    comments skipped)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts_file is None:
        return _warn_without_concept(prompts)
    path = Path(prompts_file).expanduser()
    if not path.is_file():
        raise UserInputError(f"--prompts_file: no such file {prompts_file!r}")
    lines = [line.strip() for line in path.read_text().splitlines()]
    listed = [line for line in lines if line and not line.startswith("#")]
    if not listed:
        raise UserInputError(f"--prompts_file: {prompts_file} holds no prompts")
    return _warn_without_concept((prompts or []) + listed)


def _warn_without_concept(prompts: list[str] | None) -> list[str] | None:
    """One line for each prompt without ``{}``: it is sampled as typed, without the learned concept."""
    for prompt in prompts or []:
        if "{}" not in prompt:
            print(f"warning: the prompt {prompt!r} has no '{{}}', so it does not hold the learned concept (write "
                  "'a photo of {} on the moon' to use it)", file=sys.stderr)
    return prompts


def sample(
    run_dir: str,
    prompts: list[str] | str | None = None,
    prompts_file: str | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    output_dir: str | None = None,
    base_model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Generate images with the concept a finished run learned; write the PNGs, a labelled grid and samples.json.

    Example: python -m lightning_custom sample runs/my-dog --prompts "a photo of {} on the moon" (one template) or
    --prompts '["a photo of {}", "a red {}"]' (several).

    Args:
        run_dir: the run folder (the fit's default_root_dir, holding summary.json and the artifacts).
        prompts: one prompt template or a list; '{}' becomes the run's token with its class noun ("sks dog"), once per
            concept (default: 8 object prompts).
        prompts_file: a text file with one prompt template per line (added after --prompts).
        images_per_prompt: images per prompt; image j of every prompt uses seed + j.
        seed: the first seed.
        guidance_scale: guidance scale (default: the model folder's sampling_defaults.json, 4.0 on the embedded
            world model; else the model's own: 7.5 on SD and SDXL, 3.5 on FLUX.1, 7.0 on SD3).
        num_inference_steps: denoising steps (default: the model folder's recommendation, 25 on the embedded world
            model; else 50).
        scheduler: sampler: default (the model folder's recommendation, DDIM on the embedded world model; else the
            model's own), ddim, dpm++, euler, pndm or ddpm (SD and SDXL only; FLUX.1 and SD3 keep their
            flow-matching sampler).
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        batch_size: images generated at once.
        output_dir: where to write (default: <run_dir>/samples).
        base_model: load this base model instead of the one recorded in summary.json.
        device: auto, cpu, cuda, cuda:1, ...
        dtype: auto (on CUDA float16, bfloat16 for FLUX.1 and SD3; else float32), float32, float16 or bfloat16.
    """
    from lightning_custom.inference.sampling import sample_run

    manifest = sample_run(
        run_dir, _read_prompts(prompts, prompts_file), images_per_prompt=images_per_prompt, seed=seed,
        guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, scheduler=scheduler, height=height,
        width=width, batch_size=batch_size, output_dir=output_dir, base_model=base_model, device=device, dtype=dtype,
    )
    out = Path(output_dir) if output_dir else Path(run_dir) / "samples"
    print(f"wrote {len(manifest['images'])} images and {out / manifest['grid']} in {manifest['seconds']:.1f} s")
    return manifest


def evaluate(
    run_dir: str,
    concept_dir: str | None = None,
    prompts: list[str] | str | None = None,
    prompts_file: str | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    clip_model: str = "openai/clip-vit-base-patch32",
    dino_model: str = "facebook/dino-vits16",
    metrics: list[str] | None = None,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    base_model: str | None = None,
    output: str | None = None,
) -> dict:
    """Score a finished run: sample N prompts x M images with fixed seeds, then CLIP-I, CLIP-T and DINO.

    On the embedded world model the default is the world encoder's identity similarity (no download). Each concept
    of a multi-concept run gets its own prompts and is scored against its own images.

    Args:
        run_dir: the run folder (holding summary.json and the artifacts).
        concept_dir: the concept images (default: each concept's instance_data_dir recorded in summary.json).
        prompts: one prompt template or a list, with '{}' for the concept (default: 8 object prompts; on the world
            model, its 2 quickstart prompts).
        prompts_file: a text file with one prompt template per line.
        images_per_prompt: images per prompt (M); image j of every prompt uses seed + j.
        seed: the first seed.
        guidance_scale: guidance scale (default: the model's own: 7.5 on SD and SDXL, 3.5 on FLUX.1, 7.0 on SD3).
        num_inference_steps: denoising steps.
        scheduler: sampler: default, ddim, dpm++, euler, pndm or ddpm (SD and SDXL only).
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        clip_model: CLIP for CLIP-I and CLIP-T: hub id or local folder.
        dino_model: DINO ViT for the DINO score: hub id or local folder (the paper: ViT-S/16).
        metrics: any of clip_i, clip_t, dino, identity (the world encoder; default: identity on the embedded world
            model, else the other three).
        batch_size: images generated at once.
        device: auto, cpu, cuda, ...
        dtype: auto, float32, float16 or bfloat16 (of the diffusion model).
        base_model: load this base model instead of the one recorded in summary.json.
        output: where to write the metrics (default: <run_dir>/metrics.json).
    """
    from lightning_custom.inference.evaluate import METRIC_NAMES, evaluate_run

    result = evaluate_run(
        run_dir, concept_dir=concept_dir, prompts=_read_prompts(prompts, prompts_file),
        images_per_prompt=images_per_prompt, seed=seed, guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps, scheduler=scheduler, height=height, width=width,
        clip_model=clip_model, dino_model=dino_model,
        metrics=metrics, batch_size=batch_size, device=device, dtype=dtype, base_model=base_model,
        output=output,
    )
    scores = ", ".join(f"{name} {result[name]:.4f}" for name in METRIC_NAMES if result.get(name) is not None)
    print(f"{result['num_prompts']} prompts x {images_per_prompt} images: {scores}")
    written = Path(output) if output else Path(run_dir) / "metrics.json"
    print(f"wrote {written} and the samples in {result['samples_dir']}")
    return result
