"""`gptwo bench train`: training tokens/s and MFU of gptwo's step vs transformers' GPT2LMHeadModel; with
`--to-loss`, the steps, tokens, FLOPs and seconds each optimizer takes to a validation loss (docs/training.md).

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
import json
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
            "gptwo bench train compares against transformers, which is not installed", "pip install 'gptwo[bench]'"
        ) from None
    from gptwo.bench import quiet_transformers

    quiet_transformers()
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
    """The CLI's `gptwo bench train` (`--to-loss`: the time-to-loss bench)."""
    from gptwo.argtypes import print_report

    if args.to_loss is not None:
        _refuse_speed_options(args)
        report = bench_to_loss(
            args.out,
            args.to_loss,
            dict(args.lrs or []),
            dict(args.max_steps or []),
            args.eval_every,
            args.threads,
            args.dtype,
            args.data,
        )
        print_report(report, args.json, render_to_loss)
        return 0
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


def _refuse_speed_options(args: argparse.Namespace) -> None:
    """--to-loss trains the cpu preset as it is: a speed-bench option given with it would be silently ignored."""
    given = [
        key
        for key in ("batch_size", "steps", "n_layer", "n_head", "n_embd", "vocab_size", "block_size")
        if getattr(args, key) is not None
    ]
    if args.preset != "cpu":
        given.insert(0, "preset")
    if given:
        raise GptwoError(
            f"--{given[0].replace('_', '-')} does not apply to --to-loss (it trains the cpu preset as it is)",
            f"drop --{given[0].replace('_', '-')}",
        )


def _to_loss_target(text: str) -> str | float:
    """An argparse type: 'adamw' (AdamW's best final validation loss) or a loss in nats/token."""
    if text == "adamw":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'adamw' nor a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive loss in nats/token")
    return value


