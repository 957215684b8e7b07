"""Shards → training → checkpoints → models that load anywhere; runs resume exactly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_fixtures import TINY, cli, metrics, tiny_data, train_losses

from gptwo import GPT
from gptwo.train import checkpoint
from gptwo.train.checkpoint import list_checkpoints, read_trainer_state
from gptwo.train.loop import run_training
from gptwo.weights import load_model


def test_train_checkpoint_round_trip(tmp_path):
    data, run = tiny_data(), str(tmp_path / "run")
    summary = run_training(data, run, overrides=TINY + ["max_steps=12"], progress=False)
    assert summary["step"] == 12 and summary["val_loss"] < 5.7  # ln(300) = 5.70 is a uniform guess
    rows = metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert all({"lr", "tokens_per_s"} <= set(r) for r in train_rows)
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [4, 8, 12] and all(r["val_bpb"] > 0 for r in val_rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    with open(os.path.join(run, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # keep_checkpoints=2 keeps the newest two
    assert [step for step, _ in list_checkpoints(run)] == [8, 12]
    # a checkpoint is a model folder for gptwo and for transformers, with identical outputs
    from transformers import GPT2LMHeadModel

    checkpoint = os.path.join(run, "checkpoints", "step_12")
    ours, tok = load_model(checkpoint, device="cpu")
    theirs = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    idx = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)
    # the run folder itself holds the latest weights
    latest = GPT.from_pretrained(run)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, latest.state_dict()[name]), name
    state = read_trainer_state(checkpoint)
    assert state["step"] == 12 and state["ranks"][0]["loader"]["slots_consumed"] == 12
    # gptwo generate reads the run folder
    result = cli("generate", "--model", run, "--max-new-tokens", "5", "--seed", "0", "The")
    assert result.returncode == 0 and result.stdout


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_crash_then_resume_in_process_gives_identical_losses(tmp_path, monkeypatch, sampling):
    data, settings = tiny_data(), TINY + ["max_steps=10", "checkpoint_every=2", f"sampling={sampling}", "dropout=0.1"]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    run_training(data, straight, overrides=settings, progress=False)
    real_save = checkpoint.save_checkpoint

    def save_then_crash(run_dir, step, *args, **kwargs):
        real_save(run_dir, step, *args, **kwargs)
        if step == 6:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(data, crashed, overrides=settings, progress=False)
    monkeypatch.undo()
    assert max(train_losses(crashed)) == 6
    run_training(data, crashed, resume=True, progress=False)
    assert train_losses(straight) == train_losses(crashed)  # exact: same floats


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    data = tiny_data()
    settings = TINY + ["max_steps=120", "checkpoint_every=5", "eval_every=1000", "sample_tokens=0"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert cli("train", "--data", data, "--out", straight, *settings).returncode == 0
    # kill with SIGKILL as soon as the first checkpoint exists (perhaps while it writes the next one)
    process = subprocess.Popen(
        [sys.executable, "-m", "gptwo.cli", "train", "--data", data, "--out", killed, *settings],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(killed) and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = list_checkpoints(killed)
    assert done and done[-1][0] < 120
    result = cli("train", "--data", data, "--out", killed, "--resume", *settings)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    a, b = train_losses(straight), train_losses(killed)
    assert sorted(b) == list(range(1, 121))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
