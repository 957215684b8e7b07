"""One paged KV cache: keys and values in blocks of 16 tokens, shared by every sequence of every path.

The cache is two tensors (n_layer, num_blocks, n_head, 16, head_dim) — a head's 16 keys of a block
lie together, as the C step reads them — and a block manager (vLLM's design, Kwon et al. 2023):
each sequence holds a block table (`SeqBlocks.blocks`: position p lives in block `blocks[p // 16]`,
slot `p % 16`), blocks carry reference counts, free blocks wait on a free list. Sequences that share a
prefix share its blocks: `fork` (n > 1 choices of one prompt) shares all of them, and a shared block
that is only partly filled is copied before it is written (copy-on-write). With prefix caching, each
full block is registered under the key (its parent block's key, its 16 tokens) — a hash chain, exact
because the dict compares whole keys — so a later prompt starting with the same tokens takes those
blocks instead of computing them (within one namespace: a sequence's chain starts at its namespace's
root, so sequences run with different LoRA adapters, whose keys and values differ, never share a
block); blocks no sequence holds stay cached until the least recently used is taken for new work.
Block 0 is never handed out: padding positions may write there. A block is cleared when the manager
first hands it out; blocks put in a table by hand hold whatever memory held (the native step reads
written positions only; the torch step gathers whole blocks, so use `grow`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from gptwo.config import GPTConfig
from gptwo.errors import GptwoError
from gptwo.runtime import check_memory

BLOCK_SIZE = 16
NULL_BLOCK = 0  # written by padding, read by nothing


def block_bytes(config: GPTConfig, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of keys plus values one block holds across all layers."""
    return 2 * config.n_layer * config.n_head * block_size * config.head_dim * dtype.itemsize


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


@dataclass
class SeqBlocks:
    """One sequence's place in the cache: its block table and the tokens whose keys/values are written."""

    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens 0..length-1, whose keys/values are in the blocks
    keys: list[int] = field(default_factory=list)  # prefix-cache entry of each full block registered or reused
    namespace: int = 0  # blocks are shared only within one namespace (the LoRA adapter slot the tokens ran with)

    @property
    def length(self) -> int:
        return len(self.tokens)


def _root(namespace: int) -> int:
    """The parent key of a namespace's first blocks: 0, -1, -2, … (entry ids count up from 1)."""
    return -namespace


class OutOfBlocks(Exception):
    """The cache has no free block left for this request (the caller waits, preempts or refuses)."""


