"""A prompt fidelity that can fail: the world encoder's check that a prompt's words still win over the learned
concept (see the comment below), sampled during a run's probes or afterwards from its snapshots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L

from lightning_custom.world.probe import RebuiltRun, WorldProbe, load_snapshot, prepared_probe

# WorldProbe's prompt fidelity asks for the concept on another background. The background fills most of a 32 px
# image and no concept image fixes it, so long training never hurts it (1.00 at every probe of the long runs). The
# checks below ask for what training on the concept's images does fight against:
# * "recolour": the concept in a palette colour it never has ("a photo of a blue <c000> on a green background"), the
#   encoder's colour head must name the prompted colour. A token (or weights) that has absorbed the concept's own
#   colour overrides the word: the world's analogue of CLIP-T falling as a run goes on (the paper's trade-off).
# * "prior": describable objects WITHOUT the concept ("a photo of a red star on a blue background"), every head
#   right. Fine-tuned weights (LoRA, Custom Diffusion, DreamBooth) can drift from the class prior; Textual
#   Inversion's cannot (only the new token's embedding trains), which the measure shows as a constant.
FIDELITY_GROUPS: tuple[str, ...] = ("recolour", "prior")


@dataclass(frozen=True)
class FidelityCheck:
    """One prompt and what the encoder must see in its images.

    Attributes:
        group: ``"recolour"`` or ``"prior"`` (see :data:`FIDELITY_GROUPS`).
        prompt: the prompt; ``{}`` stands for the concept phrase (a prior check has none).
        targets: encoder head -> the label it must predict, e.g. ``{"colour": "blue", "background": "green"}``.
    """

    group: str
    prompt: str
    targets: dict[str, str]


def fidelity_checks(concept: Any, recolour: int = 3, prior: int = 2) -> list[FidelityCheck]:
    """Deterministic checks for a held-out :class:`~lightning_custom.synthetic.world_concepts.Concept`.

    Recolour: the palette colours farthest (RGB distance) from the concept's own colour(s), each on one of its
    evaluation backgrounds whose name differs from the colour. Prior: describable objects (a vocabulary shape that
    is not the concept's, a palette colour, an evaluation background), every head checked.
    """
    import numpy as np

    from lightning_custom.synthetic.world_render import COLOURS, SHAPES, rgb

    own = [rgb(c) for c in (concept.attrs.colour, concept.attrs.second_colour) if c]
    distance = {name: min(float(np.linalg.norm(np.subtract(value, o))) for o in own) for name, value in COLOURS.items()}
    far = sorted((n for n in COLOURS if n not in (concept.attrs.colour, concept.attrs.second_colour)),
                 key=lambda n: -distance[n])
    backgrounds = list(concept.eval_backgrounds)
    checks = []
    for k in range(recolour):
        background = backgrounds[k % len(backgrounds)]
        colour = next(c for c in far if c != background and all(c != ch.targets["colour"] for ch in checks))
        checks.append(FidelityCheck("recolour", f"a photo of a {colour} {{}} on a {background} background",
                                    {"colour": colour, "background": background}))
    shapes = [s for s in SHAPES if s != concept.attrs.shape]
    for k in range(prior):
        shape, background = shapes[(3 * k) % len(shapes)], backgrounds[(k + 1) % len(backgrounds)]
        colour = next(c for c in far[k:] + far if c != background)
        checks.append(FidelityCheck("prior", f"a photo of a {colour} {shape} on a {background} background",
                                    {"shape": shape, "colour": colour, "background": background}))
    return checks


def fidelity_hits(labels: dict[str, list[str]], targets: list[dict[str, str]]) -> list[bool]:
    """Per image: does the encoder's every targeted head name the target (``labels`` as in ``judge(...).labels``)."""
    return [all(labels[head][i] == label for head, label in target.items()) for i, target in enumerate(targets)]


def fidelity_scores(images: list, targets: list[dict[str, str]], groups: list[str], encoder: Any) -> dict[str, float]:
    """The share of images that pass their check, per group (``nan`` for a group without images)."""
    import numpy as np

    from lightning_custom.synthetic.world_encoder import judge

    hits = fidelity_hits(judge(encoder, images).labels, targets)
    return {g: float(np.mean([h for h, gi in zip(hits, groups) if gi == g])) if g in groups else float("nan")
            for g in FIDELITY_GROUPS}


def sample_fidelity(probe: WorldProbe, pl_module: L.LightningModule, phrase: str, checks: list[FidelityCheck],
                    seed: int | None = None) -> dict[str, float]:
    """Sample ``probe.num_images`` images per check with ``probe``'s sampler settings and score them by group."""
    from lightning_custom.data.templates import format_prompt
    from lightning_custom.inference.pipelines import pipeline_from_module
    from lightning_custom.inference.sampling import generate

    n, first = probe.num_images, probe.seed if seed is None else seed
    prompts = [format_prompt(c.prompt, phrase) if "{}" in c.prompt else c.prompt for c in checks for _ in range(n)]
    size = probe._references[0].size[0]
    was_training = pl_module.training
    images = generate(pipeline_from_module(pl_module, "ddim"), prompts, [first + i for i in range(len(prompts))],
                      height=size, width=size, guidance_scale=probe.guidance_scale,
                      num_inference_steps=probe.num_inference_steps, batch_size=len(prompts))
    pl_module.train(was_training)
    return fidelity_scores(images, [c.targets for c in checks for _ in range(n)],
                           [c.group for c in checks for _ in range(n)], probe._encoder)


def fidelity_snapshots(run: RebuiltRun, snapshot_dir: str | Any, steps: list[int],
                       checks: list[FidelityCheck], seed: int | None = None) -> dict[int, dict[str, float]]:
    """:func:`sample_fidelity` of saved trainable weights, after the run; step 0 is the weights before training."""
    probe, module, phrase, trainable = prepared_probe(run)
    out: dict[int, dict[str, float]] = {}
    for step in sorted(steps):  # step 0 first: the freshly built module holds its weights
        if step:
            load_snapshot(module, snapshot_dir, step, trainable)
        out[step] = sample_fidelity(probe, module, phrase, checks, seed)
    return out
