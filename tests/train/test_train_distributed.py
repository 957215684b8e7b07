"""torchrun with 2 CPU processes (gloo) follows the same loss curve as 1 process with grad_accum=2."""

import os
import subprocess
import sys

import pytest
from train_fixtures import TINY, cli, tiny_data, train_losses

from gptwo.train.checkpoint import list_checkpoints
from gptwo.weights import load_model

STEPS = ["max_steps=8", "eval_every=4", "checkpoint_every=4", "sample_tokens=0"]


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


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("single") / "run")
    result = cli("train", "--data", tiny_data(), "--out", run, *TINY, *STEPS, "grad_accum=2")
    assert result.returncode == 0, result.stderr
    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_grad_accum(tmp_path, single_process, parallel):
    run = str(tmp_path / "run")
    result = torchrun(
        "train", "--data", tiny_data(), "--out", run, *TINY, *STEPS, "grad_accum=1", f"parallel={parallel}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = train_losses(single_process), train_losses(run)
    assert sorted(two) == list(range(1, 9))
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5
    assert [s for s, _ in list_checkpoints(run)] == [4, 8]
    # rank 0 wrote full (unsharded) weights that match the single-process run's
    a, _ = load_model(single_process, device="cpu")
    b, _ = load_model(run, device="cpu")
    for name, tensor in a.state_dict().items():
        assert (tensor - b.state_dict()[name]).abs().max() < 1e-4, name
    # and the distributed run resumes from its own checkpoint
    result = torchrun("train", "--data", tiny_data(), "--out", run, "--resume", "max_steps=10", f"parallel={parallel}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(train_losses(run)) == list(range(1, 11))
