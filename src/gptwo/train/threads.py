"""Fewer torch threads while other processes hold a CPU run's cores (a time-budgeted run on Linux).

A torch thread whose core is busy with another process makes the run's other threads wait for it at
every operation: on a 2-core machine with one core busy, 2 threads trained the cpu preset 2-3x slower
than 1 thread (docs/training.md, *Threads on CPU*). A run picks its thread count once, from the cores it
may use, so a job that starts beside it slows it down for good. Under a time budget, where fewer steps
then fit, `ThreadTuner` watches the cores instead: every WINDOW steps it reads from /proc/stat how much
CPU other processes took on them (the cores' busy time less the CPU time of this process and of the
processes it started, such as the compiler's workers). When they held at least BUSY of a core, the next
window runs on the cores left (at least one) and the faster of the two windows is kept; when they have
gone, all the cores are tried again. The first step after a change is left out of every rate: a compiled
step compiles again for a new thread count (once per count).
"""

from __future__ import annotations

import os
import time

import torch

WINDOW = 20  # steps per measurement
BUSY = 0.5  # cores other processes hold before fewer threads are tried
BACKOFF = 5  # windows to wait after a try that was slower (doubling each time)


def busy_seconds(cpus: list[int], path: str = "/proc/stat") -> float | None:
    """Seconds the given cores have been busy since boot (user, nice, system, irq, softirq, steal), or None
    where /proc/stat cannot be read (not Linux)."""
    wanted = {f"cpu{i}" for i in cpus}
    total = 0
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in wanted:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
                    total += user + nice + system + irq + softirq + steal
    except (OSError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def own_seconds(proc: str = "/proc") -> float:
    """CPU seconds of this process and every process under it: its own threads, the children it reaped
    (os.times), and the live descendants with what they reaped (/proc/PID/stat: utime, stime, cutime,
    cstime). A compiled step's compiler workers and their gcc runs are the run's work, not other load."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return total
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "stat"), encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
        except (OSError, IndexError):
            continue  # gone, or not ours to read
        parents[int(name)] = int(fields[1])
        ticks[int(name)] = sum(int(v) for v in fields[11:15])
    under, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in under}
        under |= frontier
    return total + sum(ticks[pid] for pid in under) / os.sysconf("SC_CLK_TCK")


class ThreadTuner:
    """The torch thread count of a CPU run, changed while other processes hold its cores (module docstring)."""

    def __init__(self, cpus: list[int], step: int, stat: str = "/proc/stat"):
        self.cpus, self.stat = cpus, stat
        self.full = self.threads = torch.get_num_threads()
        self.steps_at: dict[int, int] = {}  # steps trained at each thread count
        self.trying: tuple[int, float] | None = None  # (the count before, its rate) while a new count is tried
        self.changed = False  # the next step is the first at a new count: left out of the rates
        self.wait = self.backoff = 0
        self.others = 0.0  # cores other processes held over the last window
        self.others_before = 0.0  # ... over the window before the count now tried
        self.rate = 0.0
        self.mark(step)

    @classmethod
    def for_run(cls, cpus: list[int], step: int) -> ThreadTuner | None:
        """A tuner for a run with more than one thread on cores whose load can be read, else None."""
        if torch.get_num_threads() < 2 or len(cpus) < 2 or busy_seconds(cpus) is None:
            return None
        return cls(cpus, step)

    def mark(self, step: int) -> None:
        """Start a window at `step`."""
        self.since = (step, time.perf_counter(), busy_seconds(self.cpus, self.stat) or 0.0, own_seconds())
        self.paused = 0.0

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, a checkpoint) out of the window's rate."""
        self.paused += seconds

    def due(self, step: int) -> bool:
        return step - self.since[0] >= WINDOW

    def measure(self, step: int) -> str | None:
        """Close the window at `step`, change the thread count if it should, start the next window; a line
        saying so when a change is kept."""
        start, wall, busy, own = self.since
        now = time.perf_counter()
        seconds = max(now - wall, 1e-9)
        self.rate = (step - start) / max(seconds - self.paused, 1e-9)
        self.others = max(0.0, ((busy_seconds(self.cpus, self.stat) or busy) - busy - (own_seconds() - own)))
        self.others /= seconds
        self.steps_at[self.threads] = self.steps_at.get(self.threads, 0) + step - start
        said = None
        if self.trying is not None:  # a new count had its window: keep the faster
            before, before_rate = self.trying
            self.trying = None
            if self.rate < before_rate:
                self.backoff = min(2 * self.backoff or BACKOFF, 40)
                self.wait = self.backoff
                self._set(before)
            else:
                self.backoff = 0
                said = (
                    f"threads: {self.threads} instead of {before} from step {step - WINDOW} "
                    f"({self.rate:.2f} steps/s against {before_rate:.2f}; "
                    + (
                        f"other processes held {self.others_before:.1f} of {len(self.cpus)} cores)"
                        if self.threads < before
                        else "the other processes have gone)"
                    )
                )
        elif self.wait:
            self.wait -= 1
        elif self.threads == self.full and self.others >= BUSY:
            fewer = max(1, min(self.full - 1, round(len(self.cpus) - self.others)))
            self._try(fewer)
        elif self.threads < self.full and self.others < BUSY:
            self._try(self.full)
        self.mark(step)
        return said

    def _try(self, threads: int) -> None:
        self.trying, self.others_before = (self.threads, self.rate), self.others
        self._set(threads)

    def _set(self, threads: int) -> None:
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads, self.changed = threads, True

    def settled(self, step: int) -> None:
        """The first step at a new count is done: the window starts after it."""
        self.steps_at[self.threads] = self.steps_at.get(self.threads, 0) + step - self.since[0]
        self.changed = False
        self.mark(step)
