"""Reading and writing the builder's files: line-delimited JSON (plain or zstd), atomic writes,
and the per-stage count report that every stage returns."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from gptwo.errors import GptwoError
from gptwo.fileio import ZSTD_MAGIC, DamagedStream, open_zstd_text


@dataclass
class StageReport:
    """Counts of one stage: records in, records kept, and records dropped by reason."""

    stage: str
    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: dict[str, Any] = field(default_factory=dict)  # extra facts, e.g. pages fetched this run

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def merge(self, other: StageReport) -> StageReport:
        self.seen += other.seen
        self.kept += other.kept
        self.dropped.update(other.dropped)
        for key, value in other.notes.items():
            self.notes[key] = self.notes.get(key, 0) + value
        return self

    def as_dict(self) -> dict[str, Any]:
        data = {"in": self.seen, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}
        return data | self.notes

    @classmethod
    def from_dict(cls, stage: str, data: dict[str, Any]) -> StageReport:
        notes = {k: v for k, v in data.items() if k not in ("in", "kept", "dropped")}
        return cls(stage, data["in"], data["kept"], Counter(data["dropped"]), notes)


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a text file for streaming; zstd files (by content, whatever their name) are decompressed
    on the fly, never loaded whole. A `.zst` file that isn't zstd, or one cut off mid-frame, raises
    `DamagedStream` (on opening or while reading); an unreadable file raises OSError."""
    path = Path(path)
    if not path.is_file():
        raise GptwoError(f"input file not found: {path}", "check the path")
    raw = open(path, "rb")
    try:
        head = raw.peek(4)[:4] if isinstance(raw, io.BufferedReader) else b""
        if head == ZSTD_MAGIC:
            return open_zstd_text(raw, errors="replace")
        if path.suffix == ".zst" and head:
            raise DamagedStream("not a zstd file (it doesn't start with zstd's magic number)")
    except BaseException:
        raw.close()
        raise
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def read_jsonl(
    path: str | os.PathLike, fix: str = "delete it and rerun the command that wrote it"
) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSON-lines file (`.zst` compressed or not) written by this
    package; a damaged file (cut short, not JSON objects, unreadable) is a `GptwoError` with `fix`."""
    line_number = 0
    try:
        with open_text(path) as lines:
            for line in lines:
                line_number += 1
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                    yield record
    except DamagedStream as err:
        raise GptwoError(f"{path} is damaged after {line_number} lines: {err}", fix) from None
    except ValueError as err:
        raise GptwoError(f"{path} line {line_number} is not a JSON object ({err})", fix) from None
    except OSError as err:
        raise GptwoError(
            f"can't read {path} ({err.strerror or err})", "check the file's permissions and the disk"
        ) from None


class AtomicFile:
    """A file written under a temporary name and renamed into place only on success."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp_path = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.file = os.fdopen(fd, mode)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp_path, self.path)
        else:
            os.unlink(self.tmp_path)


class JsonlWriter:
    """Write JSON objects one per line, zstd-compressed when the name ends in `.zst`; atomic."""

    def __init__(self, path: str | os.PathLike):
        self._atomic = AtomicFile(path, "wb")
        raw = self._atomic.file
        if str(path).endswith(".zst"):
            self._stream = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        else:
            self._stream = raw
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.count += 1

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._stream is not self._atomic.file:
            self._stream.close()
        self._atomic.__exit__(exc_type, exc, tb)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write all `records` to `path` atomically; returns how many were written."""
    with JsonlWriter(path) as writer:
        for record in records:
            writer.write(record)
        return writer.count


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write one JSON document atomically (pretty-printed, for reports and metadata)."""
    with AtomicFile(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse an output file path that is an existing folder (it would fail only after all the work)."""
    if Path(path).is_dir():
        raise GptwoError(f"--out {path} is a folder", f"give a file name, e.g. {Path(path) / 'out.jsonl.zst'}")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_cache(path: str | os.PathLike, *keys: str) -> dict[str, Any] | None:
    """A JSON object this package wrote to skip work on a rerun, or None when it is missing or
    damaged (or lacks one of `keys`): the work is then simply done again."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and all(key in data for key in keys) else None
