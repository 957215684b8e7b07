"""The model against transformers' GPT2LMHeadModel: same weights, same logits, same greedy text."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gptwo import GPT, GPTConfig
from gptwo.generate import generate, pad_left

CONFIGS = [
    GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64),
    GPTConfig(vocab_size=1000, block_size=64, n_layer=3, n_head=5, n_embd=320),  # non-square heads
]


def hf_config(config: GPTConfig) -> GPT2Config:
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def random_hf_model(config: GPTConfig, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config(config)).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so every parameter matters
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("config", CONFIGS, ids=["square", "non-square"])
def test_logits_equal_transformers_both_directions(config, tmp_path):
    hf = random_hf_model(config)
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf"))
    idx = torch.randint(0, config.vocab_size, (3, config.block_size))
    with torch.no_grad():
        expected = hf(idx).logits
        assert (ours(idx) - expected).abs().max().item() <= 1e-4
        ours.save_pretrained(str(tmp_path / "ours"))
        back = GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
        assert (back(idx).logits - expected).abs().max().item() <= 1e-4


def test_our_random_model_loads_in_transformers(tmp_path):
    config = CONFIGS[1]
    torch.manual_seed(1)
    ours = GPT(config).eval()
    ours.save_pretrained(str(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    again = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-4
        assert torch.equal(again(idx), ours(idx))


def test_pytorch_model_bin_loads_without_pickle_code(tmp_path):
    config = CONFIGS[0]
    hf = random_hf_model(config, seed=3)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_greedy_generation_equals_transformers_for_50_tokens(tmp_path):
    config = GPTConfig(vocab_size=1000, block_size=128, n_layer=3, n_head=5, n_embd=320)
    hf = random_hf_model(config, seed=5)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path))
    prompt = torch.randint(0, config.vocab_size, (1, 12))
    expected = hf.generate(
        prompt, max_new_tokens=50, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=50
    )
    got = ours.generate(prompt, 50, temperature=0)
    assert got.shape == (1, 62)
    assert torch.equal(got, expected)


def test_kv_cache_equals_full_recomputation():
    torch.manual_seed(0)
    model = GPT(CONFIGS[1]).eval()
    prompt = torch.randint(0, 1000, (2, 7))
    cached = model.generate(prompt, 40, temperature=0)
    full = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    sampled = generate(model, prompt, 40, temperature=0.8, top_k=50, seed=11)
    sampled_full = generate(model, prompt, 40, temperature=0.8, top_k=50, seed=11, use_cache=False)
    assert torch.equal(sampled, sampled_full)


def test_batch_of_different_lengths_equals_one_at_a_time():
    torch.manual_seed(0)
    model = GPT(CONFIGS[1]).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [1, 2, 3]]
    idx, valid = pad_left(prompts, pad_id=0)
    batched = generate(model, idx, 20, temperature=0, valid=valid)[:, idx.shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), 20, temperature=0)[:, len(prompt) :]
        assert torch.equal(batched[row], alone[0])


def test_generation_past_the_context_slides_the_window():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config).eval()
    long_prompt = torch.randint(0, 50, (1, 40))  # longer than the context: the last tokens are kept
    out = model.generate(long_prompt, 30, temperature=0)
    assert out.shape == (1, 70)
    assert torch.equal(out[:, :40], long_prompt)
    # the first new token depends only on the last 3/4 of the context, as documented
    assert out[0, 40] == model(long_prompt[:, -12:])[0, -1].argmax()


def test_initialisation_follows_gpt2():
    config = GPTConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=256)
    torch.manual_seed(0)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(proj - 0.02 / (2 * 8) ** 0.5) < 0.0005
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_presets_match_published_sizes():
    sizes = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, count in sizes.items():
        with torch.device("meta"):
            model = GPT(GPTConfig.from_preset(name))
        assert model.num_params(non_embedding=False) == count, name
