"""Bad input to the server, tried as a careless or hostile client would (issue 20): each case is its input
and the status with its one-line error, or the correct result. Plus: one row's failure ends only that row
(the rest of its batch, a running stream included, goes on), per-client limits, slow clients, and
`gptwo serve`'s options."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serve_testing import serve_in_thread, tiny_model
from test_serve_api import PROMPT, assert_openai_error

import gptwo.serve.engine as engine_module
from gptwo.cli import main
from gptwo.serve.engine import BatchEngine, SamplingParams
from gptwo.tokenizer import Tokenizer

BODY_LIMIT = 64 * 1024  # serve_in_thread's default
INSPECT_TOKENS = 64


@pytest.fixture(scope="module")
def live(model_dir):
    server, engine = serve_in_thread(
        model_dir,
        app_kwargs={"max_inspect_tokens": INSPECT_TOKENS},
        max_num_seqs=8,
        max_queue=64,
        max_request_choices=16,
    )
    yield server, engine
    server.close()


def exchange(port: int, data: bytes, chunks: tuple[bytes, ...] = (), timeout: float = 30) -> bytes:
    """Send raw bytes on a fresh connection and read the whole answer (until the server closes or 5 s pass
    in silence after an answer has begun)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        for chunk in chunks:
            sock.sendall(chunk)
        answer = b""
        while True:
            try:
                part = sock.recv(1 << 16)
            except TimeoutError:
                if answer:
                    return answer
                raise
            if not part:
                return answer
            answer += part
            if _complete(answer):
                return answer
            sock.settimeout(5 if answer else timeout)


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def parse(answer: bytes) -> tuple[int, dict]:
    """(status, JSON body) of a raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"]
    fields = {"Content-Type": "application/json", **({"Content-Length": str(len(body))} if body else {})}
    lines += [f"{k}: {v}" for k, v in {**fields, **(headers or {})}.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def completion(**fields) -> bytes:
    return request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": PROMPT, **fields}).encode())


def chunked(body: bytes, size: int = 1 << 16) -> tuple[bytes, ...]:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return (*parts, b"0\r\n\r\n")


BIG = json.dumps({"model": "tiny", "prompt": "x" * (8 << 20)}).encode()  # 8 MB, far past socket buffers
BIG_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
UTF16 = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2})

# (case, raw request, chunks sent after it, status, error param or None, words the one-line message holds)
CASES = [
    ("max_tokens as a string", completion(max_tokens="4"), (), 400, "max_tokens", "valid integer"),
    ("max_tokens as a boolean", completion(max_tokens=True), (), 400, "max_tokens", "valid integer"),
    ("n as a float", completion(n=2.0), (), 400, "n", "valid integer"),
    ("temperature as a string", completion(temperature="0.5"), (), 400, "temperature", "valid number"),
    ("stream as a string", completion(stream="true"), (), 400, "stream", "valid boolean"),
    ("more choices than one request takes", completion(prompt=["a", "b"], n=9), (), 400, "n", "--max-request-choices"),
    (
        "a UTF-16 body with its byte order mark",
        request("POST", "/v1/completions", UTF16.encode("utf-16")),
        (),
        400,
        None,
        "UTF-16 byte order mark",
    ),
    ("a UTF-16 body without one", request("POST", "/v1/completions", UTF16.encode("utf-16-le")), (), 400, None, "NUL"),
    ("a body that is not UTF-8", request("POST", "/v1/completions", b'{"prompt": "\xff"}'), (), 400, None, "0xff"),
    ("GET with a trailing slash", request("GET", "/v1/completions/"), (), 404, None, "no GET /v1/completions/"),
    ("POST with a trailing slash", completion().replace(b"completions ", b"completions/ "), (), 404, None, "no POST"),
    ("GET on a POST route", request("GET", "/v1/completions"), (), 405, None, "not allowed"),
    ("a 100 kB header", request("GET", "/health", headers={"X-Big": "a" * 100_000}), (), 431, None, "headers"),
    (
        "an 8 MB body with Content-Length",
        BIG_HEAD + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG,
        (),
        413,
        None,
        f"larger than {BODY_LIMIT} bytes",
    ),
    (
        "an 8 MB body with Content-Length, keep-alive",
        BIG_HEAD + b"Content-Length: %d\r\n\r\n" % len(BIG) + BIG,
        (),
        413,
        None,
        f"larger than {BODY_LIMIT} bytes",
    ),
    (
        "an 8 MB chunked body",
        BIG_HEAD + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
        chunked(BIG),
        413,
        None,
        f"larger than {BODY_LIMIT} bytes",
    ),
    (
        "a chunked body just over the limit",
        BIG_HEAD + b"Transfer-Encoding: chunked\r\n\r\n",
        chunked(b"x" * (BODY_LIMIT + 1), 1000),
        413,
        None,
        f"larger than {BODY_LIMIT} bytes",
    ),
    ("inspect: a NUL in the text", request("POST", "/v1/inspect", b'{"text": "a\\u0000b"}'), (), 400, None, "NUL"),
    (
        "inspect: a lone surrogate",
        request("POST", "/v1/inspect", b'{"text": "ok \\ud800"}'),
        (),
        400,
        None,
        "lone surrogate U+D800",
    ),
    (
        "inspect: more tokens than it takes",
        request("POST", "/v1/inspect", json.dumps({"text": "word " * (INSPECT_TOKENS + 1)}).encode()),
        (),
        413,
        None,
        "--max-inspect-tokens",
    ),
    (
        "inspect: more characters than it takes",
        request("POST", "/v1/inspect", json.dumps({"text": "x" * (16 * INSPECT_TOKENS + 1)}).encode()),
        (),
        413,
        None,
        "characters",
    ),
    (
        "inspect: top_logprobs as a string",
        request("POST", "/v1/inspect", b'{"text": "hello", "top_logprobs": "3"}'),
        (),
        400,
        None,
        "top_logprobs",
    ),
]


@pytest.mark.parametrize("data, chunks, status, param, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_its_status_and_one_line_error(live, data, chunks, status, param, words):
    got, payload = parse(exchange(live[0].port, data, chunks))
    assert got == status, payload
    assert_openai_error(payload)
    message = payload["error"]["message"]
    assert words in message and "\n" not in message, message
    if param is not None:
        assert payload["error"]["param"] == param
    assert live[1].alive


def greedy_text(live, prompt: str, max_tokens: int) -> str:
    status, payload = parse(exchange(live[0].port, completion(prompt=prompt, max_tokens=max_tokens, temperature=0)))
    assert status == 200, payload
    return payload["choices"][0]["text"]


@pytest.mark.parametrize("top_p", [0, 1e-300, 1e-46, 1e-40])  # 0: as OpenAI takes it
def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token(live, top_p):
    status, payload = parse(exchange(live[0].port, completion(max_tokens=12, top_p=top_p)))
    assert status == 200, payload
    assert payload["choices"][0]["text"] == greedy_text(live, PROMPT, 12)
    assert payload["choices"][0]["finish_reason"] == "length" and payload["usage"]["completion_tokens"] == 12


def test_a_neighbours_bad_sampling_leaves_a_running_stream_intact(live, monkeypatch):
    """A stream runs; while its engine is held between two steps, requests join: two whose top_p underflows
    float32 and one whose sampling fails after its first token (top_k=7 raises here). They decode in one
    batch with the stream; only the failing one ends, with an error in its own response."""
    server, engine = live
    alone = greedy_text(live, PROMPT, 60)
    sampling_weights, top_k_7_calls = engine_module.sampling_weights, []

    def failing_for_top_k_7(logits, temperature, top_k, top_p, process=None):
        if top_k == 7:
            top_k_7_calls.append(len(logits))
            if len(top_k_7_calls) > 1:
                raise RuntimeError("sampling blew up for this row")
        return sampling_weights(logits, temperature, top_k, top_p, process)

    monkeypatch.setattr(engine_module, "sampling_weights", failing_for_top_k_7)
    gate, held, batch_sizes, step = threading.Event(), threading.Event(), [], engine.step

    def held_step(batch):
        if batch_sizes:  # the stream's prefill goes through; its decode steps wait for the gate
            held.set()
            gate.wait(30)
        batch_sizes.append(len(batch.tokens))
        return step(batch)

    monkeypatch.setattr(engine, "step", held_step)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as stream:
        stream.sendall(completion(max_tokens=60, temperature=0, stream=True))
        first = stream.recv(1 << 16)
        assert first.startswith(b"HTTP/1.1 200")
        assert held.wait(30)  # the engine is inside the stream's first decode step: the neighbours queue behind it
        with ThreadPoolExecutor(3) as pool:
            neighbours = [
                pool.submit(exchange, server.port, completion(max_tokens=6, top_p=1e-300)),
                pool.submit(exchange, server.port, completion(max_tokens=6, top_p=1e-46, stream=True)),
                pool.submit(exchange, server.port, completion(max_tokens=6, top_k=7)),
            ]
            deadline = time.monotonic() + 30
            while engine.waiting < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.waiting == 3  # all three join at the next step, beside the stream
            gate.set()
            answers = [future.result() for future in neighbours]
        received = first
        while not received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
            part = stream.recv(1 << 16)
            assert part, received[-300:]
            received += part
    assert max(batch_sizes) == 4  # the stream decoded in one batch with its three neighbours
    events = [json.loads(line[6:]) for line in received.decode().split("\r\n") if line.startswith("data: {")]
    assert all("error" not in e for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == alone
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    status, payload = parse(answers[0])
    assert status == 200 and payload["choices"][0]["text"] == greedy_text(live, PROMPT, 6)
    assert answers[1].startswith(b"HTTP/1.1 200") and b'"error"' not in answers[1]
    assert answers[1].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    status, payload = parse(answers[2])
    assert status == 500 and "sampling blew up for this row" in payload["error"]["message"]
    assert payload["error"]["type"] == "server_error"


def run_engine(engine: BatchEngine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list]:
    """Submit `jobs` (one prompt each) before the worker starts, so they share every step; their updates."""

    async def scenario():
        requests = [engine.submit([prompt], params) for prompt, params in jobs]
        engine.start()
        out = []
        for job in requests:
            updates = []
            while not updates or updates[-1].finish_reason is None:
                updates.append(await job.queue.get())
            out.append(updates)
        return out

    try:
        return asyncio.run(scenario())
    finally:
        engine.stop()


def tokens_of(updates) -> list[int]:
    return [t.token for u in updates for t in u.tokens]


def test_a_client_that_leaves_before_its_whole_answer_frees_its_rows(live, monkeypatch, capfd, caplog):
    """A non-streaming request whose client closes the connection while its prompt is in a step: the server
    cancels it (the rows come back at the next step) and answers nobody, with nothing logged as an error."""
    server, engine = live
    gate, held, step = threading.Event(), threading.Event(), engine.step
    cancelled, generated = engine.stats["cancelled"], engine.counters["generation_tokens"]

    def held_step(batch):
        held.set()
        gate.wait(30)
        return step(batch)

    monkeypatch.setattr(engine, "step", held_step)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(completion(max_tokens=200, temperature=0))
        assert held.wait(30)
    deadline = time.monotonic() + 30
    while not all(s.cancelled for s in engine._active) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.waiting == 0
    assert engine.stats["cancelled"] == cancelled + 1
    assert engine.counters["generation_tokens"] - generated < 200  # it stopped long before its max_tokens
    logged = capfd.readouterr().err + "".join(r.getMessage() for r in caplog.records)
    assert "Exception in ASGI application" not in logged


def test_a_row_whose_logits_turn_nan_ends_alone():
    model, tok = tiny_model(block_size=64), Tokenizer.gpt2()
    greedy, seeded = SamplingParams(max_tokens=10, temperature=0), SamplingParams(max_tokens=10, seed=3)
    jobs = [([1, 2, 3], greedy), ([4, 5], seeded), ([6, 7, 8, 9], greedy)]
    expected = [tokens_of(run_engine(BatchEngine(model, tok), [job])[0]) for job in jobs]
    engine = BatchEngine(model, tok)
    step, steps = engine.step, []

    def poisoned(batch):
        logits = step(batch)
        steps.append(len(batch.tokens))
        if len(steps) == 4:
            logits[2] = float("nan")  # the third row's scores break at its fourth token
        return logits

    engine.step = poisoned
    got = run_engine(engine, jobs)
    assert steps[0] == 3  # one batch
    assert [tokens_of(u) for u in got[:2]] == expected[:2] and got[0][-1].finish_reason == "length"
    assert got[2][-1].finish_reason == "error" and "not finite" in got[2][-1].error
    assert tokens_of(got[2]) == expected[2][:3]
    assert engine.stats["failed"] == 1 and engine.stats["finished"] == 2


def test_a_row_whose_sampling_fails_ends_alone_and_seeded_neighbours_keep_their_draws(monkeypatch):
    model, tok = tiny_model(block_size=64), Tokenizer.gpt2()
    jobs = [
        ([1, 2, 3], SamplingParams(max_tokens=8, seed=11, top_p=0.9)),
        ([4, 5], SamplingParams(max_tokens=8, top_k=7)),
        ([6, 7], SamplingParams(max_tokens=8, seed=12, top_k=40)),
    ]
    expected = [tokens_of(run_engine(BatchEngine(model, tok), [job])[0]) for job in (jobs[0], jobs[2])]
    sampling_weights = engine_module.sampling_weights

    def failing(logits, temperature, top_k, top_p, process=None):
        if top_k == 7:
            raise IndexError("index 256 is out of bounds")
        return sampling_weights(logits, temperature, top_k, top_p, process)

    monkeypatch.setattr(engine_module, "sampling_weights", failing)
    got = run_engine(BatchEngine(model, tok), jobs)
    assert [tokens_of(got[0]), tokens_of(got[2])] == expected  # as if the failing row had never been there
    assert got[1] == [got[1][-1]] and got[1][-1].finish_reason == "error" and "index 256" in got[1][-1].error


def test_sampling_weights_guard_rows_that_filtering_empties():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.1, 0.2], [1e31, 2e31, 0.0]])
    for top_p in (1e-300, 1e-46, 0.0):  # 0 in float32: every token's mass before it reaches top_p
        probs = engine_module.sampling_weights(logits[:2], 1.0, None, top_p)
        assert probs.dtype == torch.float32 and probs.tolist() == [[0, 1, 0], [1, 0, 0]]
    probs = engine_module.sampling_weights(logits, 1e-8, None, None)  # scaled past float32's range
    assert torch.isfinite(probs).all() and probs.argmax(-1).tolist() == [1, 0, 1]
    normal = engine_module.sampling_weights(logits[:2], 1.0, 2, 0.9)
    assert torch.allclose(normal.sum(-1), torch.ones(2)) and (normal[0, 0] == 0) and normal[0, 1] > 0


def test_one_client_cannot_hold_the_queue(model_dir):
    """The engine is never started, so accepted requests wait: a client's requests beyond its share get 429,
    and the next free row goes to the client holding the fewest."""
    server, engine = serve_in_thread(model_dir, lifespan="off", max_queue=64, max_client_choices=6)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(exchange, server.port, completion(n=4), (), 2)
            deadline = time.monotonic() + 30
            while engine.waiting < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, payload = parse(exchange(server.port, completion(n=3)))
            assert status == 429 and payload["error"]["code"] == "too_many_choices"
            message = payload["error"]["message"]
            assert "already has 4 choices" in message and "at most 6" in message and "--max-client-choices" in message
            with pytest.raises(TimeoutError):
                waiting.result()
        deadline = time.monotonic() + 30  # the client gave up: its waiting choices leave the queue and its share
        while (engine.waiting or engine.held("127.0.0.1")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.waiting == 0 and engine.held("127.0.0.1") == 0
    finally:
        server.close()

    async def fairness():
        engine = BatchEngine(tiny_model(block_size=32), Tokenizer.gpt2(), max_num_seqs=3, max_client_choices=0)
        hog = engine.submit([[1, 2]], SamplingParams(max_tokens=1), n=5, client="10.0.0.1")
        engine.submit([[3]], SamplingParams(max_tokens=1), n=2, client="10.0.0.2")
        with engine._cond:
            engine._admit(engine.max_batched_tokens, engine.max_batched_tokens)
        joining = [(s.request is hog, s.index) for s in engine._active]
        return joining, engine.held("10.0.0.1"), engine.held("10.0.0.2")

    joining, hog_held, other_held = asyncio.run(fairness())
    assert joining == [(True, 0), (False, 0), (True, 1)]  # the other client's first choice is not last in line
    assert (hog_held, other_held) == (5, 2)


def test_client_choices_are_released_when_their_sequences_end():
    engine = BatchEngine(tiny_model(block_size=32), Tokenizer.gpt2(), max_client_choices=4)
    run_engine(engine, [([1, 2], SamplingParams(max_tokens=3, temperature=0))] * 2)
    assert engine.held("") == 0 and not engine._held


def slow(port: int, data: bytes) -> bytes:
    """Send part of a request, then nothing: the server's answer (it must not wait forever)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while part := sock.recv(1 << 16):
            answer += part
        return answer


