"""`gptwo bench serve`: issue 22's serving workloads on `gptwo serve`, on the code before, and on llama-server.

Every server is its own subprocess on a free loopback port (all start side by side, then idle while
another is measured), all on the same model: `gptwo serve` at each
precision (fp32, bf16, int8 weight-only), the same from other gptwo source trees (`--compare-src`, e.g. the
commit before a change: PYTHONPATH=DIR/src, this Python), and llama.cpp's llama-server (`--llama-server`:
continuous batching, one slot per client, each slot the model's whole context) on GGUF files of the same
weights at f32, bf16 and q8_0. Each round runs every workload (serve_workloads.py) on every server in turn,
with prompts new to that round; a row's numbers are medians over rounds. An option that a tree's
`gptwo serve --help` does not list is not passed to it (older trees lack `--max-num-seqs`,
`--no-prefix-caching`, ...). The prefix workload also runs on a twin of each server with prefix caching
off (`--no-prefix-caching`; llama-server: `cache_prompt: false` in the requests). The throughput workload
also times transformers' batched generate in this process on the same prompts, as the other bench commands
anchor on transformers. The bench measures and reports; it asserts nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass, field

import torch

from gptwo.bench import MAX_THREADS, cpu_flags, cpu_name, render_table, run_tool, tool_timeout
from gptwo.bench.serve_workloads import (
    CONTINUOUS_USAGE,
    WORKLOADS,
    PromptMaker,
    Request,
    Sizes,
    burst_summary,
    fetch_text,
    join_requests,
    join_summary,
    kv_summary,
    metric,
    mixed_requests,
    parse_metrics,
    prefix_requests,
    prefix_summary,
    run_burst,
    run_join,
    run_prefix,
    stream_completion,
    throughput_requests,
)
from gptwo.errors import GptwoError

VARIANTS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("fp32", "int8")}  # name -> (--dtype, --quantize)
LLAMA_DTYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}  # the GGUF precision beside each of gptwo's
SERVE_SHAPE = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 1024}  # issue 22's bench model
HEADLINE = {"mixed": "tokens_per_s", "join": "stall_ratio", "prefix": "ttft_p50_s", "throughput": "tokens_per_s"}
KV_SAMPLE_S = 0.1  # how often the mixed workload reads /metrics
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


# ---------------------------------------------------------------------------------------------- the model
def save_serve_model(directory: str) -> str:
    """Write the bench's default model (6 layers, width 384, context 1024, GPT-2's vocabulary and tokenizer; random
    weights, seed 0: speed does not depend on them) to `directory`."""
    from gptwo.config import GPTConfig
    from gptwo.model import GPT
    from gptwo.tokenizer import Tokenizer
    from gptwo.weights import save_pretrained

    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(vocab_size=50257, **SERVE_SHAPE)).eval(), directory, tokenizer=Tokenizer.gpt2())
    return directory


# ---------------------------------------------------------------------------------------------- the servers
def free_port(taken: Seq[ServerProcess] = ()) -> int:
    """A TCP port nobody listens on now and no server in `taken` was given (each binds its port a moment later)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in {server.port for server in taken}:
            return port


@dataclass
class ServerProcess:
    """One server subprocess: its name in the report, its command line and port, the options left out of it."""

    label: str
    command: list[str]
    proc: subprocess.Popen
    port: int
    log: str
    left_out: list[str] = field(default_factory=list)
    slots: int = 0  # llama-server's slots, whose prompt caches `erase_slots` drops (0: not llama-server)

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def health(self) -> dict | None:
        """Its /health answer as JSON (None if it is not JSON)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
            try:
                return json.loads(response.read())
            except ValueError:
                return None

    def metrics(self) -> dict[str, float] | None:
        """Its /metrics samples now, None if it has none."""
        text = asyncio.run(fetch_text(self.address, "/metrics"))
        return None if text is None else parse_metrics(text)

    def erase_slots(self) -> None:
        """Drop every llama-server slot's cached prompt (`POST /slots/N?action=erase`, which needs
        `--slot-save-path`): what one workload left in its unified KV cache would otherwise be attended over by the
        next one's every step."""
        for slot in range(self.slots):
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.port}/slots/{slot}?action=erase", b"", method="POST"
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def launch(label: str, command: list[str], env: dict, log: str, port: int) -> ServerProcess:
    """Start a server, its output to `log` (a file, not a pipe, which a chatty server would fill)."""
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return ServerProcess(label, command, proc, port, log)


