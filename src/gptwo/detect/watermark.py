"""Is this text watermarked? The green-token z-test of Kirchenbauer et al. (2023) on a text's tokens.

The green lists and the count are gptwo.watermark's (transformers' arithmetic); this module turns the
count into what `gptwo detect --watermark` and `POST /v1/inspect` report: z, its p-value, the green
fraction, the tokens scored, and `detected` at z >= the threshold (4 by default: a false-positive rate of
3e-5 on text written without the watermark, whatever its source). Unlike the statistics of
gptwo.detect.stats it needs no model, only the key, the settings and the vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gptwo.errors import GptwoError
from gptwo.watermark import DETECT_Z, WatermarkScore, WatermarkSettings, watermark_for


@dataclass(frozen=True)
class WatermarkCheck:
    """How to look for a watermark: its settings, the z that counts as detected, whether repeated n-grams
    (a seed window and its token) count once."""

    settings: WatermarkSettings
    z_threshold: float = DETECT_Z
    ignore_repeated: bool = False

    def __post_init__(self) -> None:
        z = self.z_threshold
        if isinstance(z, bool) or not isinstance(z, int | float) or not math.isfinite(z):
            raise GptwoError(f"--watermark-z {z!r} is not a finite number", "use e.g. 4")

    def judge(self, tokens: Sequence[int], vocab_size: int) -> WatermarkResult:
        """The watermark test of a text's `tokens` under a model of `vocab_size` (its `config.vocab_size`)."""
        score = watermark_for(self.settings, vocab_size).score(tokens, self.ignore_repeated)
        return WatermarkResult(score, self)


@dataclass
class WatermarkResult:
    """One text's watermark test."""

    score: WatermarkScore
    check: WatermarkCheck

    @property
    def detected(self) -> bool:
        z = self.score.z
        return z is not None and z >= self.check.z_threshold

    @property
    def flags(self) -> list[bool | None]:
        """Per token: green, red, or None (not scored)."""
        return self.score.flags

    def to_dict(self) -> dict:
        score = self.score
        return {
            "z": score.z,
            "p_value": score.p_value,
            "green_fraction": score.green_fraction,
            "tokens_scored": score.tokens_scored,
            "green_tokens": score.green,
            "detected": self.detected,
            "z_threshold": self.check.z_threshold,
            "ignore_repeated": self.check.ignore_repeated,
            "settings": self.check.settings.public(),
        }

    def describe(self) -> str:
        """One line: z, p, the green count and the verdict."""
        score = self.score
        if not score.tokens_scored:
            return "watermark: no token to score (the text is shorter than the seed window)"
        verdict = "detected" if self.detected else "not detected"
        return (
            f"watermark: z {score.z:.2f} (p {score.p_value:.2g}) · {score.green}/{score.tokens_scored} tokens green "
            f"({score.green_fraction:.0%}, {score.gamma:.0%} expected) · {verdict} (z >= {self.check.z_threshold:g})"
        )
