"""gptwo's native CPU kernels: each GEMV against torch on odd shapes; the paged decode step (`NativeStep`)
against the model's plain forward at batch 1, over ragged batches with random block tables, forked
sequences and batches split across calls, greedily, and its refusals; int8 through the step on a trained
model; and the fallback when no compiler is found.

The kernel tests run once per instruction set this CPU runs (`isa` fixture: GPTWO_KERNEL_ISA), so an
AVX-512 machine tests its AVX2 and generic builds too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from infer_fixtures import perplexity, train_small_model

from gptwo import GPT, GPTConfig
from gptwo.errors import GptwoError
from gptwo.infer import native, prepare_model
from gptwo.infer.kvcache import PagedKVCache, blocks_for
from gptwo.infer.linear import NativeLinear, TransposedLinear, quantize_int8
from gptwo.infer.native import NativeStep
from gptwo.infer.step import DecodeStep, StepInput, make_step

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


PRECISIONS = {  # prepare_model options, tolerance against the unprepared fp32 model
    "fp32": ({"dtype": "fp32"}, {"rtol": 1e-4, "atol": 1e-4}),
    "bf16": ({"dtype": "bf16"}, {"rtol": 0.05, "atol": 0.05}),
    "int8": ({"quantize": "int8"}, {"rtol": 0.05, "atol": 0.05}),
}
FP32 = PRECISIONS["fp32"][1]


def native_step(model: GPT, options: dict, num_blocks: int = 40, max_tokens: int | None = None) -> NativeStep:
    """The native step of a prepared copy of `model` over a fresh paged cache (no prefix caching)."""
    prepared = prepare_model(copy.deepcopy(model), **options)
    assert NativeStep.supports(prepared) and isinstance(prepared.lm_head, NativeLinear)
    cache = PagedKVCache(model.config, num_blocks, NativeStep.cache_dtype, "cpu", prefix_caching=False)
    return NativeStep(prepared, cache, max_tokens=max_tokens)


def forward(model: GPT, tokens: list[int]) -> torch.Tensor:
    """Logits (T, vocab) of every position of one sequence, from the model's plain forward."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


def dealt_tables(lengths: list[int], num_blocks: int, seed: int) -> list[list[int]]:
    """Block tables for sequences of these lengths, dealt from a random permutation of the usable blocks:
    non-contiguous, out of order and interleaved between sequences."""
    order = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    tables = []
    for length in lengths:
        n = blocks_for(length)
        tables.append(order[:n])
        order = order[n:]
    return tables


@needs_kernels
@pytest.mark.parametrize("precision", PRECISIONS)
def test_batch_1_prefill_then_decode_gives_the_forward_logits(isa, precision):
    model = odd_model()
    options, tolerance = PRECISIONS[precision]
    step = native_step(model, options)
    cache, tokens = step.cache, torch.randint(0, 101, (80,)).tolist()
    expected = forward(model, tokens)
    seq = cache.start([])
    cache.grow(seq, 70)
    got = step(StepInput([tokens[:70]], [0], [seq.blocks]))  # one call; attention in three query blocks
    cache.commit(seq, tokens[:70])
    torch.testing.assert_close(got, expected[69:70], **tolerance)
    for t in range(70, 80):
        cache.grow(seq, t + 1)
        got = step(StepInput([[tokens[t]]], [t], [seq.blocks]))
        cache.commit(seq, [tokens[t]])
        torch.testing.assert_close(got, expected[t : t + 1], **tolerance)


