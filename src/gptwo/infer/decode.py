"""A decoder for benchmarks and fixed-shape decoding: a batch of equal-length prompts, greedy or sampled.

It runs on the one decode step (gptwo.infer.step) over the paged KV cache like every other path. Each
row holds blocks for `max_len` positions from the start, so the single-token step sees block tables
of one width: with `compile=True` that step is `torch.compile`d once for fixed shapes;
`compile="max-autotune-frozen"` also freezes the weights into it so Inductor's C++ GEMM template takes
the matmuls (faster for int8 on CPU). Without compiling, a model prepared with native linears runs
each step as one C call (the native step).
"""

from __future__ import annotations

import torch

from gptwo.errors import GptwoError
from gptwo.infer.kvcache import blocks_for
from gptwo.infer.step import StepInput, make_step
from gptwo.infer.torch_step import FROZEN, TorchStep
from gptwo.model import GPT
from gptwo.sampling import check_sampling, sample_next

__all__ = ["FROZEN", "Decoder"]


class Decoder:
    """Greedy or sampled decoding of a batch of equal-length prompts over a preallocated paged cache."""

    def __init__(self, model: GPT, batch_size: int = 1, max_len: int | None = None, compile: bool | str = False):
        config = model.config
        self.model, self.batch_size = model, batch_size
        self.max_len = min(max_len or config.block_size, config.block_size)
        width = blocks_for(self.max_len)
        # one block more than the rows need: with exactly batch x width + 1 blocks, Inductor's freezing
        # (compile="max-autotune-frozen") returned zero logits for a 1-row decoder (torch 2.13; seen in tests)
        self.step = make_step(model, batch_size * width + 2, compile=compile)
        self.compiled = bool(compile)
        cache = self.step.cache
        self.seqs = [cache.start([]) for _ in range(batch_size)]
        for seq in self.seqs:
            cache.grow(seq, self.max_len)
        device = model.transformer.wte.weight.device
        self.tables = torch.tensor([s.blocks for s in self.seqs], device=device)

    def forward(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        """Last-position logits (B, vocab) for `idx` (B, T) continuing `start` cached tokens; writes the cache."""
        if start + idx.shape[1] > self.max_len:
            raise GptwoError(
                f"{start + idx.shape[1]} positions exceed the decoder's {self.max_len}", "build a larger max_len"
            )
        rows = idx.tolist()
        return self.step(StepInput(rows, [start] * len(rows), [s.blocks for s in self.seqs]))

    __call__ = forward

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`idx` (B, T) followed by `max_new_tokens` tokens; temperature 0 (the default) is greedy."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        B, T = idx.shape
        if B != self.batch_size:
            raise GptwoError(
                f"a batch of {B} prompts was given to a decoder built for {self.batch_size}",
                f"build Decoder(model, batch_size={B})",
            )
        if T + max_new_tokens > self.max_len:
            raise GptwoError(
                f"{T} prompt tokens + {max_new_tokens} new ones exceed the decoder's {self.max_len} slots",
                "ask for fewer tokens or a larger max_len",
            )
        if max_new_tokens == 0:
            return idx
        out = [sample_next(self.forward(idx, 0), temperature, top_k, top_p, generator).to(idx.device)]
        for step in range(1, max_new_tokens):
            position = T + step - 1
            if self.compiled and isinstance(self.step, TorchStep):
                positions = torch.full((B,), position, dtype=torch.long, device=idx.device)
                logits = self.step.decode(out[-1], positions, self.tables)
            else:
                logits = self.forward(out[-1][:, None], position)
            out.append(sample_next(logits, temperature, top_k, top_p, generator).to(idx.device))
        return torch.cat([idx, torch.stack(out, dim=1)], dim=1)
