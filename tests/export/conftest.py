"""The tiny saved models the export tests write out: one with a gptwo-trained BPE, one with GPT-2's own."""

from __future__ import annotations

import os

import pytest
import torch

from gptwo import GPTConfig, Tokenizer
from gptwo.model import GPT
from gptwo.weights import save_pretrained

pytest.importorskip("gguf")

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Rivers run to the sea, and the sea sends rain back to the hills again 1234 times.",
    "Don't stop: it's 3.14 o'clock   and we've   got\n\nnew lines,\ttabs and ünïcödé — 日本語 🚀.",
]


def tiny_gpt(vocab_size: int, block_size: int = 64, seed: int = 0) -> GPT:
    """2 layers, width 64 (whole q8_0 blocks), random weights."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=64)).eval()


@pytest.fixture(scope="session")
def trained_tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 4, vocab_size=320, min_frequency=1)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, trained_tokenizer) -> str:
    """An HF folder ("model"): a tiny GPT-2 with a gptwo-trained 320-token BPE (<|endoftext|> is id 0)."""
    directory = os.path.join(str(tmp_path_factory.mktemp("trained")), "model")
    save_pretrained(tiny_gpt(trained_tokenizer.n_vocab), directory, trained_tokenizer)
    return directory


@pytest.fixture(scope="session")
def gpt2_vocab_dir(tmp_path_factory) -> str:
    """An HF folder ("model"): a tiny GPT-2 with GPT-2's own BPE (50,257 tokens; 13 MB of f32 weights)."""
    directory = os.path.join(str(tmp_path_factory.mktemp("gpt2vocab")), "model")
    save_pretrained(tiny_gpt(50257, seed=1), directory, Tokenizer.gpt2())
    return directory
