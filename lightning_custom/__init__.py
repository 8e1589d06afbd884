"""lightning_custom: fast text-to-image personalization with DVAR early stopping (Voronov et al., 2023)."""

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.data.concept import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import (
    CustomDiffusion,
    DreamBooth,
    DreamBoothLoRA,
    PersonalizationModule,
    TextualInversion,
)

__all__ = [
    "ConceptDataModule",
    "CustomDiffusion",
    "DreamBooth",
    "DreamBoothLoRA",
    "DVAREarlyStopping",
    "PersonalizationModule",
    "RunSummary",
    "TextualInversion",
    "UserInputError",
]
__version__ = "0.1.0"
