"""The workloads of `gptwo bench serve` (issue 22), the stdlib client that runs them, and the numbers they give.

A workload is a list of requests made of token ids, so `gptwo serve` of any tree and llama-server read
the same tokens. Prompts are random whole-word tokens (each encodes back to itself alone, so a prompt of
N words is N tokens through the tokenizer both ways), seeded by workload, round and request: every
server sees the same prompts in a round, and no prompt repeats one of an earlier round (a prefix cache
cannot carry over). The client speaks HTTP/1.1 and server-sent events over asyncio and keeps the
arrival time of every chunk that carries text; the summaries below turn those times into tokens/s,
times to first token and inter-token gaps, and a server's Prometheus `/metrics` into KV-memory figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gptwo.errors import GptwoError

WORKLOADS = ("mixed", "join", "prefix", "throughput")
CONTINUOUS_USAGE = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # request fields
_WORD = re.compile(r" [A-Za-z]+")


@dataclass(frozen=True)
class Sizes:
    """Requests and tokens of each workload: issue 22's by default (the tests pass small ones)."""

    mixed_short: int = 44  # mixed: this many short prompts and ...
    mixed_short_prompt: int = 20
    mixed_long: int = 4  # ... this many long ones, all sent at once
    mixed_long_prompt: int = 800
    mixed_new: int = 32
    join_streams: int = 8  # join: streams already running when ...
    join_stream_prompt: int = 20
    join_stream_new: int = 256
    join_warm: int = 32  # ... each has this many chunks, and one long prompt joins
    join_prompt: int = 900
    join_new: int = 8
    prefix_requests: int = 16  # prefix: requests sharing one long prefix, different suffixes
    prefix_shared: int = 600
    prefix_suffix: int = 8
    prefix_new: int = 8
    prefix_at_once: int = 1  # requests in flight together (1: one after another)
    throughput_clients: int = 64
    throughput_prompt: int = 20
    throughput_new: int = 32

    def context_needed(self) -> int:
        """Tokens of the longest request, prompt and completion: the model's context must hold it."""
        return max(
            self.mixed_long_prompt + self.mixed_new,
            self.mixed_short_prompt + self.mixed_new,
            self.join_stream_prompt + self.join_stream_new,
            self.join_prompt + self.join_new,
            self.prefix_shared + self.prefix_suffix + self.prefix_new,
            self.throughput_prompt + self.throughput_new,
        )

    def most_at_once(self) -> int:
        """The most requests any workload has in flight: the servers' sequence limit and llama-server's slots."""
        return max(
            self.mixed_short + self.mixed_long, self.join_streams + 1, self.prefix_at_once, self.throughput_clients
        )


@dataclass(frozen=True)
class Request:
    """One completion request: the prompt's token ids and how many tokens to generate."""

    prompt: list[int]
    max_tokens: int


# ---------------------------------------------------------------------------------------------- the prompts
class PromptMaker:
    """Prompts of an exact token count from a tokenizer's whole-word tokens (` the`, ` cat`, ...)."""

    def __init__(self, tokenizer):
        self.words = word_tokens(tokenizer)

    def make(self, length: int, seed: str) -> list[int]:
        """`length` word tokens drawn with `seed`: the same seed gives the same prompt."""
        rng = random.Random(seed)
        return [rng.choice(self.words) for _ in range(length)]


def word_tokens(tokenizer) -> list[int]:
    """Ids of tokens that are one space and letters and encode back to themselves alone, so any run of them
    round-trips through the tokenizer unchanged (GPT-2's pre-tokenizer splits text before each space-word)."""
    words = []
    for token in range(tokenizer.n_vocab):
        try:
            text = tokenizer.decode([token])
        except (KeyError, ValueError):  # ids a tokenizer leaves unused
            continue
        if _WORD.fullmatch(text) and tokenizer.encode(text) == [token]:
            words.append(token)
    if len(words) < 16:
        raise GptwoError(
            f"the model's tokenizer has {len(words)} whole-word tokens; the bench's prompts need at least 16",
            "bench a model with a GPT-2-like tokenizer (leave --model out for the default one)",
        )
    return words


