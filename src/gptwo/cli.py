"""The `gptwo` command line: the root parser, the error funnel and `main`.

Each part registers its own commands (`gptwo/<part>/cli.py:add_commands(sub)`); the shared parser
class and argument types live in gptwo/argtypes.py. The core commands (generate, tokenizer) are here.
Library imports happen inside the command functions so `gptwo --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from collections.abc import Sequence

from gptwo.argtypes import (
    MAX_SEED,
    Parser,
    add_adapter_option,
    add_inference_options,
    add_speculative_options,
    add_watermark_options,
    command,
    float_in,
    int_at_least,
    seed_type,
    text_argument,
)
from gptwo.errors import from_library_error

__all__ = ["MAX_SEED", "Parser", "build_parser", "main", "parse_args"]

# the parts whose `<part>.cli` module adds commands, in `gptwo --help` order
PARTS = ("data", "train", "eval", "serve", "webtext", "select", "detect", "scale", "bench", "infer", "export")


# --------------------------------------------------------------------------- core (generate, tokenizer)
def _cmd_generate(args: argparse.Namespace) -> int:
    from gptwo.generate import generate_cli_stream
    from gptwo.sampling import LogitControls
    from gptwo.text import unescape
    from gptwo.watermark import settings_from_args

    watermark = settings_from_args(args)
    controls = LogitControls(
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        logit_bias=tuple(dict(args.logit_bias).items()),  # a token given twice: its last bias
        min_tokens=args.min_tokens,
    )
    prompt = text_argument(args.prompt, "PROMPT")
    for piece in generate_cli_stream(
        args.model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=[unescape(s) for s in args.stop] or None,
        num_samples=args.num_samples,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        adapter=args.adapter,
        merge=args.merge,
        watermark=watermark,
        controls=controls if controls.active else None,
        stop_at_eot=not args.ignore_eos,
        draft_model=args.draft_model,
        speculate=args.speculate,
        num_speculative_tokens=args.num_speculative_tokens,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def logit_bias_type(text: str) -> tuple[int, float]:
    """An argparse type: ID=BIAS, a token id and a finite bias (clipped to [-100, 100] where it is used)."""
    token, sep, bias = text.partition("=")
    try:
        pair = int(token), float(bias)
    except ValueError:
        pair = None
    if not sep or pair is None or pair[0] < 0 or not math.isfinite(pair[1]):
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=BIAS (a token id and a number, e.g. 50256=-100)")
    return pair


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
    text = text_argument(args.text, "TEXT")
    print(" ".join(map(str, tok.encode(text))))
    return 0


def add_core_commands(sub) -> None:
    from gptwo.tokenizer import MAX_VOCAB  # plain constant: keeps --help fast

    p = command(sub, "generate", _cmd_generate, "Sample a continuation of PROMPT from a model (streams to stdout).")
    p.add_argument("prompt", help="prompt text, or '-' to read it from stdin")
    p.add_argument(
        "--model",
        required=True,
        help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2",
    )
    p.add_argument(
        "--max-new-tokens", type=int_at_least(0), default=100, help="number of tokens to generate (default 100)"
    )
    p.add_argument(
        "--temperature", type=float_in(0.0), default=1.0, help="sampling temperature; 0 means greedy (default 1.0)"
    )
    p.add_argument("--top-k", type=int_at_least(1), default=None, help="sample only from the K most likely tokens")
    p.add_argument(
        "--top-p",
        type=float_in(0.0, 1.0, low_open=True, high_open=False),
        default=None,
        help="nucleus sampling: smallest set of tokens with total probability >= P",
    )
    p.add_argument(
        "--presence-penalty",
        type=float_in(-2.0, 2.0, high_open=False),
        default=0.0,
        help="subtract P from the logit of every token already generated (OpenAI's; in [-2, 2], default 0)",
    )
    p.add_argument(
        "--frequency-penalty",
        type=float_in(-2.0, 2.0, high_open=False),
        default=0.0,
        help="subtract F times its count so far from each generated token's logit (OpenAI's; in [-2, 2], default 0)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float_in(0.0, low_open=True),
        default=1.0,
        help="divide the logits of tokens in the prompt or the output by R (multiply negative ones), as "
        "transformers and vLLM do; 1 is off, 1.2 a common choice (default 1)",
    )
    p.add_argument(
        "--logit-bias",
        type=logit_bias_type,
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS (clipped to [-100, 100]) to token ID's logit; -100 bans it (repeatable)",
    )
    p.add_argument(
        "--min-tokens",
        type=int_at_least(0),
        default=0,
        help="ban end-of-text until N tokens were generated (default 0)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating after end-of-text (printed as <|endoftext|>) up to --max-new-tokens",
    )
    p.add_argument("--seed", type=seed_type, default=None, help="random seed for reproducible samples")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop when this string appears (repeatable, at most 16 of at most 1024 characters each); "
        "it is not printed. \\n, \\t, \\r and \\\\ mean newline, tab, carriage return and a backslash, so "
        "--stop '\\n\\n' stops at a blank line",
    )
    p.add_argument(
        "--num-samples",
        type=int_at_least(1),
        default=1,
        help="number of independent samples, separated by a line of dashes",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    add_inference_options(p)
    add_adapter_option(p)
    add_speculative_options(p)
    add_watermark_options(
        p,
        "watermark the text (Kirchenbauer et al.): 'gptwo detect --watermark' or transformers' WatermarkDetector "
        "finds it",
    )

    tok = sub.add_parser(
        "tokenizer",
        help="Train or use a byte-level BPE tokenizer.",
        description="Train or use a byte-level BPE tokenizer.",
    )
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    p = command(tsub, "train", _cmd_tokenizer_train, "Train a byte-level BPE (GPT-2 style) on your own text.")
    p.add_argument(
        "inputs",
        nargs="+",
        help="text files or folders (.txt, .md, .jsonl, .jsonl.zst, .parquet with a 'text' field), 'builtin' or "
        "hf:NAME; each must exist",
    )
    p.add_argument(
        "--vocab-size",
        type=int_at_least(257, MAX_VOCAB),
        required=True,
        help="vocabulary size, including 256 byte tokens and <|endoftext|>",
    )
    p.add_argument(
        "--min-frequency", type=int_at_least(0), default=2, help="minimum pair frequency for a merge (default 2)"
    )
    p.add_argument("--out", required=True, help="output tokenizer file (JSON)")
    p = command(tsub, "encode", _cmd_tokenizer_encode, "Print the token ids of TEXT.")
    p.add_argument("text", help="text to encode, or '-' for stdin")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer file (default gpt2)")


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gptwo", description="GPT-2: model, tokenizer, data, training, serving, evaluation.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    add_core_commands(sub)
    for part in PARTS:
        importlib.import_module(f"gptwo.{part}.cli").add_commands(sub)
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
    """Run one `gptwo` command: exit 0, 2 for bad input (one `error: … — …` line), 1 for a bug, 130 on Ctrl-C
    (143 when training stopped on SIGTERM)."""
    args = parse_args(argv)
    debug = args.debug or bool(os.environ.get("GPTWO_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM where a command turns it into this (training)
        print(f"error: interrupted — {_INTERRUPTED.get(args.command, 'rerun the command')}", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 - input errors become one line; anything else is a bug
        if debug:
            raise
        mapped = from_library_error(err, args.command)
        if mapped is not None:
            print(f"error: {mapped}", file=sys.stderr)
            return mapped.code
        print(
            f"error: {type(err).__name__}: {err} — this is a bug: please report it with the output of --debug",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
