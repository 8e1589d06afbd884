"""New-token handling shared by the methods that learn a token embedding (TI, DreamBooth-LoRA, Custom Diffusion)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
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
        format_prompts(tokenizer, captions), padding="max_length", max_length=max_length or tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
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


def expander(placeholder_token: str, names: list[str]) -> Callable[[list[str]], list[str]]:
    """A picklable caption rewrite (for data-loader workers) writing ``placeholder_token`` out as ``names``."""
    return partial(expand_placeholder, placeholder_token=placeholder_token, names=names)


# The token files' format moved to token_files.py, which imports this module; old imports of those names still work.
_MOVED_TO_TOKEN_FILES = {"EmbeddingSlot", "embedding_slots", "embedding_state", "load_embeddings_file",
                         "load_textual_inversion", "load_token_files", "pipeline_prompts", "sibling_file",
                         "token_slots", "write_token_files"}


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_TOKEN_FILES:
        from lightning_custom.methods import token_files

        return getattr(token_files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
