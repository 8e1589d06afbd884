"""The learned-token file format, read and written in one place: which text encoders hold a learned token
(:class:`EmbeddingSlot`), one diffusers-format file per encoder (``learned_embeds.safetensors`` and its siblings),
and putting a learned token into a pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_custom.errors import UserInputError
from lightning_custom.families import family_of_pipeline
from lightning_custom.methods.tokens import placeholder_names

# SDXL Textual Inversion files hold one tensor per text encoder under these keys (the community convention that
# diffusers users load with two ``load_textual_inversion(..., text_encoder=..., tokenizer=...)`` calls). FLUX and SD3
# files (diffusers' pivotal-tuning scripts, ``train_dreambooth_lora_flux_advanced.py``) add ``t5``; each family lists
# its keys in ``ModelFamily.embedding_keys``.
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
T5_EMBEDDING_KEY = "t5"
TOKEN_METADATA_KEY = "token"


@dataclass(frozen=True)
class EmbeddingSlot:
    """A text encoder that can hold a learned token: its pipeline names and its key in an embedding file.

    Attributes:
        text_encoder: pipeline attribute of the encoder (``"text_encoder"``, ``"text_encoder_2"``...).
        tokenizer: pipeline attribute of its tokenizer.
        key: the file key of its vectors (``"clip_l"``, ``"clip_g"``, ``"t5"``); ``None`` in SD's one-encoder
            format, whose file key is the token itself.
    """

    text_encoder: str
    tokenizer: str
    key: str | None

    @property
    def is_t5(self) -> bool:
        """Whether this is a T5 encoder (SentencePiece tokenizer; trained only when asked)."""
        return self.key == T5_EMBEDDING_KEY

    @property
    def vectors_attribute(self) -> str:
        """The module attribute of this encoder's :class:`TokenVectors`: ``token_vectors``, ``token_vectors_2``..."""
        return "token_vectors" + self.text_encoder.removeprefix("text_encoder")

    @property
    def where(self) -> str:
        """`` in the T5 tokenizer (tokenizer_2)``: the tokenizer, for error messages (empty for the first)."""
        if self.tokenizer == "tokenizer":
            return ""
        kind = "T5" if self.is_t5 else (self.key or "").upper().replace("_", "-")
        return f" in the {kind} tokenizer ({self.tokenizer})"


def embedding_slots(family: Any) -> list[EmbeddingSlot]:
    """Every text encoder of ``family`` (a :class:`~lightning_custom.families.base.ModelFamily` or its class) with its
    embedding-file key, in the pipeline's order (``None`` keys for SD's single encoder)."""
    names, tokenizers = family.text_encoder_names, family.tokenizer_names
    keys = family.embedding_keys or (SDXL_EMBEDDING_KEYS if len(names) == 2 else (None,) * len(names))
    return [EmbeddingSlot(name, tok, key) for name, tok, key in zip(names, tokenizers, keys)]


def token_slots(family: Any, parts: Any, *, with_t5: bool, argument: str, source: str) -> list[EmbeddingSlot]:
    """The encoders a new token goes into: every loaded CLIP encoder, and T5 when ``with_t5``.

    Raises:
        UserInputError: ``with_t5`` on a model without a T5 encoder (SD, SDXL, or SD3 saved without T5), naming
            ``argument``; or a family that names a ``textual_inversion_refusal`` (its stock pipeline cannot load a
            new token: Z-Image, FLUX.2 [klein], Qwen-Image).
    """
    refusal = getattr(family, "textual_inversion_refusal", None)  # a family whose stock pipeline cannot load tokens
    if refusal:
        raise UserInputError(f"--model.pretrained_model_name_or_path: {source}: {refusal}")
    slots = embedding_slots(family)
    if with_t5:
        t5 = next((slot for slot in slots if slot.is_t5), None)
        if t5 is None or getattr(parts, t5.text_encoder, None) is None:
            where = f" ({t5.text_encoder})" if t5 else ""
            raise UserInputError(f"{argument}: {source} has no T5 text encoder{where}; train no T5 vectors, or use a "
                                 "model with T5")
    return [slot for slot in slots
            if (with_t5 or not slot.is_t5) and getattr(parts, slot.text_encoder, None) is not None]


