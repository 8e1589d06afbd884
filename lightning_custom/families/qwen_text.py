"""What the 2026 families (FLUX.2 [klein], Z-Image, Qwen-Image) share on the text side: a Qwen chat-template prompt,
the attention mask of right-padded ids, and an offline Qwen2 byte-level BPE tokenizer for the tiny models.

Their pipelines do not tokenize the caption itself but a chat-formatted version of it (``ZImagePipeline`` and
``Flux2KleinPipeline`` through ``tokenizer.apply_chat_template``, ``QwenImagePipeline`` through a fixed template
string). The package tokenizes captions in one place, :func:`lightning_custom.methods.tokens.tokenize_captions`,
which knows no family; a family therefore attaches its prompt format to the tokenizer it loads
(:func:`set_prompt_format`), and ``tokenize_captions`` applies it (:func:`format_prompts`). The tokenizer written
back by a pipeline's ``save_pretrained`` is unchanged (the attribute is not part of its files).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "PROMPT_FORMAT_ATTRIBUTE",
    "QWEN3_CHAT_TEMPLATE",
    "build_qwen_tokenizer",
    "chat_prompt",
    "format_prompts",
    "padding_mask",
    "set_prompt_format",
]

#: The tokenizer attribute holding a family's prompt format (a picklable ``Callable[[str], str]``).
PROMPT_FORMAT_ATTRIBUTE = "lightning_custom_prompt_format"

#: Qwen3's chat template, reduced to what the pipelines use: ``role`` / ``content`` messages, the generation prompt,
#: and the empty thinking block that ``enable_thinking=False`` adds (Qwen3's own template does the same for these
#: inputs). Only the tiny offline tokenizer carries it; real checkpoints ship their own.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                   "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def set_prompt_format(tokenizer: Any, prompt_format: Callable[[str], str] | None) -> Any:
    """Attach ``prompt_format`` (caption -> the text the pipeline tokenizes) to ``tokenizer``; returns it."""
    if tokenizer is not None:
        setattr(tokenizer, PROMPT_FORMAT_ATTRIBUTE, prompt_format)
    return tokenizer


def format_prompts(tokenizer: Any, captions: Sequence[str]) -> list[str]:
    """``captions`` as ``tokenizer``'s family formats them before tokenizing (unchanged for SD, SDXL, FLUX.1, SD3)."""
    prompt_format = getattr(tokenizer, PROMPT_FORMAT_ATTRIBUTE, None)
    return [prompt_format(c) for c in captions] if prompt_format is not None else list(captions)


def _apply_chat_template(tokenizer: Any, caption: str, enable_thinking: bool) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)


def chat_prompt(tokenizer: Any, enable_thinking: bool) -> Callable[[str], str]:
    """The prompt format of ``ZImagePipeline._encode_prompt`` (``enable_thinking=True``) and
    ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` (``False``): one user message through the chat template."""
    return functools.partial(_apply_chat_template, tokenizer, enable_thinking=enable_thinking)


def padding_mask(input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """The attention mask the tokenizer returned with ``input_ids`` (``padding="max_length"``), rebuilt from them:
    ``True`` except at pad ids. Qwen's pad token (``<|endoftext|>``) never occurs inside a chat-formatted prompt."""
    return input_ids != tokenizer.pad_token_id


@functools.lru_cache(maxsize=None)
def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in which each word, alone and after a space (``Ġword``), is one token."""
    from lightning_custom.offline_tokenizers import _bpe, bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab_list = list(b2u.values())
    vocab_set = set(vocab_list)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    pieces_of = [w for word in words for w in (word, " " + word)]
    for word in sorted(pieces_of, key=lambda w: (-len(w), w)):
        pieces = _bpe([b2u[b] for b in word.encode("utf-8")], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            merged = pieces[0] + pieces[1]
            if merged not in vocab_set:
                vocab_set.add(merged)
                vocab_list.append(merged)
            pieces = [merged, *pieces[2:]]
    return {token: i for i, token in enumerate(vocab_list)}, merges


def build_qwen_tokenizer(model_max_length: int = 512, extra_words: Sequence[str] = ()) -> Any:
    """An offline ``Qwen2Tokenizer`` (byte-level BPE, Qwen's pre-tokenizer and special tokens, Qwen3's chat template).

    Every word of the package's caption vocabulary (:data:`lightning_custom.offline_tokenizers.TEMPLATE_WORDS`,
    ``COMMON_WORDS``), and ``user`` / ``assistant`` / ``system``, is one token; anything else falls back to bytes, so
    every text tokenizes. The pad token is ``<|endoftext|>`` as in Qwen's tokenizers.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from lightning_custom.offline_tokenizers import COMMON_WORDS, TEMPLATE_WORDS

    words = tuple(dict.fromkeys(w.lower() for w in (*TEMPLATE_WORDS, *COMMON_WORDS, "user", "assistant", "system",
                                                    *extra_words) if w.isalpha()))
    vocab, merges = _vocab_and_merges(words)
    vocab = {"<|endoftext|>": len(vocab), **vocab}
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in _SPECIAL_TOKENS])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer
