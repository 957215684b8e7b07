"""Issue 20's cases for train, prepare and model loading: each input with its one-line error (exit 2) or
its correct result. Nothing that was there before is changed: saved models, the user's files, inputs.

Rows run in process through `gptwo.cli.main` on a generated world: a small BPE, a few KB of text
prepared into shards, a 1-layer width-32 model saved with that tokenizer, and variants of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from cli_testing import TRAIN, tiny_corpus
from cli_testing import write_file as _write

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.cli import main
from gptwo.data.shard_corpus import prepare
from gptwo.errors import GptwoError
from gptwo.weights import save_pretrained


def _model_variant(root: str, name: str, **config) -> str:
    """A copy of the saved model whose config.json has `config` changed (the weights stay as they are)."""
    folder = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "model"), folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        values = json.load(f)
    _write(path, json.dumps({**values, **config}))
    return folder


def _poisoned(root: str, name: str, value: float, tok: Tokenizer) -> None:
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=16, n_layer=1, n_head=1, n_embd=32))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = value
    save_pretrained(model, os.path.join(root, name), tokenizer=tok)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("train-bad-input"))
    tok = tiny_corpus(root)
    prepare([os.path.join(root, "corpus")], os.path.join(root, "data"), tokenizer=tok, workers=1, progress=False)
    shape = dict(block_size=16, n_layer=1, n_head=1, n_embd=32)
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(vocab_size=tok.n_vocab, **shape)), os.path.join(root, "model"), tokenizer=tok)
    _write(os.path.join(root, "notes", "notes.txt"), "the user's own notes\n")
    _write(os.path.join(root, "notes", "config.txt"), "not a model\n")
    _model_variant(root, "model_100000_layers", n_layer=100_000)
    _model_variant(root, "model_3_layers", n_layer=3)
    _model_variant(root, "model_wide", n_embd=65536, n_head=1)
    _model_variant(root, "model_long_context", n_positions=1_000_000, n_ctx=1_000_000)
    _poisoned(root, "model_nan", float("nan"), tok)
    _poisoned(root, "model_inf", float("inf"), tok)
    save_pretrained(  # 13 outputs more than the tokenizer has tokens
        GPT(GPTConfig(vocab_size=tok.n_vocab + 13, **shape)), os.path.join(root, "model_big_vocab"), tokenizer=tok
    )
    assert main(["train", "--data", os.path.join(root, "data"), "--out", os.path.join(root, "run"), *TRAIN]) == 0
    return root


@dataclass
class Case:
    id: str
    argv: list[str]
    names: list[str]  # what the error line must name


def _train(out: str, *extra: str) -> list[str]:
    return ["train", "--data", "data", "--out", out, *TRAIN, *extra]


def _generate(model: str, *options: str) -> list[str]:
    return ["generate", "--model", model, "--max-new-tokens", "2", *options, "hello"]


CASES = [
    # data loss: --out is a saved model, the user's files, or an input
    Case("train-into-saved-model", _train("model"), ["--out model", "saved model", "--overwrite"]),
    Case("train-into-users-files", _train("notes"), ["--out notes", "notes.txt", "--overwrite"]),
    Case("train-out-is-the-data", _train("data"), ["--out data", "input"]),
    Case("train-out-is-init-from", ["train", "--data", "data", "--out", "run", "--init-from", "run"], ["input"]),
    Case(
        "prepare-into-saved-model",
        ["prepare", "corpus", "--out", "model", "--quiet"],
        ["saved model", "tokenizer.json"],
    ),
    Case("prepare-into-users-files", ["prepare", "corpus", "--out", "notes", "--quiet"], ["notes.txt", "--overwrite"]),
    Case("prepare-out-is-the-input", ["prepare", "corpus", "--out", "corpus", "--quiet"], ["--out corpus", "input"]),
    # hangs and memory bombs: refused before anything is allocated
    Case("gen-config-100000-layers", _generate("model_100000_layers"), ["config.json", "n_layer=100,000", "1,024"]),
    Case("gen-config-3-layers-over-1", _generate("model_3_layers"), ["n_layer=3", "1 layer"]),
    Case("gen-config-huge-width", _generate("model_wide"), ["model_wide", "n_embd", "wte"]),
    Case("gen-config-huge-context", _generate("model_long_context"), ["n_positions", "1000000", "wpe"]),
    Case("train-n-layer-100000", _train("new_run", "n_layer=100000"), ["n_layer=100,000", "1,024"]),
    Case("train-width-depth-bomb", _train("new_run", "n_embd=65536", "n_layer=1024"), ["needs about", "available"]),
    Case("train-context-bomb", _train("new_run", "block_size=2000000"), ["block_size=2,000,000", "1,048,576"]),
    Case("train-selection-pool", _train("new_run", "selection=loss", "selection_pool=100000"), ["selection_pool"]),
    # silently wrong or unclear before: damaged weights, a short tokenizer, devices that are not there
    Case("gen-nan-weights", _generate("model_nan"), ["model_nan", "NaN", "c_fc.weight"]),
    Case("gen-inf-weights", _generate("model_inf"), ["model_inf", "infinite"]),
    Case("gen-tokenizer-smaller-than-vocab", _generate("model_big_vocab"), ["vocabulary is", "only"]),
    Case(
        "train-init-from-nan-weights",
        ["train", "--data", "data", "--out", "new_run", "--init-from", "model_nan"],
        ["NaN"],
    ),
    Case("gen-device-cpu-1", _generate("model", "--device", "cpu:1"), ["cpu:1"]),
    Case("gen-device-meta", _generate("model", "--device", "meta"), ["meta"]),
]
if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
    CASES.append(Case("gen-device-mps-missing", _generate("model", "--device", "mps"), ["MPS"]))


def _snapshot(root: str) -> dict[str, str]:
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_keeps_files(case: Case, world: str, capsys, monkeypatch):
    monkeypatch.chdir(world)
    before = _snapshot(world)
    code = main(case.argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and " — " in errors[0], err
    for name in case.names:
        assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    assert _snapshot(world) == before
    assert not os.path.exists(os.path.join(world, "new_run"))  # a refused run leaves no folder behind


def test_shapes_are_checked_before_the_weights_are_read(world, monkeypatch):
    from gptwo import weights

    def unread(directory):
        raise AssertionError("the weights were read before the config was checked against their header")

    monkeypatch.setattr(weights, "read_weights", unread)
    with pytest.raises(GptwoError, match="n_layer=3"):
        weights.load_pretrained(os.path.join(world, "model_3_layers"))


def test_counted_shapes_match_the_model():
    from gptwo.model import expected_shapes, param_count

    config = GPTConfig(vocab_size=70, block_size=9, n_layer=3, n_head=2, n_embd=8)
    model = GPT(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert expected_shapes(config) == state
    assert param_count(config) == model.num_params(non_embedding=False)


def test_memory_is_checked_before_allocating(monkeypatch):
    from gptwo import runtime as runtime_module
    from gptwo.infer.kvcache import PagedKVCache

    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)  # 124M: ~0.5 GB
    monkeypatch.setattr(runtime_module, "available_memory", lambda device=None: 2**28)
    with pytest.raises(GptwoError, match="needs about .* 256 MiB is available"):
        GPT(config)
    with pytest.raises(GptwoError, match="KV cache of 4,096 blocks"):
        PagedKVCache(config, num_blocks=4096)
    with torch.device("meta"):  # allocates nothing, so nothing is refused
        assert GPT(config).num_params() > 0
    monkeypatch.setattr(runtime_module, "available_memory", lambda device=None: None)  # unknown: no refusal
    assert GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8)).num_params() > 0


def test_top_p_that_underflows_keeps_the_top_token(world, capsys, monkeypatch):
    from gptwo.sampling import filter_logits

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    for top_p in (1e-300, 1e-46, 1e-9):
        kept = torch.isfinite(filter_logits(logits, 1.0, None, top_p))
        assert kept.tolist() == [[False, True, False, False]]
    monkeypatch.chdir(world)
    outputs = []
    for options in (["--top-p", "1e-300"], ["--top-p", "1e-46"], ["--temperature", "0"]):
        assert main(_generate("model", "--seed", "3", *options)) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]  # only the top token is left: greedy decoding


def test_own_outputs_are_reused_and_overwrite_is_explicit(world, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(world)
    run = str(tmp_path / "run")
    assert main(_train(run)) == 0
    assert main(_train(run)) == 2 and "--resume" in capsys.readouterr().err  # as before: a finished run is kept
    assert main(_train(run, "--resume", "max_steps=2")) == 0
    users = str(tmp_path / "users")
    _write(os.path.join(users, "notes.txt"), "keep me")
    assert main(_train(users, "--overwrite")) == 0  # asked for: trains there, the user's file stays
    assert open(os.path.join(users, "notes.txt")).read() == "keep me"
    assert os.path.isfile(os.path.join(users, "model.safetensors"))
    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(world, "data"), data)
    assert main(["prepare", "corpus", "--out", data, "--tokenizer", "tok.json", "--quiet"]) == 0  # our own shards
    assert main(["prepare", "corpus", "--out", users, "--tokenizer", "tok.json", "--quiet", "--overwrite"]) == 0
    assert open(os.path.join(users, "notes.txt")).read() == "keep me"


def test_an_interrupted_first_run_can_be_rerun(world, capsys, monkeypatch, tmp_path):
    """A run folder that has only metrics.jsonl and loss.png (a run stopped before its first checkpoint) is a run's."""
    monkeypatch.chdir(world)
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "loss.png").write_bytes(b"\x89PNG")
    assert main(_train(str(run))) == 0


