"""Bad input to `gptwo scale plan|run|fit|backtest`, as a careless or hostile user would give it: each row is
its argv (and files) and the one-line error (exit 2) it must give, or the result and warning that are right.
Nothing that was there before is changed. Rows run in process through `gptwo.cli.main`."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from cli_testing import assert_one_line_error, run
from scale_fixtures import HOFFMANN, TINY_SHAPES, TINY_TRAIN, synthetic_runs, tiny_data

from gptwo.scale.plan import make_plan

# ---------------------------------------------------------------- scale plan
PLAN = ["scale", "plan", "--vocab-size", "300"]
PLAN_ROWS = [
    (["--budgets", "nan"], "--budgets nan is not a positive, finite FLOP count"),
    (["--budgets", "inf"], "--budgets inf is not a positive, finite FLOP count"),
    (["--budgets", "1e12,-3"], "is not a positive, finite FLOP count"),
    (["--budgets", ",".join(["1e12"] * 101)], "more than 100"),
    (["--budgets", "1e12", "--tokens-per-param", "0"], "argument --tokens-per-param: 0 is not a finite number"),
    (["--budgets", "1e12", "--tokens-per-param", "-5"], "argument --tokens-per-param"),
    (["--budgets", "1e12", "--tokens-per-param", "nan"], "argument --tokens-per-param: nan"),
    (["--budgets", "1e12", "--per-budget", "0"], "argument --per-budget: 0 is less than 1"),
    (["--budgets", "1e12", "--shapes", "200000x1x16"], "beyond this planner's range (n_layer at most 1024"),
    (["--budgets", "1e12", "--shapes", "2x2x10000000"], "n_embd at most 65,536"),
    (["--budgets", "1e12", "--shapes", ",".join(["1x1x16"] * 101)], "more than 100 shapes"),
    (["--budgets", "1e12", "--shapes", "2x3x64"], "n_embd a multiple of n_head"),
]


@pytest.mark.parametrize("argv, expected", PLAN_ROWS, ids=[" ".join(a)[:40] for a, _ in PLAN_ROWS])
def test_scale_plan_bad_options_are_one_line_errors(argv, expected, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, _, err = run(PLAN + argv + ["--out", str(out)], capsys)
    assert_one_line_error(code, err, expected)
    assert not out.exists()


def test_scale_plan_vocab_size_zero_is_an_error_not_a_folder_lookup(tmp_path, capsys):
    code, _, err = run(
        ["scale", "plan", "--budgets", "1e12", "--vocab-size", "0", "--out", str(tmp_path / "p")], capsys
    )
    assert_one_line_error(code, err, "argument --vocab-size: 0 is less than 1")


def test_scale_plan_keeps_a_file_that_is_not_a_plan_and_replaces_its_own(tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text("my notes\n")
    code, _, err = run(PLAN + ["--budgets", "1e12", "--out", str(notes)], capsys)
    assert_one_line_error(code, err, "exists and is not a plan file")
    assert notes.read_text() == "my notes\n"
    plan = tmp_path / "plan.json"
    assert run(PLAN + ["--budgets", "1e12", "--out", str(plan)], capsys)[0] == 0
    assert run(PLAN + ["--budgets", "3e12", "--out", str(plan)], capsys)[0] == 0  # a plan is replaced
    assert json.loads(plan.read_text())["runs"][0]["budget"] == 3e12


def test_scale_plan_deep_shapes_are_counted_exactly_without_building_every_block():
    from gptwo.scale.plan import _counted, count_params

    for shape in [(3, 2, 48), (7, 4, 64)]:
        assert count_params(*shape, 300, 64) == _counted(*shape, 300, 64)
    deep = count_params(1024, 1, 16, 300, 64)  # was a hang at 200,000 (13 ms a block on the meta device)
    assert deep.params == _counted(1, 1, 16, 300, 64).params + 1023 * (
        _counted(2, 1, 16, 300, 64).params - _counted(1, 1, 16, 300, 64).params
    )


# ---------------------------------------------------------------- scale run: plan files
def _plan(tmp_path, change=None, name="plan.json") -> str:
    plan = make_plan([3e9], 300, TINY_SHAPES, per_budget=3, train=TINY_TRAIN)
    for entry in plan["runs"]:
        entry["max_steps"] = 2
    plan = json.loads(json.dumps(plan))
    if change:
        change(plan)
    path = str(tmp_path / name)
    with open(path, "w") as f:
        json.dump(plan, f)
    return path


def _set(key, value, where="run"):
    def change(plan):
        (plan["runs"][0] if where == "run" else plan)[key] = value

    return change


RUN_ROWS = [
    ("runs-strings", _set("runs", ["a", "b"], "plan"), "run 1 of {plan} is a JSON str, not an object"),
    ("runs-numbers", _set("runs", [1, 2], "plan"), "run 1 of {plan} is a JSON int, not an object"),
    ("runs-empty", _set("runs", [], "plan"), "has no runs"),
    ("train-list", _set("train", [1, 2], "plan"), "'train' is a list, not an object of settings"),
    ("name-dotdot", _set("name", "../../x"), "run name '../../x', which is not a plain folder name"),
    ("name-absolute", _set("name", "/tmp/elsewhere"), "which is not a plain folder name"),
    ("name-empty", _set("name", ""), "run name '', which is not a plain folder name"),
    ("name-dot", _set("name", ".."), "which is not a plain folder name"),
    ("name-number", _set("name", 7), "run name 7, which is not a plain folder name"),
    ("deep", _set("n_layer", 200000), "beyond this planner's range"),
    ("layers-string", _set("n_layer", "4"), "is not three integers"),
    ("steps-bool", _set("max_steps", True), "max_steps True is not a positive integer"),
    ("steps-zero", _set("max_steps", 0), "max_steps 0 is not a positive integer"),
    ("budget-string", _set("budget", "big"), "budget 'big' is not a positive number"),
    ("budget-nan", _set("budget", float("nan")), "budget nan is not a positive number"),
    ("vocab-string", _set("vocab_size", "300", "plan"), "vocab_size '300' is not a positive integer"),
]


@pytest.mark.parametrize("change, expected", [r[1:] for r in RUN_ROWS], ids=[r[0] for r in RUN_ROWS])
def test_scale_run_refuses_malformed_plans_before_any_work(change, expected, tmp_path, capsys):
    plan = _plan(tmp_path, change)
    sweep = tmp_path / "sweep"
    code, _, err = run(["scale", "run", plan, "--data", str(tmp_path / "no-data"), "--out", str(sweep)], capsys)
    assert_one_line_error(code, err, expected.format(plan=plan))
    assert not sweep.exists() and not (tmp_path / "elsewhere").exists()


def test_scale_run_plan_that_is_a_list_or_broken_json(tmp_path, capsys):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    broken = tmp_path / "broken.json"
    broken.write_text('{"runs": [')
    for path, expected in ((listed, "holds a JSON list, not a plan object"), (broken, "is not valid JSON")):
        code, _, err = run(["scale", "run", str(path), "--data", "x", "--out", str(tmp_path / "s")], capsys)
        assert_one_line_error(code, err, expected)


def test_scale_run_options_are_checked_where_declared(tmp_path, capsys):
    for option, value in (("--parallel", "0"), ("--threads", "-3")):
        code, _, err = run(["scale", "run", "p.json", "--data", "d", "--out", "s", option, value], capsys)
        assert_one_line_error(code, err, f"argument {option}")


def test_scale_run_never_trains_into_a_folder_of_other_files(tmp_path, capsys):
    """A run folder holding the user's files, a sweep folder whose results.jsonl is not a sweep's, a run folder
    linked outside the sweep: each refused before training, with every file left as it was."""
    plan = _plan(tmp_path)
    name = json.loads(open(plan).read())["runs"][0]["name"]
    data = tiny_data()

    users = tmp_path / "users"
    (users / "runs" / name).mkdir(parents=True)
    (users / "runs" / name / "notes.txt").write_text("mine")
    code, _, err = run(["scale", "run", plan, "--data", data, "--out", str(users)], capsys)
    assert_one_line_error(code, err, "holds files that 'gptwo scale run' did not start there")
    assert os.listdir(users / "runs" / name) == ["notes.txt"] and not (users / "results.jsonl").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "results.jsonl").write_text('{"my": "table"}\n')
    code, _, err = run(["scale", "run", plan, "--data", data, "--out", str(other)], capsys)
    assert_one_line_error(code, err, "is not a sweep result")
    assert (other / "results.jsonl").read_text() == '{"my": "table"}\n' and not (other / "runs").exists()

    linked = tmp_path / "linked"
    (linked / "runs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, linked / "runs" / name)
    code, _, err = run(["scale", "run", plan, "--data", data, "--out", str(linked)], capsys)
    assert_one_line_error(code, err, "outside the sweep folder")
    assert os.listdir(outside) == []


def test_scale_run_resumes_its_own_started_run_but_not_one_of_another_shape(tmp_path, capsys):
    """A run folder this sweep started (its marker, as a kill leaves it) is resumed and finished; one started
    for another shape is refused with the field that changed."""
    from gptwo.scale.run import STARTED

    plan = _plan(tmp_path)
    entries = json.loads(open(plan).read())["runs"]
    sweep = tmp_path / "sweep"
    first = sweep / "runs" / entries[0]["name"]
    first.mkdir(parents=True)

    def marker(entry: dict, **changes) -> str:
        steps = entry["max_steps"]
        tokens = steps * TINY_TRAIN["batch_size"] * TINY_TRAIN["block_size"]
        shape = {k: entry[k] for k in ("name", "n_layer", "n_head", "n_embd")}
        return json.dumps({**shape, "steps": steps, "tokens": tokens, **changes})

    (first / STARTED).write_text(marker(entries[0]))
    second = sweep / "runs" / entries[1]["name"]
    second.mkdir(parents=True)
    (second / STARTED).write_text(marker(entries[1], steps=99))
    code, _, err = run(["scale", "run", plan, "--data", tiny_data(), "--out", str(sweep)], capsys)
    assert_one_line_error(code, err, "was started with steps=99, the plan now says 2")

    (second / STARTED).unlink()  # an empty folder is fine: the sweep trains into it
    code, _, err = run(["scale", "run", plan, "--data", tiny_data(), "--out", str(sweep)], capsys)
    assert code == 0, err
    results = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in results] == [e["name"] for e in entries]
    assert all(math.isfinite(r["loss"]) for r in results)


# ---------------------------------------------------------------- scale fit and backtest
def _runs_file(tmp_path, rows, name="runs.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory):
    return _runs_file(tmp_path_factory.mktemp("fit"), synthetic_runs(HOFFMANN))


FIT_OPTION_ROWS = [
    (["--predict", "nan,1e6"], "--predict 'nan,1e6' needs positive, finite N and D"),
    (["--predict", "1e6,inf"], "needs positive, finite N and D"),
    (["--predict", "1e6"], "is not N,D"),
    (["--budget", "nan"], "argument --budget: nan is not a finite number"),
    (["--budget=-1e12"], "argument --budget: -1e12 is not a finite number"),
    (["--budget", "0"], "argument --budget: 0 is not a finite number"),
    (["--budget", "big"], "argument --budget: 'big' is not a number"),
    (["--exclude-budget", "0"], "argument --exclude-budget: 0 is not a finite number"),
    (["--bootstrap", "-1"], "argument --bootstrap: -1 is less than 0"),
    (["--near-min", "-1"], "argument --near-min: -1 is less than 0"),
    (["--seed", "-1"], "argument --seed: -1 is less than 0"),
    (["--delta", "nan"], "argument --delta"),
    (["--unique-tokens", "-5", "--repeats", "muennighoff"], "argument --unique-tokens"),
]


@pytest.mark.parametrize("argv, expected", FIT_OPTION_ROWS, ids=[" ".join(a) for a, _ in FIT_OPTION_ROWS])
def test_scale_fit_bad_options_are_one_line_errors(argv, expected, good_runs, capsys):
    code, _, err = run(["scale", "fit", good_runs, "--bootstrap", "0", *argv], capsys)
    assert_one_line_error(code, err, expected)


def test_scale_fit_plot_never_replaces_a_users_file(good_runs, tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    code, _, err = run(["scale", "fit", good_runs, "--bootstrap", "0", "--plot", str(notes)], capsys)
    assert_one_line_error(code, err, "is not a PNG image")
    assert notes.read_text() == "my notes"
    code, _, err = run(["scale", "fit", good_runs, "--bootstrap", "0", "--plot", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "is a folder")


@pytest.mark.parametrize("first", ["0", "-1"])
def test_scale_backtest_first_must_be_positive(first, good_runs, capsys):
    code, _, err = run(["scale", "backtest", good_runs, "--first", first], capsys)
    assert_one_line_error(code, err, "argument --first")


def _rows(change) -> list[dict]:
    return [change(dict(r)) for r in synthetic_runs(HOFFMANN)]


FIT_FILE_ROWS = [
    ("bool-params", _rows(lambda r: {**r, "params": True}), "params True is a bool, not a number"),
    ("string-loss", _rows(lambda r: {**r, "loss": "2.5"}), "loss '2.5' is a str, not a number"),
    ("string-budget", _rows(lambda r: {**r, "budget": "1e18"}), "budget '1e18' is a str, not a number"),
    ("zero-budget", _rows(lambda r: {**r, "budget": 0}), "budget 0 is not positive and finite"),
    ("missing-loss", _rows(lambda r: {k: v for k, v in r.items() if k != "loss"}), "has no 'loss'"),
    ("duplicates", [{"params": 1e6, "tokens": 2e7, "loss": 3.0}] * 10, "10 runs but only 1 distinct (N, D)"),
    ("too-few", synthetic_runs(HOFFMANN)[:4], "4 runs to fit"),
]


@pytest.mark.parametrize("rows, expected", [r[1:] for r in FIT_FILE_ROWS], ids=[r[0] for r in FIT_FILE_ROWS])
def test_scale_fit_rejects_runs_that_are_not_numbers(rows, expected, tmp_path, capsys):
    code, _, err = run(["scale", "fit", _runs_file(tmp_path, rows), "--bootstrap", "0"], capsys)
    assert_one_line_error(code, err, expected)


def test_scale_fit_lines_that_are_not_objects(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"params": 1, "tokens": 1, "loss": 1}\n[1, 2, 3]\n')
    code, _, err = run(["scale", "fit", str(path)], capsys)
    assert_one_line_error(code, err, f"{path}:2 is a JSON list, not an object")


def test_scale_fit_warns_when_its_constants_cannot_be_trusted(tmp_path, capsys):
    """Clean synthetic sweeps fit without a warning; runs of one N, and losses unrelated to N and D, fit with
    warnings (stderr and the JSON report) that name what is undetermined."""
    code, out, err = run(["scale", "fit", _runs_file(tmp_path, synthetic_runs(HOFFMANN)), "--json"], capsys)
    assert code == 0 and json.loads(out)["warnings"] == [] and "warning" not in err

    one_n = [{"params": 1e6, "tokens": d, "loss": 2 + 100 / d**0.3} for d in np.geomspace(1e6, 1e9, 8)]
    code, out, err = run(["scale", "fit", _runs_file(tmp_path, one_n, "one.jsonl"), "--json"], capsys)
    assert code == 0 and err.startswith("warning: degenerate fit") and "the runs hold only 1 distinct N" in err
    assert len(err.splitlines()) == 1  # one line on stderr; every reason in the report
    assert any("1 distinct N" in w for w in json.loads(out)["warnings"]) and json.loads(out)["degenerate"]

    rng = np.random.default_rng(0)
    nonsense = [{**r, "loss": float(rng.uniform(1, 10))} for r in synthetic_runs(HOFFMANN)]
    code, out, err = run(["scale", "fit", _runs_file(tmp_path, nonsense, "nonsense.jsonl"), "--bootstrap", "8"], capsys)
    assert code == 0 and len(err.splitlines()) == 1 and "more in the report" in err
    assert "DEGENERATE FIT" in out and "rms in log loss" in out and "orders of magnitude" in out
    assert any(w in out for w in ("sits at its bound", "ran off to an extreme"))


def test_a_degenerate_fit_is_named_by_its_rule():
    """The rule (gptwo.scale.fit.degenerate_reasons) on reports as the fit makes them: E = 2e-33 runs off (beyond
    e^-50), an interval of A up to 1.2e21 spans orders of magnitude; a misfit alone warns but is not degenerate."""
    from gptwo.scale.fit import degenerate_reasons, warning_line

    points = [{"params": n, "tokens": d} for n in (1e5, 3e5, 1e6) for d in (1e7, 3e7, 1e8)]
    good = {
        **HOFFMANN,
        "intervals": {"E": [1.6, 1.8], "A": [300.0, 500.0], "alpha": [0.3, 0.4], "loss_opt@1e+20": [1e-3, 9.0]},
        "optimal": [{"params": 1e6}],
        "residuals": {"rms_log": 0.01},
    }
    assert degenerate_reasons(points, good) == []
    tiny_e = {**good, "E": 2e-33}
    assert [r.split(" ran off")[0] for r in degenerate_reasons(points, tiny_e)] == ["E = 2e-33"]
    wide_a = {**good, "intervals": {**good["intervals"], "A": [5.5, 1.2e21]}}
    assert degenerate_reasons(points, wide_a) == [
        "the 95% interval of A, [5.5, 1.2e+21], spans 20.3 orders of magnitude"
    ]
    assert degenerate_reasons(points, {**good, "intervals": {**good["intervals"], "A": [200.0, 1999.0]}}) == []
    assert "[0, 1.8]: not a usable estimate" in degenerate_reasons(points, {**good, "intervals": {"E": [0.0, 1.8]}})[0]
    assert "sits at its bound" in degenerate_reasons(points, {**good, "beta": 0.0})[0]

    report = {**wide_a, "warnings": degenerate_reasons(points, wide_a) + ["a second"], "degenerate": True}
    line = warning_line(report)
    assert line.startswith("warning: degenerate fit") and "\n" not in line and "(and 1 more in the report)" in line
    assert warning_line({"warnings": ["the fit misses the runs"], "degenerate": False}) == (
        "warning: the fit misses the runs"
    )
    assert warning_line({"warnings": [], "degenerate": False}) is None
