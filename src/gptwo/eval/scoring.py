"""Log-likelihood of continuations, batched: the one primitive every evaluation in gptwo.eval is built on.

A request is a pair (context tokens, continuation tokens). The model reads
`(context + continuation)[:-1]`, cut from the left to its context window, and the continuation's
score is the sum of its tokens' log-probabilities: the arithmetic of lm-evaluation-harness, so the
numbers agree with the harness's `hf` model. Long texts become such pairs through sliding windows
(`rolling_pairs`), so perplexity is the same computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptwo.errors import GptwoError
from gptwo.progress import progress_bar
from gptwo.tokenizer import Tokenizer

Pair = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Score:
    """The continuation's total log-probability (nats) and whether greedy decoding would produce it."""

    logprob: float
    greedy: bool


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of (context, continuation) as the harness makes them.

    Trailing spaces of the context move to the continuation; the continuation's tokens are those
    of the whole text after the context's, so word-initial merges match. An empty context becomes
    <|endoftext|>, so the first token is predicted too.
    """
    if not context:
        tokens = tokenizer.encode(continuation)
        if tokens and tokens[0] == tokenizer.eot_token:
            return tokens[:1], tokens[1:]
        return [tokenizer.eot_token], tokens
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_tokens = tokenizer.encode(context)
    return context_tokens, whole[len(context_tokens) :]


def rolling_pairs(tokens: Sequence[int], prefix_token: int, block: int, stride: int | None = None) -> list[Pair]:
    """Sliding windows that score every token of `tokens` exactly once (strided perplexity).

    The first window scores up to `block` tokens after `prefix_token`; each later one scores the
    next `stride` tokens and reads up to `block` tokens, so every scored token sees at least
    `block - stride` tokens of context. `stride = block` (the default) gives the harness's
    disjoint rolling windows.
    """
    stride = block if stride is None else stride
    if not 1 <= stride <= block:
        raise GptwoError(
            f"stride {stride} is outside 1..{block} (the model's context)",
            f"use a stride between 1 and {block}, e.g. {block // 2}",
        )
    seq = [prefix_token, *tokens]
    pairs: list[Pair] = []
    start, end = 1, min(block, len(tokens)) + 1  # targets are seq[start:end]
    while start < len(seq):
        first_input = max(0, end - 1 - block)
        pairs.append((seq[first_input:start], seq[start:end]))
        start, end = end, min(end + stride, len(seq))
    return pairs


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module, pairs: Sequence[Pair], batch_size: int = 8, progress: str | None = None
) -> list[Score]:
    """Score each (context, continuation) pair; batches are right-padded, longest first.

    `progress` is a label for a progress bar on stderr (none when it is None).
    """
    if batch_size < 1:
        raise GptwoError(f"batch size {batch_size} must be at least 1", "use --batch-size 1 or more")
    block = model.config.block_size
    for context, continuation in pairs:
        if not context or not continuation:
            raise GptwoError("a request has an empty context or continuation", "give both some text")
        if len(continuation) > block:
            raise GptwoError(
                f"a continuation of {len(continuation)} tokens is longer than the context of {block}", "shorten it"
            )
    device = model_device(model)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[Score | None] = [None] * len(pairs)
    with progress_bar(
        progress or "", total=len(pairs), unit="window", enabled=progress is not None, leave=False
    ) as bar:
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            inputs = [([*pairs[i][0], *pairs[i][1]])[-(block + 1) :][:-1] for i in rows]
            ids = torch.zeros(len(rows), max(map(len, inputs)), dtype=torch.long)
            for r, tokens in enumerate(inputs):
                ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logits = model(ids.to(device))
            for r, i in enumerate(rows):
                results[i] = _score_row(logits[r], len(inputs[r]), pairs[i][1])
            bar.update(len(rows))
    return results  # type: ignore[return-value]


def _score_row(logits: torch.Tensor, length: int, continuation: Sequence[int]) -> Score:
    """Score the continuation from one row's logits; its predictions are the last len(continuation) real positions."""
    logprobs = F.log_softmax(logits[length - len(continuation) : length].float(), dim=-1)
    target = torch.tensor(list(continuation), dtype=torch.long, device=logprobs.device)
    total = logprobs.gather(-1, target[:, None]).sum()
    return Score(float(total), bool((logprobs.argmax(-1) == target).all()))
