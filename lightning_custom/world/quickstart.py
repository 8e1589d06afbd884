"""Before/after evidence for the quickstart: samples of the concept before and after training, and how much the
world encoder's identity similarity rose (issue 5, item 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_custom.sampling import check_trained, generate, labelled_grid, read_summary, run_concepts, write_png


def before_after(run_dir: str | Path, *, before_word: str = "shape", prompts: list[str] | None = None,
                 num_images: int = 4, num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 out: str | Path | None = None, encoder: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Samples the run's prompts with the base model (the concept's token replaced by ``before_word``, i.e. where
    Textual Inversion starts) and with the learned concept; writes a labelled grid; returns both identity scores.

    Args:
        run_dir: a finished fit (``summary.json`` + artifacts).
        before_word: the word standing for the concept before training (the initializer token).
        prompts: templates with ``{}`` for the concept (default ``["a photo of a {}"]``).
        num_images: samples per prompt and per side.
        num_inference_steps: DDIM steps.
        guidance_scale: classifier-free guidance scale.
        out: PNG path of the grid (default ``<run_dir>/before_after.png``).
        encoder: world encoder folder (default: the shipped one).
        seed: image ``i`` uses seed ``seed + i`` on both sides.

    Returns:
        ``{"identity_before", "identity_after", "grid", "prompts"}`` (``prompts``: the prompts of each side).
    """
    from lightning_custom.components import resolve_model_path
    from lightning_custom.evaluate import concept_images
    from lightning_custom.sampling import load_pipeline, load_run_pipeline, make_scheduler
    from lightning_custom.world.encoder import WorldEncoder, identity_similarity

    run = Path(run_dir)
    summary = read_summary(run)
    check_trained(summary, run)
    from lightning_custom.data.templates import concept_phrase

    concept = run_concepts(summary)[0]  # a multi-concept run: its first concept
    token = concept_phrase(concept["placeholder_token"], concept.get("class_noun"))  # "sks star" for DreamBooth
    templates = prompts or ["a photo of a {}"]
    after_pipe, _ = load_run_pipeline(run, scheduler="ddim", device="cpu")
    # The base model through the same loader as the run (any pipeline class: SD, SDXL), with the same sampler.
    before_pipe = load_pipeline(resolve_model_path(summary["pretrained_model_name_or_path"]),
                                argument="summary.json pretrained_model_name_or_path")
    before_pipe.scheduler = make_scheduler("ddim", before_pipe.scheduler.config)
    before_pipe.set_progress_bar_config(disable=True)
    references = concept_images(run, summary, None)
    size = references[0].size[0]
    model = WorldEncoder.load(encoder)
    seeds = [seed + i for i in range(num_images)]
    images, labels, scores, used = [], [], {}, {"before": [], "after": []}
    for side, pipe, word in (("before", before_pipe, before_word), ("after", after_pipe, token)):
        side_images = []
        for template in templates:
            prompt = template.format(word)
            batch = generate(pipe, [prompt] * num_images, seeds, guidance_scale=guidance_scale,
                             num_inference_steps=num_inference_steps, height=size, width=size, batch_size=num_images)
            side_images += batch
            images += batch
            labels.append(f"{side}: {prompt}")
            used[side].append(prompt)
        scores[f"identity_{side}"] = identity_similarity(model, side_images, references)
    images += references[:num_images]
    labels.append("concept images")
    grid = labelled_grid(images, labels, columns=num_images, cell=96)
    path = write_png(grid, Path(out) if out else run / "before_after.png")
    return {**scores, "grid": str(path), "prompts": used}
