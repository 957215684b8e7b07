"""Model configuration: GPT-2's shape as a dataclass, with the four published sizes as presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gptwo.errors import GptwoError

# GPT-2 paper, Table 2 (Radford et al., 2019): 117M/345M/762M/1542M as published, 124M/355M/774M/1.5B as counted.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


@dataclass
class GPTConfig:
    """The shape of a GPT-2 model. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    block_size: int = 1024  # context length (HF: n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) <= 0:
                raise GptwoError(f"model config {name}={getattr(self, name)} must be positive", "set it to a positive integer")
        if self.n_embd % self.n_head:
            raise GptwoError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                "choose n_embd as a multiple of n_head (e.g. 64 per head)",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptwoError(f"dropout={self.dropout} is out of range", "use a value in [0, 1)")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """One of gpt2, gpt2-medium, gpt2-large, gpt2-xl (hub-style ids like openai-community/gpt2 work too)."""
        key = name.split("/")[-1]
        if key not in MODEL_PRESETS:
            raise GptwoError(f"unknown model preset '{name}'", f"use one of: {', '.join(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
