"""`gptwo bench decode` on a tiny saved model: the documented JSON fields and the table (timings never asserted)."""

from __future__ import annotations

import json

import pytest

from gptwo.cli import main

ROW_FIELDS = {
    "tool",
    "dtype",
    "tokens_per_s",
    "ratio_vs_transformers",
    "weight_mb",
    "ceiling_tokens_per_s",
    "token_agreement",
}
TOP_FIELDS = {
    "bench",
    "device",
    "cpu",
    "cpu_flags",
    "threads",
    "gpu",
    "model",
    "batch_size",
    "prompt_tokens",
    "new_tokens",
    "rounds",
    "compile",
    "bandwidth_gb_s",
    "rows",
}


ARGS = ["--new-tokens", "4", "--prompt-tokens", "3", "--rounds", "1", "--device", "cpu"]


def test_bench_decode_json_has_the_documented_fields(tiny_model, capsys):
    assert main(["bench", "decode", "--model", tiny_model, "--json", *ARGS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert TOP_FIELDS <= set(report) and report["bench"] == "decode" and report["new_tokens"] == 4
    assert [(r["tool"], r["dtype"]) for r in report["rows"]] == [
        ("transformers", "fp32"),
        ("gptwo", "fp32"),
        ("gptwo", "bf16"),
        ("gptwo", "int8"),
    ]
    for row in report["rows"]:
        assert ROW_FIELDS <= set(row)
        assert row["tokens_per_s"] > 0 and row["ceiling_tokens_per_s"] > 0 and 0 <= row["token_agreement"] <= 1
    anchor, fp32, bf16, int8 = report["rows"]
    assert anchor["ratio_vs_transformers"] == 1.0
    assert fp32["token_agreement"] == 1.0  # the same weights in fp32 decode the same greedy tokens as transformers
    assert (
        int8["weight_mb"] < bf16["weight_mb"] < fp32["weight_mb"]
    )  # what each step streams shrinks with the precision
    assert report["bandwidth_gb_s"] > 0


def test_bench_decode_prints_a_table(tiny_model, capsys):
    assert main(["bench", "decode", "--model", tiny_model, "--variants", "int8", *ARGS, "--rounds", "2"]) == 0
    printed = capsys.readouterr()
    out = printed.out
    assert "transformers" in out and "int8" in out and "ceiling" in out and "bf16" not in out.split("\n", 1)[1]
    # progress on stderr: each warm-up with its time, then each round as it ends
    assert "warming up 2/2: gptwo int8... " in printed.err
    rounds = [line for line in printed.err.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1/2", "round 2/2"]
    assert "gptwo int8" in rounds[0] and "tok/s" in rounds[0] and "s left)" in rounds[0]


def test_bench_decode_refuses_unknown_variants_in_one_line(tiny_model, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "decode", "--model", tiny_model, "--variants", "fp8", *ARGS])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --variants: unknown 'fp8'") and err.count("\n") == 1


def test_bench_decode_speculative_compares_plain_draft_and_ngram_in_one_run(tiny_model, tmp_path, capsys):
    passage = tmp_path / "passage.txt"
    passage.write_text("a tiny corpus for a tiny tokenizer, and then some more words " * 4)
    args = ["--new-tokens", "6", "--prompt-tokens", "10", "--rounds", "1", "--device", "cpu", "--text", str(passage)]
    spec = ["--draft-model", tiny_model, "--speculate", "ngram", "--num-speculative-tokens", "3"]
    assert main(["bench", "decode", "--model", tiny_model, *spec, *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bench"] == "decode-speculative" and report["draft_params"] == report["model_params"]
    rows = {(r["prompt"], r["tool"], r["method"]): r for r in report["rows"]}
    methods = ("plain", "draft model", "ngram")
    assert set(rows) == {(p, t, m) for p in ("grounded", "open") for t in ("gptwo", "transformers") for m in methods}
    for (prompt, tool, method), row in rows.items():
        assert row["same_tokens"] == 1.0, (prompt, tool, method)  # greedy: every path gives plain greedy's tokens
        assert (row["acceptance_rate"] is None) == (tool == "transformers" or method == "plain")
    assert rows[("grounded", "gptwo", "draft model")]["acceptance_rate"] == 1.0  # the target drafting for itself
    assert rows[("open", "gptwo", "plain")]["speedup"] == 1.0
    assert report["prompt_tokens"]["grounded"] > report["prompt_tokens"]["open"]


def test_bench_decode_speculative_refuses_what_it_does_not_time(tiny_model, capsys):
    assert main(["bench", "decode", "--model", tiny_model, "--speculate", "ngram", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "times batch 1" in err and err.count("\n") == 1
    assert main(["bench", "decode", "--model", tiny_model, "--text", "x.txt"]) == 2
    assert "add --draft-model M or --speculate ngram" in capsys.readouterr().err
