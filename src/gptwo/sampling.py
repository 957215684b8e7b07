"""Sampling from a GPT's logits and the decoding loop over one decode step (gptwo.infer.step).

Greedy, temperature, top-k and top-p, for one row or a batch, after per-row logit controls (logit bias,
min_tokens, repetition / frequency / presence penalties: `LogitControls`). The loop prefills each prompt (prompts of
different lengths form a ragged batch: no padding), then feeds one token per row per step. A sequence
that reaches the context slides: its blocks are given back and the last 3/4 of the context is prefilled
again, so a prompt longer than the context keeps its last tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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


MAX_LOGIT_BIAS = 100.0  # a bias is clipped to [-100, 100], as OpenAI takes it; -100 bans a token in practice
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]


@dataclass(frozen=True)
class LogitControls:
    """Changes to one row's logits before temperature, top-k and top-p, in vLLM's order.

    `logit_bias` ((token id, bias) pairs) is added and end-of-text is banned while fewer than
    `min_tokens` tokens were produced; then the repetition penalty (transformers' and vLLM's: the logit
    of a token in the prompt or the output is divided by it when positive, multiplied when negative),
    then OpenAI's penalties: logit -= count * frequency_penalty + (count > 0) * presence_penalty, count
    being how often the token occurs in the output so far.
    """

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:  # NaN fails too
                raise GptwoError(f"{name}={value} is outside [-2, 2]", "use a value such as 0.5 (0 is off)")
        if not (0 < self.repetition_penalty < math.inf):
            raise GptwoError(
                f"repetition_penalty={self.repetition_penalty} is not a positive number",
                "use a value such as 1.2 (1 is off; below 1 favours repeats)",
            )
        if self.min_tokens < 0:
            raise GptwoError(f"min_tokens={self.min_tokens} is negative", "use 0 or more")
        for token, bias in self.logit_bias:
            if token < 0 or not math.isfinite(bias):
                raise GptwoError(f"logit bias {token}={bias}", "give a token id >= 0 and a finite bias in [-100, 100]")
        clipped = tuple((t, min(max(b, -MAX_LOGIT_BIAS), MAX_LOGIT_BIAS)) for t, b in self.logit_bias)
        object.__setattr__(self, "logit_bias", clipped)

    @property
    def active(self) -> bool:
        """Whether these controls change any logit."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )

    def check_vocab(self, vocab_size: int) -> None:
        """Reject a logit bias for a token the vocabulary lacks."""
        bad = [t for t, _ in self.logit_bias if t >= vocab_size]
        if bad:
            raise GptwoError(
                f"logit bias for token id {bad[0]}, outside the vocabulary of {vocab_size}",
                "use ids from this model's tokenizer",
            )


