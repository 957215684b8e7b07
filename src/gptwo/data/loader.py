"""Batches for training: a sequential, resumable, rank-aware reader over a split's token shards.

The split's shards are read as one token stream, cut into "slots" of batch_size*block_size tokens
(each read with one extra token for the targets). Calls to `next_batch` take slots in order:

    global slot of call c on rank r  =  c * world_size + r

so one process with gradient accumulation g reads, at step s, slots s*g ... s*g+g-1, and world_size
processes with accumulation g/world_size read exactly the same slots between them at step s (rank r's
micro-batch k is slot (s*g/world_size + k)*world_size + r). An epoch holds (tokens-1) // (B*T) slots;
later epochs start at a small seeded offset (below B*T) so that window edges move between epochs.

Data with a loss mask (`gptwo prepare chat`: meta.json `loss_mask`, a NAME.mask beside each shard)
gives targets equal to IGNORE (-1) where the mask does not count the target token (the mask of token
i+1 for target position i); the loss skips them.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from gptwo.data.shards import LLMC_IDENTITY, read_header, read_mask, read_shard
from gptwo.errors import GptwoError

GPT2_N_VOCAB, GPT2_EOT = 50257, 50256
IGNORE = -1  # the target of a token the loss does not count (cross_entropy's ignore_index)
_META_KEYS = ("tokenizer", "n_vocab", "eot_token", "splits")
_PREPARE = "run 'gptwo prepare INPUT... --out DIR' to create it"


def read_meta(data_dir: str) -> dict:
    """The meta of a prepared data folder (meta.json), or one built from the headers of llm.c shards."""
    if not os.path.isdir(data_dir):
        raise GptwoError(f"data folder {data_dir} does not exist", _PREPARE)
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if (
            not isinstance(meta, dict)
            or any(key not in meta for key in _META_KEYS)
            or not isinstance(meta["splits"], dict)
        ):
            raise GptwoError(f"{meta_path} is not a valid gptwo meta file", "re-run 'gptwo prepare' for this folder")
        _check_meta_fields(meta, meta_path)
        return meta
    llmc = _llmc_meta(data_dir)
    if llmc is None:
        raise GptwoError(f"{data_dir} holds neither meta.json nor llm.c shards (*_train_*.bin)", _PREPARE)
    return llmc


def _check_meta_fields(meta: dict, meta_path: str) -> None:
    """meta.json's numbers are integers in range: a vocabulary that fits its shards' dtype, an end-of-text inside it."""
    fix = "re-run 'gptwo prepare' for this folder"
    for key in ("n_vocab", "eot_token", "train_tokens", "val_tokens"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GptwoError(f"{meta_path}: {key}={value!r} is not a non-negative integer", fix)
    if not 0 < meta["n_vocab"] <= 1 << 32:
        raise GptwoError(f"{meta_path}: n_vocab={meta['n_vocab']} is not a vocabulary size", fix)
    if meta["eot_token"] >= meta["n_vocab"]:
        raise GptwoError(
            f"{meta_path}: eot_token={meta['eot_token']} is outside the vocabulary of n_vocab={meta['n_vocab']}", fix
        )
    for split, entry in meta["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int) for s in shards
        ):
            raise GptwoError(f"{meta_path}: split '{split}' does not list its shards as {{file, tokens}}", fix)
        if any(os.path.basename(s["file"]) != s["file"] for s in shards):
            raise GptwoError(f"{meta_path}: split '{split}' names a shard outside the folder", fix)
        if meta.get("loss_mask") and not all(
            isinstance(s.get("mask"), str) and os.path.basename(s["mask"]) == s["mask"] for s in shards
        ):
            raise GptwoError(f"{meta_path}: loss_mask is set but split '{split}' lists a shard without its mask", fix)


def check_token_ids(tokens: np.ndarray, n_vocab: int, where: str) -> None:
    """Every id in `tokens` is inside the vocabulary (before it reaches an embedding)."""
    if tokens.size and int(tokens.max()) >= n_vocab:
        bad = int(tokens.max())
        raise GptwoError(
            f"{where} holds token id {bad}, outside the data's vocabulary of {n_vocab} (meta.json n_vocab)",
            "the shards or meta.json are corrupt or mismatched: re-run 'gptwo prepare' for this folder",
        )


def _llmc_meta(data_dir: str) -> dict | None:
    """A meta for a folder of llm.c shards (`*_train_*.bin`, `*_val_*.bin`), or None if there are none."""
    splits = {}
    for split in ("train", "val"):
        files = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
        shards = [{"file": os.path.basename(path), "tokens": read_header(path).num_tokens} for path in files]
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards), "documents": None, "bytes": None}
    if not splits["train"]["shards"] and not splits["val"]["shards"]:
        return None
    return {
        "format": "llm.c",
        "tokenizer": LLMC_IDENTITY,
        "n_vocab": GPT2_N_VOCAB,
        "eot_token": GPT2_EOT,
        "dtype": "uint16",
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "val_bytes": None,
        "splits": splits,
    }


class ShardLoader:
    """(x, y) batches of shape (batch_size, block_size) from one split of a prepared data folder."""

    def __init__(
        self,
        data_dir: str,
        split: str = "train",
        batch_size: int = 8,
        block_size: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if batch_size < 1 or block_size < 1:
            raise GptwoError(
                f"batch_size {batch_size} and block_size {block_size} must be positive", "set both to 1 or more"
            )
        if not 0 <= rank < world_size:
            raise GptwoError(
                f"rank {rank} is outside world size {world_size}",
                "launch with torchrun, which sets RANK and WORLD_SIZE",
            )
        self.data_dir, self.split, self.seed = data_dir, split, seed
        self.batch_size, self.block_size, self.rank, self.world_size = batch_size, block_size, rank, world_size
        self.meta = read_meta(data_dir)
        self.tokenizer_identity: str = self.meta["tokenizer"]
        self.n_vocab: int = int(self.meta["n_vocab"])
        self.eot_token: int = int(self.meta["eot_token"])
        self.masked = bool(self.meta.get("loss_mask"))
        self.shards = self._open_shards()
        self._starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.num_tokens: int = self._starts[-1]
        self._check_size()
        self.slot_tokens = batch_size * block_size
        self.slots_per_epoch = (self.num_tokens - 1) // self.slot_tokens
        self._slack = self.num_tokens - 1 - self.slots_per_epoch * self.slot_tokens
        self.calls = 0  # next_batch calls made on this rank

    def _open_shards(self) -> list[np.ndarray]:
        splits = self.meta["splits"]
        if self.split not in splits:
            raise GptwoError(
                f"{self.data_dir} has no '{self.split}' split (it has {', '.join(splits)})",
                "use split 'train' or 'val'",
            )
        shards = []
        self.masks: list[np.ndarray] = []
        self.shard_files = [os.path.join(self.data_dir, entry["file"]) for entry in splits[self.split]["shards"]]
        for entry, path in zip(splits[self.split]["shards"], self.shard_files):
            if not os.path.isfile(path):
                raise GptwoError(
                    f"shard {path} listed in meta.json is missing", "re-run 'gptwo prepare' for this folder"
                )
            header = read_header(path)
            if header.num_tokens != entry["tokens"] or header.tokenizer_identity != self.tokenizer_identity:
                raise GptwoError(
                    f"shard {path} does not match meta.json (tokens or tokenizer differ)",
                    "re-run 'gptwo prepare' for this folder",
                )
            shards.append(read_shard(path))
            if self.masked:
                mask_file = os.path.join(self.data_dir, entry["mask"])
                if not os.path.isfile(mask_file):
                    raise GptwoError(
                        f"loss mask {mask_file} listed in meta.json is missing",
                        "re-run 'gptwo prepare chat' for this folder",
                    )
                self.masks.append(read_mask(mask_file))
                if len(self.masks[-1]) != header.num_tokens:
                    raise GptwoError(
                        f"loss mask {mask_file} has {len(self.masks[-1])} entries for {header.num_tokens} tokens",
                        "re-run 'gptwo prepare chat' for this folder",
                    )
        return shards

    def shard_path(self, index: int) -> str:
        """The file of shard `index` of this split."""
        return self.shard_files[index]

    def _check_size(self) -> None:
        need = self.batch_size * self.block_size + 1
        if self.num_tokens == 0:
            fix = (
                "prepare it with a larger --val-fraction or more documents"
                if self.split == "val"
                else "prepare more text"
            )
            raise GptwoError(f"the '{self.split}' split of {self.data_dir} is empty", fix)
        if self.num_tokens < need:
            raise GptwoError(
                f"the '{self.split}' split of {self.data_dir} has {self.num_tokens} tokens, "
                f"fewer than batch_size*block_size+1 = {need}",
                "lower batch_size or block_size, or prepare more text",
            )

    # ---------------------------------------------------------------- reading
    def _slot_start(self, slot: int) -> int:
        """Token position where global slot `slot` begins."""
        epoch, index = divmod(slot, self.slots_per_epoch)
        offset = random.Random(f"{self.seed}:{epoch}").randint(0, self._slack) if epoch else 0
        return offset + index * self.slot_tokens

    def _read(self, start: int, length: int, arrays: list[np.ndarray] | None = None, dtype=np.int64) -> np.ndarray:
        """`length` tokens of the split's stream from `start`, across shard boundaries, as int64 (or of its
        `arrays`: the loss masks)."""
        arrays = self.shards if arrays is None else arrays
        out = np.empty(length, dtype=dtype)
        shard = bisect.bisect_right(self._starts, start) - 1
        filled = 0
        while filled < length:
            local = start + filled - self._starts[shard]
            take = min(length - filled, len(arrays[shard]) - local)
            piece = arrays[shard][local : local + take]
            if arrays is self.shards:
                check_token_ids(piece, self.n_vocab, self.shard_path(shard))
            out[filled : filled + take] = piece
            filled += take
            shard += 1
        return out

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs: `length` tokens from stream position `start`; targets: the tokens after them, IGNORE where
        the loss mask does not count one. Both int64."""
        tokens = self._read(start, length + 1)
        x, y = tokens[:-1], tokens[1:]
        if self.masked:
            y = y.copy()  # y and x share memory
            y[~self._read(start + 1, length, self.masks, dtype=bool)] = IGNORE
        return x, y

    def _batch(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.window(self._slot_start(slot), self.slot_tokens)
        shape = (self.batch_size, self.block_size)
        return torch.from_numpy(x).view(shape), torch.from_numpy(y).view(shape)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) LongTensors of shape (batch_size, block_size); y is x shifted left by one token
        (IGNORE where a loss mask does not count the target)."""
        slot = self.calls * self.world_size + self.rank
        self.calls += 1
        return self._batch(slot)

    def iter_eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed pass from the split's start: slots 0..n-1 shared round-robin among ranks.

        `max_batches` counts batches over all ranks together, so the union of what the ranks read (and
        the mean loss) is the same for any world size that divides it; every rank gets as many batches.
        """
        total = self.slots_per_epoch if max_batches is None else min(self.slots_per_epoch, max_batches)
        if self.slots_per_epoch < self.world_size:
            raise GptwoError(
                f"the '{self.split}' split has {self.num_tokens} tokens, "
                f"too few for one batch on each of {self.world_size} ranks",
                "lower batch_size or block_size, or prepare with a larger --val-fraction",
            )
        per_rank = max(1, total // self.world_size)
        for index in range(per_rank):
            yield self._batch(index * self.world_size + self.rank)

    # ---------------------------------------------------------------- resuming
    @property
    def epoch(self) -> int:
        """Epoch of the next batch this rank reads (0 for the first pass)."""
        return (self.calls * self.world_size + self.rank) // self.slots_per_epoch

    def state_dict(self) -> dict:
        """Where reading stands, as JSON-able values; `load_state_dict` continues from exactly here."""
        return {
            "split": self.split,
            "slot_tokens": self.slot_tokens,
            "slots_consumed": self.calls * self.world_size,
            "seed": self.seed,
            "num_tokens": self.num_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` output (also from a run with another world size that divides it)."""
        consumed, slot_tokens = int(state["slots_consumed"]), int(state["slot_tokens"])
        if state.get("split", self.split) != self.split:
            raise GptwoError(
                f"loader state is for split '{state['split']}', not '{self.split}'",
                "resume each split's loader from its own state",
            )
        if slot_tokens != self.slot_tokens:
            raise GptwoError(
                f"loader state was saved with batch_size*block_size = {slot_tokens}, now {self.slot_tokens}",
                "resume with the same batch_size and block_size",
            )
        if consumed % self.world_size:
            raise GptwoError(
                f"loader state ({consumed} batches read) cannot be split over {self.world_size} ranks",
                "resume with the original number of processes",
            )
        self.calls = consumed // self.world_size
        self.seed = int(state.get("seed", self.seed))
