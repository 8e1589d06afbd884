"""Where the package's shipped models and concepts are, and the folder names that stand for them.

``"embedded"`` and ``"embedded:<name>"`` name a model or concept in ``lightning_custom/assets`` (or, for the tiny
flow models, built offline into a cache on first use); ``"world:<i>"`` names held-out concept ``i`` of the micro
world, rendered once into the cache.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from lightning_custom.runtime.io import atomic_path, default_cache_root

EMBEDDED_MODELS = ("world-sd", "tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-sd3")
#: Built in-process on first use (deterministic tiny random weights) and cached, instead of shipped as files.
BUILT_EMBEDDED_MODELS = ("tiny-flux", "tiny-sd3")
EMBEDDED_CONCEPTS = ("striped-star", "cat-toy")


def _asset(*parts: str) -> str:
    return str(resources.files("lightning_custom").joinpath("assets", *parts))


def embedded_model_path(name: str = "world-sd") -> str:
    """Path of a small SD-architecture model shipped inside the package (runs offline).

    Args:
        name: ``"world-sd"`` (the default: the micro text-to-image model trained on the package's procedural world,
            see ``lightning_custom.world``), ``"tiny-sd"`` (random weights, the fastest) or ``"tiny-sdxl"``.
    """
    return _asset(name)


def embedded_sdxl_path() -> str:
    """Path of the small SDXL-architecture model shipped inside the package (runs offline)."""
    return embedded_model_path("tiny-sdxl")


def embedded_concept_path(name: str = "striped-star") -> str:
    """Path of an example concept shipped inside the package: ``"striped-star"`` (the default: a held-out concept of
    the world model, a striped star in an off-palette colour) or ``"cat-toy"``."""
    return _asset("concepts", name)


def resolve_instance_dir(folder: str) -> str:
    """``"embedded"`` -> the example concept shipped with the package (``"embedded:cat-toy"``: the other one);
    ``"world:7"`` -> held-out concept 7 of the embedded world (``"world:7@5"``: drawn with seed 5, default 2024)."""
    if folder == "embedded":
        return embedded_concept_path()
    if folder.startswith("embedded:") and folder.split(":", 1)[1] in EMBEDDED_CONCEPTS:
        return embedded_concept_path(folder.split(":", 1)[1])
    match = re.fullmatch(r"world:(\d+)(?:@(\d+))?", folder)
    if match:
        return str(world_concept_dir(int(match.group(1)), int(match.group(2) or WORLD_CONCEPT_SEED)))
    return folder


WORLD_CONCEPT_SEED = 2024  # the seed of lightning_custom.world's held-out concepts (the studies' too)


def world_concept_dir(index: int, seed: int = WORLD_CONCEPT_SEED) -> Path:
    """The images of held-out world concept ``index`` (drawn with ``seed``), rendered once into the cache."""
    from lightning_custom.synthetic.world_concepts import make_concept  # numpy and PIL: not for --help

    concept = make_concept(index, seed)
    folder = default_cache_root().parent / "world_concepts" / f"seed{seed}" / concept.name
    if not folder.is_dir():
        with atomic_path(folder) as partial:
            concept.write_images(partial)
    return folder
