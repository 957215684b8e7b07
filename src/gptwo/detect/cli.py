"""`gptwo detect`, `detect calibrate`, `detect sample`."""

from __future__ import annotations

import argparse
import sys

from gptwo.argtypes import (
    Parser,
    RoutingParser,
    add_adapter_option,
    add_watermark_options,
    command,
    float_in,
    int_at_least,
    print_report,
    seed_type,
)


def _cmd_detect(args: argparse.Namespace) -> int:
    import json

    from gptwo.detect.detector import detect_files
    from gptwo.detect.watermark import WatermarkCheck
    from gptwo.errors import GptwoError
    from gptwo.watermark import DETECT_Z, settings_from_args

    settings = settings_from_args(args)
    if settings is None and (args.watermark_z is not None or args.ignore_repeated):
        given = "--watermark-z" if args.watermark_z is not None else "--ignore-repeated"
        raise GptwoError(f"{given} is given without --watermark", "add --watermark, or leave it out")
    watermark = None
    if settings is not None:
        z = DETECT_Z if args.watermark_z is None else args.watermark_z
        watermark = WatermarkCheck(settings, z, args.ignore_repeated)
    if args.html:
        from gptwo.detect.gltr import check_html_out

        check_html_out(args.html, args.files)
    docs, tokenizer = detect_files(
        args.model,
        args.files,
        reference_spec=args.reference,
        calibration=args.calibration,
        min_tokens=args.min_tokens,
        stride=args.stride,
        top=args.top,
        device=args.device,
        watermark=watermark,
        adapter=args.adapter,
        merge=args.merge,
    )
    if args.html:
        from gptwo.detect.gltr import write_html

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
    from gptwo.detect.calibrate import calibrate, render_calibration

    report = calibrate(
        args.model,
        args.human,
        args.generated,
        reference_spec=args.reference,
        detector=args.detector,
        max_fpr=args.max_fpr,
        min_tokens=args.min_tokens,
        out=args.out,
        plot=args.plot,
        stride=args.stride,
        device=args.device,
        lexicon=None if args.lexicon == "none" else args.lexicon,
        folds=args.folds,
        adapter=args.adapter,
        merge=args.merge,
    )
    print_report(report, args.json, render_calibration)
    return 0


def _cmd_detect_sample(args: argparse.Namespace) -> int:
    from gptwo.detect.pairs import sample_set

    summary = sample_set(
        args.model,
        args.source,
        args.out,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        per_document=args.per_document,
        limit=args.limit,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        adapter=args.adapter,
        merge=args.merge,
    )
    print(
        f"{summary['pairs']} matched pairs -> {args.out}/human and {args.out}/generated "
        f"(try: gptwo detect calibrate --model {args.model} --human {args.out}/human --generated {args.out}/generated)",
        file=sys.stderr,
    )
    return 0


