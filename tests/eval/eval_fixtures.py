"""Shared helpers for the evaluation tests: tiny saved models, models whose logits the test controls, task files."""

from __future__ import annotations

import functools
import json

import torch
import torch.nn as nn

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.weights import save_pretrained

SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A model reads text one token at a time and learns to predict the next token.",
    "Rivers run to the sea, and the sea sends rain back to the hills where rivers begin.",
    "In the morning the baker opens the shop, lights the oven and sets out bread.",
]


@functools.cache
def small_tokenizer() -> Tokenizer:
    """A byte-level BPE of 300 tokens trained on SENTENCES (small enough for a vocab x vocab table)."""
    return Tokenizer.train(SENTENCES * 5, vocab_size=300, min_frequency=1)


def save_tiny_model(directory: str, block_size: int = 32, seed: int = 0, tokenizer: Tokenizer | None = None) -> str:
    """A random 2-layer GPT-2 in the HF layout, with GPT-2's tokenizer files (or `tokenizer`)."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or Tokenizer.gpt2()
    model = GPT(GPTConfig(vocab_size=max(tokenizer.n_vocab, 64), block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    save_pretrained(model, directory, tokenizer=tokenizer)
    return directory


class TableModel(nn.Module):
    """A 'language model' whose next-token logits depend only on the current token: logits = table[token].

    With it, a test decides exactly what the model predicts.
    """

    def __init__(self, vocab_size: int, block_size: int = 16):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.table = nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.config.block_size:
            raise AssertionError("read more tokens than its context")
        return self.table[idx]


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_text(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def long_text(words: int = 400, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    vocab = " ".join(SENTENCES).split()
    return " ".join(rng.choice(vocab) for _ in range(words))


WIKI_RAW = (
    " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . He had a "
    "guest @-@ starring role on the television series The Bill in 2000 . \n \n = = Career = = \n \n In 2006 , "
    "Boulter starred alongside Whishaw in the play Citizenship written by Mark Ravenhill ( 1 @,@ 000 seats ) . \n"
    " \n = Du Fu = \n \n Du Fu ( 712 – 770 ) was a prominent Chinese poet of the Tang dynasty . Along with Li Bai "
    ', he is frequently called the greatest of the Chinese poets . It \'s " the best " of 3 @.@ 5 works . \n \n'
)


def hellaswag_rows() -> list[dict]:
    """Two items in the published hellaswag_val.jsonl layout (label as an int and as a string)."""
    return [
        {
            "ind": 4,
            "activity_label": "Removing ice from car",
            "ctx_a": "Then, the man writes over the snow covering the window of a car, "
            "and a woman wearing winter clothes smiles.",
            "ctx_b": "then",
            "ctx": "",
            "split": "val",
            "split_type": "indomain",
            "label": 3,
            "endings": [
                ", the man adds wax to the windshield and cuts it.",
                ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes "
                "snow as the we girls sled.",
                ", the man puts on a christmas coat, knitted with netting.",
                ", the man continues removing the snow on his car.",
            ],
            "source_id": "activitynet~v_-1IBHYS3L-Y",
        },
        {
            "ind": 100,
            "activity_label": "Home and Garden",
            "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
            "ctx_b": "you",
            "ctx": "",
            "split": "val",
            "split_type": "zeroshot",
            "label": "0",
            "endings": [
                "should water the plants [step] every morning.",
                "can paint the fence blue.",
                "will sing to the moon.",
                "drive a car to the shop.",
            ],
            "source_id": "wikihow~1",
        },
    ]
