"""`gptwo detect` and `gptwo detect sample` from the command line: JSON lines, the HTML report, errors."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser

import pytest
from detect_testing import TEXT, save_tiny

from gptwo.cli import main
from gptwo.detect.pairs import continue_passages

VOID = {"meta", "br", "img", "input", "link", "hr", "rect", "path"}


class Checker(HTMLParser):
    """Checks that every tag closes in order, and collects the text of the token spans."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tokens, self.in_token = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)
        classes = (dict(attrs).get("class") or "").split()
        if tag == "span" and "t" in classes and any(c.startswith("b") for c in classes) and self.stack.count("section"):
            self.in_token = True
            self.tokens.append("")

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        self.in_token = False

    def handle_data(self, data):
        if self.in_token:
            self.tokens[-1] += data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("m") / "model"), block_size=32)


def test_detect_json_lines_and_a_well_formed_gltr_report(model_dir, tmp_path, capsys):
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT)  # longer than the 32-token context: scored in windows
    short = tmp_path / "short.txt"
    short.write_text("Hello there")
    html = tmp_path / "report.html"
    assert (
        main(
            [
                "detect",
                "--model",
                model_dir,
                "--device",
                "cpu",
                "--json",
                "--tokens",
                "--html",
                str(html),
                str(text_file),
                str(short),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == [str(text_file), str(short)]
    first = rows[0]
    assert {"file", "tokens", "score", "verdict", "scores"} <= first.keys() and first["calibrated"] is False
    assert first["verdict"] in ("generated", "human") and rows[1]["verdict"] == "too short"
    assert (
        "binoculars" not in first["scores"]
        and {"fast_detectgpt", "log_rank", "gltr_top10", "entropy"} <= first["scores"].keys()
    )
    assert "".join(t["token"] for t in first["token_stats"]) == TEXT and len(first["token_stats"]) == first["tokens"]
    assert all(len(t["top"]) == 10 and 0 < t["prob"] <= 1 and t["rank"] >= 1 for t in first["token_stats"])

    checker = Checker()
    checker.feed(html.read_text())
    checker.close()
    assert checker.stack == [], f"unclosed tags: {checker.stack}"
    assert len(checker.tokens) == first["tokens"] + rows[1]["tokens"]
    assert "".join(checker.tokens) == TEXT + "Hello there"  # every token, escaped and restored


def test_detect_text_output_names_the_rule(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode())))  # stdin is read as bytes
    assert main(["detect", "--model", model_dir, "--device", "cpu", "--tokens", "--reference", model_dir, "-"]) == 0
    out = capsys.readouterr().out
    assert (
        "uncalibrated" in out
        and "binoculars" in out
        and "top alternatives" in out
        and out.count("\n") > len(TEXT.split()) // 2
    )


@pytest.mark.parametrize("content, message", [("", "is empty"), ("   \n", "is empty")])
def test_empty_input_is_one_line_error(model_dir, tmp_path, capsys, content, message):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    assert main(["detect", "--model", model_dir, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_sample_writes_matched_pairs(model_dir, tmp_path, capsys):
    from gptwo.weights import load_model

    model, tok = load_model(model_dir, device="cpu")
    passages = [tok.encode_ordinary(TEXT)[:24], tok.encode_ordinary(TEXT[::-1])[:24]]
    pairs = continue_passages(model, tok, passages, 8, top_k=40, seed=1)
    for (human, generated), passage in zip(pairs, passages):
        assert len(human) == len(generated) and human == passage[: len(human)] and generated[:8] == passage[:8]

    source = tmp_path / "docs"
    source.mkdir()
    for i in range(3):
        (source / f"{i}.txt").write_text(TEXT * (i + 1))
    out = tmp_path / "set"
    assert (
        main(
            [
                "detect",
                "sample",
                "--model",
                model_dir,
                "--source",
                str(source),
                "--out",
                str(out),
                "--prompt-tokens",
                "8",
                "--new-tokens",
                "16",
                "--min-tokens",
                "8",
                "--top-k",
                "40",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    humans, generated = sorted((out / "human").iterdir()), sorted((out / "generated").iterdir())
    assert len(humans) == len(generated) == json.loads((out / "sample.json").read_text())["pairs"] >= 1
    assert humans[0].read_text().startswith(tok.decode(tok.encode_ordinary(TEXT)[:8]))


def test_sample_new_tokens_default_fits_the_context(model_dir, tmp_path):
    """No --new-tokens: 128, or what the context leaves after the prompt (the README's line on a context-128
    model once asked for 144 tokens and failed)."""
    source = tmp_path / "docs"
    source.mkdir()
    (source / "0.txt").write_text(TEXT * 3)
    out = tmp_path / "set"
    argv = ["detect", "sample", "--model", model_dir, "--source", str(source), "--out", str(out)]
    assert main([*argv, "--prompt-tokens", "8", "--min-tokens", "8", "--device", "cpu"]) == 0
    summary = json.loads((out / "sample.json").read_text())
    assert summary["new_tokens"] == 32 - 8 and summary["pairs"] >= 1
