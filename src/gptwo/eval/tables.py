"""Plain-text tables for the `gptwo eval` commands (the `--json` output is the report dict itself)."""

from __future__ import annotations

from collections.abc import Sequence

_HEADERS = {
    "perplexity": "ppl/token",
    "word_perplexity": "ppl/word",
    "byte_perplexity": "ppl/byte",
    "bits_per_byte": "bits/byte",
    "token_perplexity": "ppl/token",
    "name": "file",
}


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"
    return str(value)


def _header(column: str) -> str:
    """'lambada.acc' → 'lambada acc'; 'bits_per_byte' → 'bits/byte'."""
    task, _, metric = column.rpartition(".")
    label = _HEADERS.get(metric, metric)
    return f"{task} {label}" if task else label


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A left-aligned first column and right-aligned numbers, with a header row."""
    headers = [_header(c) for c in columns]
    cells = [[format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def render_perplexity(report: dict) -> str:
    """Per-file rows, then the total over all files."""
    columns = ["name", "tokens", "words", "bytes", "perplexity", "word_perplexity", "bits_per_byte"]
    rows = [*report["files"], {"name": "all", **report}] if len(report["files"]) > 1 else report["files"]
    note = f"model {report['model']}: context {report['context']}, stride {report['stride']}"
    return note + "\n" + format_table(rows, columns)


def render_task(report: dict) -> str:
    columns = ["task", *(k for k in report if k not in ("task", "model"))]
    return f"model {report['model']}\n" + format_table([report], columns)


def render_compare(report: dict) -> str:
    columns = list(dict.fromkeys(k for row in report["models"] for k in row))
    return format_table(report["models"], columns)
