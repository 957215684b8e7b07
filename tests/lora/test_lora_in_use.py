"""Adapters in use: unmerged (the default) = merged on every load path and command, several adapters over one base
in one ragged batch, prefix caching kept apart per adapter, and bad adapter sets as one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from cli_testing import assert_one_line_error, run
from lora_testing import save_random_adapter
from serve_testing import save_tiny_model

from gptwo import GPT, GPTConfig
from gptwo.errors import GptwoError
from gptwo.infer.kvcache import PagedKVCache
from gptwo.infer.multilora import MultiLoraLinear
from gptwo.infer.step import StepInput, make_step
from gptwo.lora import load_adapters, lora_layers
from gptwo.weights import load_model

CONFIG = GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=2, n_embd=32)
IDS = torch.tensor([[5, 17, 3, 90, 41, 8, 8, 60]])


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, str, str]:
    """A 96-token base and two adapters of it: rank 2 on c_attn, rank 4 on every linear layer."""
    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    GPT(CONFIG).save_pretrained(str(root / "base"))
    base = str(root / "base")
    return (
        base,
        save_random_adapter(base, str(root / "a"), rank=2, targets=("c_attn",), seed=1),
        save_random_adapter(base, str(root / "b"), rank=4, seed=2),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    """A tiny model with GPT-2's tokenizer (what the commands need) and an adapter of it."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_model(str(root / "base"))
    return str(root / "base"), save_random_adapter(str(root / "base"), str(root / "adapter"), rank=4, seed=3)


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_unmerged_is_the_default_and_gives_the_merged_logits(small, dtype):
    base, a, _ = small
    unmerged = GPT.from_pretrained(base, adapter=a, dtype=dtype)  # "fp32": prepared for inference (native linears)
    merged = GPT.from_pretrained(base, adapter=a, merge=True, dtype=dtype)
    assert len(lora_layers(unmerged)) == CONFIG.n_layer and not lora_layers(merged)
    assert (logits(merged) - logits(GPT.from_pretrained(base))).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(logits(unmerged), logits(merged), atol=1e-4, rtol=0)


def test_unmerged_over_int8_decodes_as_its_own_forward(small):
    """An int8 base keeps the adapter beside its quantized layers; the decode step (torch) agrees with the forward."""
    base, _, b = small
    model = GPT.from_pretrained(base, adapter=b, quantize="int8")
    assert len(lora_layers(model)) == 4 * CONFIG.n_layer
    prompt = IDS[0].tolist()
    out = model.generate(IDS, 8, temperature=0.0)[0, len(prompt) :].tolist()
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]
    merged = GPT.from_pretrained(base, adapter=b, merge=True)
    assert (logits(model) - logits(merged)).abs().max() < 0.05 * logits(merged).abs().max()  # int8's error only


def test_generate_and_eval_unmerged_equal_merge(tiny, tmp_path, capsys):
    base, adapter = tiny
    texts = []
    for extra in (["--adapter", adapter], ["--adapter", adapter, "--merge"], []):
        code, out, err = run(
            ["generate", "--model", base, *extra, "--temperature", "0", "--max-new-tokens", "12", "Hi"], capsys
        )
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] != texts[2]
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps.", encoding="utf-8")
    reports = []
    for extra in (["--adapter", adapter], ["--adapter", adapter, "--merge"]):
        code, out, err = run(["eval", "ppl", str(text), "--model", base, *extra, "--json", "--quiet"], capsys)
        assert code == 0, err
        reports.append(json.loads(out))
    assert reports[0]["perplexity"] == pytest.approx(reports[1]["perplexity"], rel=1e-5)


