"""`gptwo bench lora`: trainable parameters, peak memory (RSS) and step time of full fine-tuning vs LoRA from
fp32, bf16 and int8 bases (docs/training.md, LoRA); with `--quality`, LoRA's share of full fine-tuning's loss
improvement on a held-out domain (gptwo.bench.lora_quality).

Every row runs in its own process, so one row's peak memory is its own: the process builds its model (random
weights: memory and time do not depend on them) and optimizer, then its peak RSS is reset (Linux's
/proc/self/clear_refs) and counts from the first training step on. gptwo's rows take the step `gptwo train`
takes (gptwo.bench.train's contender: oneDNN linears in float32 on a CPU, fused AdamW, clipping). The anchors
are transformers' GPT2LMHeadModel of the same shape for full fine-tuning and peft's LoRA on it for the LoRA
rows (same rank, alpha and targets, so the same trainable count; on a bf16 base its adapters stay float32, as
peft keeps them and as gptwo's are). peft's int8 base needs bitsandbytes, a CUDA library, so the int8 row has
no anchor. The processes stay up and take turns (interleaved rounds; each row's median counts).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time

from gptwo.config import MODEL_PRESETS, GPTConfig
from gptwo.errors import GptwoError

VARIANTS = ("full", "fp32", "bf16", "int8")  # full fine-tuning, then LoRA from each base (--variants)
SHAPE = dict(vocab_size=50257, block_size=1024, **MODEL_PRESETS["gpt2"])  # GPT-2 124M
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured configuration: who trains (gptwo, transformers, peft), how (full or lora), from which base."""

    name: str
    method: str
    base: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.method}" + (f" {self.base} base" if self.method == "lora" else "")


def rows_for(variants: tuple[str, ...], anchors: bool) -> list[Row]:
    """gptwo's row of each variant, each followed by its anchor (none for an int8 base)."""
    rows = []
    for variant in variants:
        if variant == "full":
            rows += [Row("gptwo", "full", "fp32")] + ([Row("transformers", "full", "fp32")] if anchors else [])
        else:
            rows.append(Row("gptwo", "lora", variant))
            if anchors and variant != "int8":
                rows.append(Row("peft", "lora", variant))
    return rows


def analytic_trainable(config: GPTConfig, rank: int, targets: tuple[str, ...]) -> int:
    """r·(in + out) summed over the targeted layers: the adapters' parameter count."""
    import torch

    from gptwo.lora import layer_shape, target_layers
    from gptwo.model import GPT

    with torch.device("meta"):  # the layers' names only: nothing allocated
        names = target_layers(GPT(config), targets)
    return sum(rank * sum(layer_shape(config.n_embd, name)) for name in names)


