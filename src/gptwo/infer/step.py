"""The decode step: one forward over several sequences' new tokens, reading and writing one paged KV cache.

Every path that runs the model token by token — `gptwo generate`, `Decoder`, the server, Inspect,
eval's generation — calls a step with a `StepInput`: per sequence its new tokens, the position of
the first of them, and its block table in the `PagedKVCache`. Sequences may differ in length and in
how many tokens they bring (a prompt chunk beside single decode tokens): a ragged batch, no padding
in the caller. Implementations: `TorchStep` (the model's own modules; eager or compiled) and the
native C step (`gptwo.infer.native.NativeStep`: the whole forward in one C call on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from gptwo.infer import native
from gptwo.infer.kvcache import PagedKVCache, blocks_for
from gptwo.infer.torch_step import TorchStep, run_rows


@dataclass
class StepInput:
    """A ragged batch: sequence i brings `tokens[i]` at positions `starts[i]`, `starts[i] + 1`, ….

    The keys/values of positions below `starts[i]` are already in the cache; `tables[i]` holds the
    block ids of sequence i covering every position below `starts[i] + len(tokens[i])`. With
    `every[i]` the step returns logits for each of its new tokens (scoring a prompt), else for the last; with
    `skip[i]` for none (a prompt chunk before its last: only its keys/values are wanted, and the output layer,
    the largest product of a small model, is not run for it).
    `adapters[i]`: the LoRA adapter slot sequence i runs with on a model carrying several
    (gptwo.infer.multilora; 0, and None for all, is the base model).
    """

    tokens: list[list[int]]
    starts: list[int]
    tables: list[list[int]]
    every: list[bool] | None = None
    adapters: list[int] | None = None
    skip: list[bool] | None = None

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.starts) == len(self.tables)):
            raise ValueError("tokens, starts and tables must have one entry per sequence")
        if self.every is not None and len(self.every) != len(self.tokens):
            raise ValueError("every must have one entry per sequence")
        if self.adapters is not None and len(self.adapters) != len(self.tokens):
            raise ValueError("adapters must have one entry per sequence")
        if self.skip is not None and len(self.skip) != len(self.tokens):
            raise ValueError("skip must have one entry per sequence")
        if self.skip is not None and self.every is not None and any(s and e for s, e in zip(self.skip, self.every)):
            raise ValueError("a sequence cannot both skip its logits and ask for every one")

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def output_rows(self) -> list[int]:
        """Indices, in the flattened new tokens, of the tokens whose logits the step returns."""
        rows, first = [], 0
        for i, toks in enumerate(self.tokens):
            if self.every is not None and self.every[i]:
                rows.extend(range(first, first + len(toks)))
            elif self.skip is None or not self.skip[i]:
                rows.append(first + len(toks) - 1)
            first += len(toks)
        return rows


class DecodeStep(Protocol):
    """What every implementation offers: its cache, and logits (R, vocab) for a `StepInput`.

    R is the number of `output_rows()`, in sequence order; the new tokens' keys/values are in the
    cache afterwards.
    """

    cache: PagedKVCache

    def __call__(self, batch: StepInput) -> torch.Tensor: ...


class SplitStep:
    """The native step for small batches, the torch step (torch's GEMM) for larger ones, over one cache.

    The native kernels multiply a few rows at a time (GEMV); above `max_native_tokens` new tokens in a
    call — a prompt chunk, a batch of many sequences — torch's GEMM is faster (docs/inference.md). A batch
    of a few decoding sequences beside a prompt chunk is split: the sequences bringing at most
    `DECODE_TOKENS` tokens each (together at most `max_native_tokens`) run on the native step, the rest on
    torch's (on the 6-layer bench model, 8 decode rows take 11 ms native against 16 ms in torch)."""

    DECODE_TOKENS = 8  # a decoding row's token and its speculative drafts

    def __init__(self, native_step: native.NativeStep, torch_step: TorchStep, max_native_tokens: int):
        self.native, self.torch, self.max_native_tokens = native_step, torch_step, max_native_tokens
        self.cache = native_step.cache

    def __call__(self, batch: StepInput) -> torch.Tensor:
        if batch.num_tokens <= self.max_native_tokens:
            return self.native(batch)
        small = [i for i, t in enumerate(batch.tokens) if len(t) <= self.DECODE_TOKENS]
        if (
            not small
            or len(small) == len(batch.tokens)
            or sum(len(batch.tokens[i]) for i in small) > self.max_native_tokens
        ):
            return self.torch(batch)
        large = [i for i in range(len(batch.tokens)) if len(batch.tokens[i]) > self.DECODE_TOKENS]
        per_seq: list[torch.Tensor | None] = [None] * len(batch.tokens)
        for rows, step in ((small, self.native), (large, self.torch)):
            for i, logits in run_rows(batch, rows, step):
                per_seq[i] = logits
        return torch.cat(per_seq)


def cache_dtype(model: torch.nn.Module, use_native: bool) -> torch.dtype:
    """The KV cache's dtype: fp32 for the native step (its activations are fp32), else the model's."""
    return torch.float32 if use_native else model.transformer.wte.weight.dtype


def make_step(
    model: torch.nn.Module,
    num_blocks: int | None = None,
    *,
    sequences: int = 1,
    prefix_caching: bool = False,
    use_native: bool | None = None,
    compile: bool | str = False,
    max_native_tokens: int | None = None,
) -> DecodeStep:
    """The fastest step for `model` with a new cache of `num_blocks` blocks (default: `sequences` whole contexts).

    The native C step where it supports the model (a model prepared with native linears, on the CPU, with
    no LoRA layers: those run on the torch step)
    unless `use_native=False` or compiling is asked for; else the torch step. With `max_native_tokens`,
    calls of more new tokens than that go to the torch step over the same cache (`SplitStep`).
    """
    if use_native is None:
        use_native = not compile and native.NativeStep.supports(model)
    config = model.config
    if num_blocks is None:
        num_blocks = sequences * blocks_for(config.block_size) + 1
    device = model.transformer.wte.weight.device
    cache = PagedKVCache(config, num_blocks, cache_dtype(model, use_native), device, prefix_caching)
    if not use_native:
        return TorchStep(model, cache, compile=compile)
    if max_native_tokens is None:
        return native.NativeStep(model, cache)
    return SplitStep(native.NativeStep(model, cache), TorchStep(model, cache), max_native_tokens)
