"""Text sources, yielding one document at a time.

An input is a file, a folder (walked in sorted order), the word `builtin` (an English corpus shipped
with Python, see gptwo.data.builtin) or `hf:NAME[:CONFIG][@SPLIT]` (a Hugging Face dataset, streamed).
Files: .txt and .md are one document each; .jsonl and .jsonl.zst hold one JSON object per line and
.parquet one row per document, with the text in `text_field`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from gptwo.errors import GptwoError, require
from gptwo.fileio import DamagedStream, open_zstd_text

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet")
BUILTIN = "builtin"
HF_PREFIX = "hf:"


def iter_files(paths: Iterable[str]) -> Iterator[str]:
    """Every readable text file under `paths` (folders are walked in sorted order)."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES):
                        yield os.path.join(root, name)
        elif os.path.isfile(path):
            yield path
        else:
            raise GptwoError(f"input {path} does not exist", "check the path")


def read_text(path: str) -> str:
    """A file's text, strictly UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    return _decode(raw, path)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptwoError(
            f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})",
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
        ) from None


def _field(record, text_field: str, where: str) -> str:
    """`record[text_field]` as a string, or a clear error naming the place."""
    try:
        value = record[text_field]
    except (KeyError, TypeError, IndexError):
        value = None
    if not isinstance(value, str):
        raise GptwoError(
            f"{where} is not a JSON object with a '{text_field}' field", "fix or remove that line, or pass --text-field"
        ) from None
    return value


def _json_lines(lines: Iterable[str], path: str) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            yield f"{path}:{number}", record


def iter_json_records(path: str) -> Iterator[tuple[str, object]]:
    """(`path:line`, the parsed value, or None where the line is not JSON) for each non-blank line of a .jsonl
    or .jsonl.zst file."""
    if not path.endswith(".jsonl.zst"):
        yield from _json_lines(read_text(path).split("\n"), path)
        return
    require("zstandard", f"reading {path}", "data")
    try:
        with open_zstd_text(open(path, "rb")) as text:
            yield from _json_lines(text, path)
    except UnicodeDecodeError:
        raise GptwoError(f"{path} does not hold UTF-8 text", "re-compress UTF-8 JSON lines with zstd") from None
    except DamagedStream as err:
        raise GptwoError(
            f"{path} is damaged: {err}", "re-download or re-compress the file; a cut file would silently lose documents"
        ) from None


def _iter_parquet(path: str, text_field: str) -> Iterator[str]:
    pq = require("pyarrow.parquet", f"reading {path}", "data")
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise GptwoError(
            f"{path} is not a readable parquet file ({err})", "re-write it, e.g. with pandas.DataFrame.to_parquet"
        ) from None
    if text_field not in table.schema_arrow.names:
        raise GptwoError(
            f"{path} has no '{text_field}' column (it has {', '.join(table.schema_arrow.names)})",
            "pass --text-field COLUMN",
        )
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise GptwoError(
                    f"{path}: column '{text_field}' holds {type(value).__name__}, not text",
                    "pass --text-field with a string column",
                )
            yield value or ""


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][@SPLIT]` → (name, config, split); split defaults to train."""
    body = spec[len(HF_PREFIX) :]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise GptwoError(
            f"'{spec}' names no dataset",
            "write hf:NAME[:CONFIG][@SPLIT], e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1",
        )
    return name, config or None, split or "train"


def iter_hf_dataset(spec: str, text_field: str = "text") -> Iterator[str]:
    """Documents of a Hugging Face dataset (hub name or local folder), streamed with datasets.load_dataset."""
    name, config, split = parse_hf_spec(spec)
    datasets = require("datasets", f"reading {spec}", "data")
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        features = stream.features
    except Exception as err:  # network, unknown dataset, unknown config or split
        raise GptwoError(
            f"cannot open dataset {spec} ({type(err).__name__}: {err})",
            "check the name, config and split and your network",
        ) from None
    if features is not None and text_field not in features:
        raise GptwoError(
            f"dataset {spec} has no '{text_field}' column (it has {', '.join(features)})", "pass --text-field COLUMN"
        )
    for number, record in enumerate(stream):
        yield _field(record, text_field, f"{spec} row {number}")


def check_inputs(paths: Iterable[str]) -> None:
    """Every input names something that exists ('builtin' and hf:NAME aside): one mistyped path is an error."""
    for path in paths:
        special = path == BUILTIN or path.startswith(HF_PREFIX)
        if not special and not os.path.exists(path):
            raise GptwoError(
                f"input {path} does not exist", "check the path, or use 'builtin' or hf:NAME[:CONFIG][@SPLIT]"
            )


def iter_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Documents from inputs: files and folders, `builtin`, or `hf:NAME[:CONFIG][@SPLIT]` (see module doc)."""
    for path in paths:
        if path == BUILTIN and not os.path.exists(path):
            from gptwo.data.builtin import builtin_documents

            yield from builtin_documents()
        elif path.startswith(HF_PREFIX) and not os.path.exists(path):
            yield from iter_hf_dataset(path, text_field)
        else:
            yield from _iter_file_documents(path, text_field)


def _iter_file_documents(path: str, text_field: str) -> Iterator[str]:
    for file in iter_files([path]):
        if file.endswith((".jsonl", ".jsonl.zst")):
            for where, record in iter_json_records(file):
                yield _field(record, text_field, where)
        elif file.endswith(".parquet"):
            yield from _iter_parquet(file, text_field)
        else:
            yield read_text(file)
