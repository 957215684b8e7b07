"""Calibration: how well each statistic separates human from generated text, and the threshold to use.

AUROC is the probability that a generated text scores above a human one (ties count half; the
Mann-Whitney statistic). The threshold is chosen for a false-positive budget: the lowest score
that at most `max_fpr` of the human texts exceed, so people are rarely accused; TPR at that
threshold is reported beside AUROC. No scikit-learn: these are a few lines of numpy.

Calibration also fits the supervised detector (`detect/classifier.py`) and makes it the saved
detector. Its AUROC and TPR are measured honestly: by k-fold cross-validation split by source
document (from the set's `sample.json`, else by file name, so a human passage and the continuation
of its opening stay together), each document scored by a classifier fit without its fold. The
saved classifier is then fit on every document; its threshold comes from the out-of-fold human scores.

A calibration is fitted to the generated text it was given, and a detector sees only text, never how it was
sampled: a classifier fitted on top-k-40 samples learns their traits and may call a plain temperature-1 sample
human. So the calibration records what it was fitted for (the sampling settings in each --generated set's
sample.json), says so in its table and in every verdict's rule, reports the uncalibrated default on the same texts
beside it, and takes --generated once per setting to fit them all.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from gptwo.detect import DEFAULT_MIN_TOKENS
from gptwo.detect.classifier import Lexicon, cross_validate, document_features, feature_matrix, fit_logistic
from gptwo.detect.detector import CALIBRATION_FILE, Rule, judge_text, load_models
from gptwo.detect.documents import read_folder, split_documents
from gptwo.detect.stats import DIRECTION
from gptwo.errors import GptwoError
from gptwo.fileio import PNG_MAGIC, atomic_write


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(positive > negative) + P(equal) / 2, from average ranks (the Mann-Whitney U statistic)."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if not len(pos) or not len(neg):
        raise GptwoError("AUROC needs at least one text of each kind", "give both human and generated texts")
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    start = 0
    for end in range(1, len(both) + 1):  # average rank over each run of equal values
        if end == len(both) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def threshold_at_fpr(negative: Sequence[float], max_fpr: float) -> float:
    """The lowest threshold t with at most `max_fpr` of `negative` strictly above t."""
    neg = np.sort(np.asarray(negative, dtype=float))[::-1]
    allowed = int(math.floor(max_fpr * len(neg) + 1e-9))
    return float(neg[min(allowed, len(neg) - 1)])


def tpr_at(positive: Sequence[float], threshold: float) -> float:
    return float(np.mean(np.asarray(positive, dtype=float) > threshold))


def roc_curve(positive: Sequence[float], negative: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); "generated" means score >= threshold."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    cuts = np.unique(np.concatenate([pos, neg]))[::-1]
    fpr = np.array([0.0, *[(neg >= c).mean() for c in cuts]])
    tpr = np.array([0.0, *[(pos >= c).mean() for c in cuts]])
    return fpr, tpr


def evaluate(
    generated: list[dict[str, float]], human: list[dict[str, float]], max_fpr: float = 0.01
) -> dict[str, dict]:
    """Per statistic: AUROC, the threshold at `max_fpr`, TPR and FPR there — on signed scores (larger = generated)."""
    report = {}
    for name in DIRECTION:
        if name not in generated[0]:
            continue
        pos = [DIRECTION[name] * s[name] for s in generated]
        neg = [DIRECTION[name] * s[name] for s in human]
        threshold = threshold_at_fpr(neg, max_fpr)
        report[name] = {
            "auroc": auroc(pos, neg),
            "tpr": tpr_at(pos, threshold),
            "fpr": tpr_at(neg, threshold),
            "threshold": threshold,
        }
    return report


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str, title: str) -> None:
    """One ROC curve per statistic, on a linear and a log false-positive axis (the log axis shows the low-FPR end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for name, (fpr, tpr, area) in curves.items():
        for ax in axes:
            ax.plot(fpr, tpr, label=f"{name} ({area:.3f})", drawstyle="steps-post")
    axes[0].plot([0, 1], [0, 1], color="#bbb", linestyle=":")
    axes[1].set_xscale("log")
    axes[1].set_xlim(1e-3, 1)
    for ax, what in zip(axes, ("ROC", "ROC, log false-positive rate")):
        ax.set(xlabel="false-positive rate (human called generated)", ylabel="true-positive rate", title=what)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="statistic (AUROC)")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def check_outputs(out: str, plot: str, lexicon: str | None) -> None:
    """Refuse to write over a file that is not an earlier output of the same kind (a calibration JSON,
    its lexicon, a PNG plot) or over a folder, and three outputs that are one file."""
    paths = {"--out": out, "--plot": plot, **({"the lexicon": lexicon} if lexicon else {})}
    if len({os.path.realpath(p) for p in paths.values()}) < len(paths):
        raise GptwoError(f"--out {out} and --plot {plot} are the same file", "give the plot another name (a .png)")
    for what, path in paths.items():
        if os.path.isdir(path):
            raise GptwoError(f"{what} {path} is a folder", "give a file name")
        if not os.path.exists(path):
            continue
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 16)
        except OSError as err:
            raise GptwoError(f"cannot read {path} ({err.strerror})", "check the file's permissions") from None
        if what == "--plot":
            ours = head.startswith(PNG_MAGIC)
        else:
            key = b'"detector"' if what == "--out" else b'"gptwo-detect-lexicon"'
            ours = head.lstrip().startswith(b"{") and key in head
        if not ours:
            kind = "a PNG image" if what == "--plot" else "an earlier output of 'gptwo detect calibrate'"
            raise GptwoError(f"{what} {path} exists and is not {kind}", "choose another path, or remove that file")