def add_commands(sub) -> None:
    """`gptwo detect FILE...`, `gptwo detect calibrate`, `gptwo detect sample` (detection issue)."""
    from gptwo.detect import (  # plain constants: keeps --help fast
        DEFAULT_DETECTOR,
        DEFAULT_MIN_TOKENS,
        MAX_FOLDS,
        MAX_PASSAGES,
        MAX_TOP,
    )

    def common(p, reference: bool = True, min_tokens: int | None = DEFAULT_MIN_TOKENS) -> None:
        p.add_argument(
            "--model",
            required=True,
            help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2",
        )
        add_adapter_option(p)
        if reference:
            p.add_argument(
                "--reference",
                default=None,
                help="a second model with the same tokenizer: adds the Binoculars score (--adapter is not applied to "
                "it)",
            )
            p.add_argument(
                "--stride",
                type=int_at_least(1),
                default=None,
                help="texts longer than the context are scored in windows advancing by this many tokens "
                "(default: half the context)",
            )
        p.add_argument(
            "--min-tokens",
            type=int_at_least(1),
            default=min_tokens,
            help=f"texts with fewer tokens are 'too short' to judge (default {DEFAULT_MIN_TOKENS}"
            + (", or the calibration's)" if min_tokens is None else ")"),
        )
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")

    epilog = (
        "subcommands:\n"
        "  gptwo detect calibrate --model M --human DIR --generated DIR   fit the detector "
        "(see 'gptwo detect calibrate --help')\n"
        "  gptwo detect sample --model M --source DATA --out DIR          write a matched human/generated set\n\n"
        "The detector is the calibrated classifier saved beside the model by 'gptwo detect calibrate' "
        "when there is one,\n"
        "else Fast-DetectGPT's analytic statistic (score > threshold = generated). See docs/detect.md."
    )
    # argparse makes subcommand parsers of this class; no public way to pick it per command
    sub._parser_class = RoutingParser
    p = command(
        sub,
        "detect",
        _cmd_detect,
        "Was this text written by the model? Per-token probability, rank, entropy; detection scores and a verdict.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub._parser_class = Parser
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, one document each, or '-' for stdin")
    common(p, min_tokens=None)
    p.add_argument(
        "--calibration",
        default=None,
        help="calibration JSON (default: detect-calibration.json in the model folder; "
        "without one the verdict is uncalibrated)",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per input per line: file, tokens, score, verdict, scores"
    )
    p.add_argument(
        "--tokens",
        action="store_true",
        help="also show each token's probability, rank, entropy and top alternatives (in JSON: token_stats)",
    )
    p.add_argument(
        "--top",
        type=int_at_least(0, MAX_TOP),
        default=10,
        help=f"alternatives kept per token, 0-{MAX_TOP} (default 10)",
    )
    p.add_argument(
        "--html",
        default=None,
        metavar="OUT",
        help="write a GLTR-style HTML report: tokens coloured by rank, alternatives on hover, histograms "
        "(with --watermark, also by green/red)",
    )
    add_watermark_options(
        p,
        "also test for the watermark of 'gptwo generate --watermark' (or transformers') with these settings: "
        "in JSON a 'watermark' object with z, p_value, green_fraction, tokens_scored, detected",
    )
    p.add_argument(
        "--watermark-z",
        type=float_in(-1e9, 1e9),
        default=None,
        metavar="Z",
        help="z at or above which the watermark counts as detected (default 4: 3e-5 false positives)",
    )
    p.add_argument(
        "--ignore-repeated",
        action="store_true",
        help="count each repeated n-gram (seed tokens + token) once in the watermark test",
    )

    c = Parser(
        prog="gptwo detect calibrate",
        description="AUROC and TPR at a false-positive budget for every statistic and for a supervised classifier "
        "(cross-validated by source document); saves the detector and its threshold beside the model, and a ROC plot.",
    )
    c.set_defaults(func=_cmd_detect_calibrate)
    common(c)
    c.add_argument("--human", required=True, help="folder of human-written .txt files (one document each)")
    c.add_argument(
        "--generated",
        required=True,
        action="append",
        help="folder of generated .txt files, e.g. from 'gptwo detect sample'; once per sampling setting to fit all",
    )
    c.add_argument(
        "--detector",
        default="classifier",
        help="detector saved: classifier (default: logistic regression on the statistics and a lexicon) "
        f"or one statistic, e.g. {DEFAULT_DETECTOR} (binoculars needs --reference)",
    )
    c.add_argument(
        "--lexicon",
        default="auto",
        help="training text whose word counts the classifier uses: a prepared data folder (train split) or a folder "
        "of .txt files; auto (default) = MODEL/data when present; none = no lexicon features",
    )
    c.add_argument(
        "--folds",
        type=int_at_least(2, MAX_FOLDS),
        default=5,
        help="cross-validation folds, split by source document, for the classifier's AUROC (default 5)",
    )
    c.add_argument(
        "--max-fpr",
        type=float_in(0, 1),
        default=0.01,
        help="share of human texts allowed above the threshold, in [0, 1) (default 0.01)",
    )
    c.add_argument(
        "--out",
        default=None,
        help="calibration JSON to write (default: MODEL/detect-calibration.json, which 'gptwo detect' reads)",
    )
    c.add_argument("--plot", default=None, help="ROC plot PNG (default: beside the calibration JSON, *-roc.png)")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")

    s = Parser(
        prog="gptwo detect sample",
        description="Write a matched evaluation set: each human passage's first tokens continued by the model, "
        "to the same length.",
    )
    s.set_defaults(func=_cmd_detect_sample)
    common(s, reference=False)
    s.add_argument(
        "--source",
        required=True,
        help="a prepared data folder (its val split: documents the model did not train on) or a folder of .txt files",
    )
    s.add_argument("--out", required=True, help="output folder: human/*.txt, generated/*.txt, sample.json")
    s.add_argument(
        "--prompt-tokens",
        type=int_at_least(1),
        default=16,
        help="tokens of each human passage given as the prompt (default 16)",
    )
    s.add_argument(
        "--new-tokens",
        type=int_at_least(1),
        default=None,
        help="tokens the model writes after the prompt; prompt + new tokens must fit the model's context "
        "(default 128, or what the context leaves after the prompt where that is less)",
    )
    s.add_argument(
        "--per-document",
        type=int_at_least(0),
        default=1,
        help="passages taken from each document, non-overlapping (default 1; 0 = all)",
    )
    s.add_argument(
        "--limit",
        type=int_at_least(1, MAX_PASSAGES),
        default=None,
        help=f"at most this many passages (up to {MAX_PASSAGES:,})",
    )
    s.add_argument("--temperature", type=float_in(0), default=1.0, help="sampling temperature (default 1.0)")
    s.add_argument("--top-k", type=int_at_least(1), default=None, help="sample only from the K most likely tokens")
    s.add_argument(
        "--top-p",
        type=float_in(0, 1, low_open=True, high_open=False),
        default=None,
        help="nucleus sampling: smallest set of tokens with total probability >= P",
    )
    s.add_argument("--seed", type=seed_type, default=0, help="random seed (default 0)")
    p.routes = {"calibrate": c, "sample": s}
