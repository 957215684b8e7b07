"""`gptwo scale plan|run|fit|backtest`."""

from __future__ import annotations

import argparse
import sys

from gptwo.argtypes import Parser, command, float_in, int_at_least, print_report, seed_type
from gptwo.errors import GptwoError


def _cmd_scale_plan(args: argparse.Namespace) -> int:
    from gptwo.scale.plan import make_plan, parse_budgets, parse_shapes, vocab_size_of, write_plan

    if (args.data is None) == (args.vocab_size is None):
        raise GptwoError(
            "give the vocabulary as --data DIR or --vocab-size N (one of them)", "e.g. --data data/builtin"
        )
    vocab = args.vocab_size if args.vocab_size is not None else vocab_size_of(args.data)
    plan = make_plan(
        parse_budgets(args.budgets),
        vocab,
        parse_shapes(args.shapes) if args.shapes else None,
        args.per_budget,
        args.tokens_per_param,
    )
    write_plan(plan, args.out)
    for run in plan["runs"]:
        print(
            f"{run['name']:>22}  N={run['params']:>10,} (non-embedding {run['params_non_embedding']:,})  "
            f"D={run['tokens']:>11,}  C={run['flops']:.3g}"
        )
    print(
        f"{len(plan['runs'])} runs, {sum(r['flops'] for r in plan['runs']):.3g} FLOPs in all -> {args.out}  "
        f"({plan['formula']})",
        file=sys.stderr,
    )
    return 0


def _cmd_scale_run(args: argparse.Namespace) -> int:
    from gptwo.scale.run import run_sweep

    records = run_sweep(args.plan, args.data, args.out, parallel=args.parallel, threads=args.threads)
    print(
        f"{len(records)} runs finished -> {args.out}/results.jsonl (fit them: gptwo scale fit {args.out})",
        file=sys.stderr,
    )
    return 0


def _cmd_scale_fit(args: argparse.Namespace) -> int:
    from gptwo.scale.fit import fit_report, format_report, parse_point, read_points, warning_line, without_budgets
    from gptwo.scale.method import best_of_plan, plan_largest, prepare

    if args.plot:  # before the fit: a user's file is never replaced by a plot
        from gptwo.fileio import check_png_output

        check_png_output(args.plot)
    method = _scale_method(args)
    queries, budgets = [parse_point(p) for p in args.predict], list(args.budget)
    if args.best_of:
        target, shapes, _ = plan_largest(args.best_of, method)
        queries, budgets = (
            queries + [s for s in shapes if s not in queries],
            budgets + [target] * (target not in budgets),
        )
    runs = read_points(args.runs)  # read once; the excluded budgets are left out of the fit below
    points = prepare(without_budgets(runs, args.exclude_budget), method)
    every = prepare(runs, method)
    for budget in args.exclude_budget:
        if not any(p.get("budget") and abs(p["budget"] / budget - 1) < 1e-6 for p in every):
            print(f"note: no run has budget {budget:g} (yet); nothing of it to leave out", file=sys.stderr)
    report = fit_report(
        points,
        queries=queries,
        budgets=budgets,
        bootstrap=args.bootstrap,
        seed=args.seed,
        delta=args.delta,
        corpus=method.corpus(points),
    )
    if args.best_of:
        report["best"] = best_of_plan(report, args.best_of, method)
    if args.plot:
        from gptwo.scale.plots import plot_fit

        plot_fit(points, report, args.plot, extra=every)
    line = warning_line(report)
    if line:
        print(line, file=sys.stderr)
    print_report(report, args.json, format_report)
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

    return Method(
        count=args.count,
        average_seeds=args.average_seeds,
        near_min=args.near_min,
        delta=args.delta,
        best=args.best,
        repeats=parse_repeats(args.repeats, args.unique_tokens),
    )


def _scale_method_options(p) -> None:
    """The fit's method choices, shared by fit and backtest (docs/scaling.md, 'Choosing the method')."""
    p.add_argument(
        "--count",
        default="params",
        choices=("params", "total", "non_embedding"),
        help="which parameter count is N: params (default; all but position embeddings), total, "
        "or non_embedding (Kaplan's)",
    )
    p.add_argument(
        "--average-seeds",
        action="store_true",
        help="average runs of the same N and D (other seeds) into one point, geometric mean of losses",
    )
    p.add_argument(
        "--near-min",
        type=int_at_least(0),
        default=0,
        metavar="K",
        help="fit only each budget's K lowest-loss runs (default 0: all runs)",
    )
    p.add_argument(
        "--delta",
        type=float_in(0, low_open=True),
        default=1e-3,
        help="the Huber loss's delta on log-loss residuals (default 1e-3, the papers')",
    )
    p.add_argument(
        "--best",
        default="optimum",
        choices=("optimum", "shapes"),
        help="a budget's predicted best loss: at the fitted compute-optimal N, D (optimum, default) "
        "or the lowest over its planned shapes (shapes)",
    )
    p.add_argument(
        "--repeats",
        default="none",
        metavar="none|muennighoff[:RSTAR]",
        help="repeated tokens: none (default; counted as fresh) or Muennighoff et al. 2023's effective data "
        "D' = U + U*R*(1 - exp(-R/R*)), R* 15.4 unless given",
    )
    p.add_argument(
        "--unique-tokens",
        type=float_in(0, low_open=True),
        default=None,
        metavar="U",
        help="unique training tokens U for --repeats (default: each run's recorded unique_tokens; "
        "the data folder's meta.json train_tokens)",
    )


