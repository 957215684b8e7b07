"""Drop-in replacements for `nn.Linear` at inference: native-kernel, pre-transposed and int8 weight-only."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptwo.infer import native

NATIVE_MAX_ROWS = 16  # up to this many rows the native GEMV runs; beyond, torch's GEMM (prefill, eval, serving batches)


class TransposedLinear(nn.Module):
    """`y = x @ W + b` with W stored (in, out): a batch-1 matvec streams W row by row
    (measured faster than F.linear)."""

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


class NativeLinear(nn.Module):
    """A linear layer on gptwo's native kernels (infer/native.py) for a few rows, torch's matmul for many.

    Weights `w` stay (out, in) as nn.Linear keeps them (fp32 and bf16 share the model's tensor, no copy);
    int8 is weight-only with fp32 per-output-channel scales. `kind` names the native kernel. (Not called
    `weight`: the head's `weight` stays the tied token embedding.)
    """

    def __init__(self, linear: nn.Linear, kind: int):
        super().__init__()
        self.kind = kind
        if kind in (native.I8, native.I8_VNNI, native.I8_W16):
            q, scales = quantize_int8(linear.weight)
            self.register_buffer("w", q.to(linear.weight.device))
            self.register_buffer("scales", scales.to(linear.weight.device))
            # torch's int8 kernel (more rows, or under torch.compile) takes bf16 scales: converted once here,
            # since Inductor cannot lower `_weight_int8pack_mm` over a converted-in-graph input
            self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16))
        else:
            self.register_buffer("w", linear.weight.detach().contiguous())
            self.register_buffer("scales", None)
            self.register_buffer("scales_bf16", None)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if (
            flat.shape[0] <= NATIVE_MAX_ROWS and flat.device.type == "cpu" and not torch.compiler.is_compiling()
        ):  # Dynamo cannot trace ctypes
            y = native.linear(self.kind, self.w, self.scales, self.bias, flat.float().contiguous())
        elif self.scales is not None:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.w, self.scales_bf16).float()
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(flat.to(self.w.dtype), self.w, None if self.bias is None else self.bias.to(self.w.dtype))
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
