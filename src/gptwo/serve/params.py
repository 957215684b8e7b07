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
