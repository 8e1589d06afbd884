"""``sample`` and ``evaluate``: images of a finished run's concept, and their scores."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_custom.errors import UserInputError
from lightning_custom.inference.options import SamplingOptions


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
    output_dir: str | None = None,
    sampling: SamplingOptions = SamplingOptions(),
) -> dict:
    """Generate images with the concept a finished run learned; write the PNGs, a labelled grid and samples.json.

    Example: python -m lightning_custom sample runs/my-dog --prompts "a photo of {} on the moon" (one template) or
    --prompts '["a photo of {}", "a red {}"]' (several).

    Args:
        run_dir: the run folder (the fit's default_root_dir, holding summary.json and the artifacts).
        prompts: one prompt template or a list; '{}' becomes the run's token with its class noun ("sks dog"), once per
            concept (default: 8 object prompts).
        prompts_file: a text file with one prompt template per line (added after --prompts).
        output_dir: where to write (default: <run_dir>/samples).
        sampling: the sampling settings, given as their own options (--seed, --images_per_prompt, ...).
    """
    from lightning_custom.inference.sampling import sample_run

    manifest = sample_run(run_dir, _read_prompts(prompts, prompts_file), sampling=sampling, output_dir=output_dir)
    out = Path(output_dir) if output_dir else Path(run_dir) / "samples"
    print(f"wrote {len(manifest['images'])} images and {out / manifest['grid']} in {manifest['seconds']:.1f} s")
    return manifest


def evaluate(
    run_dir: str,
    concept_dir: str | None = None,
    prompts: list[str] | str | None = None,
    prompts_file: str | None = None,
    clip_model: str = "openai/clip-vit-base-patch32",
    dino_model: str = "facebook/dino-vits16",
    metrics: list[str] | None = None,
    output: str | None = None,
    sampling: SamplingOptions = SamplingOptions(),
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
        clip_model: CLIP for CLIP-I and CLIP-T: hub id or local folder.
        dino_model: DINO ViT for the DINO score: hub id or local folder (the paper: ViT-S/16).
        metrics: any of clip_i, clip_t, dino, identity (the world encoder; default: identity on the embedded world
            model, else the other three).
        output: where to write the metrics (default: <run_dir>/metrics.json).
        sampling: the sampling settings, given as their own options (--seed, --images_per_prompt, ...): M images
            per prompt.
    """
    from lightning_custom.inference.evaluate import METRIC_NAMES, evaluate_run

    result = evaluate_run(run_dir, concept_dir=concept_dir, prompts=_read_prompts(prompts, prompts_file),
                          sampling=sampling, clip_model=clip_model, dino_model=dino_model, metrics=metrics,
                          output=output)
    scores = ", ".join(f"{name} {result[name]:.4f}" for name in METRIC_NAMES if result.get(name) is not None)
    print(f"{result['num_prompts']} prompts x {sampling.images_per_prompt} images: {scores}")
    written = Path(output) if output else Path(run_dir) / "metrics.json"
    print(f"wrote {written} and the samples in {result['samples_dir']}")
    return result
