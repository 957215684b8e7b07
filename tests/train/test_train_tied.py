"""GPT-2 ties its output layer to its token embedding: every path that builds, loads, fine-tunes,
resumes or saves a model keeps one shared matrix, so a fine-tune's trained head is what gets saved."""

import json
import os
import random

import numpy as np
import torch
from train_fixtures import TINY, cli, metrics, tiny_data, train_losses

from gptwo import GPT, GPTConfig
from gptwo.data.shard_corpus import prepare
from gptwo.tokenizer import Tokenizer
from gptwo.train import loop
from gptwo.train.checkpoint import latest_checkpoint
from gptwo.train.loop import run_training
from gptwo.weights import load_model, model_from_state, read_weights, state_dict_from_hf

TINY_CONFIG = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16)


def is_tied(model: torch.nn.Module) -> bool:
    return model.lm_head.weight is model.transformer.wte.weight


def capture_trainer_models(monkeypatch) -> list:
    """Record the model each trainer trains (after loading, resuming and parallelizing)."""
    seen = []
    original = loop._Trainer.run

    def run(self):
        seen.append(loop.unwrap(self.model))
        return original(self)

    monkeypatch.setattr(loop._Trainer, "run", run)
    return seen


def test_tied_after_every_load_path(tmp_path):
    GPT(TINY_CONFIG).save_pretrained(str(tmp_path))
    assert is_tied(GPT(TINY_CONFIG))
    assert is_tied(GPT.from_pretrained(str(tmp_path)))
    assert is_tied(GPT.from_pretrained(str(tmp_path), dtype=torch.bfloat16))
    assert is_tied(load_model(str(tmp_path), device="cpu")[0])
    assert is_tied(
        model_from_state(TINY_CONFIG, state_dict_from_hf(read_weights(str(tmp_path))), "test")
    )  # the FSDP export path
    model = GPT.from_pretrained(str(tmp_path))
    assert model.num_params(non_embedding=False) == GPT(TINY_CONFIG).num_params(
        non_embedding=False
    )  # the head counts once


def test_fine_tune_and_resume_train_one_tied_matrix(tmp_path, monkeypatch):
    seen = capture_trainer_models(monkeypatch)
    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    run_training(tiny_data(), base, overrides=TINY + ["max_steps=4"], progress=False)
    run_training(tiny_data(), tuned, overrides=TINY + ["max_steps=4"], init_from=base, progress=False)
    run_training(tiny_data(), tuned, overrides=TINY + ["max_steps=8"], resume=True, progress=False)
    assert len(seen) == 3 and all(is_tied(model) for model in seen)
    # what is saved is what was trained: the folder's logits equal the trainer's model's
    saved = GPT.from_pretrained(tuned)
    idx = torch.randint(0, saved.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(saved(idx), seen[-1].eval()(idx))


def test_checkpoint_of_the_untied_code_still_resumes(tmp_path, monkeypatch, capfd):
    """Runs fine-tuned before the fix trained a separate head (in the optimizer state, never saved)."""
    run = str(tmp_path / "run")
    build = loop._Trainer._build_model

    def untied(self):
        model = build(self)
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
        return model

    monkeypatch.setattr(loop._Trainer, "_build_model", untied)
    run_training(tiny_data(), run, overrides=TINY + ["max_steps=4"], progress=False)
    state = json.load(open(os.path.join(latest_checkpoint(run), "trainer.json")))
    assert any("lm_head.weight" in group["params"] for group in state["optimizer"]["param_groups"])
    monkeypatch.setattr(loop._Trainer, "_build_model", build)
    seen = capture_trainer_models(monkeypatch)
    summary = run_training(tiny_data(), run, overrides=TINY + ["max_steps=8"], resume=True, progress=False)
    assert summary["step"] == 8 and is_tied(seen[0]) and sorted(train_losses(run)) == list(range(1, 9))
    assert "untied output layer" in capfd.readouterr().err


def _one_document_data(root) -> tuple[str, np.ndarray]:
    """Prepared data whose validation split is one long document (no end-of-text inside the windows)."""
    rng = random.Random(0)
    words = "the a river model token bread sea hill rain learns predicts text oven warm cat dog sun".split()
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(700)) + ".")
    tok = Tokenizer.train([str(corpus)], vocab_size=300)
    data = str(root / "data")
    meta = prepare([str(corpus)], data, tokenizer=tok, val_fraction=0.1, progress=False, workers=1)
    (shard,) = meta["splits"]["val"]["shards"]
    from gptwo.data.loader import ShardLoader

    val = ShardLoader(data, split="val", batch_size=4, block_size=32)
    return data, val._read(0, val.num_tokens)


def test_fine_tune_save_eval_round_trip(tmp_path):
    """The saved fine-tune scores held-out text as the trainer measured it, and better than its base.

    The trainer's validation windows are disjoint blocks of the split; `gptwo eval ppl` with its default
    stride scores the same blocks, except that its first block starts from <|endoftext|> instead of the
    split's first token, so the two agree to within 1% (an untied head saved as the embedding missed by
    more than 3% in the issue's measurement).
    """
    data, val_tokens = _one_document_data(tmp_path)
    settings = TINY + ["eval_batches=4", "sample_tokens=0"]
    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    run_training(data, base, overrides=settings + ["max_steps=20"], progress=False)
    run_training(data, tuned, overrides=settings + ["max_steps=60", "lr=1e-2"], init_from=base, progress=False)
    trainer_val = [row["val_loss"] for row in metrics(tuned) if "val_loss" in row][-1]

    covered = 4 * 4 * 32  # eval_batches x batch_size x block_size tokens, predicted from the split's start
    tokenizer = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    held_out = val_tokens[1 : covered + 1].tolist()
    assert tokenizer.eot_token not in held_out
    text = tokenizer.decode(held_out)
    assert tokenizer.encode_ordinary(text) == held_out  # the file holds exactly those tokens
    path = tmp_path / "held_out.txt"
    path.write_text(text, encoding="utf-8")

    def eval_loss(model_dir: str) -> float:
        result = cli("eval", "ppl", "--model", model_dir, str(path), "--json", "--device", "cpu", "--quiet")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        (row,) = [r for r in report["files"]] if "files" in report else [report]
        return row["nll"] / row["tokens"]

    tuned_loss, base_loss = eval_loss(tuned), eval_loss(base)
    assert abs(tuned_loss - trainer_val) / trainer_val < 0.01, (tuned_loss, trainer_val)
    assert tuned_loss < base_loss - 0.05, (tuned_loss, base_loss)
