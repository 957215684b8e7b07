"""A GLTR-style HTML report (Gehrmann et al., 2019): one self-contained page, no scripts.

Each token is coloured by the bucket of its rank under the model — green top-10, yellow top-100,
red top-1000, purple beyond — and its tooltip lists the probability, rank, entropy and the top
alternatives. Under each text: its scores and three histograms (rank buckets, the probability of
each token, the entropy at each position) drawn as inline SVG; with a watermark test, the text again
with its green and red tokens, and the z-test.
"""

from __future__ import annotations

import os
from html import escape

import torch

from gptwo.detect.detector import Document
from gptwo.detect.stats import BUCKET_NAMES, bucket_of
from gptwo.errors import GptwoError
from gptwo.fileio import atomic_write
from gptwo.tokenizer import Tokenizer

COLOURS = ("#6bd66b", "#f2e14c", "#f28b82", "#c9a0ff")  # GLTR's green, yellow, red, purple
LABELS = ("top 10", "top 100", "top 1000", "rest")

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
.text { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 4px; padding: .8rem;
  font-family: ui-monospace, monospace; font-size: 13px; }
.t { border-radius: 2px; }
.b0 { background: #6bd66b; } .b1 { background: #f2e14c; } .b2 { background: #f28b82; } .b3 { background: #c9a0ff; }
table { border-collapse: collapse; margin: .6rem 0; }
td, th { padding: .1rem .6rem; text-align: left; border-bottom: 1px solid #eee; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; } .verdict { font-weight: bold; }
.wg { background: #6bd66b; } .wr { background: #f28b82; } .wn { background: #e4e4e4; }
"""
WATERMARK_CLASSES = {True: "wg", False: "wr", None: "wn"}  # green, red, not scored


def _tooltip(doc: Document, i: int, tokenizer: Tokenizer) -> str:
    table = doc.table
    alternatives = "\n".join(
        f"{tokenizer.decode([int(t)])!r} {float(lp.exp()):.1%}"
        for t, lp in zip(table.top_ids[i], table.top_logprobs[i])
    )
    return (
        f"p = {float(table.logprob[i].exp()):.2%}, rank {int(table.rank[i])}, "
        f"entropy {float(table.entropy[i]):.2f}\n{alternatives}"
    )


def _histogram(title: str, counts: list[float], labels: list[str], colours: list[str]) -> str:
    """A small SVG bar chart."""
    width, height, bar = 260, 120, 240 / max(1, len(counts))
    top = max(counts) or 1
    bars = "".join(
        f'<rect x="{10 + i * bar:.1f}" y="{100 - 85 * c / top:.1f}" width="{bar - 2:.1f}" '
        f'height="{85 * c / top:.1f}" fill="{colours[i % len(colours)]}">'
        f"<title>{escape(labels[i])}: {c:g}</title></rect>"
        for i, c in enumerate(counts)
    )
    ends = (
        f'<text x="10" y="114" font-size="10">{escape(labels[0])}</text>'
        f'<text x="250" y="114" font-size="10" text-anchor="end">{escape(labels[-1])}</text>'
    )
    return (
        f'<figure><figcaption>{escape(title)}</figcaption><svg width="{width}" height="{height}" role="img">'
        f"{bars}{ends}</svg></figure>"
    )


def _document_html(doc: Document, tokenizer: Tokenizer) -> str:
    buckets = bucket_of(doc.table.rank).tolist()
    spans = "".join(
        f'<span class="t b{b}" title="{escape(_tooltip(doc, i, tokenizer))}">{escape(piece)}</span>'
        for i, (b, piece) in enumerate(zip(buckets, doc.pieces))
    )
    rows = "".join(f"<tr><td>{escape(name)}</td><td>{value:.4g}</td></tr>" for name, value in doc.scores.items())
    bucket_counts = torch.bincount(torch.tensor(buckets, dtype=torch.long), minlength=4).tolist()
    probs = torch.histc(doc.table.logprob.exp(), bins=10, min=0, max=1).tolist()
    entropy = torch.histc(doc.table.entropy, bins=10, min=0, max=max(1e-6, float(doc.table.entropy.max()))).tolist()
    charts = (
        _histogram("tokens per rank bucket", bucket_counts, list(LABELS), list(COLOURS))
        + _histogram("probability of each token (0 to 1)", probs, ["0", *[""] * 8, "1"], ["#7aa6d6"])
        + _histogram(
            f"entropy at each position (0 to {float(doc.table.entropy.max()):.1f} nats)",
            entropy,
            ["0", *[""] * 8, "max"],
            ["#9b8bd6"],
        )
    )
    return (
        f"<section><h2>{escape(doc.name)}</h2>"
        f"<p>{len(doc.table)} tokens · score {doc.score:.4g} ({escape(doc.rule.detector)}) · "
        f'verdict <span class="verdict">{escape(doc.verdict)}</span>'
        f" · {escape(doc.rule.describe())}</p>"
        f'<div class="text">{spans}</div><div class="charts">{charts}</div>'
        f"<table><tr><th>statistic</th><th>value</th></tr>{rows}</table>{_watermark_html(doc)}</section>"
    )


def _watermark_html(doc: Document) -> str:
    """The text again with each token green or red for the watermark (grey: not scored), and the z-test."""
    if doc.watermark is None:
        return ""
    names = {True: "green", False: "red", None: "not scored"}
    spans = "".join(
        f'<span class="t {WATERMARK_CLASSES[flag]}" title="{names[flag]}">{escape(piece)}</span>'
        for flag, piece in zip(doc.watermark.flags, doc.pieces)
    )
    return (
        f'<h3>Watermark</h3><p class="verdict">{escape(doc.watermark.describe())}</p>'
        f'<div class="text watermark">{spans}</div>'
    )


def render_html(docs: list[Document], tokenizer: Tokenizer, model_name: str) -> str:
    """The whole report page."""
    legend = " ".join(f'<span class="t b{i}">{label}</span>' for i, label in enumerate(LABELS))
    body = "".join(_document_html(doc, tokenizer) for doc in docs)
    names = ", ".join(BUCKET_NAMES)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>gptwo detect: {escape(model_name)}</title><style>{STYLE}</style></head>"
        f"<body><h1>gptwo detect · {escape(model_name)}</h1><p>Tokens by rank under the model: {legend}. Hover a token "
        "for its top alternatives. "
        f"Bucket fractions are {escape(names)}.</p>{body}</body></html>\n"
    )


def check_html_out(path: str, inputs: list[str]) -> None:
    """`--html` must not be an input, a folder, or an existing file that is not an HTML report."""
    if os.path.isdir(path):
        raise GptwoError(f"--html {path} is a folder", "give a file name, e.g. report.html")
    if os.path.exists(path) and any(f != "-" and os.path.exists(f) and os.path.samefile(f, path) for f in inputs):
        raise GptwoError(f"--html {path} is one of the input files", "give the report another name, e.g. report.html")
    if os.path.exists(path):
        with open(path, "rb") as f:
            head = f.read(512).lstrip().lower()
        if not head.startswith((b"<!doctype html", b"<html")):
            raise GptwoError(
                f"--html {path} exists and is not an HTML report", "choose another path, or remove that file"
            )


def write_html(path: str, docs: list[Document], tokenizer: Tokenizer, model_name: str) -> None:
    atomic_write(path, render_html(docs, tokenizer, model_name).encode("utf-8"))
