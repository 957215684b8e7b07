"""`gptwo bench serve`: the workloads' prompts, the numbers from fake samples, the /metrics parser, option detection
for older trees, the stdlib client against the `openai` client, and one tiny run against this tree's server (never
timings)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.bench.serve import (
    Target,
    find_llama_server,
    gptwo_command,
    gptwo_env,
    help_options,
    llama_command,
    option_groups,
    render_serve,
    serve_report,
    tree_src,
    variant_runs,
    workload_rows,
)
from gptwo.bench.serve_workloads import (
    Completion,
    PromptMaker,
    Request,
    Sizes,
    burst_summary,
    join_requests,
    join_summary,
    kv_summary,
    metric,
    mixed_requests,
    parse_metrics,
    percentile,
    prefix_requests,
    stream_completion,
    take_event,
    throughput_requests,
)
from gptwo.errors import GptwoError
from gptwo.weights import save_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = Sizes(  # every workload, a few tokens each: fits the tiny model's 256-token context
    mixed_short=3,
    mixed_short_prompt=8,
    mixed_long=1,
    mixed_long_prompt=64,
    mixed_new=4,
    join_streams=2,
    join_stream_prompt=8,
    join_stream_new=40,
    join_warm=6,
    join_prompt=64,
    join_new=2,
    prefix_requests=3,
    prefix_shared=48,
    prefix_suffix=4,
    prefix_new=2,
    throughput_clients=3,
    throughput_prompt=8,
    throughput_new=4,
)


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def maker(gpt2) -> PromptMaker:
    return PromptMaker(gpt2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """2 layers, width 32, GPT-2's vocabulary and tokenizer, default (small) random weights: sampling at temperature 1
    is near uniform, so end-of-text comes about once in 50,000 tokens and streams run their length."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=256, n_layer=2, n_head=2, n_embd=32))
    save_pretrained(model.eval(), directory, tokenizer=Tokenizer.gpt2())
    return directory


# ---------------------------------------------------------------------------------------------- the workloads
def _round_trips(tokenizer, prompt: list[int]) -> bool:
    return tokenizer.encode(tokenizer.decode(prompt)) == prompt


def test_workloads_have_issue_22s_prompt_lengths_through_the_tokenizer(gpt2, maker):
    sizes = Sizes()
    mixed = mixed_requests(maker, sizes, 0)
    lengths = sorted(len(r.prompt) for r in mixed)
    assert lengths == [20] * 44 + [800] * 4 and {r.max_tokens for r in mixed} == {32}
    assert [len(r.prompt) for r in mixed[:13]].count(800) == 2  # the long prompts are spread, not bunched
    streams, joiner = join_requests(maker, sizes, 0)
    assert [(len(r.prompt), r.max_tokens) for r in streams] == [(20, 256)] * 8 and len(joiner.prompt) == 900
    prefix = prefix_requests(maker, sizes, 0)
    assert len(prefix) == 16 and all(len(r.prompt) == 608 for r in prefix)
    assert len({tuple(r.prompt[:600]) for r in prefix}) == 1 and len({tuple(r.prompt[600:]) for r in prefix}) == 16
    throughput = throughput_requests(maker, sizes, 0)
    assert [(len(r.prompt), r.max_tokens) for r in throughput] == [(20, 32)] * 64
    everything = mixed + streams + [joiner] + throughput
    assert all(_round_trips(gpt2, r.prompt) for r in everything + prefix[:2])  # N tokens as text too
    firsts = [tuple(r.prompt[:16]) for r in everything] + [tuple(prefix[0].prompt[:16])]
    assert len(set(firsts)) == len(firsts)  # no two share a first KV block: nothing for a prefix cache
    again = mixed_requests(maker, sizes, 0)
    assert [r.prompt for r in again] == [r.prompt for r in mixed]  # every server gets the same prompts in a round
    later = prefix_requests(maker, sizes, 1)
    assert later[0].prompt[:600] != prefix[0].prompt[:600]  # a new shared prefix each round
    assert sizes.context_needed() == 908 and sizes.most_at_once() == 64


def test_workloads_need_a_tokenizer_with_words():
    tokenizer = Tokenizer.train(["ab ab ab"] * 3, vocab_size=260, min_frequency=1)
    with pytest.raises(GptwoError, match="whole-word tokens"):
        PromptMaker(tokenizer)


