"""`gptwo bench lora` on a tiny shape: the report's fields, trainable counts against r*(in+out) and against peft's
own count, and one-line errors (never timings)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gptwo.errors import GptwoError

TINY = dict(n_layer=1, n_head=2, n_embd=64, vocab_size=128, block_size=32)
# r*(in+out) of each default target of a width-64 block: c_attn 64->192, attn.c_proj 64->64, c_fc 64->256,
# mlp.c_proj 256->64
LORA_R8 = 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))


def test_bench_lora_report():
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptwo.bench.lora import bench_lora, render_lora

    report = bench_lora(
        ("full", "fp32", "int8"), shape=TINY, seq_len=16, steps=1, rounds=2, warmup=1, threads=1, progress=False
    )
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=1, n_head=2))
    n = sum(p.numel() for p in hf.parameters())  # the tied embedding once, the position table included
    assert report["n_params"] == n and report["analytic_trainable"] == LORA_R8
    assert report["tokens_per_step"] == 16 and report["lora"] == {
        "rank": 8,
        "alpha": 8.0,
        "targets": ["c_attn", "c_proj", "c_fc"],
    }
    rows = report["rows"]
    assert [(r["name"], r["method"], r["base"]) for r in rows] == [
        ("gptwo", "full", "fp32"),
        ("transformers", "full", "fp32"),
        ("gptwo", "lora", "fp32"),
        ("peft", "lora", "fp32"),
        ("gptwo", "lora", "int8"),  # peft's int8 base needs bitsandbytes: no anchor
    ]
    assert [r["trainable_params"] for r in rows] == [n, n, LORA_R8, LORA_R8, LORA_R8]  # peft counts its own
    for r in rows:
        assert r["trainable_fraction"] == pytest.approx(r["trainable_params"] / n)
        assert len(r["seconds"]) == 2 and r["s_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(16 / r["s_per_step"])
        # each row's own process: its peak counts from its first step, above what torch's import took
        assert r["peak_rss_mib"] >= r["start_rss_mib"] > 50 and r["process_peak_rss_mib"] >= r["start_rss_mib"]
        assert r["anchor"] == (r["name"] != "gptwo")
        assert r["rss_vs_full"] == pytest.approx(r["peak_rss_mib"] / rows[0]["peak_rss_mib"])
    for ours, theirs in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert ours["vs_anchor"] == pytest.approx(theirs["s_per_step"] / ours["s_per_step"])
    assert rows[4]["vs_anchor"] is None and rows[1]["vs_anchor"] is None
    table = render_lora(report).splitlines()
    assert f"{LORA_R8:,} = r*(in+out)" in table[1]
    assert table[3].split()[:3] == ["row", "base", "trainable"]
    assert table[4].split()[:4] == ["gptwo", "full", "fp32", f"{n:,}"]
    assert table[-1].split()[:4] == ["gptwo", "lora", "int8", f"{LORA_R8:,}"]


def test_analytic_count_follows_the_targets():
    from gptwo.bench.lora import analytic_trainable
    from gptwo.config import GPTConfig

    config = GPTConfig(**TINY)
    assert analytic_trainable(config, 4, ("c_attn",)) == 4 * (64 + 192)
    assert analytic_trainable(config, 8, ("attn.c_proj", "mlp.c_proj")) == 8 * ((64 + 64) + (256 + 64))
    gpt2 = GPTConfig.from_preset("gpt2")  # docs/training.md: 1,179,648 on the 124M shape
    assert analytic_trainable(gpt2, 8, ("c_attn", "c_proj", "c_fc")) == 1_179_648


def test_bench_lora_bad_input_is_one_error_line():
    from gptwo.bench.lora import bench_lora

    with pytest.raises(GptwoError, match="longer than the model's context"):
        bench_lora(shape=TINY, seq_len=64)
    result = subprocess.run(
        [sys.executable, "-m", "gptwo.cli", "bench", "lora", "--variants", "fp16"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
