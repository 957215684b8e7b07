"""Speculative decoding on the decode step: a draft proposes k tokens, the target checks them in one step.

Two drafts: a smaller model with the same tokenizer (`ModelDraft`), or the text's own n-grams
(`NgramDraft`: prompt lookup decoding, Saxena 2023 — the continuation that followed the last n tokens'
latest earlier occurrence, which pays off where the output copies its input: rewriting, extraction,
code edits). The target scores the last accepted token and the k drafts in one `StepInput` (logits for
every token), so k + 1 positions cost about one step when decoding is bound by reading the weights.

Verification is the rejection sampling of Leviathan et al. 2023 ("Fast Inference from Transformers via
Speculative Decoding") and Chen et al. 2023: draft token x drawn from q is accepted with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from norm(max(0, p − q)); after k
acceptances one more comes from p. The tokens then follow the target's own distribution p (after the
same temperature, top-k and top-p), whatever the draft. An n-gram draft proposes deterministically
(q is one-hot). At temperature 0 a draft token is accepted when it is the target's argmax, so the
output is plain greedy decoding's.

Rejected tokens' keys and values are dropped from both caches (`PagedKVCache.truncate`): each cache
holds the longest prefix of the text it has computed, and is brought up to date before each step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gptwo.errors import GptwoError
from gptwo.infer.kvcache import OutOfBlocks, PagedKVCache, SeqBlocks
from gptwo.infer.linear import NATIVE_MAX_ROWS
from gptwo.infer.step import StepInput, make_step
from gptwo.sampling import check_sampling, sampling_weights

SPECULATE_TOKENS = 4  # draft tokens per target step (vLLM's num_speculative_tokens)
NGRAM_MAX, NGRAM_MIN = 3, 1  # n-gram lengths prompt lookup tries, longest first


@dataclass
class SpeculationStats:
    """Draft tokens proposed and accepted, and target steps run (each yields 1 to k + 1 tokens)."""

    proposed: int = 0
    accepted: int = 0
    target_steps: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.target_steps if self.target_steps else 0.0

    def to_dict(self) -> dict:
        return {
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "target_steps": self.target_steps,
            "tokens_per_step": round(self.tokens_per_step, 3),
        }


def _catch_up(cache: PagedKVCache, seq: SeqBlocks, tokens: list[int], fed: int = 1) -> tuple[int, list[int]]:
    """Cut `seq` back to its longest prefix shared with `tokens` (keeping at least the last `fed` tokens out)
    and grow it for the rest: the position and the tokens still to compute (OutOfBlocks when none are free)."""
    same, limit = 0, min(seq.length, len(tokens) - fed)
    while same < limit and seq.tokens[same] == tokens[same]:
        same += 1
    if same < seq.length:
        cache.truncate(seq, same)
    cache.grow(seq, len(tokens))
    return same, tokens[same:]


class _CachedModel:
    """A model with its own step and one sequence in its cache, kept to the longest computed prefix of a text."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.step = make_step(model, sequences=1, max_native_tokens=NATIVE_MAX_ROWS)
        self.cache = self.step.cache
        self.seq = self.cache.start([])

    def logits(self, window: Sequence[int], extra: Sequence[int] = (), every: int = 1) -> torch.Tensor:
        """Logits (every, V) after each of the last `every` tokens of `window` + `extra`: what is not in the cache
        yet is computed (at least the last token), the cache then holds all of it."""
        start, new = _catch_up(self.cache, self.seq, [*window, *extra], every)
        out = self.step(StepInput([new], [start], [self.seq.blocks], every=[every > 1]))
        self.cache.commit(self.seq, new)
        return out[-every:].float()

    def close(self) -> None:
        self.cache.release(self.seq)


