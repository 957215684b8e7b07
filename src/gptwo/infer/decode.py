"""A decoder over a static KV cache: prefill once, then one token per step, optionally `torch.compile`d.

It walks the model's own modules (so prepared/quantized linears apply) but skips what the general
`generate` loop needs for ragged batches (padding masks, position cumsums, cache growth): prompts of
one length, positions given directly. With `compile=True` the single-token step is compiled once
for fixed shapes (the cache is preallocated to `max_len`, attention masks the unused slots).
`compile="max-autotune-frozen"` also freezes the weights into the compiled step (the KV cache,
mutated, stays a buffer) so Inductor's C++ GEMM template takes the matmuls: faster for int8 on CPU.
At batch 1 on a CPU, a model prepared with native linears runs each step as one C call instead
(`native.NativeStep`: the whole forward over its own fp32 cache), unless compiling was asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptwo.errors import GptwoError
from gptwo.generate import check_sampling, sample_next
from gptwo.infer.native import NativeStep
from gptwo.model import GPT

FROZEN = "max-autotune-frozen"  # compile mode: Inductor freezing + its C++ GEMM template (docs/inference.md)
FROZEN_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}


class Decoder(torch.nn.Module):
    """Greedy or sampled decoding of a batch of equal-length prompts with a static KV cache.

    A module, so the cache is a buffer: CUDA graphs (compile mode 'reduce-overhead') keep it in place.
    """

    def __init__(self, model: GPT, batch_size: int = 1, max_len: int | None = None, compile: bool | str = False):
        super().__init__()
        config = model.config
        self.model, self.batch_size = model, batch_size
        self.max_len = min(max_len or config.block_size, config.block_size)
        dtype, device = model.transformer.wte.weight.dtype, model.transformer.wte.weight.device
        self.native = (
            NativeStep(model, self.max_len) if batch_size == 1 and not compile and NativeStep.supports(model) else None
        )
        shape = (config.n_layer, batch_size, config.n_head, 0 if self.native else self.max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(self.max_len, device=device), persistent=False)
        self.compiled, self.frozen = bool(compile), compile == FROZEN
        mode = compile if isinstance(compile, str) and not self.frozen else None
        options = FROZEN_OPTIONS if self.frozen else None
        self._step = (
            torch.compile(self._static_step, mode=mode, options=options, fullgraph=True, dynamic=False)
            if compile
            else self._static_step
        )

    def forward(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        """Last-position logits (B, vocab) for `idx` (B, T) continuing `start` cached tokens; writes the cache."""
        if self.native is not None:
            return self.native(idx, start)
        return self._run(idx, torch.arange(start, start + idx.shape[1], device=idx.device), static=False)

    def _static_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token (B, 1) at position `pos` (1,), attending over the whole masked cache: fixed shapes for compile."""
        return self._run(token, pos, static=True)

    def _run(self, idx: torch.Tensor, pos: torch.Tensor, static: bool) -> torch.Tensor:
        tf, (B, T), n_head, n_embd = (
            self.model.transformer,
            idx.shape,
            self.model.config.n_head,
            self.model.config.n_embd,
        )
        x = tf.wte(idx) + tf.wpe(pos)
        end = None if static else int(pos[-1]) + 1  # eager: attend over the written slots only
        mask = (
            self.slots[None, :end] <= pos[:, None] if (static or T > 1) else None
        )  # (T, slots); one new token sees all
        for layer, block in enumerate(tf.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(n_embd, dim=2)
            q, k, v = (t.view(B, T, n_head, n_embd // n_head).transpose(1, 2) for t in (q, k, v))
            self.k[layer].index_copy_(2, pos, k)
            self.v[layer].index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], attn_mask=mask)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, n_embd))
            x = x + block.mlp(block.ln_2(x))
        return self.model.lm_head(tf.ln_f(x[:, -1:]))[:, -1]

    def _compiled_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The compiled step; in FROZEN mode Dynamo must see `freezing` set while tracing,
        to fold the weights in as constants."""
        if not self.frozen:
            return self._step(token, pos)
        with torch._inductor.config.patch(freezing=True):
            return self._step(token, pos)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`idx` (B, T) followed by `max_new_tokens` tokens; temperature 0 (the default) is greedy."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        B, T = idx.shape
        if B != self.batch_size:
            raise GptwoError(
                f"a batch of {B} prompts was given to a decoder built for {self.batch_size}",
                f"build Decoder(model, batch_size={B})",
            )
        if T + max_new_tokens > self.max_len:
            raise GptwoError(
                f"{T} prompt tokens + {max_new_tokens} new ones exceed the decoder's {self.max_len} slots",
                "ask for fewer tokens or a larger max_len",
            )
        if max_new_tokens == 0:
            return idx
        logits = self.forward(idx, 0)
        out = [sample_next(logits, temperature, top_k, top_p, generator)]
        for step in range(1, max_new_tokens):
            pos = torch.tensor([T + step - 1], device=idx.device)
            logits = (
                self._compiled_step(out[-1][:, None], pos)
                if self.compiled
                else self.forward(out[-1][:, None], T + step - 1)
            )
            out.append(sample_next(logits, temperature, top_k, top_p, generator))
        return torch.cat([idx, torch.stack(out, dim=1)], dim=1)
