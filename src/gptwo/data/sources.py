"""Text sources: files and folders (.txt, .md, .jsonl) yielding one document at a time."""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from gptwo.errors import GptwoError

TEXT_SUFFIXES = (".txt", ".md")


def iter_files(paths: Iterable[str]) -> Iterator[str]:
    """Every readable text file under `paths` (folders are walked in sorted order)."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith(TEXT_SUFFIXES + (".jsonl",)):
                        yield os.path.join(root, name)
        elif os.path.isfile(path):
            yield path
        else:
            raise GptwoError(f"input {path} does not exist", "check the path")


def read_text(path: str) -> str:
    """A file's text, strictly UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptwoError(
            f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})",
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
        ) from None


def iter_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Documents from files: a .txt/.md file is one document, a .jsonl file one per line's `text_field`."""
    for path in iter_files(paths):
        text = read_text(path)
        if path.endswith(".jsonl"):
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        yield json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise GptwoError(f"{path}:{number} is not a JSON object with a '{text_field}' field", "fix or remove that line") from None
        else:
            yield text