def control_logits(
    logits: torch.Tensor,
    controls: Sequence[LogitControls | None],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    eos_token: int | None = None,
) -> torch.Tensor:
    """`logits` (B, V) with each row's `controls` applied (float32; the input itself when no row has any).

    Row i's repetition penalty covers `prompts[i]` and `outputs[i]`, its frequency and presence penalties
    and min_tokens count `outputs[i]` (the tokens produced so far); `eos_token` is what min_tokens bans.
    """
    rows = [i for i, c in enumerate(controls) if c is not None and c.active]
    if not rows:
        return logits
    logits = logits.float().clone()
    vocab, device = logits.shape[-1], logits.device
    for i in rows:
        c, row = controls[i], logits[i]
        if c.logit_bias:
            ids = torch.tensor([t for t, _ in c.logit_bias], device=device)
            row.index_add_(0, ids, torch.tensor([b for _, b in c.logit_bias], device=device, dtype=row.dtype))
        if eos_token is not None and len(outputs[i]) < c.min_tokens:
            row[eos_token] = float("-inf")
        if c.repetition_penalty == 1.0 and not (c.frequency_penalty or c.presence_penalty):
            continue
        produced = torch.tensor(list(outputs[i]), dtype=torch.long, device=device)
        counts = torch.bincount(produced, minlength=vocab)[:vocab].to(row.dtype)
        if c.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(list(prompts[i]), dtype=torch.long, device=device)] = True
            penalised = torch.where(row > 0, row / c.repetition_penalty, row * c.repetition_penalty)
            row.copy_(torch.where(seen, penalised, row))
        if c.frequency_penalty or c.presence_penalty:
            row -= c.frequency_penalty * counts + c.presence_penalty * (counts > 0).to(row.dtype)
    return logits


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
    controls: LogitControls | Sequence[LogitControls | None] | None = None,
    eos_token: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token ids (B,), their logits (B, V)) for each of `max_new_tokens` steps over `prompts`.

    Prompts may differ in length. `use_cache=False` recomputes every row's whole window at each step
    (the reference the cached path is tested against). The caller may stop early by breaking out.
    `watermark` (one for every row, or one per row) biases each row's green tokens (gptwo.watermark);
    `controls` (one for every row, or one per row) bias and penalise logits before sampling
    (`LogitControls`; `eos_token` is what min_tokens bans); the logits yielded are the model's own.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GptwoError("a prompt has no tokens", "give at least one token per prompt")
    context = model.config.block_size
    keep = context * 3 // 4
    history = [list(p) for p in prompts]
    device = model.transformer.wte.weight.device
    process = _watermark_process(watermark, len(history), model.config.vocab_size, history)
    controlled = _controls_for(controls, prompts, history, model.config.vocab_size, eos_token)
    if not use_cache:
        for _ in range(max_new_tokens):
            logits = torch.cat(
                [model(torch.tensor([h[-context:]], device=device), last_only=True)[:, -1] for h in history]
            )
            next_ids = sample_next(controlled(logits), temperature, top_k, top_p, generator, process)
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
            next_ids = sample_next(controlled(logits), temperature, top_k, top_p, generator, process)
            pending = [[t] for t in next_ids.tolist()]
            for h, p in zip(history, pending):
                h.extend(p)
            yield next_ids.to(device), logits
    finally:
        for seq in seqs:
            cache.release(seq)


def _controls_for(
    controls: LogitControls | Sequence[LogitControls | None] | None,
    prompts: Sequence[Sequence[int]],
    history: list[list[int]],
    vocab_size: int,
    eos_token: int | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits -> logits with each row's controls applied, given its tokens so far (`history`, kept current)."""
    rows = [controls] * len(prompts) if controls is None or isinstance(controls, LogitControls) else list(controls)
    if len(rows) != len(prompts):
        raise GptwoError(f"{len(rows)} logit controls for {len(prompts)} prompts", "give one, or one per prompt")
    for c in rows:
        if c is not None:
            c.check_vocab(vocab_size)
    if all(c is None or not c.active for c in rows):
        return lambda logits: logits
    starts = [len(p) for p in prompts]
    return lambda logits: control_logits(
        logits, rows, prompts, [h[start:] for h, start in zip(history, starts)], eos_token
    )


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
    controls: LogitControls | Sequence[LogitControls | None] | None = None,
    eos_token: int | None = None,
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
        controls=controls,
        eos_token=eos_token,
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
    controls: LogitControls | Sequence[LogitControls | None] | None = None,
) -> torch.Tensor:
    """`idx` (B, T) followed by up to `max_new_tokens` sampled tokens per row.

    With `eos_token`, a row that produces it keeps producing it (as padding), and the loop ends once
    every row has. `seed` makes sampling reproducible; `watermark` marks the text (gptwo.watermark);
    `controls` bias and penalise the logits (`LogitControls`; min_tokens bans `eos_token`).
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
        controls=controls,
        eos_token=eos_token,
    ):
        next_ids = next_ids.to(idx.device)
        if eos_token is not None:
            next_ids = next_ids.masked_fill(done, eos_token)
            done |= next_ids == eos_token
        new.append(next_ids)
        if eos_token is not None and bool(done.all()):
            break
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