def test_default_threads_follow_the_cores_not_the_load(monkeypatch):
    from gptwo.config import TrainConfig
    from gptwo.train import loop
    from gptwo.train.distributed import Dist

    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    cpu = torch.device("cpu")
    loop.set_threads(TrainConfig(), Dist(), cpu)
    loop.set_threads(TrainConfig(), Dist(local_world_size=4), cpu)  # torchrun: 4 processes share 6 cores
    loop.set_threads(TrainConfig(threads=5), Dist(), cpu)
    loop.set_threads(TrainConfig(), Dist(), torch.device("meta"))  # not a CPU: left alone
    assert chosen == [6, 1, 5]
    assert not hasattr(loop, "_idle_fraction")  # no sample of the machine's momentary load


def test_two_trainings_on_one_folder_the_second_is_refused(world, tmp_path):
    """The first process holds the run folder's lock; the second stops with one line naming it."""
    run = str(tmp_path / "shared")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen(
        [sys.executable, "-m", "gptwo.cli", "train", "--data", "data", "--out", run, *TRAIN, "max_steps=1000000"],
        cwd=world,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        lock = os.path.join(run, ".gptwo-train.lock")
        deadline = time.monotonic() + 120
        while not (os.path.isfile(lock) and open(lock).read().startswith(f"{first.pid} ")):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first training never took its lock"
            time.sleep(0.2)
        second = subprocess.run(
            [sys.executable, "-m", "gptwo.cli", "train", "--data", "data", "--out", run, *TRAIN, "--resume"],
            cwd=world,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "in use by another gptwo training run" in last, last
        assert f"process {first.pid}" in last, last
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
