"""Textual Inversion (Gal et al., 2022): learn only the embedding of a new pseudo-token.

On FLUX.1 and SD3 this is the token half of diffusers' pivotal tuning (``train_dreambooth_lora_flux_advanced.py``):
the token gets a vector in each CLIP encoder, and in T5 when asked (``t5_num_vectors``); the file holds one
``(num_vectors, dim)`` tensor per encoder under ``clip_l`` / ``clip_g`` / ``t5``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_custom.methods.base import PersonalizationModule
from lightning_custom.methods.tokens import CaptionTokenizer, TokenVectors, expand_placeholder, expander, learn_new_token, tokenize_captions
from lightning_custom.methods.token_files import EmbeddingSlot, embedding_state, load_token_files, token_slots, write_token_files

LEARNED_EMBEDS = "learned_embeds.safetensors"


class TextualInversion(PersonalizationModule):
    """Textual Inversion: one new token (or ``num_vectors`` of them) in the text encoder; nothing else trains.

    On SDXL the token has its own embedding in each of the two text encoders, and both train. On SD3 likewise in
    CLIP-L and CLIP-G, on FLUX in CLIP-L; in T5 too (FLUX and SD3) when ``t5_num_vectors`` is set. The trainable
    vectors are fp32 whatever the encoders' dtype (T5 is often held in bf16).

    Args:
        placeholder_token: the new token, e.g. ``"<cat-toy>"``; must not already be in the vocabulary.
        initializer_token: a single-token word whose embedding initialises the new one, e.g. ``"toy"`` (in every
            tokenizer the token goes into, T5's SentencePiece one included).
        num_vectors: embedding vectors for the placeholder in each CLIP encoder (written ``tok tok_1 ...`` into
            prompts).
        t5_num_vectors: FLUX and SD3: embedding vectors for the placeholder in T5 (0: T5 reads the placeholder as
            plain text and nothing in it trains, as pivotal tuning without ``--enable_t5_ti``).
        **kwargs: see :class:`~lightning_custom.methods.base.PersonalizationModule`.
    """

    def __init__(
        self,
        placeholder_token: str = "<concept>",
        initializer_token: str = "object",
        num_vectors: int = 1,
        t5_num_vectors: int = 0,
        **kwargs: Any,
    ) -> None:
        self.placeholder_token = placeholder_token
        self.initializer_token = initializer_token
        self.num_vectors = num_vectors
        self.t5_num_vectors = t5_num_vectors
        super().__init__(**kwargs)

    def configure_trainable(self) -> None:
        """Add the placeholder token(s) to each of :attr:`token_slots` and make their vectors the only trainables.

        ``token_vectors`` belongs to the first text encoder, ``token_vectors_2`` to the second (SDXL, SD3: CLIP-G;
        FLUX: T5) and ``token_vectors_3`` to the third (SD3's T5); an encoder without the token has ``None``.
        """
        self.token_slots: list[EmbeddingSlot] = token_slots(
            self.family, self, with_t5=self.t5_num_vectors > 0, argument="--model.t5_num_vectors",
            source=str(self.hparams.pretrained_model_name_or_path),
        )
        self.names_by_tokenizer: dict[str, list[str]] = {}
        for suffix in ("", "_2", "_3"):
            setattr(self, f"token_vectors{suffix}", None)
        self._splice_handles = []
        for slot in self.token_slots:
            count = self.t5_num_vectors if slot.is_t5 else self.num_vectors
            names, vectors = learn_new_token(
                getattr(self, slot.tokenizer), getattr(self, slot.text_encoder), self.placeholder_token,
                self.initializer_token, count, num_vectors_argument="t5_num_vectors" if slot.is_t5 else "num_vectors",
                where=slot.where,
            )
            self.names_by_tokenizer[slot.tokenizer] = names
            setattr(self, slot.vectors_attribute, vectors)
            self._splice_handles += vectors.attach_to(getattr(self, slot.text_encoder))
        self.placeholder_names = self.names_by_tokenizer[self.token_slots[0].tokenizer]

    @property
    def token_vector_modules(self) -> list[TokenVectors]:
        """The trained vectors, one :class:`TokenVectors` per slot in :attr:`token_slots` order."""
        return [getattr(self, slot.vectors_attribute) for slot in self.token_slots]

    # --------------------------------------------------------------------------------------------- captions
    def prepare_captions(self, captions: list[str]) -> list[str]:
        """Expand a multi-vector placeholder into its (CLIP) tokens."""
        return expand_placeholder(captions, self.placeholder_token, self.placeholder_names)

    def captions_for(self, tokenizer_name: str, captions: list[str]) -> list[str]:
        """``captions`` with the placeholder written out as ``tokenizer_name``'s tokens (T5 may have another count;
        a tokenizer without the token reads the placeholder as plain text)."""
        names = self.names_by_tokenizer.get(tokenizer_name, [self.placeholder_token])
        return expand_placeholder(list(captions), self.placeholder_token, names)

    def tokenize(self, captions: list[str], tokenizer: Any = None) -> torch.Tensor:
        """Token ids padded to the pipeline's length for ``tokenizer``, the placeholder expanded for it."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        name = next((n for n in self.family.present_tokenizers(self) if getattr(self, n) is tokenizer), "tokenizer")
        return tokenize_captions(tokenizer, self.captions_for(name, captions),
                                 self.token_max_length(tokenizer)).to(self.device)

    def caption_tokenizer(self) -> CaptionTokenizer:
        """The data loader's tokenizer, expanding the placeholder per tokenizer (see :meth:`captions_for`)."""
        names = self.family.present_tokenizers(self)
        rewrites = [expander(self.placeholder_token, self.names_by_tokenizer.get(n, [self.placeholder_token]))
                    for n in names]
        return CaptionTokenizer(self.tokenizers, rewrites, [self.token_max_length(t) for t in self.tokenizers])

    # ----------------------------------------------------------------------------------------------- export
    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        """The learned vectors in one dict: SD ``{placeholder_token: (num_vectors, dim)}``; SDXL ``{"clip_l",
        "clip_g"}``; FLUX ``{"clip_l"[, "t5"]}``; SD3 ``{"clip_l", "clip_g"[, "t5"]}`` (the one-file format of A1111
        and ComfyUI; the run's own files hold one encoder each, see :meth:`export_artifacts`)."""
        return embedding_state(self.token_slots, [v.vectors for v in self.token_vector_modules],
                               self.placeholder_token)

    def export_artifacts(self, output_dir: Path) -> list[str]:
        """Write ``learned_embeds.safetensors`` for ``pipe.load_textual_inversion`` (the first text encoder's
        vectors; SDXL, FLUX and SD3 also ``learned_embeds_clip_g.safetensors`` / ``..._t5.safetensors`` for the
        others, each in the same one-key format: :func:`~lightning_custom.methods.tokens.write_token_files`)."""
        return write_token_files(output_dir, self.token_slots, [v.vectors for v in self.token_vector_modules],
                                 self.placeholder_token, LEARNED_EMBEDS)

    @staticmethod
    def load_into_pipeline(pipe: Any, run_dir: str | Path) -> Any:
        """Load a finished run's token files into a diffusers pipeline (SD, SDXL, FLUX, SD3)."""
        load_token_files(pipe, Path(run_dir) / LEARNED_EMBEDS)
        return pipe
