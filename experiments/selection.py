"""Data selection against uniform sampling at equal total FLOPs, on a corpus with planted noise.

Builds a mixed-quality corpus from the built-in corpus (clean) plus four kinds of planted noise:
duplicated documents, word-shuffled documents, random-token documents and English transliterated
into Greek letters (another script). Then trains the same tiny GPT with
  uniform       the loader's batches;
  offline       documents scored by a small reference model (trained on clean held-out text) and the
                lowest-loss `--keep` of them kept (`gptwo select score` + `select filter`);
  loss          online: top batch of selection_pool batches by current loss;
  reducible     online: top batch by current loss minus the reference's loss (RHO-LOSS);
each given the same total FLOPs: training + scoring + the reference model's training (the reference
counts for offline and reducible). Held-out loss is measured on clean documents none of them trains on.
Prints a table, writes experiments/results/selection.json and experiments/results/selection.png.

    python experiments/selection.py            # about 4 min of CPU time
    python experiments/selection.py --quick    # a minute-long smoke run of the same pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter

import torch

from gptwo.data.builtin import builtin_documents
from gptwo.data.loader import ShardLoader
from gptwo.data.shard_corpus import prepare
from gptwo.fileio import atomic_write
from gptwo.select import online
from gptwo.select.offline import filter_documents, write_documents
from gptwo.select.score import model_forward_flops, score_documents
from gptwo.tokenizer import Tokenizer
from gptwo.train.checkpoint import list_checkpoints
from gptwo.train.loop import run_training
from gptwo.train.metrics import read_metrics
from gptwo.weights import load_model

NOISE = ("duplicate", "shuffled", "random_tokens", "other_script")
GREEK = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "αβψδεφγηιξκλμνοπρσστθωςχυζΑΒΨΔΕΦΓΗΙΞΚΛΜΝΟΠΡΣΣΤΘΩΣΧΥΖ"
)
MODEL = [
    "n_layer=2",
    "n_head=2",
    "n_embd=64",
    "block_size=64",
    "batch_size=16",
    "lr=3e-3",
    "sampling=random",
    "sample_tokens=0",
    "eval_batches=1",
    "log_every=10",
    "threads=1",
    "device=cpu",
    "seed=0",
]
REFERENCE = [
    "n_layer=1",
    "n_head=2",
    "n_embd=32",
    "block_size=64",
    "batch_size=16",
    "lr=3e-3",
    "sampling=random",
    "sample_tokens=0",
    "eval_batches=1",
    "log_every=10",
    "threads=1",
    "device=cpu",
    "seed=0",
    "warmup_steps=20",
]


# ---------------------------------------------------------------- the corpus
def build_corpus(root: str, quick: bool, noise_share: float) -> dict:
    """Clean train / held-out / reference-train documents from `builtin`, noise planted into train, a tokenizer."""
    docs = [d for d in builtin_documents() if len(d) > 200]
    random.Random(0).shuffle(docs)
    if quick:
        docs = docs[:400]
    n = len(docs)
    heldout, reference, sources, clean = (
        docs[: n // 10],
        docs[n // 10 : n // 5],
        docs[n // 5 : n // 5 + n // 20],
        docs[n // 5 + n // 20 :],
    )
    clean_chars = sum(map(len, clean))
    per_kind = noise_share / (1 - noise_share) * clean_chars / len(NOISE)  # characters of each noise kind
    rng = random.Random(1)
    tok = Tokenizer.train(
        (text for text in clean), vocab_size=1024 if quick else 2048
    )  # trained on clean text, as a general tokenizer is
    noise = {
        "duplicate": _fill(
            per_kind, lambda: sources[rng.randrange(max(1, len(sources) // 10))]
        ),  # a few documents, many copies
        "shuffled": _fill(per_kind, lambda: _shuffled(rng.choice(clean[: len(clean) // 4]), rng)),
        "random_tokens": _fill(
            per_kind, lambda: tok.decode([rng.randrange(tok.n_vocab - 1) for _ in range(rng.randint(200, 600))])
        ),
        "other_script": _fill(per_kind, lambda: rng.choice(sources).translate(GREEK)),
    }
    labelled = [(text, "clean") for text in clean] + [(text, kind) for kind, texts in noise.items() for text in texts]
    rng.shuffle(labelled)
    mixed = os.path.join(root, "mixed.jsonl.zst")
    write_documents(mixed, [text for text, _ in labelled])
    tok_path = os.path.join(root, "tokenizer.json")
    tok.save(tok_path)
    data = {"mixed": mixed, "tokenizer": tok_path, "labels": [kind for _, kind in labelled]}
    for name, texts in (("heldout", heldout), ("reference", reference)):
        write_documents(os.path.join(root, f"{name}.jsonl.zst"), texts)
    for name in ("mixed", "heldout", "reference"):
        source = os.path.join(root, f"{name}.jsonl.zst")
        prepare(
            [source],
            os.path.join(root, f"data-{name}"),
            tokenizer=tok_path,
            val_fraction=0.02,
            progress=False,
            workers=1,
        )
        data[f"data-{name}"] = os.path.join(root, f"data-{name}")
    data["kinds"], tokens = _token_kinds(labelled, tok)
    data["shares"] = {kind: tokens[kind] / sum(tokens.values()) for kind in ("clean", *NOISE)}
    return data


def _fill(chars: float, make) -> list[str]:
    out, total = [], 0
    while total < chars:
        out.append(make())
        total += len(out[-1])
    return out


def _shuffled(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _token_kinds(labelled: list[tuple[str, str]], tok: Tokenizer, n: int = 4) -> tuple[dict, Counter]:
    """Token 4-gram → the kind of document it comes from (4-grams seen in several kinds are left out),
    and the number of tokens of each kind."""
    kinds: dict = {}
    tokens: Counter = Counter()
    for text, kind in labelled:
        ids = tok.encode(text)
        tokens[kind] += len(ids)
        for i in range(len(ids) - n + 1):
            key = tuple(ids[i : i + n])
            if kinds.get(key, kind) != kind:
                kinds[key] = None
            else:
                kinds[key] = kind
    return kinds, tokens


def row_kind(row: list[int], kinds: dict, n: int = 4) -> str:
    votes = Counter(kinds.get(tuple(row[i : i + n])) for i in range(len(row) - n + 1))
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else "clean"


# ---------------------------------------------------------------- runs
class Recorder:
    """Counts the kind of every row the trainer is handed (wraps Selector.next_batch for one run)."""

    def __init__(self, kinds: dict):
        self.kinds, self.counts = kinds, Counter()
        self.real = online.Selector.next_batch

    def __enter__(self):
        recorder = self

        def next_batch(selector, model):
            x, y = recorder.real(selector, model)
            recorder.counts.update(row_kind(row, recorder.kinds) for row in x.tolist())
            return x, y

        online.Selector.next_batch = next_batch
        return self

    def __exit__(self, *exc):
        online.Selector.next_batch = self.real

    def shares(self) -> dict:
        total = sum(self.counts.values()) or 1
        return {kind: self.counts[kind] / total for kind in ("clean", *NOISE)}


def train_flops_per_step(run: str) -> float:
    rows = [r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if "flops" in r]
    return rows[-1]["flops"] / rows[-1]["step"]


def heldout_curve(run: str, heldout: str, batches: int) -> list[tuple[int, float]]:
    """(step, held-out loss) of every checkpoint of a run, on clean documents no run trains on."""
    loader = ShardLoader(heldout, split="train", batch_size=16, block_size=64)
    curve = []
    for step, path in list_checkpoints(run):
        model, _ = load_model(path, device="cpu")
        with torch.no_grad():
            losses = [
                float(torch.nn.functional.cross_entropy(model(x).view(-1, model.config.vocab_size), y.reshape(-1)))
                for x, y in loader.iter_eval_batches(batches)
            ]
        curve.append((step, sum(losses) / len(losses)))
    return curve


def run(name: str, data: str, out: str, steps: int, extra: list[str], kinds: dict, points: int, seed: int) -> dict:
    every = max(1, steps // points)
    settings = (
        MODEL
        + [
            f"seed={seed}",
            f"max_steps={steps}",
            f"checkpoint_every={every}",
            f"eval_every={steps}",
            "keep_checkpoints=1000",
            f"warmup_steps={max(1, steps // 20)}",
        ]
        + extra
    )
    start, cpu = time.perf_counter(), time.process_time()
    with Recorder(kinds) as recorder:
        run_training(data, out, overrides=settings, progress=False)
    print(
        f"  {name}: {steps} steps in {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU",
        file=sys.stderr,
    )
    return {"steps": steps, "shares": recorder.shares(), "flops_per_step": train_flops_per_step(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=1500, help="uniform's steps: sets the FLOPs budget of every strategy"
    )
    parser.add_argument("--pool", type=int, default=2, help="selection_pool of the online strategies")
    parser.add_argument("--reference-steps", type=int, default=300, help="steps of the reference model's training")
    parser.add_argument(
        "--keep", type=float, default=0.6, help="offline: fraction of documents kept (lowest reference loss)"
    )
    parser.add_argument(
        "--noise-share", type=float, default=0.4, help="share of the training characters that is planted noise"
    )
    parser.add_argument("--points", type=int, default=10, help="held-out evaluations per run")
    parser.add_argument(
        "--eval-batches", type=int, default=40, help="held-out batches of 16 x 64 tokens per evaluation"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of every run (model init, row sampling); the corpus stays the same",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (few documents and steps)")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="folder for selection.json and selection.png (default experiments/results)",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.reference_steps, args.points, args.eval_batches = 200, 30, 3, 4
    wall, cpu = time.perf_counter(), time.process_time()
    root = tempfile.mkdtemp(prefix="gptwo-bench-selection-")
    print(f"building the corpus in {root}", file=sys.stderr)
    data = build_corpus(root, args.quick, args.noise_share)
    kinds, runs = data["kinds"], {}

    # the reference model: trained on clean documents held out from training and from evaluation
    ref = os.path.join(root, "run-reference")
    run_training(
        data["data-reference"],
        ref,
        overrides=REFERENCE
        + [
            f"seed={args.seed}",
            f"max_steps={args.reference_steps}",
            f"eval_every={args.reference_steps}",
            f"checkpoint_every={args.reference_steps}",
        ],
        progress=False,
    )
    reference_flops = train_flops_per_step(ref) * args.reference_steps

    runs["uniform"] = run(
        "uniform", data["data-mixed"], os.path.join(root, "run-uniform"), args.steps, [], kinds, args.points, args.seed
    )
    budget = runs["uniform"]["flops_per_step"] * args.steps

    # offline: score every document with the reference, keep the lowest-loss band, prepare, train
    scores = os.path.join(root, "scores.jsonl")
    score_documents(ref, [data["mixed"]], scores, device="cpu", progress=False)
    ref_model, _ = load_model(ref, device="cpu")
    scored_tokens = sum(json.loads(line)["tokens"] for line in open(scores, encoding="utf-8"))
    scoring_flops = scored_tokens * model_forward_flops(ref_model, ref_model.config.block_size)
    kept = os.path.join(root, "kept.jsonl.zst")
    filter_documents([data["mixed"]], scores, kept, by="loss", keep=args.keep)
    prepare(
        [kept],
        os.path.join(root, "data-kept"),
        tokenizer=data["tokenizer"],
        val_fraction=0.02,
        progress=False,
        workers=1,
    )
    fixed = {"offline": reference_flops + scoring_flops, "loss": 0.0, "reducible": reference_flops}
    per_step = runs["uniform"]["flops_per_step"]
    runs["offline"] = run(
        "offline",
        os.path.join(root, "data-kept"),
        os.path.join(root, "run-offline"),
        int((budget - fixed["offline"]) // per_step),
        [],
        kinds,
        args.points,
        args.seed,
    )
    for strategy in ("loss", "reducible"):
        extra = [f"selection={strategy}", f"selection_pool={args.pool}"] + (
            [f"selection_reference={ref}"] if strategy == "reducible" else []
        )
        probe = _per_step_flops(data["data-mixed"], extra, root, strategy)
        runs[strategy] = run(
            strategy,
            data["data-mixed"],
            os.path.join(root, f"run-{strategy}"),
            int((budget - fixed[strategy]) // probe),
            extra,
            kinds,
            args.points,
            args.seed,
        )
    fixed["uniform"] = 0.0
    for name, result in runs.items():
        result["fixed_flops"] = fixed[name]
        result["step_curve"] = heldout_curve(os.path.join(root, f"run-{name}"), data["data-heldout"], args.eval_batches)
        result["curve"] = [(fixed[name] + step * result["flops_per_step"], loss) for step, loss in result["step_curve"]]
    report(
        runs,
        budget,
        data["shares"],
        reference_flops,
        scoring_flops,
        args,
        time.perf_counter() - wall,
        time.process_time() - cpu,
    )


def _per_step_flops(data: str, extra: list[str], root: str, strategy: str) -> float:
    """FLOPs per step of an online strategy, read from a one-step run (the same count the real run logs)."""
    probe = os.path.join(root, f"probe-{strategy}")
    run_training(
        data,
        probe,
        overrides=MODEL + ["max_steps=1", "eval_every=1000", "checkpoint_every=1000"] + extra,
        progress=False,
    )
    return train_flops_per_step(probe)


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs where a held-out curve first reaches `target` (linear between evaluations), None if it never does."""
    previous = None
    for flops, loss in curve:
        if loss <= target:
            if previous is None:
                return flops
            f0, l0 = previous
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss) if l0 != loss else flops
        previous = (flops, loss)
    return None


