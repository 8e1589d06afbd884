"""A micro text-to-image world, in which DVAR's "stops earlier at the same quality" can be measured offline.

Its procedural images, encoder and held-out concepts live in :mod:`lightning_custom.synthetic` (``world_render``,
``world_encoder``, ``world_concepts``, ``world_identity``; the old ``lightning_custom.world.render`` etc. still
import); this folder holds what is built on them: the world model (:mod:`.model`), the probe callback
(:mod:`.probe`) and the quickstart's before/after grid (:mod:`.quickstart`)."""

from lightning_custom.synthetic.world_concepts import Concept, heldout_concepts, make_concept
from lightning_custom.synthetic.world_render import (
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    SHAPES,
    Attributes,
    caption,
    random_caption,
    render,
    render_dataset,
    training_combinations,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "PATTERNS", "SHAPES", "Attributes", "Concept", "caption", "heldout_concepts",
    "make_concept", "random_caption", "render", "render_dataset", "training_combinations", "vocabulary",
]
