"""The batching engine: one worker thread runs the model for every request at once (continuous batching).

Each choice of a request is a `Sequence` with its own block table in one paged KV cache
(gptwo.infer.kvcache): memory is taken block by block (16 tokens) as sequences grow, not reserved as a
rectangle of rows x the longest span, and each sequence attends over its own tokens only. Every
iteration the scheduler (vLLM's design) fills a token budget (`max_batched_tokens`): first one token
for each running sequence that is decoding, then chunks of prompts still being prefilled, then new
sequences from the queue — while any sequence decodes, each prompt brings at most
`long_prefill_token_threshold` tokens a step, so a long prompt joins without stalling the running
streams — and runs them as one ragged batch through the decode step (gptwo.infer.step: the
native C step on a prepared CPU model, else torch). A sequence is admitted only when the cache has free
blocks for its first chunk; when a decoding sequence finds no free block, the most recently admitted
sequence is preempted (its blocks given back; it is recomputed from its prompt and the tokens it has
produced when it is admitted again, so a seeded request still returns the same text). With prefix
caching, prompts that start with the same full blocks (a system prompt, few-shot examples) share them
instead of computing them again; the n choices of one prompt share its blocks (copy-on-write).

Sampling is per row, in float32, after each row's own logit controls (logit bias, min_tokens,
repetition / frequency / presence penalties: gptwo.sampling.LogitControls): greedy rows take the
argmax, seeded rows use their own generator (so a seed gives the same text however the request was
batched), the rest are sampled in groups that share temperature / top-k / top-p. Log-probabilities
are those of the raw model (before logit controls and temperature). A failure that belongs to one
row (logits that are NaN or inf, a sampling or text error) ends only that row, with an error in its
own request's response; the rest of the batch goes on.

Waiting sequences are admitted fairly: the next place goes to the client (a remote address) that
holds the fewest running sequences, so one client's big request does not hold everyone else back; a client may
hold at most `max_client_choices` unfinished sequences, and one request at most `max_request_choices`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from gptwo.errors import GptwoError
from gptwo.infer.kvcache import OutOfBlocks, SeqBlocks, block_bytes, blocks_for
from gptwo.infer.linear import NATIVE_MAX_ROWS
from gptwo.infer.multilora import adapter_rows
from gptwo.infer.native import NativeStep
from gptwo.infer.step import StepInput, cache_dtype, make_step
from gptwo.model import GPT
from gptwo.runtime import available_memory
from gptwo.sampling import LogitControls, control_logits, sample_by_cdf, sampling_weights
from gptwo.serve.limits import LONG_PREFILL_TOKENS, MAX_BATCHED_TOKENS, MAX_CLIENT_CHOICES, MAX_REQUEST_CHOICES
from gptwo.serve.params import SamplingParams
from gptwo.speculative import BatchDraft, NgramDraft, verify_drafts
from gptwo.text import TextStream
from gptwo.tokenizer import Tokenizer
from gptwo.watermark import Watermark, WatermarkSettings, watermark_for, watermark_logits

log = logging.getLogger("gptwo.serve")


class Overloaded(Exception):
    """The waiting queue is full; the client should retry later."""


class ClientBusy(Overloaded):
    """This client already holds as many unfinished sequences as one client may; it should retry later."""


class Draining(Exception):
    """The server is shutting down: it admits no new requests (the client should retry, elsewhere)."""


SHUTTING_DOWN = "the server is shutting down"


class RequestRejected(GptwoError):
    """A request the model cannot run; `param` and `code` say which part (as in OpenAI's errors)."""

    def __init__(self, what: str, fix: str, param: str, code: str | None = None):
        super().__init__(what, fix)
        self.param, self.code = param, code


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and its top alternatives (token id -> logprob)."""

    token: int
    logprob: float | None
    top: dict[int, float] | None


@dataclass
class Update:
    """What one sequence produced in one step: new text, its tokens, and a finish reason at the end."""

    index: int
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    prompt: list[TokenLogprob] | None = None  # only in the first update, when prompt logprobs were asked for
    finish_reason: str | None = None
    error: str | None = None
    shutting_down: bool = False  # the error is the server's shutdown, not the request's failure


class Sequence:
    """One choice being generated; the worker thread fills it, the event loop reads its request's queue."""

    def __init__(
        self,
        request: Request,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        device: torch.device,
        seed_offset: int = 0,
        watermark: Watermark | None = None,
        adapter: int = 0,
    ):
        self.request, self.index, self.prompt, self.params = request, index, prompt, params
        self.adapter = adapter  # the LoRA adapter slot it runs with (0: the base model)
        self.watermark = watermark  # its green lists, when its text is watermarked
        self.stream = TextStream(
            tokenizer, params.stop, stop_at_eot=not params.ignore_eos, skip_eot=params.skip_special_tokens
        )
        self.controls = logit_controls(params)  # None when the request changes no logit
        self.generator = None  # seeded requests: choice j samples with its own generator seeded with seed + j
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed((params.seed + seed_offset) % 2**64)
        self.generated = 0
        self.output: list[int] = []  # the tokens sampled so far
        self.next_input = -1  # the sampled token to feed at the next decode step
        self.blocks: SeqBlocks | None = None  # its place in the KV cache while it runs
        self.todo: list[int] = []  # tokens to feed: the prompt (or, after preemption, everything) not yet computed
        self.followers: list[Sequence] = []  # choices of the same prompt that take its blocks once it is prefilled
        self.scored: list[TokenLogprob] | None = None  # prompt logprobs gathered chunk by chunk (echo)
        self.decoding = False  # its prompt is in the cache and it feeds one sampled token per step
        self.drafts: list[int] = []  # speculative tokens fed after its sampled one this step (checked after it)
        self.draft_room = 0  # positions held this step for a draft model's tokens, proposed just before it
        self.arrived = time.monotonic()
        self.first_token_at: float | None = None
        self.done = False
        self.failed = False  # ended by an error (counted in stats["failed"])
        self.left = False  # no longer counted against its client's limit

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled

    def push(self, token: TokenLogprob) -> None:
        """Take one sampled token: emit its text, and finish on end-of-text, a stop string or max_tokens."""
        self.generated += 1
        self.output.append(token.token)
        text = self.stream.push(token.token)
        finish = self.stream.finish_reason if self.stream.finished else None
        if finish is None and self.generated >= self.params.max_tokens:
            text += self.stream.close("length")
            finish = "length"
        self.next_input, self.done = token.token, finish is not None
        self.todo, self.decoding = [token.token], True
        self.request.emit(Update(self.index, text, [token], finish_reason=finish))


class Request:
    """One API call: several sequences (prompts x n) whose updates arrive on one asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: list, client: str = ""):
        self.loop, self._outbox, self.client = loop, outbox, client
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.cancelled = False

    def emit(self, update: Update) -> None:
        """Queue an update for the event loop (worker thread); the engine delivers a step's updates at once."""
        self._outbox.append((self, update))


def _deliver(updates: list[tuple[Request, Update]]) -> None:
    for request, update in updates:
        request.queue.put_nowait(update)


DEFAULT_KV_FRACTION = 0.25  # of the memory available, when --kv-cache-memory is not given
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


def kv_cache_blocks(model: GPT, memory: float | None, max_num_seqs: int, use_native: bool) -> int:
    """Blocks for a cache of `memory` GiB (> 1), or that fraction (0 < memory <= 1) of the memory available
    (default 1/4), and at most what `max_num_seqs` whole contexts need twice over (the rest holds cached
    prefixes); at least one whole context."""
    config, device = model.config, model.transformer.wte.weight.device
    per_block = block_bytes(config, cache_dtype(model, use_native))
    context = blocks_for(config.block_size)
    if memory is not None and memory > 1:
        budget = int(memory * 2**30)
    else:
        free = available_memory(device) or 2**32
        budget = int(free * (memory or DEFAULT_KV_FRACTION))
    blocks = min(budget // per_block, 2 * max_num_seqs * context + 1)
    if blocks < context + 1:
        raise GptwoError(
            f"a KV cache of {budget / 2**20:,.0f} MiB holds {blocks} blocks of 16 tokens, less than one whole "
            f"context ({context} blocks, {(context + 1) * per_block / 2**20:,.0f} MiB)",
            "give the cache more memory (--kv-cache-memory, in GiB or as a fraction) or free memory",
        )
    return blocks


class BatchEngine:
    """Runs `model` for all submitted requests in one background thread, batching them step by step."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_num_seqs: int = 32,
        max_queue: int = 256,
        max_batched_tokens: int = MAX_BATCHED_TOKENS,
        long_prefill_token_threshold: int = LONG_PREFILL_TOKENS,
        max_request_choices: int = MAX_REQUEST_CHOICES,
        max_client_choices: int = MAX_CLIENT_CHOICES,
        kv_cache_memory: float | None = None,
        prefix_caching: bool = True,
        num_blocks: int | None = None,
        watermark: WatermarkSettings | None = None,
        watermark_key: int | None = None,
        speculate: str | None = None,
        num_speculative_tokens: int = 4,
        draft_model: GPT | None = None,
    ):
        """`max_num_seqs`: most sequences running at once; `max_batched_tokens`: most tokens in one step;
        `long_prefill_token_threshold`: most tokens of one prompt in a step while other sequences decode (0: no
        such cap), so a long prompt joins running streams in small chunks and stalls them little;
        `max_request_choices`: most sequences (prompts x n) in one request; `max_client_choices`: most
        unfinished sequences one client holds at once (0: no limit); `kv_cache_memory`: the cache's size
        in GiB (> 1) or as a fraction of the memory available; `num_blocks` sets it in blocks instead.
        `watermark` marks every completion (server-wide); `watermark_key` is the key of requests that ask
        for a watermark without naming one (default: the server-wide one's, else transformers').
        `speculate="ngram"`: each decoding row feeds up to `num_speculative_tokens` tokens of prompt lookup after
        its sampled one, verified in the same step (gptwo.speculative); `draft_model`: a smaller model with the
        same tokenizer proposes them instead (greedily, all rows in one draft step per token)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        if speculate not in (None, "ngram"):
            raise GptwoError(f"unknown speculation '{speculate}'", "use ngram (or none)")
        if speculate is not None and draft_model is not None:
            raise GptwoError("a draft model and --speculate both given", "use one: a draft model, or --speculate ngram")
        self.ngram = NgramDraft() if speculate == "ngram" else None
        self.num_speculative_tokens = num_speculative_tokens
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.max_batched_tokens = max(max_batched_tokens, max_num_seqs)  # every running sequence decodes each step
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_request_choices, self.max_client_choices = max_request_choices, max_client_choices
        self.watermark = watermark
        self.watermark_key = watermark_key if watermark_key is not None or watermark is None else watermark.key
        self._held: collections.Counter[str] = collections.Counter()  # unfinished sequences per client
        self.device = model.transformer.wte.weight.device
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []  # running, in order of admission
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._outbox: list[tuple[Request, Update]] = []  # updates of this step, for the event loop(s)
        use_native = NativeStep.supports(model)
        blocks = num_blocks or kv_cache_blocks(model, kv_cache_memory, max_num_seqs, use_native)
        # few tokens (decoding a few sequences) in one native C call; prompt chunks and big batches on torch's GEMM
        self.step = make_step(
            model, blocks, prefix_caching=prefix_caching, use_native=use_native, max_native_tokens=NATIVE_MAX_ROWS
        )
        self.cache = self.step.cache
        self.draft = None if draft_model is None else BatchDraft(draft_model.eval(), blocks, tokenizer.n_vocab)
        rows = adapter_rows(model)
        self.adapter_names: tuple[str, ...] = rows.names if rows is not None else ()  # slot i + 1 is names[i]
        self.stats = {"finished": 0, "cancelled": 0, "failed": 0, "peak_batch": 0, "steps": 0, "preempted": 0}
        self.stats["peak_step_models"] = 0  # most models (the base, adapters) whose rows shared one step
        self.adapter_requests = [0] * (len(self.adapter_names) + 1)  # requests per slot (0: the base)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0}
        self.ttft = [0] * len(TTFT_BUCKETS)  # time to first token: a cumulative histogram
        self.ttft_sum = 0.0
        self.started = time.monotonic()
        self._in_flight = 0  # tokens of the step running now (their blocks are taken, not yet counted as held)
        self._model_ms, self._ended = 0.0, time.perf_counter()  # the last step's model call, its end (debug log)

    # ---- the event loop side
    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="gptwo-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker thread; requests still running get an error update."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def drain(self) -> None:
        """Admit no more requests (submit raises Draining); the ones running and waiting go on."""
        with self._cond:
            self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def idle(self) -> bool:
        """Nothing running or waiting."""
        with self._cond:
            return not (self._active or self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def metrics(self) -> dict:
        """What /metrics reports: requests, KV blocks, prefix-cache hits, token counts, time to first token."""
        cache = self.cache
        held = sum(s.blocks.length for s in self._active if s.blocks is not None) + self._in_flight
        return {
            "requests_running": len(self._active),
            "requests_waiting": len(self._waiting),
            "kv_blocks_used": cache.num_used,
            "kv_blocks_total": cache.usable_blocks,
            "kv_block_size": cache.block_size,
            "kv_cache_bytes": cache.num_blocks * block_bytes(cache.config, cache.k.dtype, cache.block_size),
            "kv_blocks_touched": cache.blocks_touched,
            "kv_tokens_held": held,
            "prefix_cache_queries_total": cache.queried_tokens,
            "prefix_cache_hits_total": cache.hit_tokens,
            "preemptions_total": self.stats["preempted"],
            "prompt_tokens_total": self.counters["prompt_tokens"],
            "generation_tokens_total": self.counters["generation_tokens"],
            "spec_decode_draft_tokens_total": self.counters["spec_draft_tokens"],
            "spec_decode_accepted_tokens_total": self.counters["spec_accepted_tokens"],
            "ttft_buckets": list(zip(TTFT_BUCKETS, self.ttft)),
            "ttft_sum": self.ttft_sum,
            "ttft_count": self.ttft[-1],
            "adapter_requests": dict(zip(self.adapter_names, self.adapter_requests[1:])),
        }

    def request_watermark(self, requested: bool | dict | None) -> WatermarkSettings | None:
        """The watermark of a request asking for `requested` (SamplingParams.watermark): the server-wide one,
        which a request may not turn off or change; else none, or the settings it names over the server's
        key and transformers' defaults."""
        if self.watermark is not None:
            if requested is None or requested is True:
                return self.watermark
            raise RequestRejected(
                "this server watermarks every completion with its own settings",
                "leave watermark out (or send true)",
                "watermark",
            )
        if not requested:
            return None
        settings = {} if requested is True else dict(requested)
        if "key" not in settings and self.watermark_key is not None:
            settings["key"] = self.watermark_key
        try:
            return WatermarkSettings(**settings)
        except GptwoError as err:
            raise RequestRejected(err.what, err.fix, "watermark") from None

    def check(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> None:
        """Reject requests the model cannot run: empty prompts, unknown token ids, more tokens than the context,
        a watermark the server does not allow, logit controls out of range."""
        self.check_count(len(prompts), n)
        try:
            controls = logit_controls(params)
            if controls is not None:
                controls.check_vocab(self.tokenizer.n_vocab)
        except GptwoError as err:
            raise RequestRejected(err.what, err.fix, _control_param(err.what)) from None
        settings = self.request_watermark(params.watermark)
        if settings is not None:
            try:
                watermark_for(settings, self.model.config.vocab_size)
            except GptwoError as err:
                raise RequestRejected(err.what, err.fix, "watermark") from None
        context, vocab = self.model.config.block_size, self.tokenizer.n_vocab
        for prompt in prompts:
            if not prompt:
                raise RequestRejected(
                    "a prompt has no tokens", "give at least one token (the empty string means <|endoftext|>)", "prompt"
                )
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise RequestRejected(
                    f"token id {bad[0]} is outside the vocabulary of {vocab}",
                    "use ids from this model's tokenizer",
                    "prompt",
                )
            if len(prompt) + params.max_tokens > context:
                raise RequestRejected(
                    f"This model's maximum context length is {context} tokens, however you requested "
                    f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in your prompt; "
                    f"{params.max_tokens} for the completion)",
                    "reduce the prompt or max_tokens",
                    "max_tokens",
                    "context_length_exceeded",
                )

    def check_count(self, prompts: int, n: int) -> None:
        """Reject more sequences (prompts x n) than one request may hold, before any prompt is encoded."""
        if prompts * n > self.max_queue:
            raise RequestRejected(
                f"{prompts} prompts x n={n} is more than the queue holds ({self.max_queue})",
                "send fewer prompts or a smaller n",
                "n",
            )
        if prompts * n > self.max_request_choices:
            raise RequestRejected(
                f"{prompts} prompts x n={n} is {prompts * n} choices, more than this server takes in one request "
                f"({self.max_request_choices}, its --max-request-choices)",
                "send fewer prompts or a smaller n, or split the request",
                "n",
            )

    def submit(
        self, prompts: list[list[int]], params: SamplingParams, n: int = 1, client: str = "", adapter: int = 0
    ) -> Request:
        """Queue `n` choices for each prompt (choice index = prompt * n + j), run with LoRA adapter slot `adapter`
        (0: the base model; i + 1: `adapter_names[i]`).

        Raise Overloaded if the queue is full, ClientBusy if `client` would hold more unfinished
        sequences than `max_client_choices`.
        """
        if not 0 <= adapter <= len(self.adapter_names):
            raise ValueError(f"adapter slot {adapter} is not one of this engine's 0..{len(self.adapter_names)}")
        self.check(prompts, params, n)
        settings = self.request_watermark(params.watermark)
        mark = None if settings is None else watermark_for(settings, self.model.config.vocab_size)
        request = Request(asyncio.get_running_loop(), self._outbox, client)
        seqs = [
            Sequence(
                request,
                i * n + j,
                p,
                params,
                self.tokenizer,
                self.device,
                seed_offset=j,
                watermark=mark,
                adapter=adapter,
            )
            for i, p in enumerate(prompts)
            for j in range(n)
        ]
        with self._cond:
            if self._draining:
                raise Draining(SHUTTING_DOWN)
            held = self._held[client]
            if self.max_client_choices and held + len(seqs) > self.max_client_choices:
                raise ClientBusy(
                    f"this client already has {held} choices running or waiting and asks for {len(seqs)} more; "
                    f"one client may hold at most {self.max_client_choices} (the server's --max-client-choices)"
                )
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise Overloaded(f"{len(self._waiting)} sequences are waiting (the limit is {self.max_queue})")
            self._held[client] += len(seqs)
            self.adapter_requests[adapter] += 1
            self._waiting.extend(seqs)
            self._cond.notify()
        return request

    def held(self, client: str) -> int:
        """How many unfinished sequences `client` holds (waiting or running)."""
        with self._cond:
            return self._held[client]

    def cancel(self, request: Request) -> None:
        """Stop generating for `request` (its client went away): its waiting sequences leave the queue now,
        its rows are freed at the next step."""
        request.cancelled = True
        with self._cond:
            dropped = [s for s in self._waiting if s.request is request]
            if dropped:
                self._waiting = collections.deque(s for s in self._waiting if s.request is not request)
                self.stats["cancelled"] += len(dropped)
                self._leave(dropped)
            self._cond.notify()

    # ---- the worker thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                began = time.perf_counter()
                plan = self._schedule()
            scheduled = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._step(plan)
            except Exception as err:  # noqa: BLE001 - a failed step must not kill the server
                log.exception("engine step failed")
                self._fail(self._active, f"{type(err).__name__}: {err}")
                self._retire()
            self._flush()
            if plan and log.isEnabledFor(logging.DEBUG):  # `gptwo serve --log-level debug`: a line per step
                ended = time.perf_counter()
                ms = [(b - a) * 1e3 for a, b in zip((self._ended, began, scheduled), (began, scheduled, ended))]
                self._ended = ended
                log.debug(
                    "step %d: %d rows, %d tokens (largest %d); %.1f ms since the last, %.1f ms to schedule, "
                    "%.1f ms to run (model %.1f ms)",
                    self.stats["steps"],
                    len(plan),
                    sum(len(t) for _, t in plan),
                    max(len(t) for _, t in plan),
                    *ms,
                    self._model_ms,
                )
        self._fail([*self._active, *self._waiting], SHUTTING_DOWN, shutting_down=True)
        self._retire()
        self._leave([*self._active, *self._waiting])
        self._flush()
        self._active, self._waiting = [], collections.deque()

    def _leave(self, seqs) -> None:
        """Stop counting `seqs` against their clients' limits (once each)."""
        gone = [s for s in seqs if not s.left]
        if not gone:
            return
        with self._cond:
            for seq in gone:
                seq.left = True
                self._held[seq.request.client] -= 1
                if self._held[seq.request.client] <= 0:
                    del self._held[seq.request.client]

    def _flush(self) -> None:
        """Hand this step's updates to their event loops: one wake-up per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for request, update in self._outbox:
            by_loop[request.loop].append((request, update))
        self._outbox.clear()
        for loop, updates in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, updates)
            except RuntimeError:  # that loop is closed: nobody listens any more
                for request, _ in updates:
                    request.cancelled = True

    # ---- scheduling: decodes first, then prefill chunks, then new sequences, within the token budget
    def _schedule(self) -> list[tuple[Sequence, list[int]]]:
        """Choose this step's work (called under the lock): (sequence, tokens to feed) pairs, their blocks grown.

        When nothing can run (every block held by prompts still being prefilled), the newest sequence is
        preempted until something can."""
        self._retire()
        plan = self._plan()
        while not plan and self._active:
            self._preempt(self._active[-1])
            plan = self._plan()
        return plan

    def _plan(self) -> list[tuple[Sequence, list[int]]]:
        cache, budget, plan, planned = self.cache, self.max_batched_tokens, [], set()
        spare = budget - sum(s.decoding for s in self._active)  # tokens beyond one per decoding row: for drafts
        for seq in list(self._active):  # oldest first: under memory pressure the newest are preempted
            if not seq.decoding or seq not in self._active:
                continue
            seq.drafts, seq.draft_room = self._drafts(seq, spare) if spare > 0 else ([], 0)
            if seq.draft_room:
                try:
                    cache.grow(seq.blocks, seq.blocks.length + 1 + seq.draft_room)
                except OutOfBlocks:  # no room to speculate: this row decodes plainly
                    seq.drafts, seq.draft_room = [], 0
                spare -= seq.draft_room
                budget -= seq.draft_room
            while True:
                try:
                    cache.grow(seq.blocks, seq.blocks.length + 1)
                    break
                except OutOfBlocks:
                    victim = next(
                        (s for s in reversed(self._active) if s is not seq and s.blocks and id(s) not in planned),
                        None,
                    )
                    self._preempt(victim or seq)
                    if victim is None:
                        break
            if seq in self._active:
                plan.append((seq, seq.todo + seq.drafts))
                planned.add(id(seq))
                budget -= 1
        # while streams decode, a prompt brings at most this many tokens a step (it would stall them longer)
        per_prompt = self.long_prefill_token_threshold if planned and self.long_prefill_token_threshold else budget
        for seq in self._active:  # prompts still being prefilled, in chunks
            if budget <= 0:
                break
            if seq.decoding or seq.blocks is None:
                continue
            chunk = self._chunk(seq, min(budget, per_prompt))
            if chunk is None:
                break
            plan.append((seq, chunk))
            budget -= len(chunk)
        if budget > 0:
            plan += self._admit(budget, per_prompt)
        return plan

    def _drafts(self, seq: Sequence, spare: int) -> tuple[list[int], int]:
        """Prompt-lookup tokens to check after `seq`'s sampled one, and the positions held for drafts (a draft
        model's are proposed just before the step, outside the lock). Rows that report logprobs (or rank by
        them: best_of), carry a watermark or logit controls decode plainly: their tokens are processed one
        position at a time."""
        p = seq.params
        if (self.ngram is None and self.draft is None) or p.logprobs is not None or p.best_of:
            return [], 0
        if seq.watermark is not None or seq.controls is not None:
            return [], 0
        want = min(self.num_speculative_tokens, spare, p.max_tokens - seq.generated - 1)
        if want <= 0:
            return [], 0
        if self.draft is not None:
            return [], want
        drafts = self.ngram.propose(seq.prompt + seq.output, want)
        return drafts, len(drafts)

    def _draft_with_model(self, plan: list[tuple[Sequence, list[int]]]) -> list[tuple[Sequence, list[int]]]:
        """The draft model's proposals for the rows that held positions for them, put into the plan."""
        rows = [s for s, _ in plan if s.decoding and s.draft_room]
        if not rows:
            return plan
        try:
            proposals = self.draft.propose([(s, s.prompt + s.output, s.draft_room) for s in rows])
        except Exception:  # noqa: BLE001 - a failing draft costs speed, not the requests
            log.exception("the draft model's step failed; these rows decode plainly")
            proposals = [[] for _ in rows]
        for seq, drafts in zip(rows, proposals):
            seq.drafts, seq.draft_room = drafts, 0
        return [(s, s.todo + s.drafts) if s.decoding else (s, tokens) for s, tokens in plan]

    def _chunk(self, seq: Sequence, budget: int) -> list[int] | None:
        """The next at most `budget` of `seq`'s tokens to compute, with blocks for them; None when none are free."""
        chunk = seq.todo[:budget]
        try:
            self.cache.grow(seq.blocks, seq.blocks.length + len(chunk))
        except OutOfBlocks:
            return None
        return chunk

    def _admit(self, budget: int, per_prompt: int) -> list[tuple[Sequence, list[int]]]:
        """Start waiting sequences while places, tokens and blocks last (called under the lock); each brings
        at most `per_prompt` tokens of its prompt to this step.

        Each place goes to the oldest waiting sequence of the client holding the fewest places, so a
        client's big request cannot keep another client's requests waiting behind it. A choice whose prompt
        another choice of its request is computing takes that one's blocks once they are done.
        """
        plan = []
        rows = collections.Counter(s.request.client for s in self._active)
        while self._waiting and len(self._active) < self.max_num_seqs and budget > 0:
            seq = min(self._waiting, key=lambda s: rows[s.request.client])  # the first of the least served
            if seq.cancelled:
                self._waiting.remove(seq)
                self.stats["cancelled"] += 1
                self._leave([seq])  # the lock is re-entrant
                continue
            leader = self._leader_of(seq)
            if leader is not None:  # its prompt is being computed: it takes those blocks once they are done
                self._waiting.remove(seq)
                self._active.append(seq)
                rows[seq.request.client] += 1
                leader.followers.append(seq)
                continue
            tokens = seq.prompt + seq.output  # after a preemption, what it had is computed again
            scoring = seq.params.prompt_logprobs and seq.scored is None
            # a prompt to score is computed whole; cached blocks are shared only by sequences of one adapter
            seq.blocks = self.cache.start([] if scoring else tokens, namespace=seq.adapter)
            seq.todo = tokens[seq.blocks.length :]
            chunk = self._chunk(seq, min(budget, per_prompt))
            if chunk is None:
                self.cache.release(seq.blocks)
                seq.blocks = None
                break
            self._waiting.remove(seq)
            self._active.append(seq)
            rows[seq.request.client] += 1
            plan.append((seq, chunk))
            budget -= len(chunk)
        return plan

    def _leader_of(self, seq: Sequence) -> Sequence | None:
        """A running choice of the same request and prompt whose prompt is still being computed (none after
        a preemption: then `seq` has tokens of its own)."""
        if seq.output:
            return None
        for other in self._active:
            if other.request is seq.request and other.prompt is seq.prompt and other.blocks and not other.decoding:
                return other if not other.output else None
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Give back `seq`'s blocks and queue it first, to be recomputed (prompt + output) when it is admitted."""
        self.cache.release(seq.blocks)
        seq.blocks, seq.todo, seq.decoding, seq.drafts, seq.draft_room = None, [], False, [], 0
        if self.draft is not None:
            self.draft.release(seq)
        self._active.remove(seq)
        for twin in reversed(seq.followers):  # not forked yet: they wait for a place of their own
            self._active.remove(twin)
            self._waiting.appendleft(twin)
        seq.followers = []
        self._waiting.appendleft(seq)
        self.stats["preempted"] += 1

    # ---- running a step
    def _step(self, plan: list[tuple[Sequence, list[int]]]) -> None:
        if not plan:
            return
        if self.draft is not None:
            plan = self._draft_with_model(plan)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._active))
        self.stats["steps"] += 1
        scoring = [s.params.prompt_logprobs and not s.decoding and s.scored is None for s, _ in plan]
        every = [score or bool(s.decoding and s.drafts) for score, (s, _) in zip(scoring, plan)]
        # a prompt chunk before its last brings keys and values only: no logits (no output layer) for it
        skip = [not score and not s.decoding and len(t) < len(s.todo) for score, (s, t) in zip(scoring, plan)]
        adapters = [s.adapter for s, _ in plan]
        self.stats["peak_step_models"] = max(self.stats["peak_step_models"], len(set(adapters)))
        batch = StepInput(
            [tokens for _, tokens in plan],
            [s.blocks.length for s, _ in plan],
            [s.blocks.blocks for s, _ in plan],
            every=every if any(every) else None,
            adapters=adapters if any(adapters) else None,
            skip=skip if any(skip) else None,
        )
        self._in_flight = batch.num_tokens
        began = time.perf_counter()
        try:
            logits = self.step(batch)
        except Exception as err:  # noqa: BLE001 - this step's sequences fail; the rest go on
            log.exception("decode step failed")
            self._fail([s for s, _ in plan], _describe(err))
            return
        finally:
            self._in_flight = 0
        self._model_ms = (time.perf_counter() - began) * 1e3
        ready, rows, at = [], [], 0
        for (seq, tokens), score, all_rows, skipped in zip(plan, scoring, every, skip):
            n = 0 if skipped else len(tokens) if all_rows else 1
            first = seq.blocks.length
            self.cache.commit(seq.blocks, tokens)
            if seq.decoding and seq.drafts:
                self._check_drafts(seq, first, logits[at : at + n])
                at += n
                continue
            seq.todo = seq.todo[len(tokens) :]
            if not seq.decoding:
                self.counters["prompt_tokens"] += len(tokens)
            if score:
                self._score_prompt(seq, first, logits[at : at + n])
            if not seq.todo:
                ready.append(seq)
                rows.append(at + n - 1)
            at += n
        ready, rows = self._prompts_done(ready, rows)
        if ready:
            self._advance(ready, logits[rows])
        self._retire()

    def _check_drafts(self, seq: Sequence, first: int, logits: torch.Tensor) -> None:
        """Accept the longest run of `seq`'s drafts the model agrees with (rejection sampling when sampled),
        push them and the token after them, and forget the rejected drafts' keys and values."""
        drafts, seq.drafts = seq.drafts, []
        p = seq.params
        logits = logits[:, : self.tokenizer.n_vocab].float()
        if not bool(torch.isfinite(logits).all()):
            self._fail([seq], "the model's next-token scores for this sequence are not finite numbers (NaN or inf)")
            return
        try:
            accepted, extra = verify_drafts(
                logits, drafts, None, p.temperature, p.top_k, p.top_p, seq.generator or self.generator
            )
        except Exception as err:  # noqa: BLE001 - this row alone fails
            log.exception("checking draft tokens failed")
            self._fail([seq], _describe(err))
            return
        self.cache.truncate(seq.blocks, first + 1 + accepted)  # the sampled token and the accepted drafts
        self.counters["spec_draft_tokens"] += len(drafts)
        self.counters["spec_accepted_tokens"] += accepted
        now = time.monotonic()
        for token in [*drafts[:accepted], extra]:
            if seq.done:
                break
            if seq.first_token_at is None:
                seq.first_token_at = now
                self._record_ttft(now - seq.arrived)
            self.counters["generation_tokens"] += 1
            try:
                seq.push(TokenLogprob(token, None, None))
            except Exception as err:  # noqa: BLE001 - this row alone fails
                log.exception("emitting a token failed")
                self._fail([seq], _describe(err))
                return

    def _prompts_done(self, seqs: list[Sequence], rows: list[int]) -> tuple[list[Sequence], list[int]]:
        """Sequences whose prompt was just computed: hand out prompt logprobs, finish those asking no tokens,
        fork the choices that share the prompt; return what samples now (with the row of its logits)."""
        out, out_rows = [], []
        for seq, row in zip(seqs, rows):
            if seq.decoding:
                out.append(seq)
                out_rows.append(row)
                continue
            group = [seq, *seq.followers]
            for twin in seq.followers:
                twin.blocks, twin.scored = self.cache.fork(seq.blocks), seq.scored
            seq.followers = []
            for member in group:
                if member.params.prompt_logprobs and not member.output:
                    if member.params.max_tokens > 0:
                        member.request.emit(Update(member.index, prompt=member.scored))
                if member.params.max_tokens == 0:
                    member.done = True
                    member.request.emit(
                        Update(
                            member.index,
                            member.stream.close("length"),
                            prompt=member.scored if member.params.prompt_logprobs else None,
                            finish_reason="length",
                        )
                    )
                    self.stats["finished"] += 1
                    continue
                out.append(member)
                out_rows.append(row)
        return out, out_rows

    def _score_prompt(self, seq: Sequence, first: int, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens after positions first..first+len(logits)-1."""
        if seq.scored is None:
            seq.scored = [TokenLogprob(seq.prompt[0], None, None)]
        upto = min(first + logits.shape[0], len(seq.prompt) - 1)  # the last position predicts the first new token
        if upto <= first:
            return
        try:
            logprobs = torch.log_softmax(logits[: upto - first, : self.tokenizer.n_vocab].float(), dim=-1)
            k = seq.params.logprobs or 0
            seq.scored += _logprob_infos(logprobs, seq.prompt[first + 1 : upto + 1], [k] * (upto - first))
        except Exception as err:  # noqa: BLE001 - this prompt's choices fail, no one else's
            log.exception("scoring a prompt failed")
            self._fail([seq, *seq.followers], _describe(err))

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample the next token of each sequence from its row of `logits` (B, V) and push it.

        A row whose logits are not finite, or whose sampling or text fails, ends with an error; the
        others go on. When the batched sampling fails, each row is sampled again alone (seeded rows
        from their generator's state before the failed attempt) to find the rows at fault.
        """
        logits = logits[:, : self.tokenizer.n_vocab]
        # usable: no NaN or +inf, and not all -inf; in one pass, since a row's max is NaN or ±inf exactly then
        usable = torch.isfinite(logits.amax(-1)).tolist()
        if not all(usable):
            self._fail(
                [s for s, ok in zip(seqs, usable) if not ok],
                "the model's next-token scores for this sequence are not finite numbers (NaN or inf)",
            )
            keep = [i for i, ok in enumerate(usable) if ok]
            seqs, logits = [seqs[i] for i in keep], logits[keep]
        if not seqs:
            return
        states = [s.generator.get_state() if s.generator is not None else None for s in seqs]
        try:
            picked = self._pick(seqs, logits)
        except Exception:  # noqa: BLE001 - find the rows at fault
            log.exception("sampling a batch failed; sampling its rows one by one")
            picked = []
            for i, (seq, state) in enumerate(zip(seqs, states)):
                if state is not None:
                    seq.generator.set_state(state)
                try:
                    picked.extend(self._pick([seq], logits[i : i + 1]))
                except Exception as err:  # noqa: BLE001 - this row alone fails
                    log.exception("sampling a row failed")
                    self._fail([seq], _describe(err))
                    picked.append(None)
        now = time.monotonic()
        for seq, info in zip(seqs, picked):
            if info is None or seq.done:
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
                self._record_ttft(now - seq.arrived)
            self.counters["generation_tokens"] += 1
            try:
                seq.push(info)
            except Exception as err:  # noqa: BLE001 - this row alone fails
                log.exception("emitting a token failed")
                self._fail([seq], _describe(err))

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenLogprob]:
        """The sampled token of each row of `logits` (B, V), with its logprobs when asked for."""
        tokens = self._sample(seqs, logits)
        infos: dict[int, TokenLogprob] = {}
        # best_of ranks candidates by the cumulative logprob of their tokens: those need it even unasked
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None or s.params.best_of]
        if want:
            logprobs = torch.log_softmax(logits[want].float(), dim=-1)
            found = _logprob_infos(logprobs, [tokens[i] for i in want], [seqs[i].params.logprobs or 0 for i in want])
            infos = dict(zip(want, found))
        return [infos.get(i) or TokenLogprob(token, None, None) for i, token in enumerate(tokens)]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row: argmax for greedy rows, own generator for seeded rows, shared groups otherwise.

        Each row's logit controls come first; a watermarked row's green tokens get their bias last (after
        temperature, top-k and top-p), seeded by its own tokens so far, as `gptwo.sampling.sample_next` adds it."""
        controls = [seq.controls for seq in seqs]
        if any(c is not None for c in controls):
            prompts, outputs = [seq.prompt for seq in seqs], [seq.output for seq in seqs]
            logits = control_logits(logits, controls, prompts, outputs, self.tokenizer.eot_token)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        greedy = [i for i, seq in enumerate(seqs) if seq.params.temperature == 0]
        if greedy:
            process = _watermark_process([seqs[i] for i in greedy])
            chosen = logits[greedy]
            tokens[greedy] = (process(chosen.float()) if process else chosen).argmax(-1)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0:
                continue
            if seq.generator is not None:  # as gptwo.generate.sample_next draws, so a seed gives the same text
                probs = sampling_weights(logits[i : i + 1], p.temperature, p.top_k, p.top_p, _watermark_process([seq]))
                tokens[i] = torch.multinomial(probs, 1, generator=seq.generator)[0, 0]
            else:
                groups[(p.temperature, p.top_k, p.top_p)].append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            process = _watermark_process([seqs[i] for i in rows])
            group = logits if len(rows) == len(seqs) else logits[rows]
            probs = sampling_weights(group, temperature, top_k, top_p, process)
            tokens[rows] = sample_by_cdf(probs, self.generator)
        return tokens.tolist()

    def _record_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        for i in range(bisect.bisect_left(TTFT_BUCKETS, seconds), len(TTFT_BUCKETS)):
            self.ttft[i] += 1

    def _retire(self) -> None:
        """Give back the blocks of finished and cancelled sequences."""
        gone = [s for s in self._active if s.done or s.cancelled]
        if not gone:
            return
        for seq in gone:
            if not seq.failed:
                self.stats["cancelled" if not seq.done else "finished"] += 1
            if seq.blocks is not None:
                self.cache.release(seq.blocks)
                seq.blocks = None
            if self.draft is not None:
                self.draft.release(seq)
            orphans = [t for t in seq.followers if not t.cancelled]  # never forked: their prompt failed
            seq.followers = []
            self._fail(orphans, "its prompt could not be computed")
        self._leave(gone)
        self._active = [s for s in self._active if not (s.done or s.cancelled)]

    def _fail(self, seqs: list[Sequence], message: str, shutting_down: bool = False) -> None:
        """End unfinished sequences with an error update."""
        for seq in (s for s in seqs if not s.done):
            seq.done = seq.failed = True
            self.stats["failed"] += 1
            seq.request.emit(Update(seq.index, finish_reason="error", error=message, shutting_down=shutting_down))


def logit_controls(params: SamplingParams) -> LogitControls | None:
    """The logit controls a request asks for (None when it changes no logit); a GptwoError when out of range."""
    controls = LogitControls(
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=params.logit_bias,
        min_tokens=params.min_tokens,
    )
    return controls if controls.active else None


def _control_param(what: str) -> str:
    """The request field a LogitControls error is about."""
    names = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens")
    return next((name for name in names if what.startswith(name)), "logit_bias")


def _watermark_process(seqs: list[Sequence]):
    """The bias the watermarked ones of `seqs` add to their rows of logits (None when none is watermarked)."""
    if all(seq.watermark is None for seq in seqs):
        return None
    marks = [seq.watermark for seq in seqs]
    contexts = [_context(seq, mark.settings.context_width) if mark else () for seq, mark in zip(seqs, marks)]
    return lambda logits: watermark_logits(logits, marks, contexts)


def _context(seq: Sequence, width: int) -> list[int]:
    """The last `width` tokens of `seq` (its prompt, then what it produced): what seeds its next green list."""
    if len(seq.output) >= width:
        return seq.output[-width:]
    return (seq.prompt + seq.output)[-width:]


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def _logprob_infos(logprobs: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """For each row of `logprobs` (N, V): its token's logprob and the top `ks[row]` alternatives (plus the token)."""
    if not tokens:
        return []
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    top = torch.topk(logprobs, max(ks), dim=-1) if max(ks) else None
    infos = []
    for row, (token, logprob, k) in enumerate(zip(tokens, chosen, ks)):
        alternatives = dict(zip(top.indices[row, :k].tolist(), top.values[row, :k].tolist())) if k else {}
        infos.append(TokenLogprob(token, logprob, {**alternatives, token: logprob}))
    return infos
