"""How a request samples, as the engine takes it (no torch: the protocol layer builds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; `logprobs` is how many top alternatives to report per token (None: no logprobs)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False  # also report the log-probabilities of the prompt's tokens (echo)
