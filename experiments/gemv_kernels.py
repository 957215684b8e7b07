"""GEMV kernel options for batch-1 decoding: the 49 matrix-vector products of one GPT-2 124M step, per kernel.

Developer experiment behind docs/inference.md's kernel table: each option runs the same chain of
(out, in) weights (4 per layer x 12 layers + the head), interleaved rounds, median; GB/s is weight
bytes / time. Run it on an otherwise idle machine: `python experiments/gemv_kernels.py [--rounds N]`
(needs gptwo's native kernels: `gptwo kernels info`; a kind whose instruction this CPU lacks runs emulated).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptwo.infer import native
from gptwo.infer.linear import quantize_int8

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]


def chain(kind: int, weights: list, scales: list):
    x = {k: torch.randn(1, k) for k in (768, 3072)}
    return lambda: [native.linear(kind, w, s, None, x[w.shape[1]]) for w, s in zip(weights, scales)]


def main(rounds: int = 15) -> None:
    if native.library() is None:
        raise SystemExit("error: gptwo's native kernels did not build — run `gptwo kernels info` to see why")
    torch.manual_seed(0)
    fp32 = [torch.randn(n, k) * 0.02 for n, k in SHAPES]
    bf16 = [w.bfloat16() for w in fp32]
    q = [quantize_int8(w) for w in fp32]
    i8, sc = [w for w, _ in q], [s for _, s in q]
    none = [None] * len(SHAPES)
    xs = {k: torch.randn(1, k) for k in (768, 3072)}
    xb = {k: v.bfloat16() for k, v in xs.items()}
    wt = [w.t().contiguous() for w in fp32]
    wbt = [w.t().contiguous() for w in bf16]
    runs = {
        "torch fp32 x @ W(in,out)": (lambda: [xs[w.shape[0]] @ w for w in wt], fp32),
        "native fp32": (chain(native.F32, fp32, none), fp32),
        "torch bf16 x @ W(in,out)": (lambda: [xb[w.shape[0]] @ w for w in wbt], bf16),
        "native bf16 widen": (chain(native.BF16, bf16, none), bf16),
        "native bf16 vdpbf16ps": (chain(native.BF16_DP, bf16, none), bf16),
        "torch int8 _weight_int8pack_mm": (
            lambda: [torch.ops.aten._weight_int8pack_mm(xb[w.shape[1]], w, s.bfloat16()) for w, s in zip(i8, sc)],
            i8,
        ),
        "native int8 widen": (chain(native.I8, i8, sc), i8),
        "native int8 vpdpbusd": (chain(native.I8_VNNI, i8, sc), i8),
    }
    times = {name: [] for name in runs}
    for fn, _ in runs.values():
        fn()
    for _ in range(rounds):
        for name, (fn, _) in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(
        f"{torch.get_num_threads()} threads; one GPT-2 124M decode step's 49 GEMVs, "
        f"median of {rounds} interleaved rounds"
    )
    for name, (_, ws) in runs.items():
        t = statistics.median(times[name])
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        print(f"{name:34s} {t * 1e3:7.2f} ms  {nbytes / t / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=15, help="interleaved rounds; each row's median counts (default 15)"
    )
    main(parser.parse_args().rounds)