@needs_kernels
@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_ragged_batch_over_random_block_tables_gives_each_sequence_its_forward_logits(isa, precision):
    """A prompt chunk continuing a cached prefix (every row scored) beside single decode tokens and a fresh
    prompt, in one call, over random non-contiguous tables; the prefixes themselves went in as one ragged call."""
    model = odd_model(seed=1)
    options, tolerance = PRECISIONS[precision]
    step = native_step(model, options)
    seqs = [torch.randint(0, 101, (n,)).tolist() for n in (33, 41, 6, 9)]
    cached = [20, 40, 5, 0]  # the chunk: tokens 20..32 of the first; one token each; all 9 of the last
    tables = dealt_tables([len(s) for s in seqs], step.cache.num_blocks, seed=len(precision))
    got = step(StepInput([s[:n] for s, n in zip(seqs[:3], cached)], [0, 0, 0], tables[:3]))
    expected = torch.stack([forward(model, s[:n])[-1] for s, n in zip(seqs, cached[:3])])
    torch.testing.assert_close(got, expected, **tolerance)
    batch = StepInput([s[n:] for s, n in zip(seqs, cached)], cached, tables, every=[True, False, False, False])
    got = step(batch)
    expected = torch.cat([forward(model, seqs[0])[20:], *(forward(model, s)[-1:] for s in seqs[1:])])
    assert got.shape == (len(batch.output_rows()), 101) == (13 + 3, 101)
    torch.testing.assert_close(got, expected, **tolerance)


@needs_kernels
def test_forked_sequences_read_their_shared_prompt_blocks_and_diverge_in_their_own(isa):
    model = odd_model(seed=2)
    step = native_step(model, PRECISIONS["fp32"][0])
    cache, prompt = step.cache, torch.randint(0, 101, (21,)).tolist()  # one full block and 5 tokens of the next
    first = cache.start([])
    cache.grow(first, 21)
    step(StepInput([prompt], [0], [first.blocks]))
    cache.commit(first, prompt)
    second = cache.fork(first)
    shared = cache.k[:, first.blocks[0]].clone()
    continuations = [torch.randint(0, 101, (6,)).tolist() for _ in range(2)]
    for t in range(6):
        for seq in (first, second):
            cache.grow(seq, 21 + t + 1)  # the shared, partly filled block is copied before either writes it
        got = step(StepInput([[c[t]] for c in continuations], [21 + t] * 2, [first.blocks, second.blocks]))
        for seq, c in zip((first, second), continuations):
            cache.commit(seq, [c[t]])
        expected = torch.stack([forward(model, prompt + c[: t + 1])[-1] for c in continuations])
        torch.testing.assert_close(got, expected, **FP32)
    assert first.blocks[0] == second.blocks[0] and first.blocks[1] != second.blocks[1]
    assert torch.equal(cache.k[:, first.blocks[0]], shared)  # the shared block was read, never written


@needs_kernels
def test_a_batch_longer_than_one_call_runs_as_several_calls_in_order(isa):
    """16 tokens a call: a 50-token prompt (every row scored) is split 16 + 16 + 16 + 2, later pieces
    reading the earlier ones' keys from the cache, with a second sequence sharing the last call."""
    model = odd_model(seed=3)
    step = native_step(model, PRECISIONS["fp32"][0], max_tokens=16)
    long, short = torch.randint(0, 101, (50,)).tolist(), torch.randint(0, 101, (3,)).tolist()
    tables = dealt_tables([50, 3], step.cache.num_blocks, seed=3)
    got = step(StepInput([long, short], [0, 0], tables, every=[True, False]))
    torch.testing.assert_close(got, torch.cat([forward(model, long), forward(model, short)[-1:]]), **FP32)


