"""What every part's command line shares: the parser class, argument types and report printing.

Each part registers its commands in `gptwo/<part>/cli.py:add_commands(sub)`; one option is validated
once, by the type it is declared with here or in its part. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from gptwo.errors import GptwoError

MAX_SPECULATIVE_TOKENS = 64  # --num-speculative-tokens

MAX_SEED = 2**63 - 1  # torch's seeds are 64-bit


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error: … — …` line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} — see '{self.prog} --help'\n")
        raise SystemExit(2)


class RoutingParser(Parser):
    """A command taking inputs and subcommands, e.g. `gptwo detect FILE...` and `gptwo detect calibrate ...`:
    a first argument named in `routes` is parsed by that subcommand's parser."""

    routes: dict[str, argparse.ArgumentParser] = {}  # set per instance

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] in self.routes:
            return self.routes[args[0]].parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
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


seed_type = int_at_least(0, MAX_SEED)


def float_in(
    low: float, high: float = float("inf"), low_open: bool = False, high_open: bool = True
) -> Callable[[str], float]:
    """An argparse type: a finite float in the range from `low` to `high` (open or closed ends)."""
    high_shown = "inf" if high == float("inf") else f"{high:g}"
    shown = f"{'(' if low_open else '['}{low:g}, {high_shown}{')' if high_open else ']'}"

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


def text_argument(value: str, what: str) -> str:
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
        raise GptwoError(
            f"{what} from stdin is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})",
            "pipe UTF-8 text, e.g. through iconv -f latin1 -t utf-8",
        ) from None


def command(sub, name: str, func: Callable[[argparse.Namespace], int | None], help: str, **kw):
    parser = sub.add_parser(name, help=help, description=help, **kw)
    parser.set_defaults(func=func)
    return parser


def add_inference_options(p) -> None:
    """`--dtype` and `--quantize`, shared by the commands that run a finished model."""
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="weights and activations in this precision (default: as stored, unchanged); bf16 halves the weights' "
        "memory, and is faster than fp32 only where the hardware multiplies bf16 natively (CUDA, or a CPU with "
        "AVX-512 BF16 or AMX: see 'gptwo kernels info'); elsewhere it is emulated and often slower",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="int8 weight-only quantization (one scale per output channel): ~4x smaller weights, slightly "
        "different outputs; faster decoding only where memory bandwidth limits it (large models), and it can be "
        "slower on a small model or a CPU without VNNI: measure with 'gptwo bench decode' (docs/inference.md)",
    )


def add_speculative_options(p, draft_help: str | None = None, speculate_help: str | None = None) -> None:
    """--draft-model, --speculate and --num-speculative-tokens (gptwo generate, gptwo bench decode, gptwo serve)."""
    p.add_argument(
        "--draft-model",
        default=None,
        help=draft_help
        or "speculative decoding: a smaller model with the same tokenizer proposes tokens that --model checks "
        "several at a time; the text follows --model's distribution (greedy: the same text)",
    )
    p.add_argument(
        "--speculate",
        choices=["ngram"],
        default=None,
        help=speculate_help
        or "speculative decoding with no draft model: ngram proposes what followed the last tokens' latest "
        "earlier occurrence in the text (prompt lookup; fast where the output copies the prompt)",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int_at_least(1, MAX_SPECULATIVE_TOKENS),
        default=4,
        help="draft tokens checked per step with --draft-model or --speculate (default 4)",
    )


MERGE_HELP = (
    "merge the adapter into the weights before --dtype/--quantize: one matmul per layer, as fast as the base "
    "model (and on a CPU the native C decode step); by default it is kept beside the unchanged base, which adds "
    "two small matmuls to each adapted layer and runs the torch step (the same logits, within float error)"
)


def add_adapter_option(p) -> None:
    """`--adapter DIR` and `--merge`: a LoRA adapter applied to --model (gptwo.lora), shared by the commands that
    load one model."""
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a LoRA adapter folder (a LoRA run's RUN/adapter, or peft's adapter_config.json + "
        "adapter_model.safetensors) for --model as its base; kept unmerged unless --merge",
    )
    p.add_argument("--merge", action="store_true", help=MERGE_HELP)


