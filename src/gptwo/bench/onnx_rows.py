"""onnxruntime rows for `gptwo bench decode`: the bench model exported to ONNX (fp32, and int8 by onnxruntime's
dynamic quantization), decoded greedily by onnxruntime's CPU provider in the same interleaved rounds.

Each run is what an onnxruntime user's loop does: the prompt in one call with an empty past, then one
call per new token feeding back the `present` keys and values (gptwo.export.onnx.greedy). The weight
bytes of a row are the graph's initializers but the two embedding tables (lookups), so the ceiling column
means what it means for the other rows.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

import torch

from gptwo.errors import GptwoError, require
from gptwo.model import GPT

ONNX_VARIANTS = ("fp32", "int8")  # `gptwo bench decode --onnxruntime`
TOOL = "onnxruntime"
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 10: 2, 16: 2, 6: 4, 7: 8}  # onnx TensorProto data types: bytes per element


def initializer_bytes(path: str) -> int:
    """Bytes of an ONNX graph's initializers (external data included) but the tables Gather looks rows up in (the
    token and position embeddings; the head is a copy of its own)."""
    onnx = require("onnx", "gptwo bench decode --onnxruntime", "export")
    graph = onnx.load(path, load_external_data=False).graph
    lookups = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    total = 0
    for tensor in graph.initializer:
        if tensor.name not in lookups:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count * _ITEMSIZE.get(tensor.data_type, 4)
    return total


def onnx_runs(
    model: GPT, prompt: torch.Tensor, new_tokens: int, variants: tuple[str, ...], progress: bool = True
) -> tuple[dict[tuple[str, str], Callable[[], torch.Tensor]], dict[tuple[str, str], int]]:
    """(runs, weight bytes) per onnxruntime variant: each run decodes `prompt` greedily for `new_tokens` tokens and
    returns the prompt and new ids (B, P + N), as the decode benchmark's other runs do."""
    from gptwo.export.onnx import MODEL_FILE, QUANTIZED_FILE, export_decoder, greedy, quantize_int8, session

    unknown = [name for name in variants if name not in ONNX_VARIANTS]
    if unknown:
        raise GptwoError(f"unknown onnxruntime variant '{unknown[0]}'", f"use some of {', '.join(ONNX_VARIANTS)}")
    if prompt.device.type != "cpu":
        raise GptwoError("the onnxruntime rows run on the CPU only", "add --device cpu, or drop --onnxruntime")
    model, config = model.float().eval(), model.config
    runs, weights = {}, {}
    with tempfile.TemporaryDirectory(prefix="gptwo-onnx-") as scratch:
        files = {"fp32": os.path.join(scratch, MODEL_FILE), "int8": os.path.join(scratch, QUANTIZED_FILE)}
        if progress:
            print("exporting the model to ONNX", file=sys.stderr)
        export_decoder(model, files["fp32"])
        if "int8" in variants:
            quantize_int8(files["fp32"], files["int8"])
        for name in variants:
            sess = session(files[name], torch.get_num_threads())  # holds the weights: the files may go
            ids = prompt.numpy()

            def run(sess=sess, ids=ids) -> torch.Tensor:
                return torch.from_numpy(greedy(sess, config, ids, new_tokens))

            runs[(TOOL, name)] = run
            weights[(TOOL, name)] = initializer_bytes(files[name])
    return runs, weights
