"""New-token handling shared by the methods that learn a token embedding (TI, DreamBooth-LoRA, Custom Diffusion)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_custom.errors import UserInputError


def placeholder_names(placeholder_token: str, num_vectors: int) -> list[str]:
    """Token strings for a ``num_vectors`` embedding, in diffusers' convention: ``tok``, ``tok_1``, ``tok_2``, ..."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]


_SENTENCEPIECE_SPACE = "\u2581"  # T5's SentencePiece marks a word start with "▁" ("▁dog"); CLIP ends words with "</w>"


def _bare_piece(piece: str) -> str:
    """A vocabulary piece without its word-boundary marker (CLIP's ``</w>`` suffix, SentencePiece's ``▁`` prefix)."""
    return piece.replace("</w>", "").removeprefix(_SENTENCEPIECE_SPACE)


def token_in_vocabulary(tokenizer, token: str) -> bool:
    """Whether ``token`` already has its own id (a vocabulary word or an added token; CLIP BPE or T5 SentencePiece)."""
    if token in tokenizer.get_vocab():
        return True
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and _bare_piece(tokenizer.convert_ids_to_tokens(ids[0])).lower() == token.lower()


def single_token_id(tokenizer, word: str, argument: str, where: str = "") -> int:
    """The id of a word that must be exactly one token (an initializer), else a one-line error.

    ``where`` names the tokenizer in the message (e.g. ``" in the T5 tokenizer"``).
    """
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise UserInputError(
            f"{argument}: {word!r} is {len(ids)} tokens{where} ({tokenizer.convert_ids_to_tokens(ids)}); "
            "use a word that is a single token"
        )
    if ids[0] == getattr(tokenizer, "unk_token_id", None) and word != tokenizer.unk_token:
        raise UserInputError(f"{argument}: {word!r} is not in the vocabulary{where} (it reads as "
                             f"{tokenizer.unk_token!r}); use a word the tokenizer knows")
    return ids[0]


def add_placeholder_tokens(tokenizer, text_encoder: nn.Module, tokens: list[str], argument: str,
                           where: str = "") -> list[int]:
    """Add ``tokens`` to the tokenizer and grow the text encoder's embedding matrix; return their ids.

    The existing rows are copied unchanged; the new rows are filled by the caller. The matrix only grows: T5's
    has padding rows beyond its tokenizer (32128 for 32100 tokens), so its first new tokens get existing rows,
    the ids diffusers' ``load_textual_inversion`` gives them too.
    """
    for token in tokens:
        if token_in_vocabulary(tokenizer, token):
            raise UserInputError(f"{argument}: {token!r} is already in the tokenizer's vocabulary{where}; "
                                 "pick a new token")
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise UserInputError(f"{argument}: could not add {tokens} to the tokenizer{where} (already present?)")
    if len(tokenizer) > text_encoder.get_input_embeddings().weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(tokens)


def input_embedding_modules(text_encoder: nn.Module) -> list[nn.Embedding]:
    """Every embedding layer of ``text_encoder`` that holds its input-embedding matrix.

    CLIP has one (``token_embedding``). T5's ``shared`` and ``encoder.embed_tokens`` may be two modules tied to one
    weight, and the encoder calls the latter, so a splice must hook both.
    """
    weight = text_encoder.get_input_embeddings().weight
    found = [text_encoder.get_input_embeddings()]
    for module in text_encoder.modules():
        if isinstance(module, nn.Embedding) and module.weight is weight and all(module is not m for m in found):
            found.append(module)
    return found


