"""DreamBooth (Ruiz et al., 2023): fine-tune the UNet (fully, or with LoRA) on a few images of one subject.

Prompts put an identifier before the class noun ("a photo of sks dog"). The identifier is a rare existing token or,
with ``train_token_embedding``, a new token whose embedding trains too (as in the DVAR paper's DreamBooth-LoRA).
With ``with_prior_preservation`` on the data module, class images keep the class prior (Section 3.3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_custom.components import assemble_pipeline, pipeline_class_of, resolve_model_path
from lightning_custom.io import atomic_path
from lightning_custom.methods.finetuning import FineTuningModule
from lightning_custom.methods.lora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    lora_dropout_disabled,
    save_lora,
)

PIPELINE_FOLDER = "pipeline"


class DreamBooth(FineTuningModule):
    """DreamBooth, full fine-tuning: every UNet weight trains (fp32), the text encoder optionally.

    The export is a complete diffusers pipeline folder, ``pipeline/``, for ``StableDiffusionPipeline.from_pretrained``
    (``StableDiffusionXLPipeline`` for SDXL).

    Args:
        placeholder_token: the identifier, e.g. ``"sks"`` (existing rare token) or ``"<sks>"`` with
            ``train_token_embedding``.
        initializer_token: word initialising a new identifier's embedding.
        train_token_embedding: add the identifier as a new token and train its embedding.
        train_text_encoder: fine-tune the whole text encoder too (both, on SDXL).
        gradient_checkpointing: trade compute for memory in the UNet.
        prior_loss_weight: weight of the class-image loss under prior preservation.
        max_grad_norm: gradient-norm clipping (``None``: off).
        **kwargs: see :class:`~lightning_custom.methods.base.PersonalizationModule`.
    """

    def __init__(
        self,
        placeholder_token: str = "sks",
        initializer_token: str = "object",
        train_token_embedding: bool = False,
        train_text_encoder: bool = False,
        gradient_checkpointing: bool = False,
        prior_loss_weight: float = 1.0,
        max_grad_norm: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        self.train_text_encoder = train_text_encoder
        self.gradient_checkpointing = gradient_checkpointing
        super().__init__(placeholder_token=placeholder_token, initializer_token=initializer_token,
                         train_token_embedding=train_token_embedding, prior_loss_weight=prior_loss_weight,
                         max_grad_norm=max_grad_norm, **kwargs)

    def configure_trainable(self) -> None:
        """Unfreeze the UNet (in fp32) and, optionally, the text encoder; add the identifier token if new."""
        self.configure_tokens()
        if self.unet.dtype != torch.float32:
            self.unet.to(torch.float32)
        self.unet.requires_grad_(True)
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if self.train_text_encoder:
            for encoder in self.text_encoders:
                encoder.requires_grad_(True)

    def export_artifacts(self, output_dir: Path) -> list[str]:
        """Write ``pipeline/``: the trained UNet and text encoder, the tokenizer and the base model's VAE/scheduler."""
        self.write_token_vectors()
        pipe = self.inference_pipeline()
        with atomic_path(Path(output_dir) / PIPELINE_FOLDER) as tmp:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        return [PIPELINE_FOLDER]

    def inference_pipeline(self):
        """A ``StableDiffusion(XL)Pipeline`` of the current weights, with the base model's own sampling scheduler."""
        return assemble_pipeline(self, self.sampling_scheduler())

    def sampling_scheduler(self):
        """The scheduler class named in the base model's ``model_index.json`` (DDPM if unknown), same config."""
        import diffusers

        name = "DDPMScheduler"
        try:
            index = diffusers.DiffusionPipeline.load_config(
                resolve_model_path(self.hparams.pretrained_model_name_or_path), revision=self.hparams.revision
            )
            name = index.get("scheduler", [None, name])[1] or name
        except (OSError, ValueError):
            pass
        return getattr(diffusers, name, diffusers.DDPMScheduler).from_config(self.noise_scheduler.config)

    @staticmethod
    def load_into_pipeline(pipe: Any, run_dir: str | Path) -> Any:
        """The run's exported pipeline, in ``pipe``'s dtype and device and with ``pipe``'s scheduler."""
        folder = Path(run_dir) / PIPELINE_FOLDER
        cls = pipeline_class_of(folder)
        extra = {} if "XL" in cls.__name__ else {"safety_checker": None, "requires_safety_checker": False}
        loaded = cls.from_pretrained(str(folder), dtype=pipe.unet.dtype, scheduler=pipe.scheduler, **extra)
        return loaded.to(pipe.device)


