"""The OpenAI-compatible API, checked with the official `openai` client against a live server on 127.0.0.1."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import Message

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_testing import serve_in_thread

from gptwo.generate import complete, generate
from gptwo.weights import load_model

PROMPT = "Hello there, how are you"


@pytest.fixture(scope="module")
def live(model_dir):
    server, engine = serve_in_thread(model_dir, max_num_seqs=16, max_queue=256)
    yield server, engine
    server.close()


@pytest.fixture(scope="module")
def offline(model_dir):
    return load_model(model_dir, device="cpu")


def post(url: str, body: bytes, timeout: float = 30) -> tuple[int, dict, Message]:
    """Raw POST: (status, parsed JSON body, headers)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def assert_openai_error(payload: dict) -> None:
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]


def test_models_health_and_openapi(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, health = get(live[0].url + "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny"
    assert health["dtype"] == "fp32" and health["quantize"] is None
    status, schema = get(live[0].url + "/openapi.json")
    assert (
        status == 200
        and "/v1/completions" in schema["paths"]
        and "CompletionRequest" in schema["components"]["schemas"]
    )


def test_tokenize_counts_a_prompt_as_completions_encodes_it(live, offline):
    """POST /tokenize (vLLM's shape) gives the prompt's ids and the context, so a page can fit max_tokens to it."""
    _, tok = offline
    for prompt, ids in ((PROMPT, tok.encode(PROMPT)), ("", [tok.eot_token]), ([5, 6, 7], [5, 6, 7])):
        status, body, _ = post(live[0].url + "/tokenize", json.dumps({"model": "tiny", "prompt": prompt}).encode())
        assert status == 200 and body == {"count": len(ids), "max_model_len": 512, "tokens": ids}
    status, body, _ = post(live[0].url + "/tokenize", json.dumps({"model": "other", "prompt": "x"}).encode())
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = post(live[0].url + "/tokenize", json.dumps({"prompt": 3}).encode())
    assert status == 400 and body["error"]["param"].startswith("prompt")


def test_greedy_completion_equals_offline_generate(client, offline):
    model, tok = offline
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    ids = torch.tensor([tok.encode(PROMPT)])
    expected = generate(model, ids, 24, temperature=0)[0, ids.shape[1] :].tolist()
    assert result.object == "text_completion"
    assert result.choices[0].text == tok.decode(expected) == complete(model, tok, [PROMPT], 24, temperature=0)[0]
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(tok.encode(PROMPT)), 24)
    assert result.usage.total_tokens == result.usage.prompt_tokens + 24


def test_stream_sends_chunks_that_add_up_to_the_plain_answer(live, client):
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    # on the wire: server-sent events ending with [DONE]
    request = urllib.request.Request(
        live[0].url + "/v1/completions",
        data=json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n_choices_are_seeded_and_reproducible(client, offline):
    model, tok = offline
    ask = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=7)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # each choice has its own random stream
    assert texts == [c.text for c in again.choices]
    assert texts[0] == complete(model, tok, [PROMPT], 12, temperature=1.0, seed=7)[0]  # choice j uses seed + j
    assert first.usage.completion_tokens == 36 and first.usage.prompt_tokens == len(tok.encode(PROMPT))


def test_prompt_as_strings_and_token_ids(client, offline):
    _, tok = offline
    prompts = [PROMPT, "The"]
    result = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0, n=2)
    texts = [c.text for c in result.choices]
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3]
    by_ids = client.completions.create(
        model="tiny", prompt=[tok.encode(p) for p in prompts], max_tokens=8, temperature=0
    )
    one_ids = client.completions.create(model="tiny", prompt=tok.encode("The"), max_tokens=8, temperature=0)
    assert [c.text for c in by_ids.choices] == [texts[0], texts[2]] and one_ids.choices[0].text == texts[2]


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = full[10:14]
    expected = full[: full.find(stop)]
    result = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "never-seen"]
    )
    assert result.choices[0].text == expected and result.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(token i | tokens before i) for i >= 1, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0]
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_logprobs_are_the_models_own(client, offline):
    model, tok = offline
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = result.choices[0].logprobs
    prompt = tok.encode(PROMPT)
    generated = generate(model, torch.tensor([prompt]), 6, temperature=0)[0, len(prompt) :].tolist()
    assert lp.tokens == [tok.decode([t]) for t in generated]
    expected = reference_logprobs(model, prompt + generated)[len(prompt) - 1 :]
    assert torch.allclose(torch.tensor(lp.token_logprobs), expected, atol=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy picks the top one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    streamed = [
        c.choices[0].logprobs
        for c in client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True
        )
    ]
    assert sum((part.tokens for part in streamed), []) == lp.tokens
    assert sum((part.text_offset for part in streamed), []) == lp.text_offset


def test_top_k_extension_limits_the_choice(client, offline):
    model, tok = offline
    prompt = tok.encode(PROMPT)
    with torch.no_grad():
        allowed = set(model(torch.tensor([prompt]))[0, -1].topk(2).indices.tolist())
    result = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=1, temperature=2.0, n=40, seed=1, logprobs=0, extra_body={"top_k": 2}
    )
    assert {c.logprobs.tokens[0] for c in result.choices} == {tok.decode([t]) for t in allowed}


