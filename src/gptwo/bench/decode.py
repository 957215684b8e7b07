"""`gptwo bench decode`: tokens/s of batch decoding per precision, against transformers' fp32 `generate`.

Every variant decodes the same random prompt greedily for `new_tokens` tokens; the variants take
turns each round (interleaved) and the median round counts. A memory-read probe runs in the same
rounds: decoding at batch 1 streams every weight once per token, so bandwidth / weight bytes is
the ceiling on tokens/s. `token_agreement` is the share of generated tokens equal to transformers'.
Given `llama_cpp`, llama.cpp's llama-bench takes its turn in the same rounds on GGUF files of the
same weights (gptwo.bench.llamacpp).
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from gptwo.bench import (
    COMPILE_MODES,
    MAX_THREADS,
    bench_model,
    cpu_flags,
    cpu_name,
    interleaved,
    quiet_transformers,
    render_table,
    tool_timeout,
)
from gptwo.errors import GptwoError
from gptwo.model import GPT
from gptwo.runtime import resolve_device

VARIANTS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("fp32", "int8")}  # name -> (dtype, quantize)
COLUMNS = [
    ("tool", "tool", ""),
    ("dtype", "weights", ""),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("ratio_vs_transformers", "vs transformers", ".2f"),
    ("weight_mb", "weight MB", ".0f"),
    ("ceiling_tokens_per_s", "ceiling tok/s", ".0f"),
    ("token_agreement", "same tokens", ".2f"),
]


def hf_twin(model: GPT):
    """transformers' GPT2LMHeadModel holding the same weights (fp32, SDPA attention): the anchor."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise GptwoError("the decode benchmark's anchor needs transformers", "pip install 'gptwo[bench]'") from None
    from gptwo.weights import config_to_hf, state_dict_to_hf

    quiet_transformers()
    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(model.config))).eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise GptwoError(
            f"transformers' GPT-2 does not take these weights ({(unexpected or missing)[0]})", "report this as a bug"
        )
    hf.tie_weights()
    return hf.to(model.transformer.wte.weight.device)


