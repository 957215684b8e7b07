"""The batching engine on its own: the paged cache's accounting, chunked prefill, prefix caching, preemption,
n > 1 choices sharing blocks, admission limits. Every text is checked against decoding each prompt alone."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from serve_testing import tiny_model

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.errors import GptwoError
from gptwo.infer import native, prepare_model
from gptwo.infer.native import NativeStep
from gptwo.sampling import generate
from gptwo.serve.engine import BatchEngine, Overloaded, SamplingParams

TOKENIZER = Tokenizer.gpt2()


def alone(model, prompt: list[int], tokens: int) -> list[int]:
    """The reference: greedy tokens of `prompt` decoded by itself (sampling.generate on the plain step)."""
    return generate(model, torch.tensor([prompt]), tokens, temperature=0)[0, len(prompt) :].tolist()


async def collect(engine: BatchEngine, prompts, params: SamplingParams, n: int = 1, cancel_after: int | None = None):
    """Submit one request; return each choice's tokens (the request cancelled after `cancel_after` updates)."""
    job = engine.submit(prompts, params, n=n)
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts) * n)}
    finished, seen = set(), 0
    while len(finished) < len(tokens):
        update = await job.queue.get()
        assert update.error is None, update.error
        tokens[update.index] += [t.token for t in update.tokens]
        seen += 1
        if update.finish_reason is not None:
            finished.add(update.index)
        if cancel_after is not None and seen >= cancel_after:
            engine.cancel(job)
            return None
    return [tokens[i] for i in range(len(tokens))]


def run_engine(engine: BatchEngine, *requests):
    """Run `requests` (coroutine factories taking the engine) at once on a started engine; their results."""

    async def everything():
        return await asyncio.gather(*(request(engine) for request in requests))

    engine.start()
    try:
        return asyncio.run(everything())
    finally:
        engine.stop()


def assert_blocks_all_back(engine: BatchEngine) -> None:
    cache = engine.cache
    assert cache.num_used == 0 and cache.num_free == cache.usable_blocks
    assert sorted(cache.free + list(cache.evictable)) == list(range(1, cache.num_blocks))  # each block once
    assert all(r == 0 for r in cache.refs)


@pytest.mark.parametrize("budget", [512, 7], ids=["whole-prompts", "chunked-prefill"])
def test_ragged_requests_give_each_prompt_its_own_greedy_text(budget):
    model = tiny_model(block_size=64, vocab_size=512)
    engine = BatchEngine(model, TOKENIZER, max_num_seqs=8, max_batched_tokens=budget, num_blocks=40)
    prompts = [[5, 6, 7, 8, 9], list(range(100, 140)), [200, 201], list(range(300, 317))]
    requests = [
        lambda e, p=p, k=k: collect(e, [p], SamplingParams(max_tokens=k, temperature=0))
        for p, k in zip(prompts, (12, 20, 30, 9))
    ]
    results = run_engine(engine, *requests)
    for prompt, (k, result) in zip(prompts, zip((12, 20, 30, 9), results)):
        assert result[0] == alone(model, prompt, k)
    assert_blocks_all_back(engine)


def test_a_long_prompt_joins_in_chunks_while_others_decode():
    """With a budget of 8 tokens a step, a 40-token prompt takes several steps to prefill; the running
    sequence gets a token at each of them."""
    model = tiny_model(block_size=64, vocab_size=512)
    engine = BatchEngine(model, TOKENIZER, max_num_seqs=4, max_batched_tokens=8, num_blocks=20)
    steps = []
    step = engine.step
    engine.step = lambda batch: (steps.append([len(t) for t in batch.tokens]), step(batch))[1]
    engine.step.cache = step.cache

    async def runner(e):
        return await collect(e, [[1, 2, 3]], SamplingParams(max_tokens=25, temperature=0))

    async def joiner(e):
        while e.stats["steps"] < 2:  # the short one is decoding
            await asyncio.sleep(0.001)
        return await collect(e, [list(range(100, 140))], SamplingParams(max_tokens=3, temperature=0))

    short, long = run_engine(engine, runner, joiner)
    assert short[0] == alone(model, [1, 2, 3], 25) and long[0] == alone(model, list(range(100, 140)), 3)
    chunked = [s for s in steps if len(s) == 2 and s[1] > 1]  # the decode row, then a prompt chunk
    assert len(chunked) >= 4 and all(s[0] == 1 and sum(s) <= 8 for s in chunked)


