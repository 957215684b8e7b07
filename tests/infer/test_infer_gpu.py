"""Decoding on CUDA (run by experiments/gpu.sh): bf16 and fp32 match the eager CPU reference,
CUDA graphs match eager."""

from __future__ import annotations

import copy

import pytest
import torch

from gptwo import GPT, GPTConfig
from gptwo.infer import Decoder, prepare_model

pytestmark = pytest.mark.gpu
CONFIG = GPTConfig(vocab_size=128, block_size=64, n_layer=2, n_head=4, n_embd=64)


def random_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def test_fp32_decoding_on_cuda_gives_the_cpu_tokens():
    model = random_model()
    idx = torch.randint(0, CONFIG.vocab_size, (4, 6))
    expected = Decoder(model, batch_size=4).generate(idx, 20)
    on_gpu = prepare_model(copy.deepcopy(model).cuda(), dtype="fp32")
    assert torch.equal(Decoder(on_gpu, batch_size=4).generate(idx.cuda(), 20).cpu(), expected)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decoding_on_cuda_equals_eager(mode):
    model = prepare_model(random_model().cuda(), dtype="bf16")
    idx = torch.randint(0, CONFIG.vocab_size, (2, 5), device="cuda")
    eager = Decoder(model, batch_size=2, max_len=40).generate(idx, 24)
    compiled = Decoder(model, batch_size=2, max_len=40, compile=mode).generate(idx, 24)
    assert torch.equal(compiled, eager)


def test_bf16_logits_on_cuda_stay_close_to_fp32():
    model = random_model()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 32))
    with torch.no_grad():
        expected = model(idx)[:, -1]
        got = (
            Decoder(prepare_model(copy.deepcopy(model).cuda(), dtype="bf16"), batch_size=2)
            .forward(idx.cuda(), 0)
            .float()
            .cpu()
        )
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
