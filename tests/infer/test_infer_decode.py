"""The static-cache decoder: its logits equal the model's forward, compiled and eager give the same tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from gptwo import GPT, GPTConfig
from gptwo.errors import GptwoError
from gptwo.infer import Decoder, prepare_model

CONFIG = GPTConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=64)


def random_model(config: GPTConfig = CONFIG, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so every parameter matters
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("options", [{}, {"dtype": "fp32"}, {"quantize": "int8"}], ids=["plain", "transposed", "int8"])
def test_prefill_and_each_step_give_the_forward_logits(options):
    model = random_model()
    prepared = prepare_model(copy.deepcopy(model), **options) if options else model
    decoder = Decoder(prepared, batch_size=2, max_len=40)
    seq = torch.randint(0, CONFIG.vocab_size, (2, 30))
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if "quantize" not in options else {"rtol": 0.05, "atol": 0.05}
    with torch.no_grad():
        torch.testing.assert_close(decoder.forward(seq[:, :20], 0), prepared(seq[:, :20])[:, -1], **tolerance)
        for t in range(20, 30):
            torch.testing.assert_close(
                decoder.forward(seq[:, t : t + 1], t), model(seq[:, : t + 1])[:, -1], **tolerance
            )


def test_greedy_tokens_equal_the_generate_loop():
    model = random_model()
    idx = torch.randint(0, CONFIG.vocab_size, (3, 7))
    assert torch.equal(Decoder(model, batch_size=3).generate(idx, 25), model.generate(idx, 25, temperature=0))


@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}], ids=["fp32", "int8"])
def test_compiled_and_eager_decoding_give_the_same_tokens(options):
    model = prepare_model(
        random_model(GPTConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=32)), **options
    )
    idx = torch.randint(0, 97, (1, 5))
    eager = Decoder(model, max_len=24).generate(idx, 16)
    compiled = Decoder(model, max_len=24, compile=True).generate(idx, 16)
    assert torch.equal(compiled, eager)


def test_frozen_max_autotune_int8_decoding_gives_the_eager_tokens():
    """Weights frozen into the step, the KV cache still written: same tokens as eager, twice in a row
    (~30 s: C++ compiles)."""
    from torch._inductor.utils import run_and_get_code

    model = prepare_model(
        random_model(GPTConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=64)), quantize="int8"
    )
    idx = torch.randint(0, 97, (1, 5))
    eager = Decoder(model, max_len=24).generate(idx, 16)
    frozen = Decoder(model, max_len=24, compile="max-autotune-frozen")
    first, code = run_and_get_code(frozen.generate, idx, 16)
    assert torch.equal(first, eager) and torch.equal(frozen.generate(idx, 16), eager)
    assert "_frozen_param" in "".join(code)  # the weights were folded in as constants, not passed each step
    assert "micro_gemm" in "".join(code)  # the int8 matmuls run Inductor's C++ GEMM template


def test_sampling_is_reproducible_with_a_generator():
    model = random_model()
    idx = torch.randint(0, CONFIG.vocab_size, (1, 4))
    runs = [
        Decoder(model).generate(idx, 12, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_requests_beyond_the_decoder_are_refused():
    decoder = Decoder(random_model(), batch_size=1, max_len=16)
    with pytest.raises(GptwoError, match="exceed"):
        decoder.generate(torch.zeros(1, 10, dtype=torch.long), 10)
    with pytest.raises(GptwoError, match="batch"):
        decoder.generate(torch.zeros(2, 4, dtype=torch.long), 2)
    with pytest.raises(GptwoError, match="temperature"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.long), 2, temperature=-1)
