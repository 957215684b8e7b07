"""The default detector and its verdict: a statistic, a threshold (calibrated or not), a minimum length.

Without a calibration the detector is Fast-DetectGPT's analytic statistic with the model itself as
sampling and scoring model (Bao et al., 2024): one forward pass, no second model. `gptwo detect
calibrate` fits a supervised detector (`detect/classifier.py`: a logistic regression on the zero-shot
statistics, rank and likelihood profiles and a lexicon of the training text) and writes it, with its
threshold, beside the model as `detect-calibration.json`; `detect` then uses it. `score` is the
detector's value signed so that larger means "more likely generated"; a text is `generated` when
its score is above the threshold. The verdict names the detector that gave it.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from gptwo.detect import DEFAULT_DETECTOR, DEFAULT_MIN_TOKENS
from gptwo.detect.classifier import Classifier, Lexicon, document_features
from gptwo.detect.stats import DIRECTION, TokenTable, document_scores, token_stats
from gptwo.detect.watermark import WatermarkCheck, WatermarkResult
from gptwo.errors import GptwoError
from gptwo.tokenizer import Tokenizer

# Uncalibrated fallback: text the model finds clearly more predictable than its own samples (whose D is
# about N(0, 1)). On the quickstart model's held-out text 7% of human passages score above 1, and all
# top-k-40 samples do; pure samples mostly do not (docs/detect.md). Calibrate for a real threshold.
DEFAULT_THRESHOLD = 1.0
CALIBRATION_FILE = "detect-calibration.json"


@dataclass(frozen=True)
class Rule:
    """How scores become a verdict: which statistic, the threshold on its signed score, the minimum length."""

    detector: str = DEFAULT_DETECTOR
    threshold: float = DEFAULT_THRESHOLD
    min_tokens: int = DEFAULT_MIN_TOKENS
    calibrated: bool = False
    source: str | None = None  # the calibration file, when calibrated
    classifier: Classifier | None = field(default=None, compare=False)  # detector "classifier": the fitted model
    lexicon: Lexicon | None = field(
        default=None, compare=False, repr=False
    )  # the classifier's word counts, when it uses them
    fitted_for: str | None = None  # the generated text a calibration was fitted on, e.g. "samples at top-k 40"

    def score(self, scores: dict[str, float]) -> float:
        return DIRECTION[self.detector] * scores[self.detector]

    def verdict(self, score: float, tokens: int) -> str:
        if tokens < self.min_tokens:
            return "too short"
        return "generated" if score > self.threshold else "human"

    def describe(self) -> str:
        if self.calibrated:
            fitted = f" for {self.fitted_for}" if self.fitted_for else ""
            return f"{self.detector} > {self.threshold:.4g} (calibrated{fitted}: {self.source})"
        return (
            f"{self.detector} > {self.threshold:.4g} (uncalibrated default; run 'gptwo detect calibrate' "
            "for a threshold fitted to your text)"
        )


def calibration_path(model_spec: str) -> str | None:
    """Where the calibration of a model folder lives (None for a hub id)."""
    return os.path.join(model_spec, CALIBRATION_FILE) if os.path.isdir(model_spec) else None


def load_rule(model_spec: str, calibration: str | None = None, min_tokens: int | None = None) -> Rule:
    """The rule from `calibration` (or the model folder's calibration file), else the uncalibrated default."""
    if min_tokens is not None and (isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1):
        raise GptwoError(f"--min-tokens {min_tokens!r} must be a whole number of at least 1", "use e.g. 32")
    path = calibration or calibration_path(model_spec)
    if calibration and not os.path.isfile(calibration):
        raise GptwoError(f"calibration file {calibration} not found", "run 'gptwo detect calibrate' or check the path")
    if not path or not os.path.isfile(path):
        return Rule(min_tokens=DEFAULT_MIN_TOKENS if min_tokens is None else min_tokens)
    saved = read_calibration(path)
    classifier, lexicon = _load_classifier(saved, path) if saved["detector"] == "classifier" else (None, None)
    return Rule(
        saved["detector"],
        float(saved["threshold"]),
        saved["min_tokens"] if min_tokens is None else min_tokens,
        True,
        path,
        classifier,
        lexicon,
        saved.get("fitted_for") if isinstance(saved.get("fitted_for"), str) else None,
    )


def _invalid(path: str, why: str) -> GptwoError:
    return GptwoError(f"{path} is not a valid calibration ({why})", "run 'gptwo detect calibrate' again")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_calibration(path: str) -> dict:
    """A calibration file as 'gptwo detect calibrate' writes it, checked field by field (one line per problem)."""
    try:
        with open(path, "rb") as f:
            saved = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid(path, "it is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise _invalid(path, f"it is cut short or not JSON: {err.msg}, line {err.lineno}") from None
    if not isinstance(saved, dict):
        raise _invalid(path, f"it holds a JSON {type(saved).__name__}, not an object")
    detector = saved.get("detector")
    if not isinstance(detector, str) or detector not in DIRECTION:
        raise GptwoError(f"{path} names an unknown detector {detector!r}", "run 'gptwo detect calibrate' again")
    if not _finite(saved.get("threshold")):
        raise _invalid(path, f"its threshold {saved.get('threshold')!r} is not a finite number")
    min_tokens = saved.get("min_tokens")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise _invalid(path, f"its min_tokens {min_tokens!r} is not a whole number of at least 1")
    if detector == "classifier":
        classifier = saved.get("classifier")
        if not isinstance(classifier, dict):
            raise _invalid(path, "the classifier detector has no 'classifier' object")
        names = classifier.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise _invalid(path, "the classifier's 'names' is not a list of feature names")
        for key in ("mean", "scale", "weights"):
            values = classifier.get(key)
            if not isinstance(values, list) or len(values) != len(names) or not all(map(_finite, values)):
                raise _invalid(path, f"the classifier's '{key}' is not {len(names)} finite numbers")
        if not all(v > 0 for v in classifier["scale"]):
            raise _invalid(path, "the classifier's 'scale' holds a value that is not positive")
        for key in ("bias", "l2"):
            if not _finite(classifier.get(key)):
                raise _invalid(path, f"the classifier's '{key}' is not a finite number")
        lexicon = saved.get("lexicon")
        if lexicon is not None and (
            not isinstance(lexicon, str)
            or not lexicon
            or os.path.basename(lexicon) != lexicon
            or lexicon in (".", "..")
        ):
            raise _invalid(path, f"its lexicon {lexicon!r} is not a file name beside it")
    return saved


def _load_classifier(saved: dict, path: str) -> tuple[Classifier, Lexicon | None]:
    """The saved classifier and, when its features need one, the lexicon file beside the calibration."""
    classifier = Classifier.from_dict(saved["classifier"])
    if not saved.get("lexicon"):
        return classifier, None
    lexicon_path = os.path.join(os.path.dirname(path), saved["lexicon"])
    if not os.path.isfile(lexicon_path):
        raise GptwoError(
            f"the lexicon {lexicon_path} that {path} needs is missing",
            "keep it beside the calibration, or run 'gptwo detect calibrate' again",
        )
    try:
        with open(lexicon_path, "rb") as f:
            lexicon = Lexicon.from_json(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise GptwoError(
            f"{lexicon_path} is not a valid lexicon ({type(err).__name__}: {str(err)[:120]})",
            "run 'gptwo detect calibrate' again",
        ) from None
    return classifier, lexicon


def token_texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, decoded incrementally, so that the pieces join to exactly the text."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return [decoder.decode(tokenizer.token_bytes(i)) for i in ids]


@dataclass
class Document:
    """One judged text: its per-token table, every statistic, the score and the verdict."""

    name: str
    table: TokenTable
    scores: dict[str, float]
    score: float
    verdict: str
    rule: Rule
    pieces: list[str] = field(default_factory=list)  # each token's text
    watermark: WatermarkResult | None = None  # the watermark test, when asked for

    def to_dict(self, tokenizer: Tokenizer, with_tokens: bool = False) -> dict:
        out = {
            "file": self.name,
            "tokens": len(self.table),
            "score": self.score,
            "verdict": self.verdict,
            "detector": self.rule.detector,
            "threshold": self.rule.threshold,
            "calibrated": self.rule.calibrated,
            "scores": self.scores,
        }
        if self.watermark is not None:
            out["watermark"] = self.watermark.to_dict()
        if with_tokens:
            out["token_stats"] = token_rows(self, tokenizer)
        return out


def token_rows(doc: Document, tokenizer: Tokenizer) -> list[dict]:
    """Per token: its text and id, probability, rank, entropy and the top alternatives with probabilities."""
    table = doc.table
    rows = []
    flags = doc.watermark.flags if doc.watermark is not None else None
    for i, piece in enumerate(doc.pieces):
        top = [[tokenizer.decode([int(t)]), float(lp.exp())] for t, lp in zip(table.top_ids[i], table.top_logprobs[i])]
        rows.append(
            {
                "token": piece,
                "id": table.tokens[i],
                "prob": float(table.logprob[i].exp()),
                "logprob": float(table.logprob[i]),
                "rank": int(table.rank[i]),
                "entropy": float(table.entropy[i]),
                "top": top,
                **({"green": flags[i]} if flags is not None else {}),
            }
        )
    return rows


def check_same_tokenizer(tokenizer: Tokenizer, reference_tokenizer: Tokenizer) -> None:
    """Binoculars compares two models' predictions token by token: they must share one tokenizer."""
    if tokenizer.identity != reference_tokenizer.identity:
        raise GptwoError(
            "the reference model uses another tokenizer than the model",
            "pass a --reference trained with the same tokenizer (e.g. on the same prepared data)",
        )


def judge_tokens(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tokens: list[int],
    name: str,
    rule: Rule,
    *,
    reference: torch.nn.Module | None = None,
    stride: int | None = None,
    top: int = 10,
    watermark: WatermarkCheck | None = None,
) -> Document:
    """Score a tokenized text and give its verdict; with `watermark`, also test it for that watermark."""
    if rule.detector == "binoculars" and reference is None:
        raise GptwoError(
            "the calibrated detector is binoculars, which needs a second model",
            "pass --reference (the model used when calibrating)",
        )
    table = token_stats(model, tokenizer, tokens, reference=reference, stride=stride, top=top)
    scores = document_scores(table)
    if rule.classifier is not None:
        scores["classifier"] = rule.classifier.score(document_features(table, tokenizer.decode(tokens), rule.lexicon))
    score = rule.score(scores)
    marked = None if watermark is None else watermark.judge(table.tokens, model.config.vocab_size)
    return Document(
        name,
        table,
        scores,
        score,
        rule.verdict(score, len(table)),
        rule,
        token_texts(tokenizer, table.tokens),
        marked,
    )


def judge_text(model: torch.nn.Module, tokenizer: Tokenizer, text: str, name: str, rule: Rule, **kwargs) -> Document:
    """Score a text and give its verdict; empty text is an error."""
    tokens = tokenizer.encode_ordinary(text)
    if not tokens:
        raise GptwoError(f"{name} is empty", "give text with at least one character")
    return judge_tokens(model, tokenizer, tokens, name, rule, **kwargs)


def load_models(
    model_spec: str, reference_spec: str | None, device: str = "auto", adapter: str | None = None, merge: bool = False
):
    """The model (with the LoRA `adapter` applied, unmerged or merged), its tokenizer, and the reference model (None
    without one; never adapted), checked to share the tokenizer."""
    from gptwo.weights import load_model

    model, tokenizer = load_model(model_spec, device=device, adapter=adapter, merge=merge)
    reference = None
    if reference_spec:
        reference, reference_tokenizer = load_model(reference_spec, device=device)
        check_same_tokenizer(tokenizer, reference_tokenizer)
    return model, tokenizer, reference


def read_inputs(files: list[str]) -> list[tuple[str, str]]:
    """(name, text) of each input file; '-' reads stdin. Empty inputs are errors."""
    from gptwo.eval.perplexity import read_text_file, text_of_bytes

    if not files:
        raise GptwoError("no input files", "pass one or more text files, or '-' for stdin")
    if files.count("-") > 1:
        raise GptwoError("'-' (stdin) is given more than once", "pass '-' once")
    inputs = []
    for path in files:
        if path == "-":
            inputs.append(("-", text_of_bytes(sys.stdin.buffer.read(), "stdin", "pipe some text in, or pass a file")))
        else:
            inputs.append((path, read_text_file(path)))
    return inputs


def detect_files(
    model_spec: str,
    files: list[str],
    *,
    reference_spec: str | None = None,
    calibration: str | None = None,
    min_tokens: int | None = None,
    stride: int | None = None,
    top: int = 10,
    device: str = "auto",
    watermark: WatermarkCheck | None = None,
    adapter: str | None = None,
    merge: bool = False,
) -> tuple[list[Document], Tokenizer]:
    """What `gptwo detect` reports: one judged Document per input (tested for `watermark` when given), and
    the tokenizer to show tokens with. With a LoRA `adapter` the scored model is the base with it, and its
    calibration is the one in the adapter's folder (where `gptwo detect calibrate --adapter` puts it)."""
    inputs = read_inputs(files)
    rule = load_rule(adapter or model_spec, calibration, min_tokens)
    model, tokenizer, reference = load_models(model_spec, reference_spec, device, adapter, merge)
    docs = [
        judge_text(model, tokenizer, text, name, rule, reference=reference, stride=stride, top=top, watermark=watermark)
        for name, text in inputs
    ]
    return docs, tokenizer


def render_document(doc: Document, tokenizer: Tokenizer, with_tokens: bool = False) -> str:
    """What `gptwo detect` prints for one text: optionally a row per token, then the scores and the verdict."""
    lines = []
    if with_tokens:
        lines.append(f"{'token':<18} {'prob':>8} {'rank':>6} {'entropy':>8}  top alternatives")
        for row in token_rows(doc, tokenizer):
            alternatives = ", ".join(f"{text!r} {p:.1%}" for text, p in row["top"][:5])
            lines.append(
                f"{row['token']!r:<18} {row['prob']:>8.2%} {row['rank']:>6} {row['entropy']:>8.3f}  {alternatives}"
            )
    verdict = (
        f"too short to judge (fewer than {doc.rule.min_tokens} tokens)" if doc.verdict == "too short" else doc.verdict
    )
    lines.append(f"{doc.name}: {len(doc.table)} tokens · score {doc.score:.4f} · verdict: {verdict}")
    lines.append(f"  rule: {doc.rule.describe()}")
    lines.append("  " + "  ".join(f"{name} {value:.4g}" for name, value in doc.scores.items()))
    if doc.watermark is not None:
        lines.append("  " + doc.watermark.describe())
    return "\n".join(lines)
