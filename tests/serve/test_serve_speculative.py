"""`gptwo serve --speculate ngram | --draft-model M`: per-row speculation in the batch gives the plain greedy text,
streamed or not, and /metrics counts the drafts proposed and accepted."""

from __future__ import annotations

import json
import urllib.request

import pytest
from serve_testing import serve_in_thread

from gptwo.generate import complete
from gptwo.weights import load_model

PROMPTS = ["one two three one two three one two", "Hello world, hello world, hello"]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("method", ["ngram", "draft-model"])
def test_speculating_server_gives_the_plain_greedy_text_and_counts_its_drafts(model_dir, method):
    model, tokenizer = load_model(model_dir, device="cpu")
    plain = complete(model, tokenizer, PROMPTS, 24, temperature=0)
    if method == "ngram":
        speculation = {"speculate": "ngram"}
    else:  # as `gptwo serve` loads models on a CPU: prepared for the native step, the draft's cache its own
        speculation = {"draft_model": load_model(model_dir, device="cpu", dtype="fp32")[0], "dtype": "fp32"}
    server, _ = serve_in_thread(model_dir, num_speculative_tokens=3, **speculation)
    try:
        body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 24, "temperature": 0}
        batched = post(f"{server.url}/v1/completions", body)
        assert [c["text"] for c in sorted(batched["choices"], key=lambda c: c["index"])] == plain
        assert batched["usage"]["completion_tokens"] == sum(len(tokenizer.encode(t)) for t in plain)
        request = urllib.request.Request(
            f"{server.url}/v1/completions",
            json.dumps({**body, "prompt": PROMPTS[0], "stream": True}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            lines = [line.decode().strip() for line in response if line.strip()]
        assert lines[-1] == "data: [DONE]"
        assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == plain[0]
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=60) as response:
            metrics = dict(
                line.split("{")[0:1] + line.rsplit(" ", 1)[1:]
                for line in response.read().decode().splitlines()
                if line.startswith("gptwo_spec_decode")
            )
        drafts, accepted = (float(metrics[f"gptwo_spec_decode_{k}_tokens_total"]) for k in ("draft", "accepted"))
        assert drafts > 0 and 0 < accepted <= drafts
    finally:
        server.close()
