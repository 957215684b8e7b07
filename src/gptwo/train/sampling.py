"""Random windows: batches of rows taken from uniformly random places in the training split.

The data loader reads a split in order, which suits corpora far larger than a run. A small corpus
read for many epochs learns faster when every batch mixes many places (nanoGPT's `get_batch` does
the same). Rows are drawn from a generator seeded by (seed, global slot), with slots numbered as
the loader numbers them, so N ranks read what one process with grad_accum N reads, and resuming
needs only the number of batches taken.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from gptwo.data.loader import check_token_ids


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
        self._starts = np.cumsum([0] + [len(s) for s in loader.shards]).tolist()
        self.calls = 0

    def _row(self, start: int) -> np.ndarray:
        """block_size + 1 tokens from position `start` of the split, across shard boundaries."""
        out = np.empty(self.block_size + 1, dtype=np.int64)
        shard, filled = bisect.bisect_right(self._starts, start) - 1, 0
        while filled < len(out):
            local = start + filled - self._starts[shard]
            piece = self.loader.shards[shard][local : local + len(out) - filled]
            check_token_ids(piece, self.n_vocab, self.loader.shard_path(shard))
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.calls * self.world_size + self.rank
        self.calls += 1
        rng = np.random.default_rng([self.seed, slot])
        starts = rng.integers(0, self._starts[-1] - self.block_size - 1, size=self.batch_size, endpoint=True)
        tokens = torch.from_numpy(np.stack([self._row(int(s)) for s in starts]))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"sampling": "random", "slots_consumed": self.calls * self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["slots_consumed"]) // self.world_size
        self.seed = int(state["seed"])
