"""The L(N, D) fit: known constants come back from noisy losses; the optimum and predictions follow the formula."""

import json
import math

import numpy as np
import pytest
from scale_fixtures import HOFFMANN, cli, synthetic_runs

from gptwo.cli import main
from gptwo.scale.fit import compute_optimal, fit_report, predict, read_points


@pytest.mark.parametrize(
    "constants", [HOFFMANN, dict(E=1.82, A=482.0, B=2085.0, alpha=0.35, beta=0.37)], ids=["hoffmann", "besiroglu"]
)
def test_fit_recovers_known_constants_from_noisy_losses(constants):
    report = fit_report(synthetic_runs(constants), bootstrap=0)
    assert abs(report["alpha"] - constants["alpha"]) < 0.03
    assert abs(report["beta"] - constants["beta"]) < 0.03
    assert abs(report["E"] - constants["E"]) < 0.05
    assert report["residuals"]["rms_log"] < 0.01


def test_compute_optimal_allocation_is_the_minimum_along_the_isoflop_line():
    budget = 1e21
    optimum = compute_optimal(HOFFMANN, budget)
    ns = np.geomspace(optimum["params"] / 10, optimum["params"] * 10, 20001)
    losses = [predict(HOFFMANN, n, budget / (6 * n)) for n in ns]
    brute = ns[int(np.argmin(losses))]
    assert abs(math.log(optimum["params"] / brute)) < 1e-3
    assert math.isclose(6 * optimum["params"] * optimum["tokens"], budget, rel_tol=1e-9)
    assert math.isclose(optimum["loss"], min(losses), rel_tol=1e-6)


def test_bootstrap_intervals_cover_the_true_exponents():
    report = fit_report(synthetic_runs(HOFFMANN, seed=1), bootstrap=12, seed=0)
    for key in ("alpha", "beta"):
        low, high = report["intervals"][key]
        assert low <= report[key] <= high and high - low < 0.1
    assert report["bootstrap"] == 12


def test_fit_command_reads_jsonl_and_prints_one_json_object_with_predictions(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(
        "".join(json.dumps({k: r[k] for k in ("params", "tokens", "loss")}) + "\n" for r in synthetic_runs(HOFFMANN))
    )
    result = cli(
        "scale",
        "fit",
        str(path),
        "--json",
        "--bootstrap",
        "0",
        "--predict",
        "1e9,2e10",
        "--predict",
        "7e10,1.4e12",
        "--plot",
        str(tmp_path / "fit.png"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert all(k in report for k in ("E", "A", "B", "alpha", "beta"))
    assert [(p["params"], p["tokens"]) for p in report["predictions"]] == [(1e9, 2e10), (7e10, 1.4e12)]
    for p in report["predictions"]:
        assert math.isclose(p["loss"], predict(report, p["params"], p["tokens"]), rel_tol=1e-12)
        assert (
            abs(p["loss"] / predict(HOFFMANN, p["params"], p["tokens"]) - 1) < 0.02
        )  # the fit extrapolates well on clean data
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_of_a_sweep_can_leave_a_budget_out_to_predict_it(tmp_path):
    runs = synthetic_runs(HOFFMANN)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    kept = read_points([str(tmp_path)], exclude_budgets=[1e20])
    assert len(kept) == len(runs) - 7 and all(p["budget"] != 1e20 for p in kept)


def test_bad_runs_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"params": 1e6, "tokens": 2e7}\n')
    result = cli("scale", "fit", str(path))
    assert (
        result.returncode == 2
        and result.stderr.startswith("error: ")
        and "runs.jsonl:1" in result.stderr
        and len(result.stderr.splitlines()) == 1
    )
    result = cli("scale", "fit", str(tmp_path / "missing"))
    assert result.returncode == 2 and "neither a sweep folder" in result.stderr


def test_fit_without_scipy_names_the_extra(tmp_path, capsys, monkeypatch):
    path = tmp_path / "runs.jsonl"
    path.write_text(
        "".join(json.dumps({k: r[k] for k in ("params", "tokens", "loss")}) + "\n" for r in synthetic_runs(HOFFMANN))
    )
    monkeypatch.setitem(__import__("sys").modules, "scipy.optimize", None)  # as if scipy were not installed
    assert main(["scale", "fit", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gptwo scale fit needs scipy" in err[0] and "pip install 'gptwo[scale]'" in err[0]


def test_an_isoflop_minimum_outside_the_runs_is_reported_without_its_extrapolated_numbers():
    from gptwo.scale.fit import format_report, isoflop_minima

    # losses that still fall at the largest N: the parabola's vertex lies far beyond the runs
    runs = [
        {"budget": 1e12, "flops": 1e12, "params": n, "tokens": 1e12 / (6 * n), "loss": loss}
        for n, loss in [(1e4, 5.0), (2e4, 4.6), (4e4, 4.3)]
    ]
    (minimum,) = isoflop_minima(runs)
    assert not minimum["inside"]
    report = fit_report(runs + synthetic_runs(HOFFMANN)[:14], bootstrap=0)
    line = next(x for x in format_report(report).splitlines() if "C=1e+12" in x and "IsoFLOP minimum" in x)
    assert "outside the runs' N" in line and "loss" not in line
