"""Helpers for the detection tests: tiny random GPT-2s saved to disk with a tokenizer."""

from __future__ import annotations

import torch

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.weights import save_pretrained

TEXT = (
    "The quick brown fox jumps over the lazy dog. Rank buckets & <tags> should survive: naïve café, 🦊 emoji!\n"
    "A second line, with numbers 12345 and a tab\tinside."
)


def tiny_model(seed: int = 0, block_size: int = 64, vocab_size: int = 50257, std: float = 0.5) -> GPT:
    """A 2-layer GPT-2 with wide random weights, so ranks spread over every GLTR bucket."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    for param in model.parameters():
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=std)
    return model.eval()


def save_tiny(directory: str, seed: int = 0, tokenizer: Tokenizer | None = None, **kwargs) -> str:
    tokenizer = tokenizer or Tokenizer.gpt2()
    save_pretrained(tiny_model(seed, vocab_size=tokenizer.n_vocab, **kwargs), directory, tokenizer=tokenizer)
    return directory