class BatchDraft:
    """A draft model proposing greedily for many rows at once (the server's `--draft-model`).

    Each row (keyed by any hashable, e.g. the server's sequence) keeps its text's computed prefix in the
    draft's own paged cache, so a step computes only what is new: the tokens accepted since, then one
    token per draft. Greedy proposals are deterministic (q one-hot in `verify_drafts`), so the target's
    sampled tokens still follow its own distribution."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, n_vocab: int | None = None):
        self.model, self.n_vocab = model, n_vocab or model.config.vocab_size  # ids past the tokenizer's: never
        self.context = model.config.block_size
        self.step = make_step(model, num_blocks, max_native_tokens=NATIVE_MAX_ROWS)
        self.cache = self.step.cache
        self._rows: dict[object, SeqBlocks] = {}

    def propose(self, rows: Sequence[tuple[object, list[int], int]]) -> list[list[int]]:
        """For each (key, text, want): up to `want` greedy draft tokens continuing `text` (none where the text is
        past the draft's context or its cache is full)."""
        out: list[list[int]] = [[] for _ in rows]
        live: list[tuple[int, SeqBlocks, list[int]]] = []  # (row, its cache entry, tokens to feed now)
        for i, (key, text, want) in enumerate(rows):
            seq = self._rows.get(key)
            if want <= 0 or len(text) + want > self.context:
                continue
            if seq is None:
                seq = self._rows[key] = self.cache.start([])
            try:
                start, new = _catch_up(self.cache, seq, list(text) + [0] * (want - 1), want)
            except OutOfBlocks:
                self.release(key)
                continue
            live.append((i, seq, new[: len(new) - want + 1]))
        while live:
            batch = StepInput([t for _, _, t in live], [s.length for _, s, _ in live], [s.blocks for _, s, _ in live])
            best = self.step(batch)[:, : self.n_vocab].argmax(-1).tolist()
            going = []
            for (i, seq, tokens), token in zip(live, best):
                self.cache.commit(seq, tokens)
                out[i].append(int(token))
                if len(out[i]) < rows[i][2]:
                    going.append((i, seq, [int(token)]))
            live = going
        return out

    def release(self, key: object) -> None:
        """Forget a row (it finished or was preempted): its blocks go back."""
        seq = self._rows.pop(key, None)
        if seq is not None:
            self.cache.release(seq)


class NgramDraft:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the text's last n tokens."""

    def __init__(self, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN):
        self.n_max, self.n_min = n_max, n_min

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        for n in range(min(self.n_max, len(history) - 1), self.n_min - 1, -1):
            tail = list(history[-n:])
            for start in range(len(history) - n - 1, -1, -1):  # latest first, not the tail itself
                if list(history[start : start + n]) == tail:
                    return list(history[start + n : start + n + k])
        return []


def speculative_tokens(
    model: torch.nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    draft: torch.nn.Module | NgramDraft,
    k: int = SPECULATE_TOKENS,
    generator: torch.Generator | None = None,
    stats: SpeculationStats | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` tokens continuing `prompt`, sampled from `model` as `stream_tokens` samples
    (same distribution; greedy at temperature 0), `draft` (a model or NgramDraft) proposing `k` at a time."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if k < 1:
        raise GptwoError(f"{k} speculative tokens", "propose at least 1 token per step")
    if not prompt:
        raise GptwoError("a prompt has no tokens", "give at least one token per prompt")
    if isinstance(draft, torch.nn.Module) and draft.config.vocab_size != model.config.vocab_size:
        raise GptwoError(
            f"the draft model's vocabulary has {draft.config.vocab_size} tokens, the target's "
            f"{model.config.vocab_size}",
            "use a draft trained with the target's tokenizer",
        )
    stats = stats if stats is not None else SpeculationStats()
    context = model.config.block_size
    if isinstance(draft, torch.nn.Module):
        context = min(context, draft.config.block_size)
    target = _CachedModel(model)
    drafter = _CachedModel(draft) if isinstance(draft, torch.nn.Module) else None
    history, offset = list(prompt), max(0, len(prompt) - context)  # the models see history[offset:]
    made = 0
    try:
        while made < max_new_tokens:
            room = context - (len(history) - offset)  # positions left for drafts
            if room < 0:  # slide, as stream_tokens does: the last 3/4 of the context, recomputed
                offset = len(history) - context * 3 // 4
                room = context - (len(history) - offset)
            window = history[offset:]
            want = min(k, room, max_new_tokens - made - 1)
            drafts, q = _propose(drafter, draft, window, want, temperature, top_k, top_p, generator)
            p = target.logits(window, drafts, every=len(drafts) + 1)
            accepted, extra = verify_drafts(p, drafts, q, temperature, top_k, top_p, generator)
            stats.target_steps += 1
            stats.proposed += len(drafts)
            stats.accepted += accepted
            for token in [*drafts[:accepted], extra][: max_new_tokens - made]:
                history.append(token)
                made += 1
                stats.tokens += 1
                yield token
    finally:
        target.close()
        if drafter is not None:
            drafter.close()


def _propose(drafter, draft, window, want, temperature, top_k, top_p, generator):
    """Up to `want` draft tokens after `window`, and the draft's probabilities (want, V) they were drawn from
    (None: proposed deterministically)."""
    if want <= 0:
        return [], None
    if drafter is None:
        return draft.propose(window, want), None
    tokens, probs = [], []
    for _ in range(want):
        logits = drafter.logits(window, tokens)
        if temperature == 0:
            tokens.append(int(logits[0].argmax()))
            continue
        q = sampling_weights(logits, temperature, top_k, top_p)
        probs.append(q[0])
        tokens.append(int(torch.multinomial(q, 1, generator=generator)[0, 0]))
    return tokens, (torch.stack(probs) if probs else None)


def verify_drafts(p_logits, drafts, q, temperature, top_k, top_p, generator) -> tuple[int, int]:
    """How many of `drafts` the target accepts, and the token that follows them (a correction or one more)."""
    if temperature == 0:
        best = p_logits.argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == best[accepted]:
            accepted += 1
        return accepted, best[accepted]
    p = sampling_weights(p_logits, temperature, top_k, top_p)
    for i, token in enumerate(drafts):
        q_token = 1.0 if q is None else float(q[i, token])
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * q_token < float(p[i, token]):  # accept with probability min(1, p/q)
            continue
        residual = p[i].clone()
        if q is None:
            residual[token] = 0.0
        else:
            residual = (residual - q[i]).clamp(min=0.0)
        if not float(residual.sum()) > 0:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator)[0])
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator)[0])
