"""The explicit attention path against the fast path and transformers; POST /v1/inspect; the Inspect page in headless
Chromium."""

from __future__ import annotations

import pytest
import requests
import torch
from detect_testing import TEXT, save_tiny, tiny_model
from serve_testing import serve_in_thread

from gptwo.detect.attention import attention_output, attention_weights, forward_with_attention


def test_explicit_attention_reproduces_the_fast_path_block_by_block():
    model = tiny_model(0, block_size=64)
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    logits, maps = forward_with_attention(model, idx)
    with torch.no_grad():
        assert torch.allclose(logits, model(idx), atol=1e-5)
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(40))
        for layer, block in enumerate(model.transformer.h):
            h = block.ln_1(x)
            weights, v = attention_weights(block, h)
            torch.testing.assert_close(maps[layer], weights, atol=1e-5, rtol=0)  # the step's own explicit path
            assert torch.allclose(
                attention_output(block, weights, v), block.attn(h), atol=1e-5
            )  # explicit softmax == fused SDPA
            assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 40), atol=1e-6) and torch.all(weights.triu(1) == 0)
            x = block(x)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny(str(tmp_path_factory.mktemp("m") / "tiny"), block_size=64)
    server, _ = serve_in_thread(model_dir)
    yield server, model_dir
    server.close()


def test_inspect_returns_tokens_scores_and_the_models_attention(served):
    server, model_dir = served
    from transformers import GPT2LMHeadModel

    from gptwo.tokenizer import Tokenizer

    text = TEXT[:60]
    body = requests.post(server.url + "/v1/inspect", json={"model": "tiny", "text": text}, timeout=60).json()
    tok = Tokenizer.gpt2()
    ids = tok.encode_ordinary(text)
    assert "".join(t["token"] for t in body["tokens"]) == text and [t["id"] for t in body["tokens"]] == ids
    assert all(len(t["top"]) == 10 and t["bucket"] in (0, 1, 2, 3) for t in body["tokens"])
    assert {"fast_detectgpt", "log_rank", "gltr_top10"} <= body["scores"].keys() and body["calibrated"] is False
    att = body["attention"]
    assert att["tokens"][0] == "<|endoftext|>" and len(att["tokens"]) == len(ids) + 1
    oracle = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = oracle(
            torch.tensor([[tok.eot_token, *ids]]), output_attentions=True
        ).attentions  # per layer (1, heads, T, T)
    for layer in att["layers"]:
        for head in range(att["heads"]):
            for q, row in enumerate(att["weights"][layer][head]):
                assert len(row) == q + 1 and sum(row) == pytest.approx(1.0, abs=1e-5)
                assert row == pytest.approx(expected[layer][0, head, q, : q + 1].tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"text": ""}, 400, "empty"),
        ({"text": "hello", "layers": [7]}, 400, "layer 7"),
        ({"text": "hello", "model": "other"}, 404, "does not exist"),
    ],
)
def test_inspect_errors_are_openai_shaped(served, body, status, message):
    response = requests.post(served[0].url + "/v1/inspect", json=body, timeout=60)
    assert response.status_code == status and message in response.json()["error"]["message"]


def test_inspect_says_too_short(served):
    body = requests.post(served[0].url + "/v1/inspect", json={"text": "Hi", "attention": False}, timeout=60).json()
    assert body["verdict"] == "too short" and "too short to judge" in body["note"] and "attention" not in body
