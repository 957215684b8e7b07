"""gptwo's native CPU kernels: each GEMV against torch on odd shapes, the one-call decode step against the
model's forward, int8 through the step on a trained model, and the fallback when no compiler is found.

The kernel tests run once per instruction set this CPU runs (`isa` fixture: GPTWO_KERNEL_ISA), so an
AVX-512 machine tests its AVX2 and generic builds too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from infer_fixtures import train_small_model

from gptwo import GPT, GPTConfig
from gptwo.errors import GptwoError
from gptwo.infer import Decoder, native, prepare_model
from gptwo.infer.linear import NativeLinear, TransposedLinear, quantize_int8

needs_kernels = pytest.mark.skipif(
    native.library() is None, reason="the native kernels do not build on this machine (see the note on stderr)"
)
RUNNABLE_ISAS = [isa for isa, why in native.isa_support().items() if why is None]


@pytest.fixture(params=RUNNABLE_ISAS)
def isa(request, monkeypatch):
    """Each instruction set this CPU runs, forced through GPTWO_KERNEL_ISA (the build must succeed on each)."""
    monkeypatch.setenv("GPTWO_KERNEL_ISA", request.param)
    assert native.library() is not None, native.why_off()
    return request.param


SHAPES = [
    (1, 77, 45),
    (3, 200, 33),
    (5, 768, 130),
    (16, 1000, 7),
    (2, 64, 4),
]  # (M, K, N): K, N off multiples of 16 and 64, M > 1


def odd_model(seed: int = 0, n_embd: int = 72, block_size: int = 96) -> GPT:
    """A GPT whose width (72) and head size (18) are not multiples of 16, with non-trivial LayerNorms and biases."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=101, block_size=block_size, n_layer=2, n_head=4, n_embd=n_embd)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@needs_kernels
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_float_kernels_match_torch(isa, M, K, N):
    x, w, b = torch.randn(M, K), torch.randn(N, K) * 0.05, torch.randn(N)
    torch.testing.assert_close(native.linear(native.F32, w, None, b, x), x @ w.t() + b, rtol=1e-5, atol=1e-4)
    wb = w.bfloat16()
    reference = x @ wb.float().t() + b  # bf16 weights widened exactly; only the sum order differs
    torch.testing.assert_close(native.linear(native.BF16, wb, None, b, x), reference, rtol=1e-5, atol=1e-4)
    # vdpbf16ps also rounds the activations to bf16 (relative error <= 2^-8 per element)
    bound = (x.abs() @ wb.float().abs().t()) * 2.0**-8 + 1e-4
    assert torch.all((native.linear(native.BF16_DP, wb, None, b, x) - reference).abs() <= bound)


@needs_kernels
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_int8_kernels_match_the_dequantized_weights(isa, M, K, N):
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    q, scales = quantize_int8(w)
    dequantized = q.float() * scales[:, None]
    reference = x @ dequantized.t() + b
    torch.testing.assert_close(native.linear(native.I8, q, scales, b, x), reference, rtol=1e-5, atol=1e-3)
    # vpdpbusd: activations rounded to int8 per block of 64, so each is off by at most its block's max / 254
    padded = F.pad(x.abs(), (0, -K % 64)).view(M, -1, 64)
    step = padded.amax(-1, keepdim=True).expand_as(padded).reshape(M, -1)[:, :K] / 254
    bound = step @ dequantized.abs().t() * 1.001 + 1e-3
    assert torch.all((native.linear(native.I8_VNNI, q, scales, b, x) - reference).abs() <= bound)
    # vpdpwssd: activations rounded to int16 per token (15 bits), each off by at most the row's max / 32766
    bound = x.abs().amax(1, keepdim=True) / 32766 * dequantized.abs().sum(1) * 1.001 + 1e-3
    assert torch.all((native.linear(native.I8_W16, q, scales, b, x) - reference).abs() <= bound)


