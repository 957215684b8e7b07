"""Per-token statistics of a text under a model, and the per-document statistics that detectors use.

For each token x_i the model's distribution p(. | x_<i) gives: ℓ_i = log p(x_i), the rank of x_i
(1 = the most likely token), the entropy H_i, and the mean and variance of ℓ(v) for v ~ p — the
pieces of GLTR's rank buckets (Gehrmann et al., 2019), Fast-DetectGPT's analytic sampling
discrepancy (Bao et al., 2024) and, with a second model, Binoculars (Hans et al., 2024).

A text longer than the model's context is scored in sliding windows (`eval.scoring.rolling_pairs`):
every token is scored exactly once, and every token after the first window sees at least
`block - stride` tokens of context (default stride: half the context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptwo.errors import GptwoError
from gptwo.eval.scoring import model_device, rolling_pairs
from gptwo.tokenizer import Tokenizer

BUCKETS = (10, 100, 1000)  # GLTR's rank buckets: top-10, 11-100, 101-1000, the rest
BUCKET_NAMES = ("gltr_top10", "gltr_top100", "gltr_top1000", "gltr_rest")
# +1: a larger value means "more likely generated"; -1: a smaller one does. Scores are sign * value.
DIRECTION = {
    "log_likelihood": 1,
    "log_rank": -1,
    "entropy": -1,
    "gltr_top10": 1,
    "gltr_top100": -1,
    "gltr_top1000": -1,
    "gltr_rest": -1,
    "fast_detectgpt": 1,
    "binoculars": -1,
    "classifier": 1,  # the calibrated supervised detector's logit (detect/classifier.py)
}


@dataclass
class TokenTable:
    """Per-token statistics of one text (all tensors of length T, on the CPU)."""

    tokens: list[int]
    logprob: torch.Tensor  # log p(x_i | x_<i), nats
    rank: torch.Tensor  # 1 + number of tokens more likely than x_i
    entropy: torch.Tensor  # H(p(. | x_<i)), nats
    variance: torch.Tensor  # Var_{v~p} log p(v): Fast-DetectGPT's σ_i²
    top_ids: torch.Tensor  # (T, k) the k most likely tokens
    top_logprobs: torch.Tensor  # (T, k) their log-probabilities
    cross_entropy: torch.Tensor | None = None  # -Σ_v p_ref(v) log p(v), with a reference model

    def __len__(self) -> int:
        return len(self.tokens)


def token_stats_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, top: int = 10, reference_logits: torch.Tensor | None = None
) -> TokenTable:
    """Statistics of `targets` (T,) under `logits` (T, V); the logits cover exactly the real vocabulary."""
    logp = F.log_softmax(logits.double(), dim=-1)
    probs = logp.exp()
    target_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
    rank = 1 + (logp > target_logp[:, None]).sum(-1)
    mean = (probs * logp).sum(-1)  # μ_i = -H_i
    variance = ((probs * logp * logp).sum(-1) - mean * mean).clamp(min=0.0)
    top_logprobs, top_ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    cross = None
    if reference_logits is not None:
        ref_probs = F.softmax(reference_logits.double(), dim=-1)
        cross = -(ref_probs * logp).sum(-1)
    return TokenTable(
        targets.tolist(),
        target_logp.float(),
        rank,
        (-mean).float(),
        variance.float(),
        top_ids,
        top_logprobs.float(),
        None if cross is None else cross.float(),
    )


def _window_logits(model: torch.nn.Module, ids: list[int], scored: int, n_vocab: int) -> torch.Tensor:
    """Logits (scored, n_vocab) of the last `scored` positions of one window."""
    x = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    return model(x)[0, -scored:, :n_vocab].float().cpu()


@torch.no_grad()
def token_stats(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tokens: list[int],
    *,
    reference: torch.nn.Module | None = None,
    stride: int | None = None,
    top: int = 10,
) -> TokenTable:
    """Per-token statistics of `tokens`, read after an <|endoftext|> prefix, in windows when longer than the context."""
    if not tokens:
        raise GptwoError("the text is empty", "give some text to score")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise GptwoError(f"top={top!r} alternatives per token is not a whole number >= 0", "use e.g. 10")
    block = model.config.block_size if reference is None else min(model.config.block_size, reference.config.block_size)
    stride = max(1, block // 2) if stride is None else stride  # rolling_pairs checks it is in 1..block
    parts = []
    for context, continuation in rolling_pairs(tokens, tokenizer.eot_token, block, stride):
        ids = [*context, *continuation][-(block + 1) :][:-1]
        logits = _window_logits(model, ids, len(continuation), tokenizer.n_vocab)
        ref = None if reference is None else _window_logits(reference, ids, len(continuation), tokenizer.n_vocab)
        parts.append(token_stats_from_logits(logits, torch.tensor(list(continuation)), top, ref))
    return _concat(parts)


def _concat(parts: list[TokenTable]) -> TokenTable:
    """One table from the tables of consecutive windows."""

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    cross = cat("cross_entropy") if parts[0].cross_entropy is not None else None
    tokens = [t for p in parts for t in p.tokens]
    return TokenTable(
        tokens, cat("logprob"), cat("rank"), cat("entropy"), cat("variance"), cat("top_ids"), cat("top_logprobs"), cross
    )


def bucket_of(rank: torch.Tensor) -> torch.Tensor:
    """GLTR bucket index of each rank: 0 top-10, 1 top-100, 2 top-1000, 3 the rest."""
    return torch.bucketize(rank, torch.tensor(BUCKETS, dtype=rank.dtype), right=False)


def document_scores(table: TokenTable) -> dict[str, float]:
    """Every per-document statistic by name (see DIRECTION for which way each points)."""
    logprob, entropy = table.logprob.double(), table.entropy.double()
    counts = torch.bincount(bucket_of(table.rank), minlength=len(BUCKETS) + 1).double() / len(table)
    # Fast-DetectGPT, analytic, sampling and scoring model the same: D = (Σ ℓ_i - Σ μ_i) / sqrt(Σ σ_i²), μ_i = -H_i
    spread = math.sqrt(max(float(table.variance.double().sum()), 1e-12))
    scores = {
        "log_likelihood": float(logprob.mean()),
        "log_rank": float(table.rank.double().log().mean()),
        "entropy": float(entropy.mean()),
        **{name: float(value) for name, value in zip(BUCKET_NAMES, counts)},
        "fast_detectgpt": float((logprob + entropy).sum()) / spread,
    }
    if table.cross_entropy is not None:  # Binoculars: log-perplexity over cross-perplexity
        scores["binoculars"] = float(-logprob.mean() / table.cross_entropy.double().mean().clamp(min=1e-12))
    return scores
