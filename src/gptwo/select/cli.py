"""`gptwo select score|filter|dsir`."""

from __future__ import annotations

import argparse
import sys

from gptwo.argtypes import Parser, command, float_in, int_at_least, seed_type


def _cmd_select_score(args: argparse.Namespace) -> int:
    from gptwo.select.score import score_documents

    written = score_documents(
        args.model,
        args.inputs,
        args.out,
        reference=args.reference,
        batch_tokens=args.batch_tokens,
        device=args.device,
        text_field=args.text_field,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(f"scored {written} document(s) -> {args.out}", file=sys.stderr)
    return 0


def _cmd_select_filter(args: argparse.Namespace) -> int:
    from gptwo.select.offline import filter_documents

    result = filter_documents(
        args.inputs,
        args.scores,
        args.out,
        by=args.by,
        keep=args.keep,
        band=args.band,
        text_field=args.text_field,
        overwrite=args.overwrite,
    )
    if result["not_finite"]:
        print(
            f"warning: {result['not_finite']} of {result['documents']} documents have a NaN or infinite "
            f"{result['by']} in {args.scores}; they were left out (never kept)",
            file=sys.stderr,
        )
    print(
        f"kept {result['kept']} of {result['documents']} documents ({result['band']} {result['by']} band) "
        f"-> {args.out}",
        file=sys.stderr,
    )
    return 0


def _cmd_select_dsir(args: argparse.Namespace) -> int:
    from gptwo.select.offline import dsir_resample

    result = dsir_resample(
        args.inputs,
        args.target,
        args.out,
        keep=args.keep,
        buckets=args.buckets,
        seed=args.seed,
        text_field=args.text_field,
        overwrite=args.overwrite,
    )
    print(
        f"kept {result['kept']} of {result['documents']} documents (importance resampling toward --target) "
        f"-> {args.out}",
        file=sys.stderr,
    )
    return 0


_keep = float_in(0.0, 1.0, low_open=True, high_open=False)


def add_commands(sub) -> None:
    """`gptwo select score|filter|dsir` (data selection issue; online selection is a training option)."""
    sel = sub.add_parser(
        "select",
        help="Choose training data with a model: score, filter, importance-resample.",
        description="Choose training data with a model: score documents, keep a band of them, "
        "or resample toward a target. "
        "Online selection during training: gptwo train ... selection=loss|reducible. See docs/selection.md.",
    )
    ssub = sel.add_subparsers(dest="select_command", required=True, parser_class=Parser, metavar="SELECT_COMMAND")
    inputs_help = (
        "text files or folders (.txt, .md, .jsonl, .jsonl.zst, .parquet), 'builtin' or hf:NAME (as for 'gptwo prepare')"
    )

    p = command(
        ssub,
        "score",
        _cmd_select_score,
        "Write each document's loss under a model (and its reducible loss) as JSON lines; resumes.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help)
    p.add_argument("--model", required=True, help="scoring model: model or run folder, or hub id")
    p.add_argument(
        "--reference",
        default=None,
        help="reference model (same tokenizer): adds reference_loss and reducible = loss - reference_loss",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output JSON lines (id, tokens, loss[, reference_loss, reducible]); an existing score file is continued",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over, replacing an existing --out (default: continue a score file, refuse any other file)",
    )
    p.add_argument(
        "--batch-tokens",
        type=int_at_least(1),
        default=4096,
        help="about this many tokens per forward pass and per flushed batch of rows (default 4096)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text (default text)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command(
        ssub,
        "filter",
        _cmd_select_filter,
        "Keep a band of documents by their scores; writes .jsonl.zst for 'gptwo prepare'.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help + "; the same inputs that were scored")
    p.add_argument("--scores", required=True, help="output of 'gptwo select score' for these inputs")
    p.add_argument("--by", choices=["loss", "reducible"], default="loss", help="score to rank by (default loss)")
    p.add_argument("--keep", type=_keep, required=True, help="fraction of documents to keep, in (0, 1]")
    p.add_argument(
        "--band",
        choices=["low", "middle", "high"],
        default=None,
        help="which scores to keep: low, middle or high (default: low for loss, high for reducible)",
    )
    p.add_argument("--out", required=True, help="output documents (.jsonl.zst), written atomically")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a document file of ours (default: refuse it)",
    )
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text (default text)")

    p = command(
        ssub, "dsir", _cmd_select_dsir, "Importance-resample documents toward a target sample (DSIR, hashed n-grams)."
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help)
    p.add_argument(
        "--target", nargs="+", required=True, help="documents that look like what you want (same input forms)"
    )
    p.add_argument("--keep", type=_keep, required=True, help="fraction of documents to keep, in (0, 1]")
    p.add_argument(
        "--buckets",
        type=int_at_least(1),
        default=10000,
        help="hash buckets for word unigrams and bigrams (default 10000)",
    )
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the resampling draw (default 0)")
    p.add_argument("--out", required=True, help="output documents (.jsonl.zst), written atomically")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a document file of ours (default: refuse it)",
    )
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text (default text)")
