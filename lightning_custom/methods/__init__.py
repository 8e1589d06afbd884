"""Personalization methods, one LightningModule each, on a shared base."""

from lightning_custom.methods.base import PersonalizationModule
from lightning_custom.methods.textual_inversion import TextualInversion

__all__ = ["PersonalizationModule", "TextualInversion"]