def bench_lora(
    variants: tuple[str, ...] = VARIANTS,
    shape: dict | None = None,
    batch_size: int = 1,
    seq_len: int = 256,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] | None = None,
    steps: int = 1,
    rounds: int = 3,
    warmup: int = 1,
    dtype: str = "auto",
    threads: int = 0,
    device: str = "cpu",
    anchors: bool = True,
    progress: bool = True,
) -> dict:
    """Trainable parameters, peak RSS and median step time of each variant and its anchor; the report."""
    from gptwo.lora import DEFAULT_TARGETS, LoraSettings

    targets = tuple(targets or DEFAULT_TARGETS)
    config = GPTConfig(**{**SHAPE, **(shape or {})})
    if seq_len > config.block_size:
        raise GptwoError(
            f"--seq-len {seq_len} is longer than the model's context of {config.block_size}",
            f"use --seq-len {config.block_size} or less, or a longer --block-size",
        )
    if min(batch_size, seq_len, rank, steps, rounds) < 1 or warmup < 0:
        raise GptwoError(
            "--batch-size, --seq-len, --rank, --steps and --rounds must be at least 1, --warmup 0 or more",
            "pass positive counts",
        )
    if dtype not in ("auto", "float32", "bfloat16"):
        raise GptwoError(f"--dtype {dtype!r} is unknown", "use auto, float32 or bfloat16")
    settings = LoraSettings(rank=rank, alpha=float(alpha if alpha is not None else rank), targets=targets)
    analytic = analytic_trainable(config, rank, targets)  # also checks the targets name layers
    rows = rows_for(tuple(variants), anchors)
    if anchors:
        _check_anchor_libraries(rows)
    threads = threads or _default_threads()
    spec = dict(
        shape=config.to_dict(),
        batch_size=batch_size,
        seq_len=seq_len,
        rank=rank,
        alpha=settings.alpha,
        targets=list(targets),
        warmup=warmup,
        dtype=dtype,
        threads=threads,
        device=device,
    )
    children = []
    try:
        for row in rows:  # all start together (imports and builds are not timed); each reports when warm
            children.append(_Child(row, spec))
        for child in children:
            ready = child.wait_ready()
            if progress:
                warm = f"{ready['trainable_params']:,} trainable, warm-up {ready['warmup_s']:.1f} s"
                print(f"{child.row.label}: ready ({warm})", file=sys.stderr)
        for number in range(1, rounds + 1):
            for child in children:
                child.seconds.append(child.run(steps) / steps)
            if progress:
                shown = ", ".join(f"{c.row.label} {c.seconds[-1]:.3f}" for c in children)
                print(f"round {number}/{rounds} s/step: {shown}", file=sys.stderr)
        results = [child.finish() for child in children]
    finally:
        for child in children:
            child.close()
    report_rows = _report_rows(results, batch_size * seq_len, analytic)
    first = results[0]["ready"] if results else {}
    return {
        "bench": "lora",
        "device": first.get("device"),
        "threads": threads if device == "cpu" else None,
        "torch": first.get("torch"),
        "transformers": first.get("transformers"),
        "peft": first.get("peft"),
        "shape": config.to_dict(),
        "n_params": first.get("n_params"),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": batch_size * seq_len,
        "dtype": dtype,
        "lora": {"rank": rank, "alpha": settings.alpha, "targets": list(targets)},
        "analytic_trainable": analytic,
        "steps": steps,
        "rounds": rounds,
        "warmup": warmup,
        "weights": "random (memory and step time do not depend on them)",
        "peak_rss_from": "the first training step (the build's peak is process_peak_rss_mib)",
        "rows": report_rows,
    }


def _default_threads() -> int:
    from gptwo.train.loop import cpu_cores

    return cpu_cores()


def _check_anchor_libraries(rows: list[Row]) -> None:
    """transformers for every anchor, peft for the LoRA rows' (before any process starts)."""
    import importlib.util

    needed = ["transformers"] + (["peft"] if any(row.name == "peft" for row in rows) else [])
    for module in needed:
        if importlib.util.find_spec(module) is None:
            raise GptwoError(
                f"gptwo bench lora compares against {module}, which is not installed",
                "pip install 'gptwo[bench]', or pass --no-anchors",
            )


