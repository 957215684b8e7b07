"""Text from a GPT: batches of prompts as text, stop strings and streaming, and what `gptwo generate` prints.

The decoding loop and sampling are in gptwo.sampling; stop strings and text deltas in gptwo.text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch

from gptwo.errors import GptwoError
from gptwo.model import GPT
from gptwo.sampling import (  # noqa: F401 - generate, pad_left: public here too
    LogitControls,
    check_sampling,
    generate,
    pad_left,
    stream_tokens,
)
from gptwo.speculative import NgramDraft, SpeculationStats, speculative_tokens
from gptwo.text import TextStream, check_stops, encode_prompt
from gptwo.tokenizer import Tokenizer
from gptwo.watermark import WatermarkSettings

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
    watermark: WatermarkSettings | None = None,
    controls: LogitControls | None = None,
) -> Iterator[list[str]]:
    """Sample continuations of several prompts as a batch; yield each step's new text per prompt.

    `watermark` marks every continuation (gptwo.watermark); `controls` bias and penalise the logits
    (gptwo.sampling.LogitControls; min_tokens bans end-of-text). With `stop_at_eot=False` an end-of-text
    shows as <|endoftext|> and generation goes on."""
    check_stops(stop or ())
    token_lists = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    device = model.transformer.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    streams = [TextStream(tokenizer, stop or (), stop_at_eot) for _ in token_lists]
    for next_ids, _ in stream_tokens(
        model,
        token_lists,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        generator=generator,
        watermark=watermark,
        controls=controls,
        eos_token=tokenizer.eot_token,
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
    adapter: str | None = None,
    merge: bool = False,
    draft_model: str | None = None,
    speculate: str | None = None,
    num_speculative_tokens: int = 4,
    **kwargs,
) -> Iterator[str]:
    """What `gptwo generate` prints: each sample's continuation, streamed, samples separated by a rule.

    `adapter`: a LoRA adapter folder applied to the model, unmerged or with `merge` merged (gptwo.lora).
    With `draft_model` or `speculate="ngram"`, decoding is speculative (gptwo.speculative); its acceptance
    rate goes to stderr at the end."""
    from gptwo.weights import load_model

    check_sampling(
        kwargs.get("max_new_tokens", 0), kwargs.get("temperature", 1.0), kwargs.get("top_k"), kwargs.get("top_p")
    )
    check_stops(kwargs.get("stop") or ())
    if num_samples < 1:
        raise GptwoError(f"--num-samples {num_samples} must be at least 1", "ask for one sample or more")
    model, tokenizer = load_model(
        model_spec, device=device, dtype=dtype, quantize=quantize, adapter=adapter, merge=merge
    )
    tokens = encode_prompt(tokenizer, prompt)
    if len(tokens) > model.config.block_size:
        print(
            f"note: the prompt has {len(tokens)} tokens; the model sees the last {model.config.block_size * 3 // 4}",
            file=sys.stderr,
        )
    max_new_tokens = kwargs.pop("max_new_tokens")
    draft = _draft(draft_model, speculate, tokenizer, kwargs, device=device, dtype=dtype, quantize=quantize)
    stats = SpeculationStats()
    for sample in range(num_samples):
        if sample:
            yield "\n" + "-" * 40 + "\n"
        sample_seed = None if seed is None else seed + sample
        if draft is None:
            for pieces in stream_texts(model, tokenizer, [tokens], max_new_tokens, seed=sample_seed, **kwargs):
                yield pieces[0]
            continue
        yield from _speculative_text(
            model, tokenizer, tokens, max_new_tokens, draft, num_speculative_tokens, sample_seed, stats, **kwargs
        )
    if draft is not None:
        print(
            f"\nspeculative decoding: {stats.accepted} of {stats.proposed} draft tokens accepted "
            f"({stats.acceptance_rate:.0%}), {stats.tokens_per_step:.2f} tokens per step of the model",
            file=sys.stderr,
        )


def _draft(draft_model, speculate, tokenizer, kwargs, **load):
    """The draft for `gptwo generate`: a loaded model, an NgramDraft, or None (plain decoding)."""
    from gptwo.weights import check_draft_tokenizer, load_model

    if draft_model is None and speculate is None:
        return None
    if draft_model is not None and speculate is not None:
        raise GptwoError("--draft-model and --speculate both given", "use one: a draft model, or --speculate ngram")
    if kwargs.get("watermark") is not None:
        raise GptwoError(
            "--watermark does not combine with speculative decoding", "drop --draft-model / --speculate to watermark"
        )
    if kwargs.get("controls") is not None:
        raise GptwoError(
            "--presence-penalty, --frequency-penalty, --repetition-penalty, --logit-bias and --min-tokens do not "
            "combine with speculative decoding",
            "drop --draft-model / --speculate to use them",
        )
    if speculate is not None:
        return NgramDraft()
    draft, draft_tokenizer = load_model(draft_model, **load)
    check_draft_tokenizer(draft_tokenizer, tokenizer, draft_model)
    return draft


def _speculative_text(model, tokenizer, tokens, max_new_tokens, draft, k, seed, stats, **kwargs) -> Iterator[str]:
    """One sample's text, decoded speculatively, with stop strings as `stream_texts` has them."""
    stream = TextStream(tokenizer, kwargs.get("stop") or (), kwargs.get("stop_at_eot", True))
    device = model.transformer.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sampling = {name: kwargs.get(name) for name in ("top_k", "top_p")}
    for token in speculative_tokens(
        model,
        tokens,
        max_new_tokens,
        kwargs.get("temperature", 1.0),
        **sampling,
        draft=draft,
        k=k,
        generator=generator,
        stats=stats,
    ):
        yield stream.push(token)
        if stream.finished:
            return
    yield stream.close()
