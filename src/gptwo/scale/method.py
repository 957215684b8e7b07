"""Choices made before a fit, and a backtest to pick among them on runs already measured.

A method says which parameter count is N (`params`, `params_total` or `params_non_embedding`; Pearce &
Song 2024 show the choice moves the fitted exponents at small scale), whether runs repeated with other
seeds are averaged first, whether each budget keeps only its `near_min` lowest-loss runs (the IsoFLOP
valley, where the prediction is wanted), the Huber δ and the number of L-BFGS starts, and how a budget's
best loss is predicted: the lowest predicted loss over the shapes it trains (`shapes`) or the loss at the
fitted compute-optimal N and D (`optimum`); and whether repeated tokens count as fresh or as Muennighoff et al.'s
(2023) effective data (`repeats`, scale/repeats.py). The backtest fits on the budgets below each budget in turn
and predicts that budget's best run (the seed-mean of its runs, whatever the method) — the same test as the
pre-registered prediction, on data in hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from gptwo.errors import GptwoError
from gptwo.scale.fit import DELTA, STARTS, compute_optimal, fit_constants, predict
from gptwo.scale.repeats import Repeats, effective_tokens, unique_of, with_effective_tokens

COUNTS = {"params": "params", "total": "params_total", "non_embedding": "params_non_embedding"}


@dataclass(frozen=True)
class Method:
    """How runs become fit points and how a budget's best loss is predicted."""

    count: str = "params"  # a key of COUNTS
    average_seeds: bool = False
    near_min: int = 0  # keep this many lowest-loss runs per budget; 0: all
    delta: float = DELTA
    starts: int = STARTS
    best: str = "shapes"  # "shapes" or "optimum"
    repeats: Repeats | None = None  # None: a repeated token counts as a fresh one

    def label(self) -> str:
        """A short name for tables."""
        repeats = f", repeats=muennighoff R*={self.repeats.rstar:g}" if self.repeats else ""
        return (
            f"N={self.count}, {'seed-mean' if self.average_seeds else 'each seed'}, "
            f"{f'{self.near_min} nearest min' if self.near_min else 'all runs'}, delta={self.delta:g}, "
            f"starts={self.starts}{repeats}, best={self.best}"
        )

    def corpus(self, points: list[dict]) -> tuple[float, float] | None:
        """(U, R*) for predictions under this method, U taken from --unique-tokens or the runs (which must agree);
        None without repeats."""
        if self.repeats is None:
            return None
        uniques = {unique_of(p, self.repeats) for p in points}
        if len(uniques) != 1:
            raise GptwoError(
                f"the runs record {len(uniques)} different unique_tokens "
                f"({', '.join(f'{u:g}' for u in sorted(uniques))}); one corpus size predicts",
                "fit runs of one data folder, or pass --unique-tokens U",
            )
        return uniques.pop(), self.repeats.rstar

    def with_(self, **changes) -> Method:
        """A copy with some choices changed."""
        return replace(self, **changes)


def with_count(points: list[dict], count: str) -> list[dict]:
    """The runs with N taken from the chosen count (each run states all three)."""
    if count not in COUNTS:
        raise GptwoError(
            f"parameter count '{count}' is not one of {', '.join(COUNTS)}", "use --count params, total or non_embedding"
        )
    key = COUNTS[count]
    if key == "params":
        return list(points)
    missing = [p for p in points if key not in p]
    if missing:
        raise GptwoError(
            f"a run states no {key} (only sweeps from 'gptwo scale run' record it)",
            "fit with --count params, or add the field to the JSONL",
        )
    return [{**p, "params": float(p[key])} for p in points]


def average_seeds(points: list[dict]) -> list[dict]:
    """One point per (budget, N, D): the geometric mean of the losses of its seeds (`seeds` says how many)."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p.get("budget"), p["params"], p["tokens"]), []).append(p)
    return [
        {**group[0], "loss": math.exp(float(np.mean([math.log(p["loss"]) for p in group]))), "seeds": len(group)}
        for group in groups.values()
    ]


def near_minimum(points: list[dict], keep: int) -> list[dict]:
    """Per budget, the `keep` runs of lowest loss (runs without a budget all stay); keep=0 keeps everything."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise GptwoError(f"--near-min {keep!r} is not a whole number of runs", "use --near-min 0 (all runs) or more")
    if keep == 0:
        return list(points)
    chosen = [p for p in points if not p.get("budget")]
    for budget in sorted({p["budget"] for p in points if p.get("budget")}):
        chosen += sorted((p for p in points if p.get("budget") == budget), key=lambda p: p["loss"])[:keep]
    return chosen


def prepare(points: list[dict], method: Method) -> list[dict]:
    """The fit's points under a method: count, then seed-averaging, then the runs near each budget's minimum,
    then effective tokens."""
    points = with_count(points, method.count)
    if method.average_seeds:
        points = average_seeds(points)
    return with_effective_tokens(near_minimum(points, method.near_min), method.repeats)


