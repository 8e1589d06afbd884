"""What the 2026 families (FLUX.2 [klein], Z-Image, Qwen-Image) share on the text side: a Qwen chat-template prompt,
the attention mask of right-padded ids (and, re-exported, the offline Qwen tokenizer of
:mod:`lightning_custom.synthetic.offline_qwen_tokenizer`).

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

from lightning_custom.synthetic.offline_qwen_tokenizer import QWEN3_CHAT_TEMPLATE, build_qwen_tokenizer

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
