"""`gptwo bench decode --onnxruntime`: onnxruntime rows beside gptwo's and transformers' in the same rounds."""

from __future__ import annotations

import pytest
from cli_testing import assert_one_line_error, run

from gptwo.bench.decode import decode_report

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")


def test_onnxruntime_rows(trained_dir):
    report = decode_report(
        trained_dir,
        device="cpu",
        variants=("fp32",),
        new_tokens=6,
        prompt_tokens=4,
        rounds=1,
        threads=1,
        progress=False,
        onnxruntime=("fp32", "int8"),
    )
    rows = {(row["tool"], row["dtype"]): row for row in report["rows"]}
    assert set(rows) == {("transformers", "fp32"), ("gptwo", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    assert rows[("onnxruntime", "fp32")]["token_agreement"] == 1.0  # the same greedy tokens as transformers
    assert rows[("onnxruntime", "fp32")]["tokens_per_s"] > 0
    # the same weights streamed per token as gptwo's fp32 (blocks, final norm, tied head), within the graph's constants
    ort_mb, gptwo_mb = rows[("onnxruntime", "fp32")]["weight_mb"], rows[("gptwo", "fp32")]["weight_mb"]
    assert abs(ort_mb - gptwo_mb) < 0.01 * gptwo_mb
    assert rows[("onnxruntime", "int8")]["weight_mb"] < 0.4 * ort_mb


def test_onnxruntime_rows_bad_input(trained_dir, capsys):
    argv = ["bench", "decode", "--model", trained_dir, "--variants", "fp32", "--onnxruntime", "fp16"]
    assert_one_line_error(*run(argv, capsys)[::2], "unknown 'fp16'")
