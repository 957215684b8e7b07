"""`gptwo bench train --json` on a tiny shape: the documented fields, consistent with each other (never timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptwo.errors import GptwoError

TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--vocab-size",
    "128",
    "--block-size",
    "16",
    "--batch-size",
    "2",
    "--steps",
    "2",
    "--rounds",
    "2",
    "--warmup",
    "1",
    "--compile",
    "false",
    "--device",
    "cpu",
]


def test_bench_train_json_fields():
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptwo.train.speed import native_bf16

    result = subprocess.run(
        [sys.executable, "-m", "gptwo.cli", "bench", "train", "--json", *TINY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    dtypes = (
        ["bfloat16", "float32"] if native_bf16() else ["float32"]
    )  # gptwo's default precision on this CPU first, then float32
    assert report["bench"] == "train" and report["preset"] == "cpu" and report["dtype"] == dtypes[0]
    assert report["shape"] == {
        "vocab_size": 128,
        "block_size": 16,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "dropout": 0.0,
        "layer_norm_eps": 1e-5,
    }
    assert report["tokens_per_step"] == 2 * 16 and report["steps"] == 2 and report["rounds"] == 2
    # N counted independently on transformers' model of the same shape (tied embeddings once, no position table)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    n = sum(p.numel() for p in hf.parameters()) - hf.transformer.wpe.weight.numel()
    assert report["n_params"] == n
    assert report["flops_per_token"] == 6 * n + 12 * 1 * 32 * 16
    assert "6*N + 12*L*C*T" in report["flop_formula"]
    rows = report["rows"]
    assert [(row["name"], row["dtype"]) for row in rows] == [("gptwo", d) for d in dtypes] + [
        ("transformers", d) for d in dtypes
    ]
    for row in rows:
        assert (
            row["tokens_per_s"] > 0 and row["s_per_step"] > 0 and row["compiled"] is False
        )  # --compile false: nothing compiles
        assert row["tokens_per_s"] == pytest.approx(report["tokens_per_step"] / row["s_per_step"])
        assert row["tflops"] == pytest.approx(row["tokens_per_s"] * report["flops_per_token"] / 1e12)
        assert row["mfu"] is None  # no peak known for a CPU unless --peak-flops is given
    # the anchor is transformers' fastest row, and every ratio is over it
    theirs = [row for row in rows if row["name"] == "transformers"]
    anchor = max(theirs, key=lambda row: row["tokens_per_s"])
    assert [row["anchor"] for row in rows] == [row is anchor for row in rows]
    assert report["anchor"] == {"name": "transformers", "dtype": anchor["dtype"], "compiled": False}
    for row in rows:
        assert row["vs_transformers"] == pytest.approx(row["tokens_per_s"] / anchor["tokens_per_s"])
    assert report["ratio"] == pytest.approx(rows[0]["vs_transformers"])
    ours_fp32 = next(row for row in rows if row["name"] == "gptwo" and row["dtype"] == "float32")
    theirs_fp32 = next(row for row in theirs if row["dtype"] == "float32")
    assert report["ratio_float32"] == pytest.approx(ours_fp32["tokens_per_s"] / theirs_fp32["tokens_per_s"])


def test_bench_train_table_and_mfu_with_a_given_peak():
    result = subprocess.run(
        [sys.executable, "-m", "gptwo.cli", "bench", "train", *TINY, "--dtype", "float32", "--peak-flops", "1e12"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "6*N + 12*L*C*T" in lines[1]
    assert lines[3].split()[:2] == ["gptwo", "float32"] and lines[4].split()[:2] == ["transformers", "float32"]
    assert lines[4].endswith("1.00x  (anchor)")  # the only transformers row is the anchor
    assert lines[3].split()[6].endswith("%")  # the MFU column
    assert lines[5].startswith("gptwo (float32) vs the anchor: ")


def test_bench_train_bad_input_is_one_error_line():
    from gptwo.bench.train import bench_train

    with pytest.raises(GptwoError, match="unknown bench preset"):
        bench_train("gpt3")
    result = subprocess.run(
        [sys.executable, "-m", "gptwo.cli", "bench", "train", *TINY, "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