def greedy(step: DecodeStep, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of several prompts decoded together, one ragged call per token."""
    cache = step.cache
    seqs = [cache.start([]) for _ in prompts]
    for seq, prompt in zip(seqs, prompts):
        cache.grow(seq, len(prompt) + new_tokens)
    new = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    starts = [0] * len(prompts)
    for _ in range(new_tokens):
        picks = step(StepInput(new, starts, [s.blocks for s in seqs])).argmax(-1).tolist()
        starts = [start + len(n) for start, n in zip(starts, new)]
        for o, pick in zip(out, picks):
            o.append(pick)
        new = [[pick] for pick in picks]
    for seq in seqs:
        cache.release(seq)
    return out


def forward_greedy(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by the plain forward over the whole sequence at each token."""
    seq = list(prompt)
    for _ in range(new_tokens):
        seq.append(int(forward(model, seq)[-1].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def greedy_reference() -> tuple[GPT, list[list[int]], list[list[int]]]:
    """A model, three prompts of different lengths and their 20-token greedy continuations by the plain forward."""
    model = odd_model()
    prompts = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 3, 12)]
    return model, prompts, [forward_greedy(model, p, 20) for p in prompts]


@needs_kernels
def test_greedy_tokens_of_a_ragged_batch_equal_the_plain_forwards(isa, greedy_reference):
    model, prompts, expected = greedy_reference
    assert greedy(native_step(model, PRECISIONS["fp32"][0]), prompts, 20) == expected


@needs_kernels
@pytest.mark.parametrize("n_embd", [20, 44])
def test_int8_on_a_width_off_multiples_of_8_decodes_finite_logits_near_the_forward(isa, n_embd):
    """Widths that are not multiples of 8 or 16 (heads of 5 and 11): the kernels' tails, not NaN or a crash."""
    model = odd_model(n_embd=n_embd)
    step = native_step(model, {"quantize": "int8"})
    tokens = torch.randint(0, 101, (40,)).tolist()
    expected, seq = forward(model, tokens), step.cache.start([])
    step.cache.grow(seq, 40)
    for t in range(30, 40):
        start = 0 if t == 30 else t  # a 31-token prompt, then one token at a time
        got = step(StepInput([tokens[start : t + 1]], [start], [seq.blocks]))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected[t : t + 1], rtol=0.02, atol=0.02)


@needs_kernels
def test_bad_input_is_refused_with_a_gptwo_error_and_leaves_the_cache_alone(isa):
    """8 tokens a call: a batch split into several calls is refused whole, before its first call writes."""
    step = native_step(odd_model(), PRECISIONS["fp32"][0], num_blocks=8, max_tokens=8)
    cache = step.cache
    seq = cache.start([])
    cache.grow(seq, 20)  # two blocks
    step(StepInput([[1, 2, 3]], [0], [seq.blocks]))
    k, v = cache.k.clone(), cache.v.clone()
    refusals = {
        "block id 8 of 8": (StepInput([[5] * 14], [3], [[seq.blocks[0], 8]]), "block table"),
        "block id -1": (StepInput([[5]], [3], [[-1]]), "block table"),
        "the null block": (StepInput([[5]], [3], [[0]]), "ids 1..7"),
        "a table too short": (StepInput([[5] * 14], [3], [seq.blocks[:1]]), "positions up to 17"),
        "a token id >= vocab": (StepInput([[5, 101]], [3], [seq.blocks]), "token id 101 of sequence 0"),
        "a negative token id": (StepInput([[5], [-1]], [3, 0], [seq.blocks, seq.blocks]), "token id -1 of sequence 1"),
        "positions past the context": (StepInput([[5, 6]], [95], [seq.blocks * 3]), "context of 96"),
        "a negative start": (StepInput([[5]], [-1], [seq.blocks]), "position -1"),
        "no tokens": (StepInput([[5], []], [3, 0], [seq.blocks, seq.blocks]), "brings no tokens"),
        "a bad token in a later call": (StepInput([[5] * 10 + [101]], [3], [seq.blocks]), "token id 101"),
        "a token that is no int": (StepInput([[5, 2.5]], [3], [seq.blocks]), "int64 integers"),
        "a token id past int64": (StepInput([[5, 2**70]], [3], [seq.blocks]), "int64 integers"),
    }
    for what, (batch, message) in refusals.items():
        with pytest.raises(GptwoError, match=message):
            step(batch)
        # blocks never handed out hold whatever the allocator left (NaN included): compare bit for bit
        assert torch.equal(cache.k.view(torch.int32), k.view(torch.int32)), what
        assert torch.equal(cache.v.view(torch.int32), v.view(torch.int32)), what


@needs_kernels
def test_a_cache_the_c_step_cannot_read_is_refused():
    model = prepare_model(odd_model(), dtype="fp32")
    other_shape = odd_model(n_embd=36).config
    for config, dtype in ((model.config, torch.bfloat16), (other_shape, torch.float32)):
        cache = PagedKVCache(config, 4, dtype, "cpu", prefix_caching=False)
        with pytest.raises(GptwoError, match="fp32 CPU KV cache of shape"):
            NativeStep(model, cache)


