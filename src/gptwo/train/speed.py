"""How a training step is made fast, decided in one place for `gptwo train` and `gptwo bench train`.

torch.compile of the step's loss (model and cross-entropy in one graph, alone or under DDP; one unit
per block under FSDP, as torchtitan does), fused AdamW, and bf16 autocast where it pays. Applied
from outside the model.
"""

from __future__ import annotations

import contextlib
import shutil
from typing import Callable

import torch

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


def compiled_loss(loss: Callable) -> Callable:
    """`loss(model, x, y)` compiled whole: the logits' float cast and the cross-entropy fuse with the model's last matmul."""
    return torch.compile(loss)


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