def _per_optimizer(kind: type):
    """An argparse type: OPTIMIZER=V1,V2,... (adamw or muon; positive values of `kind`)."""

    def parse(text: str) -> tuple[str, tuple]:
        name, sep, values = text.partition("=")
        if not sep or name not in TO_LOSS_LRS:
            raise argparse.ArgumentTypeError(f"{text!r} is not OPTIMIZER=V1,V2 with OPTIMIZER adamw or muon")
        try:
            parsed = tuple(kind(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{values!r} is not a list of {kind.__name__} values") from None
        if not all(math.isfinite(v) and v > 0 for v in parsed):
            raise argparse.ArgumentTypeError(f"{values!r} holds a value that is not positive")
        return name, parsed

    return parse


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
    loss = p.add_argument_group("time to loss (--to-loss): the cpu preset trained with each optimizer")
    loss.add_argument(
        "--to-loss",
        type=_to_loss_target,
        default=None,
        metavar="LOSS",
        help="report steps, tokens, FLOPs and seconds to this validation loss (nats/token), or 'adamw': AdamW's best "
        "final validation loss in the same bench",
    )
    loss.add_argument("--out", default="runs/bench-to-loss", help="folder of the runs, report.json and to-loss.png")
    loss.add_argument("--data", default=None, help="a prepared data folder (default: the built-in corpus, in OUT/data)")
    loss.add_argument(
        "--lrs",
        type=_per_optimizer(float),
        action="append",
        metavar="OPT=LR,...",
        help="peak learning rates of an optimizer (repeatable; default adamw=1.5e-3,3e-3,6e-3 muon=6e-3,1.2e-2,2.4e-2)",
    )
    loss.add_argument(
        "--max-steps",
        type=_per_optimizer(int),
        action="append",
        metavar="OPT=N,...",
        help="schedule lengths of an optimizer's runs (repeatable; default: the preset's 3000)",
    )
    loss.add_argument(
        "--eval-every",
        type=int_at_least(1, 100_000),
        default=100,
        help="steps between evaluations over the whole validation split (default 100)",
    )


# ---------------------------------------------------------------- time to loss
# around each optimizer's best on the cpu preset (docs/training.md: AdamW 3e-3, Muon 1.2e-2 to 2.4e-2)
TO_LOSS_LRS = {"adamw": (1.5e-3, 3e-3, 6e-3), "muon": (6e-3, 1.2e-2, 2.4e-2)}
TO_LOSS_TARGET = "adamw"  # AdamW's best final validation loss in the same bench


@dataclasses.dataclass(frozen=True)
class LossRun:
    """One training run of a time-to-loss bench: an optimizer at a peak learning rate and a schedule length."""

    optimizer: str
    lr: float
    max_steps: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}-lr{self.lr:g}-{self.max_steps}steps"


def bench_to_loss(
    out_dir: str = "runs/bench-to-loss",
    target: str | float = TO_LOSS_TARGET,
    lrs: dict[str, tuple[float, ...]] | None = None,
    max_steps: dict[str, tuple[int, ...]] | None = None,
    eval_every: int = 100,
    threads: int = 0,
    dtype: str = "auto",
    data_dir: str | None = None,
) -> dict:
    """Train the `cpu` preset with each optimizer and learning rate on the same data, seed and batch, and report
    the steps, tokens, FLOPs and seconds each took to reach a validation loss (docs/training.md).

    `target` is a loss in nats/token, or "adamw": the best final validation loss of the AdamW runs of the longest
    schedule. Runs take turns between optimizers, each in its own process; a run already finished in `out_dir`
    is read, not trained again.
    """
    from gptwo.train.quickstart import prepare_builtin

    runs = loss_runs(lrs, max_steps)
    if target == "adamw" and not any(run.optimizer == "adamw" for run in runs):
        raise GptwoError("--to-loss adamw needs AdamW runs", "give --lrs adamw=..., or a target loss as a number")
    if eval_every < 1:
        raise GptwoError(f"--eval-every {eval_every} must be at least 1", "pass a positive step count")
    data_dir = data_dir or os.path.join(out_dir, "data")
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        prepare_builtin(data_dir, progress=False)
    settings = _to_loss_settings(eval_every, threads, dtype)
    if not all(_finished(os.path.join(out_dir, run.name), run.max_steps) for run in runs):
        _warm_compile_cache(data_dir, out_dir, settings)
    results = [_loss_run(run, data_dir, out_dir, settings) for run in runs]
    optimizers = list(dict.fromkeys(run.optimizer for run in runs))
    step_s = step_seconds(optimizers, settings)
    longest = max(run.max_steps for run in runs if run.optimizer == "adamw") if target == "adamw" else None
    goal = (
        min(r["final_val_loss"] for r in results if r["optimizer"] == "adamw" and r["max_steps"] == longest)
        if target == "adamw"
        else float(target)
    )
    for result in results:
        result["reached"] = _reached(result, goal)
    best = {opt: _best_run([r for r in results if r["optimizer"] == opt], step_s[opt]) for opt in optimizers}
    report = {
        "bench": "train-to-loss",
        "preset": "cpu",
        "target": target,
        "target_loss": goal,
        "settings": settings,
        "tokens_per_step": results[0]["tokens_per_step"],
        "step_s_interleaved": step_s,
        "runs": results,
        "best": best,
        "vs_adamw": _versus_adamw(best),
    }
    plot_to_loss(report, os.path.join(out_dir, "to-loss.png"))
    from gptwo.fileio import atomic_write

    atomic_write(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1).encode())
    return report


def loss_runs(
    lrs: dict[str, tuple[float, ...]] | None = None, max_steps: dict[str, tuple[int, ...]] | None = None
) -> list[LossRun]:
    """Every optimizer x lr x schedule length, the optimizers taking turns (AdamW, Muon, AdamW, Muon...), so a
    machine that slows down part-way hits both alike."""
    lrs = {**TO_LOSS_LRS, **(lrs or {})}
    default_steps = (TRAIN_PRESETS["cpu"]["max_steps"],)
    per_optimizer = [
        [LossRun(opt, lr, steps) for steps in (max_steps or {}).get(opt, default_steps) for lr in values]
        for opt, values in lrs.items()
        if values
    ]
    if not per_optimizer:
        raise GptwoError("the bench has no runs", "give at least one learning rate with --lrs OPTIMIZER=LR")
    longest = max(len(runs) for runs in per_optimizer)
    return [runs[i] for i in range(longest) for runs in per_optimizer if i < len(runs)]


