"""Shared helpers for the training tests: a few KB of text prepared into shards, tiny model settings."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile

TINY = [
    "n_layer=2",
    "n_head=2",
    "n_embd=32",
    "block_size=32",
    "batch_size=4",
    "lr=3e-3",
    "warmup_steps=2",
    "eval_every=4",
    "eval_batches=2",
    "checkpoint_every=4",
    "log_every=1",
    "sample_tokens=4",
    "keep_checkpoints=2",
    "threads=1",
]

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun by the window.",
    "A model reads text one token at a time and learns to predict the next token from the ones before it.",
    "Checkpoints hold the weights, the optimizer state and the position of the data loader, "
    "so training resumes exactly.",
    "Rivers run to the sea, and the sea sends rain back to the hills, where the rivers begin again.",
    "In the morning the baker opens the shop, lights the oven and sets out bread, rolls and small cakes.",
    "Numbers such as 1, 2, 3 and 42 appear in text too, as do names like Alice, Bob and Carol.",
]


def write_corpus(directory: str, documents: int = 48, seed: int = 0) -> str:
    """About 20 KB of English-like text in `documents` files (deterministic)."""
    import random

    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(documents):
        text = " ".join(rng.choice(PARAGRAPHS) for _ in range(4))
        with open(os.path.join(directory, f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return directory


@functools.cache
def tiny_data(tokenizer: str = "trained", seed: int = 0) -> str:
    """A prepared data folder (cached per test process): a 300-token trained BPE, or 'gpt2'."""
    from gptwo.data.shard_corpus import prepare
    from gptwo.tokenizer import Tokenizer

    root = tempfile.mkdtemp(prefix=f"gptwo-train-{tokenizer}-")
    corpus = write_corpus(os.path.join(root, "corpus"), seed=seed)
    tok = Tokenizer.train([corpus], vocab_size=300) if tokenizer == "trained" else "gpt2"
    prepare([corpus], os.path.join(root, "data"), tokenizer=tok, val_fraction=0.25, progress=False, workers=1)
    return os.path.join(root, "data")


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir: str) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir) if "loss" in row}


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m gptwo.cli ARGS` and return the finished process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "gptwo.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
