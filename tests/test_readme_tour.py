"""The README's tour runs as written: every offline command of its bash blocks, top to bottom, in one folder.

The commands are the README's own lines (bash reads them, so quoting and comments are bash's), run through
`gptwo.cli.main` in this process to save the start-up of ~25 processes. What makes them fast is small and
visible here: the built-in corpus cut to its first documents, a tiny quickstart run standing in for the
5-minute one, and a few options appended to some lines (argparse and `key=value` take the last value).
Skipped: lines marked (network) or (GPU), `serve` (a server) and `bench` (long benchmarks).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from gptwo.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = ("(network)", "(GPU)", "gptwo serve", "GPTWO_API_KEY=", "gptwo bench", "llamacpp.sh")
TRAIN = "n_layer=1 n_head=2 n_embd=32 block_size=32 batch_size=4 warmup_steps=1 eval_every=100 eval_batches=1"
TRAIN += " checkpoint_every=100 sample_tokens=4 log_every=1"
# appended to the lines that start with these words (the second applies after the first)
TINY = {
    "gptwo generate": "--max-new-tokens 4",
    "gptwo tokenizer train": "--vocab-size 300",
    "gptwo train": f"{TRAIN} max_steps=3",
    "gptwo detect sample": "--prompt-tokens 8 --new-tokens 16 --min-tokens 8 --limit 12",
    "gptwo detect calibrate": "--min-tokens 8 --folds 2",
    "gptwo scale plan": "--budgets 1e8,3e8,1e9 --shapes 1x2x8,1x2x12,1x2x16 --per-budget 3",
    "gptwo scale run": "--parallel 1",
    "gptwo scale fit": "--exclude-budget 1e9 --bootstrap 8",
}


def tour_lines() -> list[str]:
    """The commands of the README's bash blocks from '## A tour' on (one a line)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    tour = readme[readme.index("## A tour") : readme.index("**Python**")]
    blocks = re.findall(r"```bash\n(.*?)```", tour, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def argv(line: str) -> list[str]:
    """The words bash makes of a line (quotes and escapes resolved, the comment dropped)."""
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True, check=True)
    return done.stdout.split("\0")[:-1]


def tiny(words: list[str]) -> list[str]:
    line = " ".join(["gptwo", *words])
    extra = [option for start, option in TINY.items() if line.startswith(start)]
    if "--resume" in words:
        extra.append("max_steps=5")
    return words + " ".join(extra).split()


def test_the_readme_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    from gptwo.data import builtin
    from gptwo.train.quickstart import quickstart

    lines = tour_lines()
    assert any("--stop" in line for line in lines) and any("scale run" in line for line in lines)
    documents = builtin._builtin_documents()[:200]
    monkeypatch.setattr(builtin, "_builtin_documents", lambda: documents)
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(REPO, "docs"), "docs")
    quickstart("runs/quickstart", tiny=True, progress=False)  # what the README's first block makes
    capsys.readouterr()
    ran, started = [], time.perf_counter()
    for line in lines:
        if any(marker in line for marker in SKIP):
            continue
        if not line.startswith("gptwo "):  # mkdir, cp
            subprocess.run(["bash", "-c", line], check=True)
            continue
        words = argv(line)
        code = main(tiny(words[1:]))
        err = capsys.readouterr().err
        assert code == 0, f"{line}\n{err}"
        ran.append(words[1])
        print(f"{time.perf_counter() - started:6.1f} s  {line}", file=sys.__stderr__)
    assert ran.count("train") == 3 and {"generate", "prepare", "eval", "detect", "select", "scale"} <= set(ran)
    assert os.path.isfile("runs/mine/train_config.json") and os.path.isfile("fit.png")


@pytest.mark.parametrize("given, stop", [("\\n\\n", "\n\n"), ("\n\n", "\n\n"), ("a\\\\n", "a\\n"), ("\\x", "\\x")])
def test_stop_escapes(given, stop):
    from gptwo.text import unescape

    assert unescape(given) == stop
