"""`gptwo train --init-from BASE lora_rank=R`: only the adapters train, the run folder holds the merged model
(transformers reads it) and the adapter in peft's layout (peft reads it), resume continues exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
from train_fixtures import TINY, tiny_data, train_losses  # noqa: E402

from gptwo import GPT, GPTConfig  # noqa: E402
from gptwo.cli import main  # noqa: E402
from gptwo.errors import GptwoError  # noqa: E402
from gptwo.lora import read_adapter  # noqa: E402
from gptwo.tokenizer import Tokenizer  # noqa: E402
from gptwo.train import checkpoint  # noqa: E402
from gptwo.train.loop import run_training  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LORA = TINY + ["lr=2e-2", "sample_tokens=0", "eval_every=100", "lora_rank=4", "lora_alpha=8"]
TARGETED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IDS = torch.tensor([[5, 17, 3, 90, 41, 8, 8, 60, 200, 7]])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A tiny GPT saved with the training data's tokenizer."""
    data = tiny_data()
    tokenizer = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    torch.manual_seed(0)
    directory = str(tmp_path_factory.mktemp("base"))
    GPT(GPTConfig(vocab_size=tokenizer.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=32)).save_pretrained(
        directory, tokenizer=tokenizer
    )
    return directory


def falls(losses: dict[int, float]) -> float:
    steps = sorted(losses)
    first, last = [losses[s] for s in steps[:3]], [losses[s] for s in steps[-3:]]
    return sum(first) / 3 - sum(last) / 3


def test_a_lora_run_changes_only_the_adapters_and_peft_and_transformers_read_it(base, tmp_path):
    run = str(tmp_path / "run")
    run_training(tiny_data(), run, overrides=LORA + ["max_steps=16"], init_from=base, progress=False)
    assert falls(train_losses(run)) > 0.04

    before, after = (
        load_file(os.path.join(base, "model.safetensors")),
        load_file(os.path.join(run, "model.safetensors")),
    )
    assert set(after) == set(before) and "lm_head.weight" not in after  # the head is the (tied) embedding
    settings, adapter = read_adapter(os.path.join(run, "adapter"))
    assert settings.rank == 4 and settings.scaling == 2.0 and len(adapter) == 2 * 4 * 2
    for name, tensor in before.items():
        if not name.endswith(TARGETED):
            assert torch.equal(after[name], tensor), f"{name} changed"  # frozen, bit for bit
            continue
        layer = name.removesuffix(".weight")
        a, b = adapter[layer + ".lora_A.weight"], adapter[layer + ".lora_B.weight"]
        assert b.abs().max() > 0  # trained
        # the file is HF's Conv1D layout (in, out): the merged update is (scaling·B·A)ᵀ
        torch.testing.assert_close(after[name], tensor + (settings.scaling * b @ a).t(), atol=1e-6, rtol=0)

    hf_merged = transformers.GPT2LMHeadModel.from_pretrained(run).eval()
    assert hf_merged.lm_head.weight.data_ptr() == hf_merged.transformer.wte.weight.data_ptr()
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    with_adapter = peft.PeftModel.from_pretrained(hf_base, os.path.join(run, "adapter")).eval()
    ours = GPT.from_pretrained(base, adapter=os.path.join(run, "adapter"))
    assert ours.lm_head.weight is ours.transformer.wte.weight
    with torch.no_grad():
        theirs = with_adapter(IDS).logits
        torch.testing.assert_close(hf_merged(IDS).logits, theirs, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(IDS), theirs, atol=1e-4, rtol=0)
        torch.testing.assert_close(GPT.from_pretrained(run)(IDS), theirs, atol=1e-4, rtol=0)


