"""Random windows: batches of rows taken from uniformly random places in the training split.

The data loader reads a split in order, which suits corpora far larger than a run. A small corpus
read for many epochs learns faster when every batch mixes many places (nanoGPT's `get_batch` does
the same). Rows are drawn from a generator seeded by (seed, global slot), with slots numbered as
the loader numbers them, so N ranks read what one process with grad_accum N reads, and resuming
needs only the number of batches taken.
"""

from __future__ import annotations

import numpy as np
import torch


class RandomWindows:
    """Same interface as `ShardLoader` for training batches, drawing rows at random offsets."""

    def __init__(self, loader):
        self.loader = loader
        self.batch_size, self.block_size = loader.batch_size, loader.block_size
        self.rank, self.world_size, self.seed = loader.rank, loader.world_size, loader.seed
        self.tokenizer_identity, self.n_vocab, self.eot_token = (
            loader.tokenizer_identity,
            loader.n_vocab,
            loader.eot_token,
        )
        self.num_tokens = loader.num_tokens
        self.calls = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.calls * self.world_size + self.rank
        self.calls += 1
        rng = np.random.default_rng([self.seed, slot])
        starts = rng.integers(0, self.num_tokens - self.block_size - 1, size=self.batch_size, endpoint=True)
        rows = [self.loader.window(int(s), self.block_size) for s in starts]  # targets IGNORE'd by a loss mask
        return torch.from_numpy(np.stack([x for x, _ in rows])), torch.from_numpy(np.stack([y for _, y in rows]))

    def state_dict(self) -> dict:
        return {"sampling": "random", "slots_consumed": self.calls * self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["slots_consumed"]) // self.world_size
        self.seed = int(state["seed"])