def _to_loss_settings(eval_every: int, threads: int, dtype: str) -> list[str]:
    """The overrides every run shares on top of the cpu preset: evaluation over the whole validation split every
    `eval_every` steps, logged at every evaluation, one checkpoint at the end, no samples; the quickstart's dtype."""
    from gptwo.train.speed import native_bf16

    if dtype == "auto":
        dtype = "bfloat16" if native_bf16() else "float32"
    return [
        f"eval_every={eval_every}",
        "eval_batches=1000",
        f"log_every={math.gcd(eval_every, 10)}",
        "sample_tokens=0",
        f"dtype={dtype}",
        f"threads={threads}",
    ]


def _finished(run_dir: str, max_steps: int) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoints", f"step_{max_steps}", "trainer.json"))


def step_seconds(optimizers: list[str], settings: list[str], rounds: int = 5, steps: int = 8) -> dict[str, float]:
    """Median seconds per training step of each optimizer at the cpu preset's shape, batch, dtype and threads, as
    `gptwo train` steps (compiled where it compiles a long run), in interleaved rounds in one process: unlike the
    runs' own seconds, a machine whose load changes slows every optimizer alike."""
    import torch

    from gptwo.config import load_train_config
    from gptwo.train.distributed import Dist
    from gptwo.train.loop import set_threads
    from gptwo.train.speed import CPU_COMPILE_MIN_STEPS, compile_enabled, keep_freed_memory

    workload = WORKLOADS["cpu"]
    model_config = GPTConfig(**workload["shape"])
    wanted = [s for s in settings if s.split("=")[0] in ("dtype", "threads")]
    config = load_train_config("cpu", overrides=wanted)
    device = torch.device("cpu")
    set_threads(config, Dist(), device)
    keep_freed_memory(device)
    shape = (config.batch_size, config.block_size + 1)
    tokens = torch.randint(0, model_config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    compiled = compile_enabled(config, device, CPU_COMPILE_MIN_STEPS)
    contenders = []
    for optimizer in optimizers:
        torch.manual_seed(0)
        model = _gptwo_model(model_config)
        opt_config = dataclasses.replace(config, optimizer=optimizer)
        contenders.append(_contender(optimizer, model, opt_config, device, tokens, compiled, hf=False))
    for contender in contenders:
        for _ in range(3):
            contender.step()
    for _ in range(rounds):
        for contender in contenders:
            contender.rounds.append(_timed(contender.step, steps, device))
    return {contender.name: statistics.median(contender.rounds) for contender in contenders}


def _train_command(data_dir: str, run_dir: str, overrides: list[str]) -> list[str]:
    """`gptwo train` of one bench run: continued (--resume) where an earlier bench started it."""
    import sys

    from gptwo.train.runfolder import has_started

    resume = ["--resume"] if has_started(run_dir) else []
    return [sys.executable, "-m", "gptwo.cli", "train", "--data", data_dir, "--out", run_dir, "--preset", "cpu"] + [
        *resume,
        *overrides,
    ]


def _warm_compile_cache(data_dir: str, out_dir: str, settings: list[str]) -> None:
    """A 2-step compiled run first, so every timed run finds the model's compiled kernels in Inductor's cache
    (the first run would otherwise pay the compilation the others skip)."""
    import shutil
    import subprocess

    scratch = os.path.join(out_dir, "compile-warmup")
    shutil.rmtree(scratch, ignore_errors=True)
    command = _train_command(data_dir, scratch, [*settings, "max_steps=2", "compile=true", "checkpoint_every=2"])
    subprocess.run(command, capture_output=True, check=False)
    shutil.rmtree(scratch, ignore_errors=True)


def _loss_run(run: LossRun, data_dir: str, out_dir: str, settings: list[str]) -> dict:
    """Train (or finish) one run in its own process and read its curve back from metrics.jsonl."""
    import subprocess
    import sys

    from gptwo.fileio import atomic_write
    from gptwo.train.metrics import read_metrics

    run_dir = os.path.join(out_dir, run.name)
    overrides = [
        *settings,
        f"optimizer={run.optimizer}",
        f"lr={run.lr!r}",
        f"max_steps={run.max_steps}",
        f"checkpoint_every={run.max_steps}",
    ]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(_train_command(data_dir, run_dir, overrides), capture_output=True, text=True)
    wall = time.perf_counter() - start
    atomic_write(os.path.join(out_dir, f"{run.name}.log"), (done.stdout + done.stderr).encode())
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GptwoError(f"the bench run {run.name} failed ({last})", f"see {os.path.join(out_dir, run.name)}.log")
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    with open(os.path.join(run_dir, "checkpoints", f"step_{run.max_steps}", "trainer.json"), encoding="utf-8") as f:
        config = json.load(f)["config"]
    tokens_per_step = config["batch_size"] * config["block_size"] * config["grad_accum"]
    evals = loss_curve(rows, tokens_per_step)
    if not evals:
        raise GptwoError(f"the bench run {run.name} logged no validation loss", "check the data's validation split")
    windows = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row][1:]  # the first holds start-up
    result = {
        **dataclasses.asdict(run),
        "name": run.name,
        "tokens_per_step": tokens_per_step,
        "final_val_loss": evals[-1]["val_loss"],
        "final_val_bpb": evals[-1].get("val_bpb"),
        "train_s": evals[-1]["seconds"],
        "s_per_step": tokens_per_step / statistics.median(windows) if windows else None,
        "wall_s": wall,
        "load": [load_before, os.getloadavg()[0]],
        "evals": evals,
    }
    print(
        f"{run.name}: val loss {result['final_val_loss']:.4f} after {run.max_steps} steps, "
        f"{result['train_s']:.0f} s training ({wall:.0f} s wall, load {load_before:.1f})",
        file=sys.stderr,
    )
    return result


