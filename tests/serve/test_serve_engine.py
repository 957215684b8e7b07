"""The batching engine on its own: rows joining and leaving a shared cache, admission limits."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_testing import tiny_model

from gptwo import Tokenizer
from gptwo.errors import GptwoError
from gptwo.infer import native, prepare_model
from gptwo.infer.native import NativeStep
from gptwo.model import KVCache
from gptwo.serve.engine import BatchEngine, Overloaded, PooledCache, SamplingParams


def next_logits(model, tokens: list[int]) -> torch.Tensor:
    """The reference: next-token logits of `tokens` from one forward pass without any cache."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, -1]


def prefill(model, cache_rows: PooledCache, tokens: list[int]) -> torch.Tensor:
    """Prefill `tokens` alone and hand its keys/values to the pool as a new row; return its next-token logits."""
    cache = KVCache(model.config, 1, len(tokens), dtype=cache_rows.dtype)
    logits = model(torch.tensor([tokens]), cache=cache)[0, -1]
    cache_rows.add_row(cache.k[:, 0], cache.v[:, 0])
    return logits


@torch.no_grad()
def test_rows_that_join_and_leave_see_only_their_own_tokens():
    model = tiny_model(block_size=40, vocab_size=512)
    pool = PooledCache(model.config, torch.device("cpu"), torch.float32)
    seqs = {"a": [5, 6, 7, 8, 9]}
    rows = ["a"]
    torch.testing.assert_close(prefill(model, pool, seqs["a"]), next_logits(model, seqs["a"]), atol=1e-4, rtol=0)

    def step(token: int) -> None:
        logits = pool.decode(model, torch.tensor([token] * len(rows)))
        for row, name in enumerate(rows):
            seqs[name].append(token)
            torch.testing.assert_close(logits[row], next_logits(model, seqs[name]), atol=1e-4, rtol=0)

    for token in (11, 12, 13):
        step(token)
    seqs["b"] = list(range(100, 112))  # longer than the cache so far: every row shifts right
    prefill(model, pool, seqs["b"])
    rows.append("b")
    step(14)
    seqs["c"] = [200, 201]  # shorter: right-aligned, earlier slots invalid
    prefill(model, pool, seqs["c"])
    rows.append("c")
    step(15)
    order = pool.drop_rows([1])  # "b" leaves; "c" moves into its row
    rows = [rows[i] for i in order]
    assert rows == ["a", "c"]
    while len(seqs["a"]) < model.config.block_size:  # "a" fills the context: slots only "b" used get cut
        step(16 + len(seqs["a"]))
    assert pool.length <= model.config.block_size and pool.length == max(pool.spans)


@pytest.mark.skipif(native.library() is None, reason="the native kernels do not build on this machine")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@torch.no_grad()
def test_a_lone_row_decodes_in_one_native_call_and_hands_its_cache_back(dtype):
    model = prepare_model(tiny_model(block_size=40, vocab_size=512), dtype=dtype)
    reference = tiny_model(block_size=40, vocab_size=512)  # float32 math on the same (bf16-rounded) weights
    for param in reference.parameters():
        param.copy_(param.to(model.transformer.wte.weight.dtype))
    engine = BatchEngine(model, Tokenizer.gpt2())
    pool = engine.pool
    assert isinstance(engine.solo, NativeStep) and pool.solo is engine.solo
    # of the largest logit; in bf16 the pool's rows and prefills run torch's bf16 activations (up to 3.4% off
    # here, native steps included, as they read those keys/values), while a stale or misplaced cache is off by more
    tolerance = 1e-4 if dtype == "fp32" else 0.06
    seqs, rows = {"a": [5, 6, 7, 8, 9]}, ["a"]
    prefill(model, pool, seqs["a"])

    def step(token: int, solo: bool) -> None:
        logits = pool.decode(model, torch.tensor([token] * len(rows)))
        assert (pool.solo_len is not None) == solo
        for row, name in enumerate(rows):
            seqs[name].append(token)
            expected = next_logits(reference, seqs[name])
            torch.testing.assert_close(
                logits[row].float(), expected, atol=tolerance * expected.abs().max().item(), rtol=0
            )

    for token in (11, 12, 13):
        step(token, solo=True)
    seqs["b"] = list(range(100, 112))  # joins: "a"'s cache goes back into the pool first
    prefill(model, pool, seqs["b"])
    rows.append("b")
    step(14, solo=False)
    rows = [rows[i] for i in pool.drop_rows([0])]  # "a" leaves: "b" is alone, decodes natively again
    assert rows == ["b"]
    step(15, solo=True)
    step(16, solo=True)
    seqs["c"] = [200, 201]
    prefill(model, pool, seqs["c"])
    rows.append("c")
    step(17, solo=False)
    rows = [rows[i] for i in pool.drop_rows([0])]
    while len(seqs["c"]) < model.config.block_size:  # alone up to the full context
        step(18 + len(seqs["c"]), solo=True)
    assert pool.drop_rows([0]) == [] and pool.solo_len is None and pool.rows == 0


