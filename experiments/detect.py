"""Detection benchmark: can each statistic tell held-out human text from the model's own continuations?

Human passages: the validation documents of the model's prepared data (for the quickstart model,
the built-in corpus' held-out documents), cut into non-overlapping passages of prompt + new tokens.
Generated: the model's continuation of each passage's first `--prompt-tokens` tokens, as long as
the rest (`gptwo detect sample`), under two sampling settings: temperature 1.0, and top-k 40.
Each set goes through `gptwo detect calibrate`: AUROC and TPR at 1% FPR of every zero-shot statistic
(no fitting) and of the supervised classifier, whose figures are out of fold (5-fold cross-validation
split by source document: no passage of a test document, human or its continuation, is used to fit),
and a ROC plot per setting. The classifier's lexicon is the model's training split (MODEL/data).
Prints a table and writes experiments/results/detect/{SETTING}/… and experiments/results/detect.json.

    gptwo quickstart --out runs/qs
    python experiments/detect.py --model runs/qs --reference runs/qs/checkpoints/step_500
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from gptwo.detect.calibrate import auroc, calibrate
from gptwo.detect.pairs import sample_set
from gptwo.detect.stats import document_scores, token_stats
from gptwo.fileio import atomic_write
from gptwo.weights import load_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SETTINGS = {"temperature-1.0": dict(temperature=1.0, top_k=None), "top-k-40": dict(temperature=1.0, top_k=40)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="runs/qs", help="a run/model folder (default runs/qs, from 'gptwo quickstart --out runs/qs')"
    )
    parser.add_argument(
        "--data", default=None, help="prepared data folder whose val split gives the human text (default MODEL/data)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=16, help="prompt tokens taken from each human passage (default 16)"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens the model writes (default 128)")
    parser.add_argument(
        "--per-document",
        type=int,
        default=0,
        help="passages per validation document (default 0 = all, non-overlapping)",
    )
    parser.add_argument(
        "--out", default=os.path.join(RESULTS, "detect"), help="output folder (default experiments/results/detect)"
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="a second model with the same tokenizer (e.g. an earlier checkpoint): adds Binoculars",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine more threads run far slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = args.data or os.path.join(args.model, "data")
    results = {}
    for name, sampling in SETTINGS.items():
        folder = os.path.join(args.out, name)
        start = time.perf_counter()
        summary = sample_set(
            args.model,
            data,
            folder,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            per_document=args.per_document,
            seed=args.seed,
            device="cpu",
            **sampling,
        )
        report = calibrate(
            args.model,
            os.path.join(folder, "human"),
            os.path.join(folder, "generated"),
            reference_spec=args.reference,
            out=os.path.join(folder, "calibration.json"),
            plot=os.path.join(args.out, f"roc-{name}.png"),
            device="cpu",
        )
        oracle = oracle_auroc(args.model, folder)
        results[name] = {
            "oracle_fast_detectgpt_auroc": oracle,
            "pairs": summary["pairs"],
            "dropped_short": summary["dropped_short"],
            "sampling": sampling,
            "seconds": time.perf_counter() - start,
            "statistics": report["statistics"],
            "plot": report["plot"],
            "classifier_evaluation": report["classifier_evaluation"],
            "documents": len(set(summary["documents"])),
        }
    payload = {
        "model": args.model,
        "reference": args.reference,
        "data": data,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "detector": "classifier",
        "settings": results,
    }
    atomic_write(
        os.path.join(os.path.dirname(args.out.rstrip("/")) or ".", "detect.json"),
        (json.dumps(payload, indent=2) + "\n").encode(),
    )
    print(table(results))


def oracle_auroc(model_spec: str, folder: str) -> float:
    """Fast-DetectGPT's AUROC on the token ids each text was sampled or stored as (not text-only: an oracle)."""
    model, tokenizer = load_model(model_spec, device="cpu")
    with open(os.path.join(folder, "tokens.json"), encoding="utf-8") as f:
        ids = json.load(f)
    score = {
        kind: [document_scores(token_stats(model, tokenizer, t, top=1))["fast_detectgpt"] for t in ids[kind]]
        for kind in ("human", "generated")
    }
    return auroc(score["generated"], score["human"])


def table(results: dict) -> str:
    """Markdown: one row per statistic, AUROC and TPR at 1% FPR per sampling setting."""
    names = list(SETTINGS)
    head = "| statistic | " + " | ".join(f"AUROC {n} | TPR@1%FPR {n}" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    for stat in results[names[0]]["statistics"]:
        cells = [
            f"{results[n]['statistics'][stat]['auroc']:.3f} | {results[n]['statistics'][stat]['tpr']:.3f}"
            for n in names
        ]
        label = (
            " (detector once calibrated; out-of-fold)"
            if stat == "classifier"
            else " (uncalibrated default)"
            if stat == "fast_detectgpt"
            else ""
        )
        lines.append(f"| {stat}{label} | " + " | ".join(cells) + " |")
    cells = [f"{results[n]['oracle_fast_detectgpt_auroc']:.3f} | –" for n in names]
    lines.append("| fast_detectgpt on the sampled token ids (oracle, not text-only) | " + " | ".join(cells) + " |")
    counts = []
    for n in names:
        folds = results[n]["classifier_evaluation"]["folds"]
        train = [f["train"]["human"] + f["train"]["generated"] for f in folds]
        test = [f["test"]["human"] + f["test"]["generated"] for f in folds]
        counts.append(
            f"{n}: {results[n]['pairs']} pairs from {results[n]['documents']} documents; "
            f"classifier: {len(folds)} folds by document, "
            f"fit on {min(train)}-{max(train)} texts, tested on {min(test)}-{max(test)} each"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(counts)


if __name__ == "__main__":
    main()