def loss_curve(rows: list[dict], tokens_per_step: int) -> list[dict]:
    """Each evaluation of a run's metrics.jsonl with the training seconds, tokens and FLOPs up to its step.

    Seconds are the logged windows' (steps / steps-per-second) summed: training only, since the loop restarts its
    clock after each evaluation and checkpoint. Evaluations must fall on logged steps.
    """
    seconds, last_step, at = 0.0, 0, {}
    evals = []
    for row in rows:
        if "tokens_per_s" in row:
            seconds += (row["step"] - last_step) * tokens_per_step / row["tokens_per_s"]
            last_step = row["step"]
            at[row["step"]] = (seconds, row["flops"])
        if "val_loss" in row and row["step"] in at:
            elapsed, flops = at[row["step"]]
            evals.append(
                {
                    "step": row["step"],
                    "val_loss": row["val_loss"],
                    "val_bpb": row.get("val_bpb"),
                    "seconds": elapsed,
                    "tokens": row["step"] * tokens_per_step,
                    "flops": flops,
                }
            )
    return evals


def _reached(result: dict, goal: float) -> dict | None:
    """The first evaluation at or below `goal`, or None."""
    return next((row for row in result["evals"] if row["val_loss"] <= goal), None)


def _best_run(results: list[dict], step_s: float) -> dict:
    """An optimizer's fastest run to the target (fewest steps, then seconds), or its lowest final loss if none got
    there; `seconds_interleaved` is its steps at the step time measured in interleaved rounds (`step_s`)."""
    reached = [r for r in results if r["reached"]]
    if reached:
        best = min(reached, key=lambda r: (r["reached"]["step"], r["reached"]["seconds"]))
    else:
        best = min(results, key=lambda r: r["final_val_loss"])
    keys = ("step", "tokens", "flops", "seconds")
    return {
        "name": best["name"],
        "lr": best["lr"],
        "max_steps": best["max_steps"],
        "final_val_loss": best["final_val_loss"],
        "final_val_bpb": best["final_val_bpb"],
        "s_per_step": best["s_per_step"],
        "reached": (
            {**{key: best["reached"][key] for key in keys}, "seconds_interleaved": best["reached"]["step"] * step_s}
            if best["reached"]
            else None
        ),
    }


