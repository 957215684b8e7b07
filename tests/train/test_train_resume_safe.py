"""Safe resume: `--resume` continues the same run (from a checkpoint, or before the first one from the config
saved at step 0) or refuses; Ctrl-C and SIGTERM leave a checkpoint; metrics.jsonl keeps its earlier lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from train_fixtures import TINY, tiny_data

from gptwo.cli import main
from gptwo.train import loop
from gptwo.train.checkpoint import list_checkpoints, read_trainer_state
from gptwo.train.loop import run_training
from gptwo.train.metrics import read_metrics
from gptwo.weights import load_model

# not the built-in defaults, so a run trained with those would show
SHAPE = ["n_embd=48", "n_head=4", "max_steps=6", "checkpoint_every=100", "eval_every=2"]


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_resume_before_the_first_checkpoint_continues_the_saved_config(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")

    def crash(self, *args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(loop._Trainer, "evaluate", crash)  # at step 2, before any checkpoint
    with pytest.raises(RuntimeError, match="power cut"):
        run_training(tiny_data(), run, overrides=TINY + SHAPE, progress=False)
    monkeypatch.undo()
    assert not list_checkpoints(run)
    saved = json.load(open(os.path.join(run, "train_config.json")))["config"]
    assert saved["n_embd"] == 48 and saved["max_steps"] == 6
    before = _lines(os.path.join(run, "metrics.jsonl"))
    assert before

    # no preset, no shape given: the saved run continues, with the command line's override on top
    assert main(["train", "--data", tiny_data(), "--out", run, "--resume", "max_steps=7"]) == 0
    assert "starting its run again from step 0 with its saved config" in capsys.readouterr().err
    (step, last), *_ = reversed(list_checkpoints(run))
    assert step == 7
    assert read_trainer_state(last)["config"] == {**saved, "max_steps": 7}
    after = _lines(os.path.join(run, "metrics.jsonl"))
    assert after[: len(before)] == before  # nothing emptied
    steps = [row["step"] for row in read_metrics(os.path.join(run, "metrics.jsonl")) if "loss" in row]
    assert steps == list(range(1, 8))  # readers see the run once


def test_resume_with_nothing_saved_is_a_one_line_error(tmp_path, capsys):
    run = str(tmp_path / "never-started")
    assert main(["train", "--data", tiny_data(), "--out", run, "--resume", "--preset", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: ") and "holds no run to continue" in err[0]
    assert not os.path.exists(run)  # nothing written


def test_sigterm_to_a_training_process_saves_a_checkpoint_that_resume_continues(tmp_path, capsys):
    run = str(tmp_path / "run")
    settings = TINY + ["max_steps=100000", "checkpoint_every=100000", "eval_every=100000", "sample_tokens=0"]
    train = ["train", "--data", tiny_data(), "--out", run, *settings]
    process = subprocess.Popen([sys.executable, "-m", "gptwo.cli", *train], stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while len(read_metrics(metrics)) < 3:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted — ") and "--resume" in err
    (step, path), *_ = list_checkpoints(run)
    logged = [row["step"] for row in read_metrics(metrics) if "loss" in row]
    assert step == logged[-1] >= 3  # the step it reached
    assert f"SIGTERM: stopped at step {step}" in err
    model, _ = load_model(path, device="cpu")
    assert model.config.n_embd == 32
    before = _lines(metrics)

    assert main([*train, "--resume", f"max_steps={step + 2}"]) == 0
    assert f"at step {step}" in capsys.readouterr().err
    assert list_checkpoints(run)[-1][0] == step + 2
    assert _lines(metrics)[: len(before)] == before


def test_ctrl_c_finishes_the_step_and_saves_it(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    real_step = loop._Trainer.train_step

    def step_then_ctrl_c(self):
        result = real_step(self)
        if self.step == 2:  # during step 3
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(loop._Trainer, "train_step", step_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    assert main(["train", "--data", tiny_data(), "--out", run, *TINY, "max_steps=50", "checkpoint_every=100"]) == 130
    assert "SIGINT: stopped at step 3" in capsys.readouterr().err
    assert [step for step, _ in list_checkpoints(run)] == [3]
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is restored
