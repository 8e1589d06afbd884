"""The method base's encoding plumbing: captions to token ids and text states, images to VAE latents, and the
caches that spare re-encoding with the frozen parts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_custom.errors import UserInputError
from lightning_custom.methods.tokens import CaptionTokenizer, tokenize_captions
from lightning_custom.objectives.diffusion import sample_latents


class FrozenEncoding:
    """Mixin of :class:`~lightning_custom.methods.base.PersonalizationModule`: tokenizing, the text encoders, the
    VAE encoder, and their caches (training text states, training latent distributions, DVAR's fixed batch).
    Expects ``_latent_cache``, ``_eval_cache``, ``_text_cache`` and ``_text_path_trains_in_fit`` from ``__init__``.
    """

    @property
    def text_encoder_names(self) -> list[str]:
        """Attribute names of the loaded text encoders, in the pipeline's order (an absent optional one skipped)."""
        return self.family.present_text_encoders(self)

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoder(s): one for SD 1.x / 2.x, two for SDXL and FLUX, two or three for SD3."""
        return [getattr(self, name) for name in self.text_encoder_names]

    @property
    def trainable_text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders ``train_text_encoder`` trains, by pipeline name (CLIP ones; never T5).

        Raises:
            UserInputError: on a family that trains none (Z-Image, FLUX.2 [klein], Qwen-Image: their Qwen encoders
                have no slot in the LoRA format and diffusers' scripts never train them), instead of training
                nothing more in silence.
        """
        if not self.family.trainable_text_encoder_names:
            raise UserInputError(f"--model.init_args.train_text_encoder: {self.family.name} models train no text "
                                 f"encoder (diffusers' scripts never train it, and its pipeline's LoRA files have no "
                                 f"slot for it); set it to false")
        return {name: getattr(self, name) for name in self.family.trainable_text_encoder_names
                if getattr(self, name, None) is not None}

    @property
    def tokenizers(self) -> list[Any]:
        """The tokenizer of each text encoder."""
        return [getattr(self, name) for name in self.family.present_tokenizers(self)]

    def prepare_captions(self, captions: list[str]) -> list[str]:
        """Hook to rewrite captions before tokenizing (e.g. expand a multi-vector placeholder)."""
        return captions

    def tokenize(self, captions: list[str], tokenizer: Any = None) -> torch.Tensor:
        """Token ids padded to the pipeline's length for ``tokenizer`` (default the first), as pipelines do."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        return tokenize_captions(tokenizer, self.prepare_captions(list(captions)),
                                 self.token_max_length(tokenizer)).to(self.device)

    def token_max_length(self, tokenizer: Any) -> int:
        """The padded caption length of ``tokenizer`` (CLIP 77; T5 256 for SD3, 512 for FLUX)."""
        names = self.family.present_tokenizers(self)
        name = next((n for n in names if getattr(self, n) is tokenizer), names[0])
        return self.family.tokenizer_max_length(name, tokenizer)

    def caption_tokenizer(self) -> CaptionTokenizer:
        """What the data loader's collate calls to tokenize the batch's captions (``input_ids``, ``input_ids_2``).

        Tokenizing in the loader (in its workers, when it has some) takes it off the training step; the data
        module asks for this at setup. Captions go through :meth:`prepare_captions` first.
        """
        return CaptionTokenizer(self.tokenizers, self.prepare_captions,
                                [self.token_max_length(tokenizer) for tokenizer in self.tokenizers])

    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder hidden states for ``captions`` (the UNet's cross-attention context).

        For SDXL, both encoders' penultimate hidden states, concatenated (as ``StableDiffusionXLPipeline``).
        """
        return self.encode_text(captions)["encoder_hidden_states"]

    def encode_text(
        self, captions: list[str], input_ids: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The text part of the denoiser's conditioning (the family's: SD ``encoder_hidden_states``, SDXL adds the
        pooled ``text_embeds``, FLUX and SD3 their prompt and pooled embeddings).

        ``input_ids`` (one tensor per text encoder, e.g. from the data loader) spares tokenizing ``captions``.
        """
        if input_ids is None:
            input_ids = [self.tokenize(captions, tokenizer) for tokenizer in self.tokenizers]
        return self.family.encode_text(self, [ids.to(self.device) for ids in input_ids])

    def on_fit_start(self) -> None:
        """Start each fit with empty latent caches (a notebook may fit one module on several concepts).

        The cache keys name the images and draws they came from, so this is for memory, and for a VAE or text
        encoder swapped between fits.
        """
        self._latent_cache.clear()
        self._eval_cache.clear()
        self._text_cache.clear()
        self._text_path_trains_in_fit = self.text_path_trains

    def caches_text_states(self) -> bool:
        """Whether training reuses text states (``cache_text_states``; never while the text path trains)."""
        wanted = self.hparams.get("cache_text_states")
        wanted = self.family.is_flow if wanted is None else wanted
        if not wanted:
            return False
        if self._text_path_trains_in_fit is None:  # walking every parameter each step would cost ms on FLUX
            return not self.text_path_trains
        return not self._text_path_trains_in_fit

    def cached_text_states(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's text states, each caption encoded alone on first sight and then reused.

        Keyed by the caption text: every caption of a run is one of the templates with the concept's words, so the
        cache holds a few dozen entries.
        """
        captions = list(batch["caption"])
        missing = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        for caption in missing:
            with torch.no_grad():
                states = self.encode_text([caption])
            self._text_cache[caption] = {k: v.detach() for k, v in states.items()}
        rows = [self._text_cache[c] for c in captions]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    def encode_latents(
        self,
        pixel_values: torch.Tensor,
        standard_normal: torch.Tensor | None = None,
        cache_keys: list[str] | None = None,
    ) -> torch.Tensor:
        """VAE latents, scaled: ``(mean + std * eps) * scaling_factor``.

        ``standard_normal`` fixes ``eps`` (DVAR's fixed latents); otherwise it is drawn from the training generator.
        With ``cache_keys`` (one name per augmented image), each image's latent distribution is encoded once, alone,
        and reused: the VAE is frozen, and encoding one image at a time makes the cached values independent of
        which images happen to share a batch.
        """
        with torch.no_grad():
            if cache_keys is not None:
                mean, std = self._cached_latent_distribution(pixel_values, cache_keys)
            else:
                with self.frozen_half_precision("vae"):
                    mean, std = self.family.latent_distribution(self.vae, pixel_values.to(self.module_dtype("vae")))
            if standard_normal is None:
                standard_normal = torch.randn(mean.shape, generator=self.generator, device=self.device)
            latents = sample_latents(mean, std, standard_normal)
        return self.family.scale_latents(self.vae, latents)

    def _cached_latent_distribution(
        self, pixel_values: torch.Tensor, keys: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for index, key in enumerate(keys):
            if key not in self._latent_cache:
                with self.frozen_half_precision("vae"):
                    mean, std = self.family.latent_distribution(
                        self.vae, pixel_values[index : index + 1].to(self.module_dtype("vae")))
                self._latent_cache[key] = (mean[0], std[0])
        pairs = [self._latent_cache[key] for key in keys]
        return torch.stack([m for m, _ in pairs]).to(self.device), torch.stack([s for _, s in pairs]).to(self.device)

    def _eval_cached(self, kind: str, key: str | None, compute) -> Any:
        """``compute()`` once per ``(kind, key)`` when evaluation caching is on and ``key`` is given."""
        if key is None or not self.hparams.cache_eval_batch:
            return compute()
        if (kind, key) not in self._eval_cache:
            self._eval_cache[(kind, key)] = compute()
        return self._eval_cache[(kind, key)]
