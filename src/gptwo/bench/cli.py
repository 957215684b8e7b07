"""`gptwo bench decode|train|serve`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from gptwo.argtypes import (
    Parser,
    add_speculative_options,
    choice_list,
    command,
    float_in,
    int_at_least,
    print_report,
)
from gptwo.bench import MAX_THREADS
from gptwo.errors import GptwoError

VARIANT_NAMES = ("fp32", "bf16", "int8")  # bench decode/serve --variants (decode.VARIANTS, serve.VARIANTS)
WORKLOAD_NAMES = ("mixed", "join", "prefix", "throughput")  # bench serve --workload (serve_workloads.WORKLOADS)
MAX_ROUNDS = 1000
MAX_BATCH = 4096  # bench decode --batch-size
MAX_CLIENTS = 1024  # bench serve --clients: each is an open connection and a row of the server's batch
MAX_TOKENS = 1_000_000


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    from gptwo.bench.decode import decode_report, render_decode

    if args.draft_model or args.speculate:
        return _bench_speculative(args)
    if args.text is not None:
        raise GptwoError("--text sets the speculative benchmark's passage", "add --draft-model M or --speculate ngram")
    report = decode_report(
        args.model,
        device=args.device,
        variants=args.variants,
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens or 16,
        rounds=args.rounds,
        threads=args.threads,
        compile=args.compile,
        progress=not args.json,
        llama_cpp=args.llama_cpp,
        gguf=args.gguf,
        timeout=args.timeout,
        onnxruntime=args.onnxruntime,
    )
    print_report(report, args.json, render_decode)
    return 0


def _bench_speculative(args: argparse.Namespace) -> int:
    from gptwo.bench.speculative import render_speculative, speculative_report

    if args.batch_size != 1 or args.llama_cpp or args.gguf or args.onnxruntime or args.compile != "none":
        raise GptwoError(
            "the speculative benchmark times batch 1, eager, gptwo and transformers only",
            "drop --batch-size/--llama-cpp/--gguf/--onnxruntime/--compile, or drop --draft-model/--speculate",
        )
    report = speculative_report(
        args.model,
        draft_model=args.draft_model,
        speculate=args.speculate,
        text_file=args.text,
        device=args.device,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens or 128,
        rounds=args.rounds,
        k=args.num_speculative_tokens,
        threads=args.threads,
        progress=not args.json,
    )
    print_report(report, args.json, render_speculative)
    return 0


def _bench_options(p) -> None:
    """Options every `gptwo bench` workload takes."""
    p.add_argument(
        "--model", default=None, help="model folder or hub id to time (default: GPT-2 124M's shape with random weights)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout instead of a table (fields: docs/inference.md)",
    )


def _timeout_option(p, what: str) -> None:
    from gptwo.bench import DEFAULT_TIMEOUT_S, TIMEOUT_ENV

    p.add_argument(
        "--timeout",
        type=float_in(0, low_open=True),
        default=None,
        metavar="SECONDS",
        help=f"seconds {what} may take before it is stopped (default: ${TIMEOUT_ENV}, else {DEFAULT_TIMEOUT_S:g})",
    )


def _add_bench_decode(bsub) -> None:
    from gptwo.bench import COMPILE_MODES  # plain data: keeps --help fast

    p = command(
        bsub,
        "decode",
        _cmd_bench_decode,
        "Decoding tokens/s per precision (fp32, bf16, int8) vs transformers' generate, with the memory-bandwidth "
        "ceiling.",
    )
    _bench_options(p)
    p.add_argument(
        "--variants",
        type=choice_list(VARIANT_NAMES),
        default="fp32,bf16,int8",
        help="comma-separated precisions to time: fp32, bf16, int8 (default all three)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1, MAX_BATCH), default=1, help="prompts decoded together (default 1)"
    )
    p.add_argument(
        "--new-tokens",
        type=int_at_least(1, MAX_TOKENS),
        default=128,
        help="tokens generated per prompt, greedy (default 128)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int_at_least(1, MAX_TOKENS),
        default=None,
        help="tokens in each (random) prompt (default 16); with --draft-model/--speculate, the passage's tokens "
        "(default 128)",
    )
    p.add_argument(
        "--rounds",
        type=int_at_least(1, MAX_ROUNDS),
        default=5,
        help="interleaved timing rounds; the median counts (default 5)",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(1, MAX_THREADS),
        default=None,
        help="CPU threads for torch and llama-bench (default: torch's choice)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="none",
        help="torch.compile the decode step with this mode (reduce-overhead = CUDA graphs; max-autotune-frozen = "
        "frozen weights + Inductor's C++ GEMM template, faster for int8 on CPU); default none (eager)",
    )
    p.add_argument(
        "--llama-cpp",
        default=None,
        metavar="PATH",
        help="also time llama.cpp in the same rounds: its llama-bench binary or build folder (experiments/llamacpp.sh "
        "builds one); rows f32, f16, bf16, q8_0",
    )
    p.add_argument(
        "--gguf",
        default=None,
        metavar="DIR",
        help="with --llama-cpp: folder of model-{f32,f16,bf16,q8_0}.gguf for the same model (experiments/llamacpp.sh); "
        "default: convert now with the converter of the binary's source tree",
    )
    _timeout_option(p, "one call of llama-bench or of llama.cpp's GGUF converter")
    p.add_argument(
        "--onnxruntime",
        type=choice_list(("fp32", "int8")),
        default=(),
        metavar="fp32,int8",
        help="also time onnxruntime (CPU) in the same rounds on the model exported to ONNX: fp32 and/or int8 "
        "(dynamic quantization); needs gptwo[export]",
    )
    add_speculative_options(p)  # any of them: speculative vs plain decoding (gptwo.bench.speculative) instead
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="with --draft-model/--speculate: the passage the prompts come from (default: a built-in document); "
        "prompts: the passage then its first words (grounded: the output copies it) and its first words (open)",
    )


def _add_bench_train(bsub) -> None:
    from gptwo.bench.train import add_bench_train_command

    add_bench_train_command(bsub, command)


def _cmd_bench_lora(args: argparse.Namespace) -> int:
    if not args.quality and (args.task != "domain" or args.base is not None):
        raise GptwoError("--task and --base choose what --quality measures", "add --quality, or drop them")
    if args.quality:
        from gptwo.bench.lora_quality import lora_quality, render_quality

        report = lora_quality(
            args.out,
            task=args.task,
            base_steps=args.base_steps,
            steps=args.finetune_steps,
            full_lrs=args.full_lrs,
            lora_lrs=args.lora_lrs,
            full_wds=args.full_weight_decays,
            lora_wds=args.lora_weight_decays,
            rank=args.rank,
            alpha=args.alpha,
            targets=args.targets,
            threads=args.threads,
            base=args.base,
        )
        print_report(report, args.json, render_quality)
        return 0
    from gptwo.bench.lora import bench_lora, render_lora

    shape = {
        key: getattr(args, key)
        for key in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
        if getattr(args, key) is not None
    }
    report = bench_lora(
        args.variants,
        shape=shape,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=args.rank,
        alpha=args.alpha,
        targets=args.targets,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        dtype=args.dtype,
        threads=args.threads,
        device=args.device,
        anchors=not args.no_anchors,
        progress=True,  # on stderr: stdout is the table or the JSON
    )
    print_report(report, args.json, render_lora)
    return 0


def _float_list(parse, what: str):
    """An argparse type: comma-separated numbers, each read by `parse`, at least one."""

    def parse_list(text: str) -> tuple[float, ...]:
        values = tuple(parse(v.strip()) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} holds no {what}")
        return values

    return parse_list


_lr_list = _float_list(float_in(0, low_open=True), "learning rate")  # positive
_weight_decay_list = _float_list(float_in(0, 10), "weight decay")  # 0 or more


def _add_bench_lora(bsub) -> None:
    from gptwo.bench.lora import VARIANTS  # no torch: keeps --help fast

    p = command(
        bsub,
        "lora",
        _cmd_bench_lora,
        "Full fine-tuning vs LoRA from fp32, bf16 and int8 bases on GPT-2 124M's shape: trainable parameters, peak "
        "RSS and step time, each row in its own process, transformers and peft as the anchors; --quality: LoRA's "
        "share of full fine-tuning's loss improvement on a held-out domain or a synthetic instruction set.",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table (docs/training.md)")
    p.add_argument(
        "--variants",
        type=choice_list(VARIANTS),
        default=",".join(VARIANTS),
        help="comma-separated rows: full (fine-tuning every parameter) and LoRA from an fp32, bf16 or int8 base "
        "(default all four)",
    )
    p.add_argument("--rank", type=int_at_least(1, 4096), default=8, help="LoRA rank r (default 8)")
    p.add_argument(
        "--alpha", type=float_in(0, low_open=True), default=None, help="LoRA alpha (default: the rank, a scale of 1)"
    )
    p.add_argument(
        "--targets",
        type=choice_list(("c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj")),
        default=None,
        help="comma-separated layers to adapt, as lora_targets= (default c_attn,c_proj,c_fc)",
    )
    p.add_argument("--batch-size", type=int_at_least(1, MAX_BATCH), default=1, help="sequences per step (default 1)")
    p.add_argument("--seq-len", type=int_at_least(1, MAX_TOKENS), default=256, help="tokens per sequence (default 256)")
    p.add_argument(
        "--steps", type=int_at_least(1, 100_000), default=1, help="timed steps per row per round (default 1)"
    )
    p.add_argument(
        "--rounds",
        type=int_at_least(1, MAX_ROUNDS),
        default=3,
        help="interleaved rounds; each row's median counts (default 3)",
    )
    p.add_argument("--warmup", type=int_at_least(0, 100_000), default=1, help="untimed steps first (default 1)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="autocast of every row, as train's dtype= (auto: bf16 on CUDA, float32 on a CPU); a bf16 or int8 base "
        "computes in bf16 whatever this says",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(0, MAX_THREADS),
        default=0,
        help="CPU threads of every row (default 0: this process's cores, as 'gptwo train' takes them)",
    )
    p.add_argument("--no-anchors", action="store_true", help="gptwo's rows only (no transformers or peft)")
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        p.add_argument(
            f"--{key.replace('_', '-')}", type=int_at_least(1), default=None, help=f"override GPT-2 124M's {key}"
        )
    quality = p.add_argument_group(
        "quality (--quality): full fine-tuning vs LoRA on a domain the base never saw, or on an instruction set"
    )
    quality.add_argument(
        "--quality",
        action="store_true",
        help="train a cpu-preset base on the built-in corpus' module docstrings, fine-tune it on --task's data "
        "(fully and with LoRA, equal steps) and report recovery = LoRA's loss improvement / full's",
    )
    quality.add_argument(
        "--task",
        choices=["domain", "instruct"],
        default="domain",
        help="domain (default): the language reference topics, scored by validation loss; instruct: a synthetic "
        "instruction set as chat (reverse, add, capitals), scored by the held-out answers' loss and exact match",
    )
    quality.add_argument(
        "--out",
        default="runs/bench-lora",
        help="folder of the data, base, runs and report.json (instruct: OUT/instruct/; the base is shared)",
    )
    quality.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="--task instruct: fine-tune this model folder (its tokenizer prepares the data) instead of training "
        "the cpu-preset base",
    )
    quality.add_argument(
        "--base-steps", type=int_at_least(1, 1_000_000), default=None, help="steps of the base (default 400)"
    )
    quality.add_argument(
        "--finetune-steps",
        type=int_at_least(1, 1_000_000),
        default=None,
        help="steps of every fine-tuning run (default: domain 150, instruct 450)",
    )
    quality.add_argument(
        "--full-lrs",
        type=_lr_list,
        default=None,
        metavar="LR,...",
        help="full fine-tuning's peak lrs (default: domain 1e-3, instruct 1e-3,3e-3)",
    )
    quality.add_argument(
        "--lora-lrs",
        type=_lr_list,
        default=None,
        metavar="LR,...",
        help="LoRA's peak lrs (default: domain 3e-2, instruct 1e-2,2e-2)",
    )
    for method, who in (("full", "full fine-tuning's"), ("lora", "LoRA's")):
        quality.add_argument(
            f"--{method}-weight-decays",
            type=_weight_decay_list,
            default=None,
            metavar="WD,...",
            help=f"{who} AdamW weight decays, each run at every lr (default: domain 0.1, instruct 0.1,0.3)",
        )


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from gptwo.bench.serve import render_serve, serve_report
    from gptwo.bench.serve_workloads import Sizes

    variants = ("int8",) if args.quantize else (args.dtype,) if args.dtype else args.variants
    sizes = Sizes(throughput_clients=args.clients, throughput_new=args.tokens, prefix_at_once=args.prefix_at_once)
    report = serve_report(
        args.model,
        device=args.device,
        workloads=args.workload,
        variants=variants,
        rounds=args.rounds,
        threads=args.threads,
        compare_src=args.compare_src,
        llama_server=args.llama_server,
        gguf=args.gguf,
        serve_args=args.serve_args,
        sizes=sizes,
        progress=True,  # on stderr: stdout is the table or the JSON
        timeout=args.timeout,
    )
    print_report(report, args.json, render_serve)
    return 0


def _add_bench_serve(bsub) -> None:
    p = command(
        bsub,
        "serve",
        _cmd_bench_serve,
        "Serving workloads (mixed prompt lengths, a long prompt joining running streams, a shared prefix, "
        "64-client throughput) on `gptwo serve`, on other gptwo trees and on llama.cpp's llama-server, same run.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model folder or hub id the servers load (default: 6 layers, width 384, context 1024, GPT-2's "
        "vocabulary, random weights; or --gguf DIR's hf/ folder)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of tables (fields: docs/serve.md)"
    )
    p.add_argument(
        "--workload",
        type=choice_list(WORKLOAD_NAMES),
        default=",".join(WORKLOAD_NAMES),
        help=f"comma-separated workloads: {', '.join(WORKLOAD_NAMES)} (default all; docs/serve.md says what each "
        "measures)",
    )
    p.add_argument(
        "--variants",
        type=choice_list(VARIANT_NAMES),
        default="fp32,bf16,int8",
        help="comma-separated server weights: fp32, bf16, int8 (llama-server: f32, bf16, q8_0); default all three",
    )
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="only these weights (shorthand for --variants)"
    )
    p.add_argument(
        "--quantize", choices=["int8"], default=None, help="only int8 weight-only (shorthand for --variants int8)"
    )
    p.add_argument(
        "--clients",
        type=int_at_least(1, MAX_CLIENTS),
        default=64,
        help="throughput workload: concurrent streaming clients (default 64)",
    )
    p.add_argument(
        "--tokens",
        type=int_at_least(1, MAX_TOKENS),
        default=32,
        help="throughput workload: tokens each request generates (default 32)",
    )
    p.add_argument(
        "--prefix-at-once",
        type=int_at_least(1, 16),
        default=1,
        help="prefix workload: requests sent together (default 1: one after another)",
    )
    p.add_argument(
        "--rounds",
        type=int_at_least(1, MAX_ROUNDS),
        default=3,
        help="interleaved rounds; each row's medians count (default 3)",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(1, MAX_THREADS),
        default=None,
        help="threads of each server (torch's, llama-server's) and of transformers (default: torch's choice here)",
    )
    p.add_argument(
        "--compare-src",
        action="append",
        default=[],
        metavar="DIR",
        help="also run `gptwo serve` of another gptwo source tree (DIR/src on PYTHONPATH, this Python), e.g. "
        "`git worktree add /tmp/before COMMIT`; the first is 'before' in the ratios (repeatable)",
    )
    p.add_argument(
        "--llama-server",
        default=None,
        metavar="PATH",
        help="also run llama.cpp's llama-server (its binary or build folder; experiments/llamacpp.sh builds one) on "
        "GGUF files of the same model",
    )
    p.add_argument(
        "--gguf",
        default=None,
        metavar="DIR",
        help="with --llama-server: folder of model-{f32,bf16,q8_0}.gguf (experiments/llamacpp.sh's OUT/serve; its "
        "hf/ is then the model); default: convert now with the converter of the binary's source tree",
    )
    p.add_argument(
        "--serve-args",
        default="",
        metavar="ARGS",
        help="more `gptwo serve` options for every gptwo server, e.g. --serve-args='--kv-cache-memory 1.5'; "
        "an option a tree lacks is left out of it (the report says so)",
    )
    _timeout_option(p, "a server's start, or one request,")


def _cmd_bench_watermark(args: argparse.Namespace) -> int:
    from gptwo.bench.watermark import render_watermark, watermark_report
    from gptwo.watermark import WatermarkSettings, settings_from_args

    args.watermark = True  # the settings options below need no --watermark
    report = watermark_report(
        args.model,
        args.source,
        settings=settings_from_args(args) or WatermarkSettings(),
        texts=args.texts,
        human=args.human,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        seed=args.seed,
        device=args.device,
        progress=not args.json,
    )
    print_report(report, args.json, render_watermark)
    return 0


def _add_bench_watermark(bsub) -> None:
    from gptwo.argtypes import add_watermark_options

    p = command(
        bsub,
        "watermark",
        _cmd_bench_watermark,
        "The watermark on a trained model: detection at z >= 4, false positives on held-out human text, perplexity "
        "cost, robustness to replaced tokens, sampling speed; transformers' WatermarkDetector as the anchor.",
    )
    p.add_argument("--model", required=True, help="a trained model folder (or run folder) to sample from")
    p.add_argument(
        "--source", required=True, help="a prepared data folder (its val split is the human text) or a folder of .txt"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields: docs/detect.md)")
    for name, what, default in (("texts", "texts generated", 100), ("human", "human texts scored", 200)):
        shown = f"{what} (default {default}, or the source's passages)"
        p.add_argument(f"--{name}", type=int_at_least(1, 100_000), default=None, help=shown)
    p.add_argument("--prompt-tokens", type=int_at_least(1, MAX_TOKENS), default=16, help="prompt length (default 16)")
    p.add_argument(
        "--new-tokens",
        type=int_at_least(1, MAX_TOKENS),
        default=None,
        help="tokens per text (default 200, or what the model's context leaves after the prompt)",
    )
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed (default 0)")
    add_watermark_options(p, "(always on here; the options below set it)")


# Each workload registers its `gptwo bench` subcommand here (a function of the group's subparsers).
BENCH_COMMANDS: list[Callable] = [
    _add_bench_decode,
    _add_bench_train,
    _add_bench_lora,
    _add_bench_serve,
    _add_bench_watermark,
]


def add_commands(sub) -> None:
    """`gptwo bench decode|train|serve`: speed on the user's hardware, transformers as the same-run anchor."""
    bench = sub.add_parser(
        "bench",
        help="Measure speed on this machine against transformers in the same run.",
        description="Measure speed on this machine: each workload runs through transformers in the same "
        "process as the anchor (interleaved rounds, medians) and reports ratios.",
    )
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser, metavar="WORKLOAD")
    for add in BENCH_COMMANDS:
        add(bsub)


def add_kernel_commands(sub) -> None:
    """`gptwo kernels info|build` (gptwo/infer/cli.py)."""
    from gptwo.infer.cli import add_commands

    add_commands(sub)