def add_commands(sub) -> None:
    """`gptwo scale plan|run|fit` (scaling-laws issue): IsoFLOP sweeps and L(N, D) fits. See docs/scaling.md."""
    scale = sub.add_parser(
        "scale",
        help="Scaling laws: plan an IsoFLOP sweep, run it, fit L(N, D) and predict.",
        description="Scaling laws: plan an IsoFLOP sweep, run it, fit L(N, D) = E + A/N^alpha + B/D^beta and predict.",
    )
    ssub = scale.add_subparsers(dest="scale_command", required=True, parser_class=Parser)
    p = command(
        ssub,
        "plan",
        _cmd_scale_plan,
        "Write an IsoFLOP plan: per compute budget, model shapes and the tokens each trains for (C = 6*N*D).",
    )
    p.add_argument(
        "--budgets", required=True, help="compute budgets in FLOPs, comma-separated (e.g. 2e11,6e11,2e12,6e12)"
    )
    p.add_argument(
        "--shapes",
        default=None,
        help="model shapes n_layer x n_head x n_embd, comma-separated "
        "(e.g. 2x2x64,4x4x128; default: a built-in ladder of ten)",
    )
    p.add_argument(
        "--per-budget",
        type=int_at_least(1, 100),
        default=5,
        help="runs per budget: the shapes nearest the guessed optimum (default 5)",
    )
    p.add_argument(
        "--tokens-per-param",
        type=float_in(0, low_open=True),
        default=20.0,
        help="tokens per parameter that centres each budget's shapes (default 20, Chinchilla's)",
    )
    p.add_argument(
        "--data", default=None, help="a prepared data folder, to read the vocabulary size from its tokenizer"
    )
    p.add_argument(
        "--vocab-size", type=int_at_least(1, 1_000_000), default=None, help="the vocabulary size, instead of --data"
    )
    p.add_argument("--out", required=True, help="the plan file to write (JSON, editable)")
    p = command(
        ssub,
        "run",
        _cmd_scale_run,
        "Train every run of a plan (ordinary run folders); finished runs are skipped, killed ones resumed.",
    )
    p.add_argument("plan", help="a plan file from 'gptwo scale plan'")
    p.add_argument(
        "--data", required=True, help="prepared data folder (from 'gptwo prepare'), the same vocabulary as the plan"
    )
    p.add_argument("--out", required=True, help="sweep folder: runs/NAME run folders and results.jsonl")
    p.add_argument(
        "--parallel",
        type=int_at_least(1, 1024),
        default=1,
        help="runs trained at once, each in its own process (default 1)",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(0, 4096),
        default=0,
        help="torch threads per run (default: CPU cores / --parallel)",
    )
    p = command(
        ssub,
        "fit",
        _cmd_scale_fit,
        "Fit L(N, D) = E + A/N^alpha + B/D^beta to finished runs (Huber on log loss, L-BFGS), "
        "with bootstrap intervals.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUNS",
        help='sweep folders, or JSONL files with one {"params": N, "tokens": D, "loss": L} per line',
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (E, A, B, alpha, beta, intervals, optimum, predictions)",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="write the plots to this PNG: IsoFLOP curves, loss vs FLOPs with the fitted frontier, "
        "fitted vs measured (left-out runs hollow)",
    )
    p.add_argument(
        "--predict",
        action="append",
        default=[],
        metavar="N,D",
        help="predict the loss of N parameters trained on D tokens (repeatable)",
    )
    p.add_argument(
        "--budget",
        action="append",
        type=float_in(0, low_open=True),
        default=[],
        metavar="C",
        help="report the compute-optimal N and D for C FLOPs (repeatable; default: the largest budget fitted)",
    )
    p.add_argument(
        "--exclude-budget",
        action="append",
        type=float_in(0, low_open=True),
        default=[],
        metavar="C",
        help="leave a sweep's runs of this budget out of the fit (to predict them; repeatable)",
    )
    p.add_argument(
        "--bootstrap",
        type=int_at_least(0, 100_000),
        default=200,
        help="bootstrap resamples for the intervals (default 200; 0: none)",
    )
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument(
        "--best-of",
        default=None,
        metavar="PLAN",
        help="predict the best run of this plan's largest budget: each shape's loss and the predicted best "
        "(see --best)",
    )
    _scale_method_options(p)
    p = command(
        ssub,
        "backtest",
        _cmd_scale_backtest,
        "Choose a fit method on runs in hand: fit on the budgets below each budget, predict its best run, "
        "report the errors.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUNS", help="sweep folders or JSONL files of runs with budgets (as for fit)"
    )
    p.add_argument(
        "--first",
        type=int_at_least(1),
        default=2,
        help="the smallest budgets only ever fitted, never predicted (default 2)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: the method and one row per predicted budget"
    )
    _scale_method_options(p)
