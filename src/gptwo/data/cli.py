"""`gptwo prepare`: a corpus into token shards."""

from __future__ import annotations

import argparse
import sys

from gptwo.argtypes import command, float_in, int_at_least, seed_type


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
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"{train['documents']} documents, {meta['train_tokens']:,} tokens in {len(train['shards'])} train shard(s); "
        f"{val['documents']} documents, {meta['val_tokens']:,} tokens in {len(val['shards'])} val shard(s) "
        f"-> {args.out}",
        file=sys.stderr,
    )
    return 0


def add_commands(sub) -> None:
    """`gptwo prepare` (training issue, data part)."""
    from gptwo.data import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION

    p = command(
        sub, "prepare", _cmd_data_prepare, "Tokenize a text corpus into train/val token shards for 'gptwo train'."
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text files or folders (.txt, .md, .jsonl, .jsonl.zst, .parquet), 'builtin' (Python's own docs, "
        "no download) "
        "or hf:NAME[:CONFIG][@SPLIT] (a Hugging Face dataset, streamed; e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1)",
    )
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
    p.add_argument(
        "--shard-tokens",
        type=int_at_least(1),
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})",
    )
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
