"""TrainConfig: presets follow the published recipe; files and key=value overrides are checked."""

import pytest
import torch
from train_fixtures import cli

from gptwo import GPT, GPTConfig
from gptwo.config import TRAIN_PRESETS, TrainConfig, load_train_config, train_fields
from gptwo.errors import GptwoError
from gptwo.train.optim import flops_per_token, lr_at, make_optimizer


@pytest.mark.parametrize(
    "preset, lr, layers",
    [("gpt2", 6e-4, 12), ("gpt2-medium", 3e-4, 24), ("gpt2-large", 2.5e-4, 36), ("gpt2-xl", 2e-4, 48)],
)
def test_gpt2_presets_use_gpt3_recipe(preset, lr, layers):
    config = load_train_config(preset)
    assert (config.lr, config.n_layer, config.block_size) == (lr, layers, 1024)
    assert (config.beta1, config.beta2, config.weight_decay, config.grad_clip, config.min_lr_ratio) == (
        0.9,
        0.95,
        0.1,
        1.0,
        0.1,
    )
    assert config.batch_tokens == 524288 and config.batch_tokens % (config.batch_size * 1024) == 0


def test_overrides_are_typed_and_checked():
    config = load_train_config("cpu", overrides=["lr=3e-4", "n_layer=6", "device=cpu", "max_steps=7"])
    assert (config.lr, config.n_layer, config.device, config.max_steps) == (3e-4, 6, "cpu", 7)
    with pytest.raises(GptwoError, match="unknown config key 'nlayer'.*valid keys: n_layer n_head n_embd block_size"):
        load_train_config(overrides=["nlayer=6"])
    with pytest.raises(GptwoError, match="n_layer='six' is not an integer"):
        load_train_config(overrides=["n_layer=six"])
    with pytest.raises(GptwoError, match="not key=value"):
        load_train_config(overrides=["lr"])
    with pytest.raises(GptwoError, match="lr=-1.0 must be positive"):
        load_train_config(overrides=["lr=-1"])
    # an explicit grad_accum turns a preset's token budget off
    assert load_train_config("gpt2", overrides=["grad_accum=4"]).batch_tokens == 0


def test_config_files_json_and_toml(tmp_path):
    (tmp_path / "a.toml").write_text('preset = "cpu"\nlr = 1e-3\nn_layer = 3\n')
    (tmp_path / "b.json").write_text('{"n_embd": 64, "n_head": 2, "warmup_steps": 5}')
    (tmp_path / "bad.json").write_text('{"n_embd": "wide"}')
    toml = load_train_config(config_file=str(tmp_path / "a.toml"), overrides=["n_layer=5"])
    assert (toml.lr, toml.n_layer, toml.block_size) == (1e-3, 5, TRAIN_PRESETS["cpu"]["block_size"])
    assert load_train_config(config_file=str(tmp_path / "b.json")).n_embd == 64
    with pytest.raises(GptwoError, match=r"n_embd='wide' \(in config file .*\) is not an integer"):
        load_train_config(config_file=str(tmp_path / "bad.json"))


def test_schedule_warms_up_then_decays_to_ten_percent():
    config = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the cosine
    assert lr_at(110, config) == pytest.approx(1e-4) and lr_at(500, config) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    decayed, plain = make_optimizer(model, TrainConfig()).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_flops_per_token_matches_hand_count():
    config = GPTConfig.from_preset("gpt2")
    with torch.device("meta"):
        n = GPT(config).num_params()
    assert n == 123_653_376  # GPT-2 small without its position embeddings
    assert flops_per_token(config, n, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024  # ≈ 0.86 GFLOPs per token


def test_train_help_lists_every_config_key():
    result = cli("train", "--help")
    assert result.returncode == 0
    for key in train_fields():
        assert f"  {key}=" in result.stdout
    assert "batch_size * block_size * grad_accum * world_size" in result.stdout
