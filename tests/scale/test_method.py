"""Fit-method choices (parameter count, seed-averaging, runs near the minimum, Huber delta, best-run rule)
and the backtest."""

import json
import math

import pytest
from scale_fixtures import HOFFMANN, cli, synthetic_runs

from gptwo.errors import GptwoError
from gptwo.scale.fit import compute_optimal, fit_report, predict
from gptwo.scale.method import Method, average_seeds, backtest, near_minimum, predicted_best, prepare, with_count
from gptwo.scale.plan import make_plan, write_plan


def counted_runs() -> list[dict]:
    """Synthetic runs that state their parameters three ways, as a sweep's records do."""
    return [
        {**r, "params_total": r["params"] * 1.1, "params_non_embedding": r["params"] * 0.5}
        for r in synthetic_runs(HOFFMANN)
    ]


def test_count_takes_n_from_the_chosen_field_and_refuses_unknown_or_missing_ones():
    runs = counted_runs()
    assert [p["params"] for p in with_count(runs, "non_embedding")] == [r["params"] * 0.5 for r in runs]
    assert [p["params"] for p in with_count(runs, "total")] == [r["params"] * 1.1 for r in runs]
    assert with_count(runs, "params") == runs
    with pytest.raises(GptwoError):
        with_count(runs, "embedding")
    with pytest.raises(GptwoError):
        with_count([{"params": 1.0, "tokens": 1.0, "loss": 1.0}], "total")


def test_seeds_average_to_one_point_per_shape_with_the_geometric_mean():
    runs = [
        {"budget": 1e12, "params": 1e5, "tokens": 2e6, "loss": 4.0, "name": "a"},
        {"budget": 1e12, "params": 1e5, "tokens": 2e6, "loss": 4.2, "name": "a-s1"},
        {"budget": 1e12, "params": 2e5, "tokens": 1e6, "loss": 4.5, "name": "b"},
    ]
    averaged = sorted(average_seeds(runs), key=lambda p: p["params"])
    assert len(averaged) == 2
    assert math.isclose(averaged[0]["loss"], math.sqrt(4.0 * 4.2)) and averaged[0]["seeds"] == 2
    assert averaged[1]["loss"] == 4.5 and averaged[1]["seeds"] == 1


def test_near_minimum_keeps_each_budgets_lowest_runs():
    runs = synthetic_runs(HOFFMANN)
    kept = near_minimum(runs, 3)
    assert len(kept) == 15
    for budget in {r["budget"] for r in runs}:
        losses = sorted(r["loss"] for r in runs if r["budget"] == budget)
        assert sorted(p["loss"] for p in kept if p["budget"] == budget) == losses[:3]
    assert near_minimum(runs, 0) == runs


def test_predicted_best_over_shapes_is_their_lowest_and_the_optimum_is_lower_still():
    shapes = [(1e8, 1e18 / 6e8), (4e8, 1e18 / 24e8), (1.6e9, 1e18 / 96e8)]
    over_shapes = predicted_best(HOFFMANN, 1e18, shapes, "shapes")
    assert over_shapes["loss"] == min(predict(HOFFMANN, n, d) for n, d in shapes)
    optimum = predicted_best(HOFFMANN, 1e18, shapes, "optimum")
    assert optimum["loss"] == compute_optimal(HOFFMANN, 1e18)["loss"] <= over_shapes["loss"]
    with pytest.raises(GptwoError):
        predicted_best(HOFFMANN, 1e18, shapes, "median")


@pytest.mark.parametrize(
    "method",
    [Method(), Method(best="shapes", delta=1e-2), Method(near_min=5, average_seeds=True)],
    ids=["default", "shapes", "near-min"],
)
def test_backtest_on_losses_from_known_constants_predicts_each_budget_closely(method):
    rows = backtest(synthetic_runs(HOFFMANN, noise=0.002), method)
    assert [r["budget"] for r in rows] == [1e19, 3e19, 1e20]
    assert [r["fitted_runs"] for r in rows] == [
        14 if not method.near_min else 10,
        21 if not method.near_min else 15,
        28 if not method.near_min else 20,
    ]
    for row in rows:
        assert abs(row["error"]) < 0.01, row
        assert math.isclose(row["error"], row["predicted"] / row["measured"] - 1)


def test_a_wider_huber_delta_still_recovers_the_constants_and_is_reported():
    report = fit_report(synthetic_runs(HOFFMANN), bootstrap=0, delta=1e-2)
    assert report["delta"] == 1e-2
    assert abs(report["alpha"] - HOFFMANN["alpha"]) < 0.03 and abs(report["beta"] - HOFFMANN["beta"]) < 0.03
    with pytest.raises(GptwoError):
        fit_report(synthetic_runs(HOFFMANN), bootstrap=0, delta=0.0)
    with pytest.raises(GptwoError):
        backtest(synthetic_runs(HOFFMANN), Method(delta=-1e-3))


def test_prepare_applies_count_then_seed_mean_then_near_minimum():
    runs = counted_runs()
    twice = runs + [{**r, "loss": r["loss"] * 1.02} for r in runs]
    points = prepare(twice, Method(count="total", average_seeds=True, near_min=2))
    assert len(points) == 10 and all(p["seeds"] == 2 for p in points)
    assert all(any(math.isclose(p["params"], r["params"] * 1.1) for r in runs) for p in points)


def test_backtest_and_best_of_plan_commands(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in counted_runs()))
    result = cli("scale", "backtest", str(runs), "--json", "--count", "total", "--delta", "0.01")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "N=total" in report["method"] and len(report["rows"]) == 3

    plan = make_plan([3e20], vocab_size=50257, shapes=[(12, 12, 768), (24, 16, 1024), (36, 20, 1280)], per_budget=3)
    write_plan(plan, str(tmp_path / "plan.json"))
    result = cli(
        "scale",
        "fit",
        str(runs),
        "--json",
        "--bootstrap",
        "5",
        "--best-of",
        str(tmp_path / "plan.json"),
        "--best",
        "shapes",
    )
    assert result.returncode == 0, result.stderr
    best = json.loads(result.stdout)["best"]
    assert best["budget"] == 3e20 and len(best["shapes"]) == 3
    assert best["loss"] == min(s["loss"] for s in best["shapes"])
    assert (
        best["interval"] == min(best["shapes"], key=lambda s: s["loss"])["interval"]
        and best["interval"][0] < best["interval"][1]
    )
    assert best["best_shape"][0].startswith("C3e20-")

    result = cli("scale", "backtest", str(runs), "--first", "5")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
