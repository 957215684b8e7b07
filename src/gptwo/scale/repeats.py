"""Repeated data in L(N, D): Muennighoff et al.'s (2023) effective data, so a run that reads its corpus many
times is not fitted as fresh tokens.

Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models", arXiv:2305.16264, eq. 5): with U unique
training tokens read for D tokens in all, the repetitions beyond the first pass are R = D/U − 1 and the data
are worth D′ = U + U·R*·(1 − exp(−R/R*)) fresh tokens; R* is how many repetitions it takes for their value to
decay by 1/e. Their fitted R*_D is 15.4 (the default). D ≤ U is no repetition: D′ = D. The fit then models
L(N, D′) = E + A/N^α + B/D′^β; C = 6·N·D still counts every token read, so the compute-optimal N at a budget is
found numerically along C = 6·N·D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gptwo.errors import GptwoError

RSTAR_D = 15.4  # Muennighoff et al. 2023, the fitted R*_D of their eq. 5


@dataclass(frozen=True)
class Repeats:
    """How repeated tokens count: R* (decay of a repetition's value) and the unique tokens U
    (None: each run's recorded `unique_tokens`)."""

    rstar: float = RSTAR_D
    unique_tokens: float | None = None


def effective_tokens(tokens: float, unique: float, rstar: float = RSTAR_D) -> float:
    """D′ = U_D + U_D·R*·(1 − exp(−R/R*)) with U_D = min(U, D), R = D/U_D − 1 (Muennighoff et al. 2023, eq. 5)."""
    seen = min(float(unique), float(tokens))
    repeats = tokens / seen - 1.0
    return seen + seen * rstar * -math.expm1(-repeats / rstar)


def parse_repeats(text: str | None, unique_tokens: float | None = None) -> Repeats | None:
    """'none' → None; 'muennighoff' or 'muennighoff:RSTAR' → Repeats (R* = 15.4 unless given)."""
    if text in (None, "", "none"):
        if unique_tokens is not None:
            raise GptwoError(
                "--unique-tokens is only used with --repeats", "add --repeats muennighoff (or drop --unique-tokens)"
            )
        return None
    name, _, value = text.partition(":")
    try:
        rstar = float(value) if value else RSTAR_D
    except ValueError:
        rstar = float("nan")
    if name != "muennighoff" or not (math.isfinite(rstar) and rstar > 0):
        raise GptwoError(
            f"--repeats '{text}' is not none, muennighoff or muennighoff:RSTAR with a positive R*",
            "use e.g. --repeats muennighoff (R* = 15.4, Muennighoff et al. 2023) or --repeats muennighoff:5",
        )
    if unique_tokens is not None and not (math.isfinite(unique_tokens) and unique_tokens > 0):
        raise GptwoError(
            f"--unique-tokens {unique_tokens:g} is not a positive number",
            "give the training split's token count (the data folder's meta.json train_tokens)",
        )
    return Repeats(rstar, unique_tokens)


def unique_of(point: dict, repeats: Repeats) -> float:
    """A run's unique training tokens: --unique-tokens if given, else the run's recorded `unique_tokens`."""
    unique = repeats.unique_tokens or point.get("unique_tokens")
    if not unique:
        raise GptwoError(
            f"run {point.get('name', point)} records no unique_tokens, which --repeats needs",
            "pass --unique-tokens U (the training split's tokens, meta.json train_tokens of its data folder)",
        )
    return float(unique)


def with_effective_tokens(points: list[dict], repeats: Repeats | None) -> list[dict]:
    """The runs with `tokens` replaced by the effective D′ (the tokens read kept as `tokens_read`);
    unchanged without repeats."""
    if repeats is None:
        return list(points)
    return [
        {
            **p,
            "tokens_read": p["tokens"],
            "unique_tokens": unique_of(p, repeats),
            "tokens": effective_tokens(p["tokens"], unique_of(p, repeats), repeats.rstar),
        }
        for p in points
    ]


def predict_read(constants: dict, params: float, tokens: float, unique: float, rstar: float) -> float:
    """The fitted loss of N parameters reading D tokens of a U-token corpus: L(N, D′)."""
    d = effective_tokens(tokens, unique, rstar)
    return constants["E"] + constants["A"] / params ** constants["alpha"] + constants["B"] / d ** constants["beta"]


def compute_optimal_repeated(constants: dict, budget: float, unique: float, rstar: float) -> dict:
    """The N, D (tokens read, C = 6·N·D) that minimise L(N, D′) at a budget: a grid over log N refined by
    bounded Brent."""
    from scipy.optimize import minimize_scalar

    def loss(log_n: float) -> float:
        n = math.exp(log_n)
        return predict_read(constants, n, budget / (6 * n), unique, rstar)

    grid = np.linspace(0.0, math.log(budget / 6), 801)  # N from 1 to C/6 (D ≥ 1)
    values = [loss(x) for x in grid]
    i = int(np.nanargmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    log_n = float(minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6}).x)
    params = math.exp(log_n)
    tokens = budget / (6 * params)
    return {
        "flops": budget,
        "params": params,
        "tokens": tokens,
        "tokens_per_param": tokens / params,
        "loss": loss(log_n),
        "effective_tokens": effective_tokens(tokens, unique, rstar),
        "epochs": tokens / unique,
    }