def score_folder(
    model, tokenizer, folder: str, rule: Rule, reference=None, stride: int | None = None, lexicon: Lexicon | None = None
) -> tuple[list[str], list[dict[str, float]], list[dict[str, float]]]:
    """(file names, statistics, classifier features) of each long-enough document in `folder`; shorter ones are left out
    with a note."""
    names, scores, features, short = [], [], [], 0
    for path, text in read_folder(folder):
        doc = judge_text(model, tokenizer, text, path, rule, reference=reference, stride=stride, top=1)
        if doc.verdict == "too short":
            short += 1
            continue
        bad = [name for name, value in doc.scores.items() if not math.isfinite(value)]
        if bad:
            raise GptwoError(
                f"the model gives {path} a non-finite {bad[0]} ({doc.scores[bad[0]]})",
                "check the model's weights (NaN or inf) and its --reference",
            )
        names.append(os.path.basename(path))
        scores.append(doc.scores)
        features.append(document_features(doc.table, text, lexicon))
    if short:
        print(
            f"note: {short} document(s) in {folder} have fewer than {rule.min_tokens} tokens and were left out",
            file=sys.stderr,
        )
    if len(scores) < 2:
        raise GptwoError(
            f"{folder} has {len(scores)} document(s) of at least {rule.min_tokens} tokens",
            "give at least two (ideally hundreds) per kind",
        )
    return names, scores, features


def source_groups(folder: str, names: list[str]) -> list:
    """The source document of each file, from the set's sample.json (written by 'gptwo detect sample'), else the file
    name itself."""
    path = os.path.join(os.path.dirname(os.path.normpath(folder)), "sample.json")
    try:
        with open(path, encoding="utf-8") as f:
            documents = json.load(f)["documents"]
        return [int(documents[int(os.path.splitext(name)[0])]) for name in names]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return list(names)


def load_lexicon(source: str | None, tokenizer) -> Lexicon | None:
    """Word counts of training text: a prepared data folder's train split, or a folder of .txt files (None: no
    lexicon)."""
    if source is None:
        return None
    if os.path.isfile(os.path.join(source, "meta.json")):
        return Lexicon.from_texts(tokenizer.decode(doc) for doc in split_documents(source, tokenizer, "train"))
    return Lexicon.from_texts(text for _, text in read_folder(source))