def wait_ready(servers: Seq[ServerProcess], timeout: float) -> None:
    """Wait until every server answers /health with 200 (they load side by side); one that exits or does not
    answer within `timeout` seconds is a one-line error quoting its log."""
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting:
        server = waiting[0]
        if server.proc.poll() is not None:
            with open(server.log, encoding="utf-8", errors="replace") as f:
                tail = f.read().strip()[-300:]
            raise GptwoError(
                f"{server.label} exited with {server.proc.returncode}: {tail}",
                f"run it by hand to see why: {shlex.join(server.command)}",
            )
        try:
            server.health()
            waiting.pop(0)
            continue
        except (OSError, urllib.error.HTTPError):  # not listening yet, or 503 while it loads
            pass
        if time.monotonic() > deadline:
            raise GptwoError(
                f"{server.label} did not answer /health within {timeout:g} s",
                "check the machine's load, or allow longer with --timeout",
            )
        time.sleep(0.2)


def help_options(command: list[str], env: dict | None, timeout: float) -> frozenset[str]:
    """The long options (`--name`) a program's `--help` lists."""
    done = run_tool(
        [*command, "--help"], timeout, f"{shlex.join(command)} --help", "check the program runs here", env=env
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise GptwoError(f"{shlex.join(command)} --help failed ({last})", "check that the program runs here")
    return frozenset(_OPTION.findall(done.stdout))


def tree_src(tree: str) -> str:
    """The folder to put on PYTHONPATH for a gptwo source tree: TREE/src, or TREE itself if it holds gptwo/."""
    for src in (os.path.join(tree, "src"), tree):
        if os.path.isfile(os.path.join(src, "gptwo", "cli.py")):
            return os.path.abspath(src)
    raise GptwoError(
        f"{tree} holds no gptwo source tree (no src/gptwo/cli.py)",
        "pass a gptwo checkout, e.g. one made with `git worktree add /tmp/before COMMIT`",
    )


def gptwo_env(src: str | None, threads: int) -> dict:
    """The environment of a `gptwo serve`: its torch threads, and the tree's src first on the import path."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if src:
        env["PYTHONPATH"] = src
    return env


def option_groups(args: Seq[str]) -> list[list[str]]:
    """`--serve-args` split into options, each with the values after it (`--kv-cache-memory 0.5` is one group)."""
    groups: list[list[str]] = []
    for arg in args:
        if arg.startswith("--"):
            groups.append([arg.split("=", 1)[0], *arg.split("=", 1)[1:]])
        elif groups:
            groups[-1].append(arg)
        else:
            raise GptwoError(f"--serve-args starts with {arg!r}, not an option", "start it with an option: --name")
    return groups


def gptwo_command(
    model_dir: str,
    variant: str,
    port: int,
    device: str,
    seqs: int,
    options: frozenset[str],
    prefix_caching: bool = True,
    extra: Seq[Seq[str]] = (),
) -> tuple[list[str], list[str]]:
    """The `gptwo serve` command line for a tree whose serve takes `options`, and what was left out because the
    tree lacks it (the caller checks `variant_runs` first)."""
    dtype, quantize = VARIANTS[variant]
    cmd = [sys.executable, "-m", "gptwo.cli", "serve", "--model", model_dir, "--served-model-name", "bench"]
    cmd += ["--port", str(port), "--device", device, "--log-level", "warning"]
    wanted = [
        ["--dtype", dtype],  # (trees without --dtype ran fp32 only)
        ["--quantize", quantize] if quantize else [],
        ["--max-batch", str(seqs)],  # the sequence limit, under either name
        ["--max-num-seqs", str(seqs)],
        ["--max-client-choices", "0"],  # every bench client comes from 127.0.0.1
        [] if prefix_caching else ["--no-prefix-caching"],
        *map(list, extra),
    ]
    quiet = {"--max-batch", "--max-num-seqs", "--max-client-choices", "--dtype"}  # absent in old trees, as expected
    left_out = []
    for group in filter(None, wanted):
        if group[0] in options:
            cmd += group
        elif group[0] not in quiet:
            left_out.append(shlex.join(group))
    if not {"--max-batch", "--max-num-seqs"} & options:
        left_out.append(f"--max-num-seqs {seqs}")
    return cmd, left_out


def variant_runs(variant: str, options: frozenset[str]) -> bool:
    """Whether a tree whose serve takes `options` can serve `variant` (old trees had fp32 only)."""
    dtype, quantize = VARIANTS[variant]
    return (dtype == "fp32" or "--dtype" in options) and (quantize is None or "--quantize" in options)


def find_llama_server(path: str) -> str:
    """The llama-server binary: PATH itself, PATH/bin/llama-server (a build folder) or PATH/build/bin/llama-server."""
    for candidate in (
        path,
        os.path.join(path, "bin", "llama-server"),
        os.path.join(path, "build", "bin", "llama-server"),
    ):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise GptwoError(
        f"no llama-server binary at {path}",
        "pass the llama-server binary or llama.cpp's build folder (experiments/llamacpp.sh builds one)",
    )


def llama_command(
    binary: str, gguf: str, port: int, slots: int, context: int, threads: int, options, slot_dir: str | None = None
) -> list[str]:
    """llama-server on `gguf` with `slots` parallel sequences of `context` tokens each, continuous batching, /metrics
    and `--slot-save-path slot_dir` (so its slots can be erased), each where its --help lists it."""
    needed = {"--model", "--host", "--port", "--parallel", "--ctx-size", "--threads"}
    if not needed <= options:
        raise GptwoError(
            f"{binary} lacks {', '.join(sorted(needed - options))}", "build a current llama.cpp's llama-server"
        )
    cmd = [binary, "--model", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots)]
    cmd += ["--ctx-size", str(slots * context), "--threads", str(threads)]
    cmd += ["--threads-batch", str(threads)] if "--threads-batch" in options else []
    cmd += ["--slot-save-path", slot_dir] if slot_dir and "--slot-save-path" in options else []
    return cmd + [flag for flag in ("--cont-batching", "--metrics") if flag in options]


def llama_gguf(binary: str, gguf_dir: str | None, model_dir: str, variants: Seq[str], scratch: str, timeout) -> dict:
    """The GGUF file beside each variant: from `gguf_dir` (experiments/llamacpp.sh), else converted now by the
    convert_hf_to_gguf.py of the source tree the binary was built in."""
    from gptwo.bench.llamacpp import convert, find_converter, gguf_files

    dtypes = tuple(LLAMA_DTYPES[v] for v in variants)
    if gguf_dir:
        files = gguf_files(gguf_dir, dtypes)
    else:
        converter = find_converter(binary)
        if converter is None:
            raise GptwoError(
                f"no convert_hf_to_gguf.py above {binary} to convert the model with",
                "pass --gguf DIR written by experiments/llamacpp.sh",
            )
        files = convert(model_dir, converter, scratch, dtypes, timeout)
    return {variant: files[LLAMA_DTYPES[variant]] for variant in variants}


# ---------------------------------------------------------------------------------------------- the targets
@dataclass
class Target:
    """What a row of the report is measured on: a server, the fields its requests add, and its samples."""

    tool: str  # gptwo serve, gptwo serve (DIR), llama-server
    variant: str  # fp32, bf16 or int8: the precision (llama-server: the one its GGUF stands beside)
    weights: str  # what the table shows: gptwo's variant, or the GGUF's precision
    server: ServerProcess
    extra: dict = field(default_factory=dict)
    prefix_caching: bool = False
    twin: Target | None = None  # the same with prefix caching off, for the prefix workload
    samples: dict[str, list[dict]] = field(default_factory=dict)
    role: str = ""  # what the progress lines add to a twin's name

    @property
    def label(self) -> str:
        return f"{self.tool} {self.weights}{self.role}"


def run_workload(target: Target, workload: str, round_: int, maker: PromptMaker, sizes: Sizes, timeout: float):
    """One round of one workload on one target, from a llama-server with empty slots: its numbers."""
    address, extra = target.server.address, target.extra
    target.server.erase_slots()
    if workload == "mixed":
        before = target.server.metrics()
        results, seconds, samples = asyncio.run(
            run_burst(address, mixed_requests(maker, sizes, round_), extra, timeout, KV_SAMPLE_S)
        )
        summary = {**burst_summary(results, seconds), **kv_summary(samples)}
        summary["preemptions"] = _delta(before, target.server.metrics(), "gptwo_preemptions_total")
        return summary
    if workload == "join":
        streams, joiner = join_requests(maker, sizes, round_)
        return join_summary(*asyncio.run(run_join(address, streams, joiner, sizes.join_warm, extra, timeout)))
    if workload == "prefix":
        before = target.server.metrics()
        requests = prefix_requests(maker, sizes, round_)
        summary = prefix_summary(asyncio.run(run_prefix(address, requests, sizes.prefix_at_once, extra, timeout)))
        after = target.server.metrics()
        hits, queries = (_delta(before, after, f"gptwo_prefix_cache_{n}_total") for n in ("hits", "queries"))
        summary["prefix_hit_rate"] = hits / queries if hits is not None and queries else None
        return summary
    requests = throughput_requests(maker, sizes, round_)
    summary = burst_summary(*asyncio.run(run_burst(address, requests, extra, timeout))[:2])
    lone = Request(maker.make(sizes.throughput_prompt, f"throughput-{round_}-alone"), sizes.throughput_new)
    target.server.erase_slots()
    alone = burst_summary(*asyncio.run(run_burst(address, [lone], extra, timeout))[:2])
    summary["single_client_tokens_per_s"] = alone["tokens_per_s"] if not alone["failed"] else None
    return summary


def _delta(before: dict | None, after: dict | None, name: str) -> float | None:
    if before is None or after is None:
        return None
    start, end = metric(before, name), metric(after, name)
    return None if start is None or end is None else end - start


def warm_up(target: Target, maker: PromptMaker, sizes: Sizes, timeout: float) -> None:
    """A few short requests and one long prompt (prompts no workload sends): the first requests pay for lazy
    set-up."""
    long = min(sizes.mixed_long_prompt, sizes.join_prompt)
    requests = [Request(maker.make(8, f"warm-up-{i}"), 4) for i in range(3)] + [Request(maker.make(long, "warm-up"), 2)]
    asyncio.run(run_burst(target.server.address, requests, target.extra, timeout))
    asked = {**target.extra, **CONTINUOUS_USAGE}  # does it count each chunk's tokens (for inter-token gaps)?
    request = Request(maker.make(8, "warm-up-usage"), 4)
    probe = asyncio.run(asyncio.wait_for(stream_completion(target.server.address, request, extra=asked), timeout))
    if probe.error is None and probe.counts:
        for t in (target, target.twin):
            if t is not None:
                t.extra = {**t.extra, **CONTINUOUS_USAGE}


def progress_line(workload: str, target: Target, s: dict) -> str:
    """One line of what a round of a workload gave on a target."""

    def num(key: str, spec: str) -> str:
        return "-" if s.get(key) is None else format(s[key], spec)

    if workload == "join":
        body = f"gap p50 {num('gap_p50_ms', '.1f')} ms, during the join {num('join_gap_max_ms', '.1f')} ms"
        body += f" ({num('stall_ratio', '.1f')}x), join TTFT {num('join_ttft_s', '.2f')} s"
    elif workload == "prefix":
        body = f"TTFT p50 {num('ttft_p50_s', '.3f')} s, hit rate {num('prefix_hit_rate', '.2f')}"
    else:
        body = f"{num('tokens_per_s', '.1f')} tokens/s, TTFT p50 {num('ttft_p50_s', '.2f')} s"
        body += f" p90 {num('ttft_p90_s', '.2f')} s"
        body += f", KV used/need {num('kv_used_over_need', '.2f')}" if s.get("kv_used_over_need") is not None else ""
    return f"  {workload} {target.label}: {body}, {s['failed']} failed"


# ---------------------------------------------------------------------------------------------- transformers
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


def hf_anchors(model_dir: str, prompts: list[list[int]], tokens: int, device: str, progress: bool):
    """The transformers runs that work here (name -> function returning tokens made), and notes on those that do not.
    Each is tried first on a few prompts and tokens (a warm-up that also catches an anchor that does not run)."""
    from gptwo.bench.decode import hf_twin
    from gptwo.weights import load_model

    model, tokenizer = load_model(model_dir, device=device)
    plain, batching = fast_gelu(hf_twin(model)), fast_gelu(hf_twin(model))  # continuous batching changes attention
    del model
    few, short = prompts[:4], min(tokens, 4)
    makers = {"transformers generate": lambda p, t: hf_generate_run(plain, p, t, tokenizer.eot_token)}
    if hasattr(batching, "generate_batch"):
        makers["transformers generate_batch"] = lambda p, t: hf_batch_run(batching, p, t)
    runs, notes = {}, []
    for name, make in makers.items():
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
    return runs, notes


# ---------------------------------------------------------------------------------------------- the benchmark
def _check(variants, workloads, rounds, threads) -> None:
    for name in variants:
        if name not in VARIANTS:
            raise GptwoError(f"unknown variant '{name}'", f"use some of {', '.join(VARIANTS)}")
    for name in workloads:
        if name not in WORKLOADS:
            raise GptwoError(f"unknown workload '{name}'", f"use some of {', '.join(WORKLOADS)}")
    if not variants or not workloads:
        raise GptwoError("no variants or no workloads to run", "pass some with --variants and --workload")
    if rounds < 1:
        raise GptwoError("rounds must be at least 1", "pass a positive number")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise GptwoError(f"--threads {threads} is not in 1..{MAX_THREADS}", "use e.g. the number of cores")


@dataclass
class Setup:
    """What every server is started with."""

    model_dir: str
    device: str
    threads: int
    seqs: int
    context: int
    scratch: str
    timeout: float
    progress: bool
    prefix_twins: bool
    extra: list[list[str]]


def start_gptwo_targets(setup: Setup, variants, trees: Seq[str | None], servers: list, notes: list) -> list[Target]:
    """`gptwo serve` of each tree (None: this one) at each variant it can serve, with its prefix-caching twin."""
    targets = []
    for tree in trees:
        src = tree_src(tree) if tree else None
        tool = f"gptwo serve ({tree})" if tree else "gptwo serve"
        env = gptwo_env(src, setup.threads)
        options = help_options([sys.executable, "-m", "gptwo.cli", "serve"], env, setup.timeout)
        caching = "--no-prefix-caching" in options
        for variant in variants:
            if not variant_runs(variant, options):
                notes.append(
                    f"{tool} left out at {variant}: its serve has no {'--quantize' if variant == 'int8' else '--dtype'}"
                )
                continue
            pair = []
            for on in (True, False) if caching and setup.prefix_twins else (True,):
                label = f"{tool} {variant}" + ("" if on else " --no-prefix-caching")
                port = free_port(servers)
                cmd, left_out = gptwo_command(
                    setup.model_dir, variant, port, setup.device, setup.seqs, options, on, setup.extra
                )
                if setup.progress:
                    print(f"starting {label}", file=sys.stderr)
                server = launch(label, cmd, env, os.path.join(setup.scratch, f"server{len(servers)}.log"), port)
                server.left_out = left_out
                servers.append(server)
                role = "" if on else " (--no-prefix-caching)"
                pair.append(Target(tool, variant, variant, server, prefix_caching=on and caching, role=role))
            pair[0].twin = pair[1] if len(pair) > 1 else None
            targets.append(pair[0])
    return targets


def start_llama_targets(setup: Setup, binary: str, files: dict, servers: list) -> list[Target]:
    """llama-server on each GGUF file; its twin (prompt cache off) is the same server with `cache_prompt: false`."""
    options = help_options([binary], None, setup.timeout)
    targets = []
    for variant, gguf in files.items():
        port = free_port(servers)
        label = f"llama-server {LLAMA_DTYPES[variant]}"
        cmd = llama_command(binary, gguf, port, setup.seqs, setup.context, setup.threads, options, setup.scratch)
        if setup.progress:
            print(f"starting {label}", file=sys.stderr)
        server = launch(label, cmd, dict(os.environ), os.path.join(setup.scratch, f"server{len(servers)}.log"), port)
        server.slots = setup.seqs if "--slot-save-path" in options else 0
        servers.append(server)
        target = Target("llama-server", variant, LLAMA_DTYPES[variant], server, {"cache_prompt": True}, True)
        target.twin = Target(
            "llama-server", variant, LLAMA_DTYPES[variant], server, {"cache_prompt": False}, role=" (cache_prompt off)"
        )
        targets.append(target)
    return targets


def serve_report(
    model: str | None = None,
    device: str = "auto",
    workloads: tuple[str, ...] = WORKLOADS,
    variants: tuple[str, ...] = ("fp32", "bf16", "int8"),
    rounds: int = 3,
    threads: int | None = None,
    compare_src: Seq[str] = (),
    llama_server: str | None = None,
    gguf: str | None = None,
    serve_args: str = "",
    sizes: Sizes = Sizes(),
    progress: bool = True,
    timeout: float | None = None,
) -> dict:
    """Run the workloads on every server, rounds interleaved, and report the medians with their ratios to the code
    before (the first --compare-src) and to llama-server at the same precision."""
    from gptwo.tokenizer import load_tokenizer
    from gptwo.weights import read_config, resolve_device, resolve_model_dir

    _check(variants, workloads, rounds, threads)
    timeout = tool_timeout(timeout)
    for tree in compare_src:  # each checked before anything starts
        tree_src(tree)
    binary = find_llama_server(llama_server) if llama_server else None
    extra = option_groups(shlex.split(serve_args))
    dev = resolve_device(device)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if threading.current_thread() is threading.main_thread():  # a SIGTERM (e.g. `timeout`) still stops the servers
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = tempfile.mkdtemp(prefix="gptwo-bench-serve-")
    servers: list[ServerProcess] = []
    notes: list[str] = []
    try:
        if model:
            model_dir = resolve_model_dir(model)
        elif gguf and os.path.isfile(os.path.join(gguf, "hf", "config.json")):
            model_dir = os.path.join(gguf, "hf")  # the folder its GGUF files were converted from
        else:
            model_dir = save_serve_model(os.path.join(scratch, "model"))
        config = read_config(model_dir)
        if sizes.context_needed() > config.block_size:
            raise GptwoError(
                f"the workloads need {sizes.context_needed()} tokens of context; {model_dir} has {config.block_size}",
                "bench a model with a context of 1024 (leave --model out for the default one)",
            )
        maker = PromptMaker(load_tokenizer(model_dir))
        setup = Setup(
            model_dir,
            str(dev),
            threads,
            sizes.most_at_once(),
            config.block_size,
            scratch,
            timeout,
            progress,
            "prefix" in workloads,
            extra,
        )
        targets = start_gptwo_targets(setup, variants, [None, *compare_src], servers, notes)
        llama = None
        if binary:
            files = llama_gguf(binary, gguf, model_dir, variants, scratch, timeout)
            targets += start_llama_targets(setup, binary, files, servers)
            llama = {"binary": binary, "version": _llama_version(binary, timeout), "gguf": files}
        wait_ready(servers, timeout)
        anchors, anchor_rates = {}, {}
        if "throughput" in workloads:
            prompts = [r.prompt for r in throughput_requests(maker, sizes, 0)]
            anchors, hf_notes = hf_anchors(model_dir, prompts, sizes.throughput_new, str(dev), progress)
            notes += hf_notes
            anchor_rates = {name: [] for name in anchors}
        for target in targets:
            warm_up(target, maker, sizes, timeout)
        for r in range(rounds):
            if progress:
                print(f"round {r + 1} of {rounds}", file=sys.stderr)
            for workload in workloads:
                for target in targets:
                    for t in (target, target.twin) if workload == "prefix" and target.twin else (target,):
                        t.samples.setdefault(workload, []).append(run_workload(t, workload, r, maker, sizes, timeout))
                        if progress:
                            print(progress_line(workload, t, t.samples[workload][-1]), file=sys.stderr)
                if workload == "throughput":
                    for name, run in anchors.items():
                        started = time.perf_counter()
                        with torch.no_grad():
                            made = run()
                        anchor_rates[name].append(made / (time.perf_counter() - started))
                        if progress:
                            print(f"  throughput {name}: {anchor_rates[name][-1]:.1f} tokens/s", file=sys.stderr)
        health = {s.label: s.health() for s in servers if s.label.startswith("gptwo")}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "bench": "serve",
        "device": str(dev),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "model": model or "random 6-layer, width-384, context-1024 GPT-2 (GPT-2's vocabulary)",
        "model_shape": {"n_layer": config.n_layer, "n_embd": config.n_embd, "context": config.block_size},
        "workloads": list(workloads),
        "sizes": asdict(sizes),
        "rounds": rounds,
        "compare_src": list(compare_src),
        "llama_server": llama,
        "servers": {
            s.label: {"command": shlex.join(s.command), "left_out": s.left_out, "health": health.get(s.label)}
            for s in servers
        },
        "notes": notes,
        "results": {w: workload_rows(w, targets, anchor_rates, list(compare_src)) for w in workloads},
    }


def _llama_version(binary: str, timeout: float) -> str:
    done = run_tool([binary, "--version"], timeout, "llama-server --version", "check the binary")
    lines = (done.stdout + done.stderr).strip().splitlines()
    return next((line for line in lines if line.startswith("version")), lines[0] if lines else "unknown")


# ---------------------------------------------------------------------------------------------- the report
def aggregate(samples: Seq[dict]) -> dict:
    """Rounds into one row: the median of each number (rounds without it left out), failures summed, the first few
    errors."""
    row: dict = {}
    for key in dict.fromkeys(k for s in samples for k in s):
        values = [s[key] for s in samples if s.get(key) is not None]
        if key == "failed":
            row[key] = sum(values)
        elif key == "errors":
            row[key] = [e for s in samples for e in s["errors"]][:3]
        elif values and isinstance(values[0], str):  # a label (join: what its gaps are between)
            row[key] = ", ".join(dict.fromkeys(values))
        else:
            row[key] = statistics.median(values) if values else None
    return row


def _ratio(row: dict | None, other: dict | None, key: str) -> float | None:
    if row is None or other is None or row.get(key) is None or not other.get(key):
        return None
    return row[key] / other[key]


def workload_rows(
    workload: str, targets: Seq[Target], anchor_rates: dict[str, list[float]], compare_src: Seq[str]
) -> list[dict]:
    """The report's rows for one workload: one per target (prefix: with its twin's numbers), then ratios of the
    workload's headline number to the code before at the same variant and to llama-server at the same precision."""
    rows = []
    for target in targets:
        if workload not in target.samples:
            continue
        row = {"tool": target.tool, "weights": target.weights, "variant": target.variant}
        row.update(aggregate(target.samples[workload]))
        if workload == "prefix":
            row["prefix_caching"] = target.prefix_caching
            twin = aggregate(target.twin.samples.get("prefix", [])) if target.twin else {}
            row["ttft_p50_no_cache_s"] = twin.get("ttft_p50_s")
            row["cached_over_uncached"] = _ratio(row, {"ttft_p50_s": row["ttft_p50_no_cache_s"]}, "ttft_p50_s")
            row["failed"] += twin.get("failed", 0)
        rows.append(row)
    key = HEADLINE[workload]
    before_tool = f"gptwo serve ({compare_src[0]})" if compare_src else None
    by = {(row["tool"], row["variant"]): row for row in rows}
    for row in rows:
        gptwo = row["tool"].startswith("gptwo")
        row["vs_before"] = (
            _ratio(row, by.get((before_tool, row["variant"])), key) if gptwo and row["tool"] != before_tool else None
        )
        row["vs_llama"] = _ratio(row, by.get(("llama-server", row["variant"])), key) if gptwo else None
    if workload == "throughput" and anchor_rates:
        hf_rows = [
            {"tool": name, "weights": "fp32", "variant": "fp32", "tokens_per_s": statistics.median(rates), "failed": 0}
            for name, rates in anchor_rates.items()
        ]
        best = max(hf_rows, key=lambda r: r["tokens_per_s"])
        rows += hf_rows
        for row in rows:
            row["vs_transformers"] = _ratio(row, best, "tokens_per_s")
    return rows


