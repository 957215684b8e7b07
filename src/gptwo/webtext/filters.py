"""Document filters of the extract stage: GPT-2 token count and language identification.

Both work offline: the tokenizer ships with the package, and py3langid's model lives inside its
package (a langid.py model covering 97 languages).
"""

from __future__ import annotations

from functools import lru_cache

import regex

# GPT-2's pre-tokenizer: every piece it splits off becomes at least one BPE token.
GPT2_PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

LANGID_MAX_CHARS = 5000  # the language of a page is clear long before this; keeps detection cheap


@lru_cache(maxsize=1)
def _gpt2_encode():
    try:
        from gptwo.tokenizer import Tokenizer
    except ImportError:  # the tokenizer module is not there yet: count pre-tokenizer pieces instead
        return None
    return Tokenizer.gpt2().encode


def count_tokens(text: str) -> int:
    """Number of GPT-2 BPE tokens in `text`."""
    encode = _gpt2_encode()
    if encode is None:
        return sum(1 for _ in GPT2_PIECES.finditer(text))
    return len(encode(text))


def has_min_tokens(text: str, min_tokens: int) -> bool:
    """Whether `text` has at least `min_tokens` GPT-2 tokens. Every pre-tokenizer piece is at
    least one token, so long texts are decided without running the BPE."""
    pieces = 0
    for _ in GPT2_PIECES.finditer(text):
        pieces += 1
        if pieces >= min_tokens:
            return True
    return count_tokens(text) >= min_tokens


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """ISO 639-1 code of `text`'s language and the detector's probability for it."""
    lang, prob = _language_identifier().classify(text[:LANGID_MAX_CHARS])
    return lang, float(prob)
