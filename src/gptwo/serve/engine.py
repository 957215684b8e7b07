"""The batching engine: one worker thread runs the model for every request at once (continuous batching).

Each choice of a request is a `Sequence`. Between decode steps the worker retires finished or
cancelled sequences and admits waiting ones: their prompts are prefilled together and their
keys/values are copied into free rows of one shared `PooledCache`, so a new request joins the
running batch at the next step instead of waiting for it to drain. Rows share slot indices (as in
`gptwo.model.KVCache`); a joining prompt is right-aligned with the newest slot and the slots before
it are marked invalid, so every row sees only its own tokens at its own positions.

Sampling is per row, in float32: greedy rows take the argmax, seeded rows use their own generator
(so a seed gives the same text however the request was batched), the rest are sampled in groups
that share temperature / top-k / top-p. Log-probabilities are those of the raw model (before
temperature). A failure that belongs to one row (logits that are NaN or inf, a sampling or text
error) ends only that row, with an error in its own request's response; the rest of the batch goes on.

Waiting sequences are admitted fairly: the next free row goes to the client (a remote address) that
holds the fewest rows, so one client's big request does not hold everyone else back; a client may
hold at most `max_client_choices` unfinished sequences, and one request at most `max_request_choices`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from gptwo.errors import GptwoError
from gptwo.generate import TextStream, filter_logits, pad_left
from gptwo.infer.native import NativeStep
from gptwo.model import GPT, KVCache
from gptwo.serve.limits import MAX_CLIENT_CHOICES, MAX_REQUEST_CHOICES
from gptwo.tokenizer import Tokenizer

log = logging.getLogger("gptwo.serve")


class Overloaded(Exception):
    """The waiting queue is full; the client should retry later."""


class ClientBusy(Overloaded):
    """This client already holds as many unfinished sequences as one client may; it should retry later."""


class RequestRejected(GptwoError):
    """A request the model cannot run; `param` and `code` say which part (as in OpenAI's errors)."""

    def __init__(self, what: str, fix: str, param: str, code: str | None = None):
        super().__init__(what, fix)
        self.param, self.code = param, code


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
    ):
        self.request, self.index, self.prompt, self.params = request, index, prompt, params
        self.stream = TextStream(tokenizer, params.stop)
        self.generator = None  # seeded requests: choice j samples with its own generator seeded with seed + j
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed((params.seed + seed_offset) % 2**64)
        self.generated = 0
        self.next_input = -1  # the sampled token to feed at the next decode step
        self.done = False
        self.failed = False  # ended by an error (counted in stats["failed"])
        self.left = False  # no longer counted against its client's limit

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled

    def push(self, token: TokenLogprob) -> None:
        """Take one sampled token: emit its text, and finish on end-of-text, a stop string or max_tokens."""
        self.generated += 1
        text = self.stream.push(token.token)
        finish = self.stream.finish_reason if self.stream.finished else None
        if finish is None and self.generated >= self.params.max_tokens:
            text += self.stream.close("length")
            finish = "length"
        self.next_input, self.done = token.token, finish is not None
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


