"""The decode step in torch: the model's own modules (so prepared and quantized linears apply) over the paged cache.

A batch whose sequences bring the same number of tokens is laid out as rows (B, T); a ragged one is packed
into one row (1, N) so each linear multiplies every token at once, attention running per group of sequences
with the same count (PackedAttention); an Inspect batch (attention weights) is padded to its longest row,
whose padding positions write to the null block and whose outputs are dropped. Attention gathers each
sequence's blocks through its block table; sequences are grouped by how many blocks they span (powers of
two), so a short sequence beside a long one attends over its own blocks, not the long one's. `compile=True` compiles the
single-token step of a fixed batch over fixed-width tables (for CUDA graphs and Inductor).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gptwo.errors import GptwoError
from gptwo.infer.kvcache import NULL_BLOCK, PagedKVCache
from gptwo.infer.multilora import adapter_rows

if TYPE_CHECKING:  # step.py chooses between this and the native step, so this module must not import it
    from gptwo.infer.step import StepInput

FROZEN = "max-autotune-frozen"  # compile mode: Inductor freezing + its C++ GEMM template (docs/inference.md)
FROZEN_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}


class PagedAttention:
    """The cache's view for one step: where each new token's keys/values go, and which blocks each row reads.

    `groups` holds (rows or None for all, block tables (g, n), mask (g, 1, T, n * block_size)). With a
    `weights` list, attention is computed explicitly — softmax(q kᵀ / √d + mask) @ v, the fused kernel never
    forms the weights — and each layer's weights (B, n_head, T, n * block_size) are appended (Inspect).
    """

    def __init__(self, k, v, write_blocks, write_slots, groups, weights: list | None = None):
        self.k, self.v = k, v  # the cache's tensors, passed in (a compiled step takes them as inputs, never constants)
        self.write_blocks, self.write_slots, self.groups, self.weights = write_blocks, write_slots, groups, weights

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, n_head, blocks * 16, head_dim) of `layer` for block tables (B, blocks)."""
        B, n = tables.shape
        _, _, H, bs, D = self.k.shape
        return tuple(
            # whole blocks copied (index_select of rows), then laid out head-major: 2.7x faster than indexing
            # the 5-d cache with the tables (64 sequences of 4 blocks)
            t[layer]
            .view(t.shape[1], -1)
            .index_select(0, tables.view(-1))
            .view(B, n, H, bs, D)
            .transpose(1, 2)
            .reshape(B, H, n * bs, D)
            for t in (self.k, self.v)
        )

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this step's keys/values (B, n_head, T, head_dim) of `layer` to their blocks and slots."""
        B, H, T, D = k.shape
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            cache[self.write_blocks, :, self.write_slots] = new.transpose(1, 2).reshape(B * T, H, D).to(cache.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.store(layer, k, v)
        D = k.shape[-1]
        if len(self.groups) == 1 and self.groups[0][0] is None:
            _, tables, mask = self.groups[0]
            K, V = self.gather(layer, tables)
            K, V = K.to(q.dtype), V.to(q.dtype)
            if self.weights is not None:
                scores = (q @ K.transpose(-2, -1)) / math.sqrt(D)
                weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
                self.weights.append(weights)
                return weights @ V
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
        if self.weights is not None:
            raise ValueError("explicit attention weights are formed for a batch of one width only")
        y = torch.empty_like(q)
        for rows, tables, mask in self.groups:
            K, V = self.gather(layer, tables)
            y[rows] = F.scaled_dot_product_attention(q[rows], K.to(q.dtype), V.to(q.dtype), attn_mask=mask)
        return y


def check_batch(batch: StepInput, cache: PagedKVCache, context: int) -> None:
    """Refuse a batch whose positions pass the context or whose tables do not cover its tokens."""
    for tokens, start, table in zip(batch.tokens, batch.starts, batch.tables):
        end = start + len(tokens)
        if not tokens or start < 0 or end > context:
            raise GptwoError(
                f"{len(tokens)} tokens at position {start} do not fit the model's context of {context}",
                "stay within the context (slide or shorten the sequence)",
            )
        if len(table) * cache.block_size < end or any(not 0 < b < cache.num_blocks for b in table):
            raise GptwoError(
                f"a block table of {len(table)} blocks does not hold positions up to {end} in a cache of "
                f"{cache.num_blocks} blocks",
                "grow the sequence's blocks (PagedKVCache.grow) before the step",
            )


def paged_view(
    cache: PagedKVCache, batch: StepInput, device, weights: list | None = None
) -> tuple[torch.Tensor, torch.Tensor, PagedAttention]:
    """Token ids (B, T), positions (B, T) and the cache view of a ragged batch, padded to its longest row
    (`weights`: see PagedAttention)."""
    B, T, bs = len(batch.tokens), max(len(t) for t in batch.tokens), cache.block_size
    ids, positions, blocks, slots, spans = [], [], [], [], []  # built as lists: one tensor each, not one per row
    for tokens, start, table in zip(batch.tokens, batch.starts, batch.tables):
        n, at = len(tokens), range(start, start + len(tokens))
        pad = [0] * (T - n)
        ids += [*tokens, *pad]
        positions += [*at, *pad]
        blocks += [*(table[p // bs] for p in at), *[NULL_BLOCK] * (T - n)]
        slots += [*(p % bs for p in at), *pad]
        spans.append(-(-(start + n) // bs))
    pos = torch.tensor(positions).view(B, T)
    by_width: dict[int, list[int]] = {}
    for i, n in enumerate(spans):
        by_width.setdefault(1 << (n - 1).bit_length(), []).append(i)
    if weights is not None:  # one width for all rows, so the weights stack
        by_width = {max(spans): list(range(B))}
    groups = []
    for width, rows in sorted(by_width.items()):
        width = min(width, max(spans[i] for i in rows))
        tables = _tables(batch, rows, spans, width)
        # query (row, t) at position p sees key positions 0..p; padding queries see position 0 only
        mask = torch.arange(width * bs)[None, None, :] <= pos[rows][:, :, None]
        groups.append(
            (
                None if len(rows) == B else torch.tensor(rows, device=device),
                tables.to(device),
                mask[:, None].to(device),
            )
        )
    blocks, slots, ids = torch.tensor(blocks), torch.tensor(slots), torch.tensor(ids).view(B, T)
    view = PagedAttention(cache.k, cache.v, blocks.to(device), slots.to(device), groups, weights)
    return ids.to(device), pos.to(device), view


def _tables(batch: StepInput, rows: list[int], spans: list[int], width: int) -> torch.Tensor:
    """The block tables (len(rows), width) of sequences `rows`: each its first `spans[i]` blocks, then zeros."""
    return torch.tensor([[*batch.tables[i][: spans[i]], *[0] * (width - spans[i])] for i in rows], dtype=torch.long)


def run_rows(batch: StepInput, rows: list[int], step) -> list[tuple[int, torch.Tensor]]:
    """(sequence index, the logits of its output rows) for the sequences `rows` of `batch`, run as one call of
    `step` (a batch cut into parts that run apart: sequences are independent, so their order does not matter)."""
    every, skip = batch.every or [False] * len(batch.tokens), batch.skip or [False] * len(batch.tokens)
    part = type(batch)(  # a StepInput (not imported: step.py imports this module)
        [batch.tokens[i] for i in rows],
        [batch.starts[i] for i in rows],
        [batch.tables[i] for i in rows],
        [every[i] for i in rows] if batch.every is not None else None,
        None if batch.adapters is None else [batch.adapters[i] for i in rows],
        [skip[i] for i in rows] if batch.skip is not None else None,
    )
    logits, at, out = step(part), 0, []
    for i in rows:
        n = 0 if skip[i] else len(batch.tokens[i]) if every[i] else 1
        out.append((i, logits[at : at + n]))
        at += n
    return out


class PackedAttention(PagedAttention):
    """The cache's view for a packed batch: every sequence's new tokens in one row (1, N), so each linear multiplies
    all N tokens at once (the weights read once). Attention runs per group of sequences bringing the same number
    of tokens over tables of one width: `groups` holds (token indices (g * T,), g, T, tables (g, n), mask)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.store(layer, k, v)
        _, H, _, D = k.shape
        y = torch.empty_like(q)
        for index, g, T, tables, mask in self.groups:
            K, V = self.gather(layer, tables)
            part = q[0][:, index].view(H, g, T, D).transpose(0, 1)
            out = F.scaled_dot_product_attention(part, K.to(q.dtype), V.to(q.dtype), attn_mask=mask)
            y[0][:, index] = out.transpose(0, 1).reshape(H, g * T, D)
        return y


def packed_view(cache: PagedKVCache, batch: StepInput, device) -> tuple[torch.Tensor, torch.Tensor, PackedAttention]:
    """Token ids (1, N), positions (1, N) and the cache view of a ragged batch packed into one row, no padding."""
    bs = cache.block_size
    ids, positions, blocks, firsts, spans = [], [], [], [], []
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (tokens, start, table) in enumerate(zip(batch.tokens, batch.starts, batch.tables)):
        at = range(start, start + len(tokens))
        firsts.append(len(ids))
        ids += tokens
        positions += at
        blocks += [table[p // bs] for p in at]
        spans.append(-(-at.stop // bs))
        by_shape.setdefault((len(tokens), 1 << (spans[-1] - 1).bit_length()), []).append(i)
    pos = torch.tensor(positions)
    groups = []
    for (T, _), rows in sorted(by_shape.items()):
        width = max(spans[i] for i in rows)
        index = torch.tensor([t for i in rows for t in range(firsts[i], firsts[i] + T)])
        mask = torch.arange(width * bs)[None, None, :] <= pos[index].view(len(rows), T, 1)
        tables = _tables(batch, rows, spans, width).to(device)
        groups.append((index.to(device), len(rows), T, tables, mask[:, None].to(device)))
    ids, blocks = torch.tensor(ids), torch.tensor(blocks)
    view = PackedAttention(cache.k, cache.v, blocks.to(device), (pos % bs).to(device), groups)
    return ids[None].to(device), pos[None].to(device), view


def _own_storage(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose every weight has a storage of its own: Inductor's freezing folds weights that are
    views into one shared buffer (the huge-page arena of infer/arena.py) as zeros (seen with torch 2.13)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        for name, t in module._parameters.items():
            if t is not None:
                module._parameters[name] = torch.nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
        for name, t in module._buffers.items():
            if t is not None:
                module._buffers[name] = t.clone()
    return model


class TorchStep(torch.nn.Module):
    """`DecodeStep` in torch over a `PagedKVCache` of the model's dtype.

    A module holding the model, so a compiled step sees the weights as the model's parameters (what Inductor's
    freezing folds in), while the cache's tensors are passed to it as inputs (written, never folded)."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, compile: bool | str = False):
        super().__init__()
        self.model, self.cache = (_own_storage(model) if compile == FROZEN else model), cache
        self.device = model.transformer.wte.weight.device
        self.compiled, self.frozen = bool(compile), compile == FROZEN
        mode = compile if isinstance(compile, str) and not self.frozen else None
        options = FROZEN_OPTIONS if self.frozen else None
        self._static = (
            torch.compile(self._static_decode, mode=mode, options=options, fullgraph=True, dynamic=False)
            if compile
            else self._static_decode
        )

    @torch.no_grad()
    def forward(self, batch: StepInput, attention_weights: list | None = None) -> torch.Tensor:
        """Logits of `batch.output_rows()`; with an `attention_weights` list, each layer's weights are appended
        (B, n_head, T, blocks * 16), computed explicitly (see PagedAttention).

        Sequences bringing different numbers of tokens run packed (`packed_view`: every new token in one row,
        no padding; with different LoRA adapters per sequence, one forward per count instead), so no row is
        padded to a long chunk's length."""
        check_batch(batch, self.cache, self.model.config.block_size)
        by_count: dict[int, list[int]] = {}
        for i, tokens in enumerate(batch.tokens):
            by_count.setdefault(len(tokens), []).append(i)
        if len(by_count) == 1 or attention_weights is not None:
            return self._forward(batch, attention_weights)
        if batch.adapters is None or len(set(batch.adapters)) == 1:  # (one adapter for the one packed row)
            return self._packed(batch)
        per_seq: list[torch.Tensor | None] = [None] * len(batch.tokens)
        for rows in by_count.values():
            for i, logits in run_rows(batch, rows, self._forward):
                per_seq[i] = logits
        return torch.cat(per_seq)

    def _forward(self, batch: StepInput, attention_weights: list | None = None) -> torch.Tensor:
        ids, pos, view = paged_view(self.cache, batch, self.device, attention_weights)
        with self._adapters_selected(batch):
            hidden = self.model.hidden_states(ids, pos, view)
        rows, T = torch.tensor(batch.output_rows(), dtype=torch.long), ids.shape[1]
        if not len(rows):  # only keys and values were wanted
            return hidden.new_empty(0, self.model.config.vocab_size)
        lengths = torch.tensor([len(t) for t in batch.tokens])
        firsts = torch.cumsum(lengths, 0) - lengths  # flat index of each row's first token
        row_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        padded = row_of[rows] * T + (rows - firsts[row_of[rows]])  # flat index → index in the padded layout
        return self.model.logits(hidden.reshape(-1, hidden.shape[-1])[padded.to(self.device)])

    def _packed(self, batch: StepInput) -> torch.Tensor:
        """The logits of a ragged batch run as one packed row (PackedAttention)."""
        ids, pos, view = packed_view(self.cache, batch, self.device)
        with self._adapters_selected(batch):
            hidden = self.model.hidden_states(ids, pos, view)
        rows = batch.output_rows()
        if not rows:
            return hidden.new_empty(0, self.model.config.vocab_size)
        return self.model.logits(hidden[0, torch.tensor(rows, device=self.device)])

    def _adapters_selected(self, batch: StepInput):
        """Each padded row (one per sequence) on its sequence's LoRA adapter slot, for the forward inside."""
        rows = adapter_rows(self.model)
        slots = batch.adapters
        if slots is not None and any(slots) and rows is None:
            raise GptwoError(
                "a batch asks for LoRA adapters but the model carries none", "load the adapters onto the model"
            )
        if rows is None or slots is None or not any(slots):
            return contextlib.nullcontext()
        if len(set(slots)) == 1:
            return rows.selected(slots[0])
        return rows.selected(torch.tensor(slots, device=self.device))

    # ---------------------------------------------------------------- fixed shapes, for torch.compile
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of one token per row (`tokens`, `positions` (B,)) with block tables (B, n) whose
        width stays the same from call to call (compiled once)."""
        k, v = self.cache.k, self.cache.v
        if self.frozen:
            with torch._inductor.config.patch(freezing=True):
                return self._static(tokens, positions, tables, k, v)
        return self._static(tokens, positions, tables, k, v)

    def _static_decode(self, tokens, positions, tables, k, v) -> torch.Tensor:
        bs = self.cache.block_size
        blocks = tables.gather(1, (positions // bs)[:, None])[:, 0]
        key = torch.arange(tables.shape[1] * bs, device=tables.device)
        mask = (key[None, :] <= positions[:, None])[:, None, None]
        view = PagedAttention(k, v, blocks, positions % bs, [(None, tables, mask)])
        hidden = self.model.hidden_states(tokens[:, None], positions[:, None], view)
        return self.model.logits(hidden[:, -1])
