"""Every way a run can fail gives one clear line, exit 2, and loses nothing already written."""

import errno
import os
import shutil

import pytest
import torch
from train_fixtures import TINY, cli, tiny_data, train_losses

from gptwo import GPT, GPTConfig
from gptwo.errors import GptwoError
from gptwo.train import loop
from gptwo.train.checkpoint import list_checkpoints
from gptwo.train.loop import run_training
from gptwo.weights import load_model, save_pretrained

STEPS = TINY + ["sample_tokens=0"]
FINE_TUNE = [
    s for s in STEPS if not s.startswith(("n_layer=", "n_head=", "n_embd="))
]  # --init-from keeps the model's shape


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and " — " in lines[-1] and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def assert_loads(path):
    model, _ = load_model(path, device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n\n")
    one_line_error(cli("prepare", str(tmp_path / "blank.txt"), "--out", str(tmp_path / "data")), "empty")
    # a data folder whose train split is empty is refused by train as well
    data = str(tmp_path / "copy")
    shutil.copytree(tiny_data(), data)
    meta_path = os.path.join(data, "meta.json")
    import json

    meta = json.load(open(meta_path))
    meta["train_tokens"] = 0
    json.dump(meta, open(meta_path, "w"))
    one_line_error(cli("train", "--data", data, "--out", str(tmp_path / "run"), *STEPS), "no training tokens")


def test_init_from_a_model_with_another_tokenizer(tmp_path):
    model_dir = str(tmp_path / "gpt2-tiny")  # GPT-2's vocabulary, no tokenizer.json: GPT-2's BPE
    save_pretrained(GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)), model_dir)
    result = cli(
        "train",
        "--data",
        tiny_data(),
        "--out",
        str(tmp_path / "run"),
        "--init-from",
        model_dir,
        *FINE_TUNE,
        "max_steps=2",
    )
    one_line_error(result, "tokenized with 'bpe-", "uses 'gpt2'", "--tokenizer gpt2")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_init_from_fine_tunes_and_checks_context(tmp_path):
    base = str(tmp_path / "base")
    run_training(tiny_data(), base, overrides=STEPS + ["max_steps=4"], progress=False)
    tuned = str(tmp_path / "tuned")
    with pytest.raises(
        GptwoError, match="n_layer=7 cannot apply with --init-from"
    ):  # a fine-tune keeps the pretrained shape
        run_training(
            tiny_data(), tuned, overrides=FINE_TUNE + ["max_steps=4", "n_layer=7"], init_from=base, progress=False
        )
    summary = run_training(tiny_data(), tuned, overrides=FINE_TUNE + ["max_steps=4"], init_from=base, progress=False)
    assert summary["step"] == 4
    assert GPT.from_pretrained(tuned).config.n_layer == 2
    first_loss = train_losses(tuned)[1]
    assert first_loss < train_losses(base)[1]  # starts from trained weights, not from scratch
    result = cli(
        "train",
        "--data",
        tiny_data(),
        "--out",
        str(tmp_path / "long"),
        "--init-from",
        base,
        *FINE_TUNE,
        "block_size=64",
    )
    one_line_error(result, "block_size=64 is longer than the model's context of 32")


def test_resume_with_different_data(tmp_path):
    run = str(tmp_path / "run")
    run_training(tiny_data(), run, overrides=STEPS + ["max_steps=4"], progress=False)
    other = tiny_data("trained", seed=1)  # another corpus, so another trained tokenizer
    one_line_error(
        cli("train", "--data", other, "--out", run, "--resume", "max_steps=8"), "tokenized with", "same --data"
    )
    one_line_error(cli("train", "--data", tiny_data(), "--out", run, *STEPS), "already holds a run", "--resume")
    assert [s for s, _ in list_checkpoints(run)] == [4]


def test_truncated_shard(tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data(), data)
    run = str(tmp_path / "run")
    run_training(data, run, overrides=STEPS + ["max_steps=4"], progress=False)
    shard = os.path.join(data, "train_000000.bin")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 7)
    one_line_error(cli("train", "--data", data, "--out", run, "--resume", "max_steps=8"), "truncated or corrupt")
    assert_loads(os.path.join(run, "checkpoints", "step_4"))


def test_block_size_longer_than_data(tmp_path):
    result = cli("train", "--data", tiny_data(), "--out", str(tmp_path / "run"), *STEPS, "block_size=100000")
    one_line_error(result, "block")


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    data, run = tiny_data(), str(tmp_path / "run")
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the disk fills up after step 5
        if os.path.exists(os.path.join(run, "metrics.jsonl")) and max(train_losses(run), default=0) >= 5:
            calls.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(
        GptwoError,
        match=r"could not write checkpoint step_8 \(No space left on device\); step_4 is intact.*free disk space",
    ):
        run_training(data, run, overrides=STEPS + ["max_steps=12"], progress=False)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert calls and [s for s, _ in list_checkpoints(run)] == [4]
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if ".tmp-" in n]
    assert_loads(os.path.join(run, "checkpoints", "step_4"))
    assert_loads(run)
    summary = run_training(tiny_data(), run, overrides=["max_steps=12"], resume=True, progress=False)
    assert summary["step"] == 12


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    result = cli("train", "--data", tiny_data(), "--out", run, *STEPS, "max_steps=12", "lr=1e30", "warmup_steps=0")
    one_line_error(result, "diverged at step 2", "lower lr")
    assert list_checkpoints(run) == []


def test_nan_loss_after_a_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real_loss = loop._Trainer.loss_fn
    calls = {"n": 0}  # training micro-batches so far

    def poisoned(model, x, y):
        calls["n"] += model.training
        loss = real_loss(model, x, y)
        return loss * float("nan") if calls["n"] > 6 and model.training else loss

    monkeypatch.setattr(loop._Trainer, "loss_fn", staticmethod(poisoned))
    with pytest.raises(GptwoError, match=r"diverged at step 7: loss is nan; the last good checkpoint is .*step_4"):
        run_training(tiny_data(), run, overrides=STEPS + ["max_steps=12"], progress=False)
    assert [s for s, _ in list_checkpoints(run)] == [4]
    assert_loads(run)
    assert max(train_losses(run)) == 6


def test_init_from_gpt2_checks_tokenizer_before_downloading(tmp_path):
    # offline: an attempt to download would end in a different error
    result = cli(
        "train",
        "--data",
        tiny_data(),
        "--out",
        str(tmp_path / "run"),
        "--init-from",
        "gpt2",
        *FINE_TUNE,
        env={"HF_HUB_OFFLINE": "1"},
    )
    one_line_error(result, "but gpt2 uses 'gpt2'", "--tokenizer gpt2")
