"""Bad input to `gptwo select score|filter|dsir`, as a careless or hostile user would give it: each row is its
argv (and files) and the one-line error (exit 2) it must give, or the result and warning that are right.
No input and no file of the user's is overwritten. Rows run in process through `gptwo.cli.main`."""

from __future__ import annotations

import json
import os

import pytest
import zstandard
from cli_testing import assert_one_line_error, run
from select_fixtures import SENTENCES, reference_run, write_jsonl

DOCUMENTS = [f"document {i}: {SENTENCES[i % len(SENTENCES)]}" for i in range(10)]


@pytest.fixture
def corpus(tmp_path):
    """The same ten documents as .jsonl and as .jsonl.zst, and a scores file with one loss each (id = position)."""
    plain = write_jsonl(str(tmp_path / "docs.jsonl"), DOCUMENTS)
    packed = str(tmp_path / "docs.jsonl.zst")
    with open(plain, "rb") as f, open(packed, "wb") as g:
        g.write(zstandard.ZstdCompressor().compress(f.read()))
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": i, "tokens": 5, "loss": float(i)}) + "\n" for i in range(10)))
    return {"jsonl": plain, "zst": packed, "scores": str(scores), "dir": str(tmp_path)}


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- select score
def test_score_refuses_an_out_that_is_not_its_own_score_file(corpus, tmp_path, capsys):
    """A notes file, a model's one-line tokenizer.json (no newline: once truncated to nothing) and an input are
    refused, each left byte for byte; the check comes before any model loads."""
    notes = tmp_path / "notes.txt"
    notes.write_text("line one\nline two\n")
    tokenizer = tmp_path / "model" / "tokenizer.json"
    tokenizer.parent.mkdir()
    tokenizer.write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    for out, expected in (
        (str(notes), "exists and is not a score file"),
        (str(tokenizer), "exists and is not a score file"),
        (corpus["jsonl"], f"is the input {corpus['jsonl']}"),
        (str(tmp_path / "in-input-folder.jsonl"), f"lies inside the input {tmp_path}"),
    ):
        inputs = [str(tmp_path)] if "in-input" in out else [corpus["jsonl"]]
        before = _bytes(out) if os.path.exists(out) else None
        code, _, err = run(["select", "score", *inputs, "--model", "no-such-model", "--out", out, "--quiet"], capsys)
        assert_one_line_error(code, err, expected)
        assert (_bytes(out) if os.path.exists(out) else None) == before


def test_score_overwrite_replaces_an_other_file_and_empty_inputs_are_an_error(corpus, tmp_path, capsys):
    model = reference_run()
    capsys.readouterr()  # the reference model's training output
    notes = tmp_path / "notes.txt"
    notes.write_text("not scores\n")
    code, _, err = run(["select", "score", corpus["jsonl"], "--model", model, "--out", str(notes), "--quiet"], capsys)
    assert_one_line_error(code, err, "pass --overwrite to replace it")
    argv = ["select", "score", corpus["jsonl"], "--model", model, "--out", str(notes), "--quiet", "--overwrite"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in notes.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(10))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "empty-scores.jsonl"
    code, _, err = run(["select", "score", str(empty), "--model", model, "--out", str(out), "--quiet"], capsys)
    assert_one_line_error(code, err, "the inputs hold no documents with text")
    assert not out.exists()


def test_score_batch_tokens_must_be_positive(corpus, capsys):
    code, _, err = run(
        ["select", "score", corpus["jsonl"], "--model", "m", "--out", "s", "--batch-tokens", "0"], capsys
    )
    assert_one_line_error(code, err, "argument --batch-tokens: 0 is less than 1")


# ---------------------------------------------------------------- select filter
def test_filter_and_dsir_never_write_over_an_input(corpus, capsys):
    before = _bytes(corpus["zst"])
    for argv, expected in (
        (["filter", corpus["zst"], "--scores", corpus["scores"], "--keep", "0.5"], "is the input"),
        (["dsir", corpus["zst"], "--target", corpus["jsonl"], "--keep", "0.5"], "is the input"),
        (["dsir", corpus["jsonl"], "--target", corpus["zst"], "--keep", "0.5"], "is the input"),
    ):
        code, _, err = run(["select", *argv, "--out", corpus["zst"]], capsys)
        assert_one_line_error(code, err, expected)
        assert _bytes(corpus["zst"]) == before
    relative = os.path.relpath(corpus["zst"])  # the same file by another spelling
    code, _, err = run(
        ["select", "dsir", corpus["zst"], "--target", corpus["jsonl"], "--keep", "0.5", "--out", relative], capsys
    )
    assert_one_line_error(code, err, "is the input")


