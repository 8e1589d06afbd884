"""Shared base of the methods that fine-tune the diffusion model itself: DreamBooth (full and LoRA), Custom Diffusion.

What they share beyond :class:`~lightning_custom.methods.base.PersonalizationModule`: identifier tokens in the
prompts (an existing rare word, or new tokens whose embeddings train), the prior-preservation loss when the data
module serves class images, gradient-norm clipping, and the Textual-Inversion-format export of learned tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lightning_custom.data.class_images import merge_class_batch
from lightning_custom.objectives.diffusion import prior_preservation_loss
from lightning_custom.methods.base import PersonalizationModule
from lightning_custom.methods.tokens import TokenVectors, learn_new_tokens, split_tokens
from lightning_custom.methods.token_files import EmbeddingSlot, SDXL_EMBEDDING_KEYS, T5_EMBEDDING_KEY, TOKEN_METADATA_KEY, load_token_files, token_slots, write_token_files

LEARNED_EMBEDS = "learned_embeds.safetensors"
_SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9<>_.+-]+$")


class FineTuningModule(PersonalizationModule):
    """Base class of DreamBooth, DreamBooth-LoRA and Custom Diffusion.

    Args:
        placeholder_token: the identifier in prompts ("sks", or a new token like ``"<new1>"``); several tokens
            (one per concept) are joined by ``+``: ``"<new1>+<new2>"``.
        initializer_token: word whose embedding initialises each new token; one for all, or one per token joined
            by ``+``. Used only with ``train_token_embedding``.
        train_token_embedding: add the identifier(s) as new tokens and train their embeddings (other rows of the
            embedding matrix stay bit-identical). The tokens go into every CLIP text encoder (SD: one; SDXL, SD3:
            CLIP-L and CLIP-G; FLUX: CLIP-L).
        t5_token_embedding: FLUX and SD3, with ``train_token_embedding``: add the tokens to T5 too and train their
            T5 vectors (fp32, whatever T5's dtype); otherwise T5 reads the identifier as plain text.
        prior_loss_weight: weight of the class-image loss when the data module serves class images
            (``with_prior_preservation``): loss = instance loss + weight x class loss.
        max_grad_norm: clip the gradient norm to this (``None``: no clipping). The trainer's ``gradient_clip_val``,
            when set, takes precedence.
        **kwargs: see :class:`~lightning_custom.methods.base.PersonalizationModule`.
    """

    #: Write each learned token to ``<token>.safetensors`` (Custom Diffusion's convention) even when there is one.
    token_file_per_token = False

    def __init__(
        self,
        placeholder_token: str = "sks",
        initializer_token: str = "object",
        train_token_embedding: bool = False,
        prior_loss_weight: float = 1.0,
        max_grad_norm: float | None = 1.0,
        t5_token_embedding: bool = False,
        **kwargs: Any,
    ) -> None:
        self.placeholder_token = placeholder_token
        self.placeholder_tokens = split_tokens(placeholder_token, "--model.placeholder_token")
        self.initializer_token = initializer_token
        self.train_token_embedding = train_token_embedding
        self.t5_token_embedding = t5_token_embedding
        self.prior_loss_weight = prior_loss_weight
        self.max_grad_norm = max_grad_norm
        super().__init__(**kwargs)

    # ------------------------------------------------------------------------------------------------ tokens
    def configure_tokens(self) -> None:
        """With ``train_token_embedding``, add the identifier tokens and make their vectors trainable.

        Each token gets a vector in every encoder of :attr:`token_slots`: ``token_vectors`` in the first text
        encoder, ``token_vectors_2`` in the second (SDXL, SD3: CLIP-G; FLUX: T5 when asked), ``token_vectors_3`` in
        SD3's T5 (when asked); ``None`` where an encoder has no new token.
        """
        from lightning_custom.errors import UserInputError

        for suffix in ("", "_2", "_3"):
            setattr(self, f"token_vectors{suffix}", None)
        self.token_slots: list[EmbeddingSlot] = []
        if self.t5_token_embedding and not self.train_token_embedding:
            raise UserInputError("--model.t5_token_embedding: needs --model.train_token_embedding true (T5 vectors "
                                 "are trained for new identifier tokens only)")
        if not self.train_token_embedding:
            return
        initializers = split_tokens(self.initializer_token, "--model.initializer_token")
        self.token_slots = token_slots(self.family, self, with_t5=self.t5_token_embedding,
                                       argument="--model.t5_token_embedding",
                                       source=str(self.hparams.pretrained_model_name_or_path))
        self._splice_handles = []
        for slot in self.token_slots:
            encoder = getattr(self, slot.text_encoder)
            vectors = learn_new_tokens(getattr(self, slot.tokenizer), encoder, self.placeholder_tokens, initializers,
                                       where=slot.where)
            setattr(self, slot.vectors_attribute, vectors)
            self._splice_handles += vectors.attach_to(encoder)

    @property
    def token_vector_modules(self) -> list[TokenVectors]:
        """The learned token vectors, one :class:`TokenVectors` per encoder of :attr:`token_slots`."""
        return [getattr(self, slot.vectors_attribute) for slot in self.token_slots]

    def write_token_vectors(self) -> None:
        """Copy the learned token vectors into the text encoders' embedding matrices (before a full export)."""
        for slot, vectors in zip(self.token_slots, self.token_vector_modules):
            vectors.write_into(getattr(self, slot.text_encoder).get_input_embeddings())

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        """``{token: (1, dim) tensor}`` for every learned token, the first encoder's vector (empty without
        ``train_token_embedding``)."""
        if self.token_vectors is None:
            return {}
        vectors = self.token_vectors.vectors.detach().float().cpu()
        return {token: vectors[i : i + 1].clone() for i, token in enumerate(self.placeholder_tokens)}

    def export_token_embeddings(self, output_dir: Path) -> list[str]:
        """Write the learned tokens for ``pipe.load_textual_inversion``; return the file names.

        One token goes to ``learned_embeds.safetensors``; several (or with :attr:`token_file_per_token`) go to one
        ``<token>.safetensors`` each, since diffusers loads one token per file. On SDXL, FLUX and SD3 each further
        encoder's vectors go beside it (``learned_embeds_clip_g.safetensors``, ``<token>_t5.safetensors``...), every
        file in diffusers' one-key format (:func:`~lightning_custom.methods.tokens.write_token_files`).
        """
        if self.token_vectors is None:
            return []
        single = len(self.placeholder_tokens) == 1 and not self.token_file_per_token
        names = []
        for i, token in enumerate(self.placeholder_tokens):
            vectors = [v.vectors[i : i + 1] for v in self.token_vector_modules]
            names += write_token_files(output_dir, self.token_slots, vectors, token,
                                       LEARNED_EMBEDS if single else token_file_name(token))
        return names

    # ------------------------------------------------------------------------------------------------ losses
    def prior_losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(instance loss, class loss)`` of a batch holding class samples, from one UNet forward over both."""
        merged, num_instances = merge_class_batch(batch)
        per_sample = super().training_loss(merged, reduction="none")
        return per_sample[:num_instances].mean(), per_sample[num_instances:].mean()

    def training_loss(self, batch: dict[str, Any], reduction: str = "mean") -> torch.Tensor:
        """The diffusion loss; with class samples in the batch, ``instance + prior_loss_weight * class``.

        ``reduction="none"`` gives one loss per sample, the instance samples first, then the class samples.
        """
        if "class_pixel_values" not in batch:
            return super().training_loss(batch, reduction)
        if reduction != "mean":
            return super().training_loss(merge_class_batch(batch)[0], reduction)
        return prior_preservation_loss(*self.prior_losses(batch), self.prior_loss_weight)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimizer step's loss; with prior preservation the instance and class parts are logged too."""
        if "class_pixel_values" not in batch:
            return super().training_step(batch, batch_idx)
        instance, klass = self.prior_losses(batch)
        loss = prior_preservation_loss(instance, klass, self.prior_loss_weight)
        self.log_training_losses({"train_loss": loss, "train_instance_loss": instance, "train_class_loss": klass},
                                 batch["pixel_values"].shape[0])
        return loss

    def clips_gradients(self) -> bool:
        """Whether gradients are clipped: always when ``max_grad_norm`` is set."""
        return self.max_grad_norm is not None or super().clips_gradients()

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip to ``max_grad_norm`` unless the trainer sets its own ``gradient_clip_val``."""
        if gradient_clip_val is None and self.max_grad_norm is not None:
            gradient_clip_val = self.max_grad_norm
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------------------------------------- loading
    @staticmethod
    def load_token_embeddings(pipe: Any, run_dir: str | Path) -> list[str]:
        """Load every learned-token file of a run into ``pipe`` (``load_textual_inversion``); return the tokens.

        A token file holds one tensor whose key is the token: ``learned_embeds.safetensors`` or ``<token>.safetensors``;
        or, on SDXL, FLUX and SD3, one tensor per encoder (``clip_l``, ``clip_g``, ``t5``) with the token in the
        metadata.
        """
        tokens = []
        for path in sorted(Path(run_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                keys, token = list(handle.keys()), (handle.metadata() or {}).get(TOKEN_METADATA_KEY)
            if token and SDXL_EMBEDDING_KEYS[0] in keys and set(keys) <= {*SDXL_EMBEDDING_KEYS, T5_EMBEDDING_KEY}:
                keys = [token]  # the older one-file multi-encoder format
            elif len(keys) != 1:
                continue
            # a first-encoder file; its per-encoder siblings (<name>_clip_g...) are loaded with it
            if path.name == LEARNED_EMBEDS or token_file_name(keys[0]) == path.name:
                tokens.extend(load_token_files(pipe, path))
        return tokens


def token_file_name(token: str) -> str:
    """``<new1>.safetensors`` (Custom Diffusion's convention); unsafe characters in the token become ``_``."""
    stem = token if _SAFE_FILE_NAME.match(token) and token not in (".", "..") else re.sub(r"[^\w.-]+", "_", token)
    return f"{stem}.safetensors"
