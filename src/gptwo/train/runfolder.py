"""What `gptwo train --out` may write into, and the lock that keeps one process training in a run folder.

A run folder is new, empty, or one that `gptwo train` made: it holds the run lock file or a
`checkpoints/` folder of step checkpoints, or only what a run writes before its first checkpoint
(train_config.json, metrics.jsonl, loss.png, train.log). Anything else (a saved model, a folder of the user's files,
prepared data) is refused, unless `overwrite` says to train into it anyway. The lock is an
`fcntl.flock` on `RUN/.gptwo-train.lock`, held while the run trains; the file records the holder's
process id, so a second process is told which one has it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator, Sequence

from gptwo.errors import GptwoError

LOCK_FILE = ".gptwo-train.lock"
CHECKPOINTS = "checkpoints"
RUN_CONFIG = "train_config.json"  # the run's resolved config, written at step 0: what --resume continues
# What a run writes before its first checkpoint (train.log: `gptwo scale run` logs each run there).
EARLY_FILES = frozenset({RUN_CONFIG, "metrics.jsonl", "loss.png", "train.log"})
_CHECKPOINT_ENTRY = re.compile(r"^step_\d+(\.tmp-.*)?$")
_held: dict[str, int] = {}  # real path of a run folder → its lock file's descriptor, held by this process


def _entries(path: str) -> list[str]:
    """The folder's entries, without the temporary files an interrupted atomic write leaves (.tmp-*)."""
    return sorted(name for name in os.listdir(path) if not name.startswith(".tmp-"))


def is_run_folder(path: str, also: Sequence[str] = ()) -> bool:
    """True for a folder `gptwo train` made (or an empty one); False for anything else.

    `also` names further entries the caller's own command writes there (quickstart: data, corpus).
    """
    entries = _entries(path)
    if LOCK_FILE in entries:
        return True
    checkpoints = os.path.join(path, CHECKPOINTS)
    if os.path.isdir(checkpoints) and all(_CHECKPOINT_ENTRY.match(name) for name in os.listdir(checkpoints)):
        return True
    return set(entries) <= EARLY_FILES | set(also)


def has_started(path: str) -> bool:
    """True for a run folder that `--resume` can continue: it holds a checkpoint or the run's saved config."""
    return os.path.isfile(os.path.join(path, RUN_CONFIG)) or os.path.isdir(os.path.join(path, CHECKPOINTS))


def check_run_folder(
    out_dir: str, inputs: Sequence[str] = (), overwrite: bool = False, also: Sequence[str] = ()
) -> None:
    """Refuse an `--out` that is a file, one of the run's inputs, or an existing folder that is not a run's.

    `inputs` are the paths the run reads (its data folder, the model it starts from): training into
    one of them would replace what it reads.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GptwoError(f"run folder {out_dir} is a file", "choose a new folder for --out")
    real = os.path.realpath(out_dir)
    for given in inputs:
        if given and os.path.exists(given) and os.path.realpath(given) == real:
            raise GptwoError(
                f"--out {out_dir} is also an input of this run ({given})",
                "choose a new folder for --out (training writes config.json, model.safetensors and tokenizer.json)",
            )
    if not os.path.isdir(out_dir) or overwrite or is_run_folder(out_dir, also):
        return
    entries = _entries(out_dir)
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        what = f"a saved model ({shown}), not a training run's files: training would replace its weights and config"
    else:
        what = f"files no training run wrote ({shown}): training would write its model and checkpoints among them"
    raise GptwoError(
        f"--out {out_dir} holds {what}",
        "choose a new or empty folder for --out, or pass --overwrite to train into it anyway",
    )


def _holder(fd: int) -> str:
    """What the lock file says about the process holding it ('process 1234 on host'), or ''."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").split()
    except OSError:
        return ""
    if len(text) >= 2 and text[0].isdigit():
        return f" (process {text[0]} on {text[1]})"
    return ""


@contextlib.contextmanager
def run_lock(out_dir: str, enabled: bool = True) -> Iterator[None]:
    """Hold RUN/.gptwo-train.lock (fcntl.flock) for the block; a second process gets a one-line error.

    Re-entrant within a process (quickstart holds it around preparing and training). Where flock is
    missing (not POSIX), the block runs unlocked.
    """
    if not enabled:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    real = os.path.realpath(out_dir)
    if real in _held:
        yield
        return
    path = os.path.join(out_dir, LOCK_FILE)
    fd = _acquire(path, out_dir, fcntl)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _held[real] = fd
        try:
            yield
        finally:
            del _held[real]
            if created and _entries(out_dir) == [LOCK_FILE]:  # nothing was written: leave no folder behind
                os.unlink(path)
                with contextlib.suppress(OSError):
                    os.rmdir(out_dir)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(path: str, out_dir: str, fcntl) -> int:
    """An open descriptor of the lock file, flock'ed; the file is re-opened if it was removed meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise GptwoError(
                f"{out_dir} is in use by another gptwo training run{holder}",
                "wait for it to finish, or choose another --out",
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder removed it on the way out: lock the file that is there now
