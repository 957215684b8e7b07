"""Fast inference for a finished GPT, applied from outside model.py.

`prepare_model` re-lays a model's linear layers for decoding (pre-transposed weights, bf16, or int8
weight-only); `Decoder` runs the decode step over a static KV cache, optionally `torch.compile`d.
See docs/inference.md for what each choice measured.
"""

from gptwo.infer.decode import Decoder
from gptwo.infer.prepare import DTYPES, QUANTIZATIONS, parse_dtype, prepare_model

__all__ = ["DTYPES", "QUANTIZATIONS", "Decoder", "parse_dtype", "prepare_model"]
