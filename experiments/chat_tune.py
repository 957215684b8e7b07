"""Chat tuning on a synthetic instruction set with exact answers: held-out exact-match accuracy.

Three kinds of instruction, each with one right answer:
  reverse   "Reverse: c a f" -> "f a c" (3 to 5 letters; held-out sequences never occur in train)
  add       "Add 17 and 25" -> "42" (0 to 49; held-out pairs never occur in train, in either order)
  capital   "What is the capital of Peru?" -> "Lima" (a fixed table of 30; each country is asked in
            train in two of three phrasings and held out in the third: new wordings of known facts)
Half the conversations open with a system turn (masked out, like the user's). Writes train.jsonl and
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
import random
import string
import subprocess
import sys
import tempfile
import time

import torch

CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Hungary": "Budapest",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "Delhi",
    "Thailand": "Bangkok",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Canada": "Ottawa",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Nepal": "Kathmandu",
    "Mexico": "Mexico City",
    "Australia": "Canberra",
}
CAPITAL_PHRASINGS = ("Capital of {}?", "What is the capital of {}?", "Name the capital city of {}.")
SYSTEM = "Answer with the result only."
LETTERS = string.ascii_lowercase[:12]


def conversation(instruction: str, answer: str | None, rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    messages.append({"role": "user", "content": instruction})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def instruction_set(train_size: int, heldout_per_kind: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train conversations, held-out items {kind, messages, answer}); no held-out instruction occurs in train."""
    rng = random.Random(seed)
    heldout: list[dict] = []
    held_reversals: set[tuple[str, ...]] = set()
    while len(held_reversals) < heldout_per_kind:
        held_reversals.add(tuple(rng.choice(LETTERS) for _ in range(rng.randint(3, 5))))
    held_sums: set[tuple[int, int]] = set()
    while len(held_sums) < heldout_per_kind:
        held_sums.add((rng.randint(0, 49), rng.randint(0, 49)))
    held_phrasing = {country: rng.randrange(len(CAPITAL_PHRASINGS)) for country in CAPITALS}
    for letters in sorted(held_reversals):
        heldout.append(_item("reverse", f"Reverse: {' '.join(letters)}", " ".join(reversed(letters)), rng))
    for a, b in sorted(held_sums):
        heldout.append(_item("add", f"Add {a} and {b}", str(a + b), rng))
    for country, phrasing in held_phrasing.items():
        heldout.append(_item("capital", CAPITAL_PHRASINGS[phrasing].format(country), CAPITALS[country], rng))
    train = []
    while len(train) < train_size:
        kind = rng.choice(("reverse", "add", "capital"))
        if kind == "reverse":
            letters = tuple(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
            if letters in held_reversals:
                continue
            train.append(conversation(f"Reverse: {' '.join(letters)}", " ".join(reversed(letters)), rng))
        elif kind == "add":
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            if (a, b) in held_sums or (b, a) in held_sums:
                continue
            train.append(conversation(f"Add {a} and {b}", str(a + b), rng))
        else:
            country = rng.choice(list(CAPITALS))
            phrasing = rng.choice([p for p in range(len(CAPITAL_PHRASINGS)) if p != held_phrasing[country]])
            train.append(conversation(CAPITAL_PHRASINGS[phrasing].format(country), CAPITALS[country], rng))
    return train, heldout


def _item(kind: str, instruction: str, answer: str, rng: random.Random) -> dict:
    return {"kind": kind, "messages": conversation(instruction, None, rng)["messages"], "answer": answer}


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def gptwo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gptwo.cli", *args], check=True)


def answers_gptwo(run: str, heldout: list[dict], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers with gptwo: the run's template via prompt_ids, stopped at <|endoftext|>."""
    from gptwo.chat import prompt_ids, read_chat_template
    from gptwo.generate import complete
    from gptwo.weights import load_model

    model, tok = load_model(run, device="cpu")
    model.eval()
    template = read_chat_template(run)
    out = []
    for start in range(0, len(heldout), 64):
        prompts = [prompt_ids(tok, item["messages"], template) for item in heldout[start : start + 64]]
        with torch.no_grad():
            out += complete(model, tok, prompts, max_new_tokens, temperature=0.0)
    return [text.strip() for text in out]


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


def accuracy(heldout: list[dict], answers: list[str]) -> dict:
    kinds = sorted({item["kind"] for item in heldout})
    result = {}
    for kind in [*kinds, "all"]:
        items = [(i, a) for i, a in zip(heldout, answers) if kind in ("all", i["kind"])]
        result[kind] = sum(i["answer"] == a for i, a in items) / len(items)
    return result


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
        "heldout": {kind: sum(i["kind"] == kind for i in heldout) for kind in ("reverse", "add", "capital")},
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
