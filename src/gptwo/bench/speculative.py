"""`gptwo bench decode --draft-model M | --speculate ngram`: speculative against plain decoding, batch 1, greedy.

Two prompts from a passage (a file, or a document of the built-in corpus): *grounded* asks for the passage
again (the passage, a blank line, then its first words: the continuation copies its input, as in rewriting
or extraction), *open* gives only the passage's first words (the model writes freely). gptwo's plain
decoding (`stream_tokens`, what `gptwo generate` runs) is the baseline; transformers' `generate` plain,
with `assistant_model=` and with `prompt_lookup_num_tokens=` (its own speculative paths, same models) is the
anchor. All contenders take turns each round (interleaved); the median round counts. `same_tokens` is the
share of tokens equal to gptwo's plain greedy output.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from gptwo.bench import cpu_name, interleaved, quiet_transformers, render_table
from gptwo.errors import GptwoError
from gptwo.runtime import resolve_device
from gptwo.speculative import SPECULATE_TOKENS, NgramDraft, SpeculationStats, speculative_tokens

OPEN_TOKENS = 8  # the open prompt: the passage's first tokens
COLUMNS = [
    ("prompt", "prompt", ""),
    ("tool", "tool", ""),
    ("method", "method", ""),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("speedup", "vs gptwo plain", ".2f"),
    ("acceptance_rate", "accepted", ".2f"),
    ("tokens_per_step", "tokens/step", ".2f"),
    ("same_tokens", "same tokens", ".2f"),
]


def speculative_prompts(tokenizer, text: str | None, passage_tokens: int) -> dict[str, list[int]]:
    """The grounded and open prompts (token ids) from `text`, or from the built-in corpus's first long document."""
    if text is None:
        from gptwo.data.builtin import _builtin_documents  # the prompts' default source (data is below bench's CLI)

        text = next((d for d in _builtin_documents() if len(d) > 8 * passage_tokens), None)
    ids = tokenizer.encode(text or "")
    if len(ids) < passage_tokens:
        raise GptwoError(
            f"the passage has {len(ids)} tokens, fewer than --prompt-tokens {passage_tokens}",
            "give a longer --text file or fewer --prompt-tokens",
        )
    passage = ids[:passage_tokens]
    return {"grounded": passage + tokenizer.encode("\n\n") + passage[:OPEN_TOKENS], "open": passage[:OPEN_TOKENS]}


