"""Textual Inversion (Gal et al., 2022): learn only the embedding of a new pseudo-token."""

from __future__ import annotations

from pathlib import Path

from lightning_custom.io import write_safetensors
from lightning_custom.methods.base import PersonalizationModule
from lightning_custom.methods.tokens import (
    TOKEN_METADATA_KEY,
    expand_placeholder,
    learn_new_token,
    load_embeddings_file,
    sdxl_embeddings,
)


class TextualInversion(PersonalizationModule):
    """Textual Inversion: one new token (or ``num_vectors`` of them) in the text encoder; nothing else trains.

    On SDXL the token has its own embedding in each of the two text encoders, and both train.

    Args:
        placeholder_token: the new token, e.g. ``"<cat-toy>"``; must not already be in the vocabulary.
        initializer_token: a single-token word whose embedding initialises the new one, e.g. ``"toy"``.
        num_vectors: embedding vectors for the placeholder (written ``tok tok_1 ...`` into prompts).
        **kwargs: see :class:`~lightning_custom.methods.base.PersonalizationModule`.
    """

    def __init__(
        self,
        placeholder_token: str = "<concept>",
        initializer_token: str = "object",
        num_vectors: int = 1,
        **kwargs,
    ) -> None:
        self.placeholder_token = placeholder_token
        self.initializer_token = initializer_token
        self.num_vectors = num_vectors
        super().__init__(**kwargs)

    def configure_trainable(self) -> None:
        """Add the placeholder token(s) and make their vectors the only trainable parameters.

        ``token_vectors`` belongs to the (first) text encoder; on SDXL ``token_vectors_2`` to the second.
        """
        self.placeholder_names, self.token_vectors = learn_new_token(
            self.tokenizer, self.text_encoder, self.placeholder_token, self.initializer_token, self.num_vectors
        )
        self._splice_handle = self.token_vectors.attach(self.text_encoder.get_input_embeddings())
        self.token_vectors_2 = None
        if self.is_sdxl:
            _, self.token_vectors_2 = learn_new_token(
                self.tokenizer_2, self.text_encoder_2, self.placeholder_token, self.initializer_token, self.num_vectors
            )
            self._splice_handle_2 = self.token_vectors_2.attach(self.text_encoder_2.get_input_embeddings())

    def prepare_captions(self, captions: list[str]) -> list[str]:
        """Expand a multi-vector placeholder into its tokens."""
        return expand_placeholder(captions, self.placeholder_token, self.placeholder_names)

    def learned_embeddings(self) -> dict:
        """``{placeholder_token: (num_vectors, dim) tensor}``, diffusers' Textual Inversion format.

        On SDXL: ``{"clip_l": (num_vectors, 768), "clip_g": (num_vectors, 1280)}``, one tensor per text encoder.
        """
        if self.is_sdxl:
            return sdxl_embeddings([self.token_vectors.vectors, self.token_vectors_2.vectors])
        return {self.placeholder_token: self.token_vectors.vectors.detach().float().cpu()}

    def export_artifacts(self, output_dir: Path) -> list[str]:
        """Write ``learned_embeds.safetensors`` for ``pipe.load_textual_inversion`` (SDXL: token in the metadata)."""
        metadata = {TOKEN_METADATA_KEY: self.placeholder_token} if self.is_sdxl else None
        write_safetensors(Path(output_dir) / "learned_embeds.safetensors", self.learned_embeddings(), metadata)
        return ["learned_embeds.safetensors"]

    @staticmethod
    def load_into_pipeline(pipe, run_dir: str | Path):
        """Load a finished run's ``learned_embeds.safetensors`` into a diffusers pipeline (SD or SDXL)."""
        load_embeddings_file(pipe, Path(run_dir) / "learned_embeds.safetensors")
        return pipe
