"""AdamW with GPT-3's settings, its learning-rate schedule, and the FLOPs count behind MFU."""

from __future__ import annotations

import math

import torch

from gptwo.config import GPTConfig, TrainConfig

# Dense bf16 peak FLOP/s by GPU name (vendor data sheets), for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989.5e12,
    "H100": 989.5e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "A10G": 70e12,
    "L4": 121e12,
    "4090": 165.2e12,
    "3090": 71e12,
}


def make_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW, weight decay on 2-D weights only (matmuls and embeddings), not on biases or LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, fused=fused or None)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls over weights plus 12·L·H·Q·T for attention
    (PaLM, Chowdhery et al. 2022, appendix B; as in nanoGPT's estimate_mfu)."""
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


def peak_flops(device: torch.device, override: float = 0.0) -> float:
    """Peak bf16 FLOP/s of the accelerator, 0 when unknown (then MFU is not shown)."""
    if override:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), 0.0)
