"""Training on CUDA: bf16 autocast steps with the compiled model and fused AdamW, and compiled vs eager logits.

Marked `gpu` and skipped without CUDA (`pytest -m gpu`; experiments/gpu.sh runs them).
"""

from __future__ import annotations

import math

import pytest
import torch
from train_fixtures import TINY, tiny_data, train_losses

from gptwo import GPT, GPTConfig
from gptwo.train.loop import loss_fn, run_training
from gptwo.train.speed import compile_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_compiled_training_steps_learn_and_match_float32(tmp_path):
    steps = ["max_steps=12", "eval_every=12", "checkpoint_every=12", "sample_tokens=0"]
    bf16 = run_training(
        tiny_data(), str(tmp_path / "bf16"), overrides=TINY + steps + ["device=cuda"], progress=False
    )  # auto: bf16, compiled, fused
    fp32 = run_training(
        tiny_data(),
        str(tmp_path / "fp32"),
        overrides=TINY + steps + ["device=cuda", "dtype=float32", "compile=false"],
        progress=False,
    )
    fast, plain = train_losses(str(tmp_path / "bf16")), train_losses(str(tmp_path / "fp32"))
    assert all(math.isfinite(v) for v in fast.values())
    assert fast[12] < fast[1] - 0.5  # it learns
    assert fast[1] == pytest.approx(plain[1], abs=0.05)  # same start, up to bf16 rounding
    assert abs(bf16["val_loss"] - fp32["val_loss"]) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_and_eager_logits_and_gradients_agree(dtype):
    torch.manual_seed(0)
    eager = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)).cuda()
    compiled = GPT(eager.config).cuda()
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    idx = torch.randint(0, 256, (4, 65), device="cuda")
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        a, b = eager(idx[:, :-1]), compiled(idx[:, :-1])
        torch.testing.assert_close(b.float(), a.float(), atol=tolerance, rtol=tolerance)
        loss_fn(eager, idx[:, :-1], idx[:, 1:]).backward()
        loss_fn(compiled, idx[:, :-1], idx[:, 1:]).backward()
    grad_a, grad_b = eager.transformer.h[0].mlp.c_fc.weight.grad, compiled.transformer.h[0].mlp.c_fc.weight.grad
    torch.testing.assert_close(grad_b, grad_a, atol=tolerance * 10, rtol=tolerance * 10)
