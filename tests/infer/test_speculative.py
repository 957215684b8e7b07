"""Speculative decoding: greedy equals plain greedy (draft model and n-gram, past the context too, CLI as
well), sampled tokens follow the target's own distribution (chi-square against the exact probabilities),
and one-line errors for what it refuses."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from serve_testing import save_tiny_model, tiny_model

from gptwo import GPT, GPTConfig
from gptwo.sampling import generate, sampling_weights
from gptwo.speculative import NgramDraft, SpeculationStats, speculative_tokens


def _draft(vocab_size: int, block_size: int = 128) -> GPT:
    torch.manual_seed(1)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32)).eval()


@pytest.mark.parametrize("draft", ["ngram", "model", "itself"])
def test_greedy_speculation_is_plain_greedy_decoding_past_the_context(draft):
    target = tiny_model(block_size=64, vocab_size=512)
    drafts = {"ngram": NgramDraft(), "model": _draft(512, 64), "itself": target}
    prompt = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6]
    stats = SpeculationStats()
    with torch.no_grad():
        plain = generate(target, torch.tensor([prompt]), 130, temperature=0)[0, len(prompt) :].tolist()
        spec = list(speculative_tokens(target, prompt, 130, temperature=0, draft=drafts[draft], k=3, stats=stats))
    assert spec == plain  # 130 new tokens: the 64-token context slides twice
    assert stats.tokens == 130 and stats.proposed > 0
    if draft == "itself":  # a draft that is the target is always right: k + 1 tokens per step
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_step > 3


def _exact_pairs(model: GPT, prompt: list[int], temperature: float, top_k: int | None) -> torch.Tensor:
    """The exact probability (V, V) of each first two tokens after `prompt`."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        first = sampling_weights(model(torch.tensor([prompt]))[:, -1], temperature, top_k, None)[0]
        rows = torch.tensor([[*prompt, t] for t in range(vocab)])
        second = sampling_weights(model(rows)[:, -1], temperature, top_k, None)
    return first[:, None] * second


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of `counts` to `probs`, cells expecting fewer than 5 pooled (chi-square needs 5 or more)."""
    expected = probs * counts.sum()
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    expected = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(chisquare(observed.numpy(), expected.numpy() * float(observed.sum() / expected.sum())).pvalue)


@pytest.mark.parametrize("proposal", ["model", "ngram"])
def test_rejection_sampling_gives_the_targets_distribution_at_each_position(proposal):
    """The theorem (Leviathan et al. 2023): whatever q proposes, the emitted token at each position is
    distributed as p. Checked on 5,000 draws per position against p itself."""
    from gptwo.speculative import verify_drafts

    vocab, k, trials = 6, 2, 5_000
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.randn(k + 1, vocab, generator=gen) * 1.5
    q = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, -1)
    p = torch.softmax(p_logits / 0.9, -1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    accepted_total = 0
    for _ in range(trials):
        if proposal == "model":
            drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
            accepted, extra = verify_drafts(p_logits, drafts, q, 0.9, None, None, gen)
        else:  # a deterministic proposal: q is one-hot at the drafts
            drafts = [2, 4]
            accepted, extra = verify_drafts(p_logits, drafts, None, 0.9, None, None, gen)
        emitted = [*drafts[:accepted], extra]
        accepted_total += accepted
        first[emitted[0]] += 1
        if accepted >= 1:  # the second position is reached when the first draft was accepted
            second[emitted[1]] += 1
    assert 0.1 < accepted_total / (trials * k) < 0.9  # both acceptances and rejections happen
    assert _chi_square_pvalue(first, p[0]) > 1e-3
    assert _chi_square_pvalue(second, p[1]) > 1e-3


def test_speculative_sampling_end_to_end_matches_plain_sampling():
    """Through the caches and steps: the first two tokens sampled with a draft model follow the target's exact
    pair probabilities, as plain sampling's do (fixed seeds)."""
    vocab = 4
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    for param in target.parameters():  # a peaked, not a uniform, next-token distribution
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=0.4)
    prompt = [1, 2, 3, 1, 2]
    exact = _exact_pairs(target, prompt, 0.9, None).flatten()
    generator = torch.Generator().manual_seed(0)
    spec, plain = torch.zeros(vocab * vocab), torch.zeros(vocab * vocab)
    stats = SpeculationStats()
    draft = _draft(vocab, 32)
    with torch.no_grad():
        for _ in range(200):
            a, b = speculative_tokens(target, prompt, 2, 0.9, draft=draft, k=2, generator=generator, stats=stats)
            spec[a * vocab + b] += 1
            a, b = generate(target, torch.tensor([prompt]), 2, 0.9, generator=generator)[0, -2:].tolist()
            plain[a * vocab + b] += 1
    assert 0.05 < stats.acceptance_rate < 0.98
    assert _chi_square_pvalue(spec, exact) > 1e-3 and _chi_square_pvalue(plain, exact) > 1e-3


def test_speculation_refuses_what_it_cannot_do():
    target = tiny_model(block_size=64, vocab_size=512)
    with pytest.raises(Exception, match="vocabulary has 256 tokens"):
        list(speculative_tokens(target, [1, 2], 4, draft=_draft(256, 64)))
    with pytest.raises(Exception, match="at least 1 token"):
        list(speculative_tokens(target, [1, 2], 4, draft=NgramDraft(), k=0))


def test_ngram_draft_proposes_what_followed_the_latest_match():
    draft = NgramDraft(n_max=3)
    assert draft.propose([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3], 3) == [5, 7, 2]  # "2 3" last seen before "5 7 2"
    assert draft.propose([1, 2, 3], 2) == []  # nothing repeats


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("spec") / "tiny")
    save_tiny_model(directory)
    return directory


def test_gptwo_generate_speculative_greedy_prints_the_plain_text(model_dir, capsys):
    from gptwo.cli import main

    prompt = "Hello world, hello world, hello"
    common = ["generate", "--model", model_dir, "--temperature", "0", "--max-new-tokens", "40", prompt]
    runs = {}
    for name, extra in (("plain", []), ("ngram", ["--speculate", "ngram"]), ("draft", ["--draft-model", model_dir])):
        code = main([*common, *extra])
        runs[name] = capsys.readouterr()
        assert code == 0, (name, runs[name].err)
    assert runs["ngram"].out == runs["plain"].out == runs["draft"].out
    assert "draft tokens accepted" in runs["ngram"].err and "(100%)" in runs["draft"].err
    for extra, words in (
        (["--speculate", "ngram", "--draft-model", model_dir], "--draft-model and --speculate both given"),
        (["--speculate", "ngram", "--watermark"], "does not combine with speculative decoding"),
    ):
        code = main([*common, *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], lines