def test_while_others_decode_a_prompt_brings_at_most_the_long_prefill_threshold_a_step():
    """A prompt arriving at an idle engine is computed up to the step budget at once; one joining a decoding
    sequence brings at most `long_prefill_token_threshold` tokens a step, and its chunks before the last ask for
    no logits."""
    model = tiny_model(block_size=96, vocab_size=512)
    engine = BatchEngine(
        model, TOKENIZER, max_num_seqs=4, max_batched_tokens=64, long_prefill_token_threshold=5, num_blocks=30
    )
    steps = []
    step = engine.step
    engine.step = lambda batch: (steps.append((batch.tokens, batch.skip)), step(batch))[1]
    engine.step.cache = step.cache
    first, second = list(range(50, 90)), list(range(100, 140))

    async def runner(e):
        return await collect(e, [first], SamplingParams(max_tokens=20, temperature=0))

    async def joiner(e):
        while e.stats["steps"] < 2:  # the first one is decoding
            await asyncio.sleep(0.001)
        return await collect(e, [second], SamplingParams(max_tokens=3, temperature=0))

    one, two = run_engine(engine, runner, joiner)
    assert one[0] == alone(model, first, 20) and two[0] == alone(model, second, 3)
    assert steps[0] == ([first], None)  # alone: the whole 40-token prompt in one step
    chunks = [(tokens[1], skip) for tokens, skip in steps if len(tokens) == 2 and len(tokens[1]) > 1]
    assert [len(c) for c, _ in chunks] == [5] * 8  # the joiner: 40 tokens, 5 a step beside the decode row
    assert [skip for _, skip in chunks] == [[False, True]] * 7 + [None]  # logits for the last chunk only
    assert_blocks_all_back(engine)


def test_a_prefix_cache_hit_gives_the_same_logits_and_text_as_a_miss():
    model = tiny_model(block_size=128, vocab_size=512)
    shared = list(range(10, 58))  # three full blocks
    prompts = [shared + [1, 2, 3], shared + [4, 5], shared + [1, 2, 3]]
    texts = {}
    for caching in (True, False):
        engine = BatchEngine(model, TOKENIZER, max_num_seqs=4, num_blocks=40, prefix_caching=caching)
        results = []
        for prompt in prompts:  # one after another: the later ones find the first one's blocks
            results += run_engine(
                engine, lambda e, p=prompt: collect(e, [p], SamplingParams(max_tokens=8, temperature=0, logprobs=3))
            )
        texts[caching] = results
        m = engine.metrics()
        assert (m["prefix_cache_hits_total"] >= 2 * 48) == caching
        assert_blocks_all_back(engine)
    assert texts[True] == texts[False] == [[alone(model, p, 8)] for p in prompts]


def test_a_prefix_hit_gives_the_logits_of_a_miss():
    from gptwo.infer.step import StepInput, make_step

    model = tiny_model(block_size=128, vocab_size=512)
    step = make_step(model, 30, prefix_caching=True, use_native=False)
    cache, prompt = step.cache, list(range(20, 60))
    first = cache.start(prompt)
    cache.grow(first, len(prompt))
    missed = step(StepInput([prompt], [0], [first.blocks]))
    cache.commit(first, prompt)
    second = cache.start(prompt)
    assert second.length == 32 and second.blocks == first.blocks[:2]  # two full blocks found
    cache.grow(second, len(prompt))
    hit = step(StepInput([prompt[32:]], [32], [second.blocks]))
    torch.testing.assert_close(hit, missed, atol=1e-5, rtol=0)