def streamed_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every block, the final LayerNorm and the head's weights (not the embedding
    lookups)."""
    tf = model.transformer
    tensors = [*tf.h.parameters(), *tf.h.buffers(), *tf.ln_f.parameters()]
    head = list(model.lm_head.buffers()) or [model.lm_head.weight]
    return sum(t.numel() * t.element_size() for t in tensors + head if t is not None)


def decode_report(
    model: str | None = None,
    device: str = "auto",
    variants: tuple[str, ...] = ("fp32", "bf16", "int8"),
    batch_size: int = 1,
    new_tokens: int = 128,
    prompt_tokens: int = 16,
    rounds: int = 5,
    threads: int | None = None,
    compile: str = "none",
    progress: bool = True,
    llama_cpp: str | None = None,
    gguf: str | None = None,
    timeout: float | None = None,
    onnxruntime: tuple[str, ...] = (),
) -> dict:
    """Median tokens/s of each variant and of transformers in the same run, with the bandwidth ceiling (and llama.cpp's,
    given its build; and onnxruntime's, given `onnxruntime` variants)."""
    from gptwo.infer import Decoder, prepare_model

    for name in variants:
        if name not in VARIANTS:
            raise GptwoError(f"unknown variant '{name}'", f"use some of {', '.join(VARIANTS)}")
    if not variants:
        raise GptwoError("no variants to time", f"pass --variants with some of {', '.join(VARIANTS)}")
    if compile not in COMPILE_MODES:
        raise GptwoError(f"unknown compile mode '{compile}'", f"use one of {', '.join(COMPILE_MODES)}")
    if min(batch_size, new_tokens, prompt_tokens, rounds) < 1:
        raise GptwoError("batch size, token counts and rounds must be at least 1", "pass positive numbers")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise GptwoError(f"--threads {threads} is not in 1..{MAX_THREADS}", "use e.g. the number of cores")
    timeout = tool_timeout(timeout)
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    llama = (
        llamacpp_anchor(llama_cpp, gguf, model, batch_size, prompt_tokens, new_tokens, progress, timeout)
        if llama_cpp or gguf
        else None
    )
    llama_runs = warm_llamacpp(llama, progress) if llama else {}  # before the models: a broken llama.cpp fails fast
    base = bench_model(model, dev)
    if prompt_tokens + new_tokens > base.config.block_size:
        raise GptwoError(
            f"{prompt_tokens} + {new_tokens} tokens exceed the model's context of {base.config.block_size}",
            "ask for fewer tokens",
        )
    prompt = torch.randint(
        0, base.config.vocab_size, (batch_size, prompt_tokens), generator=torch.Generator().manual_seed(0)
    ).to(dev)
    hf = hf_twin(base)
    runs = {
        ("transformers", "fp32"): lambda: hf.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    }
    weights = {("transformers", "fp32"): streamed_bytes(base)}
    mode = None if compile == "default" else compile
    for name in variants:
        dtype, quantize = VARIANTS[name]
        prepared = prepare_model(copy.deepcopy(base), dtype=dtype, quantize=quantize)
        decoder = Decoder(
            prepared,
            batch_size=batch_size,
            max_len=prompt_tokens + new_tokens,
            compile=False if compile == "none" else (mode or True),
        )
        runs[("gptwo", name)] = lambda decoder=decoder: decoder.generate(prompt, new_tokens)
        weights[("gptwo", name)] = streamed_bytes(prepared)
    if onnxruntime:  # the model exported to ONNX and decoded by onnxruntime (gptwo.bench.onnx_rows)
        from gptwo.bench.onnx_rows import onnx_runs

        ort_runs, ort_weights = onnx_runs(base, prompt, new_tokens, onnxruntime, progress)
        runs.update(ort_runs)
        weights.update(ort_weights)
    del base
    tokens = {}
    with torch.no_grad():
        for number, (key, run) in enumerate(runs.items(), 1):  # warm-up (and compilation), and each one's tokens
            if progress:
                print(f"warming up {number}/{len(runs)}: {key[0]} {key[1]}...", end="", file=sys.stderr, flush=True)
            start = time.perf_counter()
            tokens[key] = run()[:, prompt_tokens:]
            if progress:
                print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        runs.update(llama_runs)
        probe = torch.ones(512 * 2**20 // 4, device=dev)
        runs[("memory", "read")] = probe.sum
        if progress:
            print(f"timing {rounds} interleaved rounds (each runs every contender once)", file=sys.stderr, flush=True)
        started = time.perf_counter()

        def each_round(number: int, round_seconds: dict) -> None:
            rates = " | ".join(
                f"{tool} {dtype} {rate:,.1f} tok/s"
                for (tool, dtype), s in round_seconds.items()
                if tool != "memory"
                for rate in [
                    new_tokens / llama.seconds[dtype][-1] if tool == "llama.cpp" else batch_size * new_tokens / s
                ]
            )
            elapsed = time.perf_counter() - started
            left = elapsed / number * (rounds - number)
            print(
                f"round {number}/{rounds}: {rates} ({elapsed:.0f} s so far, ~{left:.0f} s left)",
                file=sys.stderr,
                flush=True,
            )

        seconds = interleaved(runs, rounds, dev, each_round if progress else None)
    bandwidth = probe.numel() * probe.element_size() / seconds[("memory", "read")] / 1e9
    anchor = batch_size * new_tokens / seconds[("transformers", "fp32")]
    rows = []
    for key, nbytes in weights.items():
        rate = batch_size * new_tokens / seconds[key]
        rows.append(
            {
                "tool": key[0],
                "dtype": key[1],
                "tokens_per_s": rate,
                "ratio_vs_transformers": rate / anchor,
                "weight_mb": nbytes / 1e6,
                "ceiling_tokens_per_s": batch_size * bandwidth * 1e9 / nbytes,
                "token_agreement": (tokens[key] == tokens[("transformers", "fp32")]).float().mean().item(),
            }
        )
    rows += llama.rows(bandwidth, anchor) if llama else []
    return {
        "bench": "decode",
        "device": str(dev),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "model": model or "random GPT-2 124M shape",
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "compile": compile,
        "bandwidth_gb_s": bandwidth,
        "rows": rows,
        "llama_cpp": llama.summary() if llama else None,
    }


def render_decode(report: dict) -> str:
    """The report as a table with a header line naming the machine and the workload."""
    where = (
        report["gpu"]
        or f"{report['cpu']} ({', '.join(report['cpu_flags']) or 'no AVX-512'}), {report['threads']} threads"
    )
    head = (
        f"decode: {where}; batch {report['batch_size']}, {report['prompt_tokens']}-token prompt + "
        f"{report['new_tokens']} new tokens greedy, "
        f"median of {report['rounds']} interleaved rounds, compile={report['compile']}; memory read "
        f"{report['bandwidth_gb_s']:.1f} GB/s"
    )
    table = head + "\n" + render_table(report["rows"], COLUMNS)
    if report.get("llama_cpp"):
        info = report["llama_cpp"]
        table += (
            f"\nllama.cpp: llama-bench build {info['build_number']} ({info['build_commit']}), -pg "
            f"{report['prompt_tokens']},{report['new_tokens']} "
            f"-t {report['threads']}, its own timing; its q8_0 also quantizes activations to 8 bits"
        )
    return table


def llamacpp_anchor(
    path: str,
    gguf: str | None,
    model: str | None,
    batch_size: int,
    prompt_tokens: int,
    new_tokens: int,
    progress: bool,
    timeout: float,
):
    """llama.cpp's llama-bench as a further anchor, on GGUF files of the same weights (converted now unless `gguf`
    holds them); each call of an outside tool may take `timeout` seconds."""
    from gptwo.bench.llamacpp import llamacpp_anchor as anchor

    if not path:
        raise GptwoError(
            "--gguf names the llama.cpp anchor's files but no llama.cpp was given",
            "add --llama-cpp PATH (llama-bench or its build folder)",
        )
    if batch_size != 1:
        raise GptwoError("the llama.cpp anchor times batch 1 only", "leave --batch-size at 1, or drop --llama-cpp")
    return anchor(path, gguf, model, prompt_tokens, new_tokens, torch.get_num_threads(), progress, timeout)


def warm_llamacpp(llama, progress: bool) -> dict:
    """One llama-bench call per precision before the rounds (page cache; errors surface early), then its runs for the
    rounds."""
    for dtype in llama.files:
        if progress:
            print(f"warming up llama.cpp {dtype}", file=sys.stderr)
        llama.time(dtype)
    return llama.runs()