def embedding_state(
    slots: Sequence[EmbeddingSlot], vectors: Sequence[torch.Tensor], token: str
) -> dict[str, torch.Tensor]:
    """The safetensors state of one learned token: ``{token: (n, dim)}`` in SD's format, else one ``(n, dim)``
    tensor per encoder key (``{"clip_l": ..., "t5": ...}``), fp32 on the CPU."""
    return {slot.key or token: v.detach().float().cpu().clone() for slot, v in zip(slots, vectors)}


def load_textual_inversion(pipe: Any, embeddings: torch.Tensor, tokens: list[str], text_encoder: Any,
                           tokenizer: Any) -> None:
    """diffusers' ``pipe.load_textual_inversion(embeddings, token=tokens, text_encoder=..., tokenizer=...)``.

    ``StableDiffusion3Pipeline`` lacks diffusers' ``TextualInversionLoaderMixin`` (0.42), so for it the mixin's own
    method runs on a stand-in that forwards everything else to the pipeline (:class:`_MixinView`).
    """
    from diffusers.loaders import TextualInversionLoaderMixin

    loader = pipe if isinstance(pipe, TextualInversionLoaderMixin) else _MixinView(pipe)
    loader.load_textual_inversion(embeddings, token=tokens, text_encoder=text_encoder, tokenizer=tokenizer)


def _mixin_view_class() -> type:
    from diffusers.loaders import TextualInversionLoaderMixin

    class MixinView(TextualInversionLoaderMixin):
        """diffusers' Textual Inversion loader on a pipeline without it: the mixin's methods, the pipeline's rest."""

        def __init__(self, pipe: Any) -> None:
            self.__dict__["_pipe"] = pipe

        def __getattr__(self, name: str) -> Any:
            return getattr(self.__dict__["_pipe"], name)

    return MixinView


def _MixinView(pipe: Any) -> Any:  # noqa: N802 - a class built on first use (diffusers is imported lazily)
    return _mixin_view_class()(pipe)


def load_embeddings_file(pipe: Any, path: str | Path) -> list[str]:
    """Load a Textual Inversion file into ``pipe``; return the token(s) it added.

    A one-key file (``{token: (n, dim)}``) goes through ``pipe.load_textual_inversion(path)``. A multi-encoder file
    (SDXL: ``clip_l``, ``clip_g``; FLUX: ``clip_l`` and optionally ``t5``; SD3: ``clip_l``, ``clip_g``, optionally
    ``t5``; the token in the file's metadata) is loaded into each encoder it has vectors for, each vector under
    diffusers' multi-vector names (``tok``, ``tok_1``...).
    """
    from safetensors import safe_open

    slots = {slot.key: slot for slot in embedding_slots(family_of_pipeline(pipe)) if slot.key}
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata() or {}
        per_encoder = bool(keys) and SDXL_EMBEDDING_KEYS[0] in keys and set(keys) <= set(slots)
        tensors = {key: handle.get_tensor(key) for key in keys} if per_encoder else None
    if tensors is None:
        pipe.load_textual_inversion(str(path))
        return keys
    token = metadata.get(TOKEN_METADATA_KEY)
    if not token:
        raise UserInputError(f"{path}: an embedding file with {sorted(keys)} needs its token in the metadata "
                             f"({TOKEN_METADATA_KEY!r})")
    for key, slot in slots.items():
        if key not in tensors:
            continue
        encoder = getattr(pipe, slot.text_encoder, None)
        if encoder is None:
            raise UserInputError(f"{path}: holds {key!r} vectors but the pipeline has no {slot.text_encoder}; load "
                                 f"the model with its T5 encoder")
        tensor = tensors[key]
        load_textual_inversion(pipe, tensor, placeholder_names(token, tensor.shape[0]), encoder,
                               getattr(pipe, slot.tokenizer))
    return [token]


