"""`gptwo bench watermark`: how well the green-list watermark works on a trained model, and what it costs.

Human passages of a prepared data folder's val split (documents the model did not train on) give the
prompts (their first tokens) and the human text (the tokens after them). For each prompt the model
writes `new_tokens` tokens at temperature 1 with the watermark and, from the same seed, without it. Reported:
the detection rate at z >= 4, false positives on human and on unwatermarked model text, the perplexity of both
kinds of text under the model without the watermark (the watermark's quality cost), detection after a
share of the tokens is replaced by random ones, and the tokens/s of sampling with and without it. The
anchor is transformers' `WatermarkDetector` on the same token ids: its z must equal ours.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch

from gptwo.detect.pairs import fit_new_tokens, passages, source_documents
from gptwo.errors import GptwoError
from gptwo.sampling import generate
from gptwo.watermark import DETECT_Z, WatermarkSettings, watermark_for

ATTACKS = (0.1, 0.25)  # shares of tokens replaced at random


DEFAULTS = {"texts": 100, "human": 200, "new_tokens": 200}


def _rate(values: list[float], at: float = DETECT_Z) -> float:
    return sum(v >= at for v in values) / len(values)


def _summary(zs: list[float]) -> dict:
    return {"detected": _rate(zs), "count": sum(z >= DETECT_Z for z in zs), "median_z": statistics.median(zs)}


@torch.no_grad()
def _perplexity(model, prompts: torch.Tensor, texts: torch.Tensor) -> float:
    """exp(mean NLL) of `texts` (B, N) after `prompts` (B, P) under `model`."""
    ids = torch.cat([prompts, texts], dim=1)[:, -model.config.block_size :]
    logits = model(ids[:, :-1]).float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return math.exp(float(nll[:, -texts.shape[1] :].mean()))


def _replace(texts: torch.Tensor, share: float, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """`texts` with `share` of each row's tokens (chosen at random) replaced by uniformly random tokens."""
    out = texts.clone()
    count = round(share * texts.shape[1])
    for row in out:
        where = torch.randperm(texts.shape[1], generator=generator)[:count]
        row[where] = torch.randint(0, vocab, (count,), generator=generator)
    return out


