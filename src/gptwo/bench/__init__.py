"""`gptwo bench`: speed on the user's own hardware, each workload anchored on transformers in the same run.

Shared pieces: the model to time, interleaved timing rounds (medians), the CPU's name and flags, and a
plain-text table. A benchmark (decode.py, train.py) returns a JSON-able report that cli.py prints.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gptwo.errors import GptwoError
from gptwo.runtime import cpu_flags, cpu_name  # noqa: F401 - the benches' reports name the CPU

if TYPE_CHECKING:
    import torch

    from gptwo.model import GPT

COMPILE_MODES = (
    "none",
    "default",
    "max-autotune-no-cudagraphs",
    "max-autotune-frozen",
    "reduce-overhead",
)  # `--compile`; plain data keeps --help fast
TIMEOUT_ENV = "GPTWO_BENCH_TIMEOUT"  # seconds an outside tool (llama-bench, the GGUF converter, a server) may take
DEFAULT_TIMEOUT_S = 600.0
MAX_THREADS = 4096  # `--threads` above this is a typo, not a machine


def bench_model(spec: str | None, device: torch.device) -> GPT:
    """The model to time: a folder/hub id, or GPT-2 124M's shape with random weights (speed does not depend on them)."""
    import torch

    from gptwo.config import GPTConfig
    from gptwo.model import GPT
    from gptwo.weights import load_pretrained

    if spec:
        return load_pretrained(spec, device=device)
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2")).to(device).eval()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes, synchronizing CUDA around it."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(
    runs: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    each_round: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Median seconds per run, the runs taking turns each round (so drifting machine load hits all alike).

    `each_round(i, seconds)` is called after round i (1-based) with that round's seconds per run."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for number in range(1, rounds + 1):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
        if each_round is not None:
            each_round(number, {name: ts[-1] for name, ts in times.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


def quiet_transformers() -> None:
    """Silence transformers' warnings and notices (the anchors' config chatter is not ours to print); its errors
    still raise."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module=r"transformers(\.|$)")


def render_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; `columns` are (key, heading, format spec)."""
    cells = [[heading for _, heading, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells
    )


def tool_timeout(seconds: float | None = None) -> float:
    """Seconds one call of an outside tool may take: `seconds`, else $GPTWO_BENCH_TIMEOUT, else 600."""
    source = "--timeout"
    if seconds is None:
        text = os.environ.get(TIMEOUT_ENV)
        if not text:
            return DEFAULT_TIMEOUT_S
        source = f"${TIMEOUT_ENV}"
        try:
            seconds = float(text)
        except ValueError:
            raise GptwoError(
                f"{source}={text!r} is not a number of seconds", "set it to e.g. 600, or unset it"
            ) from None
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not (math.isfinite(seconds) and seconds > 0)
    ):
        raise GptwoError(f"{source} {seconds!r} is not a positive number of seconds", "use e.g. 600")
    return float(seconds)


def run_tool(command: list[str], timeout: float, what: str, fix: str, **kwargs) -> subprocess.CompletedProcess:
    """Run an outside tool to the end, its output captured (text, undecodable bytes replaced); past `timeout`
    seconds it is killed, with everything it started, and that is a one-line error naming `what` and `fix`."""
    try:
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a timeout kills its children too
            **kwargs,
        )
    except OSError as err:
        raise GptwoError(f"cannot run {what} ({err.strerror or err})", fix) from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise GptwoError(
            f"{what} did not finish within {timeout:g} s and was stopped",
            f"{fix}; or allow it longer with --timeout or ${TIMEOUT_ENV}",
        ) from None
    except BaseException:  # Ctrl-C: leave nothing running
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a descendant that left the group still holds the pipes
        pass
