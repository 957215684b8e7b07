"""The `gptwo` command line: one parser, each subcommand a thin shell over a library function.

Each area of the package registers its subcommands in its own `add_*_commands` function below;
library imports happen inside the command functions so `gptwo --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, Sequence

from gptwo.errors import GptwoError, from_library_error

MAX_SEED = 2**63 - 1  # torch's seeds are 64-bit


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error: … — …` line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} — see '{self.prog} --help'\n")
        raise SystemExit(2)


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= `low` (and <= `high`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is more than {high:,}")
        return value
    return parse


_seed = _int_at_least(0, MAX_SEED)


def _float_in(low: float, high: float = float("inf"), low_open: bool = False, high_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite float in the range from `low` to `high` (open or closed ends)."""
    shown = f"{'(' if low_open else '['}{low:g}, {'inf' if high == float('inf') else f'{high:g}'}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number in {shown}")
        return value
    return parse


def _text_argument(value: str, what: str) -> str:
    """A text argument, or stdin for '-', as valid UTF-8 text (undecodable bytes are an input error)."""
    if value != "-":
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise GptwoError(f"{what} is not valid UTF-8 text", "pass the text in UTF-8") from None
        return value
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptwoError(f"{what} from stdin is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})",
                         "pipe UTF-8 text, e.g. through iconv -f latin1 -t utf-8") from None


def _command(sub, name: str, func: Callable[[argparse.Namespace], int | None], help: str, **kw):
    parser = sub.add_parser(name, help=help, description=help, **kw)
    parser.set_defaults(func=func)
    return parser


# --------------------------------------------------------------------------- inference options (gptwo.infer)
def add_inference_options(p) -> None:
    """`--dtype` and `--quantize`, shared by the commands that run a finished model."""
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="weights and activations in this precision, re-laid for fast decoding (default: as stored, unchanged)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8 weight-only quantization (per-channel scales): ~4x smaller weights, faster CPU decoding (docs/inference.md)")


# --------------------------------------------------------------------------- core
def _cmd_generate(args: argparse.Namespace) -> int:
    from gptwo.generate import generate_cli_stream

    prompt = _text_argument(args.prompt, "PROMPT")
    for piece in generate_cli_stream(
        args.model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or None,
        num_samples=args.num_samples,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from gptwo.data.sources import check_inputs, iter_documents
    from gptwo.tokenizer import Tokenizer

    check_inputs(args.inputs)
    tok = Tokenizer.train(iter_documents(args.inputs), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    tok.save(args.out)
    print(f"trained byte-level BPE with {tok.n_vocab} tokens -> {args.out}", file=sys.stderr)
    return 0


def _cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    from gptwo.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = _text_argument(args.text, "TEXT")
    print(" ".join(map(str, tok.encode(text))))
    return 0


def add_core_commands(sub) -> None:
    from gptwo.tokenizer import MAX_VOCAB  # plain constant: keeps --help fast

    p = _command(sub, "generate", _cmd_generate, "Sample a continuation of PROMPT from a model (streams to stdout).")
    p.add_argument("prompt", help="prompt text, or '-' to read it from stdin")
    p.add_argument("--model", required=True, help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2")
    p.add_argument("--max-new-tokens", type=_int_at_least(0), default=100, help="number of tokens to generate (default 100)")
    p.add_argument("--temperature", type=_float_in(0.0), default=1.0, help="sampling temperature; 0 means greedy (default 1.0)")
    p.add_argument("--top-k", type=_int_at_least(1), default=None, help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True, high_open=False), default=None, help="nucleus sampling: smallest set of tokens with total probability >= P")
    p.add_argument("--seed", type=_seed, default=None, help="random seed for reproducible samples")
    p.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable, at most 16 of at most 1024 characters each); it is not printed")
    p.add_argument("--num-samples", type=_int_at_least(1), default=1, help="number of independent samples, separated by a line of dashes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    add_inference_options(p)

    tok = sub.add_parser("tokenizer", help="Train or use a byte-level BPE tokenizer.", description="Train or use a byte-level BPE tokenizer.")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    p = _command(tsub, "train", _cmd_tokenizer_train, "Train a byte-level BPE (GPT-2 style) on your own text.")
    p.add_argument("inputs", nargs="+", help="text files or folders (.txt, .md, .jsonl, .jsonl.zst, .parquet with a 'text' field), 'builtin' or hf:NAME; each must exist")
    p.add_argument("--vocab-size", type=_int_at_least(257, MAX_VOCAB), required=True, help="vocabulary size, including 256 byte tokens and <|endoftext|>")
    p.add_argument("--min-frequency", type=_int_at_least(0), default=2, help="minimum pair frequency for a merge (default 2)")
    p.add_argument("--out", required=True, help="output tokenizer file (JSON)")
    p = _command(tsub, "encode", _cmd_tokenizer_encode, "Print the token ids of TEXT.")
    p.add_argument("text", help="text to encode, or '-' for stdin")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer file (default gpt2)")


# --------------------------------------------------------------------------- data
def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from gptwo.data.prepare import prepare

    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction, workers=args.workers,
                   shard_tokens=args.shard_tokens, seed=args.seed, text_field=args.text_field, progress=not args.quiet)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"{train['documents']} documents, {meta['train_tokens']:,} tokens in {len(train['shards'])} train shard(s); "
          f"{val['documents']} documents, {meta['val_tokens']:,} tokens in {len(val['shards'])} val shard(s) -> {args.out}", file=sys.stderr)
    return 0


