"""Serving benchmark: many concurrent streaming clients against `gptwo serve` on loopback.

Starts the server as a subprocess (a small random GPT-2 unless --model is given), then runs three
phases with the official `openai` async client, each client sending streamed completions back to
back: 1 client (the anchor), 32 clients, and 64 clients for --duration seconds. Reports failed or
dropped requests (must be 0), completion tokens/s, time to first token p50/p99, and the batching
gain (tokens/s at 32 clients / tokens/s at 1 client). Prints a table and writes JSON to
bench/results/serve.json. The server gets OMP_NUM_THREADS = CPU count - 1 (the clients need a core:
oversubscribed OpenMP threads make every small op many times slower).

    python bench/serve.py                      # ~60 s on a laptop CPU
    python bench/serve.py --model openai-community/gpt2 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

PROMPTS = [
    "In a shocking finding, scientists discovered a herd of unicorns",
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived a",
    "Here is a recipe for",
    "The meaning of life is",
    "Breaking news:",
    "def fibonacci(n):",
    "My favourite book is",
]


def small_model(directory: str, n_layer: int, n_embd: int) -> None:
    """A random GPT-2-shaped model with GPT-2's tokenizer: speed does not depend on the weights."""
    import torch

    from gptwo import GPT, GPTConfig, Tokenizer
    from gptwo.weights import save_pretrained

    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd)), directory, tokenizer=Tokenizer.gpt2())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptwo.cli", "serve", "--model", model, "--served-model-name", "bench", "--port", str(port),
           "--device", args.device, "--max-batch", str(args.max_batch), "--log-level", "warning"]
    if args.dtype != "auto":  # (so the bench also runs against older trees, which have no --dtype)
        cmd += ["--dtype", args.dtype]
    threads = str(args.server_threads or max(1, (os.cpu_count() or 2) - 1))
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": threads})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


async def one_client(client, deadline: float, max_tokens: int, rng: random.Random, out: dict) -> None:
    """Send streamed completions until `deadline`; record tokens, time to first token, failures."""
    while time.monotonic() < deadline:
        started, first, finish, tokens = time.monotonic(), None, None, None
        try:
            stream = await client.completions.create(
                model="bench", prompt=rng.choice(PROMPTS), max_tokens=max_tokens, temperature=1.0,
                stream=True, stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.choices:
                    if first is None and chunk.choices[0].text:
                        first = time.monotonic() - started
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the benchmark
            out["errors"].append(f"{type(err).__name__}: {err}")
            await asyncio.sleep(0.1)
            continue
        if finish is None or tokens is None:
            out["dropped"] += 1
            continue
        out["requests"] += 1
        out["tokens"] += tokens
        out["ttft"].append(first if first is not None else time.monotonic() - started)
        out["latency"].append(time.monotonic() - started)


async def phase(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    out = {"requests": 0, "tokens": 0, "dropped": 0, "errors": [], "ttft": [], "latency": []}
    started = time.monotonic()
    await asyncio.gather(*(one_client(client, started + seconds, max_tokens, random.Random(i), out) for i in range(clients)))
    elapsed = time.monotonic() - started
    await client.close()
    ttft = sorted(out["ttft"]) or [float("nan")]
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": out["requests"],
        "failed": len(out["errors"]),
        "dropped": out["dropped"],
        "tokens": out["tokens"],
        "tokens_per_s": round(out["tokens"] / elapsed, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_p99_ms": round(1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1),
        "latency_p50_s": round(statistics.median(out["latency"] or [float("nan")]), 3),
        "first_errors": out["errors"][:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder or hub id (default: a small random GPT-2 written to a temp folder)")
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the default random model (default 4)")
    parser.add_argument("--n-embd", type=int, default=256, help="width of the default random model (default 256)")
    parser.add_argument("--device", default="auto", help="device for the server (default auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="server --dtype (default auto)")
    parser.add_argument("--clients", type=int, default=64, help="clients in the main phase (default 64)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of the main phase (default 30)")
    parser.add_argument("--anchor-duration", type=float, default=10.0, help="seconds of the 1- and 32-client phases (default 10)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--max-batch", type=int, default=64, help="server --max-batch (default 64)")
    parser.add_argument("--server-threads", type=int, default=None, help="torch threads of the server (default: CPU count - 1, leaving a core for the clients)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serve.json"), help="JSON output path")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "small")
            small_model(model, args.n_layer, args.n_embd)
        port = free_port()
        server = start_server(model, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(phase(url, 4, 2.0, args.max_tokens))  # warm-up, not reported
            phases = [
                asyncio.run(phase(url, 1, args.anchor_duration, args.max_tokens)),
                asyncio.run(phase(url, 32, args.anchor_duration, args.max_tokens)),
                asyncio.run(phase(url, args.clients, args.duration, args.max_tokens)),
            ]
            health = json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
        finally:
            server.terminate()
            server.wait(timeout=30)

    gain = phases[1]["tokens_per_s"] / max(phases[0]["tokens_per_s"], 1e-9)
    header = f"{'clients':>7} {'seconds':>7} {'requests':>8} {'failed':>6} {'dropped':>7} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9}"
    print(f"\ngptwo serve, model={args.model or f'random GPT-2 n_layer={args.n_layer} n_embd={args.n_embd}'}, dtype={args.dtype}, max_tokens={args.max_tokens}, max_batch={args.max_batch}")
    print(header)
    for p in phases:
        print(f"{p['clients']:>7} {p['seconds']:>7} {p['requests']:>8} {p['failed']:>6} {p['dropped']:>7} {p['tokens']:>7} {p['tokens_per_s']:>8} {p['ttft_p50_ms']:>7}ms {p['ttft_p99_ms']:>7}ms")
    print(f"batching gain: {gain:.1f}x tokens/s at 32 clients vs 1 client; peak batch {health['peak_batch']}")
    result = {"model": args.model or {"n_layer": args.n_layer, "n_embd": args.n_embd}, "device": args.device, "dtype": args.dtype, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "phases": phases, "gain_32_vs_1": round(gain, 2), "server": health}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    if any(p["failed"] or p["dropped"] for p in phases):
        raise SystemExit("some requests failed or were dropped")


if __name__ == "__main__":
    main()
