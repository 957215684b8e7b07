"""Decode-step options side by side: torch's path vs gptwo's native kernels (each kernel kind), 2 threads.

Developer experiment behind docs/inference.md's option table. transformers' fp32 `generate` is the
anchor; every option decodes the same prompt greedily, interleaved rounds, median. Run it on an
otherwise idle machine: `python experiments/native_options.py [--new-tokens N] [--rounds R]`.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from gptwo.bench import interleaved
from gptwo.bench.decode import bench_model, hf_twin, streamed_bytes
from gptwo.infer import Decoder, prepare_model

OPTIONS = {  # name -> (prepare_model options, environment)
    "torch fp32 (in,out) addmm": ({"dtype": "fp32", "native_kernels": False}, {}),
    "torch bf16 addmm": ({"dtype": "bf16", "native_kernels": False}, {}),
    "torch int8 _weight_int8pack_mm": ({"quantize": "int8", "native_kernels": False}, {}),
    "native fp32": ({"dtype": "fp32"}, {}),
    "native bf16 widen+FMA": ({"dtype": "bf16"}, {"GPTWO_NATIVE_BF16": "widen"}),
    "native bf16 vdpbf16ps": ({"dtype": "bf16"}, {"GPTWO_NATIVE_BF16": "dp"}),
    "native int8 widen+FMA": ({"quantize": "int8"}, {"GPTWO_NATIVE_INT8": "widen"}),
    "native int8 vpdpbusd": ({"quantize": "int8"}, {"GPTWO_NATIVE_INT8": "vnni"}),
    "native int8 vpdpwssd": ({"quantize": "int8"}, {"GPTWO_NATIVE_INT8": "w16"}),
}


def main(new_tokens: int = 64, rounds: int = 5) -> None:
    torch.set_num_threads(2)
    base = bench_model(None, torch.device("cpu"))
    prompt = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    hf = hf_twin(base)
    runs = {
        "transformers generate fp32": lambda: hf.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    }
    nbytes = {"transformers generate fp32": streamed_bytes(base)}
    for name, (options, env) in OPTIONS.items():
        os.environ.update(env)
        model = prepare_model(copy.deepcopy(base), **options)
        decoder = Decoder(model, max_len=16 + new_tokens)
        runs[name] = lambda decoder=decoder: decoder.generate(prompt, new_tokens)
        nbytes[name] = streamed_bytes(model)
    probe = torch.ones(512 * 2**20 // 4)
    runs["memory read (sum of 512 MiB)"] = probe.sum
    with torch.no_grad():
        for run in runs.values():
            run()
        seconds = interleaved(runs, rounds, torch.device("cpu"))
    bandwidth = probe.numel() * 4 / seconds["memory read (sum of 512 MiB)"]
    anchor = new_tokens / seconds["transformers generate fp32"]
    print(
        f"2 threads, 16-token prompt + {new_tokens} greedy, median of {rounds} interleaved rounds; "
        f"memory read {bandwidth / 1e9:.1f} GB/s; load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'option':34s} {'tok/s':>7s} {'vs tf':>6s} {'MB':>5s} {'ceiling':>7s} {'of ceiling':>10s}")
    for name, n in nbytes.items():
        rate = new_tokens / seconds[name]
        print(
            f"{name:34s} {rate:7.1f} {rate / anchor:6.2f} {n / 1e6:5.0f} {bandwidth / n:7.0f} "
            f"{rate / (bandwidth / n):10.0%}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per run (default 64)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; each row's median counts (default 5)"
    )
    args = parser.parse_args()
    main(args.new_tokens, args.rounds)
