"""Fit L(N, D) = E + A/N^α + B/D^β to finished runs, as Hoffmann et al. (2022, appendix D.2) do.

The loss is modelled in log space as LSE(a − α·log N, b − β·log D, e) with A = e^a, B = e^b, E = e^e, and
fitted by minimising the Huber loss (δ = 1e-3) of log-loss residuals with L-BFGS from a grid of starts,
keeping the best. Intervals come from a bootstrap over runs (resampled with replacement and refitted).
From the fit: the compute-optimal N and D for a budget C under C = 6·N·D (Hoffmann et al. eq. 4),
N_opt = G·(C/6)^a, D_opt = (C/6)^b / G, G = (αA / βB)^(1/(α+β)), a = β/(α+β), b = α/(α+β).
Besides the parametric fit, each budget with three runs or more gets its IsoFLOP minimum from a
parabola in log N (Chinchilla's approach 2), and the minima a power law in C.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np

from gptwo.errors import GptwoError

DELTA = 1e-3
# Hoffmann et al.'s grid of starts: α, β, e, a, b. Every point is scored; L-BFGS runs from the best few.
GRID = dict(
    alpha=(0.0, 0.5, 1.0, 1.5, 2.0),
    beta=(0.0, 0.5, 1.0, 1.5, 2.0),
    e=(-1.0, -0.5, 0.0, 0.5, 1.0),
    a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
)
BOUNDS = [(None, None)] * 3 + [(0.0, 5.0)] * 2  # exponents kept non-negative and finite
STARTS = 8  # L-BFGS runs from this many of the grid's best points


# ---------------------------------------------------------------- reading runs
def read_points(paths: list[str], exclude_budgets: list[float] | None = None) -> list[dict]:
    """Runs as dicts with params, tokens, loss (and budget, flops where known) from sweep folders or JSONL files."""
    from gptwo.fileio import read_json_lines

    for budget in exclude_budgets or []:
        _check_positive(budget, "--exclude-budget", "e.g. --exclude-budget 1e18")
    points = []
    for path in paths:
        source = os.path.join(path, "results.jsonl") if os.path.isdir(path) else path
        if not os.path.isfile(source):
            raise GptwoError(
                f"{path} is neither a sweep folder with results.jsonl nor a JSONL file",
                "pass the --out folder of 'gptwo scale run', or a JSONL file",
            )
        for number, row in read_json_lines(source, _ROW_FIX):
            points.append(_point(row, f"{source}:{number}"))
    return without_budgets(points, exclude_budgets or [])


def without_budgets(points: list[dict], budgets: list[float]) -> list[dict]:
    """The runs whose budget is none of `budgets`."""
    return [p for p in points if not any(_same(p.get("budget"), b) for b in budgets)]


_ROW_FIX = 'write one {"params": N, "tokens": D, "loss": L} per line (numbers; budget and flops optional)'


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _point(row: dict, where: str) -> dict:
    """One run's row: params, tokens and loss positive finite numbers (not strings or booleans); budget and flops,
    where given, too."""
    for key in ("params", "tokens", "loss"):
        if key not in row:
            raise GptwoError(f"{where} has no '{key}'", _ROW_FIX)
    for key in ("params", "tokens", "loss", "budget", "flops"):
        value = row.get(key)
        if key in ("budget", "flops") and value is None:
            continue
        if not _is_number(value):
            raise GptwoError(f"{where}: {key} {value!r} is a {type(value).__name__}, not a number", _ROW_FIX)
        if not (math.isfinite(value) and value > 0):
            raise GptwoError(f"{where}: {key} {value!r} is not positive and finite", "drop or fix that run")
    point = {**row, "params": float(row["params"]), "tokens": float(row["tokens"]), "loss": float(row["loss"])}
    if point.get("flops") is None:
        point["flops"] = 6.0 * point["params"] * point["tokens"]
    return point


def _check_positive(value, what: str, fix: str) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise GptwoError(f"{what} {value!r} is not a positive, finite number", fix)


def _same(x: float | None, y: float) -> bool:
    return x is not None and math.isclose(float(x), y, rel_tol=1e-6)


def parse_point(text: str) -> tuple[float, float]:
    """'N,D' → (params, tokens), both positive and finite."""
    fix = "write parameters and tokens like --predict 1e6,2e7"
    try:
        n, d = (float(v) for v in text.split(","))
    except ValueError:
        raise GptwoError(f"--predict '{text}' is not N,D", fix) from None
    if not all(math.isfinite(v) and v > 0 for v in (n, d)):
        raise GptwoError(f"--predict '{text}' needs positive, finite N and D", fix)
    return n, d


# ---------------------------------------------------------------- the fit
def _huber(residual: np.ndarray, delta: float = DELTA) -> np.ndarray:
    small = np.abs(residual) <= delta
    return np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))


def _log_model(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L̂ = LSE(a − α·log N, b − β·log D, e) for θ of shape (5,) or (G, 5), and the softmax weights of its
    three terms."""
    a, b, e, alpha, beta = (np.asarray(theta)[..., i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0 * log_n))
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    return top + np.log(total), weights / total