def speculative_report(
    model: str,
    draft_model: str | None = None,
    speculate: str | None = None,
    text_file: str | None = None,
    device: str = "cpu",
    new_tokens: int = 128,
    prompt_tokens: int = 128,
    rounds: int = 3,
    k: int = SPECULATE_TOKENS,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokens/s of plain and speculative greedy decoding at batch 1 (gptwo and transformers), per prompt."""
    from gptwo.bench.decode import hf_twin
    from gptwo.sampling import stream_tokens
    from gptwo.weights import check_draft_tokenizer, load_model

    if draft_model is None and speculate is None:
        raise GptwoError("nothing to speculate with", "pass --draft-model M and/or --speculate ngram")
    if speculate not in (None, "ngram"):
        raise GptwoError(f"unknown --speculate '{speculate}'", "use --speculate ngram")
    if not model:
        raise GptwoError("speculative decoding needs a trained target", "pass --model (a model folder)")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    target, tokenizer = load_model(model, device=dev)
    text = None
    if text_file is not None:
        if not os.path.isfile(text_file):
            raise GptwoError(f"--text file {text_file} not found", "check the path")
        with open(text_file, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    prompts = speculative_prompts(tokenizer, text, prompt_tokens)
    longest = max(len(p) for p in prompts.values()) + new_tokens
    drafts: dict[str, object] = {}
    hf_drafts: dict[str, dict] = {}
    if draft_model is not None:
        draft, draft_tokenizer = load_model(draft_model, device=dev)
        check_draft_tokenizer(draft_tokenizer, tokenizer, draft_model)
        drafts["draft model"] = draft
        hf_drafts["draft model"] = {"assistant_model": hf_twin(draft)}
    if speculate == "ngram":
        drafts["ngram"] = NgramDraft()
        hf_drafts["ngram"] = {"prompt_lookup_num_tokens": k}
    context = min([target.config.block_size] + [d.config.block_size for d in drafts.values() if hasattr(d, "config")])
    if longest > context:
        raise GptwoError(f"{longest} tokens exceed the models' context of {context}", "ask for fewer tokens")
    quiet_transformers()
    hf = hf_twin(target)

    def hf_run(ids, **extra):
        inputs = torch.tensor([ids], device=dev)
        out = hf.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )
        return out[0, len(ids) :].tolist()

    runs, stats = {}, {}
    for name, ids in prompts.items():
        runs[(name, "gptwo", "plain")] = lambda ids=ids: [
            int(t[0]) for t, _ in stream_tokens(target, [ids], new_tokens, temperature=0)
        ]
        for method, draft in drafts.items():
            stats[(name, method)] = SpeculationStats()

            def spec(ids=ids, draft=draft, key=(name, method)):
                stats[key] = SpeculationStats()  # the last run's counts (all runs are the same greedy decode)
                return list(speculative_tokens(target, ids, new_tokens, 0, draft=draft, k=k, stats=stats[key]))

            runs[(name, "gptwo", method)] = spec
        runs[(name, "transformers", "plain")] = lambda ids=ids: hf_run(ids)
        for method, extra in hf_drafts.items():
            runs[(name, "transformers", method)] = lambda ids=ids, extra=extra: hf_run(ids, **extra)
    tokens = {}
    with torch.no_grad():
        for number, (key, run) in enumerate(runs.items(), 1):
            if progress:
                print(f"warming up {number}/{len(runs)}: {' '.join(key)}...", end="", file=sys.stderr, flush=True)
            start = time.perf_counter()
            tokens[key] = run()
            if progress:
                print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

        def each_round(number: int, seconds: dict) -> None:
            rates = " | ".join(f"{' '.join(key)} {new_tokens / s:,.1f}" for key, s in seconds.items())
            print(f"round {number}/{rounds} (tokens/s): {rates}", file=sys.stderr, flush=True)

        seconds = interleaved(runs, rounds, dev, each_round if progress else None)
    rows = []
    for (name, tool, method), s in seconds.items():
        plain = tokens[(name, "gptwo", "plain")]
        same = sum(a == b for a, b in zip(tokens[(name, tool, method)], plain)) / len(plain)
        counts = stats.get((name, method)) if tool == "gptwo" else None
        rows.append(
            {
                "prompt": name,
                "tool": tool,
                "method": method,
                "tokens_per_s": new_tokens / s,
                "speedup": seconds[(name, "gptwo", "plain")] / s,
                "acceptance_rate": counts.acceptance_rate if counts else None,
                "tokens_per_step": counts.tokens_per_step if counts else None,
                "same_tokens": same,
            }
        )
    return {
        "bench": "decode-speculative",
        "device": str(dev),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "model": model,
        "model_params": sum(p.numel() for p in target.parameters()),
        "draft_model": draft_model,
        "draft_params": sum(p.numel() for p in drafts["draft model"].parameters()) if draft_model else None,
        "speculative_tokens": k,
        "prompt_tokens": {name: len(ids) for name, ids in prompts.items()},
        "new_tokens": new_tokens,
        "rounds": rounds,
        "rows": rows,
    }


def render_speculative(report: dict) -> str:
    """The report as a table under a line naming the models and the workload."""
    draft = f", draft {report['draft_model']} ({report['draft_params'] / 1e6:.1f}M)" if report["draft_model"] else ""
    head = (
        f"speculative decode: {report['cpu'] if report['device'] == 'cpu' else report['device']}, "
        f"{report['threads']} threads; target {report['model']} ({report['model_params'] / 1e6:.1f}M){draft}; "
        f"batch 1, greedy, {report['new_tokens']} new tokens, k={report['speculative_tokens']}, "
        f"median of {report['rounds']} interleaved rounds"
    )
    return head + "\n" + render_table(report["rows"], COLUMNS)
