"""How a training step is made fast, decided in one place for `gptwo train` and `gptwo bench train`.

torch.compile of the step's loss (model and cross-entropy in one graph, alone or under DDP; one unit
per block under FSDP, as torchtitan does), fused AdamW, bf16 autocast where it pays; on a CPU, oneDNN
float32 linears, the compiled step traced under `CpuStepOps`, and glibc keeping freed memory.
Applied from outside the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import shutil
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from gptwo.config import TrainConfig
from gptwo.runtime import native_bf16  # noqa: F401 - the one probe; train code and its callers use it from here

# Compiling costs ~10-40 s on a CPU; below this many steps a run finishes sooner in eager mode.
CPU_COMPILE_MIN_STEPS = 1000


def compile_enabled(config: TrainConfig, device: torch.device, steps: int) -> bool:
    """Compile when asked to, or (auto) on CUDA, or on a CPU with a C compiler for a run of many steps."""
    if config.compile != "auto":
        return config.compile == "true"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and steps >= CPU_COMPILE_MIN_STEPS and shutil.which("cc") is not None


def compiled_loss(loss: Callable, config: TrainConfig, device: torch.device) -> Callable:
    """`loss(model, x, y)` compiled whole: the logits' float cast and the cross-entropy fuse with the model's
    last matmul.

    On a CPU the step is traced under `CpuStepOps` (GELU, embeddings and, in bf16, attention in
    the forms Inductor's CPU code runs fastest; the model file keeps the plain calls).
    """
    if device.type != "cpu":
        return torch.compile(loss)
    bf16 = use_bf16(config, device)

    def on_cpu(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # MATH: attention the mode leaves alone (a mask, dropout) is traced as matmuls, not the fused kernel
        with CpuStepOps(attention=bf16), sdpa_kernel(SDPBackend.MATH) if bf16 else contextlib.nullcontext():
            return loss(model, x, y)

    return torch.compile(on_cpu)


class CpuStepOps(TorchFunctionMode):
    """Inside a compiled CPU training step, three calls of the model traced in a faster, equal form.

    - `F.gelu(x, approximate="tanh")` as x·σ(2u), u = √(2/π)(x + 0.044715x³): the same function
      (½(1 + tanh u) = σ(2u)), which Inductor's CPU code computes with exp instead of a slower
      vectorised tanh (forward and backward of a 2,048 × 512 bf16 block: 0.70 ms against 1.53).
    - `F.embedding` through `gptwo::embedding`, whose backward is torch's own kernel: Inductor
      writes the gradient's scatter as one atomic add per element (2.8 ms a step at the `cpu`
      preset's shape against 0.2).
    - with `attention` (bf16 autocast), causal `F.scaled_dot_product_attention` without a mask or
      dropout as bf16 matmuls around a float32 softmax, the causal mask computed from indices: the
      math kernel torch would trace instead upcasts q, k and v to float32 (float32 batched matmuls)
      and builds its mask as a tensor.

    Anything else (a mask, dropout, other GELUs) passes through unchanged.
    """

    def __init__(self, attention: bool = False):
        super().__init__()
        self.attention = attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.gelu and kwargs.get("approximate") == "tanh" and len(args) == 1:
            return sigmoid_gelu(args[0])
        if func is F.embedding and _plain_embedding(args, kwargs):
            return embedding(args[1], args[0])
        if func is F.scaled_dot_product_attention and self.attention and _plain_causal(args, kwargs):
            return causal_attention(*args)
        return func(*args, **kwargs)


def _plain_embedding(args: tuple, kwargs: dict) -> bool:
    """`F.embedding(idx, weight)` with none of its options (as nn.Embedding passes them, positionally)."""
    options = dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args[2:]), **kwargs)
    return (
        len(args) >= 2
        and options.get("padding_idx") is None
        and options.get("max_norm") is None
        and not options.get("scale_grad_by_freq")
        and not options.get("sparse")
    )


def _plain_causal(args: tuple, kwargs: dict) -> bool:
    """`F.scaled_dot_product_attention(q, k, v, is_causal=True)` over equally many queries and keys, without a
    mask or dropout."""
    if len(args) != 3 or set(kwargs) - {"attn_mask", "dropout_p", "is_causal"}:
        return False
    return (
        kwargs.get("is_causal", False)
        and kwargs.get("attn_mask") is None
        and not kwargs.get("dropout_p", 0.0)
        and args[0].shape[-2] == args[1].shape[-2]
    )


_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written as x·σ(2u): equal to `F.gelu(x, approximate="tanh")` up to float rounding."""
    return x * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d + causal mask) v for as many queries as keys, with the matmuls in the autocast dtype
    and the softmax in float32."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    scores = ((q * (1.0 / math.sqrt(q.shape[-1]))).to(dtype) @ k.to(dtype).transpose(-2, -1)).float()
    i = torch.arange(q.shape[-2], device=q.device)
    probs = torch.softmax(scores.masked_fill(i[None, :] > i[:, None], float("-inf")), dim=-1)
    return probs.to(dtype) @ v.to(dtype)


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


def onednn_available() -> bool:
    """Whether this torch has oneDNN's dense linear kernel (the one Inductor calls for CPU linears)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn_linears(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> bool:
    """On a CPU in float32, run every `nn.Linear` of `model` through oneDNN, forward and backward; True if applied.

    torch sends float32 matmuls to MKL, which on AMD CPUs runs its AVX2 code: measured at the training
    shapes on an AVX-512 AMD core, 82-95 GFLOP/s against 234 for oneDNN's AVX-512 kernel
    (docs/training.md, *Speed*).
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
        grad_w = (
            onednn_linear(x.t(), grad.t(), None).t().contiguous() if narrow_x else onednn_linear(grad.t(), x.t(), None)
        )
    grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


# An op of its own, so Inductor calls torch's embedding backward instead of writing its scatter.
@torch.library.custom_op("gptwo::embedding", mutates_args=())
def embedding(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`F.embedding(idx, weight)`: rows of `weight`."""
    return F.embedding(idx, weight)


@embedding.register_fake
def _(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(*idx.shape, weight.shape[1])


@torch.library.custom_op("gptwo::embedding_backward", mutates_args=())
def embedding_backward(grad: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """The gradient of `embedding` for its weight: `grad`'s rows summed into the rows `idx` names."""
    return torch.ops.aten.embedding_dense_backward(grad, idx, rows, -1, False)


@embedding_backward.register_fake
def _(grad: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
    return grad.new_empty(rows, grad.shape[-1])


def _embedding_setup(ctx, inputs, output) -> None:
    weight, idx = inputs
    ctx.save_for_backward(idx)
    ctx.rows = weight.shape[0]


def _embedding_grad(ctx, grad: torch.Tensor):
    (idx,) = ctx.saved_tensors
    return (embedding_backward(grad, idx, ctx.rows) if ctx.needs_input_grad[0] else None), None


embedding.register_autograd(_embedding_grad, setup_context=_embedding_setup)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(device: torch.device) -> bool:
    """On a Linux CPU, have glibc's malloc keep freed blocks for the next step; True if applied.

    By default glibc gives each block of a few MB or more its own mmap and returns it to the system
    when freed, so every step page-faults its activations in again: 5,700 page faults a step at the
    `cpu` preset's shape, 0 with blocks up to 256 MB served from the heap and up to 1 GB of free heap
    kept (docs/training.md, *Speed*). Process-wide, as `GLIBC_TUNABLES` would set it.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