def test_filter_and_dsir_replace_only_their_own_output_unless_told(corpus, tmp_path, capsys):
    notes = tmp_path / "notes.jsonl.zst"  # a user's file that happens to carry the output's name
    notes.write_bytes(b"my notes, not zstandard")
    commands = {
        "filter": ["filter", corpus["jsonl"], "--scores", corpus["scores"], "--keep", "0.5"],
        "dsir": ["dsir", corpus["jsonl"], "--target", corpus["zst"], "--keep", "0.5"],
    }
    for argv in commands.values():
        code, _, err = run(["select", *argv, "--out", str(notes)], capsys)
        assert_one_line_error(code, err, "is not a document file written by gptwo select")
        assert notes.read_bytes() == b"my notes, not zstandard"
    for name, argv in commands.items():
        out = tmp_path / f"{name}.jsonl.zst"
        assert run(["select", *argv, "--out", str(out)], capsys)[0] == 0
        first = out.read_bytes()
        assert run(["select", *argv, "--out", str(out)], capsys)[0] == 0  # a rerun replaces its own output
        assert out.read_bytes() == first
    code, _, err = run(["select", *commands["filter"], "--out", str(notes), "--overwrite"], capsys)
    assert code == 0, err
    assert notes.read_bytes() == (tmp_path / "filter.jsonl.zst").read_bytes()


def test_filter_scores_file_as_out_is_refused(corpus, tmp_path, capsys):
    scores = tmp_path / "scores.jsonl.zst"
    scores.write_bytes(_bytes(corpus["scores"]))
    argv = ["select", "filter", corpus["jsonl"], "--scores", str(scores), "--keep", "0.5", "--out", str(scores)]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, f"is the input {scores}")


BAD_OPTION_ROWS = [
    (["filter", "--keep", "nan"], "argument --keep: nan is not a finite number in (0, 1]"),
    (["filter", "--keep", "0"], "argument --keep: 0 is not a finite number in (0, 1]"),
    (["filter", "--keep", "1.5"], "argument --keep"),
    (["dsir", "--keep", "0.5", "--seed", "-1"], "argument --seed: -1 is less than 0"),
    (["dsir", "--keep", "0.5", "--buckets", "0"], "argument --buckets: 0 is less than 1"),
]


@pytest.mark.parametrize("argv, expected", BAD_OPTION_ROWS, ids=[" ".join(a) for a, _ in BAD_OPTION_ROWS])
def test_select_bad_options_are_one_line_errors(argv, expected, corpus, tmp_path, capsys):
    command, *options = argv
    extra = ["--scores", corpus["scores"]] if command == "filter" else ["--target", corpus["jsonl"]]
    out = str(tmp_path / "out.jsonl.zst")
    code, _, err = run(["select", command, corpus["jsonl"], *extra, *options, "--out", out], capsys)
    assert_one_line_error(code, err, expected)
    assert not os.path.exists(out)


def test_dsir_bucket_count_is_bounded_with_a_memory_estimate(corpus, tmp_path, capsys):
    out = str(tmp_path / "out.jsonl.zst")
    argv = ["select", "dsir", corpus["jsonl"], "--target", corpus["jsonl"], "--keep", "0.5", "--out", out]
    code, _, err = run([*argv, "--buckets", str(3_200_000_000)], capsys)  # would need ~75 GiB
    assert_one_line_error(code, err, "would need about 71.5 GiB of memory")
    assert not os.path.exists(out)
    code, _, err = run([*argv, "--buckets", "1000"], capsys)
    assert code == 0, err


def _scores(tmp_path, losses) -> str:
    path = tmp_path / "odd-scores.jsonl"
    path.write_text("".join(json.dumps({"id": i, "tokens": 5, "loss": v}) + "\n" for i, v in enumerate(losses)))
    return str(path)


def _kept(out: str) -> list[str]:
    with open(out, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line)["text"] for line in raw.decode().splitlines()]


def test_filter_leaves_out_nan_scores_with_a_warning_and_refuses_all_nan(corpus, tmp_path, capsys):
    nan = float("nan")
    out = str(tmp_path / "kept.jsonl.zst")
    losses = [nan, 1.0, nan, 3.0, 4.0, nan, 6.0, 7.0, float("inf"), 9.0]
    argv = ["select", "filter", corpus["jsonl"], "--scores", _scores(tmp_path, losses), "--keep", "0.5", "--out", out]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert "warning: 4 of 10 documents have a NaN or infinite loss" in err
    assert _kept(out) == [DOCUMENTS[1], DOCUMENTS[3], DOCUMENTS[4]]  # half of the 6 finite ones, the lowest

    argv[4] = _scores(tmp_path, [nan] * 10)
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "every loss in")


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"id": True, "loss": 1.0}], "has no numeric 'loss' with an 'id'"),
        ([{"id": 0, "loss": "low"}], "has no numeric 'loss' with an 'id'"),
        ([{"id": 0, "loss": 1.0}, {"id": 0, "loss": 2.0}], "scores document 0 a second time"),
        (["[1]"], "is a JSON list, not an object"),
    ],
    ids=["bool-id", "string-loss", "duplicate-id", "not-an-object"],
)
def test_filter_rejects_malformed_score_rows(rows, expected, corpus, tmp_path, capsys):
    path = tmp_path / "bad-scores.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    out = str(tmp_path / "kept.jsonl.zst")
    code, _, err = run(
        ["select", "filter", corpus["jsonl"], "--scores", str(path), "--keep", "0.5", "--out", out], capsys
    )
    assert_one_line_error(code, err, expected)
