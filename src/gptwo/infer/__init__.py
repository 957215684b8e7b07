"""Fast inference for a finished GPT, applied from outside model.py.

`prepare_model` re-lays a model's linear layers for decoding (pre-transposed weights, bf16, or int8
weight-only); `Decoder` runs the decode step over a static KV cache, optionally `torch.compile`d.
See docs/inference.md for what each choice measured.
"""

from gptwo.lazy import lazy_names

_WHERE = {
    "PREPARE_DTYPES": "gptwo.infer.prepare",
    "Decoder": "gptwo.infer.decode",
    "QUANTIZATIONS": "gptwo.infer.prepare",
    "parse_dtype": "gptwo.infer.prepare",
    "prepare_model": "gptwo.infer.prepare",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