@needs_kernels
def test_native_linears_take_many_rows_through_torch_and_few_through_the_kernel():
    model = odd_model()
    prepared = prepare_model(copy.deepcopy(model), dtype="fp32")
    for rows in (1, 40):  # 40 > NATIVE_MAX_ROWS: torch's matmul on the same weights
        seq = torch.randint(0, 101, (1, rows))
        torch.testing.assert_close(prepared(seq), model(seq), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained model, four held-out windows of 64 tokens with their perplexity under the plain forward, and
    eight 6-token prompts with their 40-token greedy continuations by the plain forward."""
    model, tokenizer, held_out = train_small_model(str(tmp_path_factory.mktemp("trained")))
    ids = torch.tensor(tokenizer.encode(held_out))
    windows = ids[: (len(ids) // 64) * 64].view(-1, 64)[:4]
    prompts = [tokenizer.encode(sentence.strip() + ".")[:6] for sentence in held_out.split(".")[:8]]
    return model, windows, perplexity(model, windows), prompts, [forward_greedy(model, p, 40) for p in prompts]


def stepwise_perplexity(step: NativeStep, windows: torch.Tensor) -> float:
    """Perplexity from the native step's one-token calls, the windows decoding side by side."""
    rows = windows.tolist()
    seqs = [step.cache.start([]) for _ in rows]
    for seq, row in zip(seqs, rows):
        step.cache.grow(seq, len(row))
    tables = [seq.blocks for seq in seqs]
    logits = [step(StepInput([[row[t]] for row in rows], [t] * len(rows), tables)) for t in range(windows.shape[1] - 1)]
    for seq in seqs:
        step.cache.release(seq)
    loss = F.cross_entropy(torch.stack(logits, 1).flatten(0, 1), windows[:, 1:].flatten())
    return float(torch.exp(loss))


@needs_kernels
@pytest.mark.parametrize("int8_kernel", ["widen", "vnni", "w16"])
def test_int8_through_the_native_step_keeps_perplexity_and_greedy_tokens(trained, monkeypatch, int8_kernel):
    model, windows, fp32_perplexity, prompts, expected = trained
    monkeypatch.setenv("GPTWO_NATIVE_INT8", int8_kernel)
    int8 = native_step(model, {"quantize": "int8"}, num_blocks=25)  # 8 prompts of 46 tokens
    kind = {"widen": native.I8, "vnni": native.I8_VNNI, "w16": native.I8_W16}[int8_kernel]
    assert int8.dims[5] == kind  # D_KIND: the step runs the kernel asked for
    assert abs(stepwise_perplexity(int8, windows) / fp32_perplexity - 1) < 0.01
    got = greedy(int8, prompts, 40)
    same = sum(a == b for e, g in zip(expected, got) for a, b in zip(e, g))
    assert same / (len(prompts) * 40) >= 0.9


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
    assert isinstance(prepared.lm_head, TransposedLinear) and not NativeStep.supports(prepared)
    step = make_step(prepared)
    assert not isinstance(step, NativeStep)
    prompt = torch.randint(0, 101, (5,)).tolist()
    assert greedy(step, [prompt], 20) == [forward_greedy(model, prompt, 20)]


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
    for _ in range(2):
        prepared = prepare_model(copy.deepcopy(model), **options)
    err = capsys.readouterr().err
    assert err.count("slower than fp32") == 1 and "use --dtype fp32" in err and "GPTWO_NATIVE=0" in err
    if "quantize" in options:  # torch's int8 kernel then multiplies fp32 activations: exact weight-only int8
        assert prepared.lm_head.scales.dtype == torch.float32
    tokens = greedy(make_step(prepared), [torch.randint(0, 101, (5,)).tolist()], 8)[0]
    assert len(tokens) == 8 and all(0 <= t < 101 for t in tokens)
    fresh_kernels.setattr(native, "native_bf16", lambda: True)
    fresh_kernels.setattr(prepare_module, "_noted", set())
    prepare_model(copy.deepcopy(model), **options)
    assert "slower than fp32" not in capsys.readouterr().err  # native bf16 matmuls: nothing to say