def sampling_setting(generated_dir: str) -> dict | None:
    """How a set's generated texts were sampled ({temperature, top_k, top_p}), from the sample.json that 'gptwo detect
    sample' writes beside the folder; None when there is none."""
    path = os.path.join(os.path.dirname(os.path.normpath(generated_dir)), "sample.json")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        return {key: summary[key] for key in ("temperature", "top_k", "top_p")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_setting(setting: dict | None) -> str:
    """'samples at temperature 1, top-k 40' (the settings that differ from plain sampling are named)."""
    if setting is None:
        return "generated text of unknown sampling (no sample.json beside the folder)"
    parts = [f"temperature {setting['temperature']:g}"]
    if setting.get("top_k"):
        parts.append(f"top-k {setting['top_k']}")
    if setting.get("top_p") not in (None, 1, 1.0):
        parts.append(f"top-p {setting['top_p']:g}")
    return "samples at " + ", ".join(parts)


def fit_classifier(human: tuple, generated: tuple, groups: tuple[list, list], folds: int, l2: float) -> tuple:
    """Out-of-fold classifier logits (added to each document's statistics), the fold sizes, and the classifier fit on
    everything; `groups` are the source documents of the human and the generated texts (folds keep each whole)."""
    names = list(human[2][0])
    xh, xg = feature_matrix(human[2], names), feature_matrix(generated[2], names)
    oof_h, oof_g, sizes = cross_validate(xh, xg, groups[0], groups[1], names, folds, l2)
    for row, value in zip(human[1], oof_h):
        row["classifier"] = float(value)
    for row, value in zip(generated[1], oof_g):
        row["classifier"] = float(value)
    final = fit_logistic(np.concatenate([xh, xg]), np.r_[np.zeros(len(xh)), np.ones(len(xg))], names, l2)
    return sizes, final


def calibrate(
    model_spec: str,
    human_dir: str,
    generated_dir: str | Sequence[str],
    *,
    reference_spec: str | None = None,
    detector: str = "classifier",
    max_fpr: float = 0.01,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    out: str | None = None,
    plot: str | None = None,
    stride: int | None = None,
    device: str = "auto",
    lexicon: str | None = "auto",
    folds: int = 5,
    l2: float = 1e-3,
    adapter: str | None = None,
    merge: bool = False,
) -> dict:
    """Score both folders, report every statistic and the cross-validated classifier, save the detector (JSON) and a ROC
    plot (PNG). `generated_dir` may be several folders (one per sampling setting), pooled. With a LoRA `adapter`
    the scored model is the base with it, and the detector goes into the adapter's folder by default."""
    generated_dirs = [generated_dir] if isinstance(generated_dir, str) else list(generated_dir)
    if not generated_dirs:
        raise GptwoError("no --generated folder", "give at least one folder of generated texts")
    if detector not in DIRECTION:
        raise GptwoError(f"unknown detector '{detector}'", f"use one of: {', '.join(DIRECTION)}")
    if detector == "binoculars" and not reference_spec:
        raise GptwoError("the binoculars detector needs a second model", "pass --reference")
    if not (isinstance(max_fpr, (int, float)) and 0 <= max_fpr < 1):  # NaN fails the comparison too
        raise GptwoError(f"--max-fpr {max_fpr} is not in [0, 1)", "use e.g. 0.01")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise GptwoError(f"--folds {folds!r} must be a whole number of at least 2", "use e.g. 5")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise GptwoError(f"--min-tokens {min_tokens!r} must be a whole number of at least 1", "use e.g. 32")
    for folder in generated_dirs:
        if os.path.isdir(human_dir) and os.path.isdir(folder) and os.path.samefile(human_dir, folder):
            raise GptwoError(
                f"--human and --generated are the same folder ({human_dir})",
                "give the human-written texts and the generated ones in two folders (e.g. from 'gptwo detect sample')",
            )
    if out is None:
        home = adapter or model_spec
        if not os.path.isdir(home):
            raise GptwoError(
                f"'{home}' is not a local {'adapter' if adapter else 'model'} folder, so the calibration cannot go "
                "beside it",
                "pass --out FILE",
            )
        out = os.path.join(home, CALIBRATION_FILE)
    plot = plot or os.path.splitext(out)[0] + "-roc.png"
    lexicon_out = os.path.splitext(out)[0] + "-lexicon.json"
    check_outputs(out, plot, lexicon_out if lexicon is not None and detector == "classifier" else None)
    model, tokenizer, reference = load_models(model_spec, reference_spec, device, adapter, merge)
    if lexicon == "auto":  # the model's own prepared data, when it is a gptwo run folder
        lexicon = (
            os.path.join(model_spec, "data") if os.path.isfile(os.path.join(model_spec, "data", "meta.json")) else None
        )
    words = load_lexicon(lexicon, tokenizer)
    rule = Rule(min_tokens=min_tokens)
    human = score_folder(model, tokenizer, human_dir, rule, reference, stride, words)
    generated, generated_groups = ([], [], []), []
    for folder in generated_dirs:
        part = score_folder(model, tokenizer, folder, rule, reference, stride, words)
        generated = tuple(mine + theirs for mine, theirs in zip(generated, part))
        generated_groups += source_groups(folder, part[0])
    groups = (source_groups(human_dir, human[0]), generated_groups)
    sources = len(set(groups[0]) | set(groups[1]))
    if sources < folds:
        print(
            f"warning: --folds {folds} but the texts come from only {sources} source document(s): "
            f"cross-validating with {sources} folds; give at least {folds} documents for {folds}",
            file=sys.stderr,
        )
    sizes, classifier = fit_classifier(human, generated, groups, folds, l2)
    stats = evaluate(generated[1], human[1], max_fpr)
    lexicon_file = lexicon_out if words is not None and detector == "classifier" else None
    settings = [sampling_setting(folder) for folder in generated_dirs]
    default = Rule()
    saved = {
        "detector": detector,
        "threshold": stats[detector]["threshold"],
        "direction": DIRECTION[detector],
        "min_tokens": min_tokens,
        "max_fpr": max_fpr,
        # what it was fitted on: text sampled otherwise is not what it learned, and may be called human
        "fitted_for": "; ".join(dict.fromkeys(describe_setting(setting) for setting in settings)),
        "sampling": settings,
        # the uncalibrated default (gptwo.detect.detector.Rule()) on the same texts, for comparison
        "default_detector": {
            "rule": f"{default.detector} > {default.threshold:g}",
            "tpr": tpr_at([default.score(g) for g in generated[1]], default.threshold),
            "fpr": tpr_at([default.score(h) for h in human[1]], default.threshold),
        },
        "model": model_spec,
        "reference": reference_spec,
        "human": human_dir,
        "generated": generated_dirs[0] if len(generated_dirs) == 1 else generated_dirs,
        "documents": {"human": len(human[1]), "generated": len(generated[1])},
        "statistics": stats,
        "classifier_evaluation": {
            "method": f"{len(sizes)}-fold cross-validation, split by source document",
            "lexicon": lexicon,
            "folds": sizes,
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if detector == "classifier":
        saved.update(classifier=classifier.to_dict(), lexicon=lexicon_file and os.path.basename(lexicon_file))
        if lexicon_file:
            atomic_write(lexicon_file, words.to_json().encode())
    atomic_write(out, (json.dumps(saved, indent=2) + "\n").encode())
    curves = {}
    for name in stats:
        pos, neg = [DIRECTION[name] * s[name] for s in generated[1]], [DIRECTION[name] * s[name] for s in human[1]]
        curves[name] = (*roc_curve(pos, neg), stats[name]["auroc"])
    plot_roc(
        curves,
        plot,
        f"{os.path.basename(os.path.normpath(model_spec))}: {len(human[1])} human vs {len(generated[1])} generated "
        f"({saved['fitted_for']})",
    )
    return {**saved, "calibration": out, "plot": plot}


def render_calibration(report: dict) -> str:
    """The calibration report as a table."""
    fpr = report["max_fpr"]
    evaluation = report["classifier_evaluation"]
    test = sum(f["test"]["human"] + f["test"]["generated"] for f in evaluation["folds"])
    train = [f["train"]["human"] + f["train"]["generated"] for f in evaluation["folds"]]
    lines = [
        f"{report['documents']['human']} human, {report['documents']['generated']} generated documents",
        f"fitted for: {report['fitted_for']}. The detector sees only text, never how it was sampled: text sampled "
        "otherwise (another temperature, top-k or top-p) may be called human. To cover several settings, "
        "give --generated once per setting.",
        "",
        f"{'statistic':<16} {'AUROC':>7} {f'TPR@{fpr:.0%}FPR':>12}  generated when",
    ]
    for name, row in report["statistics"].items():
        mark = (
            "  <- detector" if name == report["detector"] else ("  (inverted: below 0.5)" if row["auroc"] < 0.5 else "")
        )
        lines.append(f"{name:<16} {row['auroc']:>7.4f} {row['tpr']:>12.3f}  {_rule_text(name, row['threshold'])}{mark}")
    default = report.get("default_detector")
    if default:
        lines.append(
            f"{'default':<16} {'':>7} {default['tpr']:>12.3f}  {default['rule']} (uncalibrated; "
            f"{default['fpr']:.1%} of these human texts above it)"
        )
    lines += [
        "",
        "generated when: the statistic on its own scale (log_likelihood and fast_detectgpt can be negative); "
        "classifier: the log-odds that a text is generated, with the probability it stands for",
        "",
        f"classifier: {evaluation['method']} ({test} documents scored out of fold, each fold fit on "
        f"{min(train)}-{max(train)}); "
        f"lexicon: {evaluation['lexicon'] or 'none'}",
        f"detector saved to {report['calibration']}; ROC plot: {report['plot']}",
    ]
    return "\n".join(lines)


def _rule_text(name: str, threshold: float) -> str:
    """A saved threshold (on the signed score, larger = generated) as the statistic's own comparison: `< 2.05` for
    a statistic where generated text scores lower, `> -2.2 (p > 0.10)` for the classifier's log-odds."""
    if DIRECTION[name] < 0:
        return f"< {-threshold:.4g}"
    if name == "classifier":
        return f"> {threshold:.4g} (p > {1 / (1 + math.exp(-threshold)):.2g})"
    return f"> {threshold:.4g}"
