"""Fewer torch threads while other processes hold a time-budgeted CPU run's cores (gptwo.train.threads)."""

from __future__ import annotations

import time

import pytest
import torch
from train_fixtures import TINY, tiny_data

from gptwo.train import threads
from gptwo.train.loop import run_training


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """A clock, this process's CPU time and a /proc/stat for two cores, moved by `run(steps, ...)`."""

    def __init__(self, monkeypatch, tmp_path):
        self.wall = self.own = self.busy = 0.0
        self.stat = tmp_path / "stat"
        self.write()
        monkeypatch.setattr(threads.time, "perf_counter", lambda: self.wall)
        monkeypatch.setattr(threads, "own_seconds", lambda: self.own)

    def write(self) -> None:
        ticks = int(self.busy * threads.os.sysconf("SC_CLK_TCK"))  # all on cpu0: only the sum over cores counts
        self.stat.write_text(
            f"cpu  {ticks} 0 0 0 0 0 0 0 0 0\ncpu0 {ticks} 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\n"
        )

    def run(self, tuner, step: int, steps: int, seconds_per_step: float, others: float) -> tuple[int, list]:
        """`steps` steps of the run; `others` cores are held by other processes meanwhile."""
        said = []
        for _ in range(steps):
            changed = tuner.changed
            self.wall += seconds_per_step
            self.own += seconds_per_step * tuner.threads
            self.busy += seconds_per_step * (tuner.threads + others)
            self.write()
            step += 1
            if changed:
                tuner.settled(step)
            elif tuner.due(step) and (line := tuner.measure(step)):
                said.append(line)
        return step, said


def test_busy_seconds_reads_the_given_cores_only(tmp_path):
    stat = tmp_path / "stat"
    hz = threads.os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  {9 * hz} 0 0 0\ncpu0 {hz} {hz} {hz} 50 7 0 0 {hz} 0 0\ncpu1 {5 * hz} 0 0 0 0 0 0 0 0 0\n")
    assert threads.busy_seconds([0], str(stat)) == 4.0  # user, nice, system and steal; not idle or iowait
    assert threads.busy_seconds([0, 1], str(stat)) == 9.0
    assert threads.busy_seconds([0], str(tmp_path / "none")) is None


def test_fewer_threads_are_kept_while_others_hold_a_core_and_all_come_back_when_they_leave(
    monkeypatch, tmp_path, two_threads
):
    machine = FakeMachine(monkeypatch, tmp_path)
    tuner = threads.ThreadTuner([0, 1], 0, str(machine.stat))
    assert tuner.threads == 2
    step, said = machine.run(tuner, 0, 40, 0.1, others=0.0)  # an idle machine: nothing changes
    assert tuner.threads == torch.get_num_threads() == 2 and not said
    step, said = machine.run(tuner, step, 20, 0.3, others=1.0)  # a job takes a core: 2 threads slow down 3x
    assert tuner.threads == torch.get_num_threads() == 1 and tuner.changed and not said  # 1 thread is tried
    step, said = machine.run(tuner, step, 21, 0.15, others=1.0)  # faster on 1: kept, and said
    assert tuner.threads == 1 and len(said) == 1
    assert "threads: 1 instead of 2" in said[0] and "held 1.0 of 2 cores" in said[0]
    step, said = machine.run(tuner, step, 60, 0.15, others=1.0)  # the job still runs: stays on 1
    assert tuner.threads == 1 and not said
    step, said = machine.run(tuner, step, 20, 0.15, others=0.0)  # the job ends: 2 are tried again
    assert tuner.threads == 2
    step, said = machine.run(tuner, step, 21, 0.1, others=0.0)
    assert tuner.threads == 2 and said == [said[0]] and "the other processes have gone" in said[0]
    assert sum(tuner.steps_at.values()) == tuner.since[0]  # every step so far counted at its thread count


def test_a_slower_try_goes_back_and_waits_before_trying_again(monkeypatch, tmp_path, two_threads):
    machine = FakeMachine(monkeypatch, tmp_path)
    tuner = threads.ThreadTuner([0, 1], 0, str(machine.stat))
    step, _ = machine.run(tuner, 0, 20, 0.1, others=0.6)  # a light load: 1 thread is tried
    assert tuner.threads == 1
    step, said = machine.run(tuner, step, 21, 0.2, others=0.6)  # slower on 1: back to 2, nothing said
    assert tuner.threads == 2 and not said
    step, _ = machine.run(tuner, step, 1 + 20 * threads.BACKOFF, 0.1, others=0.6)  # the same load: no try for a while
    assert tuner.threads == 2 and tuner.wait == 0
    step, _ = machine.run(tuner, step, 20, 0.1, others=0.6)  # then it tries again
    assert tuner.threads == 1


def test_own_seconds_counts_the_processes_the_run_started():
    """A compiled step's compiler workers and their gcc runs are the run's own work, not other processes':
    CPU spent by a grandchild (reaped by a child still alive) is counted."""
    import subprocess
    import sys

    burn = f"{sys.executable} -c 'import time; t = time.process_time()\nwhile time.process_time() - t < 0.6: pass'"
    before, mine = threads.own_seconds(), time.process_time()
    child = subprocess.Popen(["bash", "-c", f"{burn}; echo done; sleep 30"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"  # the grandchild burnt 0.6 s and was reaped by bash
        grown = threads.own_seconds() - before
        assert grown - (time.process_time() - mine) >= 0.5
    finally:
        child.kill()
        child.wait()


def test_a_budgeted_run_on_busy_cores_trains_on_fewer_threads_and_reports_each(monkeypatch, tmp_path, two_threads):
    """The whole path: gptwo train with max_time, on cores that other processes (faked in /proc/stat) hold."""
    from gptwo.train import loop

    monkeypatch.setattr(loop, "cpu_list", lambda: [0, 1])
    monkeypatch.setattr(
        threads, "busy_seconds", lambda cpus, path="/proc/stat": threads.own_seconds() + 2 * time.perf_counter()
    )
    overrides = [o for o in TINY if not o.startswith("threads=")]
    summary = run_training(
        tiny_data(),
        str(tmp_path / "run"),
        overrides=overrides + ["max_steps=80", "max_time=3600", "compile=false", "sample_tokens=0", "eval_every=40"],
        progress=False,
    )
    counts = summary["threads_steps"]
    assert set(counts) == {1, 2} and sum(counts.values()) == summary["step"] == 80