@needs_kernels
@pytest.mark.parametrize(
    "options", [{"dtype": "fp32"}, {"dtype": "bf16"}, {"quantize": "int8"}], ids=["fp32", "bf16", "int8"]
)
def test_the_native_step_gives_the_forward_logits_at_prefill_and_each_step(isa, options):
    model = odd_model()
    prepared = prepare_model(copy.deepcopy(model), **options)
    decoder = Decoder(prepared, max_len=96)
    assert decoder.native is not None and isinstance(prepared.lm_head, NativeLinear)
    seq = torch.randint(0, 101, (1, 80))
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if options == {"dtype": "fp32"} else {"rtol": 0.05, "atol": 0.05}
    with torch.no_grad():
        torch.testing.assert_close(
            decoder.forward(seq[:, :70], 0), model(seq[:, :70])[:, -1], **tolerance
        )  # two C calls: 64 + 6
        for t in range(70, 80):
            torch.testing.assert_close(
                decoder.forward(seq[:, t : t + 1], t), model(seq[:, : t + 1])[:, -1], **tolerance
            )


@needs_kernels
@pytest.mark.parametrize("n_embd", [20, 44])
def test_int8_on_a_width_off_multiples_of_8_decodes_finite_logits_near_the_forward(isa, n_embd):
    """Widths that are not multiples of 8 or 16 (heads of 5 and 11): the kernels' tails, not NaN or a crash."""
    model = odd_model(n_embd=n_embd)
    decoder = Decoder(prepare_model(copy.deepcopy(model), quantize="int8"), max_len=96)
    assert decoder.native is not None
    seq = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        for t in range(30, 40):
            got = decoder.forward(seq[:, : t + 1], 0) if t == 30 else decoder.forward(seq[:, t : t + 1], t)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, model(seq[:, : t + 1])[:, -1], rtol=0.02, atol=0.02)


@needs_kernels
def test_native_greedy_tokens_equal_the_generate_loop(isa):
    model = odd_model()
    idx = torch.randint(0, 101, (1, 7))
    decoder = Decoder(prepare_model(copy.deepcopy(model), dtype="fp32"), max_len=96)
    assert decoder.native is not None
    assert torch.equal(decoder.generate(idx, 60), model.generate(idx, 60, temperature=0))


@needs_kernels
def test_a_prepared_model_generates_through_the_native_step_and_slides_past_its_context():
    model = odd_model(block_size=32)
    prepared = prepare_model(copy.deepcopy(model), dtype="fp32")
    idx = torch.randint(0, 101, (1, 20))
    assert torch.equal(
        prepared.generate(idx, 40, temperature=0), model.generate(idx, 40, temperature=0)
    )  # 60 > 32: the cache restarts


@needs_kernels
def test_the_native_step_refuses_what_would_read_outside_its_buffers(isa):
    decoder = Decoder(prepare_model(odd_model(), dtype="fp32"), max_len=16)
    with pytest.raises(GptwoError, match="vocabulary"):
        decoder.forward(torch.tensor([[5, 101]]), 0)
    with pytest.raises(GptwoError, match="slots"):
        decoder.native(torch.tensor([[5, 6]]), 15)