COLUMNS = {
    "mixed": [
        ("tokens_per_s", "tokens/s", ".1f"),
        ("vs_before", "÷ before", ".2f"),
        ("vs_llama", "÷ llama", ".2f"),
        ("ttft_p50_s", "TTFT p50 s", ".3f"),
        ("ttft_p90_s", "TTFT p90 s", ".3f"),
        ("kv_used_over_need", "KV used/need", ".2f"),
        ("kv_touched_over_need", "KV touched/need", ".2f"),
        ("kv_alloc_over_need", "KV pool/need", ".2f"),
        ("kv_alloc_mib", "KV pool MiB", ".0f"),
        ("preemptions", "preempted", ".0f"),
    ],
    "join": [
        ("gap_p50_ms", "gap p50 ms", ".1f"),
        ("join_gap_max_ms", "join gap ms", ".1f"),
        ("stall_ratio", "stall x", ".2f"),
        ("vs_before", "÷ before", ".2f"),
        ("vs_llama", "÷ llama", ".2f"),
        ("join_ttft_s", "join TTFT s", ".3f"),
        ("gaps", "gaps of", "s"),
    ],
    "prefix": [
        ("ttft_p50_s", "TTFT p50 s", ".3f"),
        ("ttft_p50_no_cache_s", "no-cache p50 s", ".3f"),
        ("cached_over_uncached", "cached/uncached", ".2f"),
        ("prefix_hit_rate", "hit rate", ".2f"),
        ("vs_before", "÷ before", ".2f"),
        ("vs_llama", "÷ llama", ".2f"),
    ],
    "throughput": [
        ("tokens_per_s", "tokens/s", ".1f"),
        ("vs_before", "÷ before", ".2f"),
        ("vs_llama", "÷ llama", ".2f"),
        ("vs_transformers", "÷ transformers", ".2f"),
        ("ttft_p50_s", "TTFT p50 s", ".3f"),
        ("ttft_p90_s", "TTFT p90 s", ".3f"),
        ("single_client_tokens_per_s", "1 client tok/s", ".1f"),
    ],
}


