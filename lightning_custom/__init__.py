"""lightning_custom: fast text-to-image personalization with DVAR early stopping (Voronov et al., 2023).

The public names below are imported on first use (PEP 562), so that ``python -m lightning_custom gather`` or
``--help`` start without importing torch, Lightning and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_custom import _moved

_moved.install()  # module paths from before issue 26's layer folders keep importing

_EXPORTS = {
    "ConceptDataModule": "lightning_custom.data.concept",
    "CustomDiffusion": "lightning_custom.methods",
    "DreamBooth": "lightning_custom.methods",
    "DreamBoothLoRA": "lightning_custom.methods",
    "DVAREarlyStopping": "lightning_custom.dvar.callback",
    "PersonalizationModule": "lightning_custom.methods",
    "RunSummary": "lightning_custom.callbacks",
    "TextualInversion": "lightning_custom.methods",
    "UserInputError": "lightning_custom.errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_custom' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