class PagedKVCache:
    """Keys/values of `num_blocks` blocks (block 0 reserved) with reference counts, a free list and a prefix cache."""

    def __init__(
        self,
        config: GPTConfig,
        num_blocks: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        prefix_caching: bool = True,
        block_size: int = BLOCK_SIZE,
    ):
        if num_blocks < 2:
            raise GptwoError(f"a KV cache of {num_blocks} blocks holds nothing", "give it at least 2 blocks")
        dtype = dtype or torch.get_default_dtype()
        check_memory(
            num_blocks * block_bytes(config, dtype, block_size),
            f"a KV cache of {num_blocks:,} blocks of {block_size} tokens",
            "give the cache less memory (--kv-cache-memory) or use a smaller model",
            device,
        )
        shape = (config.n_layer, num_blocks, config.n_head, block_size, config.head_dim)
        # not zeroed here: a block is cleared when it is first handed out, so on a CPU the pages of blocks never
        # used are never touched (the OS maps them on first write) and memory follows the blocks in use
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, NULL_BLOCK] = 0
        self.v[:, NULL_BLOCK] = 0
        self.used_once = bytearray(num_blocks)  # 1 for each block ever handed out (cleared then)
        self.blocks_touched = 0
        self.config, self.block_size, self.num_blocks = config, block_size, num_blocks
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        # a stack, lowest ids on top: a block given back is the next one taken, so the pages touched (on a CPU,
        # the memory really used: torch.zeros maps the rest lazily) follow the most blocks ever held at once
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # held by none, cached; LRU
        self.table: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent entry, tokens) -> block
        self.entry: dict[int, int] = {}  # block -> its entry id (a block's key names its parent's entry)
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._next_entry = 1  # entry ids are never reused, so a key names one exact prefix
        self.queried_tokens = self.hit_tokens = 0

    # ---------------------------------------------------------------- accounting
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and held by no sequence)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - 1 - self.num_free

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_needed(self, seq: SeqBlocks, upto: int) -> int:
        """Blocks `grow(seq, upto)` would take (new ones, plus one to copy a shared partly-filled block)."""
        new = max(0, blocks_for(upto, self.block_size) - len(seq.blocks))
        return new + int(self._shared_tail(seq) and upto > seq.length)

    # ---------------------------------------------------------------- sequences
    def start(self, tokens: list[int], namespace: int = 0) -> SeqBlocks:
        """A new sequence for a prompt: full blocks already cached for its prefix in `namespace` are taken (at
        least one token is left to compute, so the step has a last position to give logits for)."""
        seq = SeqBlocks(namespace=namespace)
        if not self.prefix_caching:
            return seq
        usable = (len(tokens) - 1) // self.block_size
        parent = _root(namespace)
        for j in range(usable):
            block = self.table.get((parent, tuple(tokens[j * self.block_size : (j + 1) * self.block_size])))
            if block is None:
                break
            self._hold(block)
            seq.blocks.append(block)
            seq.keys.append(self.entry[block])
            parent = self.entry[block]
        seq.tokens = list(tokens[: len(seq.blocks) * self.block_size])
        self.queried_tokens += len(tokens)
        self.hit_tokens += seq.length
        return seq

    def grow(self, seq: SeqBlocks, upto: int) -> None:
        """Give `seq` blocks for every position below `upto`, copying a shared partly-filled last block first.
        OutOfBlocks (and nothing changed) when the free blocks do not suffice."""
        if self.blocks_needed(seq, upto) > self.num_free:
            raise OutOfBlocks(f"{self.blocks_needed(seq, upto)} blocks needed, {self.num_free} free")
        if upto > seq.length and self._shared_tail(seq):
            old, new = seq.blocks[-1], self._take()
            self.k[:, new] = self.k[:, old]
            self.v[:, new] = self.v[:, old]
            self._drop(old)
            seq.blocks[-1] = new
        while len(seq.blocks) < blocks_for(upto, self.block_size):
            seq.blocks.append(self._take())

    def commit(self, seq: SeqBlocks, tokens: list[int]) -> None:
        """Record that `tokens` now follow `seq`'s in the cache; register the blocks they fill."""
        seq.tokens.extend(tokens)
        if not self.prefix_caching:
            return
        while len(seq.keys) < seq.length // self.block_size:
            j = len(seq.keys)
            block = seq.blocks[j]
            key = (
                seq.keys[-1] if seq.keys else _root(seq.namespace),
                tuple(seq.tokens[j * self.block_size : (j + 1) * self.block_size]),
            )
            if block not in self.entry and key not in self.table:
                self.table[key], self.entry[block], self.key_of[block] = block, self._next_entry, key
                self._next_entry += 1
            # our block's entry, or that of the block another sequence registered for this same prefix
            seq.keys.append(self.entry[block] if block in self.entry else self.entry[self.table[key]])

    def fork(self, seq: SeqBlocks) -> SeqBlocks:
        """A second sequence sharing all of `seq`'s blocks (each is copied only when one of them writes it)."""
        for block in seq.blocks:
            self._hold(block)
        return SeqBlocks(list(seq.blocks), list(seq.tokens), list(seq.keys), seq.namespace)

    def release(self, seq: SeqBlocks) -> None:
        """Give back `seq`'s blocks (the last first, so a prompt's later blocks leave the prefix cache before
        its earlier ones)."""
        for block in reversed(seq.blocks):
            self._drop(block)
        seq.blocks, seq.tokens, seq.keys = [], [], []

    def truncate(self, seq: SeqBlocks, length: int) -> None:
        """Forget `seq`'s tokens from `length` on (rejected speculative tokens), giving back emptied blocks."""
        keep = blocks_for(length, self.block_size)
        for block in reversed(seq.blocks[keep:]):
            self._drop(block)
        del seq.blocks[keep:], seq.tokens[length:], seq.keys[length // self.block_size :]

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no sequence holds."""
        while self.evictable:
            block, _ = self.evictable.popitem(last=False)
            self._forget(block)
            self.free.append(block)

    # ---------------------------------------------------------------- blocks
    def _shared_tail(self, seq: SeqBlocks) -> bool:
        return bool(seq.blocks) and seq.length % self.block_size != 0 and self.refs[seq.blocks[-1]] > 1

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            self._forget(block)
        else:
            raise OutOfBlocks("no free block")
        if not self.used_once[block]:  # first use: clear what the allocator left (unwritten slots are gathered)
            self.k[:, block] = 0
            self.v[:, block] = 0
            self.used_once[block] = 1
            self.blocks_touched += 1
        self.refs[block] = 1
        return block

    def _hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def _drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.entry:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def _forget(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.table[key]
        self.entry.pop(block, None)