def predicted_best(
    constants: dict,
    budget: float,
    shapes: list[tuple[float, float]],
    how: str = "shapes",
    corpus: tuple[float, float] | None = None,
) -> dict:
    """A budget's predicted best loss: the lowest over its (N, D) shapes, or at the compute-optimal N, D
    (D tokens read; `corpus` = (U, R*) for repeats)."""
    if how == "optimum":
        optimum = compute_optimal(constants, budget, corpus)
        return {"loss": optimum["loss"], "params": optimum["params"], "tokens": optimum["tokens"]}
    if how != "shapes":
        raise GptwoError(f"best='{how}' is neither 'shapes' nor 'optimum'", "use --best shapes or --best optimum")
    losses = [predict(constants, n, effective_tokens(d, *corpus) if corpus else d) for n, d in shapes]
    i = int(np.argmin(losses))
    return {"loss": losses[i], "params": shapes[i][0], "tokens": shapes[i][1]}


def backtest(points: list[dict], method: Method, first: int = 2) -> list[dict]:
    """For each budget after the `first` smallest: fit on the budgets below it, predict its best run;
    one row per budget."""
    if not method.delta > 0:
        raise GptwoError(f"Huber delta {method.delta} must be positive", "use e.g. --delta 1e-3 (the papers') or 3e-3")
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise GptwoError(f"--first {first!r} is not a positive whole number of budgets", "use e.g. --first 2")
    budgets = sorted({p["budget"] for p in points if p.get("budget")})
    if len(budgets) <= first:
        raise GptwoError(
            f"{len(budgets)} budgets: a backtest fits on {first} or more and predicts a larger one",
            "run a sweep with more budgets",
        )
    rows = []
    for budget in budgets[first:]:
        train = prepare([p for p in points if p.get("budget") and p["budget"] < budget], method)
        counted = average_seeds(
            with_count([p for p in points if p.get("budget") == budget], method.count)
        )  # the target: seed-mean losses
        constants = fit_constants(train, delta=method.delta, count=method.starts)
        shapes = sorted({(p["params"], p["tokens"]) for p in counted})
        guess = predicted_best(constants, budget, shapes, method.best, method.corpus(train))
        best = min(counted, key=lambda p: p["loss"])
        rows.append(
            {
                "budget": budget,
                "fitted_runs": len(train),
                "predicted": guess["loss"],
                "predicted_params": guess["params"],
                "measured": best["loss"],
                "measured_params": best["params"],
                "error": guess["loss"] / best["loss"] - 1,
            }
        )
    return rows


def plan_largest(plan_path: str, method: Method) -> tuple[float, list[tuple[float, float]], list[list[str]]]:
    """A plan's largest budget, its (N, D) shapes under the method's count, and the run names of each shape."""
    from gptwo.scale.plan import read_plan

    runs = read_plan(plan_path)["runs"]
    key = COUNTS[method.count]
    for run in runs:
        missing = [k for k in (key, "tokens") if run.get(k) is None] + ["budget"] * (
            run.get("budget") is None and run.get("flops") is None
        )
        if missing:
            raise GptwoError(
                f"run {run['name']} of {plan_path} states no {', '.join(missing)}, which --best-of needs",
                "pass a plan written by 'gptwo scale plan' (it states every count)",
            )
    budget = max(float(r.get("budget") or r["flops"]) for r in runs)
    runs = [r for r in runs if math.isclose(float(r.get("budget") or r["flops"]), budget, rel_tol=1e-6)]
    shapes = sorted({(float(r[key]), float(r["tokens"])) for r in runs})
    return budget, shapes, [sorted(r["name"] for r in runs if (float(r[key]), float(r["tokens"])) == s) for s in shapes]


def best_of_plan(report: dict, plan_path: str, method: Method) -> dict:
    """The predicted best run of a plan's largest budget (the method's pick, with its interval) and each shape's
    predicted loss.

    The report must hold predictions for the plan's shapes and the optimum at its budget (the CLI asks for both).
    """
    budget, shapes, names = plan_largest(plan_path, method)
    constants = {k: report[k] for k in ("E", "A", "B", "alpha", "beta")}
    guess = predicted_best(
        constants,
        budget,
        shapes,
        method.best,
        (report["repeats"]["unique_tokens"], report["repeats"]["rstar"]) if "repeats" in report else None,
    )
    per_shape = [
        {**p, "names": n}
        for p, n in zip((p for p in report["predictions"] if (p["params"], p["tokens"]) in shapes), names)
    ]
    lowest = min(per_shape, key=lambda s: s["loss"])
    interval = report["intervals"].get(f"loss_opt@{budget:g}") if method.best == "optimum" else lowest.get("interval")
    return {
        "budget": budget,
        "method": method.label(),
        "loss": guess["loss"],
        "interval": interval,
        "params": guess["params"],
        "tokens": guess["tokens"],
        "best_shape": lowest["names"],
        "shapes": per_shape,
    }


def format_backtest(rows: list[dict], method: Method) -> str:
    """The backtest as a small table."""
    lines = [f"backtest, {method.label()}", "  budget   fitted runs   predicted best   measured best   error"]
    lines += [
        f"  {r['budget']:<8.3g} {r['fitted_runs']:>11}   {r['predicted']:>14.4f}   {r['measured']:>13.4f}   "
        f"{100 * r['error']:+.2f}%"
        for r in rows
    ]
    errors = [abs(r["error"]) for r in rows]
    lines.append(f"  mean |error| {100 * sum(errors) / len(errors):.2f}%, largest {100 * max(errors):.2f}%")
    return "\n".join(lines)