# ---------------------------------------------------------------------------------------------- the numbers
def _completion(sent: float, times: list[float], tokens: int | None = None, error: str | None = None) -> Completion:
    return Completion(tokens=len(times) if tokens is None else tokens, sent=sent, times=times, error=error)


def test_burst_and_percentiles_on_fake_completions():
    results = [_completion(0.0, [0.1 * (i + 1), 1.0], tokens=10) for i in range(9)]
    results.append(_completion(0.0, [], error="HTTP 429 Too Many Requests"))
    summary = burst_summary(results, 2.0)
    assert summary["tokens_per_s"] == pytest.approx(90 / 2.0)  # the failed request's tokens do not count
    assert summary["ttft_p50_s"] == pytest.approx(0.5) and summary["ttft_p90_s"] == pytest.approx(0.9)
    assert summary["failed"] == 1 and summary["errors"] == ["HTTP 429 Too Many Requests"]
    assert percentile([3, 1, 2, 4], 0.5) == 2 and percentile([3, 1, 2, 4], 1.0) == 4 and percentile([], 0.9) is None


def test_join_summary_takes_the_gap_over_the_joiners_wait():
    ticks = [i * 0.010 for i in range(21)]  # a chunk every 10 ms up to 0.2 s ...
    stall = [t if t < 0.205 else t + 0.040 for t in ticks + [0.21, 0.22, 0.23]]  # ... then one 50 ms gap
    streams = [_completion(0.0, stall), _completion(0.0, ticks)]
    joined = _completion(0.2, [0.26, 0.27])
    summary = join_summary(streams, joined, sent=0.2)
    assert summary["gap_p50_ms"] == pytest.approx(10.0)
    assert summary["join_gap_max_ms"] == pytest.approx(50.0)
    assert summary["stall_ratio"] == pytest.approx(5.0)
    assert summary["join_ttft_s"] == pytest.approx(0.06) and summary["failed"] == 0
    failed = join_summary(streams, _completion(0.2, [], error="HTTP 400 Bad Request"), sent=0.2)
    assert failed["failed"] == 1 and failed["join_ttft_s"] is None and failed["join_gap_max_ms"] is None


def test_join_gaps_of_two_tokens_are_left_out_where_the_server_counts_them():
    """A token that ends inside a character comes with the next one: its 20 ms chunk gap spans two tokens and is
    no inter-token gap. With the counts (vLLM's continuous usage) it is left out; without them it counts."""
    ticks = [i * 0.010 for i in range(21)]  # a chunk every 10 ms ...
    a = ticks[:5] + ticks[6:] + [0.21, 0.22, 0.23]  # ... but 0.04 .. 0.06 (before the join) holds two tokens
    a_counts = [1, 2, 3, 4, 5] + list(range(7, 7 + len(a) - 5))
    b = ticks + [0.21, 0.23, 0.24]  # 0.21 .. 0.23 (during the join) holds two tokens
    b_counts = list(range(1, 23)) + [24, 25]
    joined = _completion(0.2, [0.26])
    counted = [Completion(sent=0.0, times=a, counts=a_counts), Completion(sent=0.0, times=b, counts=b_counts)]
    summary = join_summary(counted, joined, sent=0.2)
    assert summary["gaps"] == "tokens" and summary["gap_p50_ms"] == pytest.approx(10.0)
    assert summary["join_gap_max_ms"] == pytest.approx(10.0)  # the 20 ms two-token gap is left out
    plain = join_summary([_completion(0.0, a), _completion(0.0, b)], joined, sent=0.2)
    assert plain["gaps"] == "chunks" and plain["join_gap_max_ms"] == pytest.approx(20.0)


def test_kv_summary_compares_blocks_with_tokens_held():
    def sample(running, used, held):
        return {"running": running, "blocks_used": used, "blocks_total": 100, "block_size": 16, "tokens_held": held,
                "cache_bytes": 100 * 16 * 1024}  # fmt: skip

    samples = [sample(0, 0, 0), sample(1, 4, 0), sample(2, 12, 160), sample(1, 3, 40)]
    kv = kv_summary(samples)
    assert kv["kv_samples"] == 3  # an idle sample says nothing
    assert kv["kv_used_over_need"] == pytest.approx(12 * 16 / (160 + 2 * 16))  # at the sample needing most
    assert kv["kv_used_over_need_max"] == pytest.approx(4.0)  # 4 blocks for a prompt not yet held
    assert kv["kv_alloc_over_need"] == pytest.approx(1600 / 192)
    assert kv["kv_alloc_mib"] == pytest.approx(1.5625) and kv["kv_need_mib"] == pytest.approx(192 * 1024 / 2**20)
    assert kv_summary([]) == {}


