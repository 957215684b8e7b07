"""Chat tuning on a synthetic instruction set with exact answers: held-out exact-match accuracy.

The set (gptwo.bench.instruct): reverse 3-5 letters, add two numbers 0-49, name a capital of 30
countries; held-out sequences and pairs never occur in train, and each country is held out in the one of
three phrasings train never asks it in; half the conversations open with a system turn. Writes train.jsonl and
heldout.jsonl, trains a 1,024-token byte-level BPE on the rendered train conversations (GPT-2's
50,257-token output layer would cost most of a small model's step on a CPU; `--tokenizer gpt2` uses
it), runs `gptwo prepare chat` and `gptwo train` (a small GPT from scratch), answers every held-out
instruction greedily (rendered with the run's chat template by `prompt_ids`, stopped at
<|endoftext|>) and reports exact-match accuracy per kind, once with gptwo's generate and once with
transformers' (AutoTokenizer.apply_chat_template + GPT2LMHeadModel.generate on the run folder), which
must agree. Prints a result and writes experiments/results/chat_tune.json.

    python experiments/chat_tune.py            # about 10 minutes on 2 cores
    python experiments/chat_tune.py --quick    # a short smoke run of the same pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from gptwo.bench.instruct import KINDS, accuracy, greedy_answers, instruction_set


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def gptwo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gptwo.cli", *args], check=True)


def answers_gptwo(run: str, heldout: list[dict]) -> list[str]:
    """Greedy answers with gptwo: the run's template via prompt_ids, stopped at <|endoftext|>."""
    from gptwo.chat import read_chat_template
    from gptwo.weights import load_model

    model, tok = load_model(run, device="cpu")
    model.eval()
    return greedy_answers(model, tok, heldout, read_chat_template(run))


def answers_transformers(run: str, heldout: list[dict], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers with transformers alone: AutoTokenizer's apply_chat_template, GPT2LMHeadModel.generate."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(run)
    model = GPT2LMHeadModel.from_pretrained(run).eval()
    out = []
    for item in heldout:
        ids = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            new = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )[0, len(ids) :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        out.append(tokenizer.decode(new).strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1200, quick 30)")
    parser.add_argument("--tokenizer", default="trained", help="'trained' (default: a 1,024-token BPE) or 'gpt2'")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a 2-core machine shared with other work, 1 thread ran 6x faster than 2)",
    )
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    steps = args.steps or (30 if args.quick else 1200)
    work = args.work or tempfile.mkdtemp(prefix="gptwo-chat-tune-")
    os.makedirs(work, exist_ok=True)
    train, heldout = instruction_set(train_size=2000 if args.quick else 12000, heldout_per_kind=100)
    write_jsonl(os.path.join(work, "train.jsonl"), train)
    write_jsonl(os.path.join(work, "heldout.jsonl"), heldout)
    data, run = os.path.join(work, "data"), os.path.join(work, "run")
    tokenizer = args.tokenizer
    if tokenizer == "trained":
        from gptwo.chat import render
        from gptwo.tokenizer import Tokenizer

        tokenizer = os.path.join(work, "tokenizer.json")
        Tokenizer.train((render(c["messages"]) for c in train), vocab_size=1024).save(tokenizer)
    prepare = ["prepare", "chat", os.path.join(work, "train.jsonl"), "--out", data, "--tokenizer", tokenizer]
    gptwo(*prepare, "--val-fraction", "0.02", "--quiet")
    settings = [
        "n_layer=4",
        "n_head=4",
        "n_embd=128",
        "block_size=64",
        "batch_size=32",
        "sampling=random",
        "lr=3e-3",
        "warmup_steps=30",
        f"max_steps={steps}",
        f"eval_every={max(steps // 4, 1)}",
        "eval_batches=8",
        f"checkpoint_every={steps}",
        "sample_tokens=0",
        "compile=false",
        f"threads={args.threads}",
    ]
    start = time.perf_counter()
    gptwo("train", "--data", data, "--out", run, *settings)
    train_s = time.perf_counter() - start
    ours, theirs = answers_gptwo(run, heldout), answers_transformers(run, heldout)
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        last_val = [row for row in map(json.loads, f) if "val_loss" in row][-1]
    meta = json.load(open(os.path.join(data, "meta.json"), encoding="utf-8"))
    result = {
        "tokenizer": args.tokenizer,
        "train_conversations": len(train),
        "heldout": {kind: sum(i["kind"] == kind for i in heldout) for kind in KINDS},
        "train_tokens": meta["train_tokens"],
        "counted_train_tokens": meta["splits"]["train"]["counted_tokens"],
        "settings": settings,
        "train_seconds": round(train_s, 1),
        "val_loss": last_val["val_loss"],
        "accuracy_gptwo": accuracy(heldout, ours),
        "accuracy_transformers": accuracy(heldout, theirs),
        "answers_agree": sum(a == b for a, b in zip(ours, theirs)) / len(ours),
        "examples": [
            {"instruction": i["messages"][-1]["content"], "answer": i["answer"], "model": a}
            for i, a in list(zip(heldout, ours))[::40]
        ],
    }
    print(json.dumps(result, indent=1))
    if not args.quick:
        os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
        with open(os.path.join(os.path.dirname(__file__), "results", "chat_tune.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