def _report_rows(results: list[dict], tokens_per_step: int, analytic: int) -> list[dict]:
    """One row per process; `vs_anchor` is the anchor's s/step over this row's (above 1: faster than it)."""
    rows = []
    for result in results:
        row, ready, done = result["row"], result["ready"], result["done"]
        s_per_step = statistics.median(result["seconds"])
        rows.append(
            {
                "name": row.name,
                "method": row.method,
                "base": row.base,
                "trainable_params": ready["trainable_params"],
                "trainable_fraction": ready["trainable_params"] / ready["n_params"],
                "analytic_trainable": analytic if row.method == "lora" else ready["n_params"],
                "s_per_step": s_per_step,
                "tokens_per_s": tokens_per_step / s_per_step,
                "seconds": result["seconds"],
                "peak_rss_mib": done["peak_rss_mib"],
                "process_peak_rss_mib": ready["build_peak_rss_mib"],
                "start_rss_mib": ready["start_rss_mib"],
                "cuda_peak_mib": done.get("cuda_peak_mib"),
                "anchor": row.name != "gptwo",
            }
        )
    full = next((r for r in rows if r["name"] == "gptwo" and r["method"] == "full"), None)
    for r in rows:
        if r["name"] == "gptwo":
            kind = "transformers" if r["method"] == "full" else "peft"
            same = (r["method"], r["base"])
            anchor = next((a for a in rows if a["name"] == kind and (a["method"], a["base"]) == same), None)
            r["vs_anchor"] = anchor["s_per_step"] / r["s_per_step"] if anchor else None
            r["rss_vs_anchor"] = r["peak_rss_mib"] / anchor["peak_rss_mib"] if anchor else None
        else:
            r["vs_anchor"] = r["rss_vs_anchor"] = None
        r["rss_vs_full"] = r["peak_rss_mib"] / full["peak_rss_mib"] if full else None
        r["time_vs_full"] = r["s_per_step"] / full["s_per_step"] if full else None
    return rows


class _Child:
    """A row's own process (`python -c ... child_main`), driven line by line: steps to time in, JSON out."""

    def __init__(self, row: Row, spec: dict):
        self.row, self.seconds = row, []
        self.ready: dict = {}
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        code = "import sys; from gptwo.bench.lora import child_main; child_main(sys.argv[1])"
        payload = json.dumps({**spec, **dataclasses.asdict(row)})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, payload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                message = json.loads(line)
                if "error" in message:
                    raise GptwoError(f"{self.row.label}: {message['error']}", message.get("fix", "see the error"))
                return message
        self.proc.wait()
        self.log.seek(0)
        last = (self.log.read().strip().splitlines() or ["no output"])[-1]
        raise GptwoError(
            f"the process of {self.row.label} ended (exit {self.proc.returncode}: {last})",
            "check free memory, or bench a smaller shape",
        )

    def _send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the reply says what happened

    def wait_ready(self) -> dict:
        self.ready = self._reply()
        return self.ready

    def run(self, steps: int) -> float:
        self._send(str(steps))
        return self._reply()["seconds"]

    def finish(self) -> dict:
        self._send("stop")
        done = self._reply()
        return {"row": self.row, "ready": self.ready, "seconds": self.seconds, "done": done}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- in the row's own process
def _status_mib(field: str) -> float | None:
    """VmRSS or VmHWM of this process in MiB (Linux); None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        return None
    return None


def _peak_rss_mib() -> float:
    peak = _status_mib("VmHWM")
    if peak is None:  # not Linux: ru_maxrss (kilobytes on Linux, bytes on macOS)
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB
    return peak


def _reset_peak_rss() -> bool:
    """Start counting this process's peak RSS again from now (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def child_main(payload: str) -> None:
    """A row's process: build, warm up, report; then time the steps asked for on stdin until 'stop'."""
    try:
        _child(json.loads(payload))
    except GptwoError as err:
        _send({"error": err.what, "fix": err.fix})
        raise SystemExit(1) from None


