"""`gptwo bench lora --quality`: how much of full fine-tuning's loss improvement LoRA recovers on a held-out domain.

The built-in corpus has two parts (gptwo.data.builtin): the standard library's module docstrings and the
language reference topics behind `help()`. The base (the cpu preset, the quickstart's optimizer) trains on
the docstrings only, with a BPE trained on them only; the reference topics are the domain it never saw. From
that base, full fine-tuning (AdamW, every parameter) and LoRA (adapters only) train on the domain for the same
steps, batch and schedule, each `gptwo train` in its own process. Every model is then evaluated the same way,
in this process: mean loss over the whole validation split of the domain (and of the docstrings, to show what
fine-tuning forgot). recovery = (base - lora) / (base - full), the best lr of each against the other.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

from gptwo.errors import GptwoError

BASE_STEPS = 400  # the base: about 3 minutes on 2 shared cores
FINETUNE_STEPS = 150
FULL_LRS = (1e-3,)
LORA_LRS = (3e-2,)  # the best of 3e-3, 1e-2, 3e-2, 5e-2, 1e-1 (docs/results/training-log.md)
VOCAB_SIZE = 4096  # the quickstart's
BASE_VAL_FRACTION, DOMAIN_VAL_FRACTION = 0.05, 0.2


def lora_quality(
    out_dir: str = "runs/bench-lora",
    base_steps: int | None = None,
    steps: int | None = None,
    full_lrs: tuple[float, ...] | None = None,
    lora_lrs: tuple[float, ...] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] | None = None,
    threads: int = 0,
    progress: bool = True,
) -> dict:
    """Train (or read back) the base and the fine-tuning runs in `out_dir`; evaluate them; return the report."""
    from gptwo.lora import DEFAULT_TARGETS

    base_steps, steps = base_steps or BASE_STEPS, steps or FINETUNE_STEPS
    full_lrs, lora_lrs = tuple(full_lrs or FULL_LRS), tuple(lora_lrs or LORA_LRS)
    targets = tuple(targets or DEFAULT_TARGETS)
    alpha = float(alpha if alpha is not None else rank)
    start = time.perf_counter()
    base_data, domain_data = os.path.join(out_dir, "data-base"), os.path.join(out_dir, "data-domain")
    prepare_domains(out_dir, base_data, domain_data)
    settings = _settings(threads)
    base_dir = os.path.join(out_dir, "base")
    base_run = _train(
        base_data,
        base_dir,
        [*settings, *_quickstart_optimizer(), *_schedule(base_steps)],
        progress,
    )
    finetune = [(f"full-lr{lr:g}", "full", lr, []) for lr in full_lrs]
    lora_keys = [f"lora_rank={rank}", f"lora_alpha={alpha!r}", f"lora_targets={','.join(targets)}"]
    finetune += [(f"lora-r{rank}-a{alpha:g}-lr{lr:g}", "lora", lr, lora_keys) for lr in lora_lrs]
    warmup = max(1, steps // 10)
    runs = []
    for name, method, lr, extra in finetune:
        overrides = [*settings, f"init_from={base_dir}", f"lr={lr!r}", f"warmup_steps={warmup}", *_schedule(steps)]
        run = _train(domain_data, os.path.join(out_dir, name), [*overrides, *extra], progress)
        runs.append({"name": name, "method": method, "lr": lr, **run})
    threads_used = _eval_threads(threads)
    base_eval = evaluate(base_dir, domain_data, base_data)
    for run in runs:
        run.update(evaluate(os.path.join(out_dir, run["name"]), domain_data, base_data))
    best_full = min((r for r in runs if r["method"] == "full"), key=lambda r: r["domain_loss"])
    gain = base_eval["domain_loss"] - best_full["domain_loss"]
    for run in runs:
        run["recovery"] = (base_eval["domain_loss"] - run["domain_loss"]) / gain if gain > 0 else None
    best_lora = min((r for r in runs if r["method"] == "lora"), key=lambda r: r["domain_loss"])
    report = {
        "bench": "lora-quality",
        "task": "base: the cpu preset on the standard library's docstrings (its own BPE); domain: the language "
        "reference topics, which the base never saw",
        "base_steps": base_steps,
        "finetune_steps": steps,
        "warmup_steps": warmup,
        "tokens_per_step": base_run["tokens_per_step"],
        "domain_train_tokens": _tokens(domain_data, "train"),
        "domain_val_tokens": _tokens(domain_data, "val"),
        "lora": {"rank": rank, "alpha": alpha, "targets": list(targets)},
        "threads": threads_used,
        "base": {**base_eval, "train_s": base_run["wall_s"]},
        "runs": runs,
        "best_full": best_full["name"],
        "best_lora": best_lora["name"],
        "recovery": best_lora["recovery"],
        "target": 0.9,
        "wall_s": time.perf_counter() - start,
    }
    from gptwo.fileio import atomic_write

    atomic_write(os.path.join(out_dir, "report.json"), (json.dumps(report, indent=1) + "\n").encode())
    return report


def _usable(texts: list[str]) -> list[str]:
    """The non-empty documents that encode as UTF-8 (a few docstrings hold lone surrogates)."""
    kept = []
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            continue
        if text.strip():
            kept.append(text.strip())
    return kept


def prepare_domains(out_dir: str, base_data: str, domain_data: str) -> None:
    """The two data folders, once: docstrings (the base's) and reference topics (the domain), both tokenized with
    a BPE trained on the docstrings alone; each part shuffled (seeded) as the quickstart shuffles its corpus."""
    if all(os.path.isfile(os.path.join(d, "meta.json")) for d in (base_data, domain_data)):
        return
    from gptwo.data.builtin import pydoc_topics, stdlib_docstrings
    from gptwo.data.shard_corpus import prepare
    from gptwo.fileio import atomic_write
    from gptwo.tokenizer import Tokenizer

    base_docs, domain_docs = _usable(stdlib_docstrings()), _usable(pydoc_topics())
    for docs in (base_docs, domain_docs):
        random.Random(0).shuffle(docs)
    print(f"training a {VOCAB_SIZE}-token BPE on the standard library's docstrings...", file=sys.stderr)
    tokenizer = Tokenizer.train(base_docs, vocab_size=VOCAB_SIZE)
    for docs, data_dir, fraction, name in (
        (base_docs, base_data, BASE_VAL_FRACTION, "docstrings"),
        (domain_docs, domain_data, DOMAIN_VAL_FRACTION, "reference"),
    ):
        corpus = os.path.join(out_dir, "corpus", f"{name}.jsonl")
        atomic_write(corpus, "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
        prepare([corpus], data_dir, tokenizer=tokenizer, val_fraction=fraction, progress=False, overwrite=True)


def _settings(threads: int) -> list[str]:
    """What every run shares on top of the cpu preset: no samples, the quickstart's dtype, the given threads."""
    from gptwo.train.speed import native_bf16

    return [
        "sample_tokens=0",
        "eval_batches=1000",
        f"dtype={'bfloat16' if native_bf16() else 'float32'}",
        f"threads={threads}",
    ]


def _quickstart_optimizer() -> list[str]:
    from gptwo.train.quickstart import OPTIMIZER

    return list(OPTIMIZER)


def _schedule(steps: int) -> list[str]:
    """A run of `steps` steps evaluated and saved once, at its end."""
    return [f"max_steps={steps}", f"eval_every={steps}", f"checkpoint_every={steps}", "log_every=10"]


def _train(data_dir: str, run_dir: str, overrides: list[str], progress: bool) -> dict:
    """`gptwo train` of one run in its own process (read back if it finished before)."""
    import subprocess

    from gptwo.bench.train import _finished, _train_command
    from gptwo.fileio import atomic_write

    steps = int(next(o for o in overrides if o.startswith("max_steps=")).split("=")[1])
    wall = 0.0
    if not _finished(run_dir, steps):
        start = time.perf_counter()
        done = subprocess.run(_train_command(data_dir, run_dir, overrides), capture_output=True, text=True)
        wall = time.perf_counter() - start
        atomic_write(run_dir + ".log", (done.stdout + done.stderr).encode())
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise GptwoError(f"the bench run {os.path.basename(run_dir)} failed ({last})", f"see {run_dir}.log")
    with open(os.path.join(run_dir, "checkpoints", f"step_{steps}", "trainer.json"), encoding="utf-8") as f:
        config = json.load(f)["config"]
    from gptwo.train.metrics import read_metrics

    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    run_val = [row["val_loss"] for row in rows if "val_loss" in row]
    result = {
        "tokens_per_step": config["batch_size"] * config["block_size"] * config["grad_accum"],
        "wall_s": wall or None,
        "run_val_loss": run_val[-1] if run_val else None,
    }
    if progress:
        shown = f"{result['run_val_loss']:.4f}" if run_val else "n/a"
        print(f"{os.path.basename(run_dir)}: val loss {shown} after {steps} steps ({wall:.0f} s)", file=sys.stderr)
    return result


def _eval_threads(threads: int) -> int:
    import torch

    from gptwo.train.loop import cpu_cores

    torch.set_num_threads(threads or cpu_cores())
    return torch.get_num_threads()


def evaluate(model_dir: str, domain_data: str, base_data: str) -> dict:
    """A model's mean loss (nats/token) over the whole validation split of the domain and of the base's data,
    batches of the cpu preset's shape, as `gptwo train` evaluates."""
    import torch

    from gptwo.config import TRAIN_PRESETS
    from gptwo.data.loader import ShardLoader
    from gptwo.train.loop import loss_fn
    from gptwo.weights import load_model

    model, _ = load_model(model_dir, device="cpu")
    model.eval()
    batch, block = TRAIN_PRESETS["cpu"]["batch_size"], TRAIN_PRESETS["cpu"]["block_size"]
    out = {}
    for key, data_dir in (("domain_loss", domain_data), ("base_data_loss", base_data)):
        loader = ShardLoader(data_dir, "val", batch_size=batch, block_size=block)
        with torch.no_grad():
            losses = [float(loss_fn(model, x, y)) for x, y in loader.iter_eval_batches()]
        out[key] = sum(losses) / len(losses)
    return out


def _tokens(data_dir: str, split: str) -> int:
    from gptwo.data.loader import read_meta

    return int(read_meta(data_dir)["splits"][split]["tokens"])


def render_quality(report: dict) -> str:
    """The quality report as a table."""
    from gptwo.bench import render_table

    lora = report["lora"]
    head = [
        f"LoRA quality: {report['task']}",
        f"{report['domain_train_tokens']:,} domain training tokens, {report['domain_val_tokens']:,} validation; "
        f"base {report['base_steps']} steps; every fine-tuning run {report['finetune_steps']} steps x "
        f"{report['tokens_per_step']:,} tokens (warm-up {report['warmup_steps']}, cosine), AdamW; LoRA "
        f"r={lora['rank']} alpha={lora['alpha']:g} on {','.join(lora['targets'])}",
    ]
    rows = [{"name": "base", "method": "-", **report["base"]}] + report["runs"]
    columns = [
        ("name", "run", ""),
        ("method", "method", ""),
        ("lr", "lr", "g"),
        ("domain_loss", "domain val loss", ".4f"),
        ("base_data_loss", "docstrings val loss", ".4f"),
        ("recovery", "recovery", ".3f"),
    ]
    recovery = report["recovery"]
    verdict = "n/a" if recovery is None else f"{recovery:.3f} ({'meets' if recovery >= 0.9 else 'below'} 0.90)"
    tail = (
        f"recovery = (base - LoRA) / (base - full) on the domain's val loss, best of each: {report['best_lora']} vs "
        f"{report['best_full']}: {verdict}"
    )
    return "\n".join([*head, render_table(rows, columns), tail])
