"""The one decode step over the paged KV cache: its logits equal the plain forward's through every layout a
sequence's blocks can take, and the block manager's reference counts, copy-on-write and prefix cache hold."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from gptwo import GPT, GPTConfig
from gptwo.errors import GptwoError
from gptwo.infer import native, prepare_model
from gptwo.infer.kvcache import OutOfBlocks, PagedKVCache
from gptwo.infer.step import SplitStep, StepInput, make_step
from gptwo.sampling import generate, stream_tokens

CONFIG = GPTConfig(vocab_size=97, block_size=96, n_layer=2, n_head=2, n_embd=32)


def random_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CONFIG).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so every parameter matters
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def plain(model, tokens: list[int]) -> torch.Tensor:
    """The reference: logits of every position of `tokens` from one forward without a cache."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].float()


@torch.no_grad()
def test_paged_logits_equal_the_plain_forward_for_ragged_batches_in_scattered_blocks():
    model = random_model()
    step = make_step(model, 60, use_native=False)
    cache, rng = step.cache, random.Random(0)
    cache.free = rng.sample(cache.free, len(cache.free))  # blocks handed out in no order: tables are scattered
    prompts = [[rng.randrange(97) for _ in range(n)] for n in (1, 17, 40, 5)]
    seqs = [cache.start([]) for _ in prompts]
    history = [list(p) for p in prompts]
    feed = [list(p) for p in prompts]
    for round_ in range(6):  # a prompt chunk beside single tokens, rows of different lengths
        for seq, tokens in zip(seqs, feed):
            cache.grow(seq, seq.length + len(tokens))
        every = [round_ == 0] * len(seqs)
        logits = step(StepInput(feed, [s.length for s in seqs], [s.blocks for s in seqs], every=every))
        at = 0
        for seq, tokens, h in zip(seqs, feed, history):
            reference = plain(model, h)
            rows = len(tokens) if every[0] else 1
            torch.testing.assert_close(logits[at : at + rows], reference[-rows:], atol=1e-5, rtol=0)
            cache.commit(seq, tokens)
            at += rows
        feed = [
            [rng.randrange(97)] if i % 2 or round_ % 2 else [rng.randrange(97) for _ in range(3)]
            for i in range(len(seqs))
        ]
        for h, tokens in zip(history, feed):
            h.extend(tokens)


@pytest.mark.parametrize("options", [{"dtype": "fp32"}, {"dtype": "bf16"}, {"quantize": "int8"}])
def test_greedy_tokens_of_every_precision_equal_its_plain_forward(options):
    """Prepared models (transposed fp32, bf16, int8 linears) on the step the machine picks (native where it
    builds) give, token by token, the argmax of the same prepared model's plain forward."""
    model = prepare_model(copy.deepcopy(random_model()), **options)
    prompts = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompts, 30, temperature=0)
    with torch.no_grad():
        for row in out:
            logits = model(row[None, :-1])[0, 5:].float()
            chosen = logits.gather(1, row[6:, None])[:, 0]
            assert torch.all(chosen >= logits.max(-1).values - 1e-3 * logits.abs().max())  # the argmax, up to ties


@torch.no_grad()
def test_a_sequence_longer_than_the_context_slides_on_the_step():
    """Past the context (96), the cache restarts from the last 3/4 (72 tokens) and grows again: each new token
    is the argmax of the plain forward over exactly that window."""
    model = random_model()
    out = torch.randint(0, 97, (10,), generator=torch.Generator().manual_seed(2)).tolist()
    start, restarts = 0, 0  # where the cached window begins
    for next_ids, logits in stream_tokens(model, [out], 150, temperature=0):
        t = len(out)
        if t - 1 - start >= CONFIG.block_size:  # the cache was full: it restarted from the last 72 tokens
            start, restarts = t - 72, restarts + 1
        torch.testing.assert_close(logits[0], plain(model, out[start:t])[-1], atol=1e-4, rtol=0)
        out.append(int(next_ids[0]))
    assert restarts >= 2


