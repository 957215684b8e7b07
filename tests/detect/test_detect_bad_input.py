"""A table of bad input to `gptwo detect`, `detect sample` and `detect calibrate` (issue 20): each row gives exit 2
and one `error: … — …` line naming the option or file, and leaves every file that was there as it was; a few rows
check the correct result instead (a note, a warning, a replaced set).

Fixtures: a 2-layer width-32 random GPT-2 with a 32-token context, a few short documents, and a calibration file
written by `detect calibrate` itself (the damaged variants are edits of it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass

import pytest
from detect_testing import TEXT, save_tiny

from gptwo.cli import main
from gptwo.errors import GptwoError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the rows refer to, by name, in one folder (the rows run with it as the working directory)."""
    root = tmp_path_factory.mktemp("detect_bad")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        save_tiny("model", block_size=32)
        os.makedirs("docs")
        for i in range(3):
            with open(f"docs/{i}.txt", "w") as f:
                f.write(f"Document {i}. " + TEXT)
        with open("doc.txt", "w") as f:
            f.write(TEXT)
        with open("notes.txt", "w") as f:
            f.write("my notes, not a report\n")
        os.makedirs("mine")
        with open("mine/keep.txt", "w") as f:
            f.write("a file of mine\n")
        sample = ["detect", "sample", "--model", "model", "--source", "docs", "--device", "cpu"]
        assert main([*sample, "--out", "set", "--new-tokens", "16", "--top-k", "40"]) == 0
        calibrate = ["detect", "calibrate", "--model", "model", "--device", "cpu", "--lexicon", "none", "--folds", "10"]
        with contextlib.redirect_stderr(io.StringIO()) as err:  # more folds than documents: a warning (a test below)
            assert main([*calibrate, "--human", "set/human", "--generated", "set/generated", "--out", "cal.json"]) == 0
        with open("calibrate.err", "w") as f:
            f.write(err.getvalue())
        with open("cal.json") as f:
            good = json.load(f)

        def variant(name: str, change) -> None:
            saved = json.loads(json.dumps(good))
            text = change(saved)
            with open(name, "w") as f:
                f.write(text if isinstance(text, str) else json.dumps(saved))

        variant("cal_nan.json", lambda c: c.update(threshold=float("nan")))
        variant("cal_truncated.json", lambda c: json.dumps(c)[: len(json.dumps(c)) // 2])
        variant("cal_list.json", lambda c: "[1, 2]")
        variant("cal_detector.json", lambda c: c.update(detector="magic"))
        variant("cal_min_tokens.json", lambda c: c.update(min_tokens=-3))
        variant("cal_weights.json", lambda c: c["classifier"].update(weights=c["classifier"]["weights"][:-1]))
        variant("cal_lexicon.json", lambda c: c.update(lexicon="../../etc/passwd"))
        variant("cal_no_lexicon.json", lambda c: c.update(lexicon="gone-lexicon.json"))
        with open("binary.cal.json", "wb") as f:
            f.write(b"\xff\xfe\x00\x01")
        yield root
    finally:
        os.chdir(cwd)


@dataclass
class Case:
    name: str
    argv: list[str]
    names: list[str]  # what the error line must name (the option, file or limit)
    stdin: bytes | None = None


DETECT = ["detect", "--model", "model", "--device", "cpu"]
SAMPLE = ["detect", "sample", "--model", "model", "--source", "docs", "--device", "cpu"]
CALIBRATE = ["detect", "calibrate", "--model", "model", "--device", "cpu", "--lexicon", "none"]
SETS = ["--human", "set/human", "--generated", "set/generated"]

CASES = [
    # gptwo detect: numbers in range
    Case("stride-zero", [*DETECT, "--stride", "0", "doc.txt"], ["--stride", "less than 1"]),
    Case("stride-above-context", [*DETECT, "--stride", "33", "doc.txt"], ["stride 33", "1..32"]),
    Case("min-tokens-negative", [*DETECT, "--min-tokens", "-1", "doc.txt"], ["--min-tokens"]),
    Case("top-negative", [*DETECT, "--top", "-1", "doc.txt"], ["--top", "less than 0"]),
    Case("top-huge", [*DETECT, "--top", "100000", "doc.txt"], ["--top", "more than 1,000"]),
    # text in: stdin and files
    Case("stdin-binary", [*DETECT, "-"], ["stdin looks binary"], stdin=b"\xff\xfe\x00\x01binary"),
    Case("stdin-empty", [*DETECT, "-"], ["stdin is empty"], stdin=b"  \n"),
    Case("stdin-twice", [*DETECT, "-", "-"], ["'-' (stdin)", "more than once"], stdin=TEXT.encode()),
    Case("html-is-an-input", [*DETECT, "--html", "doc.txt", "doc.txt"], ["--html doc.txt", "input files"]),
    Case("html-over-user-file", [*DETECT, "--html", "notes.txt", "doc.txt"], ["--html notes.txt", "not an HTML"]),
    Case("html-is-a-folder", [*DETECT, "--html", "docs", "doc.txt"], ["--html docs", "folder"]),
    # calibration files: the documented shape
    Case("cal-nan-threshold", [*DETECT, "--calibration", "cal_nan.json", "doc.txt"], ["cal_nan.json", "threshold"]),
    Case("cal-truncated", [*DETECT, "--calibration", "cal_truncated.json", "doc.txt"], ["cal_truncated", "cut short"]),
    Case("cal-not-object", [*DETECT, "--calibration", "cal_list.json", "doc.txt"], ["cal_list.json", "not an object"]),
    Case("cal-binary", [*DETECT, "--calibration", "binary.cal.json", "doc.txt"], ["binary.cal.json", "UTF-8"]),
    Case("cal-detector", [*DETECT, "--calibration", "cal_detector.json", "doc.txt"], ["unknown detector 'magic'"]),
    Case("cal-min-tokens", [*DETECT, "--calibration", "cal_min_tokens.json", "doc.txt"], ["min_tokens -3"]),
    Case("cal-weights", [*DETECT, "--calibration", "cal_weights.json", "doc.txt"], ["'weights'"]),
    Case("cal-lexicon-path", [*DETECT, "--calibration", "cal_lexicon.json", "doc.txt"], ["lexicon", "file name"]),
    Case("cal-lexicon-gone", [*DETECT, "--calibration", "cal_no_lexicon.json", "doc.txt"], ["gone-lexicon.json"]),
    Case("cal-missing", [*DETECT, "--calibration", "nowhere.json", "doc.txt"], ["nowhere.json", "not found"]),
    # gptwo detect sample: counts, seeds, the context
    Case("sample-new-tokens-zero", [*SAMPLE, "--out", "s", "--new-tokens", "0"], ["--new-tokens", "less than 1"]),
    Case("sample-prompt-zero", [*SAMPLE, "--out", "s", "--prompt-tokens", "0"], ["--prompt-tokens"]),
    Case("sample-limit-negative", [*SAMPLE, "--out", "s", "--limit", "-1"], ["--limit", "less than 1"]),
    Case("sample-per-document", [*SAMPLE, "--out", "s", "--per-document", "-1"], ["--per-document"]),
    Case("sample-seed-negative", [*SAMPLE, "--out", "s", "--seed", "-1"], ["--seed", "less than 0"]),
    Case("sample-seed-2**64", [*SAMPLE, "--out", "s", "--seed", str(2**64)], ["--seed", "more than"]),
    Case("sample-temperature-nan", [*SAMPLE, "--out", "s", "--temperature", "nan"], ["--temperature"]),
    Case("sample-top-p-zero", [*SAMPLE, "--out", "s", "--top-p", "0"], ["--top-p"]),
    Case("sample-top-k-zero", [*SAMPLE, "--out", "s", "--top-k", "0"], ["--top-k"]),
    Case("sample-beyond-context", [*SAMPLE, "--out", "s", "--new-tokens", "40"], ["56 tokens", "context of 32"]),
    Case("sample-prompt-fills-context", [*SAMPLE, "--out", "s", "--prompt-tokens", "32"], ["33 tokens", "of 32"]),
    Case("sample-below-min-tokens", [*SAMPLE, "--out", "s", "--new-tokens", "8"], ["24 tokens", "--min-tokens 32"]),
    Case("sample-out-user-folder", [*SAMPLE, "--out", "mine", "--new-tokens", "16"], ["--out mine", "not a"]),
    Case("sample-out-is-source", [*SAMPLE, "--out", "docs", "--new-tokens", "16"], ["--out docs"]),
    Case("sample-out-is-file", [*SAMPLE, "--out", "doc.txt", "--new-tokens", "16"], ["--out doc.txt", "a file"]),
    # gptwo detect calibrate: options, folders, outputs
    Case("cal-folds-one", [*CALIBRATE, *SETS, "--out", "c.json", "--folds", "1"], ["--folds", "less than 2"]),
    Case("cal-max-fpr-nan", [*CALIBRATE, *SETS, "--out", "c.json", "--max-fpr", "nan"], ["--max-fpr"]),
    Case("cal-max-fpr-one", [*CALIBRATE, *SETS, "--out", "c.json", "--max-fpr", "1"], ["--max-fpr"]),
    Case(
        "cal-same-folders",
        [*CALIBRATE, "--human", "set/human", "--generated", "set/human/", "--out", "c.json"],
        ["--human and --generated are the same folder"],
    ),
    Case("cal-out-over-model", [*CALIBRATE, *SETS, "--out", "model/config.json"], ["model/config.json", "not an"]),
    Case("cal-out-over-notes", [*CALIBRATE, *SETS, "--out", "notes.txt"], ["--out notes.txt"]),
    Case("cal-plot-over-notes", [*CALIBRATE, *SETS, "--out", "c.json", "--plot", "notes.txt"], ["--plot notes.txt"]),
    Case("cal-plot-is-out", [*CALIBRATE, *SETS, "--out", "c.json", "--plot", "c.json"], ["same file"]),
]


def run(argv: list[str]) -> int:
    """`gptwo ARGV` in this process: its exit status (argparse's usage errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def _digest(root) -> dict[str, str]:
    """Every file under `root` and a hash of its bytes."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, case, capsys, monkeypatch):
    if case.stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(case.stdin)))
    before = _digest(world)
    code = run(case.argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], err
    assert "this is a bug" not in err
    for name in case.names:
        assert name in lines[0], (name, lines[0])
    assert _digest(world) == before


