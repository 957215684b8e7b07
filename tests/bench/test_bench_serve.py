"""`gptwo bench serve --json` on a tiny model: the documented fields, 0 failures, the anchor rows (never timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serve_testing import save_tiny_model

from gptwo.bench.serve import client_prompts, render_serve, stream_completion

ROW_FIELDS = {
    "tool",
    "dtype",
    "tokens_per_s",
    "ratio",
    "ttft_p50_s",
    "ttft_p99_s",
    "failed",
    "single_client_tokens_per_s",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_model(directory)
    return directory


@pytest.fixture(scope="module")
def report(tiny_dir) -> dict:
    """One `gptwo bench serve --json` run: two server variants, 4 clients x 4 tokens, one round."""
    cmd = [
        sys.executable,
        "-m",
        "gptwo.cli",
        "bench",
        "serve",
        "--json",
        "--model",
        tiny_dir,
        "--device",
        "cpu",
        "--clients",
        "4",
        "--tokens",
        "4",
        "--variants",
        "fp32,int8",
        "--rounds",
        "1",
        "--threads",
        "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_bench_serve_json_fields(report, tiny_dir):
    assert report["bench"] == "serve" and report["device"] == "cpu" and report["threads"] == 1
    assert (report["clients"], report["tokens"], report["rounds"]) == (4, 4, 1)
    assert report["cpu"] and isinstance(report["cpu_flags"], list) and report["model"] == tiny_dir
    rows = {(row["tool"], row["dtype"]): row for row in report["rows"]}
    assert ("transformers generate", "fp32") in rows
    assert report["anchor"] in {tool for tool, _ in rows if tool.startswith("transformers")}
    assert {("gptwo serve", "fp32"), ("gptwo serve", "int8")} <= set(rows)
    anchor = max(
        (r for (tool, _), r in rows.items() if tool.startswith("transformers")), key=lambda r: r["tokens_per_s"]
    )
    assert anchor["tool"] == report["anchor"] and anchor["ratio"] == pytest.approx(1.0)
    for row in report["rows"]:
        assert ROW_FIELDS <= set(row)
        assert row["tokens_per_s"] > 0 and row["ratio"] == pytest.approx(row["tokens_per_s"] / anchor["tokens_per_s"])
    for variant in ("fp32", "int8"):
        row = rows[("gptwo serve", variant)]
        assert row["failed"] == 0, row.get("errors")
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and row["single_client_tokens_per_s"] > 0
    servers = report["servers"]  # what each server says it runs (its /health)
    assert servers["gptwo serve fp32"]["dtype"] == "fp32" and servers["gptwo serve fp32"]["quantize"] is None
    assert servers["gptwo serve int8"]["quantize"] == "int8"
    assert all(s["peak_batch"] >= 1 and s["failed"] == 0 for s in servers.values())


def test_bench_serve_table_and_bad_variant(report):
    lines = render_serve(report).splitlines()
    assert (
        lines[0].startswith("serve:")
        and "4 streaming clients x 4 tokens" in lines[0]
        and f"anchor: {report['anchor']}" in lines[0]
    )
    assert lines[1].split()[:2] == ["tool", "weights"]
    assert [line.split()[0] for line in lines[2 : 2 + len(report["rows"])]] == [
        row["tool"].split()[0] for row in report["rows"]
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "gptwo.cli", "bench", "serve", "--variants", "fp8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: argument --variants: unknown 'fp8'")


def test_stream_completion_reads_a_live_server_like_the_openai_client(tiny_dir):
    """The bench's stdlib client reads the same greedy text and token count as the official `openai` client."""
    import asyncio

    from openai import OpenAI
    from serve_testing import LiveServer

    from gptwo.serve import BatchEngine, create_app
    from gptwo.weights import load_model

    model, tokenizer = load_model(tiny_dir, device="cpu")
    server = LiveServer(create_app(BatchEngine(model, tokenizer, max_batch=4), "bench"))
    try:
        prompt = client_prompts(1)[0]
        ours = asyncio.run(stream_completion("127.0.0.1", server.port, prompt, 8, temperature=0.0))
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        chunks = list(
            client.completions.create(
                model="bench",
                prompt=prompt,
                max_tokens=8,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert ours.error is None and ours.ttft is not None and ours.ttft > 0
        assert ours.tokens == chunks[-1].usage.completion_tokens > 0
        assert ours.text == "".join(c.choices[0].text for c in chunks if c.choices) != ""
        refused = asyncio.run(
            stream_completion("127.0.0.1", server.port, prompt, 10**6)
        )  # more tokens than the context: HTTP 400
        assert refused.error is not None and refused.error.startswith("HTTP 400")
    finally:
        server.close()