@torch.no_grad()
def test_forked_sequences_copy_the_shared_block_before_writing_it():
    model = random_model()
    step = make_step(model, 12, use_native=False)
    cache = step.cache
    prompt = list(range(20, 41))  # one full block and 5 tokens in the second
    a = cache.start([])
    cache.grow(a, len(prompt))
    step(StepInput([prompt], [0], [a.blocks]))
    cache.commit(a, prompt)
    b = cache.fork(a)
    assert b.blocks == a.blocks and cache.refs[a.blocks[1]] == 2
    assert cache.blocks_needed(a, a.length + 1) == 1  # the shared, partly filled block is copied first
    logits = {}
    for seq, token in ((a, 7), (b, 9)):
        cache.grow(seq, seq.length + 1)
        logits[token] = step(StepInput([[token]], [seq.length], [seq.blocks]))[0]
        cache.commit(seq, [token])
    assert a.blocks[0] == b.blocks[0] and a.blocks[1] != b.blocks[1]  # the full block stays shared
    torch.testing.assert_close(logits[7], plain(model, prompt + [7])[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[9], plain(model, prompt + [9])[-1], atol=1e-5, rtol=0)
    for seq in (a, b):
        cache.release(seq)
    assert cache.num_used == 0 and cache.num_free == cache.usable_blocks


def test_prefix_cache_reuses_full_blocks_and_evicts_the_least_recently_used():
    config = GPTConfig(vocab_size=97, block_size=96, n_layer=1, n_head=1, n_embd=8)
    cache = PagedKVCache(config, 6, prefix_caching=True)  # 5 usable blocks
    first = list(range(40))  # blocks [0:16], [16:32] register; the last 8 tokens do not fill one
    a = cache.start(first)
    assert a.length == 0
    cache.grow(a, 40)
    cache.commit(a, first)
    cache.release(a)
    assert cache.num_free == 5 and len(cache.evictable) == 2
    b = cache.start(first[:32] + [90, 91])
    assert b.length == 32 and cache.hit_tokens == 32  # both full blocks found
    cache.release(b)
    c = cache.start(first[:32])
    assert c.length == 16  # a whole-prompt hit leaves its last block to compute (it needs logits)
    cache.release(c)
    other = cache.start([])
    cache.grow(other, 5 * 16)  # takes every block: the cached ones are evicted, oldest first
    assert cache.num_free == 0 and not cache.table
    with pytest.raises(OutOfBlocks):
        cache.grow(other, 5 * 16 + 1)
    cache.release(other)
    assert cache.start(first).length == 0  # evicted: nothing is found any more


def test_truncate_gives_back_the_blocks_past_the_kept_tokens():
    cache = PagedKVCache(CONFIG, 10, prefix_caching=False)
    seq = cache.start([])
    cache.grow(seq, 50)
    cache.commit(seq, list(range(50)))
    cache.truncate(seq, 20)
    assert seq.length == 20 and len(seq.blocks) == 2 and cache.num_used == 2


def test_a_step_refuses_tables_that_do_not_hold_its_tokens():
    step = make_step(random_model(), 8, use_native=False)
    with pytest.raises(GptwoError, match="block table"):
        step(StepInput([[1, 2, 3]], [0], [[]]))
    with pytest.raises(GptwoError, match="block table"):
        step(StepInput([[1]], [0], [[99]]))
    with pytest.raises(GptwoError, match="context"):
        step(StepInput([[1]], [96], [[1] * 7]))


@pytest.mark.skipif(native.library() is None, reason="the native kernels do not build on this machine")
@torch.no_grad()
def test_native_and_torch_steps_agree_on_the_same_batch():
    model = prepare_model(copy.deepcopy(random_model()), dtype="fp32")
    native_step, torch_step = make_step(model, 20, use_native=True), make_step(model, 20, use_native=False)
    assert isinstance(native_step, native.NativeStep)
    prompts = [list(range(3, 30)), [5, 6], list(range(40, 57))]
    outputs = []
    for step in (native_step, torch_step):
        seqs = [step.cache.start([]) for _ in prompts]
        for seq, p in zip(seqs, prompts):
            step.cache.grow(seq, len(p))
        outputs.append(step(StepInput(prompts, [0, 0, 0], [s.blocks for s in seqs], every=[False, True, False])))
    torch.testing.assert_close(outputs[0].float(), outputs[1].float(), atol=1e-4, rtol=0)


@pytest.mark.skipif(native.library() is None, reason="the native kernels do not build on this machine")
@torch.no_grad()
def test_a_split_step_runs_decode_rows_natively_beside_a_torch_chunk_and_gives_the_plain_logits():
    model = prepare_model(copy.deepcopy(random_model()), dtype="fp32")
    step = make_step(model, 40, use_native=True, max_native_tokens=6)
    assert isinstance(step, SplitStep)
    calls = []
    for name in ("native", "torch"):
        part = getattr(step, name)
        setattr(step, name, lambda batch, part=part, name=name: calls.append((name, batch.tokens)) or part(batch))
    cache, rng = step.cache, random.Random(1)
    history = [[rng.randrange(97) for _ in range(n)] for n in (9, 4, 12)]
    seqs = [cache.start([]) for _ in history]
    for seq, tokens in zip(seqs, history):  # the prompts, on torch (more than 6 tokens)
        cache.grow(seq, len(tokens))
    step(StepInput(history, [0, 0, 0], [s.blocks for s in seqs]))
    for seq, tokens in zip(seqs, history):
        cache.commit(seq, tokens)
    # two decode rows (one checking 2 drafts: logits for each) beside a 20-token prompt chunk
    feed = [[rng.randrange(97)], [rng.randrange(97) for _ in range(3)], [rng.randrange(97) for _ in range(20)]]
    every = [False, True, False]
    calls.clear()
    for seq, tokens in zip(seqs, feed):
        cache.grow(seq, seq.length + len(tokens))
    logits = step(StepInput(feed, [s.length for s in seqs], [s.blocks for s in seqs], every=every))
    assert calls == [("native", feed[:2]), ("torch", feed[2:])]
    at = 0
    for h, tokens, all_rows in zip(history, feed, every):
        rows = len(tokens) if all_rows else 1
        torch.testing.assert_close(logits[at : at + rows], plain(model, h + tokens)[-rows:], atol=1e-4, rtol=0)
        at += rows
    assert at == logits.shape[0]


@pytest.mark.parametrize("kind", ["torch", "native", "split"])
@torch.no_grad()
def test_a_skipped_chunk_returns_no_logits_and_still_fills_the_cache(kind):
    if kind != "torch" and native.library() is None:
        pytest.skip("the native kernels do not build on this machine")
    model = prepare_model(copy.deepcopy(random_model()), dtype="fp32")
    options = {"torch": {"use_native": False}, "native": {"use_native": True}}
    step = make_step(model, 40, **options.get(kind, {"use_native": True, "max_native_tokens": 4}))
    cache, rng = step.cache, random.Random(2)
    prompts = [[rng.randrange(97) for _ in range(n)] for n in (5, 30)]
    seqs = [cache.start([]) for _ in prompts]
    for seq, p in zip(seqs, prompts):
        cache.grow(seq, len(p))
    # the second prompt's first 20 tokens as a chunk that needs no logits, beside the whole first prompt
    feed = [prompts[0], prompts[1][:20]]
    logits = step(StepInput(feed, [0, 0], [s.blocks for s in seqs], skip=[False, True]))
    assert logits.shape[0] == 1
    torch.testing.assert_close(logits.float(), plain(model, prompts[0])[-1:], atol=1e-4, rtol=0)
    cache.commit(seqs[1], feed[1])
    rest = prompts[1][20:]
    logits = step(StepInput([rest], [20], [seqs[1].blocks], every=[True]))
    torch.testing.assert_close(logits.float(), plain(model, prompts[1])[20:], atol=1e-4, rtol=0)
    only_skipped = step(StepInput([[3]], [30], [seqs[1].blocks], skip=[True]))
    assert only_skipped.shape == (0, model.config.vocab_size)
    with pytest.raises(ValueError, match="both skip its logits and ask for every one"):
        StepInput([[3]], [31], [seqs[1].blocks], every=[True], skip=[True])
