"""Training speed: `gptwo bench train` (gptwo vs transformers, same process), also writing bench/results/train.json."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gptwo.bench.train import WORKLOADS, bench_train, render_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="cpu", choices=list(WORKLOADS), help="workload (default cpu: the quickstart's model)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 8 on CPU, 20 on GPU)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; each model's median counts (default 3)"
    )
    parser.add_argument("--out", default="bench/results/train.json", help="JSON output path")
    args = parser.parse_args()
    report = bench_train(args.preset, args.device, steps=args.steps, rounds=args.rounds)
    print(render_train(report))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
