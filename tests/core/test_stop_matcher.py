"""Stop strings: the streaming matcher against a brute-force reference, and `gptwo generate --stop` limits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.cli import main
from gptwo.errors import GptwoError
from gptwo.generate import generate_cli_stream
from gptwo.text import MAX_STOP_CHARS, MAX_STOPS, StopMatcher, TextStream

ALPHABET = "ab \n"


def first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Reference: cut before the stop string that is completed first (the longest, if several end together)."""
    for end in range(1, len(text) + 1):
        found = [s for s in stops if s and text[:end].endswith(s)]
        if found:
            return text[: end - max(map(len, found))], True
    return text, False


def could_still_stop(text: str, stops: list[str]) -> int:
    """Reference: the longest end of `text` that is the start (not the whole) of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(ALPHABET, max_size=6), min_size=1, max_size=12),
    st.lists(st.text(ALPHABET, max_size=5), max_size=4),
)
def test_matcher_agrees_with_brute_force(pieces, stops):
    matcher, seen = StopMatcher(stops), ""
    for piece in pieces:
        match = matcher.feed(piece)
        if match is not None:
            end, length = match
            assert (seen + piece[:end])[: len(seen) + end - length] == first_stop(seen + piece, stops)[0]
            assert first_stop(seen + piece, stops)[1] and not first_stop(seen, stops)[1]
            return
        seen += piece
        assert not first_stop(seen, stops)[1]
        assert matcher.held == could_still_stop(seen, stops)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


@settings(max_examples=100, deadline=None)
@given(
    st.text(ALPHABET + "é€😀", min_size=1, max_size=60),
    st.lists(st.text(ALPHABET + "é", min_size=1, max_size=4), max_size=3),
)
def test_text_stream_shows_all_but_what_may_still_stop(tok, text, stops):
    stream, shown = TextStream(tok, stops, stop_at_eot=False), ""
    for token in tok.encode(text):
        shown += stream.push(token)
        if stream.finished:
            break
    shown += stream.close()
    expected, stopped = first_stop(text, stops)
    assert shown == expected and stream.finish_reason == ("stop" if stopped else "length")
    assert len(stream.pending) == 0


def test_text_stream_keeps_only_a_bounded_tail(tok):
    stream = TextStream(tok, ["x" * MAX_STOP_CHARS], stop_at_eot=False)
    shown = "".join(stream.push(t) for t in tok.encode("x" * 5000 + " ok"))
    assert len(stream.pending) < MAX_STOP_CHARS  # the text that is no longer a possible stop has been handed out
    assert stream.finished and shown == ""  # the stop string was reached inside the first 1024 x's


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32)).save_pretrained(
        str(folder), tokenizer=Tokenizer.gpt2()
    )
    return folder


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0] and "Traceback" not in stderr, (
        stderr
    )
    return lines[0]


def test_generate_refuses_long_or_many_stops_and_text_that_is_not_text(model_dir, capsys):
    base = ["generate", "--model", str(model_dir), "--max-new-tokens", "3", "Hello"]
    assert main([*base, "--stop", "s" * MAX_STOP_CHARS]) == 0  # the longest allowed
    capsys.readouterr()
    assert main([*base, "--stop", "s" * (MAX_STOP_CHARS + 1)]) == 2
    assert f"more than {MAX_STOP_CHARS}" in one_line_error(capsys.readouterr().err)
    assert main([*base, *[arg for i in range(MAX_STOPS + 1) for arg in ("--stop", str(i))]]) == 2
    assert f"more than {MAX_STOPS}" in one_line_error(capsys.readouterr().err)
    assert main(["generate", "--model", str(model_dir), "bad \ud800 text"]) == 2
    assert "PROMPT is not valid UTF-8 text" in one_line_error(capsys.readouterr().err)
    piped = subprocess.run(
        [sys.executable, "-m", "gptwo.cli", "generate", "--model", str(model_dir), "-"],
        input=b"ok \xff\xfe",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert piped.returncode == 2 and "(byte 0xff at offset 3)" in one_line_error(piped.stderr.decode())
    with pytest.raises(GptwoError, match="lone surrogate U\\+D800 at character 4"):  # the library says so too
        next(generate_cli_stream(str(model_dir), "bad \ud800 text", max_new_tokens=2))
