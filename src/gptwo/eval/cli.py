"""`gptwo eval ppl|task|compare|harness`."""

from __future__ import annotations

import argparse

from gptwo.argtypes import Parser, add_adapter_option, add_inference_options, command, int_at_least, print_report
from gptwo.errors import GptwoError


def _run_options(args: argparse.Namespace) -> dict:
    """How every eval command runs its model: device, batching, window stride, precision, progress."""
    return {
        "stride": args.stride,
        "batch_size": args.batch_size,
        "device": args.device,
        "progress": not args.quiet,
        "dtype": args.dtype,
        "quantize": args.quantize,
    }


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    from gptwo.eval.perplexity import perplexity_report
    from gptwo.eval.tables import render_perplexity

    report = perplexity_report(
        args.model,
        args.files,
        adapter=args.adapter,
        merge=args.merge,
        **_run_options(args),
    )
    print_report(report, args.json, render_perplexity)
    return 0


def _cmd_eval_task(args: argparse.Namespace) -> int:
    from gptwo.eval.tables import render_task
    from gptwo.eval.tasks import task_report

    report = task_report(
        args.task,
        args.model,
        data=args.data,
        limit=args.limit,
        adapter=args.adapter,
        merge=args.merge,
        **_run_options(args),
    )
    print_report(report, args.json, render_task)
    return 0


def _cmd_eval_compare(args: argparse.Namespace) -> int:
    from gptwo.eval.compare import compare_report
    from gptwo.eval.tables import render_compare

    data = {}
    for spec in args.data:
        task, sep, path = spec.partition("=")
        if not sep or not path:
            raise GptwoError(f"--data {spec!r} is not TASK=PATH", "write it like --data lambada=lambada_test.jsonl")
        data[task] = path
    tasks = [t for t in (args.tasks or "").split(",") if t]
    report = compare_report(
        args.models,
        files=args.files,
        tasks=tasks,
        data=data,
        limit=args.limit,
        **_run_options(args),
    )
    print_report(report, args.json, render_compare)
    return 0


def _cmd_eval_harness(args: argparse.Namespace) -> int:
    from gptwo.errors import require

    require("lm_eval", "gptwo eval harness", "eval")
    from gptwo.eval.harness import main as harness_main

    return harness_main(args.args)


def _eval_options(p, tasks: bool = False) -> None:
    p.add_argument(
        "--stride",
        type=int_at_least(1),
        default=None,
        help="tokens each sliding window advances; less than the context gives every token more context "
        "(default: the model's context)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=8, help="windows or requests per forward pass (default 8)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_inference_options(p)
    if tasks:
        p.add_argument(
            "--limit",
            type=int_at_least(1),
            default=None,
            help="use only the first N items of each task (quick checks; not comparable to published numbers)",
        )


def add_commands(sub) -> None:
    """`gptwo eval ppl|lambada|hellaswag|wikitext2|wikitext103|compare|harness`."""
    from gptwo.eval.catalog import TASK_INFO  # plain data: keeps --help fast

    ev = sub.add_parser(
        "eval",
        help="Evaluate models: perplexity, GPT-2's zero-shot tasks, comparisons, lm-eval.",
        description="Evaluate models: perplexity, GPT-2's zero-shot tasks, comparisons, lm-evaluation-harness.",
    )
    esub = ev.add_subparsers(dest="eval_command", required=True, parser_class=Parser, metavar="EVAL_COMMAND")

    p = command(
        esub,
        "ppl",
        _cmd_eval_ppl,
        "Perplexity per token and per word, and bits per byte, of text files (strided sliding window).",
    )
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="UTF-8 text files, each one document scored from an <|endoftext|> prefix; a folder means its .txt and "
        ".md files (recursively)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2",
    )
    _eval_options(p)
    add_adapter_option(p)

    for task in TASK_INFO.values():
        p = command(esub, task.name, _cmd_eval_task, f"{task.summary}.")
        p.set_defaults(task=task.name)
        p.add_argument(
            "--model",
            required=True,
            help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2",
        )
        p.add_argument(
            "--data",
            default=None,
            help=f"local data file: {task.data_help}; without it, {task.hub_dataset} is downloaded",
        )
        _eval_options(p, tasks=True)
        add_adapter_option(p)

    p = command(esub, "compare", _cmd_eval_compare, "One table of the same metrics for several models.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders, run folders or hub ids")
    p.add_argument(
        "--files",
        nargs="+",
        default=[],
        metavar="FILE",
        help="text files for perplexity, word perplexity and bits per byte",
    )
    p.add_argument("--tasks", default="", help=f"comma-separated tasks to add: {', '.join(TASK_INFO)}")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="local data file for a task (repeatable); tasks without one are downloaded",
    )
    _eval_options(p, tasks=True)

    p = command(
        esub,
        "harness",
        _cmd_eval_harness,
        "Run lm-evaluation-harness with gptwo models available as --model gptwo; all arguments go to lm-eval "
        "(e.g. --model gptwo --model_args pretrained=PATH --tasks lambada_openai).",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="lm-eval's arguments, as for 'lm-eval run' (try: gptwo eval harness run --help)",
    )