def test_detect_with_an_adapter_scores_as_the_merged_model(tiny, tmp_path, capsys):
    base, adapter = tiny
    merged_dir = str(tmp_path / "merged")
    model, tokenizer = load_model(base, device="cpu", adapter=adapter, merge=True)
    model.save_pretrained(merged_dir, tokenizer=tokenizer)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6, encoding="utf-8")
    docs = []
    for model_args in (["--model", base, "--adapter", adapter], ["--model", merged_dir], ["--model", base]):
        code, out, err = run(["detect", *model_args, "--device", "cpu", "--json", str(text)], capsys)
        assert code == 0, err
        docs.append(json.loads(out))
    assert docs[0]["tokens"] == docs[1]["tokens"]
    for name, value in docs[1]["scores"].items():
        assert docs[0]["scores"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert docs[0]["scores"] != docs[2]["scores"]  # the adapter changed what was scored


def test_rows_of_different_adapters_in_one_batch_get_their_merged_logits(small):
    base, a, b = small
    merged = [GPT.from_pretrained(base)] + [GPT.from_pretrained(base, adapter=d, merge=True) for d in (a, b)]
    model = load_adapters(GPT.from_pretrained(base, dtype="fp32"), [("a", a), ("b", b)])
    assert sum(isinstance(m, MultiLoraLinear) for m in model.modules()) == 4 * CONFIG.n_layer  # the union of layers
    step = make_step(model, 16)
    for tokens, slots in (  # rows of one length (one batched gather) and of several (a forward per length)
        ([[5, 17, 3, 90], [1, 2, 3, 4], [7, 7, 7, 7], [9, 8, 7, 6]], [1, 0, 2, 1]),
        ([[5, 17, 3, 90, 41, 8, 8, 60], [1, 2, 3], [7, 7, 7, 7, 7]], [2, 0, 1]),
    ):
        seqs = [step.cache.start([]) for _ in tokens]
        for seq, toks in zip(seqs, tokens):
            step.cache.grow(seq, len(toks))
        out = step(
            StepInput(tokens, [0] * len(tokens), [s.blocks for s in seqs], every=[True] * len(tokens), adapters=slots)
        )
        at = 0
        for toks, slot in zip(tokens, slots):
            torch.testing.assert_close(
                out[at : at + len(toks)], logits(merged[slot], torch.tensor([toks]))[0], atol=1e-4, rtol=0
            )
            at += len(toks)
        for seq in seqs:
            step.cache.release(seq)
    torch.testing.assert_close(logits(model), logits(merged[0]), atol=1e-5, rtol=0)  # no adapter outside a step


def test_prefix_cache_shares_blocks_within_an_adapter_only():
    cache = PagedKVCache(CONFIG, 16)
    prompt = list(range(40))
    first = cache.start(prompt)
    cache.grow(first, len(prompt))
    cache.commit(first, prompt)  # two full blocks registered, for the base
    assert cache.start(prompt).length == 32  # the base's next prompt takes them
    other = cache.start(prompt, namespace=1)
    assert other.length == 0  # an adapter's does not
    cache.grow(other, len(prompt))
    cache.commit(other, prompt)
    again = cache.start(prompt, namespace=1)
    assert again.length == 32 and again.blocks == other.blocks[:2] and not set(again.blocks) & set(first.blocks)
    assert cache.fork(again).namespace == 1


def test_bad_adapter_sets_are_one_line_errors(small, tmp_path):
    base, a, b = small
    with pytest.raises(GptwoError, match="given twice"):
        load_adapters(GPT.from_pretrained(base), [("x", a), ("x", b)])
    with pytest.raises(GptwoError, match="does not exist"):
        load_adapters(GPT.from_pretrained(base), [("x", a), ("y", str(tmp_path / "nope"))])
    wide_base = str(tmp_path / "wide")
    GPT(GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=2, n_embd=64)).save_pretrained(wide_base)
    wide = save_random_adapter(wide_base, str(tmp_path / "wide-adapter"), rank=2)
    with pytest.raises(GptwoError, match="base model it was trained from"):
        load_adapters(GPT.from_pretrained(base), [("x", a), ("wide", wide)])
    with pytest.raises(GptwoError, match="already carries"):
        load_adapters(GPT.from_pretrained(base, adapter=a), [("y", b)])


def test_adapter_options_on_the_commands(tiny, tmp_path, capsys):
    base, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text("Some text to score.", encoding="utf-8")
    code, _, err = run(
        ["detect", "--model", base, "--adapter", str(tmp_path / "nope"), "--device", "cpu", str(text)], capsys
    )
    assert_one_line_error(code, err, "adapter folder")
    for command in (["generate"], ["eval", "ppl"], ["detect"], ["detect", "calibrate"], ["detect", "sample"]):
        code, out, _ = run([*command, "--help"], capsys)
        assert code == 0 and "--merge" in out and "--adapter" in out, command
