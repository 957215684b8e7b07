"""Drop-in replacements for `nn.Linear` at inference: pre-transposed weights and int8 weight-only."""

from __future__ import annotations

import torch
import torch.nn as nn


class TransposedLinear(nn.Module):
    """`y = x @ W + b` with W stored (in, out): a batch-1 matvec streams W row by row (measured faster than F.linear)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or linear.weight.dtype
        self.register_buffer("weight_t", linear.weight.detach().t().to(dtype).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.weight_t.dtype)
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: `weight (out, in) ≈ q * scales[:, None]`, |q| ≤ 127."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """Weight-only int8 linear: int8 weights with one scale per output channel, activations in `compute_dtype`.

    Runs torch's `_weight_int8pack_mm` (int8 weights dequantized in the kernel, fp32 accumulation).
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        q, scales = quantize_int8(linear.weight)
        self.register_buffer("qweight", q.to(linear.weight.device))
        self.register_buffer("scales", scales.to(device=linear.weight.device, dtype=compute_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.scales.dtype)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])
