"""Serving speed: `gptwo bench serve` (N streaming clients vs transformers on the same prompts), also writing bench/results/serve.json.

python bench/serve.py                                   # 64 clients x 32 tokens, fp32/bf16/int8 servers
python bench/serve.py --compare-src /tmp/before/src     # plus an older checkout's server in the same rounds
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gptwo.bench.serve import VARIANTS, render_serve, serve_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="model folder or hub id (default: GPT-2 124M's shape, random weights)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default 64)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request (default 32)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="server weights to time (default fp32,bf16,int8)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; each row's median counts (default 3)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each server and of transformers")
    parser.add_argument(
        "--compare-src",
        action="append",
        default=[],
        help="also time the fp32 server of another checkout's src folder (repeatable)",
    )
    parser.add_argument("--out", default="bench/results/serve.json", help="JSON output path")
    args = parser.parse_args()
    report = serve_report(
        args.model,
        device=args.device,
        clients=args.clients,
        tokens=args.tokens,
        variants=tuple(args.variants.split(",")),
        rounds=args.rounds,
        threads=args.threads,
        compare_src=args.compare_src,
    )
    print(render_serve(report))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
