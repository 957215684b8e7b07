"""`gptwo bench train`: training tokens/s and MFU of gptwo's step vs transformers' GPT2LMHeadModel.

Both models get the same shape, the same random tokens and targets, the same AdamW and autocast.
gptwo's step is the one `gptwo train` runs (`gptwo.train.speed`), in its default precision for the
device and in float32; transformers runs in the same precisions, eager and compiled (compiled only
on CUDA), with the loss computed inside its forward as its users train it. The anchor is
transformers' fastest row. Everything takes turns (interleaved rounds) and each row's median round
counts, so a machine that speeds up or slows down hits all alike.

FLOPs per token = 6·N + 12·L·C·T (N parameters without position embeddings, L layers, C width,
T context; PaLM, Chowdhery et al. 2022, appendix B); MFU = achieved FLOP/s over the device's peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from typing import TYPE_CHECKING

from gptwo.config import MODEL_PRESETS, TRAIN_PRESETS, GPTConfig, TrainConfig
from gptwo.errors import GptwoError

if TYPE_CHECKING:  # torch is imported where a benchmark runs, so --help stays fast
    import torch

FLOP_FORMULA = "6*N + 12*L*C*T per token (N: parameters without position embeddings, L layers, C width, T context)"
# Workloads: the quickstart's model and tokenizer size, and GPT-2 124M / 1.5B at full context.
WORKLOADS = {
    "cpu": dict(
        shape=dict(
            vocab_size=4096,
            block_size=TRAIN_PRESETS["cpu"]["block_size"],
            n_layer=TRAIN_PRESETS["cpu"]["n_layer"],
            n_head=TRAIN_PRESETS["cpu"]["n_head"],
            n_embd=TRAIN_PRESETS["cpu"]["n_embd"],
        ),
        batch_size=TRAIN_PRESETS["cpu"]["batch_size"],
    ),
    "gpt2": dict(shape=dict(vocab_size=50257, block_size=1024, **MODEL_PRESETS["gpt2"]), batch_size=16),
    "gpt2-xl": dict(shape=dict(vocab_size=50257, block_size=1024, **MODEL_PRESETS["gpt2-xl"]), batch_size=4),
}


@dataclasses.dataclass
class Contender:
    """One model under test, in one precision and compile mode, with a function running one training step."""

    name: str
    dtype: str
    compiled: bool
    step: object
    rounds: list[float] = dataclasses.field(default_factory=list)


def bench_train(
    preset: str = "cpu",
    device: str = "auto",
    batch_size: int | None = None,
    shape: dict | None = None,
    steps: int | None = None,
    rounds: int = 3,
    warmup: int = 3,
    dtype: str = "auto",
    compile: str = "auto",
    peak_flops: float = 0.0,
    threads: int = 0,
) -> dict:
    """Measure training steps/s of gptwo and transformers on one workload; return the report (see docs/training.md)."""
    import torch

    from gptwo.train.distributed import Dist
    from gptwo.train.loop import set_threads
    from gptwo.train.optim import flops_per_token
    from gptwo.train.optim import peak_flops as device_peak
    from gptwo.train.speed import keep_freed_memory
    from gptwo.weights import resolve_device

    if preset not in WORKLOADS:
        raise GptwoError(f"unknown bench preset '{preset}'", f"use one of: {', '.join(WORKLOADS)}")
    if rounds < 1 or (steps is not None and steps < 1) or warmup < 0:
        raise GptwoError("--rounds and --steps must be at least 1 and --warmup 0 or more", "pass positive counts")
    if batch_size is not None and batch_size < 1:
        raise GptwoError(f"--batch-size {batch_size} must be at least 1", "pass a positive count, or leave it out")
    if not (isinstance(peak_flops, (int, float)) and math.isfinite(peak_flops) and peak_flops >= 0):
        raise GptwoError(
            f"--peak-flops {peak_flops} is not a finite number >= 0",
            "give the device's peak FLOP/s, e.g. 9.89e14, or 0 to look it up",
        )
    if threads < 0:
        raise GptwoError(f"--threads {threads} is negative", "pass 0 (the idle cores) or a positive count")
    dev = resolve_device(device)
    workload = WORKLOADS[preset]
    model_config = GPTConfig(**{**workload["shape"], **(shape or {})})
    batch = workload["batch_size"] if batch_size is None else batch_size
    steps = (20 if dev.type == "cuda" else 8) if steps is None else steps
    check_memory(model_config, batch, dev)
    train_config = TrainConfig(
        n_layer=model_config.n_layer,
        n_head=model_config.n_head,
        n_embd=model_config.n_embd,
        block_size=model_config.block_size,
        batch_size=batch,
        lr=1e-4,
        dtype=dtype,
        compile=compile,
        device=str(dev),
        threads=threads,
    )
    set_threads(train_config, Dist(), dev)  # on a CPU: the idle cores, as `gptwo train` takes them
    keep_freed_memory(dev)  # as `gptwo train` does: process-wide, so transformers' rows run with it too
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokens = torch.randint(
        0, model_config.vocab_size, (batch, model_config.block_size + 1), generator=torch.Generator().manual_seed(0)
    ).to(dev)
    torch.manual_seed(0)
    n_params = _gptwo_model(model_config).num_params()
    contenders = _contenders(model_config, train_config, dev, tokens)
    for contender in contenders:
        for _ in range(warmup):
            contender.step()
    _sync(dev)
    for _ in range(rounds):
        for contender in contenders:
            contender.rounds.append(_timed(contender.step, steps, dev))
    per_token = flops_per_token(model_config, n_params, model_config.block_size)
    rows = _rows(contenders, batch * model_config.block_size, per_token, peak_flops or device_peak(dev))
    anchor = next(row for row in rows if row["anchor"])
    fp32 = [row for row in rows if row["dtype"] == "float32"]
    ours_fp32 = next((row for row in fp32 if row["name"] == "gptwo"), None)
    theirs_fp32 = max((row["tokens_per_s"] for row in fp32 if row["name"] == "transformers"), default=None)
    return {
        "bench": "train",
        "preset": preset,
        "device": _device_name(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "shape": model_config.to_dict(),
        "batch_size": batch,
        "tokens_per_step": batch * model_config.block_size,
        "dtype": rows[0]["dtype"],
        "n_params": n_params,
        "flops_per_token": per_token,
        "flop_formula": FLOP_FORMULA,
        "peak_flops": peak_flops or device_peak(dev) or None,
        "steps": steps,
        "rounds": rounds,
        "rows": rows,
        "ratio": rows[0]["vs_transformers"],
        "anchor": {key: anchor[key] for key in ("name", "dtype", "compiled")},
        "ratio_float32": ours_fp32["tokens_per_s"] / theirs_fp32 if ours_fp32 and theirs_fp32 else None,
    }


def check_memory(config: GPTConfig, batch: int, device: torch.device) -> None:
    """Refuse a workload that cannot fit before allocating it. A lower bound: two models (gptwo's and
    transformers') of 4-byte weights, gradients and two AdamW moments; a step's activations at 16 bits
    (34 bytes per layer, token and channel; Korthikanti et al., 2022) and its float32 logits and their gradient."""
    import torch

    c, t = config.n_embd, config.block_size
    params = config.n_layer * 12 * c * c + (config.vocab_size + t) * c
    activations = batch * t * (config.n_layer * 34 * c + 8 * config.vocab_size)
    need = 2 * params * 16 + activations
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
    if need > have:
        raise GptwoError(
            f"this workload needs at least {need / 2**30:,.1f} GiB ({params / 1e6:,.0f}M parameters, batch {batch} x "
            f"{t} tokens, twice: gptwo and transformers) but the {device.type} has {have / 2**30:,.1f} GiB",
            "pass a smaller shape (--n-embd, --n-layer, --vocab-size, --block-size) or --batch-size",
        )


def bench_dtypes(dtype: str, device: torch.device) -> list[str]:
    """The precisions measured: the one asked for, or (auto) gptwo's default first, then float32 on a CPU.

    gptwo's default is bf16 autocast on CUDA and on a CPU with native bf16 matmuls (as the quickstart
    trains there), float32 on other CPUs.
    """
    from gptwo.train.speed import native_bf16

    if dtype != "auto":
        return [dtype]
    if device.type == "cuda":
        return ["bfloat16"]
    return ["bfloat16", "float32"] if native_bf16() else ["float32"]


def _contenders(
    model_config: GPTConfig, train_config: TrainConfig, device: torch.device, tokens: torch.Tensor
) -> list[Contender]:
    """gptwo's step per precision, then transformers' per precision, eager and compiled (its best is the anchor).

    On CUDA transformers runs compiled only (eager is far behind there); with --compile false nothing compiles.
    """
    import torch

    from gptwo.train.speed import CPU_COMPILE_MIN_STEPS, compile_enabled

    contenders = []
    dtypes = bench_dtypes(train_config.dtype, device)
    may_compile = compile_enabled(train_config, device, CPU_COMPILE_MIN_STEPS)
    hf_modes = [True] if device.type == "cuda" and may_compile else [False, True] if may_compile else [False]
    for dtype in dtypes:
        torch.manual_seed(0)
        contenders.append(
            _contender(
                "gptwo",
                _gptwo_model(model_config),
                dataclasses.replace(train_config, dtype=dtype),
                device,
                tokens,
                may_compile,
                hf=False,
            )
        )
    for dtype in dtypes:
        for compiled in hf_modes:
            torch.manual_seed(0)
            contenders.append(
                _contender(
                    "transformers",
                    _hf_model(model_config),
                    dataclasses.replace(train_config, dtype=dtype),
                    device,
                    tokens,
                    compiled,
                    hf=True,
                )
            )
    return contenders


def _rows(contenders: list[Contender], tokens_per_step: int, per_token: float, peak: float) -> list[dict]:
    """One row per contender; `vs_transformers` is over the anchor, transformers' fastest row."""
    speeds = [tokens_per_step / statistics.median(contender.rounds) for contender in contenders]
    anchor = max(range(len(contenders)), key=lambda i: speeds[i] if contenders[i].name == "transformers" else -1.0)
    rows = []
    for i, (contender, tokens_per_s) in enumerate(zip(contenders, speeds)):
        rows.append(
            {
                "name": contender.name,
                "dtype": contender.dtype,
                "compiled": contender.compiled,
                "tokens_per_s": tokens_per_s,
                "s_per_step": tokens_per_step / tokens_per_s,
                "tflops": tokens_per_s * per_token / 1e12,
                "mfu": tokens_per_s * per_token / peak if peak else None,
                "vs_transformers": tokens_per_s / speeds[anchor],
                "anchor": i == anchor,
            }
        )
    return rows


