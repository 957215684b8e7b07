"""Sampling controls and vLLM's extension keys on /v1/completions, against a live server on 127.0.0.1: vLLM's
benchmark client (its request-building, same JSON keys), the `openai` client, each control against a reference
computed on the logits with transformers' processors (tests/sampling_reference.py), best_of, and the 400s."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest
from sampling_reference import reference_greedy
from serve_testing import serve_in_thread

from gptwo import Tokenizer
from gptwo.weights import load_model

PROMPT = "The cat sat on the mat and the dog"
TOKENIZER = Tokenizer.gpt2()
EOT = TOKENIZER.eot_token


@pytest.fixture(scope="module")
def live(model_dir):
    server, engine = serve_in_thread(model_dir, max_num_seqs=32, max_queue=256)
    yield server, engine
    server.close()


@pytest.fixture(scope="module")
def offline(model_dir):
    return load_model(model_dir, device="cpu")[0]


def post(url: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---- vLLM's benchmark client: vllm/benchmarks/lib/endpoint_request_func.py, async_request_openai_completions
async def vllm_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, output_len: int) -> dict:
    """The request vLLM's benchmark sends (`vllm bench serve --ignore-eos`, default greedy extra_body), read
    as it reads the stream (SSE messages split on blank lines, `data:` prefix, usage from the last chunk)."""
    payload = {
        "model": model,
        "prompt": prompt,
        "repetition_penalty": 1.0,
        "max_tokens": output_len,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payload["ignore_eos"] = True  # _update_payload_common with --ignore-eos
    payload.update({"temperature": 0.0})  # its extra_body: sampling parameters, greedy unless given
    out = {"success": False, "text": "", "output_tokens": None, "chunks": []}
    async with session.post(url=url, json=payload, headers={"Authorization": "Bearer none"}) as response:
        if response.status != 200:
            out["error"] = await response.text()
            return out
        buffer, first = "", False
        async for chunk_bytes in response.content.iter_any():
            buffer += chunk_bytes.decode("utf-8")
            while "\n\n" in buffer:
                message, buffer = buffer.split("\n\n", 1)
                for line in message.strip().splitlines():
                    if not line.startswith("data:"):
                        continue
                    chunk = line.removeprefix("data:").strip()
                    if chunk == "[DONE]":
                        continue
                    data = json.loads(chunk)
                    out["chunks"].append(data)
                    if choices := data.get("choices"):
                        first = True
                        out["text"] += choices[0].get("text") or ""
                    elif usage := data.get("usage"):
                        out["output_tokens"] = usage.get("completion_tokens")
        out["success"] = first
    return out


def test_vllm_benchmark_client_completes_32_of_32(live, client):
    url = live[0].url + "/v1/completions"
    prompts = [f"{PROMPT} number {i}" for i in range(32)]

    async def run_all():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await asyncio.gather(*(vllm_request(session, url, "tiny", p, 6) for p in prompts))

    results = asyncio.run(run_all())
    assert [r["success"] for r in results] == [True] * 32, [r.get("error") for r in results]
    assert all(r["output_tokens"] == 6 for r in results)  # ignore_eos: always max_tokens
    for r in results:
        *tokens, last = r["chunks"]
        assert all(c["usage"] is None for c in tokens) and last["choices"] == [] and last["usage"]
    for i in (0, 17):  # the stream's text is the plain answer's
        plain = client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        assert results[i]["text"] == plain.choices[0].text


def test_models_retrieve(client):
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    body = err.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "model_not_found"


CONTROLS = [
    ("repetition_penalty", dict(repetition_penalty=3.0), dict(repetition=3.0)),
    ("repetition_penalty below 1", dict(repetition_penalty=0.5), dict(repetition=0.5)),
    ("frequency_penalty", dict(frequency_penalty=2.0), dict(frequency=2.0)),
    ("presence_penalty", dict(presence_penalty=-2.0), dict(presence=-2.0)),
    (  # 22328 is plain greedy's first token: -100 bans it
        "logit_bias",
        dict(logit_bias={"11": 8.0, "13": 6.0, "22328": -100}),
        dict(bias={11: 8.0, 13: 6.0, 22328: -100}),
    ),
    ("min_tokens", dict(logit_bias={str(EOT): 30}, min_tokens=5), dict(bias={EOT: 30}, min_tokens=5)),
    (
        "all at once",
        dict(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.5, logit_bias={"11": 2.0}),
        dict(repetition=1.5, frequency=0.5, presence=0.5, bias={11: 2.0}),
    ),
]


@pytest.mark.parametrize("fields, reference", [c[1:] for c in CONTROLS], ids=[c[0] for c in CONTROLS])
def test_each_control_matches_the_reference_on_the_logits(client, offline, fields, reference):
    prompt = TOKENIZER.encode(PROMPT)
    want = reference_greedy(offline, prompt, 24, EOT, **reference)
    plain = reference_greedy(offline, prompt, 24, EOT)
    assert want != plain  # the control changes the text, so the comparison means something
    extra = {k: v for k, v in fields.items() if k in ("repetition_penalty", "min_tokens")}
    openai_fields = {k: v for k, v in fields.items() if k not in extra}
    got = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0, extra_body=extra, **openai_fields
    )
    assert got.usage.completion_tokens == len(want)
    assert got.choices[0].text == TOKENIZER.decode([t for t in want if t != EOT])
    assert got.choices[0].finish_reason == ("stop" if want[-1] == EOT else "length")
    assert got.choices[0].logprobs.tokens == [TOKENIZER.decode([t]) for t in want]


def test_ignore_eos_goes_on_past_end_of_text(client):
    banned_end = dict(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(EOT): 100})
    stopped = client.completions.create(**banned_end)
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    going = client.completions.create(**banned_end, extra_body={"ignore_eos": True})
    assert going.usage.completion_tokens == 5 and going.choices[0].finish_reason == "length"
    assert going.choices[0].text == ""  # skip_special_tokens, as vLLM by default
    shown = client.completions.create(**banned_end, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert shown.choices[0].text == "<|endoftext|>" * 5


def test_best_of_returns_the_candidates_of_highest_cumulative_logprob(client):
    ask = dict(model="tiny", prompt=[PROMPT, "Once upon a time"], max_tokens=8, seed=7, logprobs=0)
    candidates = client.completions.create(**ask, n=5)  # choice j of a prompt samples with seed + j, as best_of's
    best = client.completions.create(**ask, n=2, best_of=5)
    assert len(best.choices) == 4 and [c.index for c in best.choices] == [0, 1, 2, 3]
    for prompt in range(2):
        mine = candidates.choices[prompt * 5 : prompt * 5 + 5]
        ranked = sorted(mine, key=lambda c: -sum(c.logprobs.token_logprobs))
        assert len({sum(c.logprobs.token_logprobs) for c in mine}) == 5  # no ties: the order is defined
        assert [c.text for c in best.choices[prompt * 2 : prompt * 2 + 2]] == [c.text for c in ranked[:2]]
    assert best.usage.completion_tokens == candidates.usage.completion_tokens  # every candidate counts
    unasked = client.completions.create(**{**ask, "logprobs": None}, n=2, best_of=5)
    assert [c.text for c in unasked.choices] == [c.text for c in best.choices]


def test_vllm_extension_keys_at_neutral_values_are_accepted(live):
    neutral = dict(
        use_beam_search=False,
        min_p=0.0,
        length_penalty=1.0,
        stop_token_ids=[],
        include_stop_str_in_output=False,
        spaces_between_special_tokens=True,
        truncate_prompt_tokens=None,
        allowed_token_ids=None,
        prompt_logprobs=None,
        detokenize=True,
        return_tokens_as_token_ids=False,
        priority=0,
        response_format={"type": "text"},
        add_special_tokens=False,
        request_id="abc",
        skip_special_tokens=True,
        ignore_eos=False,
        min_tokens=0,
        repetition_penalty=1.0,
        top_k=-1,
        best_of=1,
        logprobs=None,
    )
    status, body = post(live[0].url + "/v1/completions", dict(model="tiny", prompt=PROMPT, max_tokens=3, **neutral))
    assert status == 200, body
    streamed = dict(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    request = urllib.request.Request(
        live[0].url + "/v1/completions",
        data=json.dumps(dict(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, **streamed)).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line[6:] for line in response.read().decode().split("\n\n") if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    used = [c["usage"]["completion_tokens"] for c in chunks]
    assert used == sorted(used) and used[-1] == 3 and chunks[0]["usage"]["prompt_tokens"] > 0


BAD = [
    ("stream_options without stream", dict(stream_options={"include_usage": True}), "stream_options", "'stream'"),
    ("prompt null", dict(prompt=None), "prompt", "prompt is null"),
    ("prompt of booleans", dict(prompt=[True]), "prompt", "a list of token ids"),
    ("best_of below n", dict(n=3, best_of=2), "best_of", "at least n"),
    ("best_of streamed", dict(best_of=2, stream=True), "best_of", "cannot be streamed"),
    ("beam search", dict(use_beam_search=True), "use_beam_search", "send false"),
    ("min_p", dict(min_p=0.1), "min_p", "not supported"),
    ("stop_token_ids", dict(stop_token_ids=[13]), "stop_token_ids", "send []"),
    ("logit_bias key", dict(logit_bias={"hello": 1}), "logit_bias", "not a token id"),
    ("logit_bias id", dict(logit_bias={"99999999": 1}), "logit_bias", "outside the vocabulary"),
    ("repetition_penalty 0", dict(repetition_penalty=0), "repetition_penalty", "greater than 0"),
    ("presence_penalty range", dict(presence_penalty=2.5), "presence_penalty", "less than or equal to 2"),
    ("min_tokens over max_tokens", dict(min_tokens=9, max_tokens=4), "min_tokens", "more than max_tokens"),
]


@pytest.mark.parametrize("fields, param, words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_unsupported_or_bad_controls_are_a_clear_400(live, fields, param, words):
    status, body = post(live[0].url + "/v1/completions", {"model": "tiny", "prompt": PROMPT, **fields})
    assert status == 400, body
    error = body["error"]
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"], error


def test_malformed_json_names_no_field(live):
    status, body = post(live[0].url + "/v1/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and body["error"]["param"] is None
    assert body["error"]["message"].startswith("the request body is not valid JSON")


def test_rows_with_different_controls_in_one_batch_each_get_their_own(offline):
    """Four requests with different controls (two of them sampled with a seed) run as one batch; each gets
    the tokens it gets alone, and the greedy ones the reference's."""
    from gptwo.serve.engine import BatchEngine, SamplingParams

    prompt = TOKENIZER.encode(PROMPT)
    asks = [
        SamplingParams(max_tokens=12, temperature=0, repetition_penalty=3.0),
        SamplingParams(max_tokens=12, temperature=0, frequency_penalty=2.0, logit_bias=((11, 8.0),)),
        SamplingParams(max_tokens=12, temperature=0.8, seed=3, presence_penalty=2.0, top_k=20),
        SamplingParams(max_tokens=12, temperature=0.8, seed=3),
    ]

    def run(params_list):
        engine = BatchEngine(offline, TOKENIZER, max_num_seqs=8, num_blocks=64)

        async def everything():
            jobs = [engine.submit([prompt], params) for params in params_list]  # all queued before the first step
            engine.start()
            out = []
            for job in jobs:
                tokens = []
                while True:
                    update = await job.queue.get()
                    assert update.error is None, update.error
                    tokens += [t.token for t in update.tokens]
                    if update.finish_reason:
                        break
                out.append(tokens)
            return out

        try:
            return asyncio.run(everything()), engine.stats["peak_batch"]
        finally:
            engine.stop()

    together, peak = run(asks)
    assert peak == len(asks)
    alone = [run([params])[0][0] for params in asks]
    assert together == alone
    assert together[0] == reference_greedy(offline, prompt, 12, EOT, repetition=3.0)
    assert together[1] == reference_greedy(offline, prompt, 12, EOT, frequency=2.0, bias={11: 8.0})
    assert together[2] != together[3]  # same seed: the penalty alone makes the difference