def adapter_spec(text: str) -> tuple[str | None, str]:
    """An argparse type: NAME=DIR, or DIR alone (named after the folder later: None)."""
    name, sep, directory = text.partition("=")
    if sep and name and "/" not in name and "\\" not in name:
        if not directory:
            raise argparse.ArgumentTypeError(f"{text!r} names no folder: write NAME=DIR")
        return name, directory
    if not text:
        raise argparse.ArgumentTypeError("an empty adapter: write NAME=DIR or DIR")
    return None, text


def add_adapters_option(p) -> None:
    """`--adapter [NAME=]DIR` (repeatable; `--lora-modules NAME=DIR ...` as vLLM spells it) and `--merge`, for
    gptwo serve: several adapters over one base, the request's `model` choosing."""
    p.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        type=adapter_spec,
        default=[],
        metavar="[NAME=]DIR",
        help="serve a LoRA adapter folder of --model as model NAME (default: the folder's name) beside the base "
        "(repeatable; rows of different adapters share one batch); a request's 'model' picks the adapter or the base",
    )
    p.add_argument(
        "--lora-modules",
        dest="adapters",
        action="extend",
        nargs="+",
        type=adapter_spec,
        metavar="NAME=DIR",
        help="the same as --adapter NAME=DIR for each (vLLM's spelling)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="with one --adapter: merge it into the weights and serve only the merged model, under the adapter's "
        "name (or --served-model-name) — one matmul per layer, as fast as the base (the native C step on a CPU)",
    )


def add_watermark_options(p, what: str) -> None:
    """`--watermark` and its settings (gptwo.watermark; the defaults are transformers' `WatermarkingConfig()`)."""
    p.add_argument("--watermark", action="store_true", help=what)
    p.add_argument(
        "--watermark-key",
        type=int_at_least(0, MAX_SEED),
        default=None,
        metavar="K",
        help="the secret the green lists are seeded with (default: env GPTWO_WATERMARK_KEY, else transformers' "
        "public 15485863)",
    )
    p.add_argument(
        "--watermark-gamma",
        type=float_in(0.0, 1.0, low_open=True),
        default=None,
        metavar="G",
        help="share of the vocabulary that is green at each step, in (0, 1) (default 0.25)",
    )
    p.add_argument(
        "--watermark-delta",
        type=float_in(0.0),
        default=None,
        metavar="D",
        help="bias added to green logits, >= 0 (default 2.0)",
    )
    p.add_argument(
        "--watermark-scheme",
        choices=("lefthash", "selfhash"),
        default=None,
        help="what seeds the green list: the previous token (lefthash, default) or the token itself (selfhash)",
    )
    p.add_argument(
        "--watermark-context-width",
        type=int_at_least(1, 64),
        default=None,
        metavar="N",
        help="tokens hashed into the seed (default 1)",
    )


def print_report(report: dict, as_json: bool, render) -> None:
    import json

    print(json.dumps(report) if as_json else render(report))


def choice_list(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of some of `choices` (at least one; repeats dropped, order kept)."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
        if not names:
            raise argparse.ArgumentTypeError(f"{text!r} names none of {', '.join(choices)}")
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown '{unknown[0]}': use some of {', '.join(choices)}")
        return names

    return parse


def device_name(text: str) -> str:
    """An argparse type: auto, cpu, mps, cuda or cuda:N (cpu and mps take no index); whether the device
    exists is checked where it is opened."""
    kind, colon, index = text.strip().lower().partition(":")
    if kind in ("auto", "cpu", "mps", "cuda") and not colon:
        return kind
    if kind == "cuda" and index.isdigit():
        return f"cuda:{int(index)}"
    if kind in ("auto", "cpu", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: {kind} takes no index; use {kind}")
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, mps, cuda or cuda:N")
