"""LoRA adapters in peft's format: peft reads gptwo's, gptwo reads peft's, with the same logits either way."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gptwo import GPT, GPTConfig
from gptwo.errors import GptwoError
from gptwo.lora import LoraSettings, apply_lora, lora_layers, merge, read_adapter, save_adapter, unmerge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CONFIG = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32)
IDS = torch.tensor([[5, 17, 3, 90, 41, 8, 8, 60], [1, 2, 3, 4, 5, 6, 7, 9]])
TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture
def base_dir(tmp_path) -> str:
    torch.manual_seed(0)
    GPT(CONFIG).save_pretrained(str(tmp_path / "base"))
    return str(tmp_path / "base")


def hf_model(base_dir: str):
    return transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """Nonzero A and B (B starts at zero), so the adapter changes every targeted layer's output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def gptwo_logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS)


def test_peft_loads_gptwos_adapter_and_gives_gptwos_logits(base_dir, tmp_path):
    model = GPT.from_pretrained(base_dir)
    settings = LoraSettings(rank=4, alpha=8.0, targets=tuple(TARGETS))
    apply_lora(model, settings)
    assert len(lora_layers(model)) == 4 * CONFIG.n_layer  # c_proj is the attention's and the MLP's
    randomize_adapters(model, seed=1)
    adapter = str(tmp_path / "adapter")
    save_adapter(adapter, settings, model.state_dict(), base_model=base_dir)
    ours = gptwo_logits(model)

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["fan_in_fan_out"] is True  # GPT-2's Conv1D
    theirs_model = peft.PeftModel.from_pretrained(hf_model(base_dir), adapter).eval()
    with torch.no_grad():
        theirs = theirs_model(IDS).logits
        plain = hf_model(base_dir)(IDS).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(gptwo_logits(GPT.from_pretrained(base_dir, adapter=adapter)), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_peft_made_adapter_gives_pefts_logits_in_gptwo_merged_and_unmerged(base_dir, tmp_path, use_rslora):
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=TARGETS, fan_in_fan_out=True, use_rslora=use_rslora, lora_dropout=0.1
    )
    made = peft.get_peft_model(hf_model(base_dir), config)
    randomize_adapters(made, seed=2)
    adapter = str(tmp_path / "peft-adapter")
    made.save_pretrained(adapter)
    with torch.no_grad():
        theirs = made.eval()(IDS).logits

    merged = GPT.from_pretrained(base_dir, adapter=adapter, merge=True)
    unmerged = GPT.from_pretrained(base_dir, adapter=adapter)  # the default
    assert not lora_layers(merged) and len(lora_layers(unmerged)) == 8
    assert merged.lm_head.weight is merged.transformer.wte.weight
    assert unmerged.lm_head.weight is unmerged.transformer.wte.weight
    torch.testing.assert_close(gptwo_logits(merged), theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(gptwo_logits(unmerged), theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(gptwo_logits(merged), gptwo_logits(unmerged), atol=1e-5, rtol=0)


def test_merge_then_unmerge_restores_the_base_and_the_outputs(base_dir, tmp_path):
    model = GPT.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraSettings(rank=2, alpha=4.0))
    randomize_adapters(model, seed=3)
    unmerged = gptwo_logits(model)
    merge(model)
    torch.testing.assert_close(gptwo_logits(model), unmerged, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(gptwo_logits(model), unmerged, atol=1e-5, rtol=0)
    after = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, atol=1e-6, rtol=0)


def test_saving_an_unmerged_model_saves_it_merged_for_transformers(base_dir, tmp_path):
    unmerged = GPT.from_pretrained(base_dir)
    apply_lora(unmerged, LoraSettings(rank=2, alpha=2.0, targets=("c_attn",)))
    randomize_adapters(unmerged, seed=4)
    unmerged.save_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        theirs = hf_model(str(tmp_path / "merged"))(IDS).logits
    torch.testing.assert_close(gptwo_logits(unmerged), theirs, atol=1e-4, rtol=0)


def test_bad_adapters_are_one_line_errors(base_dir, tmp_path):
    with pytest.raises(GptwoError, match="does not exist"):
        GPT.from_pretrained(base_dir, adapter=str(tmp_path / "nope"))
    made = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    made.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(GptwoError, match="use_dora"):
        read_adapter(str(tmp_path / "dora"))
    other = str(tmp_path / "wide")  # an adapter of a wider model
    wide = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=64))
    apply_lora(wide, LoraSettings(rank=2, alpha=2.0))
    save_adapter(other, LoraSettings(rank=2, alpha=2.0), wide.state_dict())
    with pytest.raises(GptwoError, match="base model it was trained from"):
        GPT.from_pretrained(base_dir, adapter=other)
    with pytest.raises(GptwoError, match="name none of"):
        apply_lora(GPT(CONFIG), LoraSettings(rank=2, alpha=2.0, targets=("lm_head",)))