def test_slow_clients_get_408_and_idle_connections_close(model_dir):
    server, _ = serve_in_thread(model_dir, app_kwargs={"body_timeout": 0.5}, connection={"header_timeout": 0.5})
    try:
        status, payload = parse(slow(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Le"))
        assert status == 408 and "headers did not arrive within 0.5 seconds" in payload["error"]["message"]
        status, payload = parse(slow(server.port, BIG_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model": '))
        assert status == 408 and "body did not arrive within 0.5 seconds" in payload["error"]["message"]
        assert slow(server.port, b"") == b""  # a connection that sends nothing is closed
        status, payload = parse(exchange(server.port, completion(max_tokens=2)))
        assert status == 200 and payload["usage"]["completion_tokens"] == 2
    finally:
        server.close()


@pytest.mark.parametrize(
    "option, words",
    [
        (["--device", "cpu:1"], "cpu takes no index"),
        (["--device", "gpu"], "is not a device"),
        (["--port", "70000"], "70000 is more than 65,535"),
        (["--port", "-1"], "-1 is less than 0"),
        (["--max-batch", "0"], "0 is less than 1"),
        (["--max-queue", "many"], "'many' is not an integer"),
        (["--max-body-bytes", "0"], "0 is less than 1"),
        (["--max-request-choices", "0"], "0 is less than 1"),
        (["--max-client-choices", "-1"], "-1 is less than 0"),
        (["--max-inspect-tokens", "0"], "0 is less than 1"),
        (["--header-timeout", "nan"], "not a finite number"),
        (["--body-timeout", "0"], "not a finite number"),
        (["--keep-alive-timeout", "0"], "not a finite number"),
        (["--shutdown-timeout", "-1"], "not a finite number"),
        (["--max-connections", "0"], "0 is less than 1"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_serve_options_are_checked_where_declared(capsys, option, words):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "nowhere", *option])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err


def test_the_per_client_address_is_the_peer_not_a_forwarded_header():
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 by default; the client limits must not (a local client
    could pose as many)."""
    from gptwo.serve.connection import uvicorn_config

    assert uvicorn_config(lambda scope, receive, send: None).proxy_headers is False
