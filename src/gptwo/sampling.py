"""Sampling from a GPT's logits and the decoding loop over one decode step (gptwo.infer.step).

Greedy, temperature, top-k and top-p, for one row or a batch. The loop prefills each prompt (prompts of
different lengths form a ragged batch: no padding), then feeds one token per row per step. A sequence
that reaches the context slides: its blocks are given back and the last 3/4 of the context is prefilled
again, so a prompt longer than the context keeps its last tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from gptwo.errors import GptwoError
from gptwo.infer.linear import NATIVE_MAX_ROWS
from gptwo.infer.step import DecodeStep, StepInput, make_step
from gptwo.watermark import WatermarkSettings, watermark_for, watermark_logits


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject sampling settings that have no meaning, naming the allowed range."""
    if max_new_tokens < 0:
        raise GptwoError(f"max_new_tokens={max_new_tokens} is negative", "ask for 0 or more tokens")
    if not (temperature >= 0 and math.isfinite(temperature)):  # NaN fails every comparison
        raise GptwoError(f"temperature={temperature} is not a finite number >= 0", "use 0 (greedy) or a positive value")
    if top_k is not None and top_k < 1:
        raise GptwoError(f"top_k={top_k} must be at least 1", "use a positive integer, or leave it unset")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GptwoError(f"top_p={top_p} is outside (0, 1]", "use a probability such as 0.9, or leave it unset")


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Logits (B, V) scaled by temperature with tokens outside top-k / top-p set to -inf."""
    logits = logits.float() if temperature == 1.0 else logits.float() / max(temperature, 1e-8)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32 keeps just it)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


Process = Callable[[torch.Tensor], torch.Tensor]  # filtered logits (B, V) -> logits: the watermark's bias


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    process: Process | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V); temperature 0 is greedy. `process` runs last on the
    filtered logits (as transformers runs its watermark after temperature, top-k and top-p)."""
    if temperature == 0:
        return (process(logits.float()) if process else logits).argmax(-1)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    probs = F.softmax(process(filtered) if process else filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sampling_weights(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    process: Process | None = None,
) -> torch.Tensor:
    """Float32 probabilities (B, V) to sample from: `logits` (finite rows) scaled, top-k / top-p filtered,
    then `process`ed (see `sample_next`).

    A row that filtering leaves empty or not finite (a top_p too small for float32, such as 1e-46,
    or a tiny temperature that overflows) keeps only its most likely token, as any top_p that small means.
    """
    filtered = filter_logits(logits, temperature, top_k, top_p)
    probs = torch.softmax(process(filtered) if process else filtered, dim=-1)
    broken = ~(probs.sum(-1) > 0.5)  # NaN or 0: the sum is 1 for every row filtering left intact
    if bool(broken.any()):
        rows = broken.nonzero()[:, 0]
        probs[rows] = 0.0
        probs[rows, logits[rows].argmax(-1)] = 1.0
    return probs


CDF_BLOCK = 256  # tokens per block of the two-level sampler


def sample_by_cdf(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `weights` (B, V), non-negative and not all zero, drawn in proportion to them.

    One random number per row, placed on the cumulative distribution in two steps: first among
    blocks of CDF_BLOCK tokens (a sum per block, a short cumulative sum), then inside the chosen
    block. A cumulative sum over all of GPT-2's 50k tokens is a sequential scan that costs more than
    the rest of sampling together; torch.multinomial is slower still.
    """
    rows, vocab = weights.shape
    whole = vocab - vocab % CDF_BLOCK
    sums = weights[:, :whole].view(rows, -1, CDF_BLOCK).sum(-1)
    if whole < vocab:
        sums = torch.cat([sums, weights[:, whole:].sum(-1, keepdim=True)], dim=1)
    block_cdf = sums.cumsum(-1)
    u = torch.rand((rows, 1), generator=generator, device=weights.device, dtype=block_cdf.dtype) * block_cdf[:, -1:]
    u = torch.minimum(u, torch.nextafter(block_cdf[:, -1:], torch.zeros_like(u)))  # stay below the last step
    block = torch.searchsorted(block_cdf, u, right=True)  # right=True never lands on an all-zero block
    u = u - torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(u))
    index = block * CDF_BLOCK + torch.arange(CDF_BLOCK, device=weights.device)
    inside = weights.gather(1, index.clamp(max=vocab - 1)).masked_fill(index >= vocab, 0).cumsum(-1)
    u = torch.minimum(u.clamp(min=0), torch.nextafter(inside[:, -1:], torch.zeros_like(u)))  # stay inside the block
    return (index.gather(1, torch.searchsorted(inside, u, right=True)))[:, 0]


def pad_left(token_lists: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) of several prompts, left-padded, and their `valid` mask."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(token_lists), width), dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
            valid[row, width - len(tokens) :] = True
    return ids.to(device), valid.to(device)


def _rows(idx: torch.Tensor, valid: torch.Tensor | None) -> list[list[int]]:
    """Each row's real tokens: `idx` (B, T) without the left padding `valid` marks."""
    if valid is None:
        return idx.tolist()
    valid = valid.to(torch.bool)
    if not bool(valid[:, -1].all()):
        raise GptwoError("a prompt ends in padding", "left-pad prompts (valid=False before the text, never after)")
    return [row[mask].tolist() for row, mask in zip(idx.cpu(), valid.cpu())]


def stream_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    step: DecodeStep | None = None,
    watermark: WatermarkSettings | Sequence[WatermarkSettings | None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token ids (B,), their logits (B, V)) for each of `max_new_tokens` steps over `prompts`.

    Prompts may differ in length. `use_cache=False` recomputes every row's whole window at each step
    (the reference the cached path is tested against). The caller may stop early by breaking out.
    `watermark` (one for every row, or one per row) biases each row's green tokens (gptwo.watermark);
    the logits yielded are the model's own.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GptwoError("a prompt has no tokens", "give at least one token per prompt")
    context = model.config.block_size
    keep = context * 3 // 4
    history = [list(p) for p in prompts]
    device = model.transformer.wte.weight.device
    process = _watermark_process(watermark, len(history), model.config.vocab_size, history)
    if not use_cache:
        for _ in range(max_new_tokens):
            logits = torch.cat(
                [model(torch.tensor([h[-context:]], device=device), last_only=True)[:, -1] for h in history]
            )
            next_ids = sample_next(logits, temperature, top_k, top_p, generator, process)
            for h, t in zip(history, next_ids.tolist()):
                h.append(t)
            yield next_ids, logits
        return
    step = step or make_step(model, sequences=len(prompts), max_native_tokens=NATIVE_MAX_ROWS)
    cache = step.cache
    seqs = [cache.start([]) for _ in history]
    pending = [h if len(h) < context else h[-keep:] for h in history]
    try:
        for _ in range(max_new_tokens):
            for i, seq in enumerate(seqs):
                if seq.length + len(pending[i]) > context:  # slide: recompute the last 3/4 of the context
                    cache.release(seq)
                    pending[i] = history[i][-keep:]
                cache.grow(seq, seq.length + len(pending[i]))
            logits = step(StepInput(pending, [s.length for s in seqs], [s.blocks for s in seqs]))
            for seq, tokens in zip(seqs, pending):
                cache.commit(seq, tokens)
            next_ids = sample_next(logits, temperature, top_k, top_p, generator, process)
            pending = [[t] for t in next_ids.tolist()]
            for h, p in zip(history, pending):
                h.extend(p)
            yield next_ids.to(device), logits
    finally:
        for seq in seqs:
            cache.release(seq)


def _watermark_process(
    watermark: WatermarkSettings | Sequence[WatermarkSettings | None] | None,
    rows: int,
    vocab_size: int,
    history: list[list[int]],
) -> Process | None:
    """The bias each row's watermark adds, seeded by that row's tokens so far (`history`, kept current)."""
    settings = [watermark] * rows if watermark is None or isinstance(watermark, WatermarkSettings) else watermark
    if len(settings) != rows:
        raise GptwoError(f"{len(settings)} watermarks for {rows} prompts", "give one watermark, or one per prompt")
    marks = [None if s is None else watermark_for(s, vocab_size) for s in settings]
    if all(m is None for m in marks):
        return None
    return lambda logits: watermark_logits(logits, marks, history)


def generate_tokens(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    watermark: WatermarkSettings | Sequence[WatermarkSettings | None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`stream_tokens` for prompts given as token ids (B, T), left-padded where `valid` (B, T) is False."""
    yield from stream_tokens(
        model,
        _rows(idx, valid),
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        generator=generator,
        use_cache=use_cache,
        watermark=watermark,
    )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    valid: torch.Tensor | None = None,
    eos_token: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    watermark: WatermarkSettings | Sequence[WatermarkSettings | None] | None = None,
) -> torch.Tensor:
    """`idx` (B, T) followed by up to `max_new_tokens` sampled tokens per row.

    With `eos_token`, a row that produces it keeps producing it (as padding), and the loop ends once
    every row has. `seed` makes sampling reproducible; `watermark` marks the text (gptwo.watermark).
    """
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    new, done = [], torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for next_ids, _ in generate_tokens(
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        valid=valid,
        generator=generator,
        use_cache=use_cache,
        watermark=watermark,
    ):
        next_ids = next_ids.to(idx.device)
        if eos_token is not None:
            next_ids = next_ids.masked_fill(done, eos_token)
            done |= next_ids == eos_token
        new.append(next_ids)
        if eos_token is not None and bool(done.all()):
            break
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
