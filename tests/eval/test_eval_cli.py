"""`gptwo eval ...` end to end: JSON and tables, tasks from local files, comparisons, and one-line errors."""

from __future__ import annotations

import json
import math
import re

import pytest
from eval_fixtures import WIKI_RAW, hellaswag_rows, long_text, save_tiny_model, small_tokenizer, write_jsonl, write_text

from gptwo.cli import main
from gptwo.eval.perplexity import score_texts
from gptwo.weights import load_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models: one with GPT-2's BPE, one with its own trained tokenizer.json."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny_model(str(root / "bpe"), seed=0), save_tiny_model(
        str(root / "own"), seed=1, tokenizer=small_tokenizer()
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return {
        "long": write_text(str(root / "long.txt"), long_text(200)),  # several contexts of 32 tokens
        "short": write_text(str(root / "short.txt"), "Rivers run to the sea."),
        "lambada": write_jsonl(
            str(root / "lambada_test.jsonl"), [{"text": "the cat sat on the mat"}, {"text": "rivers run to the sea"}]
        ),
        "hellaswag": write_jsonl(str(root / "hellaswag_val.jsonl"), hellaswag_rows()),
        "wiki": write_text(str(root / "wiki.test.raw"), WIKI_RAW),
    }


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ppl_json_is_one_object_with_the_numbers_of_the_library(capsys, models, files):
    code, out, _ = run(
        capsys,
        "ppl",
        "--model",
        models[0],
        files["long"],
        files["short"],
        "--json",
        "--stride",
        "16",
        "--batch-size",
        "3",
    )
    assert code == 0
    report = json.loads(out)
    model, tok = load_model(models[0], device="cpu")
    texts = [open(files[k]).read() for k in ("long", "short")]
    expected = score_texts(model, tok, texts, stride=16)
    assert report["tokens"] == sum(s.tokens for s in expected) > 3 * 32  # longer than the context: windows
    assert report["perplexity"] == pytest.approx(math.exp(sum(s.nll for s in expected) / report["tokens"]), rel=1e-5)
    assert [f["bits_per_byte"] for f in report["files"]] == pytest.approx([s.bits_per_byte for s in expected], rel=1e-5)
    assert {"perplexity", "word_perplexity", "bits_per_byte", "tokens", "words", "bytes", "stride", "context"} <= set(
        report
    )
    assert (report["stride"], report["context"]) == (16, 32)


def test_ppl_table_lists_files_and_total(capsys, models, files):
    code, out, _ = run(capsys, "ppl", "--model", models[1], files["long"], files["short"], "--quiet")
    assert code == 0
    lines = out.splitlines()
    assert "ppl/token" in lines[1] and "bits/byte" in lines[1]
    assert lines[3].startswith(files["long"]) and lines[4].startswith(files["short"]) and lines[5].startswith("all")


def test_task_commands_read_published_formats(capsys, models, files):
    code, out, _ = run(capsys, "lambada", "--model", models[0], "--data", files["lambada"], "--json", "--quiet")
    assert (
        code == 0
        and set(json.loads(out)) >= {"task", "model", "acc", "perplexity", "items"}
        and json.loads(out)["items"] == 2
    )
    code, out, _ = run(capsys, "hellaswag", "--model", models[0], "--data", files["hellaswag"], "--json", "--quiet")
    result = json.loads(out)
    assert code == 0 and result["items"] == 2 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    code, out, _ = run(capsys, "wikitext2", "--model", models[1], "--data", files["wiki"], "--stride", "16", "--quiet")
    assert code == 0 and "ppl/word" in out and "bits/byte" in out


def test_compare_puts_models_in_one_table(capsys, models, files):
    code, out, _ = run(
        capsys,
        "compare",
        *models,
        "--files",
        files["long"],
        "--tasks",
        "lambada",
        "--data",
        f"lambada={files['lambada']}",
        "--json",
        "--quiet",
    )
    assert code == 0
    rows = json.loads(out)["models"]
    assert [r["model"] for r in rows] == list(models)
    assert all({"perplexity", "bits_per_byte", "lambada.acc", "lambada.perplexity"} <= set(r) for r in rows)
    _, single, _ = run(capsys, "ppl", "--model", models[1], files["long"], "--json", "--quiet")
    assert rows[1]["bits_per_byte"] == pytest.approx(json.loads(single)["bits_per_byte"], rel=1e-6)
    code, out, _ = run(capsys, "compare", *models, "--files", files["short"], "--quiet")
    assert code == 0 and models[0] in out and models[1] in out and "bits/byte" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["ppl", "--model", "{model}", "{empty}"], "is empty — give a file with text in it"),
        (["ppl", "--model", "{model}", "{missing}"], "not found"),
        (["ppl", "--model", "{not_model}", "{short}"], "has no config.json, so it is not a model folder"),
        (["ppl", "--model", "{short}", "{short}"], "is neither a model folder nor a hub id"),
        (["ppl", "--model", "{model}", "{short}", "--stride", "33"], "stride 33 is outside 1..32"),
        (
            ["lambada", "--model", "{model}", "--data", "{bad_lambada}"],
            "item 2 of .* has no field 'text' — each item needs the fields text",
        ),
        (["hellaswag", "--model", "{model}", "--data", "{empty}"], "is empty"),
        (
            ["compare", "{model}", "--files", "{short}", "--data", "hellaswag=x.jsonl"],
            "--data names task 'hellaswag' which is not in --tasks",
        ),
        (["compare", "{model}"], "nothing to compare"),
    ],
)
def test_errors_are_one_clear_line(capsys, models, files, tmp_path, argv, message):
    paths = {
        "model": models[0],
        "short": files["short"],
        "empty": write_text(str(tmp_path / "empty.txt"), "  \n"),
        "missing": str(tmp_path / "missing.txt"),
        "not_model": str(tmp_path),
        "bad_lambada": write_jsonl(str(tmp_path / "bad.jsonl"), [{"text": "a b c"}, {"words": "d e f"}]),
    }
    code, out, err = run(capsys, *(a.format(**paths) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