@torch.no_grad()
def test_rows_prefilled_together_join_at_once_and_see_only_their_own_tokens():
    """add_rows: left-padded prompts of different lengths, longer and shorter than the running row, join in one copy."""
    from gptwo.generate import pad_left

    model = tiny_model(block_size=40, vocab_size=512)
    pool = PooledCache(model.config, torch.device("cpu"), torch.float32)
    seqs = {"a": [5, 6, 7, 8, 9]}
    prefill(model, pool, seqs["a"])
    pool.decode(model, torch.tensor([10]))
    seqs["a"].append(10)
    joining = {"b": list(range(100, 109)), "c": [200, 201], "d": [300, 301, 302, 303, 304, 305]}
    ids, valid = pad_left(list(joining.values()), 0, torch.device("cpu"))
    cache = KVCache(model.config, len(joining), ids.shape[1])
    logits = model(ids, cache=cache, valid=valid)[:, -1]
    for row, tokens in enumerate(joining.values()):
        torch.testing.assert_close(logits[row], next_logits(model, tokens), atol=1e-4, rtol=0)
    pool.add_rows(cache.k, cache.v, [len(t) for t in joining.values()])
    seqs.update(joining)
    assert pool.rows == 4 and pool.spans == [6, 9, 2, 6] and pool.length == 9
    for token in (20, 21, 22):
        out = pool.decode(model, torch.tensor([token] * 4))
        for row, name in enumerate(seqs):
            seqs[name].append(token)
            torch.testing.assert_close(out[row], next_logits(model, seqs[name]), atol=1e-4, rtol=0)


def test_engine_refuses_what_it_cannot_run_and_bounds_its_queue():
    engine = BatchEngine(
        tiny_model(block_size=32), Tokenizer.gpt2(), max_batch=2, max_queue=3
    )  # never started: nothing leaves the queue

    async def submit_all():
        with pytest.raises(GptwoError, match="maximum context length is 32"):
            engine.submit([[1] * 30], SamplingParams(max_tokens=3))
        with pytest.raises(GptwoError, match="outside the vocabulary"):
            engine.submit([[50257]], SamplingParams(max_tokens=1))
        with pytest.raises(GptwoError, match="more than the queue holds"):
            engine.submit([[1], [2]], SamplingParams(max_tokens=1), n=2)
        engine.submit([[1], [2]], SamplingParams(max_tokens=1))
        with pytest.raises(Overloaded):
            engine.submit([[3], [4]], SamplingParams(max_tokens=1))
        engine.submit([[3]], SamplingParams(max_tokens=1))

    asyncio.run(submit_all())
    assert engine.waiting == 3


def test_engine_step_failure_fails_requests_but_keeps_running():
    model = tiny_model(block_size=32)
    engine = BatchEngine(model, Tokenizer.gpt2())

    async def run(prompt: list[int]):
        job = engine.submit([prompt], SamplingParams(max_tokens=3, temperature=0))
        updates = []
        while not updates or updates[-1].finish_reason is None:
            updates.append(await job.queue.get())
        return updates

    async def scenario():
        original = model.forward
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        failed = await run([1, 2, 3])
        model.forward = original
        return failed, await run([1, 2, 3])

    engine.start()
    try:
        failed, fine = asyncio.run(scenario())
    finally:
        engine.stop()
    assert failed[-1].finish_reason == "error" and "boom" in failed[-1].error
    assert fine[-1].finish_reason == "length" and sum(len(u.tokens) for u in fine) == 3


def test_first_tokens_are_handed_out_before_the_next_decode_step():
    engine = BatchEngine(tiny_model(block_size=32), Tokenizer.gpt2())
    pending_at_decode = []
    decode = engine.pool.decode
    engine.pool.decode = lambda *a, **k: (pending_at_decode.append(len(engine._outbox)), decode(*a, **k))[1]

    async def run():
        job = engine.submit([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3, temperature=0))
        updates = []
        while sum(u.finish_reason is not None for u in updates) < 2:
            updates.append(await job.queue.get())
        return updates

    engine.start()
    try:
        updates = asyncio.run(run())
    finally:
        engine.stop()
    assert sum(len(u.tokens) for u in updates) == 6
    assert pending_at_decode and pending_at_decode[0] == 0  # the prefill's tokens were already on their way


def test_two_level_sampler_draws_in_proportion_and_never_a_zero_weight():
    from gptwo.serve.engine import _sample_by_cdf

    vocab, draws = 600, 20_000  # blocks of 256, 256 and a partial one of 88
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(vocab, generator=generator) ** 4
    weights[::7] = 0  # zero-weight tokens, some at block edges
    weights[599] = 0.5
    tokens = _sample_by_cdf(weights.expand(draws, vocab).contiguous(), generator)
    counts = torch.bincount(tokens, minlength=vocab)
    assert counts[weights == 0].sum() == 0
    nonzero = weights > 0
    expected = weights[nonzero].double() / weights.double().sum() * draws
    chi2, df = float(((counts[nonzero] - expected) ** 2 / expected).sum()), int(nonzero.sum()) - 1
    assert (
        chi2 < df + 5 * (2 * df) ** 0.5
    )  # Pearson's test: chi2 has mean df and sd sqrt(2 df) when the draws are right
    for only in (0, 255, 256, 511, 512, 599):  # one possible token, wherever it sits
        one = torch.zeros(4, vocab)
        one[:, only] = 1e-30
        assert _sample_by_cdf(one, generator).tolist() == [only] * 4
