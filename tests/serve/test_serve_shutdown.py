"""Clean restarts and slow clients: SIGTERM drains the server (new requests 503, running ones finish or end
well-formed, exit 0); connections beyond --max-connections close the longest-idle one or get 503; idle
keep-alive connections close after --keep-alive-timeout."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from serve_testing import LiveServer, save_tiny_model

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.cli import main
from gptwo.serve import BatchEngine, create_app
from gptwo.serve.connection import RESERVED_FDS, file_limit
from gptwo.weights import save_pretrained

GPTWO = [sys.executable, "-m", "gptwo.cli"]


def _slow_model(directory: str) -> None:
    """GPT-2's vocabulary on 256 wide rows: a few ms a token, so 900 tokens outlast a 1 s shutdown timeout."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=2, n_head=4, n_embd=256))
    save_pretrained(model.eval(), directory, tokenizer=Tokenizer.gpt2())


def _start(model_dir: str, *options: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*GPTWO, "serve", "--model", model_dir, "--port", "0", *options], stderr=subprocess.PIPE, text=True
    )
    url, deadline, seen = None, time.monotonic() + 90, []
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stderr.readline()
        seen.append(line)
        found = re.search(r"serving \S+ at http://127\.0\.0\.1:(\d+)", line)
        url = found and found.group(1)
    assert url, "".join(seen)
    return proc, url


def _post(port: int, body: dict, timeout: float = 60) -> tuple[int, dict, str]:
    """Status, headers and the whole body of POST /v1/completions (a stream is read to its end)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    for _ in range(100):  # the log line comes just before uvicorn accepts connections
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, text


def _first_event(port: int, body: dict, out: dict, started: threading.Event) -> None:
    """Stream `body`, set `started` at its first chunk, and keep the whole stream in out["text"]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    out["status"], chunks = response.status, []
    while line := response.readline():
        chunks.append(line.decode())
        if line.startswith(b"data: {") and b'"choices"' in line:
            started.set()
    out["text"] = "".join(chunks)
    started.set()


def _events(text: str) -> list:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_sigterm_drains_then_ends_every_request_well_formed_and_exits_0(tmp_path):
    _slow_model(str(tmp_path / "slow"))
    proc, port = _start(str(tmp_path / "slow"), "--max-num-seqs", "1", "--shutdown-timeout", "1")
    port = int(port)
    try:
        long = {"model": "slow", "prompt": "Hello", "max_tokens": 900, "temperature": 0}
        running, queued_stream, queued = {}, {}, {}
        started = threading.Event()
        threads = [threading.Thread(target=_first_event, args=(port, {**long, "stream": True}, running, started))]
        threads[0].start()
        assert started.wait(60), "the stream never started"
        # two more behind it (one row): they wait in the queue
        waiting = threading.Event()
        threads.append(
            threading.Thread(target=_first_event, args=(port, {**long, "stream": True}, queued_stream, waiting))
        )
        threads.append(
            threading.Thread(target=lambda: queued.update(zip(("status", "headers", "text"), _post(port, long))))
        )
        for thread in threads[1:]:
            thread.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # draining: still listening, but admitting nothing
        status, headers, text = _post(port, {**long, "max_tokens": 1})
        assert status == 503 and headers.get("retry-after") == "1", (status, text)
        assert json.loads(text)["error"]["code"] == "shutting_down"
        health = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        health.request("GET", "/health")
        answer = health.getresponse()
        assert answer.status == 503 and json.loads(answer.read())["status"] == "draining"
        for thread in threads:
            thread.join(60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read()
    assert "Traceback" not in log, log
    # the running stream was cut after the timeout: its tokens so far, an error event, then [DONE]
    for stream in (running, queued_stream):
        assert stream["status"] == 200
        events = _events(stream["text"])
        assert events[-1] == "[DONE]", stream["text"][-500:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "shutting_down" and "shutting down" in error["message"]
    assert sum('"choices"' in e for e in _events(running["text"])) > 1  # it had streamed tokens before the end
    # the waiting non-streaming request: a JSON 503 that says to send it again
    assert queued["status"] == 503 and queued["headers"].get("retry-after") == "1"
    assert json.loads(queued["text"])["error"]["code"] == "shutting_down"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("tiny") / "tiny")
    save_tiny_model(directory)
    return directory


def _server(model_dir: str, **connection) -> LiveServer:
    from gptwo.weights import load_model

    model, tokenizer = load_model(model_dir, device="cpu")
    return LiveServer(create_app(BatchEngine(model, tokenizer), "tiny"), **connection)


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_connections_beyond_the_cap_close_the_idle_ones_and_a_request_is_still_served(model_dir):
    server = _server(model_dir, max_connections=4)
    idle = []
    try:
        for _ in range(12):  # idle clients: connected, nothing sent
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
            time.sleep(0.02)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/v1/models")
        answer = conn.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["data"][0]["id"] == "tiny"
        conn.close()
        closed = [_closed_by_server(sock, 2.0 if i == 0 else 0.2) for i, sock in enumerate(idle)]
        # the oldest were closed to make room; at most 3 of them (4 less the request's) are still open
        assert closed[0] and sum(closed) >= len(idle) - 3, closed
        # connections in a request (a head half sent) are not closed: beyond the cap a new one gets 503
        busy = []
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            busy.append(sock)
            time.sleep(0.05)
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.settimeout(10)
        reply = extra.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 503") and "retry-after: 1" in reply.lower(), reply
        assert '"code": "too_many_connections"' in reply
        extra.close()
        assert not any(_closed_by_server(sock, 0.1) for sock in busy)  # still waiting for their heads
        for sock in busy:
            sock.close()
    finally:
        for sock in idle:
            sock.close()
        server.close()


def test_an_idle_keep_alive_connection_closes_after_the_keep_alive_timeout(model_dir):
    server = _server(model_dir, timeout_keep_alive=0.5)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/v1/models")
        answer = conn.getresponse()
        assert answer.status == 200 and answer.getheader("connection") != "close"
        answer.read()
        sock = conn.sock  # kept alive for the next request
        assert not _closed_by_server(sock, 0.1)
        assert _closed_by_server(sock, 5.0)
        sock.close()
    finally:
        server.close()


def test_max_connections_must_fit_the_file_limit(capsys):
    too_many = file_limit() - RESERVED_FDS + 1
    assert main(["serve", "--model", "nowhere", "--max-connections", str(too_many)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "ulimit -n" in err, err