def test_parse_metrics_reads_prometheus_text():
    text = textwrap.dedent(
        """\
        # HELP gptwo_requests_running Sequences running.
        # TYPE gptwo_requests_running gauge
        gptwo_requests_running{model_name="bench"} 3
        gptwo_kv_blocks_used{model_name="a}b",shard="0"} 7 1700000000000
        gptwo_kv_blocks_used{model_name="c",shard="1"} 5
        gptwo_time_to_first_token_seconds_bucket{model_name="bench",le="0.1"} 2
        gptwo_time_to_first_token_seconds_bucket{model_name="bench",le="+Inf"} 4
        gptwo_time_to_first_token_seconds_sum{model_name="bench"} 1.5e-1
        llamacpp:kv_cache_tokens 7
        not a sample line
        nan_metric NaN

        """
    )
    values = parse_metrics(text)
    assert values['gptwo_requests_running{model_name="bench"}'] == 3
    assert values['gptwo_time_to_first_token_seconds_bucket{model_name="bench",le="+Inf"}'] == 4
    assert metric(values, "gptwo_kv_blocks_used") == 12  # summed over label sets; '}' inside quotes kept
    assert metric(values, "gptwo_time_to_first_token_seconds_sum") == pytest.approx(0.15)
    assert metric(values, "gptwo_time_to_first_token_seconds") is None  # a histogram's series are not its name
    assert metric(values, "llamacpp:kv_cache_tokens") == 7 and metric(values, "gptwo_preemptions_total") is None
    assert "not" not in values and len(values) == 8


# ---------------------------------------------------------------------------------------------- the report
def _target(tool: str, variant: str, weights: str | None = None, **samples) -> Target:
    return Target(tool, variant, weights or variant, server=None, samples=samples)  # type: ignore[arg-type]


def test_rows_take_medians_and_ratios_to_before_and_llama():
    def burst(rate, failed=0):
        return {"tokens_per_s": rate, "ttft_p50_s": 1.0 / rate, "failed": failed, "errors": ["e"] * failed}

    now = _target("gptwo serve", "fp32", mixed=[burst(300), burst(100), burst(200, failed=1)])
    before = _target("gptwo serve (/tmp/old)", "fp32", mixed=[burst(100), burst(100), burst(100)])
    other = _target("gptwo serve", "bf16", mixed=[burst(50)])  # no bf16 before: no ratio
    llama = _target("llama-server", "fp32", "f32", mixed=[burst(400)])
    rows = workload_rows("mixed", [now, other, before, llama], {}, ["/tmp/old"])
    by = {(row["tool"], row["weights"]): row for row in rows}
    assert by[("gptwo serve", "fp32")]["tokens_per_s"] == 200 and by[("gptwo serve", "fp32")]["failed"] == 1
    assert by[("gptwo serve", "fp32")]["errors"] == ["e"]
    assert by[("gptwo serve", "fp32")]["vs_before"] == pytest.approx(2.0)
    assert by[("gptwo serve", "fp32")]["vs_llama"] == pytest.approx(0.5)
    assert by[("gptwo serve", "bf16")]["vs_before"] is None and by[("gptwo serve", "bf16")]["vs_llama"] is None
    assert by[("gptwo serve (/tmp/old)", "fp32")]["vs_before"] is None
    assert by[("gptwo serve (/tmp/old)", "fp32")]["vs_llama"] == pytest.approx(0.25)
    assert by[("llama-server", "f32")]["vs_llama"] is None

    cached = _target("gptwo serve", "fp32", prefix=[{"ttft_p50_s": 0.1, "failed": 0, "errors": []}])
    cached.prefix_caching = True
    cached.twin = _target("gptwo serve", "fp32", prefix=[{"ttft_p50_s": 0.4, "failed": 2, "errors": []}])
    old = _target("gptwo serve (/tmp/old)", "fp32", prefix=[{"ttft_p50_s": 0.5, "failed": 0, "errors": []}])
    (row, old_row) = workload_rows("prefix", [cached, old], {}, ["/tmp/old"])
    assert row["ttft_p50_no_cache_s"] == 0.4 and row["cached_over_uncached"] == pytest.approx(0.25)
    assert row["failed"] == 2 and row["prefix_caching"] and not old_row["prefix_caching"]
    assert row["vs_before"] == pytest.approx(0.2) and old_row["ttft_p50_no_cache_s"] is None

    served = _target("gptwo serve", "fp32", throughput=[burst(300)])
    rows = workload_rows("throughput", [served], {"transformers generate": [100.0, 150.0, 200.0]}, [])
    assert [row["tool"] for row in rows] == ["gptwo serve", "transformers generate"]
    assert rows[0]["vs_transformers"] == pytest.approx(2.0) and rows[1]["vs_transformers"] == pytest.approx(1.0)


