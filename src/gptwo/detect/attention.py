"""Attention weights of a GPT, by the decode step's explicit path, used only when asked (the Inspect view).

The step's fused scaled-dot-product attention never forms the weights. Here the torch decode step
(gptwo.infer.torch_step) runs the text through the model's own modules over a paged cache of its own,
with attention computed explicitly — softmax(q kᵀ / √d + causal mask) @ v — and each layer's weights
kept. Nothing is attached to the model (no hooks), so a model that is serving requests in another
thread is not disturbed. `tests/detect` checks that `c_proj(weights @ v)` equals the block's attention
output and that the logits equal `model(idx)`.
"""

from __future__ import annotations

import math

import torch

from gptwo.errors import GptwoError
from gptwo.infer.kvcache import blocks_for
from gptwo.infer.step import StepInput, make_step


def attention_weights(block: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention weights (B, n_head, T, T) of one block for its `ln_1` output `h` (B, T, C), and its values."""
    attn = block.attn
    B, T, C = h.shape
    q, k, v = attn.c_attn(h).split(attn.n_embd, dim=2)
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // attn.n_head)
    causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1), v


def attention_output(block: torch.nn.Module, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention sublayer's output from explicit weights: c_proj(weights @ v), heads merged."""
    B, H, T, D = v.shape
    return block.attn.c_proj((weights @ v).transpose(1, 2).reshape(B, T, H * D))


@torch.no_grad()
def forward_with_attention(model: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, vocab) and attention weights (n_layer, B, n_head, T, T) of token ids `idx` (B, T)."""
    B, T = idx.shape
    if T > model.config.block_size:
        raise GptwoError(
            f"{T} tokens exceed the model's context of {model.config.block_size}", "inspect a shorter text"
        )
    step = make_step(model, B * blocks_for(T) + 1, use_native=False)  # explicit weights: the torch step
    seqs = [step.cache.start([]) for _ in range(B)]
    for seq in seqs:
        step.cache.grow(seq, T)
    maps: list[torch.Tensor] = []
    tables = [seq.blocks for seq in seqs]
    logits = step(StepInput(idx.tolist(), [0] * B, tables, every=[True] * B), attention_weights=maps)
    return logits.view(B, T, -1), torch.stack([m[..., :T] for m in maps])
