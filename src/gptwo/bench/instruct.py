"""A synthetic instruction set with exact answers, and how a chat model scores on its held-out part.

Three kinds of instruction, each with one right answer:
  reverse   "Reverse: c a f" -> "f a c" (3 to 5 letters; held-out sequences never occur in train)
  add       "Add 17 and 25" -> "42" (0 to 49; held-out pairs never occur in train, in either order)
  capital   "What is the capital of Peru?" -> "Lima" (a fixed table of 30; each country is asked in
            train in two of three phrasings and held out in the third: new wordings of known facts)
Half the conversations open with a system turn (masked out of the loss, like the user's). Used by
`gptwo bench lora --quality --task instruct` (gptwo.bench.lora_quality) and experiments/chat_tune.py.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gptwo.model import GPT
    from gptwo.tokenizer import Tokenizer

KINDS = ("reverse", "add", "capital")
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
MAX_ADDEND = 49


def conversation(instruction: str, answer: str | None, rng: random.Random) -> dict:
    """{"messages": [...]}: a system turn half the time, the user's instruction, and the answer if given."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    messages.append({"role": "user", "content": instruction})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def instruction_set(train_size: int, heldout_per_kind: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train conversations, held-out items {kind, messages, answer}); no held-out instruction occurs in train.

    Held out: `heldout_per_kind` letter sequences and number pairs, and every country in the one phrasing
    train never asks it in (so `heldout_per_kind` reversals, as many sums and len(CAPITALS) capitals)."""
    rng = random.Random(seed)
    held_reversals: set[tuple[str, ...]] = set()
    while len(held_reversals) < heldout_per_kind:
        held_reversals.add(_letters(rng))
    held_sums: set[tuple[int, int]] = set()
    while len(held_sums) < heldout_per_kind:
        held_sums.add((rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)))
    held_phrasing = {country: rng.randrange(len(CAPITAL_PHRASINGS)) for country in CAPITALS}
    heldout = [
        _item("reverse", _reverse(letters), " ".join(reversed(letters)), rng) for letters in sorted(held_reversals)
    ]
    heldout += [_item("add", _add(a, b), str(a + b), rng) for a, b in sorted(held_sums)]
    heldout += [
        _item("capital", CAPITAL_PHRASINGS[phrasing].format(country), CAPITALS[country], rng)
        for country, phrasing in held_phrasing.items()
    ]
    train = []
    while len(train) < train_size:
        kind = rng.choice(KINDS)
        if kind == "reverse":
            letters = _letters(rng)
            if letters in held_reversals:
                continue
            train.append(conversation(_reverse(letters), " ".join(reversed(letters)), rng))
        elif kind == "add":
            a, b = rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)
            if (a, b) in held_sums or (b, a) in held_sums:
                continue
            train.append(conversation(_add(a, b), str(a + b), rng))
        else:
            country = rng.choice(list(CAPITALS))
            phrasing = rng.choice([p for p in range(len(CAPITAL_PHRASINGS)) if p != held_phrasing[country]])
            train.append(conversation(CAPITAL_PHRASINGS[phrasing].format(country), CAPITALS[country], rng))
    return train, heldout


def _letters(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def _reverse(letters: Sequence[str]) -> str:
    return f"Reverse: {' '.join(letters)}"


def _add(a: int, b: int) -> str:
    return f"Add {a} and {b}"


def _item(kind: str, instruction: str, answer: str, rng: random.Random) -> dict:
    return {"kind": kind, "messages": conversation(instruction, None, rng)["messages"], "answer": answer}


def answered(item: dict) -> list[dict]:
    """A held-out item's messages with its right answer as the assistant's turn (what its loss is taken on)."""
    return [*item["messages"], {"role": "assistant", "content": item["answer"]}]


def greedy_answers(
    model: GPT,
    tok: Tokenizer,
    heldout: Sequence[dict],
    template: str | None = None,
    max_new_tokens: int = 12,
    batch: int = 64,
) -> list[str]:
    """The model's greedy answer to each held-out item: its messages rendered by `prompt_ids` with the
    template (gptwo's by default), generated by gptwo's `complete` until <|endoftext|>, stripped."""
    import torch

    from gptwo.chat import CHAT_TEMPLATE, prompt_ids
    from gptwo.generate import complete

    out: list[str] = []
    for start in range(0, len(heldout), batch):
        prompts = [
            prompt_ids(tok, item["messages"], template or CHAT_TEMPLATE) for item in heldout[start : start + batch]
        ]
        with torch.no_grad():
            out += complete(model, tok, prompts, max_new_tokens, temperature=0.0)
    return [text.strip() for text in out]


def accuracy(heldout: Sequence[dict], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per kind present, and over all ("all")."""
    kinds = [kind for kind in KINDS if any(item["kind"] == kind for item in heldout)]
    result = {}
    for kind in [*kinds, "all"]:
        pairs = [(item, answer) for item, answer in zip(heldout, answers) if kind in ("all", item["kind"])]
        result[kind] = sum(item["answer"] == answer for item, answer in pairs) / len(pairs)
    return result