def test_render_names_every_workload_and_server():
    mixed = workload_rows("mixed", [_target("gptwo serve", "fp32", mixed=[{"tokens_per_s": 5.0, "failed": 0}])], {}, [])
    join = workload_rows("join", [_target("gptwo serve", "fp32", join=[{"stall_ratio": 2.5, "failed": 1,
                                                                        "errors": ["HTTP 500"]}])], {}, [])  # fmt: skip
    report = {
        "gpu": None, "cpu": "Some CPU", "cpu_flags": ["avx2"], "threads": 2, "model": "m", "rounds": 1,
        "compare_src": ["/tmp/old"], "llama_server": {"binary": "/x/llama-server", "version": "version: 1"},
        "sizes": vars(Sizes()), "notes": ["a note"], "results": {"mixed": mixed, "join": join},
        "servers": {"gptwo serve fp32": {"command": "python -m gptwo.cli serve", "left_out": ["--no-prefix-caching"]}},
    }  # fmt: skip
    text = render_serve(report)
    assert text.startswith("serve: Some CPU (avx2), 2 threads per server; m; medians of 1 interleaved rounds")
    assert "before: gptwo serve (/tmp/old)" in text and "llama-server: /x/llama-server (version: 1)" in text
    assert "\nmixed: 44 x 20-token and 4 x 800-token prompts" in text and "\njoin: 8 streams running" in text
    lines = text.splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("mixed:"))) + 1].split()[:3] == [
        "tool",
        "weights",
        "tokens/s",
    ]
    assert "server gptwo serve fp32: python -m gptwo.cli serve" in text
    assert "left out of gptwo serve fp32 (its tree lacks them): --no-prefix-caching" in text
    assert "note: a note" in text and "errors (join, gptwo serve fp32): HTTP 500" in text


# ---------------------------------------------------------------------------------------------- other trees
OLD_HELP = (
    "usage: gptwo serve [-h] --model MODEL [--port PORT] [--device DEVICE] [--max-batch MAX_BATCH] [--log-level L]"
)


def _old_tree(root) -> str:
    """A gptwo 'source tree' whose `serve --help` lists what the oldest servers took (no --dtype, --max-num-seqs,
    --no-prefix-caching, --max-client-choices)."""
    package = root / "src" / "gptwo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text(f"import sys\nif '--help' in sys.argv:\n    print({OLD_HELP!r})\n")
    return str(root)


def test_options_an_old_tree_lacks_are_left_out(tmp_path):
    tree = _old_tree(tmp_path / "old")
    assert tree_src(tree) == tree_src(os.path.join(tree, "src")) == os.path.join(tree, "src")
    with pytest.raises(GptwoError, match="holds no gptwo source tree"):
        tree_src(str(tmp_path))
    options = help_options([sys.executable, "-m", "gptwo.cli", "serve"], gptwo_env(tree_src(tree), 1), 60)
    assert options == {"--model", "--port", "--device", "--max-batch", "--log-level"}
    assert variant_runs("fp32", options) and not variant_runs("bf16", options) and not variant_runs("int8", options)
    extra = option_groups(["--kv-cache-memory", "0.5", "--max-batched-tokens=256", "--log-level", "info"])
    assert extra == [["--kv-cache-memory", "0.5"], ["--max-batched-tokens", "256"], ["--log-level", "info"]]
    cmd, left_out = gptwo_command("M", "fp32", 8001, "cpu", 48, options, prefix_caching=False, extra=extra)
    assert cmd[cmd.index("--max-batch") + 1] == "48" and cmd[-2:] == ["--log-level", "info"]
    assert not {"--dtype", "--max-num-seqs", "--max-client-choices", "--no-prefix-caching"} & set(cmd)
    assert left_out == ["--no-prefix-caching", "--kv-cache-memory 0.5", "--max-batched-tokens 256"]
    with pytest.raises(GptwoError, match="not an option"):
        option_groups(["0.5"])


