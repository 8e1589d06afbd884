"""Personalization methods, one LightningModule each, on a shared base."""

from lightning_custom.methods.base import PersonalizationModule
from lightning_custom.methods.custom_diffusion import CustomDiffusion
from lightning_custom.methods.dreambooth import DreamBooth, DreamBoothLoRA
from lightning_custom.methods.finetuning import FineTuningModule
from lightning_custom.methods.fleet import TextualInversionFleet
from lightning_custom.methods.lora_fleet import DreamBoothLoRAFleet
from lightning_custom.methods.textual_inversion import TextualInversion

__all__ = [
    "CustomDiffusion",
    "DreamBooth",
    "DreamBoothLoRA",
    "DreamBoothLoRAFleet",
    "FineTuningModule",
    "PersonalizationModule",
    "TextualInversion",
    "TextualInversionFleet",
]
