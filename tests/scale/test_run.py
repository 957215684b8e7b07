"""Sweeps: every run an ordinary run folder; a killed sweep resumes without retraining finished runs."""

import json
import os
import signal
import subprocess
import sys
import time

from scale_fixtures import TINY_SHAPES, TINY_TRAIN, cli, tiny_data

from gptwo.scale.fit import read_points
from gptwo.scale.plan import make_plan, write_plan
from gptwo.scale.run import _SHAPE_KEYS, MARKER, RESULTS, STARTED, _job, run_sweep
from gptwo.train.loop import run_training
from gptwo.train.metrics import read_metrics


def tiny_plan(path: str, budget: float = 3e7) -> dict:
    plan = make_plan([budget], vocab_size=300, shapes=TINY_SHAPES, per_budget=3, train=TINY_TRAIN)
    write_plan(plan, path)
    return plan


def test_sweep_trains_ordinary_runs_and_records_params_tokens_flops_and_held_out_loss(tmp_path):
    plan = tiny_plan(str(tmp_path / "plan.json"))
    records = run_sweep(str(tmp_path / "plan.json"), tiny_data(), str(tmp_path / "sweep"), parallel=2)
    assert [r["name"] for r in records] == [r["name"] for r in plan["runs"]]
    for run, record in zip(plan["runs"], records):
        folder = tmp_path / "sweep" / "runs" / run["name"]
        rows = read_metrics(str(folder / "metrics.jsonl"))
        assert (folder / "model.safetensors").exists() and (
            folder / "config.json"
        ).exists()  # a model folder, as `gptwo train` leaves
        assert (
            record["loss"] == [r["val_loss"] for r in rows if "val_loss" in r][-1]
            and rows[-1]["step"] == run["max_steps"]
        )
        assert (record["params"], record["tokens"], record["flops"]) == (run["params"], run["tokens"], run["flops"])
        assert record["seed"] == run.get("seed", 0)
        assert (
            record["unique_tokens"] == json.load(open(os.path.join(tiny_data(), "meta.json")))["train_tokens"]
        )  # what --repeats needs
    assert [p["loss"] for p in read_points([str(tmp_path / "sweep")])] == [r["loss"] for r in records]


def test_killed_sweep_resumes_without_retraining_finished_runs(tmp_path):
    plan = tiny_plan(str(tmp_path / "plan.json"), budget=1e8)
    out = tmp_path / "sweep"
    args = [
        sys.executable,
        "-m",
        "gptwo.cli",
        "scale",
        "run",
        str(tmp_path / "plan.json"),
        "--data",
        tiny_data(),
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    first = out / "runs" / plan["runs"][0]["name"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (first / MARKER).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / MARKER).exists()
    done = {
        name: (out / "runs" / name / MARKER).stat().st_mtime_ns
        for name in (r["name"] for r in plan["runs"])
        if (out / "runs" / name / MARKER).exists()
    }
    assert len(done) < len(plan["runs"])  # killed mid-sweep
    metrics_before = (first / "metrics.jsonl").read_bytes()

    result = cli(
        "scale", "run", str(tmp_path / "plan.json"), "--data", tiny_data(), "--out", str(out), "--threads", "1"
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(done)} of {len(plan['runs'])} runs already finished" in result.stderr
    for name, mtime in done.items():
        assert (out / "runs" / name / MARKER).stat().st_mtime_ns == mtime  # not retrained
    assert (first / "metrics.jsonl").read_bytes() == metrics_before
    records = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert [r["name"] for r in records] == [r["name"] for r in plan["runs"]]


def test_a_run_cut_short_is_resumed_from_its_checkpoint(tmp_path):
    plan = tiny_plan(str(tmp_path / "plan.json"), budget=1e8)
    run = plan["runs"][0]
    folder = tmp_path / "sweep" / "runs" / run["name"]
    shape = [f"{k}={run[k]}" for k in ("n_layer", "n_head", "n_embd")] + [f"{k}={v}" for k, v in TINY_TRAIN.items()]
    # what a sweep killed mid-run leaves: its started-marker (written before training), then a checkpoint
    job = _job(plan, run, tiny_data(), str(tmp_path / "sweep"), 1, plan["vocab_size"])
    folder.mkdir(parents=True)
    (folder / STARTED).write_text(json.dumps({k: job["record"][k] for k in _SHAPE_KEYS}))
    run_training(
        tiny_data(),
        str(folder),
        overrides=shape + ["max_steps=4", "checkpoint_every=4", "threads=1", "device=cpu"],
        progress=False,
        overwrite=True,  # as the sweep's train_job calls it, past the marker it checked itself
    )
    records = run_sweep(str(tmp_path / "plan.json"), tiny_data(), str(tmp_path / "sweep"))
    assert "resuming from" in (folder / "train.log").read_text()
    steps = [r["step"] for r in read_metrics(str(folder / "metrics.jsonl")) if "loss" in r]
    assert (
        steps[0] == 1 and steps[-1] == run["max_steps"] and steps == sorted(set(steps))
    )  # one run, continued, not restarted
    assert records[0]["steps"] == run["max_steps"]


def test_a_plan_for_another_vocabulary_is_refused(tmp_path):
    plan = make_plan([3e7], vocab_size=1024, shapes=TINY_SHAPES, per_budget=2, train=TINY_TRAIN)
    write_plan(plan, str(tmp_path / "plan.json"))
    result = cli("scale", "run", str(tmp_path / "plan.json"), "--data", tiny_data(), "--out", str(tmp_path / "sweep"))
    assert result.returncode == 2 and "1024-token vocabulary" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_data_without_a_held_out_batch_is_refused_before_training(tmp_path):
    plan = make_plan(
        [1e10],
        vocab_size=300,
        shapes=TINY_SHAPES,
        per_budget=2,
        train={**TINY_TRAIN, "block_size": 256, "batch_size": 64},
    )
    write_plan(plan, str(tmp_path / "plan.json"))
    result = cli("scale", "run", str(tmp_path / "plan.json"), "--data", tiny_data(), "--out", str(tmp_path / "sweep"))
    assert result.returncode == 2 and "held-out tokens" in result.stderr and len(result.stderr.splitlines()) == 1, (
        result.stderr
    )
    assert not (tmp_path / "sweep").exists()
