"""`gptwo prepare`: a corpus into token shards; `gptwo prepare chat`: conversations into shards with a loss mask."""

from __future__ import annotations

import argparse
import sys

from gptwo.argtypes import Parser, RoutingParser, command, float_in, int_at_least, seed_type


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from gptwo.data.shard_corpus import prepare

    meta = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
        text_field=args.text_field,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    _report(meta, "documents", args.out)
    return 0


def _cmd_prepare_chat(args: argparse.Namespace) -> int:
    from gptwo.data.chat import prepare_chat, read_template_file

    template = read_template_file(args.chat_template) if args.chat_template else None
    meta = prepare_chat(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        chat_template=template,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
        count_all=args.count_all,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    _report(meta, "conversations", args.out)
    if meta["loss_mask"]:
        train = meta["splits"]["train"]
        print(f"the loss counts {train['counted_tokens']:,} of {train['tokens']:,} train tokens", file=sys.stderr)
    return 0


def _report(meta: dict, what: str, out: str) -> None:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"{train['documents']} {what}, {meta['train_tokens']:,} tokens in {len(train['shards'])} train shard(s); "
        f"{val['documents']} {what}, {meta['val_tokens']:,} tokens in {len(val['shards'])} val shard(s) "
        f"-> {out}",
        file=sys.stderr,
    )


def add_commands(sub) -> None:
    """`gptwo prepare` (training issue, data part) and `gptwo prepare chat` (issue 24)."""
    sub._parser_class = RoutingParser  # argparse makes subcommand parsers of this class; no public way per command
    p = command(
        sub,
        "prepare",
        _cmd_data_prepare,
        "Tokenize a text corpus into train/val token shards for 'gptwo train'.",
        epilog="subcommand:\n  gptwo prepare chat FILE.jsonl... --out DIR   conversations into shards with a loss "
        "mask (see 'gptwo prepare chat --help')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub._parser_class = Parser
    _add_prepare_options(p)
    c = Parser(
        prog="gptwo prepare chat",
        description='Tokenize conversations (JSON lines of {"messages": [{"role", "content"}, ...]} or '
        '{"prompt", "completion"}) with a chat template into train/val shards for \'gptwo train\', with a loss '
        "mask that counts only the assistant's tokens.",
    )
    c.set_defaults(func=_cmd_prepare_chat)
    _add_chat_options(c)
    p.routes = {"chat": c}


def _add_prepare_options(p) -> None:
    from gptwo.data import DEFAULT_VAL_FRACTION

    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text files or folders (.txt, .md, .jsonl, .jsonl.zst, .parquet), 'builtin' (Python's own docs, "
        "no download) "
        "or hf:NAME[:CONFIG][@SPLIT] (a Hugging Face dataset, streamed; e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1)",
    )
    _add_output_options(p)
    p.add_argument(
        "--tokenizer", default="gpt2", help="'gpt2' (default), a tokenizer.json file, or a model folder holding one"
    )
    p.add_argument(
        "--val-fraction",
        type=float_in(0.0, 1.0),
        default=DEFAULT_VAL_FRACTION,
        help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION}; at least one document, "
        "or the end of a single document)",
    )
    p.add_argument(
        "--workers",
        type=int_at_least(1),
        default=None,
        help="tokenizer processes for large corpora (default: one per CPU core)",
    )
    p.add_argument(
        "--text-field", default="text", help="JSON field / parquet or dataset column holding the text (default text)"
    )
    _add_shard_options(p)


def _add_chat_options(p) -> None:
    from gptwo.data import DEFAULT_VAL_FRACTION

    p.add_argument(
        "inputs",
        nargs="+",
        metavar="FILE",
        help="JSON lines files (.jsonl, .jsonl.zst), one conversation per line, or folders of them",
    )
    _add_output_options(p)
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="'gpt2' (default), a tokenizer.json file, or a model folder holding one (and maybe its chat template)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template file (default: the --tokenizer folder's template if it has one, else gptwo's; "
        "see docs/training.md)",
    )
    p.add_argument(
        "--count-all",
        action="store_true",
        help="the loss counts every token (system and user turns too), not only the assistant's",
    )
    p.add_argument(
        "--val-fraction",
        type=float_in(0.0, 1.0),
        default=DEFAULT_VAL_FRACTION,
        help=f"share of conversations held out for validation (default {DEFAULT_VAL_FRACTION}; at least one when "
        "there are two or more)",
    )
    _add_shard_options(p)


def _add_output_options(p) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="output folder: shards, tokenizer.json, meta.json; new, empty, or an earlier preparation (replaced only "
        "once the new one is complete)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="prepare into an existing --out that holds other files (its tokenizer.json and meta.json are replaced)",
    )


def _add_shard_options(p) -> None:
    from gptwo.data import DEFAULT_SHARD_TOKENS

    p.add_argument(
        "--shard-tokens",
        type=int_at_least(1),
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})",
    )
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
