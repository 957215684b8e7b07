"""A matched evaluation set: human passages and the model's continuations of their openings.

The protocol of DetectGPT (Mitchell et al., 2023) and Fast-DetectGPT (Bao et al., 2024): each
human passage's first tokens are the prompt, the model writes the rest, and both texts get the
same length in tokens (a continuation that ends early with <|endoftext|> shortens its human twin).
Human passages come from a prepared data folder's validation split (documents the model did
not train on) or from a folder of .txt files.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch

from gptwo.detect.documents import read_folder, split_documents
from gptwo.errors import GptwoError
from gptwo.fileio import atomic_write
from gptwo.tokenizer import Tokenizer


def source_documents(source: str, tokenizer: Tokenizer) -> list[list[int]]:
    """Documents as token ids: a prepared data folder's val split, or every .txt file of a folder."""
    if os.path.isfile(os.path.join(source, "meta.json")):
        return split_documents(source, tokenizer)
    return [tokenizer.encode_ordinary(text) for _, text in read_folder(source)]


def passages(documents: list[list[int]], length: int, per_document: int = 1) -> list[tuple[int, list[int]]]:
    """(document index, passage): non-overlapping passages of `length` tokens from each document (up to `per_document`;
    0 = all)."""
    out = []
    for d, tokens in enumerate(documents):
        count = len(tokens) // length if per_document == 0 else min(per_document, len(tokens) // length)
        out += [(d, tokens[i * length : (i + 1) * length]) for i in range(count)]
    return out


