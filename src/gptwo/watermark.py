"""The green-list watermark of Kirchenbauer et al. (2023), as transformers implements it.

At each step a hash of the last token (`lefthash`) or of the candidate token itself (`selfhash`) seeds
a permutation of the vocabulary; its first `gamma` share is the green list, whose logits get `delta`
added after temperature, top-k and top-p. A detector counts the green tokens of a text and computes
z = (green - gamma T) / sqrt(T gamma (1 - gamma)).

The green lists are transformers' (`WatermarkLogitsProcessor`, `WatermarkDetector`), computed the same
way: a CPU `torch.Generator` seeded with key * token (lefthash), or with the smallest of key * (t[w] + 1)
* (t[c] + 1) in wrapping 64-bit arithmetic over the window (selfhash; t is a permutation of 1,000,003
seeded with the key), reduced mod 2^64 - 1, then `torch.randperm(vocab_size)`. So text watermarked
here is found by transformers' detector and the other way round (transformers on a GPU draws its
permutations from a CUDA generator: those differ, and so would its own detector on a CPU).

torch is imported where green lists are drawn, so the settings and their checks serve torch-free
modules too (the request protocol, the command line).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from gptwo.errors import GptwoError

if TYPE_CHECKING:
    import torch

DEFAULT_KEY = 15485863  # transformers' default hashing_key (the millionth prime): public, so anyone can detect
SCHEMES = ("lefthash", "selfhash")
KEY_ENV = "GPTWO_WATERMARK_KEY"
MAX_KEY = 2**63 - 1  # selfhash multiplies the key into int64 tensors
MAX_CONTEXT_WIDTH = 64
DETECT_Z = 4.0  # z at or above it: watermarked (a false-positive rate of 3e-5 for unwatermarked text)
TABLE_SIZE = 1_000_003  # selfhash's table of token hashes
SELFHASH_CANDIDATES = 40  # selfhash biases those of the 40 most likely tokens that are green for themselves
_SEED_MOD = 2**64 - 1


@dataclass(frozen=True)
class WatermarkSettings:
    """One watermark; the defaults are transformers' `WatermarkingConfig()`."""

    key: int = DEFAULT_KEY  # transformers' hashing_key
    gamma: float = 0.25  # greenlist_ratio: the share of the vocabulary that is green
    delta: float = 2.0  # bias: added to green logits
    scheme: str = "lefthash"  # seeding_scheme
    context_width: int = 1  # tokens hashed into the seed

    def __post_init__(self) -> None:
        if isinstance(self.key, bool) or not isinstance(self.key, int) or not 0 <= self.key <= MAX_KEY:
            raise GptwoError(f"watermark key {self.key!r} is not a whole number in [0, 2^63)", "use e.g. 15485863")
        gamma = self.gamma
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma < 1:
            raise GptwoError(f"watermark gamma {gamma!r} is not a fraction in (0, 1)", "use e.g. 0.25")
        delta = self.delta
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not (0 <= delta < math.inf):
            raise GptwoError(f"watermark delta {delta!r} is not a finite number >= 0", "use e.g. 2.0")
        if self.scheme not in SCHEMES:
            raise GptwoError(f"watermark scheme {self.scheme!r} is unknown", f"use one of {', '.join(SCHEMES)}")
        width = self.context_width
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_CONTEXT_WIDTH:
            raise GptwoError(
                f"watermark context width {width!r} is not a whole number in [1, {MAX_CONTEXT_WIDTH}]", "use e.g. 1"
            )

    def public(self) -> dict:
        """The settings without the key (what may be shown)."""
        return {k: v for k, v in asdict(self).items() if k != "key"}

    def transformers_config(self) -> dict:
        """These settings as transformers' `WatermarkingConfig` keywords."""
        return {
            "greenlist_ratio": self.gamma,
            "bias": self.delta,
            "hashing_key": self.key,
            "seeding_scheme": self.scheme,
            "context_width": self.context_width,
        }


def parse_key(text: str, where: str) -> int:
    """A watermark key given as text (an option or the environment): a whole number in [0, 2^63)."""
    text = text.strip()
    if not text:
        raise GptwoError(f"{where} is empty", f"give a whole number in [0, 2^63), or unset {KEY_ENV}")
    try:
        key = int(text)
    except ValueError:
        raise GptwoError(f"{where} {text[:20]!r} is not a whole number", "use a number in [0, 2^63)") from None
    if not 0 <= key <= MAX_KEY:
        raise GptwoError(f"{where} is outside [0, 2^63)", "use a smaller non-negative number")
    return key


