"""An offline Qwen2 byte-level BPE tokenizer for the tiny and random Qwen-based models (Z-Image, FLUX.2 [klein],
Qwen-Image; issue 28), built in-process from a small vocabulary with Qwen's pre-tokenizer, special tokens and a
reduced Qwen3 chat template. Beside :mod:`lightning_custom.synthetic.offline_tokenizers`, below the families and
the tiny-model builders, so that neither imports the other in a cycle.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

__all__ = ["QWEN3_CHAT_TEMPLATE", "build_qwen_tokenizer"]

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


@functools.lru_cache(maxsize=None)
def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in which each word, alone and after a space (``Ġword``), is one token."""
    from lightning_custom.synthetic.offline_tokenizers import bytes_to_unicode, merge_into_one_token

    b2u = bytes_to_unicode()
    vocab_list = list(b2u.values())
    vocab_set = set(vocab_list)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    pieces_of = [w for word in words for w in (word, " " + word)]
    for word in sorted(pieces_of, key=lambda w: (-len(w), w)):
        merge_into_one_token([b2u[b] for b in word.encode("utf-8")], vocab_list, vocab_set, merges, ranks)
    return {token: i for i, token in enumerate(vocab_list)}, merges


def build_qwen_tokenizer(model_max_length: int = 512, extra_words: Sequence[str] = ()) -> Any:
    """An offline ``Qwen2Tokenizer`` (byte-level BPE, Qwen's pre-tokenizer and special tokens, Qwen3's chat template).

    Every word of the package's caption vocabulary
    (:data:`lightning_custom.synthetic.offline_tokenizers.TEMPLATE_WORDS`, ``COMMON_WORDS``), and ``user`` / ``assistant`` / ``system``, is one token; anything else falls back to bytes, so
    every text tokenizes. The pad token is ``<|endoftext|>`` as in Qwen's tokenizers.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from lightning_custom.synthetic.offline_tokenizers import COMMON_WORDS, TEMPLATE_WORDS

    words = tuple(dict.fromkeys(w.lower() for w in (*TEMPLATE_WORDS, *COMMON_WORDS, "user", "assistant", "system",
                                                    *extra_words) if w.isalpha()))
    vocab, merges = _vocab_and_merges(words)
    vocab = {"<|endoftext|>": len(vocab), **vocab}
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in _SPECIAL_TOKENS])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer
