"""Sampling from a GPT: greedy, temperature, top-k, top-p; batches of prompts; stop strings; streaming.

The decoding loop is plain: prefill the prompt into a KV cache, then one token at a time. Prompts
of different lengths are left-padded and masked. A sequence longer than the context slides: the
cache is rebuilt from the last 3/4 of the context and decoding goes on (so a prompt longer than
the context keeps its last tokens).
"""

from __future__ import annotations

import codecs
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gptwo.errors import GptwoError
from gptwo.model import GPT, KVCache
from gptwo.tokenizer import Tokenizer


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


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _native_step(model: GPT, idx: torch.Tensor, valid: torch.Tensor | None):
    """gptwo.infer's whole-step C kernel for one unpadded prompt on a model prepared with native linears, else None."""
    if (
        idx.shape[0] != 1
        or not getattr(model, "inference_prepared", None)
        or (valid is not None and not bool(valid.all()))
    ):
        return None
    from gptwo.infer.native import NativeStep

    if not NativeStep.supports(model):
        return None
    return NativeStep(model, model.config.block_size)


def generate_tokens(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token ids (B,), their logits (B, V)) for each of `max_new_tokens` steps.

    `idx` (B, T) holds the prompts, left-padded where `valid` (B, T) is False. The caller may stop
    early by breaking out of the loop.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    block = model.config.block_size
    seq = idx
    seq_valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    if not bool(seq_valid[:, -1].all()):
        raise GptwoError("a prompt ends in padding", "left-pad prompts (valid=False before the text, never after)")
    cache: KVCache | None = None
    pending = 0  # tokens at the end of `seq` not yet in the cache
    native = _native_step(model, idx, valid) if use_cache else None
    for _ in range(max_new_tokens):
        if native is not None:  # one C call per token; the cache slides as below
            restart = native.length is None or native.length + pending > block
            keep = (seq.shape[1] if seq.shape[1] < block else block * 3 // 4) if restart else pending
            logits = native(seq[:, -keep:], 0 if restart else native.length)
        elif not use_cache:
            logits = model(seq[:, -block:], valid=seq_valid[:, -block:], last_only=True)[:, -1]
        else:
            if cache is None or cache.length + pending > block:
                keep = seq.shape[1] if seq.shape[1] < block else block * 3 // 4
                cache = KVCache(model.config, seq.shape[0], block, device=seq.device, dtype=model.lm_head.weight.dtype)
                logits = model(seq[:, -keep:], cache=cache, valid=seq_valid[:, -keep:], last_only=True)[:, -1]
            else:
                logits = model(seq[:, -pending:], cache=cache, valid=seq_valid[:, -pending:], last_only=True)[:, -1]
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        seq = torch.cat([seq, next_ids[:, None]], dim=1)
        seq_valid = torch.cat([seq_valid, torch.ones_like(next_ids[:, None], dtype=torch.bool)], dim=1)
        pending = 1
        yield next_ids, logits


@torch.no_grad()
def generate(
    model: GPT,
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
) -> torch.Tensor:
    """`idx` (B, T) followed by up to `max_new_tokens` sampled tokens per row.

    With `eos_token`, a row that produces it keeps producing it (as padding), and the loop ends once
    every row has. `seed` makes sampling reproducible.
    """
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    new, done = [], torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for next_ids, _ in generate_tokens(
        model, idx, max_new_tokens, temperature, top_k, top_p, valid=valid, generator=generator, use_cache=use_cache
    ):
        if eos_token is not None:
            next_ids = next_ids.masked_fill(done, eos_token)
            done |= next_ids == eos_token
        new.append(next_ids)
        if eos_token is not None and bool(done.all()):
            break
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


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


MAX_STOPS = 16  # stop strings per request or command
MAX_STOP_CHARS = 1024  # characters in one stop string


def check_stops(stop: Sequence[str]) -> None:
    """Reject more than MAX_STOPS stop strings, or one longer than MAX_STOP_CHARS (matching cost stays bounded)."""
    if len(stop) > MAX_STOPS:
        raise GptwoError(f"{len(stop)} stop strings is more than {MAX_STOPS}", f"give at most {MAX_STOPS}")
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise GptwoError(
                f"a stop string has {len(s)} characters, more than {MAX_STOP_CHARS}",
                f"use stop strings of at most {MAX_STOP_CHARS} characters",
            )
        why = invalid_text(s)
        if why:
            raise GptwoError(f"a stop string is not valid text: {why}", "pass UTF-8 text")


def _failure(pattern: str) -> list[int]:
    """KMP failure table: fail[j] = length of the longest proper prefix of pattern[:j+1] that is also its suffix."""
    fail, k = [0] * len(pattern), 0
    for j in range(1, len(pattern)):
        while k and pattern[j] != pattern[k]:
            k = fail[k - 1]
        k += pattern[j] == pattern[k]
        fail[j] = k
    return fail


class StopMatcher:
    """Finds stop strings in text fed piece by piece, in time linear in the text (one KMP automaton per stop).

    `state[i]` is how much of stop i the text seen so far ends with, so the text that may still become
    a stop string is the last `max(state)` characters: nothing older needs to be kept or searched.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.chars = frozenset("".join(self.stops))

    @property
    def held(self) -> int:
        """Characters at the end of the text that are the start of some stop string."""
        return max(self.state, default=0)

    def feed(self, piece: str) -> tuple[int, int] | None:
        """Take more text; if a stop string ends in it, return (its end in `piece`, its length).

        The first stop string to be completed wins (the longest, if several end at the same character),
        so the answer does not depend on how the text was split into pieces.
        """
        if not self.stops or not piece:
            return None
        if self.chars.isdisjoint(piece):  # common case: no character of any stop string
            self.state = [0] * len(self.stops)
            return None
        for end, char in enumerate(piece, 1):
            found = 0
            for i, stop in enumerate(self.stops):
                at = self.state[i]
                while at and stop[at] != char:
                    at = self.fail[i][at - 1]
                at += stop[at] == char
                if at == len(stop):
                    found, at = max(found, at), self.fail[i][at - 1]
                self.state[i] = at
            if found:
                return end, found
        return None


@dataclass
class TextStream:
    """Turns one row's tokens into text deltas: whole UTF-8 characters only, cut at the first stop string.

    Only undelivered text is kept: at most the longest stop string's length, plus the last token's text.
    """

    tokenizer: Tokenizer
    stop: Sequence[str] = ()
    stop_at_eot: bool = True
    pending: str = ""  # decoded text not yet handed out (it may be the start of a stop string)
    finished: bool = False
    finish_reason: str | None = None
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    _matcher: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self._matcher = StopMatcher(self.stop)

    def push(self, token_id: int) -> str:
        """Feed one token; return the new text that is safe to show."""
        if self.finished:
            return ""
        if self.stop_at_eot and token_id == self.tokenizer.eot_token:
            return self._finish("stop")
        if self._add(self._decoder.decode(self.tokenizer.token_bytes(token_id))):
            return self._finish("stop")
        return self._take(len(self.pending) - self._matcher.held)

    def close(self, reason: str = "length") -> str:
        """No more tokens: flush what is held back."""
        if self.finished:
            return ""
        self._add(self._decoder.decode(b"", final=True))
        return self._finish(reason)

    def _add(self, piece: str) -> bool:
        """Append `piece` to the pending text; on a stop string, cut the text before it and return True."""
        before = len(self.pending)
        self.pending += piece
        match = self._matcher.feed(piece)
        if match is not None:
            end, length = match
            self.pending = self.pending[: before + end - length]
        return match is not None

    def _finish(self, reason: str) -> str:
        self.finished, self.finish_reason = True, reason
        return self._take(len(self.pending))

    def _take(self, upto: int) -> str:
        piece, self.pending = self.pending[:upto], self.pending[upto:]
        return piece


def invalid_text(text: str) -> str | None:
    """Why `text` is not Unicode text that UTF-8 can encode (a lone surrogate, or a byte that was not UTF-8),
    or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        char = text[err.start]
        if "\udc80" <= char <= "\udcff":  # how Python carries an undecodable byte (surrogateescape)
            return f"it is not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x} at character {err.start})"
        return f"it holds a lone surrogate U+{ord(char):04X} at character {err.start}, which is not a character"


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt or one that is not valid text is a GptwoError."""
    if not prompt:
        raise GptwoError("the prompt is empty", "give some text (or '<|endoftext|>' for an unconditional sample)")
    why = invalid_text(prompt)
    if why:
        raise GptwoError(f"the prompt is not valid text: {why}", "pass UTF-8 text")
    return tokenizer.encode(prompt)


def stream_texts(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    stop: Sequence[str] | None = None,
    stop_at_eot: bool = True,
    seed: int | None = None,
) -> Iterator[list[str]]:
    """Sample continuations of several prompts as a batch; yield each step's new text per prompt."""
    check_stops(stop or ())
    token_lists = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    device = model.lm_head.weight.device
    idx, valid = pad_left(token_lists, tokenizer.eot_token, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    streams = [TextStream(tokenizer, stop or (), stop_at_eot) for _ in token_lists]
    for next_ids, _ in generate_tokens(
        model, idx, max_new_tokens, temperature, top_k, top_p, valid=valid, generator=generator
    ):
        yield [s.push(int(t)) for s, t in zip(streams, next_ids.tolist())]
        if all(s.finished for s in streams):
            return
    yield [s.close() for s in streams]


def complete(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int, **kwargs) -> list[str]:
    """The sampled continuation of each prompt, as text (see `stream_texts` for options)."""
    out = ["" for _ in prompts]
    for pieces in stream_texts(model, tokenizer, prompts, max_new_tokens, **kwargs):
        out = [o + p for o, p in zip(out, pieces)]
    return out


def generate_cli_stream(
    model_spec: str,
    prompt: str,
    *,
    num_samples: int = 1,
    device: str = "auto",
    seed: int | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    **kwargs,
) -> Iterator[str]:
    """What `gptwo generate` prints: each sample's continuation, streamed, samples separated by a rule."""
    from gptwo.weights import load_model

    check_sampling(
        kwargs.get("max_new_tokens", 0), kwargs.get("temperature", 1.0), kwargs.get("top_k"), kwargs.get("top_p")
    )
    check_stops(kwargs.get("stop") or ())
    if num_samples < 1:
        raise GptwoError(f"--num-samples {num_samples} must be at least 1", "ask for one sample or more")
    model, tokenizer = load_model(model_spec, device=device, dtype=dtype, quantize=quantize)
    tokens = encode_prompt(tokenizer, prompt)
    if len(tokens) > model.config.block_size:
        print(
            f"note: the prompt has {len(tokens)} tokens; the model sees the last {model.config.block_size * 3 // 4}",
            file=sys.stderr,
        )
    max_new_tokens = kwargs.pop("max_new_tokens")
    for sample in range(num_samples):
        if sample:
            yield "\n" + "-" * 40 + "\n"
        for pieces in stream_texts(
            model, tokenizer, [tokens], max_new_tokens, seed=None if seed is None else seed + sample, **kwargs
        ):
            yield pieces[0]
