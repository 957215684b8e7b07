"""Files in and out: atomic writes (a crash leaves either the old file or the new one, never a mix),
and streamed reading of zstd files that notices when one was cut short."""

from __future__ import annotations

import io
import os
import tempfile
from typing import IO

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
        raise GptwoError(
            f"could not write {path} ({err.strerror or err})", "free disk space or choose another output folder"
        ) from None


# Pushshift's dumps are compressed with a 2 GiB window; zstandard's default decoder refuses them.
ZSTD_MAX_WINDOW = 2**31
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_CHUNK = 1 << 18
# Compressed bytes handed to zstd at once. A zstd block of up to 128 KiB can be coded in 4 bytes, so
# the output of one call is at most ~32,000x its input: 2 KiB in keeps one call's output under ~64 MiB
# (a "zip bomb" then costs time in proportion to what is read, never memory all at once).
ZSTD_FEED = 1 << 11


class DamagedStream(Exception):
    """A compressed input that is not a whole zstd stream (not zstd at all, or cut off mid-frame).
    Callers turn it into a `GptwoError` that names the file (and, where they can, how far it was read)."""


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a file of zstd frames, streamed. Unlike zstandard's stream_reader,
    a file that ends inside a frame (a cut download) raises `DamagedStream` instead of ending quietly."""

    def __init__(self, raw: IO[bytes]):
        import zstandard  # an optional dependency: callers check for it with errors.require

        self._raw, self._error = raw, zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._frame = None
        self._out = memoryview(b"")
        self._in = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            if not self._in:
                self._in = memoryview(self._raw.read(READ_CHUNK))
                if not self._in:
                    if self._frame is not None and not self._frame.eof:
                        raise DamagedStream("the zstd stream ends mid-frame, so the file is truncated")
                    return 0
            piece, self._in = self._in[:ZSTD_FEED], self._in[ZSTD_FEED:]
            self._out = memoryview(self._decompress(bytes(piece)))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()  # the next frame of a multi-frame file
            try:
                out.append(self._frame.decompress(data))
            except self._error as err:
                raise DamagedStream(f"not a valid zstd stream ({err})") from None
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_zstd_text(raw: IO[bytes], errors: str = "strict") -> IO[str]:
    """UTF-8 text of an open zstd file, streamed (see `ZstdReader`)."""
    return io.TextIOWrapper(io.BufferedReader(ZstdReader(raw), READ_CHUNK), encoding="utf-8", errors=errors, newline="")


def read_json_file(path: str, what: str, fix: str):
    """The JSON document in the file at `path` (`what` names it in errors, e.g. "plan file x.json"); a missing,
    unreadable, non-UTF-8 or invalid file is a `GptwoError` ending in `fix`. Callers check the document's shape."""
    import json

    if os.path.isdir(path):
        raise GptwoError(f"{what} is a folder, not a file", fix)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise GptwoError(f"{what} not found", fix) from None
    except UnicodeDecodeError as err:
        raise GptwoError(f"{what} is not UTF-8 text (byte {err.start})", fix) from None
    except ValueError as err:
        raise GptwoError(f"{what} is not valid JSON ({err})", fix) from None
    except OSError as err:
        raise GptwoError(f"cannot read {what} ({err.strerror or err})", "check the file's permissions") from None


def read_json_lines(path: str, fix: str):
    """Yield (line number, object) for each non-blank line of a JSON-lines file; a line that is not a JSON object,
    a missing, unreadable or non-UTF-8 file is a `GptwoError` naming `path:line` and ending in `fix`."""
    import json

    if os.path.isdir(path):
        raise GptwoError(f"{path} is a folder, not a JSON-lines file", fix)
    number = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise GptwoError(f"{path}:{number} is not valid JSON ({err})", fix) from None
                if not isinstance(row, dict):
                    raise GptwoError(f"{path}:{number} is a JSON {type(row).__name__}, not an object", fix)
                yield number, row
    except FileNotFoundError:
        raise GptwoError(f"{path} not found", fix) from None
    except UnicodeDecodeError as err:
        raise GptwoError(f"{path} is not UTF-8 text (after line {number}, byte {err.start})", fix) from None
    except OSError as err:
        raise GptwoError(f"cannot read {path} ({err.strerror or err})", "check the file's permissions") from None


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png_output(path: str, what: str = "--plot") -> None:
    """A plot is written only to a new path or over a PNG image (an earlier plot); never over a user's file."""
    if os.path.isdir(path):
        raise GptwoError(f"{what} {path} is a folder", "give a file name such as fit.png")
    if not os.path.lexists(path):
        return
    try:
        with open(path, "rb") as f:
            ours = f.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError as err:
        raise GptwoError(f"cannot read {path} ({err.strerror})", "check the file's permissions") from None
    if not ours:
        raise GptwoError(f"{what} {path} exists and is not a PNG image", "choose another path, or remove that file")