class DreamBoothLoRA(FineTuningModule):
    """DreamBooth with LoRA adapters (peft) on the UNet attention projections; the base weights stay bit-identical.

    Optionally LoRA on the text encoder and a new identifier token (the DVAR paper's setting: rank 4 plus the new
    token). Exports ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(folder)``, and
    ``learned_embeds.safetensors`` for ``pipe.load_textual_inversion`` when a token is learned.

    Args:
        placeholder_token: the identifier (``"sks"``, or a new token with ``train_token_embedding``).
        initializer_token: word initialising a new identifier's embedding.
        train_token_embedding: add the identifier as a new token and train its embedding.
        rank: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``alpha / rank``); defaults to ``rank``.
        lora_dropout: dropout on the LoRA branch during training.
        target_modules: UNet layers that get LoRA (peft name matching: exact or ``.``-suffix).
        train_text_encoder: also put LoRA on the text encoder (both text encoders, on SDXL).
        text_encoder_target_modules: text-encoder layers that get LoRA.
        prior_loss_weight: weight of the class-image loss under prior preservation.
        max_grad_norm: gradient-norm clipping (``None``: off).
        **kwargs: see :class:`~lightning_custom.methods.base.PersonalizationModule`.
    """

    def __init__(
        self,
        placeholder_token: str = "sks",
        initializer_token: str = "object",
        train_token_embedding: bool = False,
        rank: int = 4,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        train_text_encoder: bool = False,
        text_encoder_target_modules: list[str] | None = None,
        prior_loss_weight: float = 1.0,
        max_grad_norm: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        self.rank, self.lora_dropout = rank, lora_dropout
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank
        self.target_modules = list(target_modules) if target_modules is not None else list(UNET_TARGETS)
        self.train_text_encoder = train_text_encoder
        self.text_encoder_target_modules = (
            list(text_encoder_target_modules) if text_encoder_target_modules is not None else list(TEXT_ENCODER_TARGETS)
        )
        super().__init__(placeholder_token=placeholder_token, initializer_token=initializer_token,
                         train_token_embedding=train_token_embedding, prior_loss_weight=prior_loss_weight,
                         max_grad_norm=max_grad_norm, **kwargs)

    def configure_trainable(self) -> None:
        """Add the identifier token if new, then LoRA adapters on the UNet (and the text encoder)."""
        self.configure_tokens()
        lora = (self.rank, self.lora_alpha, self.lora_dropout)
        add_lora(self.unet, *lora, self.target_modules, "--model.target_modules", "UNet")
        if self.train_text_encoder:
            for encoder in self.text_encoders:
                add_lora(encoder, *lora, self.text_encoder_target_modules, "--model.text_encoder_target_modules",
                         "text encoder")

    @torch.no_grad()
    def deterministic_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """DVAR's L_det with LoRA dropout off, even when called outside Lightning's evaluation loop."""
        with lora_dropout_disabled(self.unet, *self.text_encoders):
            return super().deterministic_loss(batch)

    def export_artifacts(self, output_dir: Path) -> list[str]:
        """Write ``pytorch_lora_weights.safetensors`` (and the learned token, if any)."""
        encoders = self.text_encoders if self.train_text_encoder else []
        weights = save_lora(output_dir, self.unet, *encoders)
        return [weights, *self.export_token_embeddings(Path(output_dir))]

    @staticmethod
    def load_into_pipeline(pipe: Any, run_dir: str | Path) -> Any:
        """Load a run's LoRA weights and learned token (if any) into ``pipe``."""
        pipe.load_lora_weights(str(run_dir))
        FineTuningModule.load_token_embeddings(pipe, run_dir)
        return pipe