def test_echo_returns_the_prompt_and_its_logprobs(client, offline):
    model, tok = offline
    prompt = tok.encode(PROMPT)
    scored = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == PROMPT and choice.logprobs.tokens == [tok.decode([t]) for t in prompt]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert torch.allclose(
        torch.tensor(choice.logprobs.token_logprobs[1:]), reference_logprobs(model, prompt), atol=1e-4
    )
    assert scored.usage.completion_tokens == 0
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    echoed = (
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, echo=True).choices[0].text
    )
    assert echoed == PROMPT + plain


def test_concurrent_requests_are_batched_and_match_unbatched(model_dir):
    server, engine = serve_in_thread(model_dir, max_num_seqs=8)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        prompts = [PROMPT, "The", "Once upon a time", "A long, long way from home", "1 2 3", "Why?"]

        def ask(i: int) -> str:
            return (
                client.completions.create(model="tiny", prompt=prompts[i], max_tokens=40 + 7 * i, temperature=0)
                .choices[0]
                .text
            )

        alone = [ask(i) for i in range(len(prompts))]
        assert engine.stats["peak_batch"] == 1
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, range(len(prompts))))
        assert together == alone
        assert engine.stats["peak_batch"] >= 3  # they really ran as one batch
    finally:
        server.close()


def test_bad_requests_get_openai_errors(live, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=600)
    assert "maximum context length is 512" in err.value.message
    for bad in (
        dict(temperature=5),
        dict(n=0),
        dict(logprobs=50),
        dict(top_p=1.5),
        dict(presence_penalty=3.0),
        dict(frequency_penalty=-2.5),
        dict(best_of=0),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, **bad)
        assert_openai_error(err.value.response.json())
        assert err.value.response.json()["error"]["param"] == next(iter(bad))
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert err.value.response.json()["error"]["code"] == "model_not_found"
    url = live[0].url + "/v1/completions"
    for body in (
        b"{not json",
        b"[1, 2]",
        b'{"model": "tiny", "prompt": []}',
        b'{"model": "tiny", "prompt": [[]]}',
        b'{"model": "tiny", "prompt": [99999999]}',
        b'{"model": "tiny", "prompt": [true]}',
    ):
        status, payload, _ = post(url, body)
        assert status == 400, body
        assert_openai_error(payload)
    status, payload, _ = post(url, json.dumps({"model": "tiny", "prompt": "x" * 70_000}).encode())
    assert status == 413 and payload["error"]["code"] == "request_too_large"
    status, payload = get(live[0].url + "/no/such/route")
    assert status == 404
    assert_openai_error(payload)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(-3, 3) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
FIELDS = [
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "stream",
    "logprobs",
    "echo",
    "stream_options",
    "best_of",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({"model": st.just("tiny")}, optional={name: JSON for name in FIELDS}))
def test_no_input_crashes_the_server(live, body):
    request = urllib.request.Request(
        live[0].url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    assert status in (200, 400), (body, raw)
    if status == 400:
        assert_openai_error(json.loads(raw))
    elif body.get("stream") is True:
        assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw
    else:
        assert json.loads(raw)["object"] == "text_completion"
    assert get(live[0].url + "/health")[0] == 200


def test_disconnected_clients_free_their_rows(live, client):
    server, engine = live
    cancelled = engine.stats["cancelled"]
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=480, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    with pytest.raises(OSError):  # a plain request whose client gives up (timeout)
        urllib.request.urlopen(
            urllib.request.Request(
                server.url + "/v1/completions",
                data=json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "n": 16}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=0.3,
        )
    deadline = time.monotonic() + 20
    while (
        engine.running or engine.stats["cancelled"] < cancelled + 17 or engine.held("127.0.0.1")
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0 and engine.stats["cancelled"] == cancelled + 17
    assert engine.held("127.0.0.1") == 0  # nothing of theirs counts against the client's limit any more


def test_a_full_queue_answers_429(model_dir):
    server, engine = serve_in_thread(model_dir, lifespan="off", max_queue=1)  # engine not started: requests wait
    try:
        url = server.url + "/v1/completions"
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, json.dumps({"model": "tiny", "prompt": PROMPT}).encode(), 1)
            deadline = time.monotonic() + 10
            while engine.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, payload, headers = post(url, json.dumps({"model": "tiny", "prompt": PROMPT}).encode())
            assert status == 429 and headers["Retry-After"] == "1"
            assert_openai_error(payload)
            with pytest.raises(TimeoutError):
                first.result()
    finally:
        server.close()


def test_a_failing_model_step_fails_only_its_requests(model_dir):
    server, engine = serve_in_thread(model_dir)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        engine.model.hidden_states = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("device fell over"))
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
        assert err.value.response.json()["error"]["type"] == "server_error"
        with pytest.raises(openai.APIError, match="device fell over"):
            list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, stream=True))
        del engine.model.hidden_states  # the class's again
        assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4).usage.completion_tokens == 4
    finally:
        server.close()
