"""Online selection: the selector keeps the top-scoring rows, reducible loss avoids planted noise,
resumed runs select exactly as uninterrupted ones, and `flops` follows the formula."""

import pytest
import torch
import torch.nn.functional as F
from select_fixtures import NOISE_CHARS, TINY, metrics, mixed_data, reference_run, tokenizer_file

from gptwo import GPT, GPTConfig
from gptwo.data.loader import ShardLoader
from gptwo.errors import GptwoError
from gptwo.select.online import Selector
from gptwo.train import checkpoint
from gptwo.train.loop import run_training
from gptwo.weights import load_model


class ListLoader:
    """A loader that hands out fixed batches, for checking what the selector keeps."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def next_batch(self):
        self.calls += 1
        return self.batches[self.calls - 1]


def hf_row_losses(model: GPT, x: torch.Tensor, y: torch.Tensor, tmp_path) -> torch.Tensor:
    """Oracle: each row's mean loss under transformers' GPT2LMHeadModel loaded from the saved weights."""
    from transformers import GPT2LMHeadModel

    model.save_pretrained(str(tmp_path))
    theirs = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        logits = theirs(x).logits
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)


@pytest.mark.parametrize("strategy", ["loss", "reducible"])
def test_selector_returns_the_highest_scoring_rows_of_its_pool(tmp_path, strategy):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model, reference = GPT(config), GPT(config)
    x = torch.randint(0, 64, (12, 16))
    x[::3, 8:] = 7  # a few easy rows so scores spread
    y = torch.roll(x, -1, dims=1)
    selector = Selector(
        ListLoader([(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]),
        strategy,
        pool=3,
        reference=reference if strategy == "reducible" else None,
    )
    sx, sy = selector.next_batch(model)
    scores = hf_row_losses(model, x, y, tmp_path / "m")
    if strategy == "reducible":
        scores = scores - hf_row_losses(reference, x, y, tmp_path / "r")
    expected = sorted(torch.topk(scores, 4).indices.tolist())
    assert torch.equal(sx, x[expected]) and torch.equal(sy, y[expected])
    assert model.training  # scoring switched to eval mode and back


def noise_rows(x: torch.Tensor, noise_ids: set[int]) -> int:
    """Rows made mostly of tokens that occur only in the planted noise."""
    return sum(sum(t in noise_ids for t in row) > len(row) // 2 for row in x.tolist())


def test_reducible_picks_less_planted_noise_than_uniform():
    from gptwo.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file())
    noise_ids = {i for i in range(tok.n_vocab) if any(c in NOISE_CHARS for c in tok.decode([i]))}
    reference, _ = load_model(reference_run(), device="cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
    counts = {}
    for strategy in ("uniform", "reducible"):
        loader = ShardLoader(mixed_data(), batch_size=8, block_size=32, seed=3)
        selector = Selector(loader, strategy, pool=4, reference=reference if strategy == "reducible" else None)
        counts[strategy] = sum(noise_rows(selector.next_batch(model)[0], noise_ids) for _ in range(12))
    assert counts["uniform"] >= 20  # 96 rows from a corpus planted with ~40% noise
    assert counts["reducible"] <= counts["uniform"] // 4, counts


@pytest.mark.parametrize("strategy", ["loss", "reducible"])
def test_crash_then_resume_selects_exactly_as_the_uninterrupted_run(tmp_path, monkeypatch, strategy):
    extra = [f"selection={strategy}", "selection_pool=3", "max_steps=8", "checkpoint_every=2", "dropout=0.1"]
    if strategy == "reducible":
        extra.append(f"selection_reference={reference_run()}")
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    run_training(mixed_data(), straight, overrides=TINY + extra, progress=False)
    real_save = checkpoint.save_checkpoint

    def save_then_crash(run_dir, step, *args, **kwargs):
        real_save(run_dir, step, *args, **kwargs)
        if step == 4:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(mixed_data(), crashed, overrides=TINY + extra, progress=False)
    monkeypatch.undo()
    run_training(mixed_data(), crashed, resume=True, progress=False)
    losses = lambda run: {r["step"]: (r["loss"], r["flops"]) for r in metrics(run) if "loss" in r}  # noqa: E731
    assert losses(straight) == losses(crashed) and len(losses(straight)) == 8  # exact: same floats
    uniform = str(tmp_path / "uniform")
    run_training(mixed_data(), uniform, overrides=TINY + ["max_steps=8"], progress=False)
    assert {s: loss for s, (loss, _) in losses(uniform).items()} != {
        s: loss for s, (loss, _) in losses(straight).items()
    }  # selection changed the batches


def non_embedding_params(vocab: int, width: int, layers: int) -> int:
    """GPT-2's parameters without position embeddings: tied token embedding, 12C²+13C per block, final LayerNorm."""
    return vocab * width + layers * (12 * width * width + 13 * width) + 2 * width


def test_flops_count_training_and_scoring_by_the_formula(tmp_path):
    reference = reference_run()
    uniform, selected = str(tmp_path / "uniform"), str(tmp_path / "selected")
    shape = ["n_layer=2", "n_embd=32", "block_size=32", "batch_size=4", "grad_accum=2"]
    run_training(mixed_data(), uniform, overrides=TINY + shape + ["max_steps=3"], progress=False)
    run_training(
        mixed_data(),
        selected,
        overrides=TINY
        + shape
        + ["max_steps=3", "selection=reducible", "selection_pool=3", f"selection_reference={reference}"],
        progress=False,
    )
    vocab, L, C, T, B, accum, K = 300, 2, 32, 32, 4, 2, 3
    n = non_embedding_params(vocab, C, L)
    assert GPT(GPTConfig(vocab_size=vocab, block_size=T, n_layer=L, n_head=2, n_embd=C)).num_params() == n
    n_ref = non_embedding_params(vocab, 32, 2)  # the reference is the same tiny shape
    train = (6 * n + 12 * L * C * T) * B * T * accum
    scoring = ((2 * n + 4 * L * C * T) + (2 * n_ref + 4 * L * C * T)) * K * B * T * accum
    assert [r["flops"] for r in metrics(uniform) if "loss" in r] == [train * s for s in (1, 2, 3)]
    assert [r["flops"] for r in metrics(selected) if "loss" in r] == [(train + scoring) * s for s in (1, 2, 3)]


def test_bad_selection_settings_are_one_line_errors(tmp_path):
    from gptwo.config import load_train_config

    with pytest.raises(GptwoError, match="selection='best' is unknown"):
        load_train_config(overrides=["selection=best"])
    with pytest.raises(GptwoError, match="selection=reducible and selection_reference=PATH go together"):
        load_train_config(overrides=["selection=reducible"])
    with pytest.raises(GptwoError, match="selection_pool=0 must be positive"):
        load_train_config(overrides=["selection=loss", "selection_pool=0"])
    with pytest.raises(GptwoError, match="model folder /no/such/model does not exist"):
        run_training(
            mixed_data(),
            str(tmp_path / "run"),
            overrides=TINY + ["selection=reducible", "selection_reference=/no/such/model"],
            progress=False,
        )