def key_from_environment() -> int | None:
    """The key in GPTWO_WATERMARK_KEY, when it is set."""
    text = os.environ.get(KEY_ENV)
    return None if text is None else parse_key(text, KEY_ENV)


def settings_from_options(
    enabled: bool,
    *,
    key: int | None = None,
    gamma: float | None = None,
    delta: float | None = None,
    scheme: str | None = None,
    context_width: int | None = None,
    require_key: bool = False,
) -> WatermarkSettings | None:
    """The watermark the `--watermark*` options ask for (None without `--watermark`).

    The key is `--watermark-key`, else GPTWO_WATERMARK_KEY, else transformers' public default (an error
    with `require_key`). Settings given without `--watermark` are an error, not ignored.
    """
    given = {
        "--watermark-key": key,
        "--watermark-gamma": gamma,
        "--watermark-delta": delta,
        "--watermark-scheme": scheme,
        "--watermark-context-width": context_width,
    }
    if not enabled:
        stray = [name for name, value in given.items() if value is not None]
        if stray:
            raise GptwoError(f"{stray[0]} is given without --watermark", "add --watermark, or leave the setting out")
        return None
    if key is None:
        key = key_from_environment()
    if key is None and require_key:
        raise GptwoError(
            "--watermark needs a key here",
            f"pass --watermark-key K or set {KEY_ENV} (transformers' default {DEFAULT_KEY} is public)",
        )
    chosen = {"key": key, "gamma": gamma, "delta": delta, "scheme": scheme, "context_width": context_width}
    return WatermarkSettings(**{name: value for name, value in chosen.items() if value is not None})


def settings_from_args(args, require_key: bool = False) -> WatermarkSettings | None:
    """`settings_from_options` for the options `gptwo.argtypes.add_watermark_options` declares."""
    return settings_from_options(
        args.watermark,
        key=args.watermark_key,
        gamma=args.watermark_gamma,
        delta=args.watermark_delta,
        scheme=args.watermark_scheme,
        context_width=args.watermark_context_width,
        require_key=require_key,
    )


def _wrap64(value: int) -> int:
    """`value` as a signed 64-bit integer, wrapping as torch's int64 arithmetic does."""
    return (value + 2**63) % 2**64 - 2**63


@dataclass
class WatermarkScore:
    """A text's green-token count: `flags[i]` is True (green), False (red) or None (not scored: the first
    tokens, whose seed reaches before the text, and repeats of a scored n-gram when those are ignored)."""

    tokens_scored: int
    green: int
    gamma: float
    flags: list[bool | None]

    @property
    def z(self) -> float | None:
        if not self.tokens_scored:
            return None
        expected = self.gamma * self.tokens_scored
        return (self.green - expected) / math.sqrt(self.tokens_scored * self.gamma * (1 - self.gamma))

    @property
    def p_value(self) -> float | None:
        """The chance of at least this z in unwatermarked text (one-sided, normal approximation)."""
        z = self.z
        return None if z is None else 0.5 * math.erfc(z / math.sqrt(2))

    @property
    def green_fraction(self) -> float | None:
        return self.green / self.tokens_scored if self.tokens_scored else None


