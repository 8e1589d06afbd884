"""Before/after evidence for the quickstart: samples of the concept before and after training, and how much the
world encoder's identity similarity rose (issue 5, item 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_custom.runs.summary import check_trained, read_summary


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
    from lightning_custom.inference.evaluate import before_after_run, concept_images

    run = Path(run_dir)
    summary = read_summary(run)
    check_trained(summary, run)
    size = concept_images(run, summary, None)[0].size[0]  # the world's images are square, at the model's resolution
    return before_after_run(run, before_word=before_word, prompts=prompts or ["a photo of a {}"],
                            num_images=num_images, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, height=size, width=size, out=out, seed=seed,
                            scheduler="ddim", encoder=encoder)
