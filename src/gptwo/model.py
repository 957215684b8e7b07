"""GPT-2, exactly: a decoder-only transformer (Radford et al., 2019), with a KV cache for generation.

Pre-LayerNorm blocks, learned position embeddings, GELU (tanh approximation), tied input/output
embeddings and a final LayerNorm. Parameter names follow the Hugging Face GPT-2 checkpoints (with
`nn.Linear` weights, i.e. the transpose of their `Conv1D`). Nothing here knows about devices,
files or parallelism: those are applied from outside (weights.py, train/, serve/).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptwo.config import GPTConfig
from gptwo.errors import GptwoError


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


def _read_number(path: str, key: str | None = None) -> int | None:
    """An integer from a /proc or cgroup file: the whole file, or the value on the line starting with `key`."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if key is None:
                    return int(parts[0]) if parts and parts[0].isdigit() else None
                if parts and parts[0].rstrip(":") == key:
                    return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes that can still be allocated on `device` (host memory by default), or None when it cannot be told.

    Host: the kernel's MemAvailable, lowered to what a cgroup (v2) memory limit leaves; elsewhere the
    free physical pages. CUDA: the device's free memory.
    """
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    found = []
    meminfo = _read_number("/proc/meminfo", "MemAvailable")
    if meminfo is None:
        try:
            meminfo = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            meminfo = None
    if meminfo is not None:
        found.append(meminfo)
    limit = _read_number("/sys/fs/cgroup/memory.max")  # "max" (no limit) reads as None
    if limit is not None:
        used = _read_number("/sys/fs/cgroup/memory.stat", "anon")  # page cache can be reclaimed, so only anon counts
        found.append(max(0, limit - (used or 0)))
    return min(found) if found else None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.0f} MiB"


def check_memory(nbytes: int, what: str, fix: str, device: torch.device | str | None = None) -> None:
    """Refuse, with one line naming `what`, to allocate `nbytes` when `device` has less memory available."""
    if nbytes < 2**28:  # a quarter GiB: not worth probing
        return
    free = available_memory(device)
    if free is not None and nbytes > free:
        where = "" if torch.device(device or "cpu").type == "cpu" else f" on {device}"
        raise GptwoError(f"{what} needs about {_gib(nbytes)} of memory but {_gib(free)} is available{where}", fix)


SHAPE_FIX = "choose a smaller n_layer, n_embd, vocabulary or context (block_size), or free memory"


def describe(config: GPTConfig) -> str:
    """'a GPT-2 of N parameters (LxE, vocabulary V, context T)' for messages."""
    return (
        f"a GPT-2 of {param_count(config):,} parameters ({config.n_layer} layers x {config.n_embd} wide, "
        f"vocabulary {config.vocab_size:,}, context {config.block_size:,})"
    )


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` slots of a batch.

    All rows write the same slot at each step; `valid` marks which slots hold real tokens (left
    padding and finished rows are invalid), so prompts of different lengths share one cache.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        check_memory(
            2 * math.prod(shape) * itemsize,
            f"a key/value cache of {batch_size} x {max_len:,} positions for {describe(config)}",
            "use fewer prompts at once or a model with a shorter context",
            device,
        )
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots written so far

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values for `layer` and return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value projections
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)
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

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
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
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T); (B, 1, vocab) for the last position with `last_only`.

        `valid` (B, T, bool) marks real tokens among padding; positions count real tokens only.
        With a `cache`, `idx` continues the tokens already in it and their keys/values are kept.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise GptwoError(
                f"{start + T} tokens exceed the model's context of {self.config.block_size}", "shorten the input"
            )
        mask = None
        if cache is None and valid is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        else:
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            if cache is not None:
                cache.valid[:, start : start + T] = valid
                valid = cache.valid[:, : start + T]
            pos = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            slot = torch.arange(start + T, device=idx.device)
            causal = slot[None, :] <= slot[start:, None]  # (T, start+T)
            diagonal = slot[None, :] == slot[start:, None]  # padding attends to itself, never to nothing
            mask = ((causal & valid[:, None, :]) | diagonal)[:, None]  # (B, 1, T, start+T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Continue `idx` (B, T) by `max_new_tokens` tokens; see `gptwo.generate.generate` for all options."""
        from gptwo.generate import generate

        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_id: str, **kwargs) -> GPT:
        """Load Hugging Face GPT-2 format weights from a folder or a hub id (see `gptwo.weights`)."""
        from gptwo.weights import load_pretrained

        return load_pretrained(path_or_id, **kwargs)

    def save_pretrained(self, directory: str, **kwargs) -> None:
        """Write `config.json` + `model.safetensors` in the Hugging Face GPT-2 layout."""
        from gptwo.weights import save_pretrained

        save_pretrained(self, directory, **kwargs)