def _objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float = DELTA
) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log-space residuals and its gradient in (a, b, e, α, β)."""
    model, weights = _log_model(theta, log_n, log_d)
    residual = model - log_loss
    slope = np.where(np.abs(residual) <= delta, residual, delta * np.sign(residual))
    grad = np.array(
        [
            (slope * weights[0]).sum(),
            (slope * weights[1]).sum(),
            (slope * weights[2]).sum(),
            -(slope * weights[0] * log_n).sum(),
            -(slope * weights[1] * log_d).sum(),
        ]
    )
    return float(_huber(residual, delta).sum()), grad


def grid_starts(data: tuple[np.ndarray, ...], count: int = STARTS, delta: float = DELTA) -> list[np.ndarray]:
    """The `count` best points of the starting grid by the objective (scored all at once)."""
    grid = np.array([[a, b, e, alpha, beta] for alpha, beta, e, a, b in itertools.product(*GRID.values())])
    log_n, log_d, log_loss = data
    values = _huber(_log_model(grid, log_n, log_d)[0] - log_loss, delta).sum(axis=-1)
    return list(grid[np.argsort(values)[:count]])


def _minimise(
    starts: list[np.ndarray], data: tuple[np.ndarray, ...], delta: float = DELTA
) -> tuple[np.ndarray, list[tuple[float, np.ndarray]]]:
    """L-BFGS from each start; the best optimum and all (value, θ) found, best first.

    BLAS runs on one thread: L-BFGS-B's small matrix steps are 20x slower with threads waiting on busy cores.
    """
    from gptwo.errors import require

    minimize = require("scipy.optimize", "gptwo scale fit", "scale").minimize
    threadpool_limits = require("threadpoolctl", "gptwo scale fit", "scale").threadpool_limits
    found = []
    with threadpool_limits(1):
        for start in starts:
            result = minimize(
                _objective,
                start,
                args=(*data, delta),
                jac=True,
                method="L-BFGS-B",
                bounds=BOUNDS,
                options={"maxiter": 500, "gtol": 1e-10, "ftol": 1e-13},
            )
            if np.all(np.isfinite(result.x)):
                found.append((float(result.fun), result.x))
    if not found:
        raise GptwoError(
            "the fit did not converge from any start",
            "check the runs' losses (positive, finite, decreasing with N and D)",
        )
    found.sort(key=lambda item: item[0])
    return found[0][1], found


def _arrays(points: list[dict]) -> tuple[np.ndarray, ...]:
    return (
        np.log([p["params"] for p in points]),
        np.log([p["tokens"] for p in points]),
        np.log([p["loss"] for p in points]),
    )


def fit_constants(
    points: list[dict], starts: list[np.ndarray] | None = None, delta: float = DELTA, count: int = STARTS
) -> dict:
    """E, A, B, alpha, beta fitted to runs (Huber δ on log loss, L-BFGS from the grid's `count` best points or
    the given starts)."""
    data = _arrays(points)
    best, found = _minimise(starts or grid_starts(data, count, delta), data, delta)
    return {**_constants(best), "objective": found[0][0], "_theta": best, "_found": found}


def _constants(theta: np.ndarray) -> dict:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def predict(constants: dict, params: float, tokens: float) -> float:
    """L(N, D) = E + A/N^α + B/D^β."""
    return constants["E"] + constants["A"] / params ** constants["alpha"] + constants["B"] / tokens ** constants["beta"]


def compute_optimal(constants: dict, budget: float, corpus: tuple[float, float] | None = None) -> dict:
    """The N and D that minimise the fitted loss at C = 6·N·D FLOPs (Hoffmann et al. 2022, eq. 4), and that loss.

    With `corpus` = (U unique tokens, R*), D is tokens read and the loss is L(N, D′) of repeated data
    (scale/repeats.py).
    """
    alpha, beta = constants["alpha"], constants["beta"]
    if min(alpha, beta, constants["A"], constants["B"]) <= 0:
        nan = float("nan")  # no finite optimum: loss does not fall with both N and D
        return {"flops": budget, "params": nan, "tokens": nan, "tokens_per_param": nan, "loss": nan}
    if corpus is not None:
        from gptwo.scale.repeats import compute_optimal_repeated

        return compute_optimal_repeated(constants, budget, *corpus)
    g = (alpha * constants["A"] / (beta * constants["B"])) ** (1 / (alpha + beta))
    params = g * (budget / 6) ** (beta / (alpha + beta))
    tokens = (budget / 6) ** (alpha / (alpha + beta)) / g
    return {
        "flops": budget,
        "params": params,
        "tokens": tokens,
        "tokens_per_param": tokens / params,
        "loss": predict(constants, params, tokens),
    }


def optimal_exponents(constants: dict) -> dict:
    """N_opt ∝ C^a and D_opt ∝ C^b with a = β/(α+β), b = α/(α+β)."""
    total = constants["alpha"] + constants["beta"]
    if not total > 0:
        return {"a": float("nan"), "b": float("nan")}  # neither exponent: no allocation follows
    return {"a": constants["beta"] / total, "b": constants["alpha"] / total}


# ---------------------------------------------------------------- approach 2: IsoFLOP minima
def isoflop_minima(points: list[dict]) -> list[dict]:
    """Per budget with ≥ 3 runs: the minimum of a parabola in log N through its losses (Chinchilla's approach 2)."""
    minima = []
    for budget in sorted({p["budget"] for p in points if p.get("budget")}):
        group = [p for p in points if _same(p.get("budget"), budget)]
        if len(group) < 3:
            continue
        x = np.log([p["params"] for p in group])
        c2, c1, c0 = np.polyfit(x, [p["loss"] for p in group], 2)
        if c2 <= 0:
            continue  # no minimum inside: the budget's shapes do not bracket its optimum
        log_n = -c1 / (2 * c2)
        params = math.exp(log_n)
        flops = float(np.mean([p["flops"] for p in group]))
        minima.append(
            {
                "budget": budget,
                "params": params,
                "tokens": flops / (6 * params),
                "loss": float(c0 + c1 * log_n + c2 * log_n**2),
                "inside": bool(x.min() <= log_n <= x.max()),
            }
        )
    return minima


def isoflop_exponents(minima: list[dict]) -> dict | None:
    """a and b of N_opt ∝ C^a, D_opt ∝ C^b fitted (least squares in log-log) to the IsoFLOP minima inside
    their runs' N; None with fewer than 2."""
    minima = [m for m in minima if m["inside"]]
    if len(minima) < 2:
        return None
    log_c = np.log([6 * m["params"] * m["tokens"] for m in minima])
    a = float(np.polyfit(log_c, np.log([m["params"] for m in minima]), 1)[0])
    return {"a": a, "b": 1 - a}


# ---------------------------------------------------------------- the report
def fit_report(
    points: list[dict],
    queries: list[tuple[float, float]] = (),
    budgets: list[float] = (),
    bootstrap: int = 200,
    seed: int = 0,
    delta: float = DELTA,
    corpus: tuple[float, float] | None = None,
) -> dict:
    """Constants, bootstrap intervals, compute-optimal allocations, IsoFLOP minima and predictions (one JSON-able dict).

    With `corpus` = (U, R*) the points' tokens are already the effective D′, and queries and budgets count tokens read.
    """
    if len(points) < 5:
        raise GptwoError(
            f"{len(points)} runs to fit; L(N, D) has five constants",
            "train at least 5 runs (better 12 or more, over 3 budgets or more)",
        )
    if not (_is_number(delta) and math.isfinite(delta) and delta > 0):
        raise GptwoError(f"Huber delta {delta} must be positive", "use e.g. --delta 1e-3 (the papers') or 1e-2")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise GptwoError(f"--bootstrap {bootstrap!r} is not a whole number of resamples", "use e.g. --bootstrap 200")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GptwoError(f"--seed {seed!r} is not a non-negative integer", "use e.g. --seed 0")
    for budget in budgets:
        _check_positive(budget, "--budget", "give FLOPs like --budget 1e21")
    for n, d in queries:
        for value in (n, d):
            _check_positive(value, "a --predict value", "write parameters and tokens like --predict 1e6,2e7")
    distinct = {(p["params"], p["tokens"]) for p in points}
    if len(distinct) < 5:
        raise GptwoError(
            f"{len(points)} runs but only {len(distinct)} distinct (N, D); L(N, D) has five constants",
            "train runs of at least 5 different shapes or lengths (better 12 or more, over 3 budgets or more)",
        )
    fit = fit_constants(points, delta=delta)
    constants = {k: fit[k] for k in ("E", "A", "B", "alpha", "beta")}
    samples = _bootstrap(points, fit, bootstrap, seed, delta)
    minima = isoflop_minima(points)
    budgets = list(budgets) or sorted({p["budget"] for p in points if p.get("budget")})[-1:]
    report = {
        **constants,
        "objective": fit["objective"],
        "runs": len(points),
        "delta": delta,
        "formula": "L(N, D) = E + A/N^alpha + B/D^beta; C = 6*N*D",
        **optimal_exponents(constants),
        "intervals": _intervals(samples, budgets, corpus),
        "bootstrap": len(samples),
        "optimal": [compute_optimal(constants, c, corpus) for c in budgets],
        "isoflop": minima,
        "isoflop_exponents": isoflop_exponents(minima),
        "residuals": {
            "rms_log": float(np.sqrt(np.mean([math.log(_predicted(constants, p) / p["loss"]) ** 2 for p in points])))
        },
        "predictions": [_prediction(constants, samples, n, d, corpus) for n, d in queries],
    }
    report["warnings"] = fit_warnings(points, report)
    report["degenerate"] = bool(degenerate_reasons(points, report))
    if corpus is not None:
        report["repeats"] = {
            "unique_tokens": corpus[0],
            "rstar": corpus[1],
            "formula": "D' = U + U*R*(1 - exp(-R/R*)), R = D/U - 1 (Muennighoff et al. 2023)",
        }
        report["formula"] = "L(N, D') = E + A/N^alpha + B/D'^beta; C = 6*N*D, D tokens read"
    return report


# A fit is *degenerate* when the runs do not determine its constants: fewer than FEW_DISTINCT distinct N or D, an
# exponent at its bound, E, A or B at 0, infinite or beyond e^±LOG_RUNAWAY (E = 2e-33 is e^-75), or a 95% bootstrap
# interval of E, A, B or of a compute-optimal N or D that is not positive and finite or spans WIDE_DECADES orders of
# magnitude or more (A in [5.5, 1.2e21]). Apart from that, a fit is flagged when it has no finite compute-optimal N, D,
# or misses the runs by more than RMS_LOG_MISFIT rms in log loss.
LOG_RUNAWAY = 50.0
WIDE_DECADES = 1.0
FEW_DISTINCT = 3
RMS_LOG_MISFIT = 0.1


def degenerate_reasons(points: list[dict], report: dict) -> list[str]:
    """Why the runs do not determine the fit's constants, one short sentence each (empty when they do)."""
    reasons = []
    for key, name in (("params", "N"), ("tokens", "D")):
        values = {p[key] for p in points}
        if len(values) < FEW_DISTINCT:
            reasons.append(
                f"the runs hold only {len(values)} distinct {name}: the {'alpha' if name == 'N' else 'beta'} term "
                f"is not determined by them (train runs of {FEW_DISTINCT} or more {name})"
            )
    low, high = BOUNDS[3]
    for key in ("alpha", "beta"):
        if report[key] <= low + 1e-6 or report[key] >= high - 1e-6:
            reasons.append(f"{key} = {report[key]:.3g} sits at its bound [{low:g}, {high:g}]")
    for key in ("E", "A", "B"):
        if not 0 < report[key] < math.inf or abs(math.log(report[key])) > LOG_RUNAWAY:
            reasons.append(f"{key} = {report[key]:.3g} ran off to an extreme (beyond e^±{LOG_RUNAWAY:g})")
    for key, span in report["intervals"].items():
        if key in ("alpha", "beta", "a", "b") or key.startswith("loss_opt@"):
            continue  # exponents and losses: spans of their own scale, judged through the constants and optima
        lo, hi = span
        if not (math.isfinite(lo) and math.isfinite(hi) and lo > 0 and hi > 0):
            reasons.append(f"the 95% interval of {key} is [{lo:.3g}, {hi:.3g}]: not a usable estimate")
        elif math.log10(hi) - math.log10(lo) >= WIDE_DECADES:
            reasons.append(
                f"the 95% interval of {key}, [{lo:.3g}, {hi:.3g}], spans "
                f"{math.log10(hi) - math.log10(lo):.1f} orders of magnitude"
            )
    return reasons


def fit_warnings(points: list[dict], report: dict) -> list[str]:
    """Why a fit's constants or allocations cannot be trusted, one sentence each (empty when nothing is amiss): the
    degenerate_reasons first, then a missing optimum or a misfit."""
    warnings = degenerate_reasons(points, report)
    if any(not math.isfinite(o["params"]) for o in report["optimal"]):
        warnings.append("the fit has no finite compute-optimal N and D (the loss does not fall with both)")
    if report["residuals"]["rms_log"] > RMS_LOG_MISFIT:
        warnings.append(
            f"the fit misses the runs by {report['residuals']['rms_log']:.3f} rms in log loss: "
            "they may not follow L(N, D) (check the runs' losses)"
        )
    return warnings


def warning_line(report: dict) -> str | None:
    """The one line `gptwo scale fit` prints on stderr when the fit cannot be trusted (None when it can)."""
    warnings = report["warnings"]
    if not warnings:
        return None
    more = f" (and {len(warnings) - 1} more in the report)" if len(warnings) > 1 else ""
    if report["degenerate"]:
        return (
            f"warning: degenerate fit, the runs do not determine its constants: {warnings[0]}{more}; "
            "train runs at 3 or more budgets, each bracketing its optimum"
        )
    return f"warning: {warnings[0]}{more}"


def _predicted(constants: dict, point: dict) -> float:
    return predict(constants, point["params"], point["tokens"])


def _bootstrap(points: list[dict], fit: dict, rounds: int, seed: int, delta: float = DELTA) -> list[dict]:
    """Refits on runs resampled with replacement, each from the full fit's optimum and the grid's best point
    (not the whole grid: time)."""
    rng = np.random.default_rng(seed)
    starts = [fit["_theta"]]
    samples = []
    for _ in range(rounds):
        chosen = [points[i] for i in rng.integers(0, len(points), len(points))]
        data = _arrays(chosen)
        best, _ = _minimise(starts + grid_starts(data, 1, delta), data, delta)
        samples.append(_constants(best))
    return samples


def _intervals(samples: list[dict], budgets: list[float], corpus: tuple[float, float] | None = None) -> dict:
    """95% percentile intervals of the constants, the allocation exponents and the optimal N, D at each budget."""
    if not samples:
        return {}
    series = {k: [s[k] for s in samples] for k in ("E", "A", "B", "alpha", "beta")}
    series.update({k: [optimal_exponents(s)[k] for s in samples] for k in ("a", "b")})
    for c in budgets:
        optima = [compute_optimal(s, c, corpus) for s in samples]
        for key in ("params", "tokens", "loss"):
            series[f"{key}_opt@{c:g}"] = [o[key] for o in optima]
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in series.items()}


