"""`gptwo bench lora --quality --task instruct` on a tiny base, a few steps: the report's fields, recovery from the
losses it reports, the read-back of finished runs; and the instruction set's promise that nothing held out occurs
in train."""

from __future__ import annotations

import json

import pytest
import torch

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.bench.instruct import CAPITAL_PHRASINGS, CAPITALS, KINDS, instruction_set
from gptwo.errors import GptwoError
from gptwo.weights import save_pretrained


def _user(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def test_heldout_instructions_never_occur_in_train():
    train, heldout = instruction_set(train_size=3000, heldout_per_kind=40, seed=1)
    assert len(train) == 3000 and [sum(i["kind"] == k for i in heldout) for k in KINDS] == [40, 40, len(CAPITALS)]
    asked = {_user(c["messages"]) for c in train}
    answers = {_user(c["messages"]): c["messages"][-1]["content"] for c in train}
    for item in heldout:
        instruction = _user(item["messages"])
        assert instruction not in asked and item["messages"][-1]["role"] == "user"
        if item["kind"] == "add":  # nor the swapped pair
            a, b = (int(w) for w in instruction.split()[1::2])
            assert f"Add {b} and {a}" not in asked and item["answer"] == str(a + b)
        elif item["kind"] == "reverse":
            assert item["answer"].split() == instruction.removeprefix("Reverse: ").split()[::-1]
        else:  # a known fact in a new wording: the country is asked in train in the other two phrasings
            country = next(c for c in CAPITALS if instruction in {p.format(c) for p in CAPITAL_PHRASINGS})
            others = {p.format(country) for p in CAPITAL_PHRASINGS} - {instruction}
            assert others <= asked and {answers[o] for o in others} == {item["answer"]} == {CAPITALS[country]}
    assert {m["role"] for c in train for m in c["messages"]} == {"system", "user", "assistant"}
    assert instruction_set(3000, 40, seed=1) == (train, heldout)  # seeded: the same set every time


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    """A 1-layer, width-32 model with the cpu preset's context (128) and a BPE of the set's own text."""
    from gptwo.chat import render

    directory = str(tmp_path_factory.mktemp("base"))
    torch.manual_seed(0)
    train, _ = instruction_set(300, 5)
    tokenizer = Tokenizer.train([render(c["messages"]) for c in train], vocab_size=300)
    config = GPTConfig(vocab_size=tokenizer.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32)
    save_pretrained(GPT(config), directory, tokenizer=tokenizer)
    return directory


def test_instruct_report(tiny_base, tmp_path):
    from gptwo.bench.lora_quality import lora_quality, render_quality

    out = str(tmp_path / "q")
    kwargs = dict(
        task="instruct",
        base=tiny_base,
        steps=3,
        full_lrs=(3e-3,),
        lora_lrs=(1e-1,),
        full_wds=(0.1,),
        lora_wds=(0.3,),
        conversations=300,
        heldout_per_kind=5,
        threads=1,
        progress=False,
    )
    report = lora_quality(out, **kwargs)
    assert report["task"] == "instruct" and report["base_model"] == tiny_base and report["base_steps"] is None
    assert report["finetune_steps"] == 3 and report["tokens_per_step"] == 16 * 128
    assert report["train_conversations"] == 300 and 0 < report["counted_train_tokens"] < report["train_tokens"]
    assert report["heldout"] == {"reverse": 5, "add": 5, "capital": len(CAPITALS)}
    assert report["lora"] == {"rank": 8, "alpha": 8.0, "targets": ["c_attn", "c_proj", "c_fc"]}
    runs = report["runs"]
    assert [(r["name"], r["method"], r["lr"], r["weight_decay"]) for r in runs] == [
        ("full-lr0.003", "full", 3e-3, 0.1),  # the preset's weight decay: the name it had before the sweep
        ("lora-r8-a8-lr0.1-wd0.3", "lora", 1e-1, 0.3),
    ]
    for run in runs:  # each trained at its own weight decay
        with open(f"{out}/instruct/{run['name']}/train_config.json", encoding="utf-8") as f:
            assert json.load(f)["config"]["weight_decay"] == run["weight_decay"]
    n_heldout = 10 + len(CAPITALS)
    for row in [report["base"], *runs]:
        assert row["heldout_loss"] > 0 and set(row["accuracy"]) == {*KINDS, "all"}
        # per kind out of its count; "all" is their count-weighted mean
        counts = {k: report["heldout"][k] for k in KINDS}
        right = {k: row["accuracy"][k] * n for k, n in counts.items()}
        assert all(abs(r - round(r)) < 1e-9 for r in right.values())
        assert row["accuracy"]["all"] == pytest.approx(sum(right.values()) / n_heldout)
    # fine-tuning moved the weights: every run's loss differs from the base's
    assert all(r["heldout_loss"] != report["base"]["heldout_loss"] for r in runs)
    base_loss = report["base"]["heldout_loss"]
    full = min((r for r in runs if r["method"] == "full"), key=lambda r: r["heldout_loss"])
    lora = min((r for r in runs if r["method"] == "lora"), key=lambda r: r["heldout_loss"])
    assert (report["best_full"], report["best_lora"]) == (full["name"], lora["name"])
    gain = base_loss - full["heldout_loss"]
    for run in runs:
        expected = (base_loss - run["heldout_loss"]) / gain if gain > 0 else None
        assert run["recovery"] == (pytest.approx(expected) if gain > 0 else None)
    assert report["recovery"] == lora["recovery"]
    with open(f"{out}/instruct/report.json", encoding="utf-8") as f:
        assert json.load(f) == report
    table = render_quality(report).splitlines()
    assert table[2].split() == [
        "run",
        "method",
        "lr",
        "wd",
        "held-out",
        "loss",
        "reverse",
        "add",
        "capital",
        "all",
        "recovery",
    ]
    assert table[3].split()[:2] == ["base", "-"] and table[4].split()[:4] == ["full-lr0.003", "full", "0.003", "0.1"]
    assert f"{report['best_lora']} vs {report['best_full']}" in table[-1]

    again = lora_quality(out, **kwargs)  # the finished runs are read back, not trained again
    assert [r["heldout_loss"] for r in again["runs"]] == [r["heldout_loss"] for r in runs]
    assert all(r["wall_s"] is None for r in again["runs"])
    with pytest.raises(GptwoError, match="trained with max_steps=3, not the max_steps=4"):
        lora_quality(out, **{**kwargs, "steps": 4})  # a finished run of another schedule is not read back
    with pytest.raises(GptwoError, match="holds runs on an instruction set made from"):
        lora_quality(out, **{**kwargs, "conversations": 301})


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--task", "instruct"], ["--task and --base", "add --quality"]),
        (["--quality", "--base", "somewhere"], ["belong to --task instruct"]),
        (["--quality", "--task", "instruct", "--base", "somewhere", "--base-steps", "5"], ["--base-steps"]),
        (["--quality", "--task", "chat"], ["--task", "invalid choice"]),
    ],
)
def test_quality_options_out_of_place_are_one_line_errors(argv, names, capsys, tmp_path):
    from gptwo.cli import main

    try:
        code = main(["bench", "lora", *argv, "--out", str(tmp_path / "q")])
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and all(name in lines[0] for name in names), lines
    assert not (tmp_path / "q").exists()  # refused before anything is written