def mixed_requests(maker: PromptMaker, sizes: Sizes, round_: int) -> list[Request]:
    """Short prompts with the long ones spread among them, all sent at once."""
    requests = [
        Request(maker.make(sizes.mixed_short_prompt, f"mixed-{round_}-short-{i}"), sizes.mixed_new)
        for i in range(sizes.mixed_short)
    ]
    step = max(1, len(requests) // max(1, sizes.mixed_long))
    for i in range(sizes.mixed_long):
        long = Request(maker.make(sizes.mixed_long_prompt, f"mixed-{round_}-long-{i}"), sizes.mixed_new)
        requests.insert(min(len(requests), i * (step + 1)), long)
    return requests


def join_requests(maker: PromptMaker, sizes: Sizes, round_: int) -> tuple[list[Request], Request]:
    """The running streams (short prompts, long completions) and the long prompt that joins them."""
    streams = [
        Request(maker.make(sizes.join_stream_prompt, f"join-{round_}-stream-{i}"), sizes.join_stream_new)
        for i in range(sizes.join_streams)
    ]
    return streams, Request(maker.make(sizes.join_prompt, f"join-{round_}-long"), sizes.join_new)


def prefix_requests(maker: PromptMaker, sizes: Sizes, round_: int) -> list[Request]:
    """One shared prefix (new each round) with a different short suffix per request."""
    shared = maker.make(sizes.prefix_shared, f"prefix-{round_}-shared")
    return [
        Request(shared + maker.make(sizes.prefix_suffix, f"prefix-{round_}-suffix-{i}"), sizes.prefix_new)
        for i in range(sizes.prefix_requests)
    ]


def throughput_requests(maker: PromptMaker, sizes: Sizes, round_: int) -> list[Request]:
    """Short prompts, one per client, all sent at once."""
    return [
        Request(maker.make(sizes.throughput_prompt, f"throughput-{round_}-{i}"), sizes.throughput_new)
        for i in range(sizes.throughput_clients)
    ]


# ---------------------------------------------------------------------------------------------- the client
@dataclass
class Completion:
    """What one streamed request got: tokens (from the usage chunk), its text, when it was sent and when each chunk
    with text arrived (perf_counter seconds), or an error. From a server that puts the usage so far in every
    chunk (vLLM's `continuous_usage_stats`, asked for with CONTINUOUS_USAGE), `counts` holds the tokens generated
    by each text chunk's arrival: a chunk may carry two tokens when the first ended inside a character (its text
    was held back), and its gap is then not an inter-token gap."""

    tokens: int = 0
    text: str = ""
    sent: float = 0.0
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    error: str | None = None
    finished: bool = False

    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first text."""
        return self.times[0] - self.sent if self.times else None


async def _read_body(reader: asyncio.StreamReader, chunked: bool):
    """The response body's pieces as they arrive (chunked transfer encoding or read-until-close)."""
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


class HttpStatusError(Exception):
    """An answer other than 200; the message quotes its status and the start of its body."""


async def _open(address: tuple[str, int], head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict]:
    """Send a request; read its status line and headers (OSError if refused, HttpStatusError unless 200)."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(head)
    status = (await reader.readline()).decode("latin-1").split()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if len(status) < 2 or status[1] != "200":
        body = (await reader.read(300)).decode(errors="replace")
        writer.close()
        raise HttpStatusError(f"HTTP {' '.join(status[1:]) or 'no status'}: {body}")
    return reader, writer, headers


async def stream_completion(
    address: tuple[str, int],
    request: Request,
    temperature: float = 1.0,
    extra: dict | None = None,
    out: Completion | None = None,
) -> Completion:
    """POST one streamed /v1/completions request and read its server-sent events to the end, filling `out` (which
    others may watch as it grows). `extra` adds fields to the body (llama-server's `cache_prompt`)."""
    out = out if out is not None else Completion()
    body = json.dumps(
        {
            "model": "bench",
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            **(extra or {}),
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    out.sent = time.perf_counter()
    writer = None
    try:
        reader, writer, headers = await _open(address, head + body)
        buffer = b""
        async for piece in _read_body(reader, headers.get("transfer-encoding") == "chunked"):
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                take_event(event, out)
    except HttpStatusError as err:
        out.error = str(err)
    except (OSError, asyncio.IncompleteReadError, ValueError) as err:
        out.error = f"{type(err).__name__}: {err}"
    finally:
        if writer is not None:
            writer.close()
    if not out.finished and out.error is None:
        out.error = "the stream ended without [DONE]"
    return out


def take_event(event: bytes, out: Completion) -> None:
    """One server-sent event into `out`: text and its arrival time, the usage count, an error, or the end."""
    if event.startswith(b"error:"):  # llama-server's error event
        out.error = event.removeprefix(b"error:").strip().decode(errors="replace")[:300]
        return
    data = event.removeprefix(b"data: ").strip()
    if data == b"[DONE]":
        out.finished = True
        return
    if not data or event.startswith(b":"):
        return
    chunk = json.loads(data)
    if "error" in chunk:
        error = chunk["error"]
        out.error = str(error.get("message", error)) if isinstance(error, dict) else str(error)
    text = "".join(choice.get("text") or "" for choice in chunk.get("choices") or [])
    usage = chunk.get("usage")
    if text:
        out.times.append(time.perf_counter())
        out.text += text
        if usage:
            out.counts.append(usage["completion_tokens"])
    if usage:
        out.tokens = usage["completion_tokens"]


async def fetch_text(address: tuple[str, int], path: str, timeout: float = 5.0) -> str | None:
    """GET `path` (e.g. /metrics): its body, or None if the server does not answer it with 200."""
    head = f"GET {path} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\nConnection: close\r\n\r\n".encode()

    async def get() -> str:
        reader, writer, headers = await _open(address, head)
        try:
            pieces = [p async for p in _read_body(reader, headers.get("transfer-encoding") == "chunked")]
        finally:
            writer.close()
        return b"".join(pieces).decode("utf-8", "replace")

    try:
        return await asyncio.wait_for(get(), timeout)
    except (OSError, asyncio.IncompleteReadError, HttpStatusError, TimeoutError):
        return None


async def _bounded(request, timeout: float, out: Completion) -> Completion:
    try:
        return await asyncio.wait_for(request, timeout)
    except TimeoutError:
        out.error = f"no complete answer within {timeout:g} s (--timeout)"
        return out


def _send(address, request: Request, extra: dict | None, timeout: float) -> tuple[asyncio.Task, Completion]:
    out = Completion()
    task = asyncio.ensure_future(_bounded(stream_completion(address, request, extra=extra, out=out), timeout, out))
    return task, out


# ---------------------------------------------------------------------------------------------- the runners
METRIC_NAMES = {  # the gauges a KV sample keeps, by the name `gptwo serve` exports them under
    "running": "gptwo_requests_running",
    "blocks_used": "gptwo_kv_blocks_used",
    "blocks_total": "gptwo_kv_blocks_total",
    "block_size": "gptwo_kv_block_size",
    "cache_bytes": "gptwo_kv_cache_bytes",
    "tokens_held": "gptwo_kv_tokens_held",
}


async def run_burst(
    address: tuple[str, int],
    requests: Sequence[Request],
    extra: dict | None,
    timeout: float,
    sample_every: float | None = None,
) -> tuple[list[Completion], float, list[dict]]:
    """All `requests` at once: their completions, seconds from the first sent to the last done, and (with
    `sample_every`) the KV gauges of /metrics read that often meanwhile (none if the server has no /metrics)."""
    started = time.perf_counter()
    tasks = [_send(address, r, extra, timeout)[0] for r in requests]
    samples: list[dict] = []
    poller = asyncio.ensure_future(_poll_metrics(address, sample_every, samples)) if sample_every else None
    results = await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    if poller is not None:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
    return list(results), seconds, samples


async def _poll_metrics(address, every: float, samples: list[dict]) -> None:
    while True:
        text = await fetch_text(address, "/metrics")
        if text is None:
            return
        values = parse_metrics(text)
        sample = {key: metric(values, name) for key, name in METRIC_NAMES.items()}
        if any(v is None for v in sample.values()):
            return
        sample["blocks_touched"] = metric(values, "gptwo_kv_blocks_touched")  # absent before it was exported
        samples.append(sample)
        await asyncio.sleep(every)


async def run_join(
    address: tuple[str, int], streams: Sequence[Request], joiner: Request, warm: int, extra: dict | None, timeout: float
) -> tuple[list[Completion], Completion, float]:
    """Start `streams`; once each has `warm` chunks (or ended), send `joiner`; once it is done and each stream has
    a few chunks more, close the streams. Returns the streams, the joiner and when the joiner was sent."""
    started = time.perf_counter()
    running = [_send(address, r, extra, timeout) for r in streams]
    outs = [out for _, out in running]

    async def until(chunks: list[int]) -> None:  # each stream has its count of chunks, or has ended
        while not all(len(out.times) >= n or task.done() for (task, out), n in zip(running, chunks)):
            if time.perf_counter() - started > timeout:
                return
            await asyncio.sleep(0.005)

    await until([warm] * len(outs))
    task, joined = _send(address, joiner, extra, timeout)
    await task  # (it sets joined.sent when it starts)
    await until([len(out.times) + 4 for out in outs])
    for stream_task, _ in running:
        stream_task.cancel()
    await asyncio.gather(*(t for t, _ in running), return_exceptions=True)
    return outs, joined, joined.sent


async def run_prefix(
    address: tuple[str, int], requests: Sequence[Request], at_once: int, extra: dict | None, timeout: float
) -> list[Completion]:
    """`requests` in waves of `at_once`, each wave sent when the one before has finished."""
    results: list[Completion] = []
    for start in range(0, len(requests), at_once):
        wave = [_send(address, r, extra, timeout)[0] for r in requests[start : start + at_once]]
        results += await asyncio.gather(*wave)
    return results


# ---------------------------------------------------------------------------------------------- the numbers
def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (0 < q <= 1) of `values`, None for none."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def _errors(results: Sequence[Completion]) -> list[str]:
    return [r.error for r in results if r.error][:3]


def burst_summary(results: Sequence[Completion], seconds: float) -> dict:
    """Aggregate tokens/s (completion tokens of the requests that finished / wall seconds), TTFT p50 and p90,
    failures."""
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    return {
        "tokens_per_s": sum(r.tokens for r in ok) / seconds if seconds > 0 else None,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p90_s": percentile(ttft, 0.9),
        "failed": len(results) - len(ok),
        "errors": _errors(results),
    }


def token_gaps(out: Completion) -> list[tuple[float, float]]:
    """(start, end) of a stream's gaps between text chunks; where the server counted the tokens of each chunk, only
    the gaps of one token (inter-token gaps: a two-token gap holds a token whose text was held back)."""
    pairs = list(zip(out.times, out.times[1:]))
    if len(out.counts) != len(out.times):
        return pairs
    return [pair for pair, a, b in zip(pairs, out.counts, out.counts[1:]) if b - a == 1]


def join_summary(streams: Sequence[Completion], joined: Completion, sent: float) -> dict:
    """The running streams' median inter-token gap before the join was sent, their largest gap that overlaps
    the join's wait for its first token (sent .. first text), and that gap over the median (the stall ratio).
    Gaps are between text chunks, of one token each where the server reports its count (`token_gaps`)."""
    first = joined.times[0] if joined.times else None
    before, during = [], []
    for out in streams:
        for a, b in token_gaps(out):
            if b <= sent:
                before.append(b - a)
            elif first is not None and a < first:
                during.append(b - a)
    median = statistics.median(before) if before else None
    largest = max(during) if during else None
    stream_errors = [s for s in streams if s.error]  # (streams closed at the end have none)
    return {
        "gap_p50_ms": median * 1e3 if median is not None else None,
        "join_gap_max_ms": largest * 1e3 if largest is not None else None,
        "stall_ratio": largest / median if median and largest is not None else None,
        "join_ttft_s": joined.ttft,
        "gaps": "tokens"
        if any(s.counts for s in streams) and all(len(s.counts) == len(s.times) for s in streams)
        else "chunks",
        "failed": int(joined.error is not None) + len(stream_errors),
        "errors": _errors([joined, *stream_errors]),
    }


def prefix_summary(results: Sequence[Completion]) -> dict:
    """TTFT p50 and p90 of the requests sharing the prefix, and failures."""
    summary = burst_summary(results, 1.0)
    del summary["tokens_per_s"]
    return summary


def kv_summary(samples: Sequence[dict]) -> dict:
    """KV memory at the sample that needed most, against what the held tokens need (tokens held + one block per
    running sequence): the blocks in use, and the whole cache allocated; also the largest used/need of any sample
    (a sample taken mid-prefill counts blocks taken for tokens not yet held). Empty without /metrics."""
    busy = [s for s in samples if s["running"] > 0 and s["block_size"] > 0 and s["blocks_total"] > 0]
    if not busy:
        return {}

    def need(s: dict) -> float:
        return s["tokens_held"] + s["block_size"] * s["running"]

    def used_over_need(s: dict) -> float:
        return s["blocks_used"] * s["block_size"] / need(s)

    peak = max(busy, key=need)
    per_token = peak["cache_bytes"] / (peak["blocks_total"] * peak["block_size"])  # the cache is all its blocks
    return {
        "kv_used_over_need": used_over_need(peak),
        "kv_used_over_need_max": max(map(used_over_need, busy)),
        "kv_alloc_over_need": peak["blocks_total"] * peak["block_size"] / need(peak),
        "kv_alloc_mib": peak["cache_bytes"] / 2**20,
        # blocks ever handed out at that sample: on a CPU the memory the cache really holds (pages touched)
        "kv_touched_over_need": (
            peak["blocks_touched"] * peak["block_size"] / need(peak) if peak.get("blocks_touched") else None
        ),
        "kv_need_mib": need(peak) * per_token / 2**20,
        "kv_samples": len(busy),
    }


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text-format samples: `name` or `name{labels}` (labels as written) -> value; comments, blank lines
    and timestamps are dropped, lines that are not samples skipped."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, rest = _split_sample(line)
        parts = rest.split()
        if not key or not parts:
            continue
        try:
            values[key] = float(parts[0])
        except ValueError:
            continue
    return values


def _split_sample(line: str) -> tuple[str, str]:
    """A sample line's `name{labels}` and what follows it (a '}' inside a quoted label value does not end them)."""
    brace = line.find("{")
    space = line.find(" ")
    if brace < 0 or 0 <= space < brace:
        return (line[:space], line[space:]) if space > 0 else ("", "")
    quoted, escaped = False, False
    for i in range(brace + 1, len(line)):
        char = line[i]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return line[: i + 1], line[i + 1 :]
    return "", ""


def metric(values: dict[str, float], name: str) -> float | None:
    """The value of metric `name` summed over its label sets, None if the server does not export it."""
    found = [v for key, v in values.items() if key == name or key.startswith(name + "{")]
    return sum(found) if found else None
