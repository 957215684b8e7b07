"""How a request samples, as the engine takes it (no torch: the protocol layer builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # the request's `watermark`: None (not given), true/false, or the settings it names (the engine resolves
    # it against the server's key and server-wide watermark: BatchEngine.request_watermark)
    watermark: bool | dict | None = field(default=None, hash=False)
    # logit controls (gptwo.sampling.LogitControls): OpenAI's penalties, vLLM's repetition penalty and min_tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), bias already clipped to [-100, 100]
    min_tokens: int = 0
    ignore_eos: bool = False  # end-of-text does not end the choice
    skip_special_tokens: bool = True  # with ignore_eos: end-of-text adds no text (vLLM's default)
    best_of: int | None = None  # candidates per prompt when more than n: the n of highest cumulative logprob return
