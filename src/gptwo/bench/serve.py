"""`gptwo bench serve`: aggregate tokens/s of `gptwo serve` under N concurrent streaming clients, against transformers.

Each server variant (fp32, bf16, int8 weights) runs as its own `gptwo serve` subprocess on a free
loopback port. One round sends N streamed completions at once (one per client, `tokens` tokens each,
temperature 1) to each server in turn, then runs the same N prompts x `tokens` through transformers
in this process: plain `generate` on all N left-padded prompts at once, and transformers' continuous
batching (`generate_batch`) where it works. Rounds interleave; each row's median counts. The faster
transformers row is the anchor of the ratios. Each server also streams one request alone per round
(the single-client rate). The clients speak HTTP/1.1 + server-sent events over asyncio (stdlib only).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from gptwo.bench import DEFAULT_TIMEOUT_S, MAX_THREADS, cpu_flags, cpu_name, render_table, tool_timeout
from gptwo.errors import GptwoError

VARIANTS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("fp32", "int8")}  # name -> (--dtype, --quantize)
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
COLUMNS = [
    ("tool", "tool", ""),
    ("dtype", "weights", ""),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("ratio", "vs anchor", ".2f"),
    ("ttft_p50_s", "TTFT p50 s", ".2f"),
    ("ttft_p99_s", "TTFT p99 s", ".2f"),
    ("failed", "failed", "d"),
    ("single_client_tokens_per_s", "1 client tok/s", ".1f"),
]


def client_prompts(clients: int) -> list[str]:
    """Each client's prompt: the list above in turn, numbered so that no two are equal (the server runs equal prompts
    once)."""
    return [f"{i + 1}. {PROMPTS[i % len(PROMPTS)]}" for i in range(clients)]


# ---------------------------------------------------------------------------------------------- the clients
@dataclass
class Completion:
    """What one streamed request got: tokens (from the usage chunk), its text, time to first text, or an error."""

    tokens: int = 0
    text: str = ""
    ttft: float | None = None
    error: str | None = None


async def _read_body(reader: asyncio.StreamReader, chunked: bool):
    """The response body's pieces as they arrive (chunked transfer encoding or read-until-close)."""
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def stream_completion(host: str, port: int, prompt: str, tokens: int, temperature: float = 1.0) -> Completion:
    """POST one streamed /v1/completions request; read its server-sent events to the end."""
    body = json.dumps(
        {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    started, out, finished = time.perf_counter(), Completion(), False
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as err:
        return Completion(error=f"connect: {err}")
    try:
        writer.write(head + body)
        status = (await reader.readline()).decode("latin-1").split()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if len(status) < 2 or status[1] != "200":
            return Completion(
                error=f"HTTP {' '.join(status[1:]) or 'no status'}: {(await reader.read(300)).decode(errors='replace')}"
            )
        buffer = b""
        async for piece in _read_body(reader, headers.get("transfer-encoding") == "chunked"):
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ").strip()
                if data == b"[DONE]":
                    finished = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = str(chunk["error"].get("message", chunk["error"]))
                for choice in chunk.get("choices") or []:
                    if out.ttft is None and choice.get("text"):
                        out.ttft = time.perf_counter() - started
                    out.text += choice.get("text") or ""
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
    except (OSError, asyncio.IncompleteReadError, ValueError) as err:
        return Completion(error=f"{type(err).__name__}: {err}")
    finally:
        writer.close()
    if not finished and out.error is None:
        out.error = "the stream ended without [DONE]"
    return out


async def _bounded(request, timeout: float) -> Completion:
    try:
        return await asyncio.wait_for(request, timeout)
    except TimeoutError:
        return Completion(error=f"no complete answer within {timeout:g} s (--timeout)")


async def _burst(
    host: str, port: int, prompts: list[str], tokens: int, timeout: float
) -> tuple[list[Completion], float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(_bounded(stream_completion(host, port, p, tokens), timeout) for p in prompts))
    return list(results), time.perf_counter() - started


def burst(url: tuple[str, int], prompts: list[str], tokens: int, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """All `prompts` streamed at once: tokens/s in all (wall clock from first send to last byte), TTFT, failures.
    A request without its whole answer after `timeout` seconds counts as failed."""
    results, seconds = asyncio.run(_burst(*url, prompts, tokens, timeout))
    ok = [r for r in results if r.error is None]
    ttft = sorted(r.ttft for r in ok if r.ttft is not None)
    return {
        "tokens_per_s": sum(r.tokens for r in ok) / seconds,
        "seconds": seconds,
        "failed": len(results) - len(ok),
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
        "errors": [r.error for r in results if r.error][:3],
    }


# ---------------------------------------------------------------------------------------------- the servers
def free_port() -> int:
    """A TCP port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """One `gptwo serve` subprocess: the rows it stands for and its address."""

    tool: str
    variant: str
    proc: subprocess.Popen
    port: int
    samples: list[dict] = field(default_factory=list)
    single: list[float] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(
    model_dir: str,
    variant: str,
    device: str,
    threads: int,
    max_batch: int,
    log: str,
    src: str | None = None,
    tool: str = "gptwo serve",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Server:
    """Start `gptwo serve` (from `src`, another checkout's src folder, if given; its stderr to `log`) and wait until
    /health answers."""
    dtype, quantize = VARIANTS[variant]
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gptwo.cli",
        "serve",
        "--model",
        model_dir,
        "--served-model-name",
        "bench",
        "--port",
        str(port),
        "--device",
        device,
        "--max-batch",
        str(max_batch),
        "--log-level",
        "warning",
    ]
    package = (
        os.path.join(os.path.abspath(src), "gptwo")
        if src
        else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    options = ""  # the serve command's options live in serve/cli.py (older trees: cli.py)
    for where in (os.path.join(package, "serve", "cli.py"), os.path.join(package, "cli.py")):
        if os.path.exists(where):
            with open(where, encoding="utf-8") as f:
                options += f.read()
    if dtype != "fp32" or '"--dtype"' in options:  # (older trees have no --dtype: fp32 was all they did)
        cmd += ["--dtype", dtype]
    if '"--max-client-choices"' in options:  # every bench client comes from 127.0.0.1: one address, no per-client cap
        cmd += ["--max-client-choices", "0"]
    cmd += ["--quantize", quantize] if quantize else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if src:
        env["PYTHONPATH"] = os.path.abspath(src)
    with open(log, "w", encoding="utf-8") as err:  # a file, not a pipe: a pipe nobody reads would stall a chatty server
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    server = Server(tool, variant, proc, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log, encoding="utf-8", errors="replace") as f:
                raise GptwoError(
                    f"the {variant} server exited with {proc.returncode}: {f.read().strip()[-300:]}",
                    "run that `gptwo serve` by hand to see why",
                )
        try:
            server.health()
            return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise GptwoError(
        f"the {variant} server did not answer within {timeout:g} s",
        "check the machine's load, pass a smaller --model, or allow longer with --timeout",
    )


# ---------------------------------------------------------------------------------------------- the anchors
def hf_prompts(tokenizer, clients: int) -> list[list[int]]:
    """The clients' prompts as token ids (what the server sees)."""
    return [tokenizer.encode(p) for p in client_prompts(clients)]


def hf_generate_run(hf, prompts: list[list[int]], tokens: int, pad: int):
    """transformers' `generate` on all prompts at once, left-padded, sampling `tokens` tokens each at temperature 1."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run() -> int:
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            pad_token_id=pad,
        )
        return (out.shape[1] - width) * len(prompts)

    return run


def hf_batch_run(hf, prompts: list[list[int]], tokens: int, page: int = 64):
    """transformers' continuous batching (`generate_batch`), its paged cache sized for this workload (auto-sizing is
    slow on CPU)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    blocks = len(prompts) * -(-(max(map(len, prompts)) + tokens) // page) + 4
    config = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=blocks,
        max_batch_tokens=max(sum(map(len, prompts)), len(prompts)),
        max_requests_per_batch=len(prompts),
    )
    generation = GenerationConfig(
        max_new_tokens=tokens, do_sample=True, temperature=1.0, top_k=0, eos_token_id=-1, pad_token_id=0
    )

    def run() -> int:
        out = hf.generate_batch(
            prompts,
            generation_config=generation,
            continuous_batching_config=config,
            max_new_tokens=tokens,
            warmup=False,
        )
        if len(out) != len(prompts):
            raise RuntimeError(f"generate_batch returned {len(out)} of {len(prompts)} results")
        return sum(len(o.generated_tokens) for o in out.values())

    return run


def fast_gelu(hf):
    """transformers at its best: GPT-2's tanh GELU as torch's fused kernel (`gelu_pytorch_tanh`), not the default
    `gelu_new` in Python ops."""
    from transformers.activations import ACT2FN

    for block in hf.transformer.h:
        block.mlp.act = ACT2FN["gelu_pytorch_tanh"]
    hf.config.activation_function = "gelu_pytorch_tanh"
    return hf


def hf_anchors(model_dir: str, clients: int, tokens: int, device: str, progress: bool) -> tuple[dict, list[str]]:
    """The transformers runs that work here (name -> function returning tokens made), and notes on those that do not.

    Each is tried first on a few prompts and tokens (a warm-up that also catches an anchor that does not run here).
    """
    from gptwo.bench.decode import hf_twin
    from gptwo.weights import load_model

    model, tokenizer = load_model(model_dir, device=device)
    prompts = hf_prompts(tokenizer, clients)
    plain, batching = (
        fast_gelu(hf_twin(model)),
        fast_gelu(hf_twin(model)),
    )  # own copies: continuous batching switches the attention to a paged kind
    del model
    few, short = prompts[:4], min(tokens, 4)
    makers = {"transformers generate": lambda p, t: hf_generate_run(plain, p, t, tokenizer.eot_token)}
    if hasattr(batching, "generate_batch"):
        makers["transformers generate_batch"] = lambda p, t: hf_batch_run(batching, p, t)
    runs, notes = {}, []
    for name, make in makers.items():  # warm-up: a run that fails here is left out, with the reason
        if progress:
            print(f"warming up {name}", file=sys.stderr)
        try:
            with torch.no_grad():
                made = make(few, short)()
            if made < len(few) * short:
                raise RuntimeError(f"made {made} of {len(few) * short} tokens")
            runs[name] = make(prompts, tokens)
        except Exception as err:  # noqa: BLE001 - an anchor that does not run on this device is reported, not fatal
            notes.append(f"{name} left out: {type(err).__name__}: {str(err)[:200]}")
    if not runs:
        raise GptwoError("no transformers anchor ran", "; ".join(notes))
    return runs, notes


# ---------------------------------------------------------------------------------------------- the benchmark
def bench_model_dir(spec: str | None, directory: str) -> str:
    """The model the servers load: `spec`, or GPT-2 124M's shape with random weights and GPT-2's tokenizer saved in
    `directory`."""
    if spec:
        from gptwo.weights import resolve_model_dir

        return resolve_model_dir(spec)
    from gptwo.bench.decode import bench_model
    from gptwo.tokenizer import Tokenizer
    from gptwo.weights import save_pretrained

    save_pretrained(bench_model(None, torch.device("cpu")), directory, tokenizer=Tokenizer.gpt2())
    return directory


def serve_report(
    model: str | None = None,
    device: str = "auto",
    clients: int = 64,
    tokens: int = 32,
    variants: tuple[str, ...] = ("fp32", "bf16", "int8"),
    rounds: int = 3,
    threads: int | None = None,
    compare_src: Seq[str] = (),
    progress: bool = True,
    timeout: float | None = None,
) -> dict:
    """Median aggregate tokens/s of each server variant and of transformers on the same prompts, interleaved rounds."""
    from gptwo.weights import resolve_device

    for name in variants:
        if name not in VARIANTS:
            raise GptwoError(f"unknown variant '{name}'", f"use some of {', '.join(VARIANTS)}")
    if not variants:
        raise GptwoError("no variants to time", f"pass --variants with some of {', '.join(VARIANTS)}")
    if min(clients, tokens, rounds) < 1:
        raise GptwoError("clients, tokens and rounds must be at least 1", "pass positive numbers")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise GptwoError(f"--threads {threads} is not in 1..{MAX_THREADS}", "use e.g. the number of cores")
    timeout = tool_timeout(timeout)
    for src in compare_src:
        if not os.path.isfile(os.path.join(src, "gptwo", "cli.py")):
            raise GptwoError(
                f"{src} holds no gptwo package",
                "pass the src folder of a gptwo checkout (the one holding gptwo/cli.py)",
            )
    dev = resolve_device(device)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if threading.current_thread() is threading.main_thread():  # a SIGTERM (e.g. `timeout`) still stops the servers
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="gptwo-bench-serve-")
    servers: list[Server] = []
    try:
        model_dir = bench_model_dir(model, os.path.join(tmp, "model"))
        for name in variants:
            if progress:
                print(f"starting the {name} server", file=sys.stderr)
            log = os.path.join(tmp, f"{name}.log")
            servers.append(start_server(model_dir, name, str(dev), threads, clients, log, timeout=timeout))
        for i, src in enumerate(compare_src):
            servers.append(
                start_server(
                    model_dir,
                    "fp32",
                    str(dev),
                    threads,
                    clients,
                    os.path.join(tmp, f"compare{i}.log"),
                    src=src,
                    tool=f"gptwo serve ({src})",
                    timeout=timeout,
                )
            )
        anchors, notes = hf_anchors(model_dir, clients, tokens, str(dev), progress)
        anchor_s: dict[str, list[float]] = {name: [] for name in anchors}
        prompts = client_prompts(clients)
        for server in servers:  # warm-up: the first requests pay for lazy set-up
            burst(server.address, prompts[: min(4, clients)], min(tokens, 4), timeout)
        for r in range(rounds):
            if progress:
                print(f"round {r + 1} of {rounds}", file=sys.stderr)
            for server in servers:
                server.samples.append(burst(server.address, prompts, tokens, timeout))
                alone = burst(server.address, prompts[:1], tokens, timeout)
                server.single.append(alone["tokens_per_s"] if not alone["failed"] else 0.0)
                if progress:
                    print(
                        f"  {server.tool} {server.variant}: {server.samples[-1]['tokens_per_s']:.1f} tokens/s, "
                        f"{server.samples[-1]['failed']} failed",
                        file=sys.stderr,
                    )
            for name, run in anchors.items():
                started = time.perf_counter()
                with torch.no_grad():
                    made = run()
                anchor_s[name].append(made / (time.perf_counter() - started))
                if progress:
                    print(f"  {name}: {anchor_s[name][-1]:.1f} tokens/s", file=sys.stderr)
        health = {f"{s.tool} {s.variant}": s.health() for s in servers}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return _report(
        servers,
        anchor_s,
        notes,
        health,
        model=model,
        dev=dev,
        threads=threads,
        clients=clients,
        tokens=tokens,
        rounds=rounds,
    )


def _report(
    servers: list[Server],
    anchor_rates: dict[str, list[float]],
    notes: list[str],
    health: dict,
    *,
    model,
    dev,
    threads,
    clients,
    tokens,
    rounds,
) -> dict:
    """The JSON-able report: one row per server variant and per transformers run, ratios against the faster transformers
    run."""
    rows = [
        {
            "tool": name,
            "dtype": "fp32",
            "tokens_per_s": statistics.median(rates),
            "ttft_p50_s": None,
            "ttft_p99_s": None,
            "failed": 0,
            "single_client_tokens_per_s": None,
        }
        for name, rates in anchor_rates.items()
    ]
    anchor = max(rows, key=lambda row: row["tokens_per_s"])
    for server in servers:

        def median(key: str, samples=server.samples):
            values = [s[key] for s in samples if s[key] is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "tool": server.tool,
                "dtype": server.variant,
                "tokens_per_s": median("tokens_per_s"),
                "ttft_p50_s": median("ttft_p50_s"),
                "ttft_p99_s": median("ttft_p99_s"),
                "failed": sum(s["failed"] for s in server.samples),
                "single_client_tokens_per_s": statistics.median(server.single),
                "errors": [e for s in server.samples for e in s["errors"]][:3],
            }
        )
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / anchor["tokens_per_s"]
    return {
        "bench": "serve",
        "device": str(dev),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "model": model or "random GPT-2 124M shape",
        "clients": clients,
        "tokens": tokens,
        "rounds": rounds,
        "anchor": anchor["tool"],
        "notes": notes,
        "servers": {
            name: {key: h.get(key) for key in ("dtype", "quantize", "peak_batch", "failed")}
            for name, h in health.items()
        },
        "rows": rows,
    }


def render_serve(report: dict) -> str:
    """The report as a table under a line naming the machine and the workload."""
    where = (
        report["gpu"]
        or f"{report['cpu']} ({', '.join(report['cpu_flags']) or 'no AVX-512'}), {report['threads']} threads"
    )
    head = (
        f"serve: {where}; {report['clients']} streaming clients x {report['tokens']} tokens (temperature 1), median of "
        f"{report['rounds']} "
        f"interleaved rounds; anchor: {report['anchor']} (fp32, same prompts)"
    )
    lines = [head, render_table(report["rows"], COLUMNS)]
    lines += [f"note: {note}" for note in report["notes"]]
    lines += [
        f"errors ({row['tool']} {row['dtype']}): {'; '.join(row['errors'])}"
        for row in report["rows"]
        if row.get("errors")
    ]
    return "\n".join(lines)