def test_n_choices_share_the_prompt_blocks_and_copy_on_write_keeps_them_apart():
    model = tiny_model(block_size=64, vocab_size=512)
    engine = BatchEngine(model, TOKENIZER, max_num_seqs=8, num_blocks=30, prefix_caching=False)
    prompt = list(range(40, 61))  # one full block and 5 tokens in a shared, partly filled one
    forks = []
    fork = engine.cache.fork
    engine.cache.fork = lambda seq: (forks.append(list(seq.blocks)), fork(seq))[1]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    (choices,) = run_engine(engine, lambda e: collect(e, [prompt], params, n=3))
    assert len(forks) == 2  # the prompt was computed once, its blocks shared by the other two choices
    assert len({tuple(c) for c in choices}) == 3  # each choice samples its own tokens...
    for j, tokens in enumerate(choices):  # ...exactly as it would alone with its own seed (seed + j)
        expected = generate(model, torch.tensor([prompt]), 12, temperature=1.0, seed=7 + j)[0, len(prompt) :]
        assert tokens == expected.tolist()
    assert_blocks_all_back(engine)


def test_preempted_seeded_requests_still_return_their_text():
    """A cache of 9 blocks for 4 sequences that need 4 each: the newest are preempted and recomputed."""
    model = tiny_model(block_size=64, vocab_size=512)
    engine = BatchEngine(model, TOKENIZER, max_num_seqs=4, num_blocks=10, prefix_caching=False)
    prompts = [[i, i + 1, i + 2, i + 3] for i in (10, 20, 30, 40)]
    params = SamplingParams(max_tokens=56, temperature=0.9, seed=3)
    results = run_engine(engine, *[lambda e, p=p: collect(e, [p], params) for p in prompts])
    assert engine.stats["preempted"] > 0
    for prompt, result in zip(prompts, results):
        expected = generate(model, torch.tensor([prompt]), 56, temperature=0.9, seed=3)[0, 4:].tolist()
        assert result[0] == expected
    assert_blocks_all_back(engine)


def test_every_block_comes_back_after_a_thousand_requests():
    """Joins, leaves, cancels, n > 1, prefix hits and preemptions, 1,000 requests on a small cache."""
    model = tiny_model(block_size=48, vocab_size=256)
    engine = BatchEngine(
        model, TOKENIZER, max_num_seqs=12, max_batched_tokens=40, num_blocks=16, max_queue=2000, max_client_choices=0
    )
    rng = random.Random(0)
    shared = list(range(1, 17))

    def request(i):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(256) for _ in range(rng.randrange(1, 14))]
        params = SamplingParams(
            max_tokens=rng.randrange(1, 20), temperature=rng.choice([0.0, 1.0]), seed=rng.choice([None, i])
        )
        n = rng.choice([1, 1, 2, 3])
        cancel = rng.randrange(1, 4) if i % 7 == 0 else None
        return lambda e: collect(e, [prompt], params, n=n, cancel_after=cancel)

    results = []
    for wave in range(10):
        results += run_engine(engine, *[request(wave * 100 + j) for j in range(100)])
    assert len(results) == 1000 and engine.stats["preempted"] > 0
    assert engine.metrics()["prefix_cache_hits_total"] > 0
    assert_blocks_all_back(engine)


@pytest.mark.skipif(native.library() is None, reason="the native kernels do not build on this machine")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_native_step_serves_ragged_batches_over_the_same_cache(dtype):
    model = prepare_model(tiny_model(block_size=64, vocab_size=512), dtype=dtype)
    engine = BatchEngine(model, TOKENIZER, max_num_seqs=4, max_batched_tokens=9, num_blocks=24)
    assert isinstance(engine.step.native, NativeStep) and engine.cache.k.dtype == torch.float32  # prompts: torch
    prompts = [[5, 6, 7, 8, 9], list(range(100, 125)), [200, 201]]
    results = run_engine(
        engine, *[lambda e, p=p: collect(e, [p], SamplingParams(max_tokens=10, temperature=0)) for p in prompts]
    )
    for prompt, result in zip(prompts, results):
        assert result[0] == alone(model, prompt, 10)
    assert_blocks_all_back(engine)


