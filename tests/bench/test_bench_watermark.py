"""`gptwo bench watermark`'s defaults fit the model and the source (the README's line on the quickstart model,
context 128, once asked for 216-token passages the source did not have)."""

from __future__ import annotations

import pytest
import torch

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.bench.watermark import DEFAULTS, watermark_report
from gptwo.data.builtin import builtin_documents
from gptwo.errors import GptwoError
from gptwo.weights import save_pretrained

TEXT = " ".join(builtin_documents()[:40])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wm")
    torch.manual_seed(0)
    tokenizer = Tokenizer.gpt2()
    config = GPTConfig(vocab_size=tokenizer.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32)
    model = str(root / "tiny")
    save_pretrained(GPT(config).eval(), model, tokenizer=tokenizer)
    source = root / "docs"
    source.mkdir()
    for i in range(3):  # a few 64-token passages each
        (source / f"{i}.txt").write_text(TEXT[i * 700 : (i + 1) * 700])
    return model, str(source)


def test_defaults_fit_the_context_and_the_source(setup, capsys):
    model, source = setup
    report = watermark_report(model, source, prompt_tokens=16, progress=True)
    assert report["new_tokens"] == 64 - 16  # not DEFAULTS' 200: prompt and text in one forward of the model
    assert 0 < report["texts"] == report["human_texts"] < DEFAULTS["texts"]  # as many passages as there are
    err = capsys.readouterr().err
    assert f"note: --texts {report['texts']} (the source's passages), not 100" in err
    assert report["watermarked"] and report["human"]


def test_what_is_asked_must_fit(setup):
    model, source = setup
    with pytest.raises(GptwoError, match="exceed the model's context of 64"):
        watermark_report(model, source, new_tokens=60, progress=False)
    with pytest.raises(GptwoError, match="fewer than asked for"):
        watermark_report(model, source, texts=10_000, progress=False)
