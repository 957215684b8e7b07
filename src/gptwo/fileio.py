"""Atomic file writes: a crash leaves either the old file or the new one, never a mix."""

from __future__ import annotations

import os
import tempfile

from gptwo.errors import GptwoError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str, *chunks: bytes | memoryview) -> None:
    """Write `chunks` to `path` through a temporary file in the same folder, fsync'd, then renamed."""
    if os.path.isdir(path):
        raise GptwoError(f"cannot write {path}: it is a folder", "give a file name (inside the folder, if you like)")
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise GptwoError(f"cannot write {path}: {directory} is a file, not a folder", "choose another output path")
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise GptwoError(f"could not write {path} ({err.strerror or err})", "free disk space or choose another output folder") from None
