"""Offline tokenizers for the tiny and random models: a byte-level BPE ``CLIPTokenizer`` and a word-level stand-in
for T5's SentencePiece tokenizer, built in-process from a small vocabulary (no downloads).

Their own module, below ``architectures``, ``toy_models`` and ``toy_flow`` (which all use them), so that none of
those imports another in a cycle (issue 26).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# diffusers examples/textual_inversion: imagenet_templates_small + imagenet_style_templates_small.
_TI_TEMPLATES = (
    "a photo of a {} | a rendering of a {} | a cropped photo of the {} | the photo of a {} | "
    "a photo of a clean {} | a photo of a dirty {} | a dark photo of the {} | a photo of my {} | "
    "a photo of the cool {} | a close-up photo of a {} | a bright photo of the {} | "
    "a good photo of the {} | a photo of one {} | a rendition of the {} | a photo of a nice {} | "
    "a photo of the small {} | a photo of the weird {} | a photo of the large {} | "
    "a painting in the style of {} | a rendering in the style of {} | a picture in the style of {} | "
    "a cropped painting in the style of {} | a close-up painting in the style of {} | "
    "a rendition in the style of {} | a weird painting in the style of {} | "
    "a large painting in the style of {} | a small painting in the style of {} | "
    "a good painting in the style of {}"
)
TEMPLATE_WORDS: tuple[str, ...] = tuple(dict.fromkeys(re.findall(r"[a-z]+", _TI_TEMPLATES)))
COMMON_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        "dog cat toy object sculpture person man woman child face style art artwork car house tree "
        "flower bird fish ball box cup bottle chair table book hat shoe bag robot teapot backpack "
        "red green blue yellow white black grey gray orange purple pink brown gold silver "
        "star square circle triangle heart cube sphere shape striped stripes dotted plain pattern "
        "background foreground on with and or at by for from to near under over inside outside "
        "sks is it an this that there here image picture drawing sketch cartoon toy figure "
        "high quality detailed simple beautiful colorful sunny snowy beach forest city street "
        "grass sand water sky wall floor room kitchen garden mountain river night day".split()
    )
)


def bytes_to_unicode() -> dict[int, str]:
    """Returns CLIP/GPT-2's reversible mapping from the 256 bytes to printable unicode chars."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies BPE merges (lowest rank first, leftmost on ties) to a symbol list."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_clip_tokenizer(extra_words: Sequence[str] = ()) -> Any:
    """Builds a small offline CLIP byte-level BPE tokenizer.

    The vocabulary holds the 256 byte-level characters (plain and with ``</w>``),
    intermediate merge products, one whole-word token per known word
    (:data:`TEMPLATE_WORDS`, :data:`COMMON_WORDS` and ``extra_words``) and the
    special tokens ``<|startoftext|>`` / ``<|endoftext|>`` (last two ids, as in
    CLIP). Unknown words fall back to sub-word / character tokens.

    Args:
        extra_words: Additional words that should each encode to a single token.
            Words are lower-cased; words that cannot be single tokens (e.g. they
            contain spaces or punctuation splits) are dropped.

    Returns:
        A ``transformers.CLIPTokenizer`` with ``model_max_length=77`` and
        ``<|endoftext|>`` as pad token (like Stable Diffusion).
    """
    from transformers import CLIPTokenizer

    words = [w.strip().lower() for w in (*TEMPLATE_WORDS, *COMMON_WORDS, *extra_words)]
    # CLIP's pre-tokenizer splits on anything that is not a run of letters.
    words = list(dict.fromkeys(w for w in words if w.isalpha()))
    for _ in range(3):
        vocab, merges = _clip_vocab_and_merges(words)
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
        bad = {w for w in words if len(tokenizer.encode(w, add_special_tokens=False)) != 1}
        if not bad:
            break
        words = [w for w in words if w not in bad]
    return tokenizer


def merge_into_one_token(symbols: list[str], vocab_list: list[str], vocab_set: set[str],
                         merges: list[tuple[str, str]], ranks: dict[tuple[str, str], int]) -> None:
    """Append the merges (and their tokens) that make ``symbols`` one BPE token, left to right. New merges are
    appended, so the words made single tokens before never change."""
    pieces = _bpe(symbols, ranks)
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


def _clip_vocab_and_merges(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Builds a CLIP-style vocab and merge list making each of ``words`` a single token."""
    b2u = bytes_to_unicode()
    chars = list(b2u.values())
    vocab_list: list[str] = chars + [c + "</w>" for c in chars]
    vocab_set = set(vocab_list)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(words, key=lambda w: (-len(w), w)):
        symbols = [b2u[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        merge_into_one_token(symbols, vocab_list, vocab_set, merges, ranks)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_t5_tokenizer(model_max_length: int = 32) -> Any:
    """Builds an offline word-level tokenizer standing in for T5's SentencePiece one.

    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (T5's order), then one id per known word; an ``</s>`` is appended.

    Args:
        model_max_length: The tokenizer's maximum length (the pipelines' ``max_sequence_length``).

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = dict.fromkeys(w.lower() for w in (*TEMPLATE_WORDS, *COMMON_WORDS))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: 3 + i for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length,
    )
