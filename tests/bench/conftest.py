"""The tiny saved model the bench tests (decode, llama.cpp anchor) run on."""

import pytest
import torch

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.weights import save_pretrained


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, width-32 GPT-2 with a 260-token BPE, saved in HF format."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["a tiny corpus for a tiny tokenizer"] * 3, vocab_size=260, min_frequency=1)
    save_pretrained(
        GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=32)),
        directory,
        tokenizer=tokenizer,
    )
    return directory