def interpolate(curve: list[tuple[float, float]], x: float) -> float:
    """The curve's value at `x`, linear between its points (clamped at its ends)."""
    (x0, y0) = curve[0]
    for x1, y1 in curve:
        if x1 >= x:
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        x0, y0 = x1, y1
    return curve[-1][1]


def report(
    runs: dict, budget: float, shares: dict, reference_flops: float, scoring_flops: float, args, wall: float, cpu: float
) -> None:
    target = runs["uniform"]["curve"][-1][1]
    print("\ncorpus shares (tokens): " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    print(
        f"budget {budget:.3e} FLOPs each; reference training {reference_flops:.3e} ({reference_flops / budget:.1%}), "
        f"offline scoring {scoring_flops:.3e} ({scoring_flops / budget:.1%}); pool {args.pool}\n"
    )
    header = (
        f"{'strategy':<10} {'steps':>6} {'FLOPs/step':>11} {'final held-out':>15} "
        f"{'uniform, same steps':>20} {'FLOPs to uniform final':>22}  "
        + " ".join(f"{k:>13}" for k in ("clean", *NOISE))
    )
    print(header + "\n" + " " * 90 + "(share of the rows each trained on)")
    for name, result in runs.items():
        reach = flops_to_reach(result["curve"], target)
        result["flops_to_uniform_final"] = reach
        result["ratio_to_uniform"] = reach / budget if reach is not None else None
        reached = f"{reach / budget:.2f}x" if reach is not None else "not reached"
        result["uniform_same_steps"] = interpolate(runs["uniform"]["step_curve"], result["steps"])
        print(
            f"{name:<10} {result['steps']:>6} {result['flops_per_step']:>11.3e} {result['curve'][-1][1]:>15.4f} "
            f"{result['uniform_same_steps']:>20.4f} {reached:>22}  "
            + " ".join(f"{result['shares'][k]:>13.1%}" for k in ("clean", *NOISE))
        )
    print(f"\nwall {wall:.0f} s, CPU {cpu:.0f} s (this process)")
    atomic_write(
        os.path.join(args.out, "selection.json"),
        json.dumps(
            {
                "args": vars(args),
                "budget_flops": budget,
                "reference_flops": reference_flops,
                "offline_scoring_flops": scoring_flops,
                "corpus_shares": shares,
                "runs": runs,
                "wall_s": wall,
                "cpu_s": cpu,
            },
            indent=1,
        ).encode(),
    )
    plot(runs, target, os.path.join(args.out, "selection.png"))


def plot(runs: dict, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    for name, result in runs.items():
        ax.plot(*zip(*result["curve"]), "o-", label=name, linewidth=1.2, markersize=3)
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="uniform's final")
    ax.set_xlabel("total FLOPs (training + scoring + reference training)")
    ax.set_ylabel("held-out loss (nats/token, clean text)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