class TokenVectors(nn.Module):
    """Trainable embedding rows for a few new token ids, spliced into a frozen embedding's output.

    A forward hook replaces the output at positions holding ``token_ids``, so gradients reach only these rows and
    every other row of the embedding matrix stays bit-identical (no restore-after-step needed).
    """

    def __init__(self, token_ids: list[int], initial: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.long), persistent=False)
        # The same ids as Python ints for the splice: reading the device buffer every step would sync the GPU.
        self.token_id_list: tuple[int, ...] = tuple(int(i) for i in token_ids)
        self.vectors = nn.Parameter(initial.detach().clone().float())

    def splice(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings`` with the rows of the new tokens replaced by the trainable vectors."""
        out = embeddings
        for row, token_id in enumerate(self.token_id_list):
            mask = (input_ids == token_id).unsqueeze(-1)
            out = torch.where(mask, self.vectors[row].to(out.dtype), out)
        return out

    def attach(self, embedding: nn.Embedding) -> torch.utils.hooks.RemovableHandle:
        """Register the splice as a forward hook of ``embedding`` (a bound method, so the module pickles for DDP)."""
        return embedding.register_forward_hook(self._splice_hook)

    def attach_to(self, text_encoder: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Splice into every input-embedding layer of ``text_encoder`` (:func:`input_embedding_modules`)."""
        return [self.attach(module) for module in input_embedding_modules(text_encoder)]

    def _splice_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.splice(args[0], output)

    @torch.no_grad()
    def write_into(self, embedding: nn.Embedding) -> None:
        """Copy the learned vectors into the embedding matrix (for export or plain inference)."""
        embedding.weight[self.token_ids] = self.vectors.to(embedding.weight.dtype)


INPUT_ID_KEYS = ("input_ids", "input_ids_2", "input_ids_3")  # batch keys of the token ids of each text encoder


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded to ``max_length`` (default the tokenizer's max length), as pipelines do (a CPU tensor).

    A family whose pipeline tokenizes a formatted prompt (a chat template: FLUX.2, Z-Image, Qwen-Image) has attached
    its format to the tokenizer (:func:`lightning_custom.families.qwen_text.format_prompts`)."""
    from lightning_custom.families.qwen_text import format_prompts

    return tokenizer(
        format_prompts(tokenizer, captions), padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids


CaptionRewrite = Callable[[list[str]], list[str]]


class CaptionTokenizer:
    """Captions to token ids for every text encoder, in the data loader's collate instead of the training step.

    Args:
        tokenizers: one per text encoder (two for SDXL).
        prepare_captions: rewrites captions first (e.g. writes a multi-vector placeholder out as its tokens); one
            for all tokenizers, or a sequence with one per tokenizer (a placeholder may have a different number of
            vectors in T5 than in CLIP).
        max_lengths: the padded length for each tokenizer (default each tokenizer's ``model_max_length``).
    """

    def __init__(self, tokenizers: Sequence[Any],
                 prepare_captions: CaptionRewrite | Sequence[CaptionRewrite | None] | None = None,
                 max_lengths: Sequence[int | None] | None = None):
        self.tokenizers = list(tokenizers)
        self.prepare_captions = prepare_captions
        self.max_lengths = list(max_lengths) if max_lengths is not None else [None] * len(self.tokenizers)

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids": (B, 77) ids}`` (and ``"input_ids_2"``, ``"input_ids_3"`` for more tokenizers)."""
        captions = list(captions)
        rewrites = self.prepare_captions
        if rewrites is None or callable(rewrites):
            shared = rewrites(captions) if rewrites is not None else captions
            per_tokenizer = [shared] * len(self.tokenizers)
        else:
            per_tokenizer = [rewrite(captions) if rewrite is not None else captions for rewrite in rewrites]
        return {key: tokenize_captions(tok, text, length)
                for key, tok, text, length in zip(INPUT_ID_KEYS, self.tokenizers, per_tokenizer, self.max_lengths)}


def batch_input_ids(batch: dict[str, Any]) -> list[torch.Tensor] | None:
    """The batch's token ids, one tensor per text encoder, when the loader tokenized it; else ``None``."""
    if INPUT_ID_KEYS[0] not in batch:
        return None
    return [batch[key] for key in INPUT_ID_KEYS if key in batch]


def learn_new_token(
    tokenizer, text_encoder: nn.Module, placeholder_token: str, initializer_token: str, num_vectors: int,
    argument_prefix: str = "--model", num_vectors_argument: str = "num_vectors", where: str = "",
) -> tuple[list[str], TokenVectors]:
    """Add a (multi-vector) placeholder initialised from ``initializer_token``; return its names and vectors.

    ``where`` names the tokenizer in error messages (e.g. ``" in the T5 tokenizer"``).
    """
    if num_vectors < 1:
        raise UserInputError(f"{argument_prefix}.{num_vectors_argument}: must be at least 1, got {num_vectors}")
    init_id = single_token_id(tokenizer, initializer_token, f"{argument_prefix}.initializer_token", where)
    names = placeholder_names(placeholder_token, num_vectors)
    ids = add_placeholder_tokens(tokenizer, text_encoder, names, f"{argument_prefix}.placeholder_token", where)
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        initial = embedding.weight[init_id].detach().float().expand(num_vectors, -1).clone()
        embedding.weight[ids] = initial.to(embedding.weight.dtype)
    vectors = TokenVectors(ids, initial)
    return names, vectors


def expand_placeholder(captions: list[str], placeholder_token: str, names: list[str]) -> list[str]:
    """Write a multi-vector placeholder out as its tokens, as diffusers' ``maybe_convert_prompt`` does."""
    if len(names) == 1:
        return captions
    return [c.replace(placeholder_token, " ".join(names)) for c in captions]


def split_tokens(value: str, argument: str) -> list[str]:
    """``"<new1>+<new2>"`` -> ``["<new1>", "<new2>"]`` (diffusers' Custom Diffusion ``--modifier_token`` syntax)."""
    tokens = [t.strip() for t in value.split("+")]
    if not value.strip() or any(not t for t in tokens):
        raise UserInputError(f"{argument}: {value!r} has an empty token; write tokens like '<new1>' or '<new1>+<new2>'")
    if len(set(tokens)) != len(tokens):
        raise UserInputError(f"{argument}: {value!r} repeats a token")
    return tokens


def learn_new_tokens(
    tokenizer, text_encoder: nn.Module, tokens: list[str], initializers: list[str], argument_prefix: str = "--model",
    where: str = "",
) -> TokenVectors:
    """Add several single-vector tokens, each initialised from its own initializer word; return their vectors.

    One initializer may serve every token. The vectors are attached by the caller (:meth:`TokenVectors.attach`).
    """
    if len(initializers) == 1:
        initializers = initializers * len(tokens)
    if len(initializers) != len(tokens):
        raise UserInputError(
            f"{argument_prefix}.initializer_token: {len(initializers)} initializers for {len(tokens)} tokens "
            f"{tokens}; give one, or one per token joined by '+'"
        )
    init_ids = [single_token_id(tokenizer, word, f"{argument_prefix}.initializer_token", where)
                for word in initializers]
    ids = add_placeholder_tokens(tokenizer, text_encoder, tokens, f"{argument_prefix}.placeholder_token", where)
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        initial = embedding.weight[init_ids].detach().float().clone()
        embedding.weight[ids] = initial.to(embedding.weight.dtype)
    return TokenVectors(ids, initial)


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


def pipeline_family(pipe: Any) -> Any:
    """The model family of a diffusers pipeline (:func:`lightning_custom.families.family_of_pipeline`)."""
    from lightning_custom.families import family_of_pipeline

    return family_of_pipeline(pipe)

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

    slots = {slot.key: slot for slot in embedding_slots(pipeline_family(pipe)) if slot.key}
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
    from lightning_custom.io import write_safetensors

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
    slots = embedding_slots(pipeline_family(pipe))
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
    for index, slot in enumerate(embedding_slots(pipeline_family(pipe))):
        tokenizer = getattr(pipe, slot.tokenizer, None)
        if tokenizer is not None:
            name = "prompt" if index == 0 else f"prompt_{index + 1}"
            arguments[name] = _MixinView(pipe).maybe_convert_prompt(list(prompts), tokenizer)
    return arguments


def expander(placeholder_token: str, names: list[str]) -> Callable[[list[str]], list[str]]:
    """A picklable caption rewrite (for data-loader workers) writing ``placeholder_token`` out as ``names``."""
    return partial(expand_placeholder, placeholder_token=placeholder_token, names=names)
