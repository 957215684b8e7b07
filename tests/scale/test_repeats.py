"""Repeated data in the fit: Muennighoff et al.'s (2023) effective data D' and the --repeats option."""

import json
import math

import numpy as np
import pytest
from scale_fixtures import HOFFMANN, cli, synthetic_runs

from gptwo.errors import GptwoError
from gptwo.scale.fit import compute_optimal, fit_constants, fit_report, predict
from gptwo.scale.method import Method, backtest, prepare
from gptwo.scale.repeats import (
    RSTAR_D,
    Repeats,
    compute_optimal_repeated,
    effective_tokens,
    parse_repeats,
    with_effective_tokens,
)


def test_effective_tokens_match_a_hand_computation_of_muennighoff_eq_5():
    # U = 1e6, D = 5e6: R = 4 repetitions; 4/15.4 = 0.259740,
    # exp(-0.259740) = 0.778801 * 0.990307 = 0.771252, 15.4 * 0.228748 = 3.52272
    assert effective_tokens(5e6, 1e6, 15.4) == pytest.approx(4.52272e6, rel=1e-5)
    assert effective_tokens(3e5, 1e6) == 3e5  # fewer tokens read than the corpus holds: no repetition
    assert effective_tokens(1e6, 1e6) == 1e6
    assert effective_tokens(1e12, 1e6, 15.4) == pytest.approx(1e6 * 16.4, rel=1e-9)  # the ceiling U * (1 + R*)
    assert effective_tokens(1.01e6, 1e6) == pytest.approx(
        1.01e6, rel=1e-5
    )  # a first repetition is worth almost a fresh token
    assert RSTAR_D == 15.4


def test_an_unbounded_corpus_gives_the_plain_fit():
    runs = synthetic_runs(HOFFMANN, noise=0.003)
    endless = Method(delta=3e-3, repeats=Repeats(RSTAR_D, 1e30))
    plain = Method(delta=3e-3)
    assert [p["tokens"] for p in prepare(runs, endless)] == pytest.approx(
        [p["tokens"] for p in prepare(runs, plain)], rel=1e-12
    )
    a, b = fit_constants(prepare(runs, endless), delta=3e-3), fit_constants(prepare(runs, plain), delta=3e-3)
    for key in ("E", "A", "B", "alpha", "beta"):
        assert a[key] == pytest.approx(b[key], rel=1e-6)
    assert compute_optimal(HOFFMANN, 1e21, (1e30, RSTAR_D))["params"] == pytest.approx(
        compute_optimal(HOFFMANN, 1e21)["params"], rel=1e-4
    )
    rows_endless, rows_plain = backtest(runs, endless), backtest(runs, plain)
    assert [r["predicted"] for r in rows_endless] == pytest.approx([r["predicted"] for r in rows_plain], rel=1e-6)


def repeated_runs(unique: float, rstar: float, noise: float = 0.002) -> list[dict]:
    """Synthetic IsoFLOP sweeps whose losses follow L(N, D') with a corpus of `unique` tokens
    (the top budgets read it many times)."""
    runs = synthetic_runs(HOFFMANN, noise=0.0)
    rng = np.random.default_rng(1)
    return [
        {
            **r,
            "unique_tokens": unique,
            "loss": predict(HOFFMANN, r["params"], effective_tokens(r["tokens"], unique, rstar))
            * math.exp(rng.normal(0, noise)),
        }
        for r in runs
    ]


def test_on_repeated_data_the_repeat_aware_fit_predicts_better_and_prefers_the_true_rstar():
    runs = repeated_runs(unique=3e8, rstar=RSTAR_D)  # the top budgets read the corpus up to ~500 times
    aware, plain = (
        backtest(runs, Method(delta=3e-3, best="optimum", repeats=Repeats())),
        backtest(runs, Method(delta=3e-3, best="optimum")),
    )
    worst_aware, worst_plain = max(abs(r["error"]) for r in aware), max(abs(r["error"]) for r in plain)
    assert worst_aware < 0.005 and worst_aware < worst_plain / 2, (aware, plain)
    objective = {
        rstar: fit_constants(prepare(runs, Method(delta=3e-3, repeats=Repeats(rstar))), delta=3e-3)["objective"]
        for rstar in (2.0, 5.0, 15.4, 50.0, 200.0)
    }
    assert min(objective, key=objective.get) == 15.4, objective


def test_the_repeated_optimum_is_the_minimum_along_the_isoflop_line():
    unique, budget = 3e9, 1e21
    optimum = compute_optimal_repeated(HOFFMANN, budget, unique, RSTAR_D)
    assert optimum["params"] * optimum["tokens"] * 6 == pytest.approx(budget)
    for factor in (0.8, 0.95, 1.05, 1.25):
        n = optimum["params"] * factor
        assert predict(HOFFMANN, n, effective_tokens(budget / (6 * n), unique, RSTAR_D)) > optimum["loss"]
    assert (
        optimum["params"] > compute_optimal(HOFFMANN, budget)["params"]
    )  # scarce data: spend the compute on a larger model


def test_fit_report_predicts_tokens_read_through_the_effective_data():
    runs = repeated_runs(unique=3e9, rstar=RSTAR_D)
    report = fit_report(
        with_effective_tokens(runs, Repeats()),
        queries=[(1e9, 3e10)],
        budgets=[1e21],
        bootstrap=3,
        corpus=(3e9, RSTAR_D),
    )
    constants = {k: report[k] for k in ("E", "A", "B", "alpha", "beta")}
    (p,) = report["predictions"]
    assert p["tokens"] == 3e10 and p["effective_tokens"] == effective_tokens(3e10, 3e9)
    assert p["loss"] == predict(constants, 1e9, effective_tokens(3e10, 3e9))
    assert report["optimal"][0]["loss"] == compute_optimal_repeated(constants, 1e21, 3e9, RSTAR_D)["loss"]
    assert report["repeats"]["rstar"] == RSTAR_D and report["repeats"]["unique_tokens"] == 3e9


def test_parse_repeats_and_missing_unique_tokens_are_one_line_errors(tmp_path):
    assert parse_repeats("none") is None and parse_repeats("muennighoff") == Repeats(15.4, None)
    assert parse_repeats("muennighoff:5", 1e6) == Repeats(5.0, 1e6)
    for bad in ("muenighoff", "muennighoff:x", "muennighoff:-1", "muennighoff:0"):
        with pytest.raises(GptwoError):
            parse_repeats(bad)
    with pytest.raises(GptwoError):
        parse_repeats("none", 1e6)
    with pytest.raises(GptwoError):
        prepare(synthetic_runs(HOFFMANN), Method(repeats=Repeats()))  # the runs record no unique_tokens

    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in synthetic_runs(HOFFMANN)))
    result = cli("scale", "fit", str(runs), "--repeats", "muennighoff")
    assert (
        result.returncode == 2
        and result.stderr.startswith("error: ")
        and "--unique-tokens" in result.stderr
        and "Traceback" not in result.stderr
    )
    result = cli("scale", "backtest", str(runs), "--repeats", "muennighoff:0", "--unique-tokens", "1e9")
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    result = cli(
        "scale",
        "fit",
        str(runs),
        "--repeats",
        "muennighoff:15.4",
        "--unique-tokens",
        "3e9",
        "--bootstrap",
        "0",
        "--predict",
        "1e9,3e10",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["repeats"] == {**report["repeats"], "unique_tokens": 3e9, "rstar": 15.4}
    assert report["predictions"][0]["effective_tokens"] == effective_tokens(3e10, 3e9)
