"""GPT-2, exactly: a decoder-only transformer (Radford et al., 2019).

Pre-LayerNorm blocks, learned position embeddings, GELU (tanh approximation), tied input/output
embeddings and a final LayerNorm. Parameter names follow the Hugging Face GPT-2 checkpoints (with
`nn.Linear` weights, i.e. the transpose of their `Conv1D`). Nothing here knows about devices,
files, parallelism or how keys and values are kept between steps: a decode step passes the tokens'
positions and a view of its KV cache (`attend(layer, q, k, v)`: store this step's keys/values,
attend over the sequence's), applied from outside (gptwo.infer.step, weights.py, train/, serve/).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptwo.config import GPTConfig
from gptwo.errors import GptwoError
from gptwo.runtime import check_memory


# ---------------------------------------------------------------- sizes and memory, before anything is allocated
def param_count(config: GPTConfig) -> int:
    """Parameters of a GPT of `config`, counted from its shape (the tied head once), without building it."""
    e = config.n_embd
    per_layer = 12 * e * e + 13 * e  # ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj (weights and biases)
    return (config.vocab_size + config.block_size) * e + config.n_layer * per_layer + 2 * e


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a GPT's state dict (our names and layout; lm_head left out, it is wte)."""
    e = config.n_embd
    layer = {
        "ln_1.weight": (e,),
        "ln_1.bias": (e,),
        "attn.c_attn.weight": (3 * e, e),
        "attn.c_attn.bias": (3 * e,),
        "attn.c_proj.weight": (e, e),
        "attn.c_proj.bias": (e,),
        "ln_2.weight": (e,),
        "ln_2.bias": (e,),
        "mlp.c_fc.weight": (4 * e, e),
        "mlp.c_fc.bias": (4 * e,),
        "mlp.c_proj.weight": (e, 4 * e),
        "mlp.c_proj.bias": (e,),
    }
    shapes = {"transformer.wte.weight": (config.vocab_size, e), "transformer.wpe.weight": (config.block_size, e)}
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update({"transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)})
    return shapes


SHAPE_FIX = "choose a smaller n_layer, n_embd, vocabulary or context (block_size), or free memory"


def describe(config: GPTConfig) -> str:
    """'a GPT-2 of N parameters (LxE, vocabulary V, context T)' for messages."""
    return (
        f"a GPT-2 of {param_count(config):,} parameters ({config.n_layer} layers x {config.n_embd} wide, "
        f"vocabulary {config.vocab_size:,}, context {config.block_size:,})"
    )


class CacheView(Protocol):
    """What attention needs from a KV cache during one step (gptwo.infer.torch_step implements it)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's keys/values `k`, `v` (B, n_head, T, head_dim) of `layer`; return the attention
        output (B, n_head, T, head_dim) of queries `q` over each sequence's keys/values up to each query."""
        ...


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value projections
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: CacheView | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = cache.attend(layer, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: CacheView | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        device = torch.get_default_device()
        if device.type != "meta":  # the meta device allocates nothing
            check_memory(param_count(config) * torch.get_default_dtype().itemsize, describe(config), SHAPE_FIX, device)
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(N), N = 2 residual additions per layer.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie_weights(self) -> None:
        """Share one matrix between the token embedding and the output layer, as GPT-2 does."""
        self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # GPT-2's TF code: wte stddev 0.02, wpe stddev 0.01.
            nn.init.normal_(module.weight, mean=0.0, std=0.01 if module is self.transformer.wpe else 0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (token embeddings count once, as the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: CacheView | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T); (B, 1, vocab) for the last position with `last_only`.

        Without a `cache`, each row is one whole sequence from position 0. A decode step passes the
        tokens' `positions` (B, T) and its cache's view, through which the tokens see their sequence's
        earlier keys and values (gptwo.infer.step).
        """
        x = self.hidden_states(idx, positions, cache)
        return self.logits(x[:, -1:] if last_only else x)

    def hidden_states(
        self, idx: torch.Tensor, positions: torch.Tensor | None = None, cache: CacheView | None = None
    ) -> torch.Tensor:
        """The last block's output (B, T, n_embd), before the final LayerNorm."""
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise GptwoError(
                    f"{T} tokens exceed the model's context of {self.config.block_size}", "shorten the input"
                )
            positions = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits for hidden states (…, n_embd)."""
        return self.lm_head(self.transformer.ln_f(hidden))
