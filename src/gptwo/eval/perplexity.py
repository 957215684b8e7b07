"""Perplexity of long texts with the strided sliding window: per token, per word, and bits per byte.

Each text is scored from an <|endoftext|> prefix, in windows of the model's context that advance
by `stride` tokens (see `scoring.rolling_pairs`). Per-word perplexity and bits per byte divide the
same total negative log-likelihood by the number of words or UTF-8 bytes, so models with different
tokenizers can be compared (GPT-2 paper, section 3.1). Words are counted as lm-evaluation-harness
counts them: pieces between runs of whitespace.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gptwo.errors import GptwoError
from gptwo.eval.scoring import rolling_pairs, score_pairs
from gptwo.tokenizer import Tokenizer


def count_words(text: str) -> int:
    """Words the way the harness counts them (`len(re.split(r"\\s+", text))`)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


@dataclass
class TextStats:
    """Total negative log-likelihood (nats) of one text, or of several summed, with what it is divided by."""

    name: str
    nll: float
    tokens: int
    words: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "perplexity": self.perplexity,
            "word_perplexity": self.word_perplexity,
            "bits_per_byte": self.bits_per_byte,
            "nll": self.nll,
            "tokens": self.tokens,
            "words": self.words,
            "bytes": self.bytes,
        }


def total(stats: Sequence[TextStats], name: str = "all") -> TextStats:
    """All texts as one: sums of log-likelihoods and of counts (not a mean of perplexities)."""
    return TextStats(
        name,
        sum(s.nll for s in stats),
        sum(s.tokens for s in stats),
        sum(s.words for s in stats),
        sum(s.bytes for s in stats),
    )


def score_texts(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    originals: Sequence[str] | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: str | None = None,
) -> list[TextStats]:
    """Strided-window statistics of each text; the windows of all texts share batches.

    Words and bytes are counted in `originals[i]` when given (WikiText: the text before
    detokenization, as the paper and the harness count them), else in the text itself.
    """
    names = list(names) if names is not None else [f"text {i + 1}" for i in range(len(texts))]
    originals = list(originals) if originals is not None else list(texts)
    block = model.config.block_size
    pairs, owner, counts = [], [], []
    for i, text in enumerate(texts):
        tokens = tokenizer.encode_ordinary(text)
        if not tokens:
            raise GptwoError(f"{names[i]} is empty", "give text with at least one character")
        windows = rolling_pairs(tokens, tokenizer.eot_token, block, stride)
        pairs += windows
        owner += [i] * len(windows)
        counts.append(len(tokens))
    nll = [0.0] * len(texts)
    for i, score in zip(owner, score_pairs(model, pairs, batch_size, progress)):
        nll[i] -= score.logprob
    return [
        TextStats(names[i], nll[i], counts[i], count_words(originals[i]), count_bytes(originals[i]))
        for i in range(len(texts))
    ]


def text_files(paths: Sequence[str]) -> list[str]:
    """The files to score: each file as given, and a folder's .txt and .md files (recursively, sorted)."""
    from gptwo.data.sources import TEXT_SUFFIXES, iter_files

    files = []
    for path in paths:
        if os.path.isdir(path):
            found = [f for f in iter_files([path]) if f.endswith(TEXT_SUFFIXES)]
            if not found:
                raise GptwoError(f"folder {path} holds no .txt or .md files", "pass text files, or a folder of them")
            files += found
        else:
            files.append(path)
    return files


def read_text_file(path: str) -> str:
    """A text file's contents; clear errors for a missing, empty or binary file."""
    if not os.path.isfile(path):
        raise GptwoError(f"file {path} not found", "check the path")
    with open(path, "rb") as f:
        return text_of_bytes(f.read(), path)


def text_of_bytes(raw: bytes, name: str, empty_fix: str = "give a file with text in it") -> str:
    """Bytes read from a file or stdin as text: empty or binary (NUL bytes) input is an error naming `name`;
    invalid UTF-8 sequences are read as U+FFFD, with a note."""
    if not raw.strip():
        raise GptwoError(f"{name} is empty", empty_fix)
    if b"\x00" in raw[:4096]:
        raise GptwoError(f"{name} looks binary (it has NUL bytes)", "give UTF-8 text")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad:
        print(f"note: {name}: {bad} invalid UTF-8 sequence(s) read as U+FFFD", file=sys.stderr)
    return text


def perplexity_report(
    model_spec: str,
    files: Sequence[str],
    *,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
    dtype: str | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    merge: bool = False,
) -> dict:
    """What `gptwo eval ppl` prints: totals over all files (top level) and one row per file."""
    from gptwo.weights import load_model

    if not files:
        raise GptwoError("no files to evaluate", "pass one or more text files")
    files = text_files(files)
    texts = [read_text_file(path) for path in files]
    model, tokenizer = load_model(
        model_spec, device=device, dtype=dtype, quantize=quantize, adapter=adapter, merge=merge
    )
    per_file = score_texts(
        model,
        tokenizer,
        texts,
        names=list(files),
        stride=stride,
        batch_size=batch_size,
        progress="perplexity" if progress else None,
    )
    summary = total(per_file).to_dict()
    del summary["name"]
    block = model.config.block_size
    return {
        "model": model_spec,
        "context": block,
        "stride": stride or block,
        **summary,
        "files": [s.to_dict() for s in per_file],
    }
