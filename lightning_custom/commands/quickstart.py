"""``before_after``: a run's concept before and after training, side by side."""

from __future__ import annotations

from pathlib import Path

from lightning_custom.errors import UserInputError


def before_after(
    run_dir: str,
    before_word: str | None = None,
    prompts: list[str] | str | None = None,
    images_per_prompt: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    output: str | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """Samples a run's concept before and after training side by side, scored by the world encoder.

    Made for runs on the embedded world model (the quickstart): "before" prompts the base model with the word the
    concept's token started from (or its class noun), "after" with the learned token and the class noun. Writes a
    labelled grid and prints the identity similarity (world-encoder cosine similarity to the concept images) of
    both sides. SD and SDXL runs sample with DDIM at the concept images' size; FLUX.1 and SD3 runs with their own
    flow-matching sampler at the model's size (or --height / --width).

    Args:
        run_dir: the run folder (the fit's default_root_dir, holding summary.json and the artifacts).
        before_word: the word standing for the concept before training (default: the "after" prompt with the
            identifier removed: the class noun of a DreamBooth-style run, else the token's initializer_token).
        prompts: templates with '{}' for the concept (default: "a photo of a {}" and "a photo of a {} on a grey
            background").
        images_per_prompt: images per prompt and per side; image j uses seed + j on both sides.
        num_inference_steps: denoising steps.
        guidance_scale: guidance scale (default: 4.0 on SD and SDXL runs; the model's own on FLUX.1, 3.5, and SD3,
            7.0).
        output: PNG path of the grid (default: <run_dir>/before_after.png).
        seed: the first seed.
        height: image height in pixels, FLUX.1 and SD3 runs (default: the model's).
        width: image width in pixels, FLUX.1 and SD3 runs (default: the model's).

    Returns:
        ``{"identity_before", "identity_after", "grid"}``.
    """
    from lightning_custom.inference.evaluate import before_after_run, is_flow_run
    from lightning_custom.runs.summary import check_trained, read_summary
    from lightning_custom.world.quickstart import before_after as sample_before_after

    run = Path(run_dir)
    if not (run / "summary.json").is_file():
        raise UserInputError(f"run_dir: {run_dir} holds no summary.json (is it a finished fit's default_root_dir?)")
    summary = read_summary(run)
    check_trained(summary, run)  # before looking for the word: the more useful error comes first
    if before_word is None:
        before_word = _initializer_token(run)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    prompts = prompts or ["a photo of a {}", "a photo of a {} on a grey background"]
    if is_flow_run(run, summary):  # DDIM (the world model's sampler) does not apply to flow-matching models
        result = before_after_run(run, before_word=before_word, prompts=prompts, num_images=images_per_prompt,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  height=height, width=width, out=output, seed=seed)
    else:
        result = sample_before_after(run, before_word=before_word, prompts=prompts, num_images=images_per_prompt,
                                     num_inference_steps=num_inference_steps,
                                     guidance_scale=4.0 if guidance_scale is None else guidance_scale, out=output,
                                     seed=seed)
    gain = result["identity_after"] - result["identity_before"]
    print(f"identity similarity to the concept images: before {result['identity_before']:.3f} -> after "
          f"{result['identity_after']:.3f} ({gain:+.3f}); grid: {result['grid']}")
    return result


def _initializer_token(run: Path) -> str:
    """The word of the "before" side: the "after" prompt with the identifier removed. A run with a class noun
    (DreamBooth: "a photo of a sks dog") compares with its class noun ("a photo of a dog"); a token without one
    (Textual Inversion) with the word it started from (the run's ``initializer_token``). Else a one-line error asking
    for ``--before_word``."""
    import yaml

    from lightning_custom.runs.summary import read_summary

    summary = read_summary(run)
    concepts = summary.get("concepts") or [{}]
    class_noun = (concepts[0] or {}).get("class_noun") or summary.get("class_noun")
    if class_noun:
        return class_noun
    config = run / "config.yaml"
    token = None
    if config.is_file():
        loaded = yaml.safe_load(config.read_text()) or {}
        token = ((loaded.get("model") or {}).get("init_args") or {}).get("initializer_token")
    token = token or summary.get("initializer_token")  # a fleet's concept folder
    if not token:
        raise UserInputError(f"--before_word: {run} has no config.yaml naming an initializer_token; give the word "
                             f"the concept's token started from")
    return token
