"""The `gptwo` command line: one parser, each subcommand a thin shell over a library function.

Each area of the package registers its subcommands in its own `add_*_commands` function below;
library imports happen inside the command functions so `gptwo --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from gptwo.errors import GptwoError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error: … — …` line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} — see '{self.prog} --help'\n")
        raise SystemExit(2)


def _command(sub, name: str, func: Callable[[argparse.Namespace], int | None], help: str, **kw):
    parser = sub.add_parser(name, help=help, description=help, **kw)
    parser.set_defaults(func=func)
    return parser


# --------------------------------------------------------------------------- core
def _cmd_generate(args: argparse.Namespace) -> int:
    from gptwo.generate import generate_cli_stream

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
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
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from gptwo.tokenizer import Tokenizer

    tok = Tokenizer.train(args.inputs, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    tok.save(args.out)
    print(f"trained byte-level BPE with {tok.n_vocab} tokens -> {args.out}", file=sys.stderr)
    return 0


def _cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    from gptwo.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = args.text if args.text != "-" else sys.stdin.read()
    print(" ".join(map(str, tok.encode(text))))
    return 0


def add_core_commands(sub) -> None:
    p = _command(sub, "generate", _cmd_generate, "Sample a continuation of PROMPT from a model (streams to stdout).")
    p.add_argument("prompt", help="prompt text, or '-' to read it from stdin")
    p.add_argument("--model", required=True, help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2")
    p.add_argument("--max-new-tokens", type=int, default=100, help="number of tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 means greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set of tokens with total probability >= P")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable); it is not printed")
    p.add_argument("--num-samples", type=int, default=1, help="number of independent samples, separated by a line of dashes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")

    tok = sub.add_parser("tokenizer", help="Train or use a byte-level BPE tokenizer.", description="Train or use a byte-level BPE tokenizer.")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    p = _command(tsub, "train", _cmd_tokenizer_train, "Train a byte-level BPE (GPT-2 style) on your own text.")
    p.add_argument("inputs", nargs="+", help="text files or folders (.txt, .md, .jsonl with a 'text' field)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, including 256 byte tokens and <|endoftext|>")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge (default 2)")
    p.add_argument("--out", required=True, help="output tokenizer file (JSON)")
    p = _command(tsub, "encode", _cmd_tokenizer_encode, "Print the token ids of TEXT.")
    p.add_argument("text", help="text to encode, or '-' for stdin")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer file (default gpt2)")


# --------------------------------------------------------------------------- data
def add_data_commands(sub) -> None:
    """`gptwo prepare` (training issue, data part)."""


# --------------------------------------------------------------------------- training
def _cmd_train_train(args: argparse.Namespace) -> int:
    from gptwo.train.loop import run_training

    summary = run_training(args.data, args.out, preset=args.preset, config_file=args.config, overrides=args.overrides,
                           max_steps=args.max_steps, resume=args.resume, init_from=args.init_from)
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
    p.add_argument("--max-steps", type=int, default=None, help="number of optimizer steps (same as max_steps=N)")
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

    report = perplexity_report(args.model, args.files, stride=args.stride, batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    _print_report(report, args.json, render_perplexity)
    return 0


def _cmd_eval_task(args: argparse.Namespace) -> int:
    from gptwo.eval.report import render_task
    from gptwo.eval.tasks import task_report

    report = task_report(args.task, args.model, data=args.data, limit=args.limit, device=args.device, batch_size=args.batch_size, stride=args.stride, progress=not args.quiet)
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
    report = compare_report(args.models, files=args.files, tasks=tasks, data=data, limit=args.limit, stride=args.stride, batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    _print_report(report, args.json, render_compare)
    return 0


def _cmd_eval_harness(args: argparse.Namespace) -> int:
    try:
        from gptwo.eval.harness import main as harness_main
    except ImportError as err:
        raise GptwoError(f"lm-evaluation-harness is not installed ({err.name})", "pip install 'gptwo[eval]'") from None
    return harness_main(args.args)


def _eval_options(p, tasks: bool = False) -> None:
    p.add_argument("--stride", type=int, default=None, help="tokens each sliding window advances; less than the context gives every token more context (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows or requests per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    if tasks:
        p.add_argument("--limit", type=int, default=None, help="use only the first N items of each task (quick checks; not comparable to published numbers)")


def add_eval_commands(sub) -> None:
    """`gptwo eval ppl|lambada|hellaswag|wikitext2|wikitext103|compare|harness`."""
    from gptwo.eval.catalog import TASK_INFO  # plain data: keeps --help fast

    ev = sub.add_parser("eval", help="Evaluate models: perplexity, GPT-2's zero-shot tasks, comparisons, lm-eval.", description="Evaluate models: perplexity, GPT-2's zero-shot tasks, comparisons, lm-evaluation-harness.")
    esub = ev.add_subparsers(dest="eval_command", required=True, parser_class=_Parser, metavar="EVAL_COMMAND")

    p = _command(esub, "ppl", _cmd_eval_ppl, "Perplexity per token and per word, and bits per byte, of text files (strided sliding window).")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files; each is one document, scored from an <|endoftext|> prefix")
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
def add_serve_commands(sub) -> None:
    """`gptwo serve` (serving issue)."""


# --------------------------------------------------------------------------- webtext
def add_webtext_commands(sub) -> None:
    """`gptwo webtext ...` (WebText issue)."""


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gptwo", description="GPT-2: model, tokenizer, data, training, serving, evaluation.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for add in (add_core_commands, add_data_commands, add_train_commands, add_eval_commands, add_serve_commands, add_webtext_commands):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("GPTWO_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except GptwoError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("error: interrupted — rerun the command to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 - last resort: one line, traceback only with --debug
        if debug:
            raise
        print(f"error: {type(err).__name__}: {err} — rerun with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