def workload_heading(workload: str, sizes: dict) -> str:
    """What a workload's table measures, in one line."""
    s = sizes
    return {
        "mixed": f"mixed: {s['mixed_short']} x {s['mixed_short_prompt']}-token and {s['mixed_long']} x "
        f"{s['mixed_long_prompt']}-token prompts at once, {s['mixed_new']} tokens each; aggregate tokens/s, TTFT; "
        "KV from /metrics (used blocks, and the whole cache, over held tokens + one block per sequence, at the peak)",
        "join": f"join: {s['join_streams']} streams running ({s['join_stream_prompt']}-token prompts), then one "
        f"{s['join_prompt']}-token prompt joins; the streams' largest inter-token gap while it waits for its first "
        "token, over their median gap before it (stall x); gaps of tokens: between chunks of one token (the server "
        "counts them), of chunks: between text chunks (a token ending inside a character shows with the next)",
        "prefix": f"prefix: {s['prefix_requests']} requests sharing a {s['prefix_shared']}-token prefix (+ "
        f"{s['prefix_suffix']}-token suffixes, {s['prefix_at_once']} at a time, {s['prefix_new']} tokens); TTFT p50 "
        "with prefix caching vs the same server without (--no-prefix-caching; llama-server: cache_prompt false)",
        "throughput": f"throughput: {s['throughput_clients']} clients x {s['throughput_prompt']}-token prompts x "
        f"{s['throughput_new']} tokens at once; transformers: batched generate in the bench's process (fp32)",
    }[workload]