def test_adapter_on_generate_and_eval_is_the_merged_run(base, tmp_path, capsys):
    run = str(tmp_path / "run")
    run_training(tiny_data(), run, overrides=LORA + ["max_steps=8"], init_from=base, progress=False)
    adapter = os.path.join(run, "adapter")
    outputs = []
    for model in (["--model", run], ["--model", base, "--adapter", adapter], ["--model", base]):
        assert main(["generate", *model, "--temperature", "0", "--max-new-tokens", "12", "The"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps.", encoding="utf-8")
    reports = []
    for model in (["--model", run], ["--model", base, "--adapter", adapter]):
        assert main(["eval", "ppl", str(text), *model, "--json", "--quiet"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["perplexity"] == pytest.approx(reports[1]["perplexity"], rel=1e-5)
    assert main(["generate", "--model", base, "--adapter", str(tmp_path / "none"), "The"]) == 2
    assert "adapter folder" in capsys.readouterr().err


def test_resume_continues_a_lora_run_exactly(base, tmp_path, monkeypatch):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    settings = LORA + ["max_steps=8", "lora_dropout=0.1"]
    run_training(tiny_data(), straight, overrides=settings, init_from=base, progress=False)
    real_save = checkpoint.save_checkpoint

    def save_then_crash(run_dir, step, *args, **kwargs):
        real_save(run_dir, step, *args, **kwargs)
        if step == 4:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(tiny_data(), resumed, overrides=settings, init_from=base, progress=False)
    monkeypatch.undo()
    run_training(tiny_data(), resumed, resume=True, progress=False)
    assert train_losses(resumed) == train_losses(straight)
    one, two = read_adapter(os.path.join(straight, "adapter"))[1], read_adapter(os.path.join(resumed, "adapter"))[1]
    assert all(torch.equal(one[k], two[k]) for k in one)
    with pytest.raises(GptwoError, match="cannot change lora_rank"):
        run_training(tiny_data(), resumed, overrides=LORA + ["max_steps=10", "lora_rank=8"], resume=True)


@pytest.mark.parametrize(("lora_base", "optimizer"), [("bf16", "adamw"), ("int8", "muon")])
def test_lora_from_a_low_precision_base_trains_and_keeps_the_base(base, tmp_path, lora_base, optimizer):
    run = str(tmp_path / "run")
    overrides = LORA + ["max_steps=16", f"lora_base={lora_base}", f"optimizer={optimizer}", "lora_dropout=0.1"]
    run_training(tiny_data(), run, overrides=overrides, init_from=base, progress=False)
    assert falls(train_losses(run)) > 0.04
    before, after = (
        load_file(os.path.join(base, "model.safetensors")),
        load_file(os.path.join(run, "model.safetensors")),
    )
    # frozen in bf16: the embedding (also the head) and LayerNorms are the base's, rounded to bf16 once
    for name in ("transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.h.1.mlp.c_fc.bias"):
        assert torch.equal(after[name], before[name].to(torch.bfloat16).float())
    merged = GPT.from_pretrained(run)
    assert merged.lm_head.weight is merged.transformer.wte.weight


def test_lora_needs_a_base_model(tmp_path, capsys):
    code = main(["train", "--data", tiny_data(), "--out", str(tmp_path / "run"), *LORA, "max_steps=2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: lora_rank=4 trains adapters on a pretrained model") and "--init-from" in err


def test_lora_under_fsdp_follows_one_process(base, tmp_path):
    """torchrun with 2 CPU processes (gloo), FSDP over a bf16 base: the loss curve of 1 process with grad_accum=2."""
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    settings = LORA + ["max_steps=4", "lora_base=bf16", "checkpoint_every=2"]
    run_training(tiny_data(), single, overrides=settings + ["grad_accum=2"], init_from=base, progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptwo.cli"]
    args = ["train", "--data", tiny_data(), "--out", sharded, "--init-from", base, *settings, "parallel=fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = train_losses(single), train_losses(sharded)
    assert one.keys() == two.keys() and all(abs(one[s] - two[s]) < 1e-3 for s in one)
    adapter_one = read_adapter(os.path.join(single, "adapter"))[1]
    adapter_two = read_adapter(os.path.join(sharded, "adapter"))[1]
    assert all(torch.allclose(adapter_one[k], adapter_two[k], atol=1e-3) for k in adapter_one)
