"""Limits on what one request may ask for: stop strings, unknown fields, text that is not text, and every
field that grows with the input. Checked on a live server with raw HTTP and the official `openai` client."""

from __future__ import annotations

import json
import random
import string
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from serve_testing import serve_in_thread
from test_serve_api import PROMPT, assert_openai_error, post, reference_logprobs

from gptwo.text import MAX_STOP_CHARS, MAX_STOPS


@pytest.fixture(scope="module")
def live(model_dir):
    server, engine = serve_in_thread(model_dir, app_kwargs={"max_body_bytes": 1 << 20}, max_num_seqs=16, max_queue=64)
    yield server, engine
    server.close()


def complete_raw(live, **fields) -> tuple[int, dict]:
    status, payload, _ = post(
        live[0].url + "/v1/completions", json.dumps({"model": "tiny", "prompt": PROMPT, **fields}).encode()
    )
    return status, payload


def random_text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(chars))


def test_a_200kb_stop_string_is_a_400(live, client):
    for stream in (False, True):
        status, payload = complete_raw(live, stop=["\n", "x" * 200_000], stream=stream)
        assert status == 400
        assert_openai_error(payload)
        error = payload["error"]
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            "stop",
            "string_above_max_length",
        )
        assert f"at most {MAX_STOP_CHARS}" in error["message"] and "200000" in error["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, stop="y" * (MAX_STOP_CHARS + 1))
    assert err.value.response.json()["error"]["code"] == "string_above_max_length"
    status, payload = complete_raw(live, stop=["a"] * (MAX_STOPS + 1))
    assert (
        status == 400 and payload["error"]["param"] == "stop" and payload["error"]["code"] == "array_above_max_length"
    )


def test_maximal_stop_strings_match_exactly_and_others_still_complete(live, client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=500, temperature=0).choices[0].text
    assert len(full) > 300 + MAX_STOP_CHARS
    stop = full[300 : 300 + MAX_STOP_CHARS]  # a maximal stop string that the text reaches
    expected = full[: full.find(stop)]
    stops = [random_text(MAX_STOP_CHARS, seed) for seed in range(MAX_STOPS - 1)] + [stop]
    short = {"model": "tiny", "prompt": "The", "max_tokens": 8, "temperature": 0}
    alone = client.completions.create(**short).choices[0].text
    with ThreadPoolExecutor(2) as pool:
        long_job = pool.submit(
            client.completions.create, model="tiny", prompt=PROMPT, max_tokens=500, temperature=0, stop=stops
        )
        short_job = pool.submit(client.completions.create, **short)
        stopped, beside = long_job.result(), short_job.result()
    assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
    assert beside.choices[0].text == alone
    chunks = [
        c.choices[0]
        for c in client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=500, temperature=0, stop=stops, stream=True
        )
    ]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_unknown_fields_are_named(live, client):
    for field, meant in (("max_token", "max_tokens"), ("temprature", "temperature"), ("frobnicate", None)):
        status, payload = complete_raw(live, **{field: 5})
        assert status == 400, field
        assert_openai_error(payload)
        error = payload["error"]
        assert (error["param"], error["code"]) == (field, "unknown_parameter") and f"'{field}'" in error["message"]
        assert (f"did you mean '{meant}'" in error["message"]) if meant else "did you mean" not in error["message"]
    status, payload = complete_raw(live, stream=True, stream_options={"include_usag": True})
    assert status == 400 and payload["error"]["param"] == "stream_options.include_usag"
    with pytest.raises(openai.BadRequestError, match="max_token"):
        client.completions.create(model="tiny", prompt=PROMPT, extra_body={"max_token": 3})
    # every argument the openai client knows, plus the documented top_k extension, is accepted
    everything = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        best_of=2,
        echo=False,
        frequency_penalty=0,
        logit_bias={},
        logprobs=1,
        max_tokens=3,
        n=2,
        presence_penalty=0,
        seed=1,
        stop=["\n\n"],
        suffix=None,
        temperature=0.5,
        top_p=0.9,
        user="u",
        extra_body={"top_k": 5},
    )
    assert len(everything.choices) == 2
    streamed = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert streamed[-1].usage.completion_tokens == 3


@pytest.mark.parametrize(
    "body",
    [
        '{"model": "tiny", "prompt": "\\ud800", "max_tokens": 3}',
        '{"model": "tiny", "prompt": "ok \\udfff", "max_tokens": 3, "stream": true}',
        '{"model": "tiny", "prompt": ["fine", "\\ud83d then"], "max_tokens": 3}',
        '{"model": "tiny", "prompt": "fine", "stop": ["\\ud800"], "max_tokens": 3}',
    ],
)
def test_a_lone_surrogate_is_a_400(live, body):
    status, payload, _ = post(live[0].url + "/v1/completions", body.encode())
    assert status == 400, payload
    assert_openai_error(payload)
    assert "lone surrogate" in payload["error"]["message"] and payload["error"]["code"] == "invalid_text"
    assert payload["error"]["param"] in ("prompt", "stop")
    # an error that quotes a lone surrogate still renders (as JSON's \ud800 escape)
    status, payload, _ = post(live[0].url + "/v1/completions", b'{"model": "\\ud800", "prompt": "fine"}')
    assert status == 404 and "\ud800" in payload["error"]["message"]
    # a surrogate pair is a real character and stays fine
    status, _, _ = post(
        live[0].url + "/v1/completions", b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}'
    )
    assert status == 200


def test_every_field_that_grows_with_the_input_is_bounded(live, client):
    _, engine = live
    limits = [
        ({"prompt": [""] * (engine.max_queue + 1)}, "n"),  # more prompts than the queue holds: refused before encoding
        ({"prompt": ["a"] * 8, "n": engine.max_queue // 8 + 1}, "n"),
        ({"n": 129}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"prompt": [0] * 600}, "max_tokens"),  # prompt + max_tokens over the 512-token context
    ]
    for fields, param in limits:
        status, payload = complete_raw(live, **fields)
        assert status == 400, fields
        assert payload["error"]["param"] == param, (fields, payload)


def test_echo_with_logprobs_scores_a_prompt_once_for_all_choices(live, client):
    model, tok = live[1].model, live[1].tokenizer
    prompt = tok.encode(PROMPT)
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, n=8)
    expected = reference_logprobs(model, prompt)
    assert len(result.choices) == 8
    for choice in result.choices:
        assert choice.text == PROMPT and choice.logprobs.token_logprobs[0] is None
        assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs[1:]), expected, atol=1e-4)