def add_data_commands(sub) -> None:
    """`gptwo prepare` (training issue, data part)."""
    from gptwo.data import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION

    p = _command(sub, "prepare", _cmd_data_prepare, "Tokenize a text corpus into train/val token shards for 'gptwo train'.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files or folders (.txt, .md, .jsonl, .jsonl.zst, .parquet), 'builtin' (Python's own docs, no download) "
                        "or hf:NAME[:CONFIG][@SPLIT] (a Hugging Face dataset, streamed; e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1)")
    p.add_argument("--out", required=True, help="output folder: shards, tokenizer.json, meta.json (a previous preparation there is replaced only once the new one is complete)")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (default), a tokenizer.json file, or a model folder holding one")
    p.add_argument("--val-fraction", type=_float_in(0.0, 1.0), default=DEFAULT_VAL_FRACTION,
                   help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION}; at least one document, "
                        "or the end of a single document)")
    p.add_argument("--workers", type=_int_at_least(1), default=None, help="tokenizer processes for large corpora (default: one per CPU core)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet or dataset column holding the text (default text)")
    p.add_argument("--shard-tokens", type=_int_at_least(1), default=DEFAULT_SHARD_TOKENS, help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- training
def _cmd_train_train(args: argparse.Namespace) -> int:
    from gptwo.train.loop import run_training

    summary = run_training(args.data, args.out, preset=args.preset, config_file=args.config, overrides=args.overrides,
                           max_steps=args.max_steps, resume=args.resume, init_from=args.init_from)
    if summary["rank"]:
        return 0  # under torchrun only rank 0 reports
    val = f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
    bpb = f" ({summary['val_bpb']:.3f} bits/byte)" if "val_bpb" in summary else ""
    print(f"trained to step {summary['step']}{val}{bpb} -> {args.out} (try: gptwo generate --model {args.out} \"...\")", file=sys.stderr)
    return 0


def _cmd_train_quickstart(args: argparse.Namespace) -> int:
    from gptwo.train.quickstart import quickstart

    quickstart(args.out, tiny=args.tiny)
    return 0


def add_train_commands(sub) -> None:
    """`gptwo train`, `gptwo quickstart` (training issue)."""
    from gptwo.config import TRAIN_PRESETS, TrainConfig, train_fields

    defaults = TrainConfig()
    keys = "\n".join(f"  {name}={getattr(defaults, name)!r} ({kind.__name__})" for name, kind in train_fields().items())
    epilog = (f"config keys (key=value overrides; defaults shown):\n{keys}\n\n"
              "global batch (tokens/step) = batch_size * block_size * grad_accum * world_size;\n"
              "with batch_tokens > 0, grad_accum is derived from it. Under torchrun the same command trains with DDP\n"
              "(or parallel=fsdp). See docs/training.md.")
    p = _command(sub, "train", _cmd_train_train, "Train a GPT-2 on prepared data (from scratch, resumed, or fine-tuned).",
                 epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config field, e.g. lr=3e-4 n_layer=6 (keys listed below)")
    p.add_argument("--data", required=True, help="folder written by 'gptwo prepare' (shards, tokenizer.json, meta.json)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png and the latest model")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", choices=list(TRAIN_PRESETS), help="cpu (minutes on a laptop) or a GPT-2 size with the GPT-3 paper's recipe")
    group.add_argument("--config", help="JSON or TOML file of config fields (may name a 'preset')")
    p.add_argument("--max-steps", type=_int_at_least(1), default=None, help="number of optimizer steps (same as max_steps=N)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint, exactly")
    p.add_argument("--init-from", default=None, help="start from pretrained weights: gpt2, a model/run folder, or a hub id (fine-tuning)")

    p = _command(sub, "quickstart", _cmd_train_quickstart, "Train a small GPT-2 on the built-in corpus on CPU in minutes, no download needed.")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default runs/quickstart); rerunning continues it")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run of the same pipeline (tiny tokenizer and model)")


# --------------------------------------------------------------------------- evaluation
def _print_report(report: dict, as_json: bool, render) -> None:
    import json

    print(json.dumps(report) if as_json else render(report))


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    from gptwo.eval.perplexity import perplexity_report
    from gptwo.eval.report import render_perplexity

    report = perplexity_report(args.model, args.files, stride=args.stride, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                               dtype=args.dtype, quantize=args.quantize)
    _print_report(report, args.json, render_perplexity)
    return 0


def _cmd_eval_task(args: argparse.Namespace) -> int:
    from gptwo.eval.report import render_task
    from gptwo.eval.tasks import task_report

    report = task_report(args.task, args.model, data=args.data, limit=args.limit, device=args.device, batch_size=args.batch_size, stride=args.stride,
                         progress=not args.quiet, dtype=args.dtype, quantize=args.quantize)
    _print_report(report, args.json, render_task)
    return 0


def _cmd_eval_compare(args: argparse.Namespace) -> int:
    from gptwo.eval.compare import compare_report
    from gptwo.eval.report import render_compare

    data = {}
    for spec in args.data:
        task, sep, path = spec.partition("=")
        if not sep or not path:
            raise GptwoError(f"--data {spec!r} is not TASK=PATH", "write it like --data lambada=lambada_test.jsonl")
        data[task] = path
    tasks = [t for t in (args.tasks or "").split(",") if t]
    report = compare_report(args.models, files=args.files, tasks=tasks, data=data, limit=args.limit, stride=args.stride, batch_size=args.batch_size,
                            device=args.device, progress=not args.quiet, dtype=args.dtype, quantize=args.quantize)
    _print_report(report, args.json, render_compare)
    return 0


def _cmd_eval_harness(args: argparse.Namespace) -> int:
    from gptwo.errors import require

    require("lm_eval", "gptwo eval harness", "eval")
    from gptwo.eval.harness import main as harness_main

    return harness_main(args.args)