def _gptwo_model(config: GPTConfig):
    from gptwo.model import GPT

    return GPT(config)


def _hf_model(config: GPTConfig):
    """transformers' GPT-2 of the same shape: SDPA attention, tanh GELU, no dropout."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise GptwoError(
            "gptwo bench train compares against transformers, which is not installed", "pip install 'gptwo[eval]'"
        ) from None
    hf = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",
        attn_implementation="sdpa",
        bos_token_id=config.vocab_size - 1,
        eos_token_id=config.vocab_size - 1,
    )
    return GPT2LMHeadModel(hf)


def _contender(
    name: str,
    model: torch.nn.Module,
    config: TrainConfig,
    device: torch.device,
    tokens: torch.Tensor,
    compiled: bool,
    hf: bool,
) -> Contender:
    """A training step as `gptwo train` takes it: compile policy, fused AdamW, autocast, loss, clipping."""
    import torch

    from gptwo.train.loop import loss_fn
    from gptwo.train.optim import make_optimizer
    from gptwo.train.speed import autocast, compiled_loss, use_bf16, use_fused_adamw, use_onednn_linears

    model.to(device).train()
    if not hf:
        use_onednn_linears(model, config, device)
    optimizer = make_optimizer(model, config, fused=use_fused_adamw(device, None))
    if hf:  # as its users train it: the loss computed inside the model's forward, the model compiled whole
        runner = torch.compile(model) if compiled else model
        module = runner
        step_loss = lambda m, idx, targets: (
            m(input_ids=idx, labels=targets, shift_labels=targets, use_cache=False).loss
        )  # the same targets as gptwo's
    else:
        module, step_loss = model, compiled_loss(loss_fn, config, device) if compiled else loss_fn
    x, y = tokens[:, :-1], tokens[:, 1:].contiguous()

    def step() -> None:
        with autocast(config, device):
            loss = step_loss(module, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender(name, "bfloat16" if use_bf16(config, device) else "float32", compiled, step)


def _timed(step, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from gptwo.runtime import cpu_name

    return f"{device.type}: {cpu_name()}"


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def render_train(report: dict) -> str:
    """The report as a table; the anchor is transformers' fastest row."""
    shape = report["shape"]
    lines = [
        f"training speed on {report['device']}"
        + (f" ({report['threads']} threads)" if report["threads"] else "")
        + f": {shape['n_layer']}L {shape['n_head']}H {shape['n_embd']}d vocab {shape['vocab_size']}, "
        f"batch {report['batch_size']} x {shape['block_size']},"
        f" AdamW; median of {report['rounds']} interleaved rounds x {report['steps']} steps",
        f"FLOPs/token {report['flops_per_token']:,.0f} = {report['flop_formula']}",
        f"{'model':14} {'dtype':9} {'compiled':>8} {'tokens/s':>12} {'s/step':>9} {'TFLOP/s':>8} {'MFU':>7} "
        f"{'vs anchor':>10}",
    ]
    for row in report["rows"]:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        lines.append(
            f"{row['name']:14} {row['dtype']:9} {'yes' if row['compiled'] else 'no':>8} {row['tokens_per_s']:12,.0f} "
            f"{row['s_per_step']:9.4f}"
            f" {row['tflops']:8.3g} {mfu:>7} {row['vs_transformers']:9.2f}x" + ("  (anchor)" if row["anchor"] else "")
        )
    lines.append(
        f"gptwo ({report['dtype']}) vs the anchor: {report['ratio']:.2f}x"
        + (
            f"; float32 vs transformers' best float32: {report['ratio_float32']:.2f}x"
            if report["ratio_float32"]
            else ""
        )
    )
    if report["peak_flops"] is None:
        lines.append("MFU needs the device's peak FLOP/s: pass --peak-flops")
    return "\n".join(lines)


