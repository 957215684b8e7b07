"""`gptwo generate` and `gptwo tokenizer`, and every user error of the core as one clear line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gptwo import GPT, GPTConfig, GptwoError, Tokenizer
from gptwo.cli import main
from gptwo.generate import complete
from gptwo.weights import load_model

TINY = GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(str(folder), tokenizer=Tokenizer.gpt2())
    return folder


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "gptwo.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(stderr: str):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], stderr
    assert "Traceback" not in stderr


def test_generate_streams_the_greedy_continuation(model_dir):
    result = run_cli(
        "generate", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "15", "Hello, my name is"
    )
    assert result.returncode == 0, result.stderr
    model, tok = load_model(str(model_dir), device="cpu")
    expected = complete(model, tok, ["Hello, my name is"], 15, temperature=0)[0]
    assert result.stdout == expected and len(expected) > 0


def test_generate_seed_and_stop(model_dir, capsys):
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "30",
        "--seed",
        "7",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "Once upon",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    stop = first[5:8]
    assert main(args + ["--stop", stop]) == 0
    stopped = capsys.readouterr().out
    assert stop not in stopped and first.startswith(stopped)


def test_batch_of_prompts_of_different_lengths(model_dir):
    model, tok = load_model(str(model_dir), device="cpu")
    prompts = ["A", "A much longer prompt with many more tokens in it", "Middle length one"]
    together = complete(model, tok, prompts, 12, temperature=0, stop_at_eot=False)
    apart = [complete(model, tok, [p], 12, temperature=0, stop_at_eot=False)[0] for p in prompts]
    assert together == apart


def test_unknown_preset():
    with pytest.raises(GptwoError, match="unknown model preset 'gpt5'.*gpt2-medium"):
        GPTConfig.from_preset("gpt5")


def test_missing_weight_file(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    result = run_cli("generate", "--model", str(tmp_path), "Hi")
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert "no weights" in result.stderr


def test_corrupt_weight_file(tmp_path, model_dir):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    data = (model_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run_cli("generate", "--model", str(tmp_path), "Hi")
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert "corrupt or truncated" in result.stderr


def test_checkpoint_shape_differs_from_config(tmp_path, model_dir, capsys):
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(tmp_path), "Hi"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "has shape" in err


def test_tokenizer_larger_than_model_vocab(tmp_path, capsys):
    small = GPTConfig(vocab_size=1000, block_size=32, n_layer=1, n_head=2, n_embd=16)
    GPT(small).save_pretrained(str(tmp_path), tokenizer=Tokenizer.gpt2())
    assert main(["generate", "--model", str(tmp_path), "Hi"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "50257 tokens but the model's vocabulary is 1000" in err


def test_empty_prompt(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), ""]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "prompt is empty" in err


def test_non_utf8_input_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    result = run_cli("tokenizer", "train", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "t.json"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert "not UTF-8" in result.stderr and "offset 3" in result.stderr
    assert not (tmp_path / "t.json").exists()


def test_bad_sampling_values_and_usage(model_dir, capsys):
    for flags, message in (
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "0"], "--top-k"),
    ):
        with pytest.raises(SystemExit) as exit_info:  # checked by the parser, before the model loads
            main(["generate", "--model", str(model_dir), *flags, "Hi"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert_one_line_error(err)
        assert message in err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "Hi"])  # --model missing
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err)


def test_unknown_model_offline_names_the_fix(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "no-such-org/no-such-model", "Hi"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "hub" in err