def _versus_adamw(best: dict) -> dict:
    """Each other optimizer's steps, tokens, FLOPs and seconds to the target over AdamW's."""
    anchor = best.get("adamw", {}).get("reached")
    out = {}
    for opt, row in best.items():
        if opt == "adamw" or not anchor:
            continue
        got = row["reached"]
        keys = ("step", "flops", "seconds", "seconds_interleaved")
        out[opt] = {key: got[key] / anchor[key] if got and anchor[key] else None for key in keys}
    return out


def plot_to_loss(report: dict, png_path: str) -> None:
    """Validation loss against steps and against training seconds, every run, the target as a line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from gptwo.fileio import atomic_write

    colours = {"adamw": "tab:blue", "muon": "tab:red"}
    best = {row["name"] for row in report["best"].values()}
    fig = Figure(figsize=(11, 4.2), dpi=100)
    axes = fig.subplots(1, 2, sharey=True)
    for result in report["runs"]:
        steps = [row["step"] for row in result["evals"]]
        seconds = [row["seconds"] for row in result["evals"]]
        losses = [row["val_loss"] for row in result["evals"]]
        style = dict(
            color=colours.get(result["optimizer"], "tab:gray"),
            linewidth=2.0 if result["name"] in best else 0.9,
            alpha=1.0 if result["name"] in best else 0.5,
            label=result["name"],
        )
        axes[0].plot(steps, losses, **style)
        axes[1].plot(seconds, losses, **style)
    for ax, label in zip(axes, ("step", "training seconds (this machine, shared: noisy)")):
        ax.axhline(report["target_loss"], color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    lows = [row["val_loss"] for result in report["runs"] for row in result["evals"]]
    axes[0].set_ylim(min(lows) - 0.05, min(lows) + 1.0)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"cpu preset, built-in corpus: time to validation loss {report['target_loss']:.3f} (dashed)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(png_path, buffer.getvalue())


def render_to_loss(report: dict) -> str:
    """The time-to-loss report as a table: every run, then each optimizer's best against AdamW's."""
    lines = [
        f"time to validation loss {report['target_loss']:.4f} nats/token"
        + (" (AdamW's best final)" if report["target"] == "adamw" else "")
        + f" on the cpu preset, {report['tokens_per_step']:,} tokens/step; seconds: training only, on a shared "
        "machine (noisy; steps do not depend on load)",
        f"{'run':28} {'final val':>9} {'bits/B':>7} {'s/step':>7} {'to target: step':>16} {'tokens':>11} "
        f"{'FLOPs':>9} {'seconds':>8}",
    ]
    for r in report["runs"]:
        got = r["reached"]
        reach = (
            f"{got['step']:16,} {got['tokens']:11,} {got['flops']:9.3g} {got['seconds']:8.0f}"
            if got
            else f"{'not reached':>16} {'':11} {'':9} {'':8}"
        )
        bpb = f"{r['final_val_bpb']:7.3f}" if r["final_val_bpb"] is not None else f"{'n/a':>7}"
        spp = f"{r['s_per_step']:7.4f}" if r["s_per_step"] else f"{'n/a':>7}"
        lines.append(f"{r['name']:28} {r['final_val_loss']:9.4f} {bpb} {spp} {reach}")
    interleaved = ", ".join(f"{opt} {sec:.4f}" for opt, sec in report["step_s_interleaved"].items())
    lines.append(f"s/step in interleaved rounds in one process (load hits all alike): {interleaved}")
    for opt, ratio in report["vs_adamw"].items():
        shown = ", ".join(f"{k} {v:.2f}x" if v is not None else f"{k} n/a" for k, v in ratio.items())
        lines.append(f"{opt} ({report['best'][opt]['name']}) vs adamw ({report['best']['adamw']['name']}): {shown}")
    return "\n".join(lines)
