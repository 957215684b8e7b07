"""The `watermark` extension of /v1/completions and /v1/inspect, per request and server-wide: batched and streamed
completions carry the watermark `gptwo generate --watermark` writes."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
import torch
from cli_testing import run
from serve_testing import serve_in_thread

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.generate import complete
from gptwo.watermark import WatermarkSettings, watermark_for
from gptwo.weights import load_model, save_pretrained

PROMPTS = ["The quick brown fox", "A model reads"]
SERVER_KEY = 5


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
    """A tiny model with broad next-token distributions (so the watermark shows), GPT-2's tokenizer (its text
    decodes to whole characters, so the tokens read back from the text are the ones sampled)."""
    root = str(tmp_path_factory.mktemp("wm"))
    tokenizer = Tokenizer.gpt2()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=128, n_layer=2, n_head=2, n_embd=32))
    for param in model.parameters():
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=0.1)
    save_pretrained(model.eval(), os.path.join(root, "tiny"), tokenizer=tokenizer)
    return os.path.join(root, "tiny")


@pytest.fixture(scope="module")
def offline(small_model):
    return load_model(small_model, device="cpu")


@pytest.fixture(scope="module")
def live(small_model):
    server, _ = serve_in_thread(small_model, max_num_seqs=8, watermark_key=SERVER_KEY)
    yield server.url
    server.close()


def post(url: str, body: bytes) -> tuple[int, dict, None]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), None
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), None


def completion(url: str, **body) -> tuple[int, dict]:
    status, payload, _ = post(url + "/v1/completions", json.dumps({"model": "tiny", **body}).encode())
    return status, payload


def z_of(text: str, tokenizer, settings: WatermarkSettings) -> float:
    return watermark_for(settings, tokenizer.n_vocab).score(tokenizer.encode_ordinary(text)).z


def test_batched_completions_carry_the_watermark_of_generate(live, offline, small_model, capsys):
    model, tok = offline
    status, payload = completion(live, prompt=PROMPTS, n=2, max_tokens=40, seed=3, watermark=True)
    assert status == 200, payload
    texts = [c["text"] for c in payload["choices"]]
    mine = WatermarkSettings(key=SERVER_KEY)  # `true` takes the server's key
    for i, prompt in enumerate(PROMPTS):
        for j in range(2):  # choice j samples with seed + j
            assert texts[2 * i + j] == complete(model, tok, [prompt], 40, seed=3 + j, watermark=mine)[0]
    argv = ["generate", "--model", small_model, "--max-new-tokens", "40", "--seed", "3", PROMPTS[0]]
    code, printed, err = run([*argv, "--watermark", "--watermark-key", str(SERVER_KEY)], capsys)
    assert code == 0 and printed == texts[0], err
    status, plain = completion(live, prompt=PROMPTS, n=2, max_tokens=40, seed=3)
    assert [c["text"] for c in plain["choices"]] != texts


def test_streamed_and_unseeded_completions_carry_the_watermark(live, offline):
    model, tok = offline
    asked = {"key": 9, "delta": 3.0, "scheme": "selfhash"}
    settings = WatermarkSettings(**asked)
    body = dict(prompt=PROMPTS[1], max_tokens=30, temperature=0, watermark=asked, stream=True)
    raw = urllib.request.Request(
        live + "/v1/completions",
        data=json.dumps({"model": "tiny", **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(raw, timeout=60) as response:
        events = [e[len("data: ") :] for e in response.read().decode().split("\n\n") if e]
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
    assert streamed == complete(model, tok, [PROMPTS[1]], 30, temperature=0, watermark=settings)[0]
    # unseeded rows are sampled together (another sampler than generate's): still watermarked. Unseeded, so z
    # varies run to run: 120 tokens measure z 10.3 ± 1.2 (min 7.3 of 90 draws; another key's max 2.3), so the
    # bound of 4 is 5 sd away (at 60 tokens it was 7.5 ± 1.4, and one CI run drew 3.7)
    status, payload = completion(live, prompt=PROMPTS, n=3, max_tokens=120, watermark=True)
    assert status == 200
    for choice in payload["choices"]:
        assert z_of(choice["text"], tok, WatermarkSettings(key=SERVER_KEY)) >= 4
        assert z_of(choice["text"], tok, WatermarkSettings()) < 4  # another key finds nothing


@pytest.mark.parametrize(
    "watermark, message",
    [
        ({"gamma": 2}, "gamma"),
        ({"gamma": 0.00001}, "leaves 0 of 50257 tokens green"),
        ({"delta": -1}, "delta"),
        ({"scheme": "minhash"}, "scheme"),
        ({"key": -1}, "key"),
        ({"colour": "green"}, "colour"),
        ("yes", "watermark"),
    ],
)
def test_bad_watermark_requests_get_400(live, watermark, message):
    status, payload = completion(live, prompt="x", max_tokens=2, watermark=watermark)
    assert status == 400 and message in payload["error"]["message"], payload


def test_inspect_reports_the_watermark(live, offline):
    _, tok = offline
    status, payload = completion(live, prompt=PROMPTS[0], max_tokens=60, seed=1, watermark=True)
    text = payload["choices"][0]["text"]
    status, report, _ = post(
        live + "/v1/inspect", json.dumps({"text": text, "attention": False, "watermark": True}).encode()
    )
    assert status == 200, report
    mark = report["watermark"]
    assert mark["detected"] and mark["z"] == pytest.approx(z_of(text, tok, WatermarkSettings(key=SERVER_KEY)))
    assert report["tokens"][0]["green"] is None and {t["green"] for t in report["tokens"][1:]} == {True, False}
    status, report, _ = post(live + "/v1/inspect", json.dumps({"text": text, "attention": False}).encode())
    assert "watermark" not in report  # not asked for, and the server does not watermark everything


def test_a_server_wide_watermark_marks_every_completion(small_model, offline):
    model, tok = offline
    settings = WatermarkSettings(key=77, gamma=0.5)
    server, _ = serve_in_thread(small_model, watermark=settings)
    try:
        status, payload = completion(server.url, prompt=PROMPTS[0], max_tokens=30, temperature=0)
        assert (
            payload["choices"][0]["text"] == complete(model, tok, PROMPTS[:1], 30, temperature=0, watermark=settings)[0]
        )
        for refused in (False, {"key": 1}):
            status, payload = completion(server.url, prompt="x", max_tokens=2, watermark=refused)
            assert status == 400 and payload["error"]["param"] == "watermark", payload
        text = completion(server.url, prompt=PROMPTS[1], max_tokens=60, seed=2)[1]["choices"][0]["text"]
        status, report, _ = post(server.url + "/v1/inspect", json.dumps({"text": text, "attention": False}).encode())
        assert report["watermark"]["detected"] and report["watermark"]["settings"]["gamma"] == 0.5  # by default
        assert "key" not in report["watermark"]["settings"] and "77" not in json.dumps(report["watermark"]["settings"])
    finally:
        server.close()
