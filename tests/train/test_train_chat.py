"""Training on chat data: the loss over counted targets only, weighted by them across micro-batches and ranks;
the run folder carries the data's chat template, as transformers reads it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import train_losses

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.chat import encode_chat, read_chat_template
from gptwo.data.chat import prepare_chat
from gptwo.data.loader import IGNORE, ShardLoader
from gptwo.train.loop import loss_fn, run_training
from gptwo.weights import load_model

CHAT_TRAIN = [
    "n_layer=2",
    "n_head=2",
    "n_embd=32",
    "block_size=32",
    "lr=3e-3",
    "warmup_steps=1",
    "max_steps=2",
    "eval_every=2",
    "checkpoint_every=2",
    "log_every=1",
    "sample_tokens=0",
    "threads=1",
    "compile=false",
]
ACCUMULATED = ["batch_size=2", "grad_accum=2", "eval_batches=2"]


def conversations(count: int, seed: int = 0) -> list[dict]:
    """Sums to answer, behind system prompts of different lengths (so windows hold different numbers of
    counted targets)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        system = " ".join(["Answer with the number only."] * rng.randint(0, 4))
        messages = [{"role": "system", "content": system}] if system else []
        out.append({"messages": [*messages, {"role": "user", "content": f"Add {a} and {b}"}]})
        out[-1]["messages"].append({"role": "assistant", "content": str(a + b)})
    return out


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_train")
    source = root / "chat.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in conversations(120)))
    prepare_chat([str(source)], str(root / "data"), val_fraction=0.25, progress=False)
    return str(root / "data")


def test_loss_fn_is_the_mean_over_counted_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=50))
    x = torch.randint(0, 50, (3, 8))
    y = torch.randint(0, 50, (3, 8))
    y[0, :5] = IGNORE
    y[2] = IGNORE
    logp = F.log_softmax(model(x).float(), dim=-1)
    picked = [-logp[b, t, y[b, t]] for b in range(3) for t in range(8) if y[b, t] != IGNORE]
    with torch.no_grad():
        assert float(loss_fn(model, x, y)) == pytest.approx(float(sum(picked) / len(picked)), rel=1e-5)
        assert float(loss_fn(model, x, y, reduction="sum")) == pytest.approx(float(sum(picked)), rel=1e-5)


@pytest.fixture(scope="module")
def runs(chat_data, tmp_path_factory):
    """One step of 4 rows, and the same rows as 2 micro-batches of 2 (eval over the same 4 val rows)."""
    root = tmp_path_factory.mktemp("chat_runs")
    whole, accumulated = str(root / "whole"), str(root / "accumulated")
    run_training(chat_data, whole, overrides=[*CHAT_TRAIN, "batch_size=4", "eval_batches=1"], progress=False)
    run_training(chat_data, accumulated, overrides=[*CHAT_TRAIN, *ACCUMULATED], progress=False)
    return whole, accumulated


def _metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_micro_batches_weigh_by_their_counted_targets(chat_data, runs):
    whole, accumulated = runs
    micro = ShardLoader(chat_data, batch_size=2, block_size=32)
    counts = [int((micro.next_batch()[1] != IGNORE).sum()) for _ in range(2)]
    assert counts[0] != counts[1]  # a mean of the two micro-batches' means would differ from the step's mean
    one, two = train_losses(whole), train_losses(accumulated)
    assert sorted(one) == sorted(two) == [1, 2]
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5
    a, _ = load_model(whole, device="cpu")
    b, _ = load_model(accumulated, device="cpu")
    for name, tensor in a.state_dict().items():
        assert (tensor - b.state_dict()[name]).abs().max() < 1e-5, name
    # validation: the mean over the counted targets of the same rows, whatever the batch shape
    val_whole = [r for r in _metrics(whole) if "val_loss" in r][-1]
    val_accumulated = [r for r in _metrics(accumulated) if "val_loss" in r][-1]
    assert val_whole["val_loss"] == pytest.approx(val_accumulated["val_loss"], rel=1e-5)
    x, y = ShardLoader(chat_data, split="val", batch_size=4, block_size=32).next_batch()
    with torch.no_grad():
        assert val_whole["val_loss"] == pytest.approx(float(loss_fn(a.eval(), x, y)), rel=1e-5)
    # bits per byte of the counted (assistant) text
    meta = json.loads(open(os.path.join(chat_data, "meta.json")).read())["splits"]["val"]
    bpb = val_whole["val_loss"] / 0.6931471805599453 * meta["counted_tokens"] / meta["counted_bytes"]
    assert val_whole["val_bpb"] == pytest.approx(bpb, rel=1e-6)


def test_the_run_folder_carries_the_chat_template_for_transformers(chat_data, runs):
    from transformers import AutoTokenizer

    whole, _ = runs
    template = json.loads(open(os.path.join(chat_data, "meta.json")).read())["chat_template"]
    assert read_chat_template(whole) == template
    assert read_chat_template(os.path.join(whole, "checkpoints", "step_2")) == template
    conversation = conversations(1, seed=5)[0]["messages"]
    oracle = AutoTokenizer.from_pretrained(whole).apply_chat_template(conversation, tokenize=True)
    oracle = list(oracle["input_ids"] if hasattr(oracle, "keys") else oracle)
    assert oracle == encode_chat(Tokenizer.gpt2(), conversation, template)[0]


def test_two_ranks_weigh_by_the_counted_targets_of_both(chat_data, runs, tmp_path):
    """DDP: each rank's micro-batch holds a different number of counted targets; the step's mean is over both."""
    _, accumulated = runs
    run = str(tmp_path / "ddp")
    overrides = [*CHAT_TRAIN, *ACCUMULATED[:1], "grad_accum=1", "eval_batches=2", "parallel=ddp"]
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptwo.cli", "train"]
    result = subprocess.run(
        [sys.executable, *command, "--data", chat_data, "--out", run, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = train_losses(accumulated), train_losses(run)
    assert sorted(two) == [1, 2] and max(abs(one[s] - two[s]) for s in one) < 1e-5
    val = [[r["val_loss"] for r in _metrics(path) if "val_loss" in r] for path in (accumulated, run)]
    assert val[1] == pytest.approx(val[0], rel=1e-5)
    a, _ = load_model(accumulated, device="cpu")
    b, _ = load_model(run, device="cpu")
    for name, tensor in a.state_dict().items():
        assert (tensor - b.state_dict()[name]).abs().max() < 1e-5, name