@torch.no_grad()
def continue_passages(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    human: list[list[int]],
    prompt_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> list[tuple[list[int], list[int]]]:
    """(human, generated) token pairs of equal length: each passage's first `prompt_tokens` continued by the model."""
    from gptwo.sampling import generate

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    pairs = []
    for first in range(0, len(human), batch_size):
        batch = human[first : first + batch_size]
        idx = torch.tensor([p[:prompt_tokens] for p in batch], dtype=torch.long, device=device)
        new = len(batch[0]) - prompt_tokens
        out = generate(
            model, idx, new, temperature, top_k, top_p, eos_token=tokenizer.eot_token, generator=generator
        ).tolist()
        for passage, row in zip(batch, out):
            continuation = row[prompt_tokens:]
            if tokenizer.eot_token in continuation:
                continuation = continuation[: continuation.index(tokenizer.eot_token)]
            length = prompt_tokens + len(continuation)
            pairs.append((passage[:length], row[:length]))
    return pairs


SAMPLE_FILES = ("sample.json", "tokens.json")
_PAIR_FILE = re.compile(r"\d{5,}\.txt")


def check_sample_out(out_dir: str) -> None:
    """`--out` must be new, empty, or an earlier set of 'gptwo detect sample' (which is then replaced)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GptwoError(f"--out {out_dir} is a file", "give a folder for the set (new or empty)")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    ours = True
    try:
        with open(os.path.join(out_dir, "sample.json"), encoding="utf-8") as f:
            summary = json.load(f)
        ours = isinstance(summary, dict) and {"pairs", "documents", "prompt_tokens"} <= summary.keys()
    except (OSError, ValueError):
        ours = False
    for name in os.listdir(out_dir):
        if name in SAMPLE_FILES:
            continue
        folder = os.path.join(out_dir, name)
        if name not in ("human", "generated") or not os.path.isdir(folder):
            ours = False
        elif not all(_PAIR_FILE.fullmatch(f) for f in os.listdir(folder)):
            ours = False
    if not ours:
        raise GptwoError(
            f"--out {out_dir} holds files that are not a 'gptwo detect sample' set",
            "choose a new or empty folder",
        )


def _remove_stale_pairs(out_dir: str, count: int) -> None:
    """Pair files of an earlier, larger set in `out_dir` (numbered `count` and up): they would pair with nothing."""
    for kind in ("human", "generated"):
        folder = os.path.join(out_dir, kind)
        for name in os.listdir(folder):
            if _PAIR_FILE.fullmatch(name) and int(name[:-4]) >= count:
                os.remove(os.path.join(folder, name))


DEFAULT_NEW_TOKENS = 128


def fit_new_tokens(prompt_tokens: int, new_tokens: int | None, block: int, default: int = DEFAULT_NEW_TOKENS) -> int:
    """`new_tokens`, or where None `default` cut to what a context of `block` leaves after the prompt; an error
    where prompt and new tokens do not fit the context."""
    if new_tokens is None:  # a context-128 model writes 112 after a 16-token prompt
        new_tokens = max(1, min(default, block - prompt_tokens))
    length = prompt_tokens + new_tokens
    if length > block:
        raise GptwoError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} = {length} tokens exceed the model's "
            f"context of {block}",
            f"keep prompt + new tokens within {block}, e.g. --new-tokens {max(1, block - prompt_tokens)}",
        )
    return new_tokens


def _check_length(prompt_tokens: int, new_tokens: int, min_tokens: int) -> None:
    length = prompt_tokens + new_tokens
    if length < min_tokens:
        raise GptwoError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} = {length} tokens is fewer than "
            f"--min-tokens {min_tokens}, so every pair would be left out",
            f"ask for at least {min_tokens - prompt_tokens} new tokens, or lower --min-tokens",
        )


def sample_set(
    model_spec: str,
    source: str,
    out_dir: str,
    *,
    prompt_tokens: int = 16,
    new_tokens: int | None = None,
    per_document: int = 1,
    limit: int | None = None,
    min_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "auto",
    adapter: str | None = None,
    merge: bool = False,
) -> dict:
    """Write OUT/human/NNNNN.txt and OUT/generated/NNNNN.txt (matched pairs), OUT/sample.json and OUT/tokens.json (the
    ids); return the summary. The generated texts come from the model with the LoRA `adapter` when given.
    `new_tokens` None: DEFAULT_NEW_TOKENS, or what the model's context leaves after the prompt where that is less."""
    from gptwo.argtypes import MAX_SEED
    from gptwo.sampling import check_sampling
    from gptwo.weights import load_model

    check_sampling(new_tokens or 1, temperature, top_k, top_p)
    for name, value, low in (
        ("--prompt-tokens", prompt_tokens, 1),
        ("--new-tokens", 1 if new_tokens is None else new_tokens, 1),
        ("--per-document", per_document, 0),
        ("--min-tokens", min_tokens, 1),
        ("--limit", 1 if limit is None else limit, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise GptwoError(
                f"{name} {value!r} must be a whole number of at least {low}", "see 'gptwo detect sample --help'"
            )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise GptwoError(f"--seed {seed!r} is not a whole number in 0..{MAX_SEED}", "use e.g. 0")
    if new_tokens is not None:  # before the model loads: a count given is checked at once
        _check_length(prompt_tokens, new_tokens, min_tokens)
    check_sample_out(out_dir)
    model, tokenizer = load_model(model_spec, device=device, adapter=adapter, merge=merge)
    new_tokens = fit_new_tokens(prompt_tokens, new_tokens, model.config.block_size)
    _check_length(prompt_tokens, new_tokens, min_tokens)
    length = prompt_tokens + new_tokens
    chosen = passages(source_documents(source, tokenizer), length, per_document)[:limit]
    if not chosen:
        raise GptwoError(
            f"no document in {source} has {length} tokens",
            "use shorter --prompt-tokens/--new-tokens or longer documents",
        )
    continued = continue_passages(
        model,
        tokenizer,
        [p for _, p in chosen],
        prompt_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    kept = [(d, pair) for (d, _), pair in zip(chosen, continued) if len(pair[0]) >= min_tokens]
    pairs = [pair for _, pair in kept]
    if not pairs:
        raise GptwoError(
            f"all {len(chosen)} continuation(s) ended (<|endoftext|>) before --min-tokens {min_tokens}; nothing "
            "written",
            "lower --min-tokens, or sample with --top-k/--temperature that end texts less early",
        )
    for i, (human, generated) in enumerate(pairs):
        atomic_write(os.path.join(out_dir, "human", f"{i:05d}.txt"), tokenizer.decode(human).encode())
        atomic_write(os.path.join(out_dir, "generated", f"{i:05d}.txt"), tokenizer.decode(generated).encode())
    _remove_stale_pairs(out_dir, len(pairs))
    summary = {
        "model": model_spec,
        "source": source,
        "pairs": len(pairs),
        "dropped_short": len(chosen) - len(pairs),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "documents": [d for d, _ in kept],
    }  # the source document of pair i: calibration's cross-validation keeps each document in one fold
    atomic_write(os.path.join(out_dir, "sample.json"), (json.dumps(summary, indent=2) + "\n").encode())
    # the token ids as sampled: a sampled text often re-encodes to other tokens (non-canonical splits); for oracle
    # comparisons only
    atomic_write(
        os.path.join(out_dir, "tokens.json"),
        (json.dumps({"human": [h for h, _ in pairs], "generated": [g for _, g in pairs]}) + "\n").encode(),
    )
    if summary["dropped_short"]:
        print(
            f"note: {summary['dropped_short']} continuation(s) ended before {min_tokens} tokens and were left out",
            file=sys.stderr,
        )
    return summary