def test_metrics_count_requests_blocks_and_tokens():
    from gptwo.serve.metrics import prometheus_text

    model = tiny_model(block_size=64, vocab_size=512)
    engine = BatchEngine(model, TOKENIZER, num_blocks=20)
    run_engine(engine, lambda e: collect(e, [[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0)))
    text = prometheus_text(engine.metrics(), "tiny")
    assert 'gptwo_generation_tokens_total{model_name="tiny"} 5' in text
    assert 'gptwo_prompt_tokens_total{model_name="tiny"} 3' in text
    assert 'gptwo_kv_blocks_total{model_name="tiny"} 19' in text
    assert 'gptwo_time_to_first_token_seconds_count{model_name="tiny"} 1' in text
    assert 'le="+Inf"} 1' in text


def test_engine_refuses_what_it_cannot_run_and_bounds_its_queue():
    engine = BatchEngine(
        tiny_model(block_size=32), Tokenizer.gpt2(), max_num_seqs=2, max_queue=3
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
        original = model.hidden_states  # what the torch decode step calls
        model.hidden_states = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        failed = await run([1, 2, 3])
        model.hidden_states = original
        return failed, await run([1, 2, 3])

    engine.start()
    try:
        failed, fine = asyncio.run(scenario())
    finally:
        engine.stop()
    assert failed[-1].finish_reason == "error" and "boom" in failed[-1].error
    assert fine[-1].finish_reason == "length" and sum(len(u.tokens) for u in fine) == 3


def test_two_level_sampler_draws_in_proportion_and_never_a_zero_weight():
    from gptwo.sampling import sample_by_cdf

    vocab, draws = 600, 20_000  # blocks of 256, 256 and a partial one of 88
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(vocab, generator=generator) ** 4
    weights[::7] = 0  # zero-weight tokens, some at block edges
    weights[599] = 0.5
    tokens = sample_by_cdf(weights.expand(draws, vocab).contiguous(), generator)
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
        assert sample_by_cdf(one, generator).tolist() == [only] * 4


def speculating_engine(model, draft: str, **kwargs) -> BatchEngine:
    """An engine speculating with prompt lookup, or with a draft model: the target itself (every draft right)
    or another model (most drafts wrong), so both the accepting and the rejecting paths run."""
    if draft == "ngram":
        return BatchEngine(model, TOKENIZER, speculate="ngram", **kwargs)
    other = model
    if draft == "other-draft":  # one layer, another seed, a shorter context than the target's
        torch.manual_seed(7)
        other = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    return BatchEngine(model, TOKENIZER, draft_model=other, **kwargs)


@pytest.mark.parametrize("draft", ["ngram", "self-draft", "other-draft"])
@pytest.mark.parametrize("budget", [512, 9], ids=["whole-prompts", "chunked-prefill"])
def test_speculation_per_row_gives_each_prompt_its_plain_greedy_text(budget, draft):
    model = tiny_model(block_size=96, vocab_size=512)
    engine = speculating_engine(model, draft, max_num_seqs=6, max_batched_tokens=budget, num_blocks=60)
    loop = [7, 8, 9, 10] * 6  # prompts that repeat themselves: prompt lookup has drafts to propose
    prompts = [loop, list(range(100, 130)), [200, 201, 200, 201, 200], loop[:9] + list(range(300, 310))]
    lengths = (30, 25, 40, 20)
    requests = [
        lambda e, p=p, k=k: collect(e, [p], SamplingParams(max_tokens=k, temperature=0))
        for p, k in zip(prompts, lengths)
    ]
    requests.append(  # a row asking logprobs decodes plainly beside the speculating ones
        lambda e: collect(e, [prompts[0]], SamplingParams(max_tokens=12, temperature=0, logprobs=2))
    )
    results = run_engine(engine, *requests)
    for prompt, k, result in zip([*prompts, prompts[0]], [*lengths, 12], results):
        assert result[0] == alone(model, prompt, k)
    metrics = engine.metrics()
    assert metrics["spec_decode_draft_tokens_total"] > 0
    assert 0 < metrics["spec_decode_accepted_tokens_total"] <= metrics["spec_decode_draft_tokens_total"]
    assert metrics["generation_tokens_total"] == sum(lengths) + 12
    assert engine.stats["steps"] < sum(lengths) + 12  # accepted drafts: fewer steps than tokens
    if draft == "self-draft":  # the target drafting for itself: every greedy draft is accepted
        assert metrics["spec_decode_accepted_tokens_total"] == metrics["spec_decode_draft_tokens_total"]
    assert_blocks_all_back(engine)
    if engine.draft is not None:
        assert engine.draft.cache.num_used == 0  # finished rows gave their draft blocks back


@pytest.mark.parametrize("draft", ["ngram", "other-draft"])
def test_speculation_samples_seeded_rows_to_their_length(draft):
    model = tiny_model(block_size=64, vocab_size=512)
    engine = speculating_engine(model, draft, max_num_seqs=4, num_blocks=40)
    prompt = [7, 8, 9, 10] * 4
    params = SamplingParams(max_tokens=20, temperature=0.7, top_k=20, seed=3)
    first, again = run_engine(
        engine, lambda e: collect(e, [prompt], params, n=2), lambda e: collect(e, [prompt], params)
    )
    assert [len(t) for t in first + again] == [20, 20, 20] and first[0] == again[0]  # a seed gives the same text
    assert all(0 <= t < 512 for t in first[0] + first[1])
    assert engine.metrics()["spec_decode_draft_tokens_total"] > 0
    assert_blocks_all_back(engine)


def test_draft_model_speculation_samples_the_targets_distribution():
    """Through the engine's draft step, caches and per-row seeds: three sampled tokens with a draft model
    proposing (its greedy drafts verified by rejection sampling) follow the target's exact joint probabilities."""
    from scipy.stats import chisquare

    vocab, prompt, temperature = 3, [1, 2, 0, 1, 2], 0.9
    torch.manual_seed(0)
    target, draft = (GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=1, n_embd=8)) for _ in "td")
    for param in target.parameters():  # a peaked next-token distribution
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=0.6)
    target.eval()
    engine = BatchEngine(
        target, TOKENIZER, max_num_seqs=64, num_blocks=200, draft_model=draft, max_request_choices=300, max_queue=300,
        max_client_choices=0, num_speculative_tokens=2,
    )  # fmt: skip
    params = SamplingParams(max_tokens=3, temperature=temperature, seed=0, ignore_eos=True)
    (texts,) = run_engine(engine, lambda e: collect(e, [prompt], params, n=300))
    counts = torch.zeros(vocab**3)
    for tokens in texts:
        counts[tokens[0] * vocab * vocab + tokens[1] * vocab + tokens[2]] += 1
    with torch.no_grad():  # the exact joint: p(a | prompt) p(b | prompt a) p(c | prompt a b)
        exact = torch.ones(vocab**3)
        for cell in range(vocab**3):
            a, b, c = cell // (vocab * vocab), cell // vocab % vocab, cell % vocab
            for seen, token in ((prompt, a), (prompt + [a], b), (prompt + [a, b], c)):
                exact[cell] *= torch.softmax(target(torch.tensor([seen]))[0, -1] / temperature, -1)[token]
    assert engine.metrics()["spec_decode_draft_tokens_total"] > 0
    assert (
        0 < engine.metrics()["spec_decode_accepted_tokens_total"] < engine.metrics()["spec_decode_draft_tokens_total"]
    )
    assert chisquare(counts.numpy(), (exact / exact.sum() * 300).numpy()).pvalue > 1e-3
