"""Shared helpers for the scaling tests: a tiny prepared corpus, a tiny plan, the CLI in a subprocess."""

from __future__ import annotations

import functools
import math
import os
import random
import subprocess
import sys
import tempfile

WORDS = (
    "the a model reads text one token at time and learns to predict next from ones before it rivers run sea rain hills"
).split()


@functools.cache
def tiny_data() -> str:
    """A prepared data folder (cached per test process): ~30 KB of word salad, a 300-token trained BPE."""
    from gptwo.data.shard_corpus import prepare
    from gptwo.tokenizer import Tokenizer

    root = tempfile.mkdtemp(prefix="gptwo-scale-")
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus)
    rng = random.Random(0)
    for i in range(40):
        with open(os.path.join(corpus, f"doc{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(" ".join(rng.choice(WORDS) for _ in range(150)) + ".")
    prepare(
        [corpus],
        os.path.join(root, "data"),
        tokenizer=Tokenizer.train([corpus], vocab_size=300),
        val_fraction=0.2,
        progress=False,
        workers=1,
    )
    return os.path.join(root, "data")


TINY_TRAIN = dict(block_size=16, batch_size=4, eval_batches=2, log_every=1, warmup_steps=2)
TINY_SHAPES = [(1, 1, 16), (1, 2, 32), (2, 2, 32)]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m gptwo.cli ARGS` and return the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "gptwo.cli", *args], capture_output=True, text=True, timeout=timeout)


HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def synthetic_runs(constants: dict, noise: float = 0.005, seed: int = 0) -> list[dict]:
    """IsoFLOP sweeps at five budgets, 7 shapes each around the optimum, losses with multiplicative noise."""
    import numpy as np

    from gptwo.scale.fit import predict

    rng = np.random.default_rng(seed)
    runs = []
    for budget in (1e18, 3e18, 1e19, 3e19, 1e20):
        for n in np.geomspace(math.sqrt(budget / 120) / 8, math.sqrt(budget / 120) * 8, 7):
            d = budget / (6 * n)
            runs.append(
                {
                    "params": n,
                    "tokens": d,
                    "loss": predict(constants, n, d) * math.exp(rng.normal(0, noise)),
                    "budget": budget,
                    "flops": budget,
                }
            )
    return runs
