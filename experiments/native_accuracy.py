"""Held-out perplexity of each native kernel kind through the batch-1 step, against fp32 (developer experiment).

`python experiments/native_accuracy.py MODEL_DIR` reads MODEL_DIR/data/val_000000.bin (a `gptwo prepare`
shard, as `gptwo quickstart` leaves it) and scores windows of the model's context one token at a time
through `Decoder`, so the native step (not torch's GEMM) computes every logit. Timing does not matter here.
"""

from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import torch
import torch.nn.functional as F

from gptwo import GPT
from gptwo.data.shards import read_shard
from gptwo.infer import Decoder, prepare_model

KINDS = {
    "fp32": ({"dtype": "fp32"}, {}),
    "bf16 widen": ({"dtype": "bf16"}, {"GPTWO_NATIVE_BF16": "widen"}),
    "bf16 vdpbf16ps": ({"dtype": "bf16"}, {"GPTWO_NATIVE_BF16": "dp"}),
    "int8 widen": ({"quantize": "int8"}, {"GPTWO_NATIVE_INT8": "widen"}),
    "int8 vpdpbusd": ({"quantize": "int8"}, {"GPTWO_NATIVE_INT8": "vnni"}),
    "int8 vpdpwssd": ({"quantize": "int8"}, {"GPTWO_NATIVE_INT8": "w16"}),
}


def main(directory: str, windows: int = 8) -> None:
    shard = os.path.join(directory, "data", "val_000000.bin")
    if not os.path.isfile(shard):
        raise SystemExit(f"error: {shard} not found — pass a run folder of `gptwo quickstart` (it keeps data/)")
    model = GPT.from_pretrained(directory)
    T = model.config.block_size
    tokens = read_shard(shard)
    ids = torch.from_numpy(np.asarray(tokens[: windows * T]).astype(np.int64)).view(windows, T)
    reference = None
    for name, (options, env) in KINDS.items():
        os.environ.update(env)
        decoder = Decoder(prepare_model(copy.deepcopy(model), **options), max_len=T)
        with torch.no_grad():
            logits = torch.stack(
                [torch.cat([decoder.forward(w[None, t : t + 1], t) for t in range(T - 1)]) for w in ids]
            )
        nll = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).item()
        greedy = logits.argmax(-1)
        reference = reference or (nll, greedy)
        print(
            f"{name:16s} perplexity {np.exp(nll):8.3f} ({np.exp(nll - reference[0]) - 1:+.3%} vs fp32), "
            f"argmax equal to fp32's {(greedy == reference[1]).float().mean():.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a run folder with data/val_000000.bin (e.g. `gptwo quickstart`'s)")
    parser.add_argument("--windows", type=int, default=8, help="context-long windows scored (default 8)")
    args = parser.parse_args()
    main(args.model_dir, args.windows)
