"""Stop-string cost: can one request with long stop strings stall everyone else?

Starts `gptwo serve` on a small random GPT-2 (as `gptwo bench serve` does), measures a short greedy
request alone, then sends one "heavy" request with long stop strings that never match and, while
it runs, short requests one after another. Reports the heavy request's status and time and the
short requests' latency during it. `--before-src DIR` also runs the same against another source
tree (e.g. `git archive <commit> src | tar -x -C /tmp/before`) in the same run, for a before/after
table. Writes experiments/results/serve_stop.json.

    python experiments/serve_stop.py --before-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from gptwo.bench.serve import free_port
from gptwo.fileio import atomic_write

CASES = [("3 x 300 KB", 3, 300_000), ("16 x 1024 chars", 16, 1024)]


def small_model(directory: str, n_layer: int, n_embd: int) -> None:
    """A random GPT-2-shaped model with GPT-2's tokenizer: the cost measured does not depend on the weights."""
    import torch

    from gptwo import GPT, GPTConfig, Tokenizer
    from gptwo.weights import save_pretrained

    torch.manual_seed(0)
    config = GPTConfig(n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd)
    save_pretrained(GPT(config), directory, tokenizer=Tokenizer.gpt2())


def start_server(model: str, port: int, args) -> subprocess.Popen:
    """`gptwo serve` of whichever gptwo PYTHONPATH finds, on `port`, once /health answers."""
    cmd = [sys.executable, "-m", "gptwo.cli", "serve", "--model", model, "--served-model-name", "bench"]
    cmd += ["--port", str(port), "--device", args.device, "--max-batch", str(args.max_batch), "--log-level", "warning"]
    if args.dtype != "auto":  # (so it also runs against older trees, which have no --dtype)
        cmd += ["--dtype", args.dtype]
    threads = str(args.server_threads or max(1, (os.cpu_count() or 2) - 1))
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": threads})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with {proc.returncode} — run `{' '.join(cmd)}` to see why")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("error: the server did not answer /health within 300 s — run it by hand to see why")


def post(url: str, body: dict, timeout: float = 900) -> tuple[int, float]:
    """(HTTP status, seconds) of one completions request."""
    started = time.monotonic()
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        err.read()
        status = err.code
    return status, time.monotonic() - started


def short(url: str, tokens: int) -> tuple[int, float]:
    return post(url, {"model": "bench", "prompt": "The quick brown fox", "max_tokens": tokens, "temperature": 0})


def case(url: str, count: int, chars: int, heavy_tokens: int, short_tokens: int) -> dict:
    """One heavy request with `count` stop strings of `chars` characters, and short requests beside it."""
    rng = random.Random(0)
    stops = ["".join(rng.choice(string.ascii_letters) for _ in range(chars)) for _ in range(count)]
    heavy: dict = {}

    def run_heavy():
        heavy["status"], heavy["seconds"] = post(
            url,
            {
                "model": "bench",
                "prompt": "Once upon a time",
                "max_tokens": heavy_tokens,
                "temperature": 0,
                "stop": stops,
            },
        )

    thread = threading.Thread(target=run_heavy)
    thread.start()
    time.sleep(0.3)
    beside = []
    while thread.is_alive() or len(beside) < 3:
        beside.append(short(url, short_tokens)[1])
    thread.join()
    return {
        "heavy_status": heavy["status"],
        "heavy_seconds": round(heavy["seconds"], 3),
        "short_requests": len(beside),
        "short_p50_s": round(statistics.median(beside), 3),
        "short_max_s": round(max(beside), 3),
    }


def measure(model: str, src: str | None, args) -> dict:
    """Start a server from source tree `src` (None: this one) and run every case against it."""
    saved = os.environ.get("PYTHONPATH")
    if src:
        os.environ["PYTHONPATH"] = os.path.abspath(src)
    port = free_port()
    try:
        server = start_server(model, port, args)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(3):
            short(url, args.short_tokens)  # warm-up
        alone = [short(url, args.short_tokens)[1] for _ in range(7)]
        cases = {name: case(url, count, chars, args.heavy_tokens, args.short_tokens) for name, count, chars in CASES}
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"short_alone_p50_s": round(statistics.median(alone), 4), "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before-src", default=None, help="another source tree's src/ to measure too (the 'before')")
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the random model (default 4)")
    parser.add_argument("--n-embd", type=int, default=256, help="width of the random model (default 256)")
    parser.add_argument(
        "--heavy-tokens", type=int, default=16, help="max_tokens of the request with long stop strings (default 16)"
    )
    parser.add_argument("--short-tokens", type=int, default=8, help="max_tokens of the short requests (default 8)")
    parser.add_argument("--device", default="cpu", help="server device (default cpu)")
    parser.add_argument("--dtype", default="auto", help="server --dtype (default auto)")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch (default 32)")
    parser.add_argument(
        "--server-threads", type=int, default=None, help="torch threads of the server (default: CPU count - 1)"
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serve_stop.json"),
        help="JSON output path (default experiments/results/serve_stop.json)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "small")
        small_model(model, args.n_layer, args.n_embd)
        runs = {"after (this tree)": measure(model, None, args)}
        if args.before_src:
            runs["before"] = measure(model, args.before_src, args)

    print(
        f"\nrandom GPT-2 n_layer={args.n_layer} n_embd={args.n_embd}; heavy request max_tokens={args.heavy_tokens}, "
        f"short requests max_tokens={args.short_tokens}"
    )
    print(
        f"{'code':<18} {'stop strings':<16} {'heavy status':>12} {'heavy s':>9} {'short alone':>11} "
        f"{'short p50 beside':>16} {'short max beside':>16}"
    )
    for label, run in runs.items():
        for name, c in run["cases"].items():
            print(
                f"{label:<18} {name:<16} {c['heavy_status']:>12} {c['heavy_seconds']:>9} "
                f"{run['short_alone_p50_s']:>10}s {c['short_p50_s']:>15}s {c['short_max_s']:>15}s"
            )
    atomic_write(
        args.out,
        json.dumps(
            {
                "n_layer": args.n_layer,
                "n_embd": args.n_embd,
                "heavy_tokens": args.heavy_tokens,
                "short_tokens": args.short_tokens,
                "runs": runs,
            },
            indent=2,
        ).encode(),
    )


if __name__ == "__main__":
    main()
