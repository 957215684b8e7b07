"""`gptwo prepare` on the command line: output, summary line, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from gptwo.cli import main
from gptwo.tokenizer import Tokenizer


def test_prepare_command(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Hello there. " * 30)
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "General Kenobi."}) + "\n")
    code = main(
        [
            "prepare",
            str(tmp_path / "a.txt"),
            str(tmp_path / "b.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--text-field",
            "body",
            "--val-fraction",
            "0.5",
            "--seed",
            "4",
            "--quiet",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "train shard(s)" in err and "tokenizing" not in err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    tok = Tokenizer.gpt2()
    expected = len(tok.encode("Hello there. " * 30)) + len(tok.encode("General Kenobi.")) + 2
    assert meta["seed"] == 4 and meta["text_field"] == "body" and meta["train_tokens"] + meta["val_tokens"] == expected
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "{tmp}/missing.txt", "--out", "{tmp}/out"], "error: input {tmp}/missing.txt does not exist — "),
        (["prepare", "{tmp}/latin.txt", "--out", "{tmp}/out"], "is not UTF-8 text"),
        (["prepare", "{tmp}/empty.txt", "--out", "{tmp}/out"], "the corpus has no documents"),
        (
            ["prepare", "{tmp}/nofield.jsonl", "--out", "{tmp}/out"],
            "nofield.jsonl:1 is not a JSON object with a 'text' field",
        ),
        (["prepare", "{tmp}/empty.txt", "--out", "{tmp}/out", "--tokenizer", "{tmp}/none.json"], "tokenizer file"),
        (["prepare", "hf:", "--out", "{tmp}/out"], "names no dataset"),
        (["prepare", "{tmp}/empty.txt"], "the following arguments are required: --out"),
    ],
)
def test_prepare_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "latin.txt").write_bytes("naïve".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    argv = [a.format(tmp=tmp_path) for a in args]
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert message.format(tmp=tmp_path) in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0]


def test_error_in_a_subprocess(tmp_path):
    """A separate process prints the same single line and exits 2 (no traceback)."""
    script = (
        "import sys; from gptwo.cli import main\n"
        f"sys.exit(main(['prepare', {str(tmp_path / 'nothing')!r}, '--out', {str(tmp_path / 'o')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: input ") and "Traceback" not in done.stderr