def _eval_options(p, tasks: bool = False) -> None:
    p.add_argument("--stride", type=_int_at_least(1), default=None, help="tokens each sliding window advances; less than the context gives every token more context (default: the model's context)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows or requests per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_inference_options(p)
    if tasks:
        p.add_argument("--limit", type=_int_at_least(1), default=None, help="use only the first N items of each task (quick checks; not comparable to published numbers)")


def add_eval_commands(sub) -> None:
    """`gptwo eval ppl|lambada|hellaswag|wikitext2|wikitext103|compare|harness`."""
    from gptwo.eval.catalog import TASK_INFO  # plain data: keeps --help fast

    ev = sub.add_parser("eval", help="Evaluate models: perplexity, GPT-2's zero-shot tasks, comparisons, lm-eval.", description="Evaluate models: perplexity, GPT-2's zero-shot tasks, comparisons, lm-evaluation-harness.")
    esub = ev.add_subparsers(dest="eval_command", required=True, parser_class=_Parser, metavar="EVAL_COMMAND")

    p = _command(esub, "ppl", _cmd_eval_ppl, "Perplexity per token and per word, and bits per byte, of text files (strided sliding window).")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, each one document scored from an <|endoftext|> prefix; a folder means its .txt and .md files (recursively)")
    p.add_argument("--model", required=True, help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2")
    _eval_options(p)

    for task in TASK_INFO.values():
        p = _command(esub, task.name, _cmd_eval_task, f"{task.summary}.")
        p.set_defaults(task=task.name)
        p.add_argument("--model", required=True, help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2")
        p.add_argument("--data", default=None, help=f"local data file: {task.data_help}; without it, {task.hub_dataset} is downloaded")
        _eval_options(p, tasks=True)

    p = _command(esub, "compare", _cmd_eval_compare, "One table of the same metrics for several models.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders, run folders or hub ids")
    p.add_argument("--files", nargs="+", default=[], metavar="FILE", help="text files for perplexity, word perplexity and bits per byte")
    p.add_argument("--tasks", default="", help=f"comma-separated tasks to add: {', '.join(TASK_INFO)}")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH", help="local data file for a task (repeatable); tasks without one are downloaded")
    _eval_options(p, tasks=True)

    p = _command(
        esub,
        "harness",
        _cmd_eval_harness,
        "Run lm-evaluation-harness with gptwo models available as --model gptwo; all arguments go to lm-eval "
        "(e.g. --model gptwo --model_args pretrained=PATH --tasks lambada_openai).",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments, as for 'lm-eval run' (try: gptwo eval harness run --help)")


# --------------------------------------------------------------------------- serving
def _cmd_serve(args: argparse.Namespace) -> int:
    from gptwo.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        served_model_name=args.served_model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        log_level=args.log_level,
        api_key=args.api_key if args.api_key is not None else os.environ.get("GPTWO_API_KEY") or None,
        allowed_origins=args.allowed_origins,
        dtype=args.dtype,
        quantize=args.quantize,
    )
    return 0


def add_serve_commands(sub) -> None:
    """`gptwo serve`: the OpenAI-compatible API and the playground page."""
    p = _command(sub, "serve", _cmd_serve, "Serve a model over HTTP: OpenAI-style /v1/completions, and a playground page at /.")
    p.add_argument("--model", required=True, help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder's name or the hub id)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together (default 32); each holds a KV cache row")
    p.add_argument("--max-queue", type=int, default=256, help="most sequences waiting for a row; beyond it requests get 429 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted; larger ones get 413 (default 1 MiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="server log level (default info)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request, else 401 (default: env GPTWO_API_KEY, else none)")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGINS",
                   help="web origins (scheme://host[:port], comma-separated or repeated; * for any) whose pages may call the API from a browser (CORS; default none)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="weights' dtype (default auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX), else fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: weight-only int8 linear layers (per-channel scales; activations in --dtype), a quarter of fp32's weight memory (docs/inference.md)")


# --------------------------------------------------------------------------- webtext
def _cmd_webtext_report(reports: dict) -> int:
    import json

    for stage, counts in reports.items():
        dropped = ", ".join(f"{reason} {n}" for reason, n in counts["dropped"].items()) or "none"
        print(f"{stage}: in {counts['in']}, kept {counts['kept']}; dropped: {dropped}", file=sys.stderr)
    print(json.dumps(reports, indent=2))
    return 0


def _cmd_webtext_url_filter(args: argparse.Namespace):
    from gptwo.webtext.urls import DEFAULT_BLOCKLIST, UrlFilter

    blocklist = (() if args.no_default_blocklist else DEFAULT_BLOCKLIST) + tuple(d.lower() for d in args.block_domain)
    return UrlFilter(min_score=args.min_score, blocklist=blocklist)


def _cmd_webtext_extract_options(args: argparse.Namespace):
    from gptwo.webtext.extract import ExtractOptions
    from gptwo.webtext.settings import pick

    languages = () if "any" in args.language else tuple(args.language or ("en",))
    return pick(ExtractOptions, args, languages=languages)


def _cmd_webtext_fetch_options(args: argparse.Namespace):
    from gptwo.webtext.fetch import FetchOptions
    from gptwo.webtext.settings import pick

    return pick(FetchOptions, args, resolve=tuple(args.resolve))


def _webtext_pin(text: str) -> tuple[str, str]:
    from gptwo.webtext.addresses import parse_pin

    try:
        return parse_pin(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _cmd_webtext_urls(args: argparse.Namespace) -> int:
    from gptwo.webtext.engine import Engine
    from gptwo.webtext.settings import pick
    from gptwo.webtext.urls import collect_urls

    report = collect_urls(args.inputs, args.out, rule=_cmd_webtext_url_filter(args), engine=pick(Engine, args))
    return _cmd_webtext_report({"urls": report.as_dict()})


def _cmd_webtext_fetch(args: argparse.Namespace) -> int:
    from gptwo.webtext.engine import Engine
    from gptwo.webtext.fetch import fetch_urls
    from gptwo.webtext.settings import pick

    report = fetch_urls(args.urls, args.out, options=_cmd_webtext_fetch_options(args), partitions=args.partitions, engine=pick(Engine, args))
    return _cmd_webtext_report({"fetch": report.as_dict()})


def _cmd_webtext_extract(args: argparse.Namespace) -> int:
    from gptwo.webtext.engine import Engine
    from gptwo.webtext.extract import extract_documents
    from gptwo.webtext.settings import pick

    extracted, deduped = extract_documents(args.crawl, args.out, options=_cmd_webtext_extract_options(args), engine=pick(Engine, args))
    return _cmd_webtext_report({"extract": extracted.as_dict(), "dedup": deduped.as_dict()})


def _cmd_webtext_build(args: argparse.Namespace) -> int:
    from gptwo.webtext.build import build
    from gptwo.webtext.engine import Engine
    from gptwo.webtext.settings import pick

    report = build(
        args.inputs, args.out, rule=_cmd_webtext_url_filter(args), fetch_options=_cmd_webtext_fetch_options(args),
        extract_options=_cmd_webtext_extract_options(args), engine=pick(Engine, args), partitions=args.partitions,
    )
    _cmd_webtext_report(report["stages"])
    print(f"{report['documents']} documents -> {report['output']} (feed it to 'gptwo prepare')", file=sys.stderr)
    return 0


def add_webtext_commands(sub) -> None:
    """`gptwo webtext urls|fetch|extract|build`: Reddit links → fetched, filtered, deduplicated documents."""
    web = sub.add_parser("webtext", help="Build a WebText-style corpus from Reddit submission dumps.",
                         description="Build a WebText-style corpus: Reddit links with >= 3 karma, fetched, extracted, filtered, deduplicated.")
    wsub = web.add_subparsers(dest="webtext_command", required=True, parser_class=_Parser)

    def engine_args(p) -> None:
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes (default: number of CPUs)")
        p.add_argument("--engine", dest="kind", choices=("local", "ray"), default="local",
                       help="'local' process pool (default) or 'ray' (a Ray cluster, or a single-machine Ray started for this run)")
        p.add_argument("--ray-address", default=None, help="address of a running Ray cluster, e.g. ray://head:10001 (with --engine ray)")

    def url_args(p) -> None:
        p.add_argument("--min-score", type=int, default=3, help="keep link posts with at least this score (default 3, as GPT-2)")
        p.add_argument("--block-domain", action="append", default=[], help="also drop links to this domain and its subdomains (repeatable)")
        p.add_argument("--no-default-blocklist", action="store_true", help="don't drop Wikipedia links (dropped by default, as GPT-2 did)")

    def fetch_args(p) -> None:
        p.add_argument("--concurrency", type=int, default=64, help="requests in flight at once, over all workers (default 64)")
        p.add_argument("--per-host", type=int, default=2, help="requests in flight at once to one host (default 2)")
        p.add_argument("--timeout", type=float, default=20.0, help="seconds for one request, body included (default 20)")
        p.add_argument("--retries", type=int, default=2, help="retries after a timeout, connection error, 429 or 5xx (default 2)")
        p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry (default 1)")
        p.add_argument("--max-redirects", type=int, default=5, help="redirects followed per URL (default 5)")
        p.add_argument("--max-bytes", type=int, default=5_000_000, help="largest page downloaded, in bytes (default 5000000)")
        p.add_argument("--user-agent", default=None, help="User-Agent header, also matched against robots.txt")
        p.add_argument("--warc", action="store_true", help="also write every stored response to WARC files under the crawl folder")
        p.add_argument("--retry-failed", action="store_true", help="on resume, retry URLs that failed with timeouts or 5xx")
        p.add_argument("--allow-private-addresses", action="store_true",
                       help="also fetch loopback, private, link-local and other non-global addresses, refused by default "
                            "(a link or redirect could reach your own network or a cloud metadata service); for an intranet crawl")
        p.add_argument("--resolve", action="append", default=[], type=_webtext_pin, metavar="HOST=ADDRESS",
                       help="connect to ADDRESS for HOST instead of asking DNS, even a private address (as curl --resolve; repeatable)")
        p.add_argument("--partitions", type=int, default=8, help="crawl partitions (by host), fixed by the first run (default 8)")

    def extract_args(p) -> None:
        p.add_argument("--language", action="append", default=[], help="keep documents in this language (ISO 639-1, repeatable; default en; 'any' keeps all)")
        p.add_argument("--min-language-prob", type=float, default=0.5, help="minimum language-detector probability (default 0.5)")
        p.add_argument("--min-tokens", type=int, default=128, help="drop documents with fewer GPT-2 tokens (default 128)")
        p.add_argument("--shingle-size", type=int, default=5, help="words per shingle for near-duplicate detection (default 5)")
        p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
        p.add_argument("--dedup-threshold", dest="threshold", type=float, default=0.5, help="Jaccard similarity above which documents are near duplicates (default 0.5)")

    p = _command(wsub, "urls", _cmd_webtext_urls, "Stage 1: Reddit submission dumps (.jsonl/.zst) or URL lists -> unique outbound URLs.")
    p.add_argument("inputs", nargs="+", help="Pushshift submission dumps (NDJSON, optionally .zst) or plain URL lists")
    p.add_argument("--out", required=True, help="output URL file (.jsonl.zst)")
    url_args(p)
    engine_args(p)

    p = _command(wsub, "fetch", _cmd_webtext_fetch, "Stage 2: fetch a URL file into a resumable crawl folder (robots.txt honoured).")
    p.add_argument("urls", help="URL file written by 'gptwo webtext urls'")
    p.add_argument("--out", required=True, help="crawl folder; rerun with the same folder to resume")
    fetch_args(p)
    engine_args(p)

    p = _command(wsub, "extract", _cmd_webtext_extract, "Stages 3-4: crawl folder -> extracted, filtered, deduplicated documents (.jsonl.zst).")
    p.add_argument("crawl", help="crawl folder written by 'gptwo webtext fetch'")
    p.add_argument("--out", required=True, help="output documents file (.jsonl.zst); per-partition files go to extract/ beside it")
    extract_args(p)
    engine_args(p)

    p = _command(wsub, "build", _cmd_webtext_build, "All stages: dumps or URL lists -> DIR/documents.jsonl.zst and DIR/report.json (resumable).")
    p.add_argument("inputs", nargs="+", help="Pushshift submission dumps (NDJSON, optionally .zst) or plain URL lists")
    p.add_argument("--out", required=True, help="output folder; rerun the same command to resume")
    url_args(p)
    fetch_args(p)
    extract_args(p)
    engine_args(p)


# --------------------------------------------------------------------------- detection
class _RoutingParser(_Parser):
    """A command that takes files and also has subcommands: `gptwo detect FILE...` and `gptwo detect calibrate|sample ...`."""

    routes: dict[str, argparse.ArgumentParser] = {}  # set per instance

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] in self.routes:
            return self.routes[args[0]].parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


def _cmd_detect(args: argparse.Namespace) -> int:
    import json

    from gptwo.detect.detector import detect_files

    docs, tokenizer = detect_files(args.model, args.files, reference_spec=args.reference, calibration=args.calibration, min_tokens=args.min_tokens,
                                   stride=args.stride, top=args.top, device=args.device)
    if args.html:
        from gptwo.detect.report import write_html

        write_html(args.html, docs, tokenizer, args.model)
        print(f"GLTR report -> {args.html}", file=sys.stderr)
    for doc in docs:
        if args.json:
            print(json.dumps(doc.to_dict(tokenizer, with_tokens=args.tokens)))
        else:
            from gptwo.detect.detector import render_document

            print(render_document(doc, tokenizer, with_tokens=args.tokens))
    return 0


def _cmd_detect_calibrate(args: argparse.Namespace) -> int:
    import json

    from gptwo.detect.calibrate import calibrate, render_calibration

    report = calibrate(args.model, args.human, args.generated, reference_spec=args.reference, detector=args.detector, max_fpr=args.max_fpr,
                       min_tokens=args.min_tokens, out=args.out, plot=args.plot, stride=args.stride, device=args.device,
                       lexicon=None if args.lexicon == "none" else args.lexicon, folds=args.folds)
    print(json.dumps(report) if args.json else render_calibration(report))
    return 0


def _cmd_detect_sample(args: argparse.Namespace) -> int:
    from gptwo.detect.sample import sample_set

    summary = sample_set(args.model, args.source, args.out, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, per_document=args.per_document,
                         limit=args.limit, min_tokens=args.min_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         device=args.device)
    print(f"{summary['pairs']} matched pairs -> {args.out}/human and {args.out}/generated "
          f"(try: gptwo detect calibrate --model {args.model} --human {args.out}/human --generated {args.out}/generated)", file=sys.stderr)
    return 0


def add_detect_commands(sub) -> None:
    """`gptwo detect FILE...`, `gptwo detect calibrate`, `gptwo detect sample` (detection issue)."""
    from gptwo.detect import DEFAULT_DETECTOR, DEFAULT_MIN_TOKENS  # plain constants: keeps --help fast

    def common(p, reference: bool = True, min_tokens: int | None = DEFAULT_MIN_TOKENS) -> None:
        p.add_argument("--model", required=True, help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2")
        if reference:
            p.add_argument("--reference", default=None, help="a second model with the same tokenizer: adds the Binoculars score")
            p.add_argument("--stride", type=int, default=None, help="texts longer than the context are scored in windows advancing by this many tokens (default: half the context)")
        p.add_argument("--min-tokens", type=int, default=min_tokens, help=f"texts with fewer tokens are 'too short' to judge (default {DEFAULT_MIN_TOKENS}"
                       + (", or the calibration's)" if min_tokens is None else ")"))
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")

    epilog = ("subcommands:\n  gptwo detect calibrate --model M --human DIR --generated DIR   fit the detector (see 'gptwo detect calibrate --help')\n"
              "  gptwo detect sample --model M --source DATA --out DIR          write a matched human/generated set\n\n"
              "The detector is the calibrated classifier saved beside the model by 'gptwo detect calibrate' when there is one,\n"
              "else Fast-DetectGPT's analytic statistic (score > threshold = generated). See docs/detect.md.")
    sub._parser_class = _RoutingParser  # argparse makes subcommand parsers of this class; no public way to pick it per command
    p = _command(sub, "detect", _cmd_detect, "Was this text written by the model? Per-token probability, rank, entropy; detection scores and a verdict.",
                 epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub._parser_class = _Parser
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, one document each, or '-' for stdin")
    common(p, min_tokens=None)
    p.add_argument("--calibration", default=None, help="calibration JSON (default: detect-calibration.json in the model folder; without one the verdict is uncalibrated)")
    p.add_argument("--json", action="store_true", help="one JSON object per input per line: file, tokens, score, verdict, scores")
    p.add_argument("--tokens", action="store_true", help="also show each token's probability, rank, entropy and top alternatives (in JSON: token_stats)")
    p.add_argument("--top", type=int, default=10, help="alternatives kept per token (default 10)")
    p.add_argument("--html", default=None, metavar="OUT", help="write a GLTR-style HTML report: tokens coloured by rank, alternatives on hover, histograms")

    c = _Parser(prog="gptwo detect calibrate", description="AUROC and TPR at a false-positive budget for every statistic and for a supervised classifier "
                "(cross-validated by source document); saves the detector and its threshold beside the model, and a ROC plot.")
    c.set_defaults(func=_cmd_detect_calibrate)
    common(c)
    c.add_argument("--human", required=True, help="folder of human-written .txt files (one document each)")
    c.add_argument("--generated", required=True, help="folder of generated .txt files, e.g. from 'gptwo detect sample'")
    c.add_argument("--detector", default="classifier", help="detector saved: classifier (default: logistic regression on the statistics and a lexicon) "
                   f"or one statistic, e.g. {DEFAULT_DETECTOR} (binoculars needs --reference)")
    c.add_argument("--lexicon", default="auto", help="training text whose word counts the classifier uses: a prepared data folder (train split) or a folder "
                   "of .txt files; auto (default) = MODEL/data when present; none = no lexicon features")
    c.add_argument("--folds", type=int, default=5, help="cross-validation folds, split by source document, for the classifier's AUROC (default 5)")
    c.add_argument("--max-fpr", type=float, default=0.01, help="share of human texts allowed above the threshold (default 0.01)")
    c.add_argument("--out", default=None, help="calibration JSON to write (default: MODEL/detect-calibration.json, which 'gptwo detect' reads)")
    c.add_argument("--plot", default=None, help="ROC plot PNG (default: beside the calibration JSON, *-roc.png)")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")

    s = _Parser(prog="gptwo detect sample", description="Write a matched evaluation set: each human passage's first tokens continued by the model, to the same length.")
    s.set_defaults(func=_cmd_detect_sample)
    common(s, reference=False)
    s.add_argument("--source", required=True, help="a prepared data folder (its val split: documents the model did not train on) or a folder of .txt files")
    s.add_argument("--out", required=True, help="output folder: human/*.txt, generated/*.txt, sample.json")
    s.add_argument("--prompt-tokens", type=int, default=16, help="tokens of each human passage given as the prompt (default 16)")
    s.add_argument("--new-tokens", type=int, default=128, help="tokens the model writes after the prompt (default 128)")
    s.add_argument("--per-document", type=int, default=1, help="passages taken from each document, non-overlapping (default 1; 0 = all)")
    s.add_argument("--limit", type=int, default=None, help="at most this many passages")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    s.add_argument("--top-k", type=int, default=None, help="sample only from the K most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set of tokens with total probability >= P")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.routes = {"calibrate": c, "sample": s}


# --------------------------------------------------------------------------- data selection
def _cmd_select_score(args: argparse.Namespace) -> int:
    from gptwo.select.scoring import score_documents

    written = score_documents(args.model, args.inputs, args.out, reference=args.reference, batch_tokens=args.batch_tokens,
                              device=args.device, text_field=args.text_field, progress=not args.quiet)
    print(f"scored {written} document(s) -> {args.out}", file=sys.stderr)
    return 0


def _cmd_select_filter(args: argparse.Namespace) -> int:
    from gptwo.select.offline import filter_documents

    result = filter_documents(args.inputs, args.scores, args.out, by=args.by, keep=args.keep, band=args.band, text_field=args.text_field)
    print(f"kept {result['kept']} of {result['documents']} documents ({result['band']} {result['by']} band) -> {args.out}", file=sys.stderr)
    return 0


def _cmd_select_dsir(args: argparse.Namespace) -> int:
    from gptwo.select.offline import dsir_resample

    result = dsir_resample(args.inputs, args.target, args.out, keep=args.keep, buckets=args.buckets, seed=args.seed, text_field=args.text_field)
    print(f"kept {result['kept']} of {result['documents']} documents (importance resampling toward --target) -> {args.out}", file=sys.stderr)
    return 0


def add_select_commands(sub) -> None:
    """`gptwo select score|filter|dsir` (data selection issue; online selection is a training option)."""
    sel = sub.add_parser("select", help="Choose training data with a model: score, filter, importance-resample.",
                         description="Choose training data with a model: score documents, keep a band of them, or resample toward a target. "
                                     "Online selection during training: gptwo train ... selection=loss|reducible. See docs/selection.md.")
    ssub = sel.add_subparsers(dest="select_command", required=True, parser_class=_Parser, metavar="SELECT_COMMAND")
    inputs_help = "text files or folders (.txt, .md, .jsonl, .jsonl.zst, .parquet), 'builtin' or hf:NAME (as for 'gptwo prepare')"

    p = _command(ssub, "score", _cmd_select_score, "Write each document's loss under a model (and its reducible loss) as JSON lines; resumes.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help)
    p.add_argument("--model", required=True, help="scoring model: model or run folder, or hub id")
    p.add_argument("--reference", default=None, help="reference model (same tokenizer): adds reference_loss and reducible = loss - reference_loss")
    p.add_argument("--out", required=True, help="output JSON lines (id, tokens, loss[, reference_loss, reducible]); an existing file is continued")
    p.add_argument("--batch-tokens", type=int, default=4096, help="about this many tokens per forward pass and per flushed batch of rows (default 4096)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text (default text)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _command(ssub, "filter", _cmd_select_filter, "Keep a band of documents by their scores; writes .jsonl.zst for 'gptwo prepare'.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help + "; the same inputs that were scored")
    p.add_argument("--scores", required=True, help="output of 'gptwo select score' for these inputs")
    p.add_argument("--by", choices=["loss", "reducible"], default="loss", help="score to rank by (default loss)")
    p.add_argument("--keep", type=float, required=True, help="fraction of documents to keep, in (0, 1]")
    p.add_argument("--band", choices=["low", "middle", "high"], default=None,
                   help="which scores to keep: low, middle or high (default: low for loss, high for reducible)")
    p.add_argument("--out", required=True, help="output documents (.jsonl.zst), written atomically")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text (default text)")

    p = _command(ssub, "dsir", _cmd_select_dsir, "Importance-resample documents toward a target sample (DSIR, hashed n-grams).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help)
    p.add_argument("--target", nargs="+", required=True, help="documents that look like what you want (same input forms)")
    p.add_argument("--keep", type=float, required=True, help="fraction of documents to keep, in (0, 1]")
    p.add_argument("--buckets", type=int, default=10000, help="hash buckets for word unigrams and bigrams (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling draw (default 0)")
    p.add_argument("--out", required=True, help="output documents (.jsonl.zst), written atomically")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text (default text)")


# --------------------------------------------------------------------------- scaling laws
def _cmd_scale_plan(args: argparse.Namespace) -> int:
    from gptwo.scale.plan import make_plan, parse_budgets, parse_shapes, vocab_size_of, write_plan

    if (args.data is None) == (args.vocab_size is None):
        raise GptwoError("give the vocabulary as --data DIR or --vocab-size N (one of them)", "e.g. --data data/builtin")
    vocab = args.vocab_size or vocab_size_of(args.data)
    plan = make_plan(parse_budgets(args.budgets), vocab, parse_shapes(args.shapes) if args.shapes else None, args.per_budget, args.tokens_per_param)
    write_plan(plan, args.out)
    for run in plan["runs"]:
        print(f"{run['name']:>22}  N={run['params']:>10,} (non-embedding {run['params_non_embedding']:,})  D={run['tokens']:>11,}  C={run['flops']:.3g}")
    print(f"{len(plan['runs'])} runs, {sum(r['flops'] for r in plan['runs']):.3g} FLOPs in all -> {args.out}  ({plan['formula']})", file=sys.stderr)
    return 0


def _cmd_scale_run(args: argparse.Namespace) -> int:
    from gptwo.scale.run import run_sweep

    records = run_sweep(args.plan, args.data, args.out, parallel=args.parallel, threads=args.threads)
    print(f"{len(records)} runs finished -> {args.out}/results.jsonl (fit them: gptwo scale fit {args.out})", file=sys.stderr)
    return 0


def _cmd_scale_fit(args: argparse.Namespace) -> int:
    import json

    from gptwo.scale.fit import fit_report, format_report, parse_point, read_points
    from gptwo.scale.method import best_of_plan, plan_largest, prepare

    method = _scale_method(args)
    queries, budgets = [parse_point(p) for p in args.predict], list(args.budget)
    if args.best_of:
        target, shapes, _ = plan_largest(args.best_of, method)
        queries, budgets = queries + [s for s in shapes if s not in queries], budgets + [target] * (target not in budgets)
    points = prepare(read_points(args.runs, exclude_budgets=args.exclude_budget), method)
    every = prepare(read_points(args.runs), method)
    for budget in args.exclude_budget:
        if not any(p.get("budget") and abs(p["budget"] / budget - 1) < 1e-6 for p in every):
            print(f"note: no run has budget {budget:g} (yet); nothing of it to leave out", file=sys.stderr)
    report = fit_report(points, queries=queries, budgets=budgets, bootstrap=args.bootstrap, seed=args.seed, delta=args.delta, corpus=method.corpus(points))
    if args.best_of:
        report["best"] = best_of_plan(report, args.best_of, method)
    if args.plot:
        from gptwo.scale.plots import plot_fit

        plot_fit(points, report, args.plot, extra=every)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _cmd_scale_backtest(args: argparse.Namespace) -> int:
    import json

    from gptwo.scale.fit import read_points
    from gptwo.scale.method import backtest, format_backtest

    method = _scale_method(args)
    rows = backtest(read_points(args.runs), method, first=args.first)
    print(json.dumps({"method": method.label(), "rows": rows}) if args.json else format_backtest(rows, method))
    return 0


def _scale_method(args: argparse.Namespace):
    from gptwo.scale.method import Method
    from gptwo.scale.repeats import parse_repeats

    return Method(count=args.count, average_seeds=args.average_seeds, near_min=args.near_min, delta=args.delta, best=args.best,
                  repeats=parse_repeats(args.repeats, args.unique_tokens))


def _scale_method_options(p) -> None:
    """The fit's method choices, shared by fit and backtest (docs/scaling.md, 'Choosing the method')."""
    p.add_argument("--count", default="params", choices=("params", "total", "non_embedding"),
                   help="which parameter count is N: params (default; all but position embeddings), total, or non_embedding (Kaplan's)")
    p.add_argument("--average-seeds", action="store_true", help="average runs of the same N and D (other seeds) into one point, geometric mean of losses")
    p.add_argument("--near-min", type=int, default=0, metavar="K", help="fit only each budget's K lowest-loss runs (default 0: all runs)")
    p.add_argument("--delta", type=float, default=1e-3, help="the Huber loss's delta on log-loss residuals (default 1e-3, the papers')")
    p.add_argument("--best", default="optimum", choices=("optimum", "shapes"),
                   help="a budget's predicted best loss: at the fitted compute-optimal N, D (optimum, default) or the lowest over its planned shapes (shapes)")
    p.add_argument("--repeats", default="none", metavar="none|muennighoff[:RSTAR]",
                   help="repeated tokens: none (default; counted as fresh) or Muennighoff et al. 2023's effective data D' = U + U*R*(1 - exp(-R/R*)), R* 15.4 unless given")
    p.add_argument("--unique-tokens", type=float, default=None, metavar="U",
                   help="unique training tokens U for --repeats (default: each run's recorded unique_tokens; the data folder's meta.json train_tokens)")


def add_scale_commands(sub) -> None:
    """`gptwo scale plan|run|fit` (scaling-laws issue): IsoFLOP sweeps and L(N, D) fits. See docs/scaling.md."""
    scale = sub.add_parser("scale", help="Scaling laws: plan an IsoFLOP sweep, run it, fit L(N, D) and predict.",
                           description="Scaling laws: plan an IsoFLOP sweep, run it, fit L(N, D) = E + A/N^alpha + B/D^beta and predict.")
    ssub = scale.add_subparsers(dest="scale_command", required=True, parser_class=_Parser)
    p = _command(ssub, "plan", _cmd_scale_plan, "Write an IsoFLOP plan: per compute budget, model shapes and the tokens each trains for (C = 6*N*D).")
    p.add_argument("--budgets", required=True, help="compute budgets in FLOPs, comma-separated (e.g. 2e11,6e11,2e12,6e12)")
    p.add_argument("--shapes", default=None, help="model shapes n_layer x n_head x n_embd, comma-separated (e.g. 2x2x64,4x4x128; default: a built-in ladder of ten)")
    p.add_argument("--per-budget", type=int, default=5, help="runs per budget: the shapes nearest the guessed optimum (default 5)")
    p.add_argument("--tokens-per-param", type=float, default=20.0, help="tokens per parameter that centres each budget's shapes (default 20, Chinchilla's)")
    p.add_argument("--data", default=None, help="a prepared data folder, to read the vocabulary size from its tokenizer")
    p.add_argument("--vocab-size", type=int, default=None, help="the vocabulary size, instead of --data")
    p.add_argument("--out", required=True, help="the plan file to write (JSON, editable)")
    p = _command(ssub, "run", _cmd_scale_run, "Train every run of a plan (ordinary run folders); finished runs are skipped, killed ones resumed.")
    p.add_argument("plan", help="a plan file from 'gptwo scale plan'")
    p.add_argument("--data", required=True, help="prepared data folder (from 'gptwo prepare'), the same vocabulary as the plan")
    p.add_argument("--out", required=True, help="sweep folder: runs/NAME run folders and results.jsonl")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once, each in its own process (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: CPU cores / --parallel)")
    p = _command(ssub, "fit", _cmd_scale_fit, "Fit L(N, D) = E + A/N^alpha + B/D^beta to finished runs (Huber on log loss, L-BFGS), with bootstrap intervals.")
    p.add_argument("runs", nargs="+", metavar="RUNS", help='sweep folders, or JSONL files with one {"params": N, "tokens": D, "loss": L} per line')
    p.add_argument("--json", action="store_true", help="print one JSON object (E, A, B, alpha, beta, intervals, optimum, predictions)")
    p.add_argument("--plot", default=None, help="write the plots to this PNG: IsoFLOP curves, loss vs FLOPs with the fitted frontier, fitted vs measured (left-out runs hollow)")
    p.add_argument("--predict", action="append", default=[], metavar="N,D", help="predict the loss of N parameters trained on D tokens (repeatable)")
    p.add_argument("--budget", action="append", type=float, default=[], metavar="C", help="report the compute-optimal N and D for C FLOPs (repeatable; default: the largest budget fitted)")
    p.add_argument("--exclude-budget", action="append", type=float, default=[], metavar="C",
                   help="leave a sweep's runs of this budget out of the fit (to predict them; repeatable)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--best-of", default=None, metavar="PLAN", help="predict the best run of this plan's largest budget: each shape's loss and the predicted best (see --best)")
    _scale_method_options(p)
    p = _command(ssub, "backtest", _cmd_scale_backtest, "Choose a fit method on runs in hand: fit on the budgets below each budget, predict its best run, report the errors.")
    p.add_argument("runs", nargs="+", metavar="RUNS", help="sweep folders or JSONL files of runs with budgets (as for fit)")
    p.add_argument("--first", type=int, default=2, help="the smallest budgets only ever fitted, never predicted (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object: the method and one row per predicted budget")
    _scale_method_options(p)


# --------------------------------------------------------------------------- benchmarks
def _cmd_bench_decode(args: argparse.Namespace) -> int:
    from gptwo.bench.decode import decode_report, render_decode

    variants = tuple(v for v in args.variants.split(",") if v)
    report = decode_report(args.model, device=args.device, variants=variants, batch_size=args.batch_size, new_tokens=args.new_tokens,
                           prompt_tokens=args.prompt_tokens, rounds=args.rounds, threads=args.threads, compile=args.compile, progress=not args.json,
                           llama_cpp=args.llama_cpp, gguf=args.gguf)
    _print_report(report, args.json, render_decode)
    return 0


def _bench_options(p) -> None:
    """Options every `gptwo bench` workload takes."""
    p.add_argument("--model", default=None, help="model folder or hub id to time (default: GPT-2 124M's shape with random weights)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table (fields: docs/inference.md)")


def _add_bench_decode(bsub) -> None:
    from gptwo.bench import COMPILE_MODES  # plain data: keeps --help fast

    p = _command(bsub, "decode", _cmd_bench_decode, "Decoding tokens/s per precision (fp32, bf16, int8) vs transformers' generate, with the memory-bandwidth ceiling.")
    _bench_options(p)
    p.add_argument("--variants", default="fp32,bf16,int8", help="comma-separated precisions to time: fp32, bf16, int8 (default all three)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default 1)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt, greedy (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens in each (random) prompt (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the median counts (default 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama-bench (default: torch's choice)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="none",
                   help="torch.compile the decode step with this mode (reduce-overhead = CUDA graphs; max-autotune-frozen = frozen weights + Inductor's C++ GEMM template, faster for int8 on CPU); default none (eager)")
    p.add_argument("--llama-cpp", default=None, metavar="PATH",
                   help="also time llama.cpp in the same rounds: its llama-bench binary or build folder (bench/llamacpp.sh builds one); rows f32, f16, bf16, q8_0")
    p.add_argument("--gguf", default=None, metavar="DIR",
                   help="with --llama-cpp: folder of model-{f32,f16,bf16,q8_0}.gguf for the same model (bench/llamacpp.sh); default: convert now with the converter of the binary's source tree")


def _add_bench_train(bsub) -> None:
    from gptwo.bench.train import add_bench_train_command

    add_bench_train_command(bsub, _command)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from gptwo.bench.serve import render_serve, serve_report

    variants = ("int8",) if args.quantize else (args.dtype,) if args.dtype else tuple(v for v in args.variants.split(",") if v)
    report = serve_report(args.model, device=args.device, clients=args.clients, tokens=args.tokens, variants=variants, rounds=args.rounds,
                          threads=args.threads, compare_src=args.compare_src, progress=not args.json)
    _print_report(report, args.json, render_serve)
    return 0


def _add_bench_serve(bsub) -> None:
    p = _command(bsub, "serve", _cmd_bench_serve,
                 "Aggregate tokens/s of `gptwo serve` under concurrent streaming clients vs transformers' batched generate on the same prompts.")
    _bench_options(p)
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients, one request each per round (default 64)")
    p.add_argument("--tokens", type=int, default=32, help="tokens each request generates, temperature 1 (default 32)")
    p.add_argument("--variants", default="fp32,bf16,int8", help="comma-separated server weights to time: fp32, bf16, int8 (default all three)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="time only the server with these weights (shorthand for --variants)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="time only the int8 weight-only server (shorthand for --variants int8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median counts (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each server and of transformers (default: torch's choice here)")
    p.add_argument("--compare-src", action="append", default=[], metavar="DIR",
                   help="also time the fp32 server of another gptwo checkout's src folder (e.g. an older commit) in the same rounds (repeatable)")


# Each workload registers its `gptwo bench` subcommand here (a function of the group's subparsers).
BENCH_COMMANDS: list[Callable] = [_add_bench_decode, _add_bench_train, _add_bench_serve]


def add_bench_commands(sub) -> None:
    """`gptwo bench decode|train|serve`: speed on this machine, transformers as the same-run anchor."""
    bench = sub.add_parser("bench", help="Measure speed on this machine against transformers in the same run.",
                           description="Measure speed on this machine: each workload runs through transformers in the same process as the anchor "
                                       "(interleaved rounds, medians) and reports ratios.")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser, metavar="WORKLOAD")
    for add in BENCH_COMMANDS:
        add(bsub)


def add_kernel_commands(sub) -> None:
    """`gptwo kernels info|build` (gptwo/infer/cli.py)."""
    from gptwo.infer.cli import add_commands

    add_commands(sub)


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gptwo", description="GPT-2: model, tokenizer, data, training, serving, evaluation.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for add in (add_core_commands, add_data_commands, add_train_commands, add_eval_commands, add_serve_commands, add_webtext_commands, add_select_commands,
                add_detect_commands, add_scale_commands, add_bench_commands, add_kernel_commands):
        add(sub)
    return parser


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*=")
_INTERRUPTED = {
    "train": "rerun the same command with --resume to continue from the last checkpoint",
    "quickstart": "rerun 'gptwo quickstart' to continue from the last checkpoint",
    "webtext": "rerun the same command to resume",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may come anywhere, also after options."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and all(_OVERRIDE.match(item) for item in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `gptwo` command: exit 0, 2 for bad input (one `error: … — …` line), 1 for a bug, 130 on Ctrl-C."""
    args = parse_args(argv)
    debug = args.debug or bool(os.environ.get("GPTWO_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"error: interrupted — {_INTERRUPTED.get(args.command, 'rerun the command')}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 - input errors become one line; anything else is a bug
        if debug:
            raise
        mapped = from_library_error(err, args.command)
        if mapped is not None:
            print(f"error: {mapped}", file=sys.stderr)
            return mapped.code
        print(f"error: {type(err).__name__}: {err} — this is a bug: please report it with the output of --debug", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
