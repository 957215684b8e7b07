"""What the bad-input tests of every part share: running `gptwo` in process, the one-line error check, tiny data.

Importable from any test folder: pytest puts tests/ on sys.path through tests/conftest.py.
"""

from __future__ import annotations

import os

from gptwo.cli import main

SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "A model reads text one token at a time and learns to predict the next one.",
    "Rivers run to the sea, and the sea sends rain back to the hills again.",
    "In the morning the baker opens the shop and sets out bread and small cakes.",
]
TRAIN = [  # the smallest training run: one step of a one-layer model on one thread
    "n_layer=1",
    "n_head=1",
    "n_embd=32",
    "block_size=16",
    "batch_size=2",
    "sample_tokens=0",
    "threads=1",
    "eval_every=1",
    "max_steps=1",
]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process command; argparse's exits count as exit codes."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    """Exit 2 and one `error: … — …` line that contains `expected` (never the catch-all bug line)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], err
    assert "this is a bug" not in err and expected in lines[0], err


def write_file(path: str, data: bytes | str) -> str:
    """`data` written to `path` (folders made); returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def tiny_corpus(root: str, documents: int = 16):
    """`documents` small text files under ROOT/corpus and a 300-token BPE trained on them (saved as ROOT/tok.json)."""
    import random

    from gptwo import Tokenizer

    rng = random.Random(0)
    for i in range(documents):
        write_file(os.path.join(root, "corpus", f"doc{i:02d}.txt"), " ".join(rng.choice(SENTENCES) for _ in range(4)))
    tok = Tokenizer.train([os.path.join(root, "corpus")], vocab_size=300)
    tok.save(os.path.join(root, "tok.json"))
    return tok
