"""Per-token statistics and document scores against a direct computation: one prefix at a time, full softmax, explicit
loops."""

from __future__ import annotations

import math

import pytest
import torch
from detect_testing import TEXT, save_tiny, tiny_model

from gptwo import Tokenizer
from gptwo.detect.detector import Rule, judge_text, load_models, token_texts
from gptwo.detect.stats import BUCKET_NAMES, document_scores, token_stats
from gptwo.errors import GptwoError


def direct_rows(model, tokens: list[int], prefix: int, reference=None) -> list[dict]:
    """For each token: the model run on its whole prefix alone, softmax by hand (exp / sum), rank by sorting."""
    rows = []
    seq = [prefix, *tokens]
    with torch.no_grad():
        for i in range(1, len(seq)):
            logits = model(torch.tensor([seq[:i]]))[0, -1].double()
            weights = (logits - logits.max()).exp()
            probs = weights / weights.sum()
            logp = probs.log()
            target = seq[i]
            order = torch.sort(probs, descending=True, stable=True).indices.tolist()
            position = order.index(target)  # 0-based place in the sorted vocabulary; near-ties may sit either side
            tied = int(((logp - logp[target]).abs() < 1e-5).sum()) - 1
            mu = float((probs * logp).sum())
            var = float((probs * logp * logp).sum()) - mu * mu
            row = {
                "logprob": float(logp[target]),
                "rank": (position + 1 - tied, position + 1 + tied),
                "entropy": -mu,
                "mu": mu,
                "var": var,
                "top": order[:5],
            }
            if reference is not None:
                ref_logits = reference(torch.tensor([seq[:i]]))[0, -1].double()
                ref = (ref_logits - ref_logits.max()).exp()
                row["cross"] = -float((ref / ref.sum() * logp).sum())
            rows.append(row)
    return rows


RANKS = [1, 2, 10, 11, 50, 100, 101, 400, 1000, 1001, 3000, 30000, 1, 7, 99, 999]  # both sides of each GLTR bucket edge


def tokens_of_ranks(model, prefix: int, ranks: list[int]) -> list[int]:
    """A text built so that its i-th token has rank ranks[i] under the model."""
    seq = [prefix]
    with torch.no_grad():
        for rank in ranks:
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argsort(descending=True)[rank - 1]))
    return seq[1:]


def test_token_stats_and_scores_match_a_direct_computation():
    tok = Tokenizer.gpt2()
    model, reference = tiny_model(0, block_size=128), tiny_model(1, block_size=128)
    tokens = tokens_of_ranks(model, tok.eot_token, RANKS) + tok.encode_ordinary(TEXT)[:12]
    table = token_stats(model, tok, tokens, reference=reference, top=5)
    rows = direct_rows(model, tokens, tok.eot_token, reference)
    assert table.tokens == tokens and len(table) == len(rows)
    for i, row in enumerate(rows):
        assert table.logprob[i].item() == pytest.approx(row["logprob"], abs=1e-4)
        assert row["rank"][0] <= table.rank[i].item() <= row["rank"][1]
        assert table.entropy[i].item() == pytest.approx(row["entropy"], abs=1e-4)
        assert table.variance[i].item() == pytest.approx(row["var"], rel=1e-3, abs=1e-4)
        assert table.top_ids[i].tolist() == row["top"]
        assert table.cross_entropy[i].item() == pytest.approx(row["cross"], abs=1e-4)
    ranks = [table.rank[i].item() for i in range(len(rows))]  # within the direct ranks' tie range, checked above
    buckets = [
        sum(1 for r in ranks if r <= 10),
        sum(1 for r in ranks if 10 < r <= 100),
        sum(1 for r in ranks if 100 < r <= 1000),
        sum(1 for r in ranks if r > 1000),
    ]
    assert ranks[: len(RANKS)] == RANKS  # the ranks the text was built with
    assert buckets[:3] == [5, 4, 4] and buckets[3] >= 3
    n = len(rows)
    fast = (sum(r["logprob"] for r in rows) - sum(r["mu"] for r in rows)) / math.sqrt(sum(r["var"] for r in rows))
    expected = {
        "log_likelihood": sum(r["logprob"] for r in rows) / n,
        "log_rank": sum(math.log(r) for r in ranks) / n,
        "entropy": sum(r["entropy"] for r in rows) / n,
        **{name: count / n for name, count in zip(BUCKET_NAMES, buckets)},
        "fast_detectgpt": fast,
        "binoculars": (-sum(r["logprob"] for r in rows) / n) / (sum(r["cross"] for r in rows) / n),
    }
    scores = document_scores(table)
    assert scores.keys() == expected.keys()
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_long_text_is_scored_in_windows_every_token_once():
    tok = Tokenizer.gpt2()
    model = tiny_model(0, block_size=16)
    tokens = tok.encode_ordinary(TEXT)
    assert len(tokens) > 2 * 16
    table = token_stats(model, tok, tokens, stride=8)
    assert table.tokens == tokens
    first = direct_rows(model, tokens[:15], tok.eot_token)  # the first window reads the text from its start
    assert [round(r["logprob"], 3) for r in first] == [round(v, 3) for v in table.logprob[:15].tolist()]
    seq = [tok.eot_token, *tokens]
    with torch.no_grad():  # windows score seq[1:17], seq[17:25], seq[25:33]...; the third reads seq[16:32]
        j = 26
        expected = torch.log_softmax(model(torch.tensor([seq[16:j]]))[0, -1], -1)[seq[j]].item()
    assert table.logprob[j - 1].item() == pytest.approx(expected, abs=1e-4)
    assert j - 16 >= 16 - 8  # at least block - stride tokens of context


def test_token_texts_join_to_the_text_even_inside_multibyte_characters():
    tok = Tokenizer.gpt2()
    tokens = tok.encode_ordinary(TEXT)
    assert "".join(token_texts(tok, tokens)) == TEXT


def test_verdicts_and_errors(tmp_path):
    tok = Tokenizer.gpt2()
    model = tiny_model(0, block_size=128)
    rule = Rule(threshold=-1e9, min_tokens=8)
    assert judge_text(model, tok, TEXT, "doc", rule).verdict == "generated"
    assert judge_text(model, tok, TEXT, "doc", Rule(threshold=1e9, min_tokens=8)).verdict == "human"
    assert judge_text(model, tok, "Hi there", "doc", rule).verdict == "too short"
    with pytest.raises(GptwoError, match="empty"):
        judge_text(model, tok, "", "doc", rule)
    with pytest.raises(GptwoError, match="needs a second model"):
        judge_text(model, tok, TEXT, "doc", Rule(detector="binoculars"))


def test_reference_with_another_tokenizer_is_refused(tmp_path):
    other = Tokenizer.train([TEXT * 3, "some other words to learn from"], vocab_size=300)
    save_tiny(str(tmp_path / "m"))
    save_tiny(str(tmp_path / "r"), seed=1, tokenizer=other)
    with pytest.raises(GptwoError, match="another tokenizer"):
        load_models(str(tmp_path / "m"), str(tmp_path / "r"), device="cpu")
