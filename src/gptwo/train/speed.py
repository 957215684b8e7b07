"""How a training step is made fast, decided in one place for `gptwo train` and `gptwo bench train`.

torch.compile of the step's loss (model and cross-entropy in one graph, alone or under DDP; one unit
per block under FSDP, as torchtitan does), fused AdamW, and bf16 autocast where it pays. Applied
from outside the model.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptwo.config import TrainConfig

# Compiling costs ~10-40 s on a CPU; below this many steps a run finishes sooner in eager mode.
CPU_COMPILE_MIN_STEPS = 1000


def compile_enabled(config: TrainConfig, device: torch.device, steps: int) -> bool:
    """Compile when asked to, or (auto) on CUDA, or on a CPU with a C compiler for a run of many steps."""
    if config.compile != "auto":
        return config.compile == "true"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and steps >= CPU_COMPILE_MIN_STEPS and shutil.which("cc") is not None


def compiled_loss(loss: Callable, matmul_attention: bool = False) -> Callable:
    """`loss(model, x, y)` compiled whole: the logits' float cast and the cross-entropy fuse with the model's last matmul.

    With `matmul_attention`, attention is traced as plain matmuls and a softmax that Inductor fuses,
    instead of torch's fused CPU kernel (whose bf16 backward is slow; see `math_attention`).
    """
    if not matmul_attention:
        return torch.compile(loss)

    def with_math_attention(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return loss(model, x, y)

    return torch.compile(with_math_attention)


def math_attention(config: TrainConfig, device: torch.device) -> bool:
    """Compile attention as matmuls + softmax for bf16 on a CPU: the fused CPU kernel's bf16 backward
    took 2x its float32 time here, and the compiled bf16 step went from 0.110 to 0.086 CPU-s."""
    return device.type == "cpu" and use_bf16(config, device)


def compile_model(model: torch.nn.Module, per_block: bool = False) -> torch.nn.Module:
    """torch.compile the model in place (its state_dict keeps its names); per block for FSDP units."""
    for block in model.transformer.h if per_block else [model]:
        block.compile()
    return model


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: asked for, or (auto) on CUDA."""
    return config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda")


def autocast(config: TrainConfig, device: torch.device):
    """The forward pass's autocast context (weights and optimizer state stay float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(config, device) else contextlib.nullcontext()


def use_fused_adamw(device: torch.device, parallel: str | None) -> bool:
    """Fused AdamW (one kernel over all parameters) on CUDA and CPU, except on FSDP's sharded parameters."""
    return device.type in ("cuda", "cpu") and parallel != "fsdp"


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast speeds training up."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def onednn_available() -> bool:
    """Whether this torch has oneDNN's dense linear kernel (the one Inductor calls for CPU linears)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn_linears(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> bool:
    """On a CPU in float32, run every `nn.Linear` of `model` through oneDNN, forward and backward; True if applied.

    torch sends float32 matmuls to MKL, which on AMD CPUs runs its AVX2 code: 82-95 GFLOP/s per core
    on this project's Zen 5, where oneDNN's AVX-512 kernel reaches 234 (docs/training.md, *Speed*).
    The weights and the state_dict stay as they are; under bf16 autocast nothing changes.
    """
    if device.type != "cpu" or use_bf16(config, device) or not onednn_available():
        return False
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = functools.partial(_onednn_linear_forward, module)
    return True


def _onednn_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` with oneDNN's float32 kernel; F.linear for other dtypes and under autocast."""
    if x.dtype != torch.float32 or module.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return F.linear(x, module.weight, module.bias)
    y = onednn_linear(x.reshape(-1, x.shape[-1]), module.weight, module.bias)
    return y.view(*x.shape[:-1], y.shape[-1])


# An op of its own, so Inductor calls it as it is (its lowering of oneDNN's op wants frozen weights).
@torch.library.custom_op("gptwo::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for 2-D float32 x (any strides) with oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _onednn_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad: torch.Tensor):
    """dx = grad W and dW = gradᵀ x, both in oneDNN; db = the rows' sum.

    oneDNN copies a strided left operand, so dW is computed as (xᵀ grad)ᵀ where x is the narrower
    (the head's dW took 12 ms this way against 29 ms as gradᵀ x, at 2,048 rows × 4,096).
    """
    x, weight = ctx.saved_tensors
    grad_x = onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        narrow_x = x.shape[1] < grad.shape[1]
        grad_w = onednn_linear(x.t(), grad.t(), None).t().contiguous() if narrow_x else onednn_linear(grad.t(), x.t(), None)
    grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)
