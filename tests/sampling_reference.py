"""A reference for gptwo's logit controls, independent of gptwo.sampling: greedy decoding on the plain model
forward with transformers' logits processors (logit bias, min_tokens, repetition penalty) and OpenAI's
frequency / presence penalties written out. Importable from any test module (tests/ is on sys.path)."""

from __future__ import annotations

from collections import Counter

import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)


def openai_penalties(scores: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's definition: logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c counting the output's tokens."""
    scores = scores.clone()
    for token, count in Counter(output).items():
        scores[..., token] -= count * frequency + presence
    return scores


def processors(prompt_len: int, eos: int, repetition=1.0, bias=None, min_tokens=0) -> list:
    """transformers' processors for the controls, in gptwo's (vLLM's) order: bias, min_tokens, repetition."""
    chain = []
    if bias:
        chain.append(SequenceBiasLogitsProcessor({(int(t),): float(b) for t, b in bias.items()}))
    if min_tokens:
        chain.append(MinNewTokensLengthLogitsProcessor(prompt_len, min_tokens, eos))
    if repetition != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(repetition))
    return chain


@torch.no_grad()
def reference_greedy(
    model,
    prompt: list[int],
    max_tokens: int,
    eos: int,
    *,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: dict | None = None,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    vocab: int = 50257,
) -> list[int]:
    """The greedy tokens after `prompt` under the controls (ending at `eos` unless `ignore_eos`)."""
    chain = processors(len(prompt), eos, repetition, bias, min_tokens)
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        scores = model(torch.tensor([ids]))[:, -1, :vocab].float()
        for processor in chain:
            scores = processor(torch.tensor([ids]), scores)
        scores = openai_penalties(scores, out, presence, frequency)
        token = int(scores.argmax())
        ids.append(token)
        out.append(token)
        if token == eos and not ignore_eos:
            break
    return out