class Watermark:
    """The green lists of `settings` over a vocabulary of `vocab_size` (the model's `config.vocab_size`,
    as transformers takes it); thread-safe (each permutation draws from its own generator)."""

    def __init__(self, settings: WatermarkSettings, vocab_size: int):
        self.settings, self.vocab_size = settings, vocab_size
        self.green_size = int(vocab_size * settings.gamma)
        if not 0 < self.green_size < vocab_size:
            raise GptwoError(
                f"watermark gamma {settings.gamma} leaves {self.green_size} of {vocab_size} tokens green",
                "use a gamma that makes at least one token green and one red",
            )
        self.green_mask = functools.lru_cache(maxsize=1024)(self._green_mask)
        self._self_green = functools.lru_cache(maxsize=1 << 16)(self._is_self_green)

    @functools.cached_property
    def _table(self) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.settings.key)
        return torch.randperm(TABLE_SIZE, generator=generator).tolist()

    def seed(self, window: Sequence[int]) -> int:
        """The generator seed for the green list after `window` (its last `context_width` tokens count;
        for selfhash the window ends with the token being judged)."""
        window = window[-self.settings.context_width :]
        key = self.settings.key
        if self.settings.scheme == "lefthash":
            return key * window[-1] % _SEED_MOD
        last = self._table[window[-1] % TABLE_SIZE] + 1
        return min(_wrap64(_wrap64(key * (self._table[t % TABLE_SIZE] + 1)) * last) for t in window) % _SEED_MOD

    def _permutation(self, seed: int) -> torch.Tensor:
        import torch

        return torch.randperm(self.vocab_size, generator=torch.Generator().manual_seed(seed))

    def green_ids(self, window: Sequence[int]) -> torch.Tensor:
        """The green token ids after `window`, in the order transformers lists them."""
        return self._permutation(self.seed(window))[: self.green_size]

    def _green_mask(self, seed: int) -> torch.Tensor:
        import torch

        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self._permutation(seed)[: self.green_size]] = True
        return mask

    def _is_self_green(self, window: tuple[int, ...]) -> bool:
        return bool((self.green_ids(window) == window[-1]).any())

    def is_green(self, context: Sequence[int], token: int) -> bool:
        """Whether `token` is green after `context` (the tokens before it)."""
        if self.settings.scheme == "selfhash":
            return self._self_green((*context[len(context) - self.settings.context_width + 1 :], token))
        return bool(self.green_mask(self.seed(context))[token])

    def bias(self, logits: torch.Tensor, context: Sequence[int]) -> torch.Tensor | None:
        """What to add to one row of next-token `logits` (V,) after `context`: delta on its green tokens
        (None while the context is shorter than the seed needs). For selfhash: those of the 40 highest
        logits that are green for themselves."""
        import torch

        width = self.settings.context_width
        if len(context) < width:
            return None
        vocab = logits.shape[-1]
        if self.settings.scheme == "lefthash":
            mask = self.green_mask(self.seed(context))[:vocab]
        else:
            head = tuple(context[len(context) - width + 1 :]) if width > 1 else ()
            candidates = torch.topk(logits, min(SELFHASH_CANDIDATES, vocab)).indices.tolist()
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[[c for c in candidates if self._self_green((*head, c))]] = True
        return mask.to(logits.device) * self.settings.delta

    def score(self, tokens: Sequence[int], ignore_repeated: bool = False) -> WatermarkScore:
        """Count the green tokens of `tokens` as transformers' `WatermarkDetector` does (it also drops a
        leading BOS token; give the text's tokens alone). With `ignore_repeated`, each distinct n-gram
        (seed window + token) counts once."""
        start = self.settings.context_width - (self.settings.scheme == "selfhash")
        flags: list[bool | None] = [None] * len(tokens)
        seen: set[tuple[int, ...]] = set()
        for i in range(start, len(tokens)):
            if ignore_repeated:
                ngram = tuple(tokens[i - start : i + 1])
                if ngram in seen:
                    continue
                seen.add(ngram)
            flags[i] = self.is_green(tokens[max(0, i - self.settings.context_width) : i], tokens[i])
        scored = [f for f in flags if f is not None]
        return WatermarkScore(len(scored), sum(scored), self.settings.gamma, flags)


@functools.lru_cache(maxsize=16)
def watermark_for(settings: WatermarkSettings, vocab_size: int) -> Watermark:
    """The shared `Watermark` of these settings (its green lists cached across calls and requests)."""
    return Watermark(settings, vocab_size)


def watermark_logits(
    logits: torch.Tensor, marks: Sequence[Watermark | None], contexts: Sequence[Sequence[int]]
) -> torch.Tensor:
    """`logits` (B, V) with each row's watermark bias added (rows whose mark is None are left as they are)."""
    import torch

    biases = [None if mark is None else mark.bias(row, ctx) for mark, row, ctx in zip(marks, logits, contexts)]
    if all(b is None for b in biases):
        return logits
    zero = torch.zeros(logits.shape[-1], device=logits.device)
    return logits + torch.stack([zero if b is None else b for b in biases])