def test_this_trees_serve_options_are_detected():
    options = help_options([sys.executable, "-m", "gptwo.cli", "serve"], gptwo_env(None, 1), 120)
    assert {"--model", "--dtype", "--quantize", "--max-client-choices"} <= options
    assert {"--max-batch", "--max-num-seqs"} & options
    cmd, left_out = gptwo_command("M", "int8", 8001, "cpu", 64, options)
    assert cmd[cmd.index("--dtype") + 1] == "fp32" and cmd[cmd.index("--quantize") + 1] == "int8"
    assert cmd[cmd.index("--max-client-choices") + 1] == "0" and left_out == []
    if "--no-prefix-caching" in options:
        assert "--no-prefix-caching" in gptwo_command("M", "fp32", 1, "cpu", 64, options, prefix_caching=False)[0]


FAKE_LLAMA_SERVER = """#!/bin/sh
echo '-np,   --parallel N     number of parallel sequences'
echo '-c,    --ctx-size N     size of the prompt context'
echo '-t,    --threads N      threads'
echo '-m,    --model FNAME    model path'
echo '--host HOST'
echo '--port PORT'
echo '-cb,   --cont-batching  enable continuous batching'
echo '--metrics               enable the Prometheus endpoint'
echo '--slot-save-path PATH   path to save slot kv cache'
"""


def test_llama_server_command_from_its_help(tmp_path):
    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    binary = build / "bin" / "llama-server"
    binary.write_text(FAKE_LLAMA_SERVER)
    binary.chmod(0o755)
    assert find_llama_server(str(build)) == find_llama_server(str(tmp_path)) == str(binary)
    options = help_options([str(binary)], None, 60)
    cmd = llama_command(str(binary), "m.gguf", 8080, 64, 1024, 2, options, slot_dir="/tmp/slots")
    assert cmd[cmd.index("--parallel") + 1] == "64" and cmd[cmd.index("--ctx-size") + 1] == str(64 * 1024)
    assert cmd[cmd.index("--slot-save-path") + 1] == "/tmp/slots"
    assert {"--cont-batching", "--metrics"} <= set(cmd) and "--threads-batch" not in cmd  # not in its help
    with pytest.raises(GptwoError, match="lacks --parallel"):
        llama_command(str(binary), "m.gguf", 8080, 64, 1024, 2, options - {"--parallel"})
    with pytest.raises(GptwoError, match="no llama-server binary"):
        find_llama_server(str(tmp_path / "nowhere"))


def test_events_of_both_servers_are_read():
    out = Completion(sent=0.0)
    take_event(b'data: {"choices": [{"text": "Hi", "index": 0}]}', out)
    take_event(b'data: {"choices": [{"text": "", "index": 0}]}', out)  # a held-back token: no text, no time
    final = b'data: {"choices": [{"text": "", "finish_reason": "length"}], "usage": {"completion_tokens": 5}}'
    take_event(final, out)  # llama-server's last chunk carries usage beside an empty choice
    take_event(b"data: [DONE]", out)
    assert (out.text, out.tokens, len(out.times), out.finished, out.error) == ("Hi", 5, 1, True, None)
    take_event(b'data: {"error": {"message": "generation failed"}}', out)
    assert out.error == "generation failed"
    take_event(b'error: {"code": 500, "message": "slot unavailable"}', out)  # llama-server's error event
    assert out.error == '{"code": 500, "message": "slot unavailable"}'
    counted = Completion(sent=0.0)  # continuous usage: each text chunk's count of tokens so far
    for text, count in (("Hi", 1), ("", 2), (" there", 3)):
        chunk = {"choices": [{"text": text, "index": 0}], "usage": {"completion_tokens": count}}
        take_event(b"data: " + json.dumps(chunk).encode(), counted)
    assert counted.counts == [1, 3] and len(counted.times) == 2 and counted.tokens == 3


