"""Online selection under torchrun (2 CPU processes, gloo): each rank scores its own pool, flops count
every rank, and a resumed run repeats the uninterrupted run's losses."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from select_fixtures import TINY, metrics, mixed_data


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gptwo.cli",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_select_and_resume_exactly(tmp_path, parallel):
    run = str(tmp_path / "run")
    settings = [
        *TINY,
        "max_steps=6",
        "checkpoint_every=2",
        "selection=loss",
        "selection_pool=2",
        f"parallel={parallel}",
    ]
    result = torchrun("train", "--data", mixed_data(), "--out", run, *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    first = {r["step"]: (r["loss"], r["flops"]) for r in metrics(run) if "loss" in r}
    per_step = first[1][1]
    assert [first[s][1] for s in range(1, 7)] == [s * per_step for s in range(1, 7)]
    with open(os.path.join(run, "checkpoints", "step_6", "trainer.json"), encoding="utf-8") as f:
        assert (
            json.load(f)["ranks"][0]["loader"]["slots_consumed"] == 6 * 2 * 2
        )  # 6 steps x pool of 2 batches x 2 ranks
    shutil.rmtree(os.path.join(run, "checkpoints", "step_6"))  # as if killed after step 4's checkpoint
    result = torchrun("train", "--data", mixed_data(), "--out", run, "--resume", *settings)
    assert result.returncode == 0 and "resuming from" in result.stderr, result.stderr[-3000:]
    again = {r["step"]: (r["loss"], r["flops"]) for r in metrics(run) if "loss" in r}
    assert again == first
