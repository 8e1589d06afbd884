"""An identity measure that tells a concept from its own class (issue 25, Part 1).

The world encoder's cosine similarity to the concept images (``identity_similarity``, CLIP-I's form) already scores
the untrained model at 84-93% of the converged value: a striped olive star and a plain red star are both "stars" to
an embedding trained to name shapes. DreamBench prefers DINO to CLIP-I for subject identity for the same reason.

This measure asks the question directly. Per concept, a logistic regression on the encoder's embeddings is fitted to
tell renders of the concept (its shape, colours and pattern, on every background, at many positions and scales) from
renders of its near misses: the same object with one or two parts changed (another shape, another colour, another
pattern or second colour). A generated image's score is the probability that it shows the concept, and a probe's
score is the mean over its images. The untrained model draws its class (the initializer's shape) and scores near 0;
a model that learned the concept scores near 1.

Everything is deterministic: renders come from fixed seeds, and the regression is fitted by full-batch L-BFGS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from lightning_custom.synthetic.world_concepts import Concept
from lightning_custom.synthetic.world_encoder import WorldEncoder, judge
from lightning_custom.synthetic.world_render import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, Attributes, render

RENDERS_PER_SIDE = 256  # positives and negatives each: enough to fit 129 weights with L2 without overfitting
L2 = 1e-5  # on the weights (not the bias), per sample: held-out renders 0.91 concept / 0.05 near miss (c050-c053)


def concept_renders(concept: Concept, n: int = RENDERS_PER_SIDE, seed: int = 0, size: int = 32) -> list[Image.Image]:
    """``n`` renders of the concept itself, on every background the world has, at random positions and scales."""
    rng = np.random.default_rng([seed, 1])
    backgrounds = [b for b in BACKGROUNDS if b not in (concept.attrs.colour, concept.attrs.second_colour)]
    return [render(replace(concept.attrs, background=backgrounds[i % len(backgrounds)]),
                   int(rng.integers(2**31 - 1)), size) for i in range(n)]


def near_misses(concept: Concept, n: int = RENDERS_PER_SIDE, seed: int = 0) -> list[Attributes]:
    """``n`` objects that differ from the concept in one or two parts: its shape, its colour, its pattern (or
    second colour); the rest is the concept's. The class of the concept, as a prompt without its token draws it."""
    rng = np.random.default_rng([seed, 2])
    own = concept.attrs
    shapes = [s for s in SHAPES if s != own.shape] + [f"poly:{9_000_000 + k}" for k in range(8)]
    colours = [c for c in COLOURS if c not in (own.colour, own.second_colour)]
    patterns = [p for p in PATTERNS if p != own.pattern]
    backgrounds = list(BACKGROUNDS)
    out = []
    for i in range(n):
        parts = rng.choice(3, size=1 + int(rng.integers(2)), replace=False)
        attrs = replace(own, background=backgrounds[i % len(backgrounds)])
        if 0 in parts:
            attrs = replace(attrs, shape=str(rng.choice(shapes)))
        if 1 in parts:
            attrs = replace(attrs, colour=str(rng.choice(colours)))
        if 2 in parts:
            if own.second_colour is not None:
                attrs = replace(attrs, second_colour=str(rng.choice([c for c in colours if c != attrs.colour])))
            else:
                attrs = replace(attrs, pattern=str(rng.choice(patterns)))
        if attrs.background in (attrs.colour, attrs.second_colour):
            attrs = replace(attrs, background=next(b for b in backgrounds if b not in (attrs.colour,
                                                                                        attrs.second_colour)))
        out.append(attrs)
    return out


class ConceptDiscriminator:
    """P(image shows the concept), from a logistic regression on the world encoder's embeddings.

    Args:
        encoder: the world encoder.
        concept: the concept to recognise.
        seed: the renders' seed (the fit is deterministic given it).
        renders_per_side: concept renders, and as many near-miss renders.
    """

    def __init__(self, encoder: WorldEncoder, concept: Concept, seed: int = 0,
                 renders_per_side: int = RENDERS_PER_SIDE) -> None:
        self.encoder = encoder
        rng = np.random.default_rng([seed, 3])
        positives = concept_renders(concept, renders_per_side, seed)
        negatives = [render(a, int(rng.integers(2**31 - 1))) for a in near_misses(concept, renders_per_side, seed)]
        features = judge(encoder, positives + negatives).embeddings.double()
        labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
        self.weight, self.bias = fit_logistic(features, labels, L2)
        self.train_accuracy = float(((features @ self.weight + self.bias > 0).double() == labels).double().mean())

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Per image, the probability that it shows the concept."""
        features = judge(self.encoder, images).embeddings.double()
        return torch.sigmoid(features @ self.weight + self.bias).numpy()

    def score(self, images: Sequence[Image.Image]) -> float:
        """The mean probability over ``images`` (a probe's identity)."""
        return float(self.probabilities(images).mean())


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, l2: float, iterations: int = 200
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` minimising the mean logistic loss + ``l2`` * |weight|^2 (full batch, L-BFGS)."""
    weight = torch.zeros(features.shape[1], dtype=features.dtype, requires_grad=True)
    bias = torch.zeros((), dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(features @ weight + bias, labels)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()
