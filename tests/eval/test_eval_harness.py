"""The lm-eval plug-in against lm-eval's own `hf` model: same requests, same numbers (<= 1e-4), through
simple_evaluate."""

from __future__ import annotations

import os
import textwrap

import pytest
from eval_fixtures import SENTENCES, hellaswag_rows, long_text, save_tiny_model, write_jsonl

from gptwo.cli import main
from gptwo.eval.tasks import hellaswag_item

TASKS = ["tiny_lambada", "tiny_choice", "tiny_rolling", "tiny_generate"]


def write_tasks(directory: str) -> str:
    """Four local lm-eval tasks, one per request type, with their data files (no downloads)."""
    data = os.path.join(directory, "data")
    os.makedirs(data)
    write_jsonl(
        os.path.join(data, "lambada.jsonl"),
        [{"text": s.rstrip(".")} for s in SENTENCES] + [{"text": long_text(60) + " end"}],
    )
    choices = [hellaswag_item(r) for r in hellaswag_rows()]
    write_jsonl(
        os.path.join(data, "choice.jsonl"),
        [{"query": c.query, "choices": list(c.choices), "gold": c.gold} for c in choices],
    )
    write_jsonl(
        os.path.join(data, "rolling.jsonl"),
        [{"text": long_text(90, seed=s)} for s in range(3)] + [{"text": "Short one."}],
    )
    write_jsonl(os.path.join(data, "generate.jsonl"), [{"prompt": s[:30], "answer": s[30:]} for s in SENTENCES])
    common = "dataset_path: json\ntest_split: test\n"
    specs = {
        "tiny_lambada": """
            output_type: loglikelihood
            doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
            doc_to_target: "{{' '+text.split(' ')[-1]}}"
            metric_list:
              - metric: perplexity
                aggregation: perplexity
                higher_is_better: false
              - metric: acc
                aggregation: mean
                higher_is_better: true""",
        "tiny_choice": """
            output_type: multiple_choice
            doc_to_text: "{{query}}"
            doc_to_target: "{{gold}}"
            doc_to_choice: "choices"
            metric_list:
              - metric: acc
              - metric: acc_norm""",
        "tiny_rolling": """
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: bits_per_byte""",
        "tiny_generate": """
            output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            generation_kwargs:
              until: [".", "\\n"]
              max_gen_toks: 6
              do_sample: false
            metric_list:
              - metric: exact_match""",
    }
    files = {"tiny_lambada": "lambada", "tiny_choice": "choice", "tiny_rolling": "rolling", "tiny_generate": "generate"}
    for name, spec in specs.items():
        test_file = os.path.join(data, files[name] + ".jsonl")
        head = f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {test_file}\n"
        with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
            f.write(head + textwrap.dedent(spec).strip() + "\n")
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = save_tiny_model(str(tmp_path_factory.mktemp("model")), block_size=32)
    return model_dir, write_tasks(str(tmp_path_factory.mktemp("tasks")))


@pytest.fixture(scope="module")
def both(setup):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import gptwo.eval.harness  # noqa: F401 - registers --model gptwo

    model_dir, task_dir = setup
    task_manager = TaskManager(
        include_path=task_dir, include_defaults=False
    )  # indexing lm-eval's own tasks takes ~10 s
    runs = {}
    for name, args, batch in [
        ("gptwo", f"pretrained={model_dir}", 3),
        ("hf", f"pretrained={model_dir},dtype=float32", 1),
    ]:
        runs[name] = lm_eval.simple_evaluate(
            model=name,
            model_args=args,
            tasks=TASKS,
            task_manager=task_manager,
            batch_size=batch,
            device="cpu",
            log_samples=True,
            random_seed=0,
        )
    return runs


def responses(run: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(run["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("task", ["tiny_lambada", "tiny_choice"])
def test_loglikelihoods_equal_lm_evals_hf_model(both, task):
    ours, theirs = responses(both["gptwo"], task), responses(both["hf"], task)
    assert len(ours) == len(theirs) > 1
    for doc_ours, doc_theirs in zip(ours, theirs):
        for (ll, greedy), (hf_ll, hf_greedy) in zip((r[0] for r in doc_ours), (r[0] for r in doc_theirs)):
            assert abs(float(ll) - float(hf_ll)) <= 1e-4
            assert bool(greedy) == bool(hf_greedy)


def test_rolling_loglikelihoods_equal_lm_evals_hf_model(both):
    ours, theirs = responses(both["gptwo"], "tiny_rolling"), responses(both["hf"], "tiny_rolling")
    assert len(ours) == 4
    for doc_ours, doc_theirs in zip(ours, theirs):
        assert abs(float(doc_ours[0][0]) - float(doc_theirs[0][0])) <= 1e-4
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert both["gptwo"]["results"]["tiny_rolling"][metric] == pytest.approx(
            both["hf"]["results"]["tiny_rolling"][metric], rel=1e-5
        )


def test_metrics_equal_lm_evals_hf_model(both):
    for task, metrics in {
        "tiny_lambada": ["acc,none", "perplexity,none"],
        "tiny_choice": ["acc,none", "acc_norm,none"],
    }.items():
        for metric in metrics:
            assert both["gptwo"]["results"][task][metric] == pytest.approx(
                both["hf"]["results"][task][metric], rel=1e-5
            )


def test_generate_until_equals_hf_greedy_with_stop_sequences(both):
    ours, theirs = responses(both["gptwo"], "tiny_generate"), responses(both["hf"], "tiny_generate")
    assert [r[0] for r in ours] == [r[0] for r in theirs]
    assert all("." not in r[0] and "\n" not in r[0] for r in ours)  # cut at the stop sequences
    assert any(r[0] for r in ours)


def test_gptwo_eval_harness_runs_lm_evals_cli(setup, capsys):
    model_dir, task_dir = setup
    code = main(
        [
            "eval",
            "harness",
            "--model",
            "gptwo",
            "--model_args",
            f"pretrained={model_dir}",
            "--tasks",
            "tiny_lambada",
            "--include_path",
            task_dir,
            "--device",
            "cpu",
            "--batch_size",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "tiny_lambada" in out and "perplexity" in out and "gptwo" in out


def test_plugin_rejects_a_path_that_is_not_a_model(tmp_path):
    import lm_eval.api.registry

    import gptwo.eval.harness  # noqa: F401
    from gptwo.errors import GptwoError

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GptwoError, match="no config.json"):
        lm_eval.api.registry.get_model("gptwo").create_from_arg_string(f"pretrained={tmp_path}")


def test_plugin_is_declared_under_the_lm_eval_models_entry_point():
    from importlib.metadata import entry_points

    from gptwo.eval.harness import GptwoLM

    (point,) = [p for p in entry_points(group="lm_eval.models") if p.name == "gptwo"]
    assert point.load() is GptwoLM