@needs_kernels
def test_native_linears_take_many_rows_through_torch_and_few_through_the_kernel():
    model = odd_model()
    prepared = prepare_model(copy.deepcopy(model), dtype="fp32")
    for rows in (1, 40):  # 40 > NATIVE_MAX_ROWS: torch's matmul on the same weights
        seq = torch.randint(0, 101, (1, rows))
        torch.testing.assert_close(prepared(seq), model(seq), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, tokenizer, held_out = train_small_model(str(tmp_path_factory.mktemp("trained")))
    ids = torch.tensor(tokenizer.encode(held_out))
    return model, tokenizer, held_out, ids[: (len(ids) // 64) * 64].view(-1, 64)[:4]


def stepwise_perplexity(decoder: Decoder, windows: torch.Tensor) -> float:
    """Perplexity from the decoder's one-token steps (the native step at batch 1), window by window."""
    losses = []
    with torch.no_grad():
        for window in windows:
            logits = torch.cat([decoder.forward(window[None, t : t + 1], t) for t in range(len(window) - 1)])
            losses.append(F.cross_entropy(logits.float(), window[1:]))
    return float(torch.exp(torch.stack(losses).mean()))


@needs_kernels
@pytest.mark.parametrize("int8_kernel", ["widen", "vnni", "w16"])
def test_int8_through_the_native_step_keeps_perplexity_and_greedy_tokens(trained, monkeypatch, int8_kernel):
    model, tokenizer, held_out, windows = trained
    monkeypatch.setenv("GPTWO_NATIVE_INT8", int8_kernel)
    fp32 = Decoder(prepare_model(copy.deepcopy(model), dtype="fp32"), max_len=64)
    int8 = Decoder(prepare_model(copy.deepcopy(model), quantize="int8"), max_len=64)
    assert (
        int8.native is not None
        and int8.model.lm_head.kind == {"widen": native.I8, "vnni": native.I8_VNNI, "w16": native.I8_W16}[int8_kernel]
    )
    assert abs(stepwise_perplexity(int8, windows) / stepwise_perplexity(fp32, windows) - 1) < 0.01
    same = total = 0
    for sentence in held_out.split(".")[:8]:
        idx = torch.tensor([tokenizer.encode(sentence.strip() + ".")[:6]])
        expected, got = model.generate(idx, 40, temperature=0)[0, 6:], int8.generate(idx, 40)[0, 6:]
        same, total = same + int((expected == got).sum()), total + len(expected)
    assert same / total >= 0.9


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """The kernel loader forgets what it loaded, builds into an empty cache, and forgets again afterwards."""
    monkeypatch.setenv("GPTWO_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("GPTWO_NATIVE", raising=False)  # the suite may run under GPTWO_NATIVE=0 or a forced ISA
    monkeypatch.delenv("GPTWO_KERNEL_ISA", raising=False)
    native.reset()
    yield monkeypatch
    native.reset()


def test_without_a_compiler_decoding_falls_back_to_torch_and_says_so(fresh_kernels, capsys):
    fresh_kernels.setenv("CC", "/nonexistent/cc")
    model = odd_model()
    prepared = prepare_model(copy.deepcopy(model), dtype="fp32")
    assert "native CPU kernels are off (no C compiler" in capsys.readouterr().err
    assert isinstance(prepared.lm_head, TransposedLinear)
    decoder = Decoder(prepared, max_len=40)
    assert decoder.native is None
    idx = torch.randint(0, 101, (1, 5))
    assert torch.equal(decoder.generate(idx, 20), model.generate(idx, 20, temperature=0))


def test_gptwo_native_0_forces_the_torch_path_quietly(fresh_kernels, capsys):
    fresh_kernels.setenv("GPTWO_NATIVE", "0")
    prepared = prepare_model(odd_model(), quantize="int8")
    assert not any(isinstance(m, NativeLinear) for m in prepared.modules())
    err = capsys.readouterr().err
    assert (
        "kernels are off" not in err and "compiling" not in err
    )  # only the slow-precision note, on a CPU without native bf16


@needs_kernels
def test_a_fresh_build_lands_in_the_cache_once(fresh_kernels, tmp_path):
    assert native.library() is not None
    built = sorted((tmp_path / "kernels").glob("gptwo_kernels_*"))  # the library and its checksum
    native.reset()
    assert (
        native.library() is not None and sorted((tmp_path / "kernels").glob("*")) == built
    )  # reused, no temporary left


@pytest.mark.parametrize("options", [{"dtype": "bf16"}, {"quantize": "int8"}], ids=["bf16", "int8"])
def test_a_precision_slower_than_fp32_here_says_so_once_and_still_works(fresh_kernels, capsys, options):
    from gptwo.infer import prepare as prepare_module

    fresh_kernels.setenv("GPTWO_NATIVE", "0")
    fresh_kernels.setattr(native, "native_bf16", lambda: False)  # a CPU without AVX-512 BF16 or AMX
    fresh_kernels.setattr(prepare_module, "_noted", set())
    model = odd_model()
    idx = torch.randint(0, 101, (1, 5))
    for _ in range(2):
        prepared = prepare_model(copy.deepcopy(model), **options)
    err = capsys.readouterr().err
    assert err.count("slower than fp32") == 1 and "use --dtype fp32" in err and "GPTWO_NATIVE=0" in err
    if "quantize" in options:  # torch's int8 kernel then multiplies fp32 activations: exact weight-only int8
        assert prepared.lm_head.scales.dtype == torch.float32
    assert torch.equal(Decoder(prepared, max_len=40).generate(idx, 8)[:, :5], idx)
    fresh_kernels.setattr(native, "native_bf16", lambda: True)
    fresh_kernels.setattr(prepare_module, "_noted", set())
    prepare_model(copy.deepcopy(model), **options)
    assert "slower than fp32" not in capsys.readouterr().err  # native bf16 matmuls: nothing to say
