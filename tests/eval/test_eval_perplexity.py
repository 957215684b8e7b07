"""Strided perplexity: the windows, and the numbers against direct computations and lm-eval's own windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import TableModel, long_text, save_tiny_model, small_tokenizer

from gptwo.errors import GptwoError
from gptwo.eval.perplexity import TextStats, score_texts
from gptwo.eval.scoring import rolling_pairs, score_pairs
from gptwo.weights import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny_model(str(tmp_path_factory.mktemp("tiny"))), device="cpu")


@pytest.mark.parametrize(
    "n,block,stride", [(1, 8, 8), (7, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 8, 1), (23, 16, 5)]
)
def test_every_token_is_scored_once_with_enough_context(n, block, stride):
    tokens = list(range(100, 100 + n))
    pairs = rolling_pairs(tokens, 0, block, stride)
    assert [t for _, cont in pairs for t in cont] == tokens
    for k, (ctx, cont) in enumerate(pairs):
        assert 1 <= len(ctx) and len(ctx) + len(cont) - 1 <= block  # the model reads at most `block` tokens
        if k > 0:
            assert len(ctx) >= block - stride + 1  # the first scored token sees >= block - stride + 1 tokens
        seq = [0, *tokens]
        start = seq.index(cont[0])
        assert list(ctx) == seq[start - len(ctx) : start]  # the context is what immediately precedes


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 100])
def test_stride_equal_to_context_gives_lm_evals_rolling_windows(n):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(1000, 1000 + n))
    theirs = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(token_list=tokens, prefix_token=7, max_seq_len=16, context_len=1)
    ]
    assert [(list(a), list(b)) for a, b in rolling_pairs(tokens, 7, 16)] == [(list(a), list(b)) for a, b in theirs]


def direct_nll(model, tokens, prefix):
    """Negative log-likelihood in disjoint chunks of the context, each one plain forward pass.

    The last, partial chunk reads a full context (its scored tokens at the end), as the harness does.
    """
    block = model.config.block_size
    seq = torch.tensor([prefix, *tokens])
    nll = 0.0
    for start in range(0, len(tokens), block):
        end = min(start + block, len(tokens))  # targets seq[start+1 : end+1]
        first = max(0, end - block)
        logits = model(seq[None, first:end])[0, start - first :]
        nll += F.cross_entropy(logits.float(), seq[start + 1 : end + 1], reduction="sum").item()
    return nll


def test_strided_perplexity_equals_direct_computation_when_stride_is_context(tiny):
    model, tok = tiny
    text = long_text(300)  # several times the 32-token context
    tokens = tok.encode_ordinary(text)
    assert len(tokens) > 4 * model.config.block_size and len(tokens) % model.config.block_size
    (stats,) = score_texts(model, tok, [text], stride=model.config.block_size, batch_size=3)
    expected = direct_nll(model, tokens, tok.eot_token)
    assert stats.tokens == len(tokens)
    assert stats.nll == pytest.approx(expected, rel=1e-5)
    assert stats.perplexity == pytest.approx(math.exp(expected / len(tokens)), rel=1e-5)
    assert stats.bits_per_byte == pytest.approx(expected / math.log(2) / len(text.encode()), rel=1e-5)
    # a whole number of contexts: plain disjoint chunks, nothing special at the end
    whole = tokens[: 4 * model.config.block_size]
    chunks = torch.tensor([tok.eot_token, *whole]).unfold(0, 33, 32)  # (4, 33): inputs and their next tokens
    plain = F.cross_entropy(model(chunks[:, :-1]).flatten(0, 1), chunks[:, 1:].flatten(), reduction="sum").item()
    assert -sum(s.logprob for s in score_pairs(model, rolling_pairs(whole, tok.eot_token, 32))) == pytest.approx(
        plain, rel=1e-5
    )


def test_short_text_gives_one_forward_pass_whatever_the_stride(tiny):
    model, tok = tiny
    text = "Rivers run to the sea."
    tokens = tok.encode_ordinary(text)
    expected = direct_nll(model, tokens, tok.eot_token)
    for stride in (1, 4, 32):
        (stats,) = score_texts(model, tok, [text], stride=stride)
        assert stats.nll == pytest.approx(expected, rel=1e-5)


def test_smaller_stride_scores_each_token_with_its_exact_window(tiny):
    """Each window's scores equal a separate unbatched forward pass over exactly that window."""
    model, tok = tiny
    tokens = tok.encode_ordinary(long_text(120, seed=3))
    pairs = rolling_pairs(tokens, tok.eot_token, 32, 8)
    batched = score_pairs(model, pairs, batch_size=5)
    for (ctx, cont), got in zip(pairs, batched):
        ids = torch.tensor([*ctx, *cont][:-1])[None]
        logprobs = model(ids)[0, -len(cont) :].log_softmax(-1)
        assert got.logprob == pytest.approx(
            logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item(), rel=1e-5, abs=1e-4
        )
    (stats,) = score_texts(model, tok, [tok.decode(tokens)], stride=8)
    assert stats.nll == pytest.approx(-sum(s.logprob for s in batched), rel=1e-5)


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    tok = small_tokenizer()
    model = TableModel(tok.n_vocab, block_size=16)  # all logits zero
    text = "Numbers such as 1, 2, 3 and 42 appear in text too, as do names like Alice, Bob and Carol. " * 3
    for stride in (16, 5):
        (stats,) = score_texts(model, tok, [text], stride=stride)
        assert stats.perplexity == pytest.approx(tok.n_vocab, rel=1e-5)
        assert stats.bits_per_byte == pytest.approx(
            stats.tokens * math.log2(tok.n_vocab) / len(text.encode()), rel=1e-6
        )
        assert stats.word_perplexity == pytest.approx(
            tok.n_vocab ** (stats.tokens / 61), rel=1e-5
        )  # 20 words x 3, and the '' after the final space


def test_context_longer_than_the_window_is_cut_from_the_left(tiny):
    model, tok = tiny
    ctx, cont = list(range(300, 360)), [11, 12, 13]
    (got,) = score_pairs(model, [(ctx, cont)])
    ids = torch.tensor((ctx + cont)[-33:-1])[None]
    expected = model(ids)[0, -3:].log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
    assert got.logprob == pytest.approx(expected, rel=1e-5)


def test_bad_strides_and_empty_texts_are_clear_errors(tiny):
    model, tok = tiny
    with pytest.raises(GptwoError, match="stride 0 is outside 1..32"):
        score_texts(model, tok, ["some text"], stride=0)
    with pytest.raises(GptwoError, match="stride 33"):
        score_texts(model, tok, ["some text"], stride=33)
    with pytest.raises(GptwoError, match="empty"):
        score_texts(model, tok, [""], names=["blank.txt"])


def test_totals_sum_counts_not_perplexities():
    a, b = TextStats("a", 10.0, 5, 2, 20), TextStats("b", 30.0, 5, 3, 20)
    from gptwo.eval.perplexity import total

    both = total([a, b])
    assert (both.nll, both.tokens, both.words, both.bytes) == (40.0, 10, 5, 40)
    assert both.perplexity == pytest.approx(math.exp(4.0))
