"""Helpers for the tests that use LoRA adapters (tests/lora, tests/serve): a saved adapter with random, non-zero
A and B, so it changes every layer it targets. Importable from any test module (tests/ is on sys.path)."""

from __future__ import annotations

import torch

from gptwo import GPT
from gptwo.lora import LoraSettings, apply_lora, save_adapter


def save_random_adapter(
    base_dir: str, out: str, rank: int, targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc"), seed: int = 0
) -> str:
    """An adapter folder at `out` for the model in `base_dir`: rank `rank`, alpha 2·rank, A and B ~ N(0, 0.3²)."""
    model = GPT.from_pretrained(base_dir)
    settings = LoraSettings(rank=rank, alpha=2.0 * rank, targets=targets)
    apply_lora(model, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    save_adapter(out, settings, model.state_dict(), base_model=base_dir)
    return out