def _prediction(
    constants: dict, samples: list[dict], params: float, tokens: float, corpus: tuple[float, float] | None = None
) -> dict:
    fitted = tokens
    if corpus is not None:
        from gptwo.scale.repeats import effective_tokens

        fitted = effective_tokens(tokens, *corpus)
    out = {"params": params, "tokens": tokens, "loss": predict(constants, params, fitted), "flops": 6 * params * tokens}
    if corpus is not None:
        out["effective_tokens"] = fitted
    if samples:
        values = [predict(s, params, fitted) for s in samples]
        out["interval"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return out


def format_report(report: dict) -> str:
    """The report as a few readable lines."""
    iv = report["intervals"]

    def show(key: str, fmt: str) -> str:
        span = f" [{format(iv[key][0], fmt)}, {format(iv[key][1], fmt)}]" if key in iv else ""
        return f"{key} = {format(report[key], fmt)}{span}"

    lines = [
        f"L(N, D) = E + A/N^alpha + B/D^beta fitted to {report['runs']} runs "
        f"(Huber delta={report['delta']} on log loss; "
        f"95% bootstrap intervals over {report['bootstrap']} resamples; "
        f"rms log residual {report['residuals']['rms_log']:.4f})",
        "  " + ", ".join(show(k, ".4g") for k in ("E", "A", "B", "alpha", "beta")),
        f"  compute-optimal: N_opt ~ C^{report['a']:.3f}, D_opt ~ C^{report['b']:.3f}"
        + (" (without repeats; with them the optimum is found numerically below)" if "repeats" in report else ""),
    ]
    if "repeats" in report:
        lines.insert(
            1,
            "  D is effective data D' = U + U*R*(1 - exp(-R/R*)), "
            f"U = {report['repeats']['unique_tokens']:.0f} unique tokens, "
            f"R* = {report['repeats']['rstar']:g} (Muennighoff et al. 2023); D below counts tokens read",
        )
    for o in report["optimal"]:
        n_span, d_span = (iv.get(f"{k}_opt@{o['flops']:g}") for k in ("params", "tokens"))
        lines.append(
            f"  at C={o['flops']:.3g}: N_opt={o['params']:.3g}"
            + (f" [{n_span[0]:.3g}, {n_span[1]:.3g}]" if n_span else "")
            + f", D_opt={o['tokens']:.3g}"
            + (f" [{d_span[0]:.3g}, {d_span[1]:.3g}]" if d_span else "")
            + f" ({o['tokens_per_param']:.1f} tokens/param), loss {o['loss']:.4f}"
        )
    if "best" in report:
        best = report["best"]
        span = f" [{best['interval'][0]:.4f}, {best['interval'][1]:.4f}]" if best.get("interval") else ""
        lines.append(
            f"  predicted best run at C={best['budget']:.3g}: loss {best['loss']:.4f}{span} "
            f"({best['method'].split('best=')[-1]}); "
            f"lowest predicted shape {', '.join(best['best_shape'])}"
        )
    lines += [
        f"  IsoFLOP minimum at C={m['budget']:.3g}: N={m['params']:.3g}, D={m['tokens']:.3g}, loss {m['loss']:.4f}"
        if m["inside"]
        else f"  IsoFLOP minimum at C={m['budget']:.3g}: outside the runs' N (their shapes do not bracket it; not used)"
        for m in report["isoflop"]
    ]
    if report["isoflop_exponents"]:
        lines.append(f"  IsoFLOP minima: N_opt ~ C^{report['isoflop_exponents']['a']:.3f}")
    for p in report["predictions"]:
        span = f" [{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]" if "interval" in p else ""
        lines.append(f"  predicted loss at N={p['params']:.3g}, D={p['tokens']:.3g}: {p['loss']:.4f}{span}")
    if report.get("warnings"):
        lines.append(
            "  DEGENERATE FIT: the runs do not determine its constants; read none of the numbers above as estimates"
            if report.get("degenerate")
            else "  the fit cannot be trusted:"
        )
        lines += [f"  warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