def _cmd_bench_train(args: argparse.Namespace) -> int:
    """The CLI's `gptwo bench train`."""
    from gptwo.argtypes import print_report

    shape = {
        key: getattr(args, key)
        for key in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
        if getattr(args, key) is not None
    }
    report = bench_train(
        args.preset,
        args.device,
        args.batch_size,
        shape,
        args.steps,
        args.rounds,
        args.warmup,
        args.dtype,
        args.compile,
        args.peak_flops,
        args.threads,
    )
    print_report(report, args.json, render_train)
    return 0


def add_bench_train_command(bench_sub, command) -> None:
    """Register `gptwo bench train` under the `bench` group (`command` is cli.py's `_command`)."""
    from gptwo.argtypes import float_in, int_at_least
    from gptwo.bench import MAX_THREADS

    p = command(
        bench_sub,
        "train",
        _cmd_bench_train,
        "Training tokens/s and MFU of gptwo vs transformers (same shape, batch, AdamW; same process).",
    )
    p.add_argument(
        "--preset",
        default="cpu",
        choices=list(WORKLOADS),
        help="workload: cpu (the quickstart's model), gpt2 (124M) or gpt2-xl (1.5B); default cpu",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="sequences per step (default: 16 for cpu and gpt2, 4 for gpt2-xl)",
    )
    p.add_argument(
        "--steps",
        type=int_at_least(1, 100_000),
        default=None,
        help="timed steps per round (default 8 on CPU, 20 on GPU)",
    )
    p.add_argument(
        "--rounds",
        type=int_at_least(1, 1000),
        default=3,
        help="interleaved rounds; each model's median counts (default 3)",
    )
    p.add_argument(
        "--warmup",
        type=int_at_least(0, 100_000),
        default=3,
        help="untimed steps first, compilation included (default 3)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bf16 autocast on CUDA; on a CPU bf16 (where it has native bf16 matmuls, as the quickstart "
        "trains) and float32",
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "true", "false"],
        help="auto: as 'gptwo train' does for a long run; transformers runs eager and compiled on a CPU, compiled "
        "on CUDA; false: nothing compiles",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(0, MAX_THREADS),
        default=0,
        help="CPU threads (default 0: the idle cores, as 'gptwo train' takes them)",
    )
    p.add_argument(
        "--peak-flops",
        type=float_in(0),
        default=0.0,
        help="device peak FLOP/s for MFU (default 0: looked up for known GPUs)",
    )
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        p.add_argument(
            f"--{key.replace('_', '-')}", type=int_at_least(1), default=None, help=f"override the preset's {key}"
        )
