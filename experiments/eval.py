"""Evaluation benchmark: strided-perplexity throughput (scored tokens/s) against an unbatched anchor.

A random GPT-2-shaped model scores the same token stream four ways: the anchor (batch 1, stride =
context: one window per forward pass), batched windows (--batch-size), and batched with half and a
quarter of the context as stride (each token gets more context, at more compute). Prints a table,
writes experiments/results/eval.json, and checks that batching leaves the total log-likelihood unchanged.

    python experiments/eval.py                            # ~1 min on 2 CPU cores
    python experiments/eval.py --preset gpt2 --tokens 200000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from gptwo import GPT, GPTConfig
from gptwo.eval.scoring import rolling_pairs, score_pairs
from gptwo.fileio import atomic_write

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default=None, help="gpt2, gpt2-medium, ... (default: a 4-layer, 256-wide model with 256 context)"
    )
    parser.add_argument("--tokens", type=int, default=8192, help="length of the random token stream")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass in the batched runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--out",
        default=os.path.join(RESULTS, "eval.json"),
        help="JSON output path (default experiments/results/eval.json)",
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    config = (
        GPTConfig.from_preset(args.preset)
        if args.preset
        else GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256)
    )
    model = GPT(config).to(args.device).eval()
    tokens = torch.randint(0, config.vocab_size - 1, (args.tokens,)).tolist()
    block = config.block_size
    runs = [
        ("anchor: batch 1, stride = context", 1, block),
        (f"batch {args.batch_size}, stride = context", args.batch_size, block),
        (f"batch {args.batch_size}, stride = context/2", args.batch_size, block // 2),
        (f"batch {args.batch_size}, stride = context/4", args.batch_size, block // 4),
    ]
    rows = []
    for name, batch, stride in runs:
        pairs = rolling_pairs(tokens, config.vocab_size - 1, block, stride)
        start = time.perf_counter()
        nll = -sum(s.logprob for s in score_pairs(model, pairs, batch))
        seconds = time.perf_counter() - start
        rows.append(
            {
                "run": name,
                "batch": batch,
                "stride": stride,
                "windows": len(pairs),
                "seconds": seconds,
                "tokens_per_s": len(tokens) / seconds,
                "nll": nll,
            }
        )
    anchor = rows[0]
    for row in rows:
        row["speed_vs_anchor"] = row["tokens_per_s"] / anchor["tokens_per_s"]
    assert abs(rows[1]["nll"] - anchor["nll"]) <= 1e-3 * abs(anchor["nll"]), "batching changed the log-likelihood"

    print(f"model {args.preset or 'tiny'} (context {block}), {len(tokens)} tokens, device {args.device}")
    print(f"{'run':<34} {'windows':>8} {'seconds':>8} {'tok/s':>9} {'vs anchor':>9}")
    for row in rows:
        print(
            f"{row['run']:<34} {row['windows']:>8} {row['seconds']:>8.2f} {row['tokens_per_s']:>9.0f} "
            f"{row['speed_vs_anchor']:>8.2f}x"
        )
    report = {"preset": args.preset, "context": block, "tokens": len(tokens), "device": args.device, "runs": rows}
    atomic_write(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