def render_serve(report: dict) -> str:
    """The report as text: where it ran, then a table per workload (÷ before: the headline number over the first
    --compare-src's at the same variant; ÷ llama: over llama-server's at the same precision)."""
    where = (
        report["gpu"]
        or f"{report['cpu']} ({', '.join(report['cpu_flags']) or 'no AVX-512'}), {report['threads']} threads per server"
    )
    lines = [
        f"serve: {where}; {report['model']}; medians of {report['rounds']} interleaved rounds; temperature 1",
    ]
    if report["compare_src"]:
        lines.append(f"before: gptwo serve ({report['compare_src'][0]})")
    if report["llama_server"]:
        lines.append(
            f"llama-server: {report['llama_server']['binary']} ({report['llama_server']['version']}), one slot "
            "per client, KV cache f16 (its default)"
        )
    for workload, rows in report["results"].items():
        key = HEADLINE[workload]
        lines += ["", workload_heading(workload, report["sizes"]) + f"; ratios of {key}"]
        columns = [("tool", "tool", ""), ("weights", "weights", ""), *COLUMNS[workload], ("failed", "failed", "d")]
        lines.append(render_table(rows, columns))
    lines += [""] + [f"server {label}: {info['command']}" for label, info in report["servers"].items()]
    lines += [
        f"left out of {label} (its tree lacks them): {', '.join(info['left_out'])}"
        for label, info in report["servers"].items()
        if info["left_out"]
    ]
    lines += [f"note: {note}" for note in report["notes"]]
    lines += [
        f"errors ({workload}, {row['tool']} {row['weights']}): {'; '.join(row['errors'])}"
        for workload, rows in report["results"].items()
        for row in rows
        if row.get("errors")
    ]
    return "\n".join(lines)
