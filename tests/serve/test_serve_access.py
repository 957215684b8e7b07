"""Who may use a server: the optional API key, CORS origins; and the weights' dtype. Live servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from serve_testing import LiveServer, serve_in_thread
from test_serve_api import PROMPT, assert_openai_error

from gptwo.errors import GptwoError
from gptwo.generate import complete
from gptwo.infer import native
from gptwo.infer.prepare import prepared_settings
from gptwo.serve.app import parse_origins, resolve_dtype
from gptwo.weights import load_model

KEY = "sk-test-0123456789"
GOOD, EVIL = "http://good.test:3000", "https://evil.test"


def request(
    url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None
) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one raw HTTP request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def test_an_api_key_guards_every_v1_route_and_tokenize(model_dir):
    server, _ = serve_in_thread(model_dir, app_kwargs={"api_key": KEY})
    try:
        completion = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"},
        ):
            for method, route, body in (
                ("GET", "/v1/models", None),
                ("POST", "/v1/completions", completion),
                ("GET", "/v1/nothing", None),
                ("POST", "/v1/inspect", {"text": PROMPT}),
                ("POST", "/tokenize", {"prompt": PROMPT}),
            ):
                status, got, raw = request(server.url + route, method, body, headers)
                assert status == 401, (headers, route)
                assert_openai_error(json.loads(raw))
                assert json.loads(raw)["error"]["code"] == "invalid_api_key" and got["www-authenticate"] == "Bearer"
        status, _, raw = request(server.url + "/v1/completions", "POST", completion, {"Authorization": f"bearer {KEY}"})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
        status, _, raw = request(
            server.url + "/v1/inspect", "POST", {"text": PROMPT, "attention": False}, {"Authorization": f"Bearer {KEY}"}
        )
        assert status == 200 and json.loads(raw)["tokens"]
        for open_route in ("/health", "/", "/openapi.json"):  # the page must load to ask for the key
            assert request(server.url + open_route)[0] == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4).usage.completion_tokens == 4
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).completions.create(
                model="tiny", prompt=PROMPT, max_tokens=4
            )
        with pytest.raises(openai.AuthenticationError):  # checked before the body is read: a big body gets 401, not 413
            openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).completions.create(
                model="tiny", prompt="x" * 100_000
            )
    finally:
        server.close()


def test_cors_headers_only_for_allowed_origins(model_dir):
    server, _ = serve_in_thread(model_dir, app_kwargs={"allowed_origins": [GOOD], "api_key": KEY})
    plain, _ = serve_in_thread(model_dir)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        status, headers, _ = request(server.url + "/v1/models", headers={"Origin": GOOD, **auth})
        assert status == 200 and headers["access-control-allow-origin"] == GOOD
        status, headers, _ = request(server.url + "/v1/models", headers={"Origin": EVIL, **auth})
        assert status == 200 and "access-control-allow-origin" not in headers
        status, headers, _ = request(
            server.url + "/v1/models", headers={"Origin": GOOD}
        )  # a refusal still carries it, so the page can read why
        assert status == 401 and headers["access-control-allow-origin"] == GOOD
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        status, headers, _ = request(server.url + "/v1/completions", "OPTIONS", headers={"Origin": GOOD, **preflight})
        assert (
            status == 200 and headers["access-control-allow-origin"] == GOOD
        )  # no key needed: browsers preflight without it
        assert (
            "POST" in headers["access-control-allow-methods"]
            and "authorization" in headers["access-control-allow-headers"].lower()
        )
        status, headers, _ = request(server.url + "/v1/completions", "OPTIONS", headers={"Origin": EVIL, **preflight})
        assert status == 400 and "access-control-allow-origin" not in headers
        for origin in (GOOD, EVIL):  # by default no origin is allowed
            status, headers, _ = request(plain.url + "/v1/models", headers={"Origin": origin})
            assert status == 200 and not any(name.startswith("access-control-") for name in headers)
            status, headers, _ = request(
                plain.url + "/v1/completions", "OPTIONS", headers={"Origin": origin, **preflight}
            )
            assert status != 200 and "access-control-allow-origin" not in headers
    finally:
        server.close()
        plain.close()


def test_origins_are_parsed_and_checked():
    assert parse_origins([f"{GOOD}, {EVIL}", "http://localhost:8080"]) == [GOOD, EVIL, "http://localhost:8080"]
    assert parse_origins(["*"]) == ["*"] and parse_origins([]) == []
    for bad in ("localhost:3000", "http://good.test/", "http://good.test/app", "ftp://x"):
        with pytest.raises(GptwoError, match="is not an origin"):
            parse_origins([bad])


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, native):
    import gptwo.runtime

    monkeypatch.setattr(gptwo.runtime, "native_bf16", lambda: native)
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # an explicit choice is never overridden


def test_dtype_option(model_dir):
    cpu = torch.device("cpu")
    assert [resolve_dtype(name, cpu) for name in ("fp32", "bf16", "fp16")] == [
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ]
    with pytest.raises(GptwoError, match="unknown dtype"):
        resolve_dtype("fp8", cpu)
    server, engine = serve_in_thread(model_dir, dtype=torch.bfloat16)
    try:
        # bf16 weights; the KV cache in bf16 on the torch step, fp32 on the native one (its activations are fp32)
        native_step = isinstance(getattr(engine.step, "native", None), native.NativeStep)
        kv_dtype = torch.float32 if native_step else torch.bfloat16
        assert engine.model.lm_head.weight.dtype == torch.bfloat16 and engine.cache.k.dtype == kv_dtype
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        served = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
        model, tok = load_model(model_dir, device="cpu", dtype=torch.bfloat16)
        assert served == complete(model, tok, [PROMPT], 12, temperature=0)[0]
    finally:
        server.close()


@pytest.mark.skipif(native.library() is None, reason="the native kernels do not build on this machine")
def test_streamed_requests_decode_natively_and_answer_as_the_model_does(model_dir):
    from gptwo.serve import BatchEngine, create_app
    from gptwo.serve.app import load_served_model

    model, tokenizer = load_served_model(
        model_dir, torch.device("cpu"), torch.float32, None
    )  # as `gptwo serve` loads it
    engine = BatchEngine(model, tokenizer)
    assert isinstance(engine.step.native, native.NativeStep)  # a few tokens a step: one C call
    calls = []
    step = engine.step
    engine.step = lambda batch: (calls.append(len(batch.tokens)), step(batch))[1]
    native_calls, native_step = [], step.native
    step.native = lambda batch: (native_calls.append(batch.num_tokens), native_step(batch))[1]
    server = LiveServer(create_app(engine, "tiny", max_body_bytes=64 * 1024))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
        served = "".join(chunk.choices[0].text for chunk in stream)
        reference, tok = load_model(model_dir, device="cpu")  # plain fp32 on torch's matmuls
        assert served == complete(reference, tok, [PROMPT], 24, temperature=0)[0]
        assert len(calls) == 24  # the prefill (with the first token), then 23 decode steps...
        assert native_calls.count(1) == 23  # ...each one C call
        prompts = [PROMPT, "Hi", "A longer prompt than the others, to make the batch ragged"]
        choices = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=0).choices
        assert [c.text for c in sorted(choices, key=lambda c: c.index)] == [
            complete(reference, tok, [p], 10, temperature=0)[0] for p in prompts
        ]
        assert max(calls) == 3  # the three prompts ran as one ragged batch
    finally:
        server.close()


def test_int8_server_answers_as_the_int8_model_does(model_dir):
    server, engine = serve_in_thread(model_dir, quantize="int8")
    try:
        assert prepared_settings(engine.model)["quantize"] == "int8"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        choices = client.completions.create(model="tiny", prompt=[PROMPT, "Hi"], max_tokens=12, temperature=0).choices
        model, tok = load_model(model_dir, device="cpu", quantize="int8")
        assert [c.text for c in sorted(choices, key=lambda c: c.index)] == [
            complete(model, tok, [p], 12, temperature=0)[0] for p in (PROMPT, "Hi")
        ]
    finally:
        server.close()


def test_gptwo_serve_with_key_from_env_origins_and_dtype(model_dir):
    cmd = [
        sys.executable,
        "-m",
        "gptwo.cli",
        "serve",
        "--model",
        model_dir,
        "--port",
        "0",
        "--served-model-name",
        "tiny",
        "--allowed-origins",
        f"{GOOD},http://other.test",
        "--quantize",
        "int8",
        "--dtype",
        "bf16",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "GPTWO_API_KEY": KEY})
    try:
        url, deadline = None, time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            found = re.search(
                r"serving tiny at (http://127\.0\.0\.1:\d+) .*cpu, bf16, int8 weights; API key required", line
            )
            url = found and found.group(1)
        assert url
        while request(url + "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert request(url + "/v1/models")[0] == 401
        status, headers, _ = request(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}", "Origin": GOOD})
        assert status == 200 and headers["access-control-allow-origin"] == GOOD
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    for flags, message in (
        (["--allowed-origins", "localhost:3000"], "--allowed-origins 'localhost:3000' is not an origin"),
        (["--api-key", ""], "--api-key is empty"),
    ):
        bad = subprocess.run([*cmd[:-4], *flags], capture_output=True, text=True, timeout=120, check=False)
        assert (
            bad.returncode == 2
            and bad.stderr.startswith(f"error: {message}")
            and len(bad.stderr.strip().splitlines()) == 1
        ), bad.stderr
