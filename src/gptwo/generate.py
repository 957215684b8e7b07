"""Text from a GPT: batches of prompts as text, stop strings and streaming, and what `gptwo generate` prints.

The decoding loop and sampling are in gptwo.sampling; stop strings and text deltas in gptwo.text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch

from gptwo.errors import GptwoError
from gptwo.model import GPT
from gptwo.sampling import check_sampling, generate, pad_left, stream_tokens  # noqa: F401 - generate, pad_left: public here too
from gptwo.text import TextStream, check_stops, encode_prompt
from gptwo.tokenizer import Tokenizer

__all__ = ["complete", "generate", "generate_cli_stream", "pad_left", "stream_texts"]


def stream_texts(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    stop: Sequence[str] | None = None,
    stop_at_eot: bool = True,
    seed: int | None = None,
) -> Iterator[list[str]]:
    """Sample continuations of several prompts as a batch; yield each step's new text per prompt."""
    check_stops(stop or ())
    token_lists = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    device = model.transformer.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    streams = [TextStream(tokenizer, stop or (), stop_at_eot) for _ in token_lists]
    for next_ids, _ in stream_tokens(
        model, token_lists, max_new_tokens, temperature, top_k, top_p, generator=generator
    ):
        yield [s.push(int(t)) for s, t in zip(streams, next_ids.tolist())]
        if all(s.finished for s in streams):
            return
    yield [s.close() for s in streams]


def complete(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int, **kwargs) -> list[str]:
    """The sampled continuation of each prompt, as text (see `stream_texts` for options)."""
    out = ["" for _ in prompts]
    for pieces in stream_texts(model, tokenizer, prompts, max_new_tokens, **kwargs):
        out = [o + p for o, p in zip(out, pieces)]
    return out


def generate_cli_stream(
    model_spec: str,
    prompt: str,
    *,
    num_samples: int = 1,
    device: str = "auto",
    seed: int | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    **kwargs,
) -> Iterator[str]:
    """What `gptwo generate` prints: each sample's continuation, streamed, samples separated by a rule."""
    from gptwo.weights import load_model

    check_sampling(
        kwargs.get("max_new_tokens", 0), kwargs.get("temperature", 1.0), kwargs.get("top_k"), kwargs.get("top_p")
    )
    check_stops(kwargs.get("stop") or ())
    if num_samples < 1:
        raise GptwoError(f"--num-samples {num_samples} must be at least 1", "ask for one sample or more")
    model, tokenizer = load_model(model_spec, device=device, dtype=dtype, quantize=quantize)
    tokens = encode_prompt(tokenizer, prompt)
    if len(tokens) > model.config.block_size:
        print(
            f"note: the prompt has {len(tokens)} tokens; the model sees the last {model.config.block_size * 3 // 4}",
            file=sys.stderr,
        )
    max_new_tokens = kwargs.pop("max_new_tokens")
    for sample in range(num_samples):
        if sample:
            yield "\n" + "-" * 40 + "\n"
        for pieces in stream_texts(
            model, tokenizer, [tokens], max_new_tokens, seed=None if seed is None else seed + sample, **kwargs
        ):
            yield pieces[0]
