"""Bad input to `gptwo eval harness` (issue 20): no arguments, no model to load, an unknown task — each one
`error: … — …` line with exit 2, where lm-eval itself printed help with exit 0 or a traceback-born "bug" line.

lm-eval's own run over its task index takes a minute here, so the unknown-task row gives the plug-in's command
the exact error lm-eval raises for it (`Tasks not found: …`, lm_eval/config/evaluate_config.py) instead.
"""

from __future__ import annotations

import pytest

from gptwo.cli import main
from gptwo.errors import GptwoError

pytest.importorskip("lm_eval")


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], err
    assert "this is a bug" not in err
    return lines[0]


def test_harness_without_arguments_is_an_error_not_lm_evals_help(capsys):
    assert main(["eval", "harness"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "needs lm-eval's arguments" in line and "--model_args pretrained=PATH" in line


def test_the_plugin_without_pretrained_names_model_args():
    import lm_eval.api.registry

    import gptwo.eval.harness  # noqa: F401  (registers the model)

    with pytest.raises(GptwoError, match="no model to load.*--model_args pretrained=PATH"):
        lm_eval.api.registry.get_model("gptwo").create_from_arg_string("")


def test_an_unknown_task_is_one_line(monkeypatch, capsys):
    import lm_eval.__main__

    def lm_eval_on_an_unknown_task():
        raise ValueError("Tasks not found: no_such_task")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lm_eval_on_an_unknown_task)
    assert main(["eval", "harness", "--model", "gptwo", "--model_args", "pretrained=x", "--tasks", "no_such_task"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "lm-eval has no task no_such_task" in line and "ls tasks" in line


def test_other_lm_eval_value_errors_are_not_hidden(monkeypatch):
    import lm_eval.__main__

    from gptwo.eval.harness import main as harness_main

    def lm_eval_failing():
        raise ValueError("something else")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lm_eval_failing)
    with pytest.raises(ValueError, match="something else"):
        harness_main(["--tasks", "x"])
