"""DreamBooth (Ruiz et al., 2023): fine-tune the denoiser (fully, or with LoRA) on a few images of one subject.

The denoiser is the UNet of SD 1.x/2.x and SDXL, or the transformer of FLUX.1 and SD3/SD3.5 (the model family's).

Prompts put an identifier before the class noun ("a photo of sks dog"). The identifier is a rare existing token or,
with ``train_token_embedding``, a new token whose embedding trains too (as in the DVAR paper's DreamBooth-LoRA).
With ``with_prior_preservation`` on the data module, class images keep the class prior (Section 3.3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_custom.families.components import resolve_model_path
from lightning_custom.errors import UserInputError
from lightning_custom.runtime.io import atomic_path
from lightning_custom.methods.finetuning import FineTuningModule
from lightning_custom.methods.lora import TEXT_ENCODER_TARGETS, add_lora, lora_dropout_disabled, save_lora

PIPELINE_FOLDER = "pipeline"


class DreamBooth(FineTuningModule):
    """DreamBooth, full fine-tuning: every denoiser weight trains (fp32), the text encoder optionally.

    The export is a complete diffusers pipeline folder, ``pipeline/``, for ``StableDiffusionPipeline.from_pretrained``
    (``StableDiffusionXLPipeline``, ``FluxPipeline``, ``StableDiffusion3Pipeline``: the family's; or
    ``DiffusionPipeline.from_pretrained``). A 12B FLUX transformer does not fit one GPU in fp32 with AdamW: train it
    with ``--trainer.strategy fsdp`` (the transformer blocks are the wrapping unit, see :meth:`fsdp_blocks`).

    Args:
        placeholder_token: the identifier, e.g. ``"sks"`` (existing rare token) or ``"<sks>"`` with
            ``train_token_embedding``.
        initializer_token: word initialising a new identifier's embedding.
        train_token_embedding: add the identifier as a new token and train its embedding.
        t5_token_embedding: (passed on to :class:`FineTuningModule`) FLUX / SD3: the new token in T5 too.
        train_text_encoder: fine-tune the whole text encoder too (both CLIP encoders on SDXL and SD3; CLIP-L on
            FLUX, never T5, as diffusers' scripts).
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
        prior_loss_weight: float = 1.0,
        max_grad_norm: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        self.train_text_encoder = train_text_encoder
        super().__init__(placeholder_token=placeholder_token, initializer_token=initializer_token,
                         train_token_embedding=train_token_embedding, prior_loss_weight=prior_loss_weight,
                         max_grad_norm=max_grad_norm, **kwargs)

    def configure_trainable(self) -> None:
        """Unfreeze the denoiser (in fp32) and, optionally, the text encoder; add the identifier token if new."""
        if self.hparams.get("quantize_base", "none") != "none":
            raise UserInputError("--model.init_args.quantize_base: full DreamBooth trains every denoiser weight, which "
                                 "a quantized base cannot hold; use DreamBoothLoRA (QLoRA) or quantize_base: none")
        self.configure_tokens()
        if self.denoiser.dtype != torch.float32:
            self.denoiser.to(torch.float32)
        self.denoiser.requires_grad_(True)
        if self.train_text_encoder:
            for encoder in self.trainable_text_encoders.values():
                encoder.requires_grad_(True)

    def fsdp_blocks(self) -> set[type[torch.nn.Module]]:
        """The denoiser's repeated block classes: the unit FSDP shards and gathers (``auto_wrap_policy``)."""
        from lightning_custom.runtime.strategies import repeated_block_classes

        return repeated_block_classes(self.denoiser)

    def export_artifacts(self, output_dir: Path) -> list[str]:
        """Write ``pipeline/``: the trained denoiser and text encoder(s), the tokenizer(s) and the base model's
        VAE and sampling scheduler."""
        self.write_token_vectors()
        pipe = self.inference_pipeline()
        with atomic_path(Path(output_dir) / PIPELINE_FOLDER) as tmp:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        return [PIPELINE_FOLDER]

    def inference_pipeline(self):
        """The family's pipeline of the current weights, with the base model's own sampling scheduler."""
        return self.family.pipeline(self, self.sampling_scheduler())

    def sampling_scheduler(self):
        """The scheduler class named in the base model's ``model_index.json`` (the training one's if unknown)."""
        import diffusers

        name = type(self.noise_scheduler).__name__
        try:
            index = diffusers.DiffusionPipeline.load_config(
                resolve_model_path(self.hparams.pretrained_model_name_or_path), revision=self.hparams.revision
            )
            name = index.get("scheduler", [None, name])[1] or name
        except (OSError, ValueError):
            pass
        return getattr(diffusers, name, type(self.noise_scheduler)).from_config(self.noise_scheduler.config)

    @staticmethod
    def load_into_pipeline(pipe: Any, run_dir: str | Path) -> Any:
        """The run's exported pipeline, in ``pipe``'s dtype and device and with ``pipe``'s scheduler."""
        from lightning_custom.families.components import pipeline_class_of

        folder = Path(run_dir) / PIPELINE_FOLDER
        cls = pipeline_class_of(folder)
        extra = {"safety_checker": None, "requires_safety_checker": False} if cls.__name__ == "StableDiffusionPipeline" \
            else {}
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        loaded = cls.from_pretrained(str(folder), dtype=denoiser.dtype, scheduler=pipe.scheduler, **extra)
        return loaded.to(pipe.device)


class DreamBoothLoRA(FineTuningModule):
    """DreamBooth with LoRA adapters (peft) on the denoiser's layers; the base weights stay bit-identical.

    The default layers are diffusers' training scripts': the UNet's attention projections on SD / SDXL, the
    transformer's attention (and, on FLUX, feed-forward) projections on FLUX and SD3.

    Optionally LoRA on the text encoder and a new identifier token (the DVAR paper's setting: rank 4 plus the new
    token). Exports ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(folder)``, and
    ``learned_embeds.safetensors`` for ``pipe.load_textual_inversion`` when a token is learned.

    Args:
        placeholder_token: the identifier (``"sks"``, or a new token with ``train_token_embedding``).
        initializer_token: word initialising a new identifier's embedding.
        train_token_embedding: add the identifier as a new token and train its embedding.
        t5_token_embedding: (passed on to :class:`FineTuningModule`) FLUX / SD3: the new token in T5 too.
        rank: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``alpha / rank``); defaults to ``rank``.
        lora_dropout: dropout on the LoRA branch during training.
        target_modules: denoiser layers that get LoRA (peft name matching: exact or ``.``-suffix); default the
            family's (diffusers' scripts').
        train_text_encoder: also put LoRA on the text encoder (both CLIP encoders on SDXL and SD3; CLIP-L on FLUX).
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
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.train_text_encoder = train_text_encoder
        self.text_encoder_target_modules = (
            list(text_encoder_target_modules) if text_encoder_target_modules is not None else list(TEXT_ENCODER_TARGETS)
        )
        super().__init__(placeholder_token=placeholder_token, initializer_token=initializer_token,
                         train_token_embedding=train_token_embedding, prior_loss_weight=prior_loss_weight,
                         max_grad_norm=max_grad_norm, **kwargs)

    def configure_trainable(self) -> None:
        """Add the identifier token if new, then LoRA adapters on the denoiser (and the text encoder)."""
        self.configure_tokens()
        if self.target_modules is None:
            self.target_modules = list(self.family.lora_targets)
        lora = (self.rank, self.lora_alpha, self.lora_dropout)
        add_lora(self.denoiser, *lora, self.target_modules, "--model.target_modules",
                 "UNet" if self.denoiser_name == "unet" else self.denoiser_name)
        if self.train_text_encoder:
            for encoder in self.trainable_text_encoders.values():
                add_lora(encoder, *lora, self.text_encoder_target_modules, "--model.text_encoder_target_modules",
                         "text encoder")

    @torch.no_grad()
    def deterministic_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """DVAR's L_det with LoRA dropout off, even when called outside Lightning's evaluation loop."""
        with lora_dropout_disabled(self.denoiser, *self.text_encoders):
            return super().deterministic_loss(batch)

    def export_artifacts(self, output_dir: Path) -> list[str]:
        """Write ``pytorch_lora_weights.safetensors`` (and the learned token, if any)."""
        models = {self.denoiser_name: self.denoiser}
        if self.train_text_encoder:
            models.update(self.trainable_text_encoders)
        weights = save_lora(output_dir, self.family, models)
        return [weights, *self.export_token_embeddings(Path(output_dir))]

    @staticmethod
    def load_into_pipeline(pipe: Any, run_dir: str | Path) -> Any:
        """Load a run's LoRA weights and learned token (if any) into ``pipe``."""
        pipe.load_lora_weights(str(run_dir))
        FineTuningModule.load_token_embeddings(pipe, run_dir)
        return pipe