def test_invalid_utf8_on_stdin_is_read_with_a_note(world, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait, " + TEXT.encode())))
    assert main([*DETECT, "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert "note: stdin: 1 invalid UTF-8 sequence(s) read as U+FFFD" in captured.err
    assert json.loads(captured.out)["file"] == "-"


def test_top_zero_keeps_no_alternatives(world, capsys):
    assert main([*DETECT, "--json", "--tokens", "--top", "0", "doc.txt"]) == 0
    rows = json.loads(capsys.readouterr().out)["token_stats"]
    assert rows and all(row["top"] == [] for row in rows)


def test_folds_above_the_documents_warn_and_say_how_many_were_used(world):
    with open("set/sample.json") as f:
        sources = len(set(json.load(f)["documents"]))
    with open("calibrate.err") as f:  # the fixture calibrated with --folds 10
        assert f"warning: --folds 10 but the texts come from only {sources} source document(s)" in f.read()
    with open("cal.json") as f:
        report = json.load(f)
    assert len(report["classifier_evaluation"]["folds"]) == sources
    assert report["classifier_evaluation"]["method"].startswith(f"{sources}-fold")


def test_a_rerun_into_an_earlier_set_replaces_it_without_stale_pairs(world, capsys):
    out = "rerun"
    shutil.copytree("set", out)  # the fixture's set, written by 'detect sample'
    assert len(os.listdir(f"{out}/human")) >= 2
    assert main([*SAMPLE, "--out", out, "--new-tokens", "16", "--top-k", "40", "--limit", "1"]) == 0
    assert os.listdir(f"{out}/human") == os.listdir(f"{out}/generated") == ["00000.txt"]
    with open(f"{out}/sample.json") as f:
        assert json.load(f)["pairs"] == 1


def test_library_entry_points_check_their_numbers(world):
    from gptwo.detect.calibrate import calibrate
    from gptwo.detect.detector import load_rule
    from gptwo.detect.pairs import sample_set
    from gptwo.detect.stats import token_stats
    from gptwo.weights import load_model

    model, tokenizer = load_model("model", device="cpu")
    tokens = tokenizer.encode_ordinary(TEXT)
    with pytest.raises(GptwoError, match="stride 0 is outside 1..32"):
        token_stats(model, tokenizer, tokens, stride=0)
    with pytest.raises(GptwoError, match="top=-1"):
        token_stats(model, tokenizer, tokens, top=-1)
    with pytest.raises(GptwoError, match="--min-tokens -1"):
        load_rule("model", min_tokens=-1)
    with pytest.raises(GptwoError, match="--seed -1"):
        sample_set("model", "docs", "lib_set", new_tokens=16, seed=-1, device="cpu")
    with pytest.raises(GptwoError, match="--limit -1"):
        sample_set("model", "docs", "lib_set", new_tokens=16, limit=-1, device="cpu")
    with pytest.raises(GptwoError, match="--max-fpr nan"):
        calibrate("model", "set/human", "set/generated", max_fpr=float("nan"), out="lib.json", lexicon=None)
    with pytest.raises(GptwoError, match="--folds 1"):
        calibrate("model", "set/human", "set/generated", folds=1, out="lib.json", lexicon=None)
    assert not os.path.exists("lib_set") and not os.path.exists("lib.json")
