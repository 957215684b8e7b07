"""Shared helpers for the selection tests: a corpus with planted noise, its shards, and a tiny reference model."""

from __future__ import annotations

import functools
import json
import os
import random
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
    "eval_every=1000",
    "eval_batches=2",
    "checkpoint_every=1000",
    "log_every=1",
    "sample_tokens=0",
    "keep_checkpoints=2",
    "threads=1",
    "sampling=random",
]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A model reads text one token at a time and learns to predict the next token.",
    "Rivers run to the sea, and the sea sends rain back to the hills.",
    "In the morning the baker opens the shop and sets out bread and small cakes.",
    "Checkpoints hold the weights and the optimizer state, so training resumes exactly.",
]
NOISE_CHARS = "#$%&*@^~<>{}|"  # never in the clean sentences, so noise tokens are told apart by their ids


def clean_document(rng: random.Random) -> str:
    return " ".join(rng.choice(SENTENCES) for _ in range(3))


def noise_document(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(NOISE_CHARS) for _ in range(rng.randint(2, 6))) for _ in range(40))


def is_noise(text: str) -> bool:
    return any(c in NOISE_CHARS for c in text)


def write_jsonl(path: str, texts: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


@functools.cache
def mixed_corpus(documents: int = 60, noise_share: float = 0.4, seed: int = 0) -> tuple[str, list[str]]:
    """A .jsonl of clean and noise documents (noise at random places), and its texts."""
    rng = random.Random(seed)
    texts = [noise_document(rng) if rng.random() < noise_share else clean_document(rng) for _ in range(documents)]
    root = tempfile.mkdtemp(prefix="gptwo-select-")
    return write_jsonl(os.path.join(root, "mixed.jsonl"), texts), texts


@functools.cache
def tokenizer_file() -> str:
    """A 300-token BPE trained on the mixed corpus (clean and noise alike)."""
    from gptwo.tokenizer import Tokenizer

    corpus, _ = mixed_corpus()
    path = os.path.join(os.path.dirname(corpus), "tokenizer.json")
    Tokenizer.train([corpus], vocab_size=300).save(path)
    return path


@functools.cache
def mixed_data() -> str:
    """The mixed corpus prepared into shards."""
    from gptwo.data.shard_corpus import prepare

    corpus, _ = mixed_corpus()
    out = os.path.join(os.path.dirname(corpus), "data-mixed")
    prepare([corpus], out, tokenizer=tokenizer_file(), val_fraction=0.2, progress=False, workers=1)
    return out


@functools.cache
def reference_run() -> str:
    """A tiny model trained on clean documents only: the reference of `reducible`."""
    from gptwo.data.shard_corpus import prepare
    from gptwo.train.loop import run_training

    rng = random.Random(1)
    root = os.path.dirname(mixed_corpus()[0])
    clean = write_jsonl(os.path.join(root, "clean.jsonl"), [clean_document(rng) for _ in range(40)])
    prepare(
        [clean],
        os.path.join(root, "data-clean"),
        tokenizer=tokenizer_file(),
        val_fraction=0.2,
        progress=False,
        workers=1,
    )
    run = os.path.join(root, "reference")
    run_training(os.path.join(root, "data-clean"), run, overrides=TINY + ["max_steps=40"], progress=False)
    return run


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m gptwo.cli ARGS` and return the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "gptwo.cli", *args], capture_output=True, text=True, timeout=timeout)
