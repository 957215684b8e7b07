"""IsoFLOP plans: parameters counted on the real model three ways, and C = 6·N·D exactly for every run."""

import json

from scale_fixtures import cli, tiny_data

from gptwo import GPT, GPTConfig
from gptwo.scale.plan import make_plan, read_plan


def test_each_run_states_its_flops_by_the_formula_and_its_params_as_the_model_counts_them():
    plan = make_plan([1e11, 1e12], vocab_size=1024, per_budget=4)
    settings = plan["train"]
    assert len(plan["runs"]) == 8 and "C = 6*N*D" in plan["formula"]
    for run in plan["runs"]:
        model = GPT(
            GPTConfig(
                vocab_size=1024,
                block_size=settings["block_size"],
                n_layer=run["n_layer"],
                n_head=run["n_head"],
                n_embd=run["n_embd"],
            )
        )
        named = dict(model.named_parameters())
        total = sum(p.numel() for p in model.parameters())  # the tied head is the token embedding: counted once
        assert run["params_total"] == total
        assert run["params"] == total - named["transformer.wpe.weight"].numel()
        assert (
            run["params_non_embedding"]
            == total - named["transformer.wpe.weight"].numel() - named["transformer.wte.weight"].numel()
        )
        assert (
            run["tokens"] == run["max_steps"] * settings["batch_size"] * settings["block_size"] * settings["grad_accum"]
        )
        assert run["flops"] == 6 * run["params"] * run["tokens"]
        assert abs(run["flops"] / run["budget"] - 1) < 0.05  # rounding to whole steps only


def test_each_budget_takes_the_shapes_around_its_guessed_optimum():
    plan = make_plan([1e10, 1e13], vocab_size=1024, per_budget=3, tokens_per_param=20)
    small, large = ([r["params"] for r in plan["runs"] if r["budget"] == b] for b in (1e10, 1e13))
    assert max(small) < min(large)  # a 1000x larger budget moves to larger models
    assert len(set(small)) == len(set(large)) == 3


def test_plan_command_reads_the_vocabulary_from_the_data_and_writes_an_editable_file(tmp_path):
    out = tmp_path / "plan.json"
    result = cli(
        "scale",
        "plan",
        "--budgets",
        "1e8,1e9",
        "--shapes",
        "1x1x16,1x2x32,2x2x32",
        "--per-budget",
        "2",
        "--data",
        tiny_data(),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    plan = read_plan(str(out))
    assert plan["vocab_size"] == 300 and len(plan["runs"]) == 4
    assert json.loads(out.read_text())["runs"][0]["name"] in result.stdout


def test_bad_shapes_and_budgets_are_one_line_errors(tmp_path):
    for args in (
        ["--budgets", "1e9", "--shapes", "2x3x64"],
        ["--budgets", "lots"],
        ["--budgets", "1e9", "--per-budget", "99"],
    ):
        result = cli("scale", "plan", *args, "--vocab-size", "300", "--out", str(tmp_path / "p.json"))
        assert (
            result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
        ), result.stderr
    assert not (tmp_path / "p.json").exists()
