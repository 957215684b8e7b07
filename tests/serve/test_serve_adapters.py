"""Several LoRA adapters over one base (`gptwo serve --adapter NAME=DIR ...`): a request's `model` picks one, rows
of different adapters share a batch, and each gets the text `gptwo generate --adapter DIR --merge` gives."""

from __future__ import annotations

import threading
import time
import urllib.request

import openai
import pytest
import torch
from cli_testing import assert_one_line_error, run
from lora_testing import save_random_adapter
from serve_testing import LiveServer

from gptwo.serve import BatchEngine, create_app
from gptwo.serve.app import load_served_model

PROMPTS = {"tiny": "The cat sat on the", "alpha": "Once upon a time", "beta": "the end of the end of the"}
LONG = "In the morning the baker opens the shop and sets out bread and small cakes for the town."  # > 16 tokens
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, str]:
    """Two adapters of the tiny model: rank 2 on c_attn, rank 4 on every linear layer."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": save_random_adapter(model_dir, str(root / "alpha"), rank=2, targets=("c_attn",), seed=1),
        "beta": save_random_adapter(model_dir, str(root / "beta"), rank=4, seed=2),
    }


def offline(model_dir: str, adapter: str | None, prompt: str, capsys) -> str:
    """What `gptwo generate` prints, greedy (the adapter merged)."""
    extra = ["--adapter", adapter, "--merge"] if adapter else []
    argv = ["generate", "--model", model_dir, *extra, "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS), prompt]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    return out


def complete(client: openai.OpenAI, model: str, prompt: str) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text


@pytest.mark.parametrize("speculate", [None, "ngram"])
def test_each_adapter_gets_its_offline_text_in_one_shared_batch(model_dir, adapters, capsys, speculate):
    want = {name: offline(model_dir, adapters.get(name), prompt, capsys) for name, prompt in PROMPTS.items()}
    assert len(set(want.values())) == 3  # the adapters change the text
    net, tokenizer = load_served_model(model_dir, torch.device("cpu"), torch.float32, None, list(adapters.items()))
    engine = BatchEngine(net, tokenizer, speculate=speculate)
    server = LiveServer(create_app(engine, "tiny"), lifespan="off")  # the engine starts once all three wait
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    try:
        got: dict[str, str] = {}
        threads = [
            threading.Thread(target=lambda n=name, p=prompt: got.__setitem__(n, complete(client, n, p)))
            for name, prompt in PROMPTS.items()
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while engine.waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.start()
        for thread in threads:
            thread.join(timeout=60)
        assert got == want
        assert engine.stats["peak_step_models"] == 3  # base and both adapters' rows in one step
        assert engine.adapter_requests == [1, 1, 1]
        if speculate:
            assert engine.counters["spec_draft_tokens"] > 0
    finally:
        engine.stop()
        server.close()


def test_models_list_prefix_caching_per_adapter_and_unknown_models(model_dir, adapters, capsys):
    net, tokenizer = load_served_model(model_dir, torch.device("cpu"), torch.float32, None, list(adapters.items()))
    engine = BatchEngine(net, tokenizer)
    server = LiveServer(create_app(engine, "tiny"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    try:
        cards = {card.id: card for card in client.models.list().data}
        assert list(cards) == ["tiny", "alpha", "beta"]
        assert cards["tiny"].parent is None and cards["alpha"].parent == cards["beta"].parent == "tiny"
        assert client.models.retrieve("beta").id == "beta"
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model="gamma", prompt="Hi", max_tokens=2)
        assert err.value.code == "model_not_found" and "`alpha`" in err.value.message
        # a long prompt, first for the base, then twice for an adapter: blocks are shared within an adapter only
        assert complete(client, "tiny", LONG) == offline(model_dir, None, LONG, capsys)
        hits = engine.cache.hit_tokens
        want = offline(model_dir, adapters["alpha"], LONG, capsys)
        assert complete(client, "alpha", LONG) == want
        assert engine.cache.hit_tokens == hits  # none of the base's blocks
        assert complete(client, "alpha", LONG) == want
        assert engine.cache.hit_tokens > hits  # its own
        with urllib.request.urlopen(server.url + "/metrics") as response:
            metrics = response.read().decode()
        assert 'gptwo_lora_requests_total{model_name="tiny",lora_name="alpha"} 2' in metrics
        assert 'gptwo_lora_requests_total{model_name="tiny",lora_name="beta"} 0' in metrics
    finally:
        server.close()


def test_bad_adapter_specs_are_one_line_errors(model_dir, adapters, tmp_path, capsys):
    serve = ["serve", "--model", model_dir, "--port", "0", "--device", "cpu"]
    for extra, expected in (
        (["--adapter", f"x={adapters['alpha']}", "--lora-modules", f"x={adapters['beta']}"], "two adapters"),
        (["--adapter", f"{model_dir}"], "the base model and an adapter"),  # named after its folder, as the base
        (["--adapter", f"x={tmp_path / 'nope'}"], "does not exist"),
        (["--adapter", adapters["alpha"], "--adapter", adapters["beta"], "--merge"], "--merge merges one adapter"),
    ):
        code, _, err = run([*serve, *extra], capsys)
        assert_one_line_error(code, err, expected)
    wide_base = str(tmp_path / "wide")
    from gptwo import GPT, GPTConfig

    GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=64)).save_pretrained(wide_base)
    wide = save_random_adapter(wide_base, str(tmp_path / "wide-adapter"), rank=2)
    code, _, err = run([*serve, "--adapter", f"wide={wide}"], capsys)
    assert_one_line_error(code, err, "base model it was trained from")


def test_merge_serves_one_merged_model_on_the_native_path(model_dir, adapters):
    from gptwo.infer.multilora import adapter_rows
    from gptwo.infer.native import NativeStep
    from gptwo.lora import lora_layers

    net, _ = load_served_model(
        model_dir, torch.device("cpu"), torch.float32, None, [("alpha", adapters["alpha"])], True
    )
    unmerged, _ = load_served_model(model_dir, torch.device("cpu"), torch.float32, None, [("alpha", adapters["alpha"])])
    assert not lora_layers(net) and BatchEngine(net, _).adapter_names == ()
    assert NativeStep.supports(net) == NativeStep.supports(
        load_served_model(model_dir, torch.device("cpu"), torch.float32, None)[0]
    )
    ids = torch.tensor([[464, 3797, 3332, 319]])
    with torch.no_grad(), adapter_rows(unmerged).selected(1):  # the unmerged alpha, as a step selects it
        torch.testing.assert_close(net(ids), unmerged(ids), atol=1e-4, rtol=0)