class PooledCache(KVCache):
    """A KVCache whose batch is the first `rows` rows of a pool that grows on demand.

    Rows join (`add_rows`) and leave (`drop_rows`) between steps; `spans[r]` counts row r's real
    tokens, which are always the newest `spans[r]` slots, so leading slots that no row needs any
    more can be cut off (`_make_room`).

    With a `solo` step (`NativeStep`: the whole forward in one C call, for a model prepared with
    native CPU kernels), a lone row decodes through it, as `gptwo generate` does at batch 1: its
    keys/values move into the step's own cache when it is alone at a decode, and back into the
    pool before anything else changes the pool (a row joins or leaves).
    """

    def __init__(self, config, device, dtype, solo: NativeStep | None = None):
        super().__init__(config, 0, 0, device=device, dtype=dtype)
        self.config, self.device, self.dtype = config, device, dtype
        self._k, self._v, self._valid = self.k, self.v, self.valid
        self.rows, self.spans = 0, []
        self.solo = solo
        self.solo_len = None  # the lone row's tokens held in solo's cache (the pool's copy is stale)
        self._expose()

    def _expose(self) -> None:
        self.k, self.v, self.valid = self._k[:, : self.rows], self._v[:, : self.rows], self._valid[: self.rows]

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the pool (doubling, length at most the context) to hold `rows` rows of `length` slots."""
        cap_rows, cap_len = self._k.shape[1], self._k.shape[3]
        if rows <= cap_rows and length <= cap_len:
            return
        new_rows = max(rows, min(2 * cap_rows, rows + 64), 4) if rows > cap_rows else cap_rows
        new_len = min(self.config.block_size, max(length, 2 * cap_len, 64)) if length > cap_len else cap_len
        shape = (self.config.n_layer, new_rows, self.config.n_head, new_len, self.config.head_dim)
        k, v = (torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(2))
        valid = torch.zeros(new_rows, new_len, dtype=torch.bool, device=self.device)
        k[:, : self.rows, :, : self.length] = self._k[:, : self.rows, :, : self.length]
        v[:, : self.rows, :, : self.length] = self._v[:, : self.rows, :, : self.length]
        valid[: self.rows, : self.length] = self._valid[: self.rows, : self.length]
        self._k, self._v, self._valid = k, v, valid
        self._expose()

    def _shift(self, by: int) -> None:
        """Move every row's slots `by` places right (by > 0) or left (by < 0)."""
        n, old = self.rows, self.length
        new = old + by
        src, dst = (slice(0, old), slice(by, new)) if by > 0 else (slice(-by, old), slice(0, new))
        for buf in (self._k, self._v):
            buf[:, :n, :, dst] = buf[:, :n, :, src].clone()
        self._valid[:n, dst] = self._valid[:n, src].clone()
        if by > 0:
            self._valid[:n, :by] = False
        self.length = new

    def add_row(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append a row whose keys/values `k`, `v` (n_layer, n_head, L, head_dim) end at the newest slot."""
        self.add_rows(k[:, None], v[:, None], [k.shape[2]])

    def add_rows(self, k: torch.Tensor, v: torch.Tensor, spans: Seq[int]) -> None:
        """Append rows at once: `k`, `v` (n_layer, rows, n_head, W, head_dim) end at the newest slot.

        Row j's tokens are its last `spans[j]` slots. One copy for all joining rows: a copy per row
        (each a small strided OpenMP loop) measured ~2 s for 64 rows of GPT-2 small on 2 loaded cores.
        """
        self._leave_solo()
        count, width = k.shape[1], max(spans)
        self._reserve(self.rows + count, max(self.length, width))
        if width > self.length:
            self._shift(width - self.length)
        copied = min(k.shape[3], self.length)  # at least every row's span; padding before a span stays invalid
        rows = slice(self.rows, self.rows + count)
        self._k[:, rows, :, self.length - copied : self.length] = k[:, :, :, k.shape[3] - copied :]
        self._v[:, rows, :, self.length - copied : self.length] = v[:, :, :, v.shape[3] - copied :]
        slots = torch.arange(self._valid.shape[1], device=self.device)
        first = self.length - torch.tensor(list(spans), device=self.device)[:, None]
        self._valid[rows] = (slots >= first) & (slots < self.length)
        self.rows += count
        self.spans.extend(spans)
        self._expose()

    def drop_rows(self, rows: Seq[int]) -> list[int]:
        """Free `rows` by moving the last rows into their places; return the old index of each remaining row."""
        if self.solo_len is not None and rows:  # the lone row leaves: nothing to copy back
            self.solo_len = None
        self._leave_solo()
        order = list(range(self.rows))
        for row in sorted(rows, reverse=True):
            last = self.rows - 1
            if row != last:
                self._k[:, row, :, : self.length] = self._k[:, last, :, : self.length]
                self._v[:, row, :, : self.length] = self._v[:, last, :, : self.length]
                self._valid[row] = self._valid[last]
                order[row], self.spans[row] = order[last], self.spans[last]
            order.pop()
            self.spans.pop()
            self.rows -= 1
        if not self.rows:
            self.length = 0
        self._expose()
        return order

    def _leave_solo(self) -> None:
        """Copy the lone row's keys/values back from the solo step's cache into the pool (its slots 0..n-1)."""
        if self.solo_len is None:
            return
        n, self.solo_len = self.solo_len, None
        self._reserve(1, n)
        self._k[:, 0, :, :n] = self.solo.k[:, :, :n]
        self._v[:, 0, :, :n] = self.solo.v[:, :, :n]
        self._valid[0] = False
        self._valid[0, :n] = True
        self.length, self.spans = n, [n]
        self._expose()

    def _make_room(self) -> None:
        """Cut leading slots no row uses once they are a quarter of the cache (or the context is full)."""
        unused = self.length - max(self.spans)
        if unused and (self.length >= self.config.block_size or 4 * unused >= self.length):
            self._shift(-unused)
        self._reserve(self.rows, self.length + 1)

    def decode(self, model: GPT, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); return the next-token logits (B, V)."""
        if self.solo is not None and self.rows == 1:
            if self.solo_len is None:  # the row's real tokens are the newest spans[0] slots
                span = self.spans[0]
                self.solo.k[:, :, :span] = self._k[:, 0, :, self.length - span : self.length]
                self.solo.v[:, :, :span] = self._v[:, 0, :, self.length - span : self.length]
                self.solo_len = span
            logits = self.solo(tokens.view(1, 1), self.solo_len)
            self.solo_len += 1
            self.spans[0] += 1
            return logits
        self._leave_solo()
        self._make_room()
        logits = model(
            tokens[:, None], cache=self, valid=torch.ones(self.rows, 1, dtype=torch.bool, device=self.device)
        )
        self.spans = [s + 1 for s in self.spans]
        return logits[:, -1]


class BatchEngine:
    """Runs `model` for all submitted requests in one background thread, batching them step by step."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch: int = 32,
        max_queue: int = 256,
        max_prefill_tokens: int = 4096,
        max_request_choices: int = MAX_REQUEST_CHOICES,
        max_client_choices: int = MAX_CLIENT_CHOICES,
    ):
        """`max_request_choices`: most sequences (prompts x n) in one request; `max_client_choices`: most
        unfinished sequences one client holds at once (0: no limit)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.max_request_choices, self.max_client_choices = max_request_choices, max_client_choices
        self._held: collections.Counter[str] = collections.Counter()  # unfinished sequences per client
        self.device = model.lm_head.weight.device
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox: list[tuple[Request, Update]] = []  # updates of this step, for the event loop(s)
        # a lone request decodes in one native call per token (its cache: the model's whole context, fp32)
        self.solo = NativeStep(model, model.config.block_size) if NativeStep.supports(model) else None
        self.pool = self._new_pool()
        self.stats = {"finished": 0, "cancelled": 0, "failed": 0, "peak_batch": 0, "steps": 0}

    def _new_pool(self) -> PooledCache:
        return PooledCache(self.model.config, self.device, self.model.lm_head.weight.dtype, self.solo)

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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def check(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> None:
        """Reject requests the model cannot run: empty prompts, unknown token ids, more tokens than the context."""
        self.check_count(len(prompts), n)
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

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1, client: str = "") -> Request:
        """Queue `n` choices for each prompt (choice index = prompt * n + j).

        Raise Overloaded if the queue is full, ClientBusy if `client` would hold more unfinished
        sequences than `max_client_choices`.
        """
        self.check(prompts, params, n)
        request = Request(asyncio.get_running_loop(), self._outbox, client)
        seqs = [
            Sequence(request, i * n + j, p, params, self.tokenizer, self.device, seed_offset=j)
            for i, p in enumerate(prompts)
            for j in range(n)
        ]
        with self._cond:
            held = self._held[client]
            if self.max_client_choices and held + len(seqs) > self.max_client_choices:
                raise ClientBusy(
                    f"this client already has {held} choices running or waiting and asks for {len(seqs)} more; "
                    f"one client may hold at most {self.max_client_choices} (the server's --max-client-choices)"
                )
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise Overloaded(f"{len(self._waiting)} sequences are waiting (the limit is {self.max_queue})")
            self._held[client] += len(seqs)
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
                joining = self._admit()
            try:
                with torch.inference_mode():
                    self._step(joining)
            except Exception as err:  # noqa: BLE001 - a failed step must not kill the server
                log.exception("engine step failed")
                self._fail([*self._active, *joining], f"{type(err).__name__}: {err}")
                self._leave(self._active)
                self._active, self.pool = [], self._new_pool()
            self._leave([s for s in joining if s.done])  # those that never got (or already left) a row
            self._flush()
        self._fail([*self._active, *self._waiting], "the server is shutting down")
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

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences that fit the free rows and the prefill budget (called under the lock).

        Each free row goes to the oldest waiting sequence of the client holding the fewest rows, so
        a client's big request cannot keep another client's requests waiting behind it.
        """
        joining: list[Sequence] = []
        width = 0
        rows = collections.Counter(s.request.client for s in self._active)
        while self._waiting and len(self._active) + len(joining) < self.max_batch:
            seq = min(self._waiting, key=lambda s: rows[s.request.client])  # the first of the least served
            if seq.cancelled:
                self._waiting.remove(seq)
                self.stats["cancelled"] += 1
                self._leave([seq])  # the lock is re-entrant
                continue
            width = max(width, len(seq.prompt))
            if joining and width * (len(joining) + 1) > self.max_prefill_tokens:
                break
            self._waiting.remove(seq)
            rows[seq.request.client] += 1
            joining.append(seq)
        return joining

    def _step(self, joining: list[Sequence]) -> None:
        self._retire()
        if joining:
            try:
                prefilled = self._prefill_forward(joining)
            except Exception as err:  # noqa: BLE001 - the joining prompts fail; the running rows go on
                log.exception("prefill failed")
                self._fail(joining, f"{type(err).__name__}: {err}")
            else:
                self._prefill(joining, *prefilled)
            self._retire()
            self._flush()  # first tokens go out now, not after the decode step below (time to first token)
        if self._active:
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._active))
            self.stats["steps"] += 1
            tokens = torch.tensor([s.next_input for s in self._active], device=self.device)
            self._advance(self._active, self.pool.decode(self.model, tokens))
            self._retire()

    def _prefill_forward(self, joining: list[Sequence]) -> tuple[KVCache, torch.Tensor, list[int]]:
        """Run the joining prompts (each distinct prompt once): their cache, logits, and each sequence's row."""
        prompts = list(dict.fromkeys(tuple(s.prompt) for s in joining))
        ids, valid = pad_left(prompts, self.tokenizer.eot_token, self.device)
        cache = KVCache(self.model.config, len(prompts), ids.shape[1], device=self.device, dtype=self.pool.dtype)
        every_position = any(s.params.prompt_logprobs for s in joining)  # echo with logprobs scores the prompt
        logits = self.model(ids, cache=cache, valid=valid, last_only=not every_position)
        return cache, logits, [prompts.index(tuple(s.prompt)) for s in joining]

    def _prefill(self, joining: list[Sequence], cache: KVCache, logits: torch.Tensor, rows: list[int]) -> None:
        """Give the prefilled sequences rows in the pool and sample their first tokens."""
        width = logits.shape[1]
        # (row, logprobs) -> the prompt's logprobs (or why they failed): n choices of a prompt score it once
        scored: dict[tuple[int, int], list[TokenLogprob] | Exception] = {}
        for seq, row in zip(joining, rows):
            prompt_info = None
            if seq.params.prompt_logprobs:
                key = (row, seq.params.logprobs or 0)
                if key not in scored:
                    try:
                        scored[key] = self._prompt_logprobs(seq, logits[row, width - len(seq.prompt) :])
                    except Exception as err:  # noqa: BLE001 - this prompt's choices fail, no one else's
                        log.exception("scoring a prompt failed")
                        scored[key] = err
                if isinstance(scored[key], Exception):
                    self._fail([seq], _describe(scored[key]))
                    continue
                prompt_info = scored[key]
            if seq.params.max_tokens == 0:
                seq.done = True
                seq.request.emit(
                    Update(seq.index, seq.stream.close("length"), prompt=prompt_info, finish_reason="length")
                )
                self.stats["finished"] += 1
                continue
            if prompt_info is not None:
                seq.request.emit(Update(seq.index, prompt=prompt_info))
        new = [(s, r) for s, r in zip(joining, rows) if not s.done]
        if new:
            index = torch.tensor([r for _, r in new], device=self.device)
            self.pool.add_rows(
                cache.k.index_select(1, index), cache.v.index_select(1, index), [len(s.prompt) for s, _ in new]
            )
            self._active.extend(s for s, _ in new)
            self._advance([s for s, _ in new], logits[[r for _, r in new], -1])

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> list[TokenLogprob]:
        """Log-probabilities of each prompt token given the ones before it (the first has none)."""
        logprobs = torch.log_softmax(logits[:-1, : self.tokenizer.n_vocab].float(), dim=-1)
        infos = _logprob_infos(logprobs, seq.prompt[1:], [seq.params.logprobs or 0] * (len(seq.prompt) - 1))
        return [TokenLogprob(seq.prompt[0], None, None), *infos]

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample the next token of each sequence from its row of `logits` (B, V) and push it.

        A row whose logits are not finite, or whose sampling or text fails, ends with an error; the
        others go on. When the batched sampling fails, each row is sampled again alone (seeded rows
        from their generator's state before the failed attempt) to find the rows at fault.
        """
        logits = logits[:, : self.tokenizer.n_vocab]
        usable = ((logits < float("inf")).all(-1) & (logits > float("-inf")).any(-1)).tolist()
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
        for seq, info in zip(seqs, picked):
            if info is None:
                continue
            try:
                seq.push(info)
            except Exception as err:  # noqa: BLE001 - this row alone fails
                log.exception("emitting a token failed")
                self._fail([seq], _describe(err))

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenLogprob]:
        """The sampled token of each row of `logits` (B, V), with its logprobs when asked for."""
        tokens = self._sample(seqs, logits)
        infos: dict[int, TokenLogprob] = {}
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            logprobs = torch.log_softmax(logits[want].float(), dim=-1)
            found = _logprob_infos(logprobs, [tokens[i] for i in want], [seqs[i].params.logprobs for i in want])
            infos = dict(zip(want, found))
        return [infos.get(i) or TokenLogprob(token, None, None) for i, token in enumerate(tokens)]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row: argmax for greedy rows, own generator for seeded rows, shared groups otherwise."""
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        greedy = [i for i, seq in enumerate(seqs) if seq.params.temperature == 0]
        if greedy:
            tokens[greedy] = logits[greedy].argmax(-1)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0:
                continue
            if seq.generator is not None:  # as gptwo.generate.sample_next draws, so a seed gives the same text
                probs = sampling_weights(logits[i : i + 1], p.temperature, p.top_k, p.top_p)
                tokens[i] = torch.multinomial(probs, 1, generator=seq.generator)[0, 0]
            else:
                groups[(p.temperature, p.top_k, p.top_p)].append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            probs = sampling_weights(logits if len(rows) == len(seqs) else logits[rows], temperature, top_k, top_p)
            tokens[rows] = _sample_by_cdf(probs, self.generator)
        return tokens.tolist()

    def _retire(self) -> None:
        """Free the rows of finished and cancelled sequences."""
        gone = [i for i, s in enumerate(self._active) if s.done or s.cancelled]
        if not gone:
            return
        for i in gone:
            if not self._active[i].failed:
                self.stats["cancelled" if not self._active[i].done else "finished"] += 1
        self._leave([self._active[i] for i in gone])
        order = self.pool.drop_rows(gone)
        self._active = [self._active[i] for i in order]

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        """End unfinished sequences with an error update."""
        for seq in (s for s in seqs if not s.done):
            seq.done = seq.failed = True
            self.stats["failed"] += 1
            seq.request.emit(Update(seq.index, finish_reason="error", error=message))


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def sampling_weights(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Float32 probabilities (B, V) to sample from: `logits` (finite rows) scaled, top-k / top-p filtered.

    A row that filtering leaves empty or not finite (a top_p too small for float32, such as 1e-46,
    or a tiny temperature that overflows) keeps only its most likely token, as any top_p that small means.
    """
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    broken = ~(probs.sum(-1) > 0.5)  # NaN or 0: the sum is 1 for every row filtering left intact
    if bool(broken.any()):
        rows = broken.nonzero()[:, 0]
        probs[rows] = 0.0
        probs[rows, logits[rows].argmax(-1)] = 1.0
    return probs


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


CDF_BLOCK = 256  # tokens per block of the two-level sampler


def _sample_by_cdf(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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
