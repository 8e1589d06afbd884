"""A micro text-to-image world: procedural images (:mod:`.render`), its encoder (:mod:`.encoder`) and held-out
concepts (:mod:`.concepts`), in which DVAR's "stops earlier at the same quality" can be measured offline."""

from lightning_custom.world.concepts import Concept, heldout_concepts, make_concept
from lightning_custom.world.render import (
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
