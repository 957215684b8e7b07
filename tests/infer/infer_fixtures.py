"""A small model trained in-test (seconds) on generated sentences, saved with its tokenizer."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.weights import save_pretrained

SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the teacher",
    "our neighbour",
    "a small bird",
    "the old man",
    "her brother",
]
VERBS = ["sees", "likes", "follows", "paints", "visits", "finds", "helps", "calls"]
OBJECTS = [
    "the river",
    "a red house",
    "the garden",
    "a long letter",
    "the market",
    "a quiet street",
    "the station",
    "a green hill",
]
ENDINGS = ["every morning.", "after dinner.", "in the rain.", "on sunday.", "with a smile.", "before noon."]


def sentences(count: int, seed: int) -> str:
    """Text from a tiny grammar: learnable, with a few choices per sentence left to chance.

    Choices are Zipf-like (each word half as likely as the one before), as in natural text, so a
    trained model has a clear favourite; with uniform choices greedy decoding would be a coin toss
    that any rounding flips, in fp32 as much as in int8.
    """
    rng = random.Random(seed)

    def pick(words: list[str]) -> str:
        return rng.choices(words, weights=[2.0**-i for i in range(len(words))])[0]

    return " ".join(f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)} {pick(ENDINGS)}" for _ in range(count))


def train_small_model(directory: str, steps: int = 200) -> tuple[GPT, Tokenizer, str]:
    """Train a 2-layer GPT on generated text and save it with its tokenizer; returns (model, tokenizer, held-out text).

    One thread: 64-wide matrices gain nothing from more threads, and when other processes hold
    the cores the extra threads only spin-wait and slow every step.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(directory, steps)
    finally:
        torch.set_num_threads(threads)


def _train(directory: str, steps: int) -> tuple[GPT, Tokenizer, str]:
    torch.manual_seed(0)
    train_text, held_out = sentences(600, seed=1), sentences(60, seed=2)
    tokenizer = Tokenizer.train([train_text], vocab_size=300, min_frequency=1)
    data = torch.tensor(tokenizer.encode(train_text))
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=generator)
        batch = torch.stack([data[s : s + 65] for s in starts.tolist()])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    save_pretrained(model, directory, tokenizer=tokenizer)
    return model, tokenizer, held_out


def perplexity(model: GPT, ids: torch.Tensor) -> float:
    """exp(mean next-token loss) of `ids` (B, T) under `model`."""
    with torch.no_grad():
        logits = model(ids[:, :-1]).float()
    return float(torch.exp(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())))
