"""`gptwo quickstart`: a real GPT-2 trained end to end on CPU in minutes, with nothing to download.

Built-in corpus (CPython's documentation) → a byte-level BPE trained on it → shards → the `cpu`
preset trained with Muon → held-out bits per byte and a few samples. The run folder is a model folder, so
`gptwo generate --model runs/quickstart "..."` works straight after.
"""

from __future__ import annotations

import os
import sys
import time

from gptwo.train.checkpoint import latest_checkpoint
from gptwo.train.loop import run_training
from gptwo.train.runfolder import check_run_folder, run_lock
from gptwo.train.speed import native_bf16

VOCAB_SIZE = 4096
VAL_FRACTION = 0.05
PROMPTS = ("The", "To open a file,", "A list is")
# The tiny variant checks the same pipeline in seconds (CI): small vocab, model and step count.
TINY = dict(
    vocab_size=512,
    overrides=[
        "n_layer=2",
        "n_head=2",
        "n_embd=32",
        "block_size=32",
        "batch_size=8",
        "max_steps=20",
        "eval_every=10",
        "checkpoint_every=10",
        "eval_batches=4",
        "log_every=5",
        "sample_tokens=8",
    ],
)
# The last evaluation covers the whole val split.
FULL = dict(vocab_size=VOCAB_SIZE, overrides=["eval_batches=1000", "eval_every=500"])
# Muon for the hidden matrices at the best lr of `gptwo bench train --to-loss` on the cpu preset (docs/training.md,
# *Time to loss*): 1.661 bits/byte after 3,000 steps where AdamW at its best lr reached 1.700, and AdamW's
# 1.700 in 1,300 steps of a 1,500-step schedule. A fresh run only: a resumed one keeps its optimizer.
OPTIMIZER = ["optimizer=muon", "lr=1.2e-2"]
# The whole command aims at 5 minutes: training gets what preparing the data left, less the samples at the end.
TOTAL_SECONDS, SAMPLES_SECONDS = 300.0, 15.0


def quickstart(out_dir: str = "runs/quickstart", tiny: bool = False, progress: bool = True) -> dict:
    """Prepare the built-in corpus (once), train (or finish) the cpu preset, report bits per byte, print samples."""
    check_run_folder(out_dir, also=("data", "corpus"))  # before anything is written there
    with run_lock(out_dir):  # marks the folder as a run's, so training accepts data/ and corpus/ beside it
        return _quickstart(out_dir, tiny, progress)


def _quickstart(out_dir: str, tiny: bool, progress: bool) -> dict:
    recipe = TINY if tiny else FULL
    start = time.perf_counter()
    data_dir = os.path.join(out_dir, "data")
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        prepare_builtin(data_dir, recipe["vocab_size"], progress)
    overrides = list(recipe["overrides"])
    fresh = not latest_checkpoint(out_dir)
    if fresh:
        overrides += OPTIMIZER
    # a fresh run fits its steps into the time left; a resumed one keeps its schedule
    if not tiny and fresh:
        overrides.append(f"max_time={max(60.0, TOTAL_SECONDS - SAMPLES_SECONDS - (time.perf_counter() - start)):.0f}")
    if not tiny and native_bf16():
        overrides.append("dtype=bfloat16")
    summary = run_training(data_dir, out_dir, preset="cpu", overrides=overrides, resume=True, progress=progress)
    if "val_bpb" not in summary:  # the run was already finished: report its last evaluation
        from gptwo.train.metrics import read_metrics

        summary.update(
            {
                k: v
                for row in read_metrics(os.path.join(out_dir, "metrics.jsonl"))
                if "val_bpb" in row
                for k, v in row.items()
                if k != "step"
            }
        )
    samples = _samples(out_dir, max_new_tokens=12 if tiny else 60)
    summary.update(samples=samples, wall_s=time.perf_counter() - start)
    _report(summary, out_dir)
    return summary


def prepare_builtin(data_dir: str, vocab_size: int = VOCAB_SIZE, progress: bool = True) -> None:
    """Tokenizer and shards for the built-in corpus, its documents shuffled (seeded).

    The loader reads shards in order, and the corpus comes sorted (language reference, then modules
    A to Z): unshuffled, each stretch of training would see one topic only and forget the others.
    """
    import json
    import random

    from gptwo.data.builtin import builtin_documents
    from gptwo.data.shard_corpus import prepare
    from gptwo.fileio import atomic_write
    from gptwo.tokenizer import Tokenizer

    documents = builtin_documents()
    random.Random(0).shuffle(documents)
    corpus = os.path.join(os.path.dirname(data_dir), "corpus", "builtin-shuffled.jsonl")
    atomic_write(corpus, "".join(json.dumps({"text": d}) + "\n" for d in documents).encode())
    print(f"training a {vocab_size}-token BPE on the built-in corpus...", file=sys.stderr)
    tokenizer = Tokenizer.train(documents, vocab_size=vocab_size)
    prepare([corpus], data_dir, tokenizer=tokenizer, val_fraction=VAL_FRACTION, progress=progress)


def _samples(run_dir: str, max_new_tokens: int) -> dict[str, str]:
    from gptwo.generate import complete
    from gptwo.weights import load_model

    model, tokenizer = load_model(run_dir, device="cpu")
    texts = complete(model, tokenizer, list(PROMPTS), max_new_tokens, temperature=0.8, top_k=50, seed=0)
    return dict(zip(PROMPTS, texts))


def _threads(summary: dict) -> str:
    """'2 threads', or how many steps ran on each count where other processes made the run change it."""
    counts = summary.get("threads_steps") or {}
    if len(counts) < 2:
        return f"{summary['threads']} threads"
    parts = ", ".join(f"{steps:,} steps on {n}" for n, steps in sorted(counts.items(), reverse=True))
    return f"threads changed with the machine's load ({parts})"


def _report(summary: dict, out_dir: str) -> None:
    bpb = f"{summary['val_bpb']:.3f} bits per byte" if "val_bpb" in summary else "n/a"
    print(
        f"\nheld-out loss: {summary.get('val_loss', float('nan')):.4f} nats/token = {bpb} "
        f"({summary['wall_s']:.0f} s in all)"
    )
    if summary.get("tokens_per_s"):  # what this run did, and why it was so (not shown for a finished run)
        why = "this CPU multiplies bf16 natively" if summary["dtype"] == "bfloat16" else "no native bf16 here"
        cut = (
            f" (of {summary['planned_steps']:,} planned: cut to fit the time)"
            if summary["step"] < summary["planned_steps"]
            else ""
        )
        print(
            f"trained {summary['step']:,} steps{cut} in {summary['elapsed_s']:.0f} s | {summary['dtype']} ({why}) | "
            f"{_threads(summary)} | {summary['tokens_per_s']:,.0f} tokens/s"
        )
    for prompt, text in summary["samples"].items():
        print(f"\n--- {prompt}{text}")
    print(f'\nthe model is in {out_dir}; try: gptwo generate --model {out_dir} "The"')