# ------------------------------------------------------------------------ one file per encoder (issue 27, item 15)
# A learned token is written as one file per text encoder, each in diffusers' one-key format {token: (n, dim)}:
# the stock one-liner pipe.load_textual_inversion("run/learned_embeds.safetensors") then loads the first (CLIP)
# encoder's vectors under the right token, and the others load with the same call plus their encoder
# (text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2). A single file keyed clip_l/clip_g/t5 (what this
# package wrote before, and what A1111 / ComfyUI SDXL embeddings hold) made the one-liner register a token named
# "clip_l", or raise a ValueError printing the tensor; load_embeddings_file still reads it.


def sibling_file(first: str | Path, slot: EmbeddingSlot) -> Path:
    """The file of ``slot``'s vectors beside ``first`` (the first encoder's): ``learned_embeds_clip_g.safetensors``,
    ``learned_embeds_t5.safetensors``..."""
    first = Path(first)
    return first.with_name(f"{first.stem}_{slot.key}{first.suffix}")


def write_token_files(output_dir: str | Path, slots: Sequence[EmbeddingSlot], vectors: Sequence[torch.Tensor],
                      token: str, first_name: str) -> list[str]:
    """Write ``token``'s vectors, one file per encoder of ``slots`` in diffusers' one-key format: ``first_name`` for
    the first encoder, :func:`sibling_file` names for the others. Returns the file names."""
    from lightning_custom.runtime.io import write_safetensors

    names = []
    for index, (slot, tensor) in enumerate(zip(slots, vectors)):
        path = Path(output_dir) / first_name if index == 0 else sibling_file(Path(output_dir) / first_name, slot)
        write_safetensors(path, {token: tensor.detach().float().cpu().clone()})
        names.append(path.name)
    return names


def load_token_files(pipe: Any, first: str | Path) -> list[str]:
    """Load a token written by :func:`write_token_files` into every encoder of ``pipe`` that has its file (or a
    file of the older one-file multi-encoder format); return the token(s) added."""
    from safetensors.torch import load_file

    first = Path(first)
    tensors = load_file(str(first))
    if len(tensors) != 1 or set(tensors) & {*SDXL_EMBEDDING_KEYS, T5_EMBEDDING_KEY}:
        return load_embeddings_file(pipe, first)  # the older multi-encoder file (token in its metadata)
    slots = embedding_slots(family_of_pipeline(pipe))
    (token, tensor), = tensors.items()
    for index, slot in enumerate(slots):
        path = first if index == 0 else sibling_file(first, slot)
        if index and not path.is_file():
            continue
        vectors = tensor if index == 0 else next(iter(load_file(str(path)).values()))
        encoder = getattr(pipe, slot.text_encoder, None)
        if encoder is None:
            if index:
                continue  # a pipeline loaded without that encoder (e.g. SD3 without T5)
            raise UserInputError(f"{first}: the pipeline has no {slot.text_encoder}")
        load_textual_inversion(pipe, vectors, placeholder_names(token, vectors.shape[0]), encoder,
                               getattr(pipe, slot.tokenizer))
    return [token]


def pipeline_prompts(pipe: Any, prompts: list[str]) -> dict[str, list[str]]:
    """The pipeline's prompt arguments with multi-vector tokens written out for each tokenizer.

    Pipelines with diffusers' ``TextualInversionLoaderMixin`` (SD, SDXL, FLUX) do this themselves
    (``maybe_convert_prompt``): ``{"prompt": prompts}``. ``StableDiffusion3Pipeline`` does not, so its
    ``prompt``, ``prompt_2`` and ``prompt_3`` (CLIP-L, CLIP-G, T5) are converted here, each for its own tokenizer
    (a placeholder may have another number of vectors in T5).
    """
    from diffusers.loaders import TextualInversionLoaderMixin

    if isinstance(pipe, TextualInversionLoaderMixin):
        return {"prompt": list(prompts)}
    arguments = {}
    for index, slot in enumerate(embedding_slots(family_of_pipeline(pipe))):
        tokenizer = getattr(pipe, slot.tokenizer, None)
        if tokenizer is not None:
            name = "prompt" if index == 0 else f"prompt_{index + 1}"
            arguments[name] = _MixinView(pipe).maybe_convert_prompt(list(prompts), tokenizer)
    return arguments