def watermark_report(
    model_spec: str,
    source: str,
    *,
    settings: WatermarkSettings | None = None,
    texts: int | None = None,
    human: int | None = None,
    prompt_tokens: int = 16,
    new_tokens: int | None = None,
    batch_size: int = 50,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """The whole measurement (see the module docstring) as one JSON-able report.

    Left unset, `new_tokens` is DEFAULTS' or what the model's context leaves after the prompt where that is less
    (the perplexity is one forward over prompt and text), and `texts`/`human` are DEFAULTS' or as many passages
    as the source has where that is fewer (a note says so); set, each must fit."""
    from gptwo.weights import load_model

    settings = settings or WatermarkSettings()
    model, tokenizer = load_model(model_spec, device=device)
    vocab = model.config.vocab_size
    new_tokens = fit_new_tokens(prompt_tokens, new_tokens, model.config.block_size, DEFAULTS["new_tokens"])
    chosen = [tokens for _, tokens in passages(source_documents(source, tokenizer), prompt_tokens + new_tokens, 0)]
    asked = {"texts": texts, "human": human}
    for name, value in asked.items():
        if value is None:
            asked[name] = min(DEFAULTS[name], len(chosen))
            if asked[name] < DEFAULTS[name] and progress:
                print(f"note: --{name} {asked[name]} (the source's passages), not {DEFAULTS[name]}", file=sys.stderr)
    texts, human = asked["texts"], asked["human"]
    if not chosen or len(chosen) < max(texts, human):
        raise GptwoError(
            f"{source} has {len(chosen)} passages of {prompt_tokens + new_tokens} tokens, fewer than asked for",
            "ask for fewer --texts / --human, or give a larger source",
        )
    mark = watermark_for(settings, vocab)
    ids = torch.tensor(chosen[:texts])
    prompts = ids[:, :prompt_tokens]
    marked, plain, seconds = [], [], {"watermark": 0.0, "plain": 0.0}
    generate(model, prompts[:1].to(model.transformer.wte.weight.device), 2, watermark=settings)  # warm-up, untimed
    for start in range(0, texts, batch_size):
        batch = prompts[start : start + batch_size].to(model.transformer.wte.weight.device)
        for name, out, with_mark in (("watermark", marked, settings), ("plain", plain, None)):
            began = time.perf_counter()
            rows = generate(model, batch, new_tokens, temperature=1.0, seed=seed + start, watermark=with_mark)
            seconds[name] += time.perf_counter() - began
            out.append(rows[:, prompt_tokens:].cpu())
        if progress:
            print(f"bench watermark: {min(start + batch_size, texts)}/{texts} texts written", flush=True)
    marked, plain = torch.cat(marked), torch.cat(plain)
    human_texts = [tokens[prompt_tokens:] for tokens in chosen[:human]]

    def zs(rows, ignore=False) -> list[float]:
        return [mark.score(list(row), ignore).z for row in rows]

    generator = torch.Generator().manual_seed(seed)
    report = {
        "model": model_spec,
        "source": source,
        "settings": settings.public(),
        "texts": texts,
        "human_texts": len(human_texts),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "temperature": 1.0,
        "z_threshold": DETECT_Z,
        "watermarked": _summary(zs(marked.tolist())),
        "watermarked_ignore_repeated": _summary(zs(marked.tolist(), True)),
        "unwatermarked_model_text": _summary(zs(plain.tolist())),
        "human": _summary(zs(human_texts)),
        "human_ignore_repeated": _summary(zs(human_texts, True)),
        "perplexity": {
            "unwatermarked": _perplexity(model, prompts, plain),
            "watermarked": _perplexity(model, prompts, marked),
        },
        "attacks": {
            f"replace_{share:g}": _summary(zs(_replace(marked, share, tokenizer.n_vocab, generator).tolist()))
            for share in ATTACKS
        },
        "tokens_per_s": {name: texts * new_tokens / s for name, s in seconds.items()},
    }
    report["perplexity"]["ratio"] = report["perplexity"]["watermarked"] / report["perplexity"]["unwatermarked"]
    report["anchor"] = _transformers_anchor(model, settings, marked, [mark.score(list(r)).z for r in marked.tolist()])
    return report


def _transformers_anchor(model, settings: WatermarkSettings, marked: torch.Tensor, ours: list[float]) -> dict:
    """transformers' WatermarkDetector on the same token ids: its z against ours."""
    try:
        from transformers import GPT2Config, WatermarkDetector, WatermarkingConfig
    except ImportError:
        return {"transformers": None, "note": "transformers is not installed"}
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # it warns that this BOS id is outside the vocabulary: the point, as none is there
    try:
        config = GPT2Config(vocab_size=model.config.vocab_size, bos_token_id=-1)  # no BOS to strip from the text
        detector = WatermarkDetector(config, "cpu", WatermarkingConfig(**settings.transformers_config()))
        theirs = detector(marked, z_threshold=DETECT_Z, return_dict=True).z_score.tolist()
    finally:
        logging.set_verbosity(verbosity)
    return {"max_abs_z_difference": max(abs(a - b) for a, b in zip(ours, theirs)), "detected": _rate(theirs)}


def render_watermark(report: dict) -> str:
    """The report as a short table."""
    s = report["settings"]
    lines = [
        f"watermark {s['scheme']} gamma {s['gamma']} delta {s['delta']} · {report['texts']} texts of "
        f"{report['new_tokens']} tokens at temperature 1 · detected at z >= {report['z_threshold']:g}",
    ]
    rows = [
        ("watermarked", report["watermarked"]),
        ("watermarked, repeats once", report["watermarked_ignore_repeated"]),
        *((f"watermarked, {k.split('_')[1]} replaced", v) for k, v in report["attacks"].items()),
        ("model text without watermark", report["unwatermarked_model_text"]),
        (f"human ({report['human_texts']})", report["human"]),
        ("human, repeats once", report["human_ignore_repeated"]),
    ]
    for name, row in rows:
        lines.append(f"  {name:<30} z>=4: {row['count']:>4} ({row['detected']:.1%})  median z {row['median_z']:.2f}")
    ppl = report["perplexity"]
    lines.append(
        f"  perplexity under the model: {ppl['unwatermarked']:.2f} without, {ppl['watermarked']:.2f} with "
        f"(x{ppl['ratio']:.3f})"
    )
    speed = report["tokens_per_s"]
    lines.append(f"  sampling: {speed['plain']:.0f} tokens/s without, {speed['watermark']:.0f} with")
    anchor = report["anchor"]
    if "max_abs_z_difference" in anchor:
        lines.append(f"  transformers' WatermarkDetector: max |z difference| {anchor['max_abs_z_difference']:.2e}")
    return "\n".join(lines)