# ---------------------------------------------------------------------------------------------- live servers
def test_stream_completion_reads_a_live_server_like_the_openai_client(tiny_dir, maker):
    """The bench's stdlib client reads the same greedy text and token count as the official `openai` client."""
    from openai import OpenAI
    from serve_testing import LiveServer

    from gptwo.serve import BatchEngine, create_app
    from gptwo.weights import load_model

    model, tokenizer = load_model(tiny_dir, device="cpu")
    server = LiveServer(create_app(BatchEngine(model, tokenizer), "bench"))
    try:
        request = Request(maker.make(12, "openai"), 8)
        ours = asyncio.run(stream_completion(("127.0.0.1", server.port), request, temperature=0.0))
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        chunks = list(
            client.completions.create(
                model="bench",
                prompt=request.prompt,
                max_tokens=8,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert ours.error is None and ours.finished and ours.ttft is not None and ours.ttft > 0
        assert ours.tokens == chunks[-1].usage.completion_tokens == 8
        assert ours.text == "".join(c.choices[0].text for c in chunks if c.choices) != ""
        assert len(ours.times) == sum(1 for c in chunks if c.choices and c.choices[0].text)
        too_long = Request(request.prompt, 10**6)  # more tokens than the context: HTTP 400
        refused = asyncio.run(stream_completion(("127.0.0.1", server.port), too_long))
        assert refused.error is not None and refused.error.startswith("HTTP 400")
    finally:
        server.close()


def test_a_tiny_run_of_every_workload_against_this_trees_server(tiny_dir):
    report = serve_report(
        tiny_dir, device="cpu", variants=("fp32",), rounds=1, threads=1, sizes=TINY, progress=False, timeout=120
    )
    assert report["bench"] == "serve" and report["workloads"] == ["mixed", "join", "prefix", "throughput"]
    assert report["model_shape"] == {"n_layer": 2, "n_embd": 32, "context": 256} and report["llama_server"] is None
    caching = "--no-prefix-caching" in help_options([sys.executable, "-m", "gptwo.cli", "serve"], None, 120)
    assert set(report["servers"]) == {"gptwo serve fp32"} | (
        {"gptwo serve fp32 --no-prefix-caching"} if caching else set()
    )
    results = report["results"]
    mixed, join, prefix = results["mixed"][0], results["join"][0], results["prefix"][0]
    assert all(row["failed"] == 0 for rows in results.values() for row in rows), results
    assert mixed["tokens_per_s"] > 0 and 0 < mixed["ttft_p50_s"] <= mixed["ttft_p90_s"]
    assert join["gap_p50_ms"] > 0 and join["join_gap_max_ms"] > 0 and join["join_ttft_s"] > 0
    assert join["stall_ratio"] == pytest.approx(join["join_gap_max_ms"] / join["gap_p50_ms"])
    assert join["gaps"] == "tokens"  # this tree's server counts each chunk's tokens (continuous usage)
    assert prefix["ttft_p50_s"] > 0 and prefix["prefix_caching"] == caching
    assert (prefix["ttft_p50_no_cache_s"] is not None) == caching
    tools = [row["tool"] for row in results["throughput"]]
    assert tools[0] == "gptwo serve" and "transformers generate" in tools
    assert results["throughput"][0]["single_client_tokens_per_s"] > 0
    assert "\nthroughput: 3 clients x 8-token prompts x 4 tokens" in render_serve(report)


def test_bench_serve_refuses_bad_input(tiny_dir):
    bad = subprocess.run(
        [sys.executable, "-m", "gptwo.cli", "bench", "serve", "--workload", "mixed,chat"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: argument --workload: unknown 'chat'")
    with pytest.raises(GptwoError, match="need 908 tokens of context; .* has 256"):
        serve_report(tiny_dir, device="cpu", variants=("fp32",), progress=False)
    with pytest.raises(GptwoError, match="no llama-server binary"):
        serve_report(tiny_dir, device="cpu", llama_server=REPO, sizes=TINY, progress=False)
