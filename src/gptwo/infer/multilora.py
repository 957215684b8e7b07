"""Several LoRA adapters over one base in one batch: each row of a forward picks its adapter (or none).

A `MultiLoraLinear` keeps a linear layer (plain, prepared or int8) as `base_layer` and the stacked
adapters of every served adapter beside it: A (slots, r, in) and B (slots, out, r), float32, padded
with zeros to the largest rank, the scaling alpha/r folded into B, slot 0 all zeros (the base model).
Which slot each row uses is not a weight of the model: the decode step sets it around one forward
(`AdapterRows.selected`), per thread, so another thread running the same model (the server's Inspect)
sees no selection and runs the base. The update of a row is gathered from its slot (vLLM's punica
BGMV, in torch): `x (B, T, in) @ A[slot]ᵀ @ B[slot]ᵀ`, one batched matmul for all rows; a batch on
one slot multiplies by that slot's matrices alone, and a batch on the base adds nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn as nn

_ROWS = "adapter_rows"  # attribute set on a model carrying a MultiLoraLinear bank


class AdapterRows(threading.local):
    """The adapters a model serves (`names`: slot i + 1 is names[i]; slot 0 is the base) and, during one
    forward on this thread, each row's slot: a LongTensor (B,), one int for every row, or None (the base)."""

    def __init__(self, names: tuple[str, ...] = ()):
        self.names = names
        self.index: torch.Tensor | int | None = None

    @contextlib.contextmanager
    def selected(self, index: torch.Tensor | int | None) -> Iterator[None]:
        """Rows use the slots of `index` inside the block (a nested selection is restored after it)."""
        before, self.index = self.index, index
        try:
            yield
        finally:
            self.index = before


def adapter_rows(model: nn.Module) -> AdapterRows | None:
    """The selection object of a model carrying several adapters (gptwo.lora.load_adapters), or None."""
    return getattr(model, _ROWS, None)


def attach_rows(model: nn.Module, rows: AdapterRows) -> None:
    setattr(model, _ROWS, rows)


class MultiLoraLinear(nn.Module):
    """`base_layer(x)` plus, for each row, `x @ A[slot]ᵀ @ B[slot]ᵀ` with the row's slot from `rows`."""

    def __init__(self, base_layer: nn.Module, a: torch.Tensor, b: torch.Tensor, rows: AdapterRows):
        """`a` (slots, r, in) and `b` (slots, out, r, scaling folded in), slot 0 zero."""
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("lora_a", a.float().contiguous())
        self.register_buffer("lora_b", b.float().contiguous())
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        index = self.rows.index
        if index is None or (isinstance(index, int) and index == 0):
            return y
        h = x.float()
        if isinstance(index, int):  # every row on one adapter: its own matrices, no gather
            update = (h @ self.lora_a[index].t()) @ self.lora_b[index].t()
        else:  # (B, T, in) @ (B, in, r) @ (B, r, out)
            flat = h.reshape(h.shape[0], -1, h.shape[-1])
            update = torch.bmm(torch.bmm(flat, self.lora_a[index].transpose(1, 2)), self.lora_b[index].transpose(1, 2))
            update = update.reshape(*x.shape[:-1], update.shape[-1])
        return y + update.to(y.dtype)