def _child(spec: dict) -> None:
    import torch

    from gptwo.bench.train import _device_name, _sync, _timed, _transformers_version
    from gptwo.weights import resolve_device

    device = resolve_device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    start_rss = _status_mib("VmRSS")
    torch.manual_seed(0)
    model, step, n_params = _build(spec, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    import gc

    gc.collect()
    build_peak = _peak_rss_mib()
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    _send(
        {
            "trainable_params": trainable,
            "n_params": n_params,
            "start_rss_mib": start_rss,
            "build_peak_rss_mib": build_peak,
            "peak_reset": reset,
            "warmup_s": time.perf_counter() - start,
            "device": _device_name(device),
            "torch": torch.__version__,
            "transformers": _transformers_version(),
            "peft": _peft_version(),
        }
    )
    for line in sys.stdin:
        command = line.strip()
        if command == "stop":
            break
        _send({"seconds": _timed(step, int(command), device)})
    done = {"peak_rss_mib": _peak_rss_mib()}
    if device.type == "cuda":
        done["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    _send(done)


def _peft_version() -> str | None:
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


def _build(spec: dict, device):
    """The row's model and its training step (gptwo.bench.train's: the step `gptwo train` takes), and N, the
    parameters of the plain model (tied embedding once, position embedding included)."""
    import torch

    from gptwo.bench.train import _contender, _gptwo_model, _hf_model
    from gptwo.config import TrainConfig
    from gptwo.lora import LoraSettings, apply_lora

    config = GPTConfig(**spec["shape"])
    train_config = TrainConfig(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        block_size=spec["seq_len"],
        batch_size=spec["batch_size"],
        lr=1e-4,
        dtype=spec["dtype"],
        compile="false",
        device=str(device),
        threads=spec["threads"],
    )
    tokens = torch.randint(
        0, config.vocab_size, (spec["batch_size"], spec["seq_len"] + 1), generator=torch.Generator().manual_seed(0)
    ).to(device)
    hf = spec["name"] != "gptwo"
    model = _hf_model(config) if hf else _gptwo_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    if spec["method"] == "lora":
        targets = tuple(spec["targets"])
        if hf:
            model = _peft_model(model, spec["rank"], spec["alpha"], targets, spec["base"])
        else:
            apply_lora(model, LoraSettings(rank=spec["rank"], alpha=spec["alpha"], targets=targets), base=spec["base"])
    contender = _contender(spec["name"], model, train_config, device, tokens, compiled=False, hf=hf)
    return model, contender.step, n_params


def _peft_model(model, rank: int, alpha: float, targets: tuple[str, ...], base: str):
    """peft's LoRA on transformers' GPT-2: its Conv1D layers (fan_in_fan_out), the base frozen in `base`
    precision, the adapters float32 (peft's autocast_adapter_dtype)."""
    import torch
    from peft import LoraConfig, get_peft_model

    if base == "bf16":
        model = model.to(torch.bfloat16)
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), fan_in_fan_out=True)
    return get_peft_model(model, lora)


# ---------------------------------------------------------------- the table
def render_lora(report: dict) -> str:
    """The report as a table."""
    from gptwo.bench import render_table

    shape = report["shape"]
    lora = report["lora"]
    head = [
        f"fine-tuning on {report['device']}"
        + (f" ({report['threads']} threads)" if report["threads"] else "")
        + f": {shape['n_layer']}L {shape['n_head']}H {shape['n_embd']}d vocab {shape['vocab_size']} "
        f"({report['n_params']:,} params, random weights), batch {report['batch_size']} x {report['seq_len']} tokens, "
        f"AdamW, dtype {report['dtype']}",
        f"LoRA r={lora['rank']} alpha={lora['alpha']:g} on {','.join(lora['targets'])}: "
        f"{report['analytic_trainable']:,} = r*(in+out) summed over the targeted layers",
        f"s/step: median of {report['rounds']} interleaved rounds x {report['steps']} steps after {report['warmup']} "
        "warm-up; peak RSS: each row's own process, from its first training step",
    ]
    rows = [
        {
            **row,
            "row": f"{row['name']} {row['method']}",
            "trainable": row["trainable_params"],
            "pct": 100 * row["trainable_fraction"],
            "vs": f"{row['vs_anchor']:.2f}x" if row["vs_anchor"] else None,
        }
        for row in report["rows"]
    ]
    columns = [
        ("row", "row", ""),
        ("base", "base", ""),
        ("trainable", "trainable", ",d"),
        ("pct", "%", ".2f"),
        ("peak_rss_mib", "peak RSS MiB", ",.0f"),
        ("rss_vs_full", "RSS/full", ".2f"),
        ("s_per_step", "s/step", ".3f"),
        ("time_vs_full", "time/full", ".2f"),
        ("vs", "speed vs anchor", ""),
    ]
    return "\n".join(head + [render_table(rows, columns)])
