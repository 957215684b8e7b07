"""A table of bad input to `gptwo bench decode|serve|train` (issue 20): each row gives exit 2 and one
`error: … — …` line naming the option; then the outside tools: a llama-bench that never returns is stopped
after the timeout (with what it started), one that prints other JSON is named, the GGUF converter is bounded
too, and a server that never answers costs a round its timeout, not forever.

The hanging tools are tiny shell scripts written by the tests; timeouts are a second or less.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time

import pytest
import torch

from gptwo.bench import TIMEOUT_ENV, run_tool, tool_timeout
from gptwo.bench.llamacpp import GGUF_DTYPES, LlamaCppAnchor, convert, parse_llama_bench
from gptwo.bench.serve_workloads import Request, burst_summary, run_burst
from gptwo.cli import main
from gptwo.errors import GptwoError

DECODE = ["bench", "decode", "--device", "cpu", "--variants", "fp32", "--new-tokens", "2", "--rounds", "1"]
SERVE = ["bench", "serve", "--device", "cpu", "--variants", "fp32"]
TRAIN = ["bench", "train", "--device", "cpu"]
MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()

CASES = [
    # (name, argv, what the error line must name)
    ("decode-variants-comma", [*DECODE, "--variants", ","], ["--variants", "names none of"]),
    ("decode-variants-empty", [*DECODE, "--variants", ""], ["--variants"]),
    ("decode-variants-unknown", [*DECODE, "--variants", "fp32,fp8"], ["--variants", "unknown 'fp8'"]),
    ("decode-threads-negative", [*DECODE, "--threads", "-3"], ["--threads", "less than 1"]),
    ("decode-threads-zero", [*DECODE, "--threads", "0"], ["--threads"]),
    ("decode-batch-zero", [*DECODE, "--batch-size", "0"], ["--batch-size"]),
    ("decode-rounds-huge", [*DECODE, "--rounds", "1000000"], ["--rounds", "more than"]),
    ("decode-new-tokens-zero", [*DECODE, "--new-tokens", "0"], ["--new-tokens"]),
    ("decode-timeout-zero", [*DECODE, "--timeout", "0"], ["--timeout"]),
    ("decode-timeout-nan", [*DECODE, "--timeout", "nan"], ["--timeout"]),
    ("serve-threads-negative", [*SERVE, "--threads", "-3"], ["--threads", "less than 1"]),
    ("serve-variants-comma", [*SERVE, "--variants", ","], ["--variants"]),
    ("serve-clients-zero", [*SERVE, "--clients", "0"], ["--clients"]),
    ("serve-clients-huge", [*SERVE, "--clients", "100000"], ["--clients", "more than 1,024"]),
    ("serve-tokens-zero", [*SERVE, "--tokens", "0"], ["--tokens"]),
    ("serve-rounds-zero", [*SERVE, "--rounds", "0"], ["--rounds"]),
    ("train-batch-zero", [*TRAIN, "--batch-size", "0"], ["--batch-size", "less than 1"]),
    ("train-steps-zero", [*TRAIN, "--steps", "0"], ["--steps"]),
    ("train-warmup-negative", [*TRAIN, "--warmup", "-1"], ["--warmup"]),
    ("train-peak-flops-negative", [*TRAIN, "--peak-flops", "-1"], ["--peak-flops"]),
    ("train-peak-flops-nan", [*TRAIN, "--peak-flops", "nan"], ["--peak-flops"]),
    ("train-peak-flops-inf", [*TRAIN, "--peak-flops", "inf"], ["--peak-flops"]),
    ("train-threads-negative", [*TRAIN, "--threads", "-3"], ["--threads"]),
    ("train-n-embd-zero", [*TRAIN, "--n-embd", "0"], ["--n-embd"]),
    (
        "train-memory",
        [*TRAIN, "--n-layer", "1000", "--n-embd", "16384", "--n-head", "16"],
        ["needs at least", "GiB", "smaller shape"],
    ),
]
if not MPS:
    CASES += [
        ("decode-mps-missing", [*DECODE, "--device", "mps"], ["MPS", "not available"]),
        ("serve-mps-missing", [*SERVE, "--device", "mps"], ["MPS", "not available"]),
        ("train-mps-missing", [*TRAIN, "--device", "mps"], ["MPS", "not available"]),
    ]


def run(argv: list[str]) -> int:
    """`gptwo ARGV` in this process: its exit status (argparse's usage errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and " — " in lines[0] and "this is a bug" not in err, err
    return lines[0]


@pytest.mark.parametrize("name, argv, names", CASES, ids=[c[0] for c in CASES])
def test_bad_bench_options_are_one_line_errors(tiny_model, name, argv, names, capsys):
    argv = [*argv[:2], "--model", tiny_model, *argv[2:]] if argv[1] != "train" else argv
    assert run(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    for expected in names:
        assert expected in line, (expected, line)


# ---------------------------------------------------------------- outside tools
HANG = """#!/bin/sh
sleep 60 &
echo $! > "{pid_file}"
wait
"""


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (exited, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _hanging_tool(tmp_path, name: str) -> tuple[str, str]:
    pid_file = str(tmp_path / f"{name}.pid")
    path = tmp_path / name
    path.write_text(HANG.format(pid_file=pid_file))
    path.chmod(0o755)
    return str(path), pid_file


def _assert_stopped(pid_file: str) -> None:
    with open(pid_file) as f:
        pid = int(f.read())
    deadline = time.monotonic() + 10  # the kill is sent before the error; the kernel may take a moment
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), f"the tool's child {pid} still runs"


def _gguf_dir(tmp_path) -> str:
    folder = tmp_path / "gguf"
    folder.mkdir()
    for dtype in GGUF_DTYPES:
        (folder / f"model-{dtype}.gguf").write_bytes(b"GGUF")
    return str(folder)


def test_a_llama_bench_that_never_returns_is_stopped_after_the_timeout(tiny_model, tmp_path, capsys):
    binary, pid_file = _hanging_tool(tmp_path, "llama-bench")
    argv = [*DECODE, "--model", tiny_model, "--llama-cpp", binary, "--gguf", _gguf_dir(tmp_path), "--timeout", "1"]
    assert run(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "llama-bench on" in line and "did not finish within 1 s" in line and "--timeout" in line
    _assert_stopped(pid_file)


def test_the_timeout_comes_from_the_environment_when_not_given(monkeypatch, tmp_path):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert tool_timeout() == 600 and tool_timeout(2.5) == 2.5
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    assert tool_timeout() == 0.5
    binary, pid_file = _hanging_tool(tmp_path, "llama-bench")
    anchor = LlamaCppAnchor(binary, {"f32": "model-f32.gguf"}, 3, 4, 1, timeout=tool_timeout())
    with pytest.raises(GptwoError, match=f"did not finish within 0.5 s.*\\${TIMEOUT_ENV}"):
        anchor.time("f32")
    _assert_stopped(pid_file)
    for bad in ("abc", "-1", "nan", "0"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(GptwoError, match=TIMEOUT_ENV):
            tool_timeout()


def test_the_gguf_converter_is_bounded_too(tmp_path):
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(GptwoError, match=r"llama.cpp's converter \(f32\) did not finish within 0.5 s"):
        convert(str(tmp_path), str(converter), str(tmp_path / "out"), ("f32",), timeout=0.5)


def test_a_tool_that_cannot_start_is_one_line(tmp_path):
    with pytest.raises(GptwoError, match="cannot run llama-bench"):
        run_tool([str(tmp_path / "missing")], 1, "llama-bench", "check the path")


@pytest.mark.parametrize(
    "printed, message",
    [
        ('{"a": 1}', "JSON of another shape"),
        ("[1, 2]", "JSON of another shape"),
        ("[]", "no 3-token prompt"),
        ('[{"n_prompt": 3, "n_gen": 4, "samples_ns": "fast"}]', "samples_ns is not a list of positive times"),
        ('[{"n_prompt": 3, "n_gen": 4, "samples_ns": [-5]}]', "samples_ns is not a list of positive times"),
        ("Segmentation fault", "printed no JSON"),
    ],
)
def test_a_llama_bench_printing_other_json_is_named(printed, message):
    with pytest.raises(GptwoError, match=message):
        parse_llama_bench(printed, 3, 4)


def test_undecodable_llama_bench_output_is_read_not_a_crash(tmp_path):
    script = tmp_path / "noisy"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.buffer.write(b'\\xff\\xfe[]')\n")
    script.chmod(0o755)
    done = run_tool([str(script)], 10, "noisy", "fix")
    assert done.returncode == 0 and done.stdout.endswith("[]")


def test_a_server_that_never_answers_costs_a_round_its_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held = []
    accepting = threading.Thread(target=lambda: held.append(listener.accept()), daemon=True)
    accepting.start()
    try:
        completions, seconds, _ = asyncio.run(run_burst(listener.getsockname(), [Request([1, 2], 4)], None, 0.5))
        result = burst_summary(completions, seconds)
    finally:
        listener.close()
        for conn, _ in held:
            conn.close()
    assert result["failed"] == 1 and "no complete answer within 0.5 s" in result["errors"][0]
