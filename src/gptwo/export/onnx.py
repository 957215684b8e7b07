"""`gptwo export onnx`: GPT-2 as an ONNX decoder with past key values, for onnxruntime.

One graph serves the prompt and every later step, as optimum's `model.onnx` for text generation with
past: inputs `input_ids` (B, T), `attention_mask` (B, P + T), `position_ids` (B, T) and
`past_key_values.N.key|value` (B, heads, P, head_dim), empty (P = 0) for the prompt; outputs `logits`
(B, T, vocab) and `present.N.key|value` (B, heads, P + T, head_dim). It is traced from gptwo's own
model through `torch.onnx.export(dynamo=True)`, its KV cache a view that joins the past to the new keys
and values (model.CacheView), then run by onnxruntime against gptwo at the prompt and at a step with
past before the files are put in place. `quantize="int8"` adds onnxruntime's dynamic quantization of
it (int8 weights, activations quantized per call) as `model_quantized.onnx`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from gptwo.config import GPTConfig
from gptwo.errors import GptwoError, require
from gptwo.infer.prepare import prepared_settings
from gptwo.model import GPT
from gptwo.tokenizer import Tokenizer

MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model_quantized.onnx"  # optimum's name for a quantized model.onnx
TOLERANCE = 1e-4  # max |logit difference| the fp32 graph may show against gptwo
QUANTIZE_CHOICES = ("int8",)


# ---------------------------------------------------------------- the graph
class PastAttention:
    """The KV-cache view of one call: each layer's past keys/values joined to the new ones, kept as `present`.

    `allowed` (B, 1, T, P + T) says which keys each query sees: the earlier and its own positions whose
    attention_mask is 1, and always itself, so a padded query attends to something and stays finite.
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], allowed: torch.Tensor):
        self.past, self.allowed = past, allowed
        self.present: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        past_k, past_v = self.past[layer]
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.present += [keys, values]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.allowed)


class DecoderWithPast(torch.nn.Module):
    """gptwo's GPT called with optimum's decoder inputs; returns the logits and every layer's present keys/values.

    The head is its own (n_embd, vocab) copy of the tied embedding, so the graph multiplies by a constant
    matrix: onnxruntime's dynamic quantization then makes it an int8 MatMulInteger (tied, the head would be
    the embedding's quantized table, transposed and dequantized to fp32 at every call).
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.register_buffer("head", model.lm_head.weight.detach().t().contiguous())

    def forward(self, input_ids, attention_mask, position_ids, *past):
        new, total = input_ids.shape[1], attention_mask.shape[1]
        query_at = torch.arange(new, device=input_ids.device)[:, None] + (total - new)
        key_at = torch.arange(total, device=input_ids.device)[None, :]
        allowed = ((key_at <= query_at) & attention_mask[:, None, None, :].bool()) | (key_at == query_at)
        view = PastAttention([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)], allowed)
        hidden = self.model.hidden_states(input_ids, position_ids, view)
        return (self.model.transformer.ln_f(hidden) @ self.head, *view.present)


def input_names(n_layer: int) -> list[str]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(n_layer: int) -> list[str]:
    return ["logits", *(f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value"))]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's and the quantizer's advice (optional torchvision ops, deprecations, "consider pre-processing")
    silenced: they are not the user's to act on."""
    loggers = [logging.getLogger("torch.onnx"), logging.getLogger()]  # the quantizer logs on the root logger
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_decoder(model: GPT, path: str) -> None:
    """Trace `model` (fp32, CPU) into an ONNX decoder with past at `path` (weights in `path`.data beside it)."""
    require("onnxscript", "gptwo export onnx", "export")
    config = model.config
    batch, new, past_len = 2, 3, 4  # above 1, so no dimension is traced as a constant
    head_dim = config.n_embd // config.n_head
    past = [torch.zeros(batch, config.n_head, past_len, head_dim) for _ in range(2 * config.n_layer)]
    example = (
        torch.zeros(batch, new, dtype=torch.long),
        torch.ones(batch, past_len + new, dtype=torch.long),
        torch.arange(past_len, past_len + new).expand(batch, new),
        *past,
    )
    b, t, p = (torch.export.Dim(name) for name in ("batch_size", "sequence_length", "past_sequence_length"))
    dynamic = {
        "input_ids": {0: b, 1: t},
        "attention_mask": {0: b, 1: torch.export.Dim.AUTO},  # past_length + sequence_length
        "position_ids": {0: b, 1: t},
        "past": tuple({0: b, 2: p} for _ in past),
    }
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            DecoderWithPast(model).eval(),
            example,
            path,
            input_names=input_names(config.n_layer),
            output_names=output_names(config.n_layer),
            dynamic_shapes=dynamic,
            dynamo=True,
            optimize=True,
            verbose=False,
            external_data=True,
        )
    _name_mask_length(path)


def _name_mask_length(path: str) -> None:
    """Name attention_mask's length as optimum does (the exporter calls the sum it inferred s<N>)."""
    onnx = require("onnx", "gptwo export onnx", "export")
    graph = onnx.load(path, load_external_data=False)  # the weights stay where they are, in path.data
    mask = next(i for i in graph.graph.input if i.name == "attention_mask")
    mask.type.tensor_type.shape.dim[1].dim_param = "past_sequence_length + sequence_length"
    onnx.save(graph, path)


# ---------------------------------------------------------------- onnxruntime
def session(path: str, threads: int | None = None):
    """An onnxruntime CPU session on an exported decoder."""
    ort = require("onnxruntime", "running an ONNX model", "export")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def step_feed(input_ids: np.ndarray, start: int, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs of one call: new tokens at positions `start`.., no padding, each layer's past key then value."""
    batch, new = input_ids.shape
    feed = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": np.ones((batch, start + new), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(start, start + new, dtype=np.int64), (batch, new)).copy(),
    }
    for index, tensor in enumerate(past):
        layer, kind = divmod(index, 2)
        feed[f"past_key_values.{layer}.{('key', 'value')[kind]}"] = tensor
    return feed


def empty_past(config: GPTConfig, batch: int) -> list[np.ndarray]:
    """Each layer's key and value cache holding no positions yet (the prompt's call)."""
    shape = (batch, config.n_head, 0, config.n_embd // config.n_head)
    return [np.zeros(shape, dtype=np.float32) for _ in range(2 * config.n_layer)]


def greedy(sess, config: GPTConfig, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding with an onnxruntime session of a model of `config`: the prompt, then one token per call;
    returns the prompt and the new ids."""
    past = empty_past(config, prompt.shape[0])
    ids, start, step = prompt, 0, prompt
    for _ in range(new_tokens):
        outputs = sess.run(None, step_feed(step, start, past))
        start += step.shape[1]
        past = outputs[1:]
        step = outputs[0][:, -1].argmax(axis=-1)[:, None].astype(np.int64)
        ids = np.concatenate([ids, step], axis=1)
    return ids


def compare(sess, model: GPT, seed: int = 0) -> dict:
    """Max |logit difference| of the session against gptwo on a random 2 x 8 prompt, and at a 1-token step after it."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, min(9, config.block_size)), generator=generator)
    prompt, step = ids[:, :-1], ids[:, -1:]
    first = sess.run(None, step_feed(prompt.numpy(), 0, empty_past(config, 2)))
    second = sess.run(None, step_feed(step.numpy(), prompt.shape[1], first[1:]))
    with torch.no_grad():
        reference = model(ids).numpy()
    return {
        "prefill_max_diff": float(np.abs(first[0] - reference[:, :-1]).max()),
        "step_max_diff": float(np.abs(second[0][:, -1] - reference[:, -1]).max()),
        "step_same_argmax": bool((second[0][:, -1].argmax(-1) == reference[:, -1].argmax(-1)).all()),
    }


def quantize_int8(source: str, target: str) -> None:
    """onnxruntime's dynamic quantization: int8 weights per output channel (as gptwo's int8), activations quantized
    per call; the embedding tables (Gather) become uint8 per tensor."""
    require("onnxruntime", "gptwo export onnx --quantize int8", "export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=True)


# ---------------------------------------------------------------- the folder
def check_out_dir(path: str) -> None:
    """--out is a folder, new or existing, whose parent exists."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise GptwoError(f"--out {path} is a file, not a folder", "give a folder for the ONNX files")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise GptwoError(f"the folder above --out {path} ({parent}) does not exist", "create it, or choose another")


def _write_side_files(folder: str, model: GPT, tokenizer: Tokenizer) -> None:
    """config.json (transformers' GPT-2 keys) and tokenizer.json beside the graph, as optimum's folders hold them."""
    from gptwo.weights import config_to_hf

    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(model.config, tokenizer.eot_token), f, indent=2)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))


def _move_into(staging: str, out_dir: str) -> list[str]:
    """Every file of `staging` renamed into `out_dir` (same file system: each rename is atomic), readable by all."""
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(os.listdir(staging))
    for name in names:
        os.chmod(os.path.join(staging, name), 0o644)  # the quantizer's temporary files are private (0600)
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    return names


def export_model(model: GPT, tokenizer: Tokenizer, out_dir: str, quantize: str | None = None) -> dict:
    """Export `model` to `out_dir`, check it with onnxruntime against gptwo, and add the int8 graph if asked."""
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise GptwoError(f"unknown --quantize '{quantize}'", "use --quantize int8, or leave it out")
    if prepared_settings(model) is not None:
        raise GptwoError(
            "a model prepared for inference (quantized or re-laid) cannot be exported", "export it before preparing"
        )
    check_out_dir(out_dir)
    require("onnx", "gptwo export onnx", "export")
    model = model.float().eval()
    staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=".tmp-onnx-")
    try:
        export_decoder(model, os.path.join(staging, MODEL_FILE))
        checks = {"fp32": compare(session(os.path.join(staging, MODEL_FILE)), model)}
        worst = max(checks["fp32"]["prefill_max_diff"], checks["fp32"]["step_max_diff"])
        if not worst <= TOLERANCE:
            raise RuntimeError(f"the exported graph's logits differ from gptwo's by {worst:.3g} (over {TOLERANCE})")
        if quantize == "int8":
            quantize_int8(os.path.join(staging, MODEL_FILE), os.path.join(staging, QUANTIZED_FILE))
            checks["int8"] = compare(session(os.path.join(staging, QUANTIZED_FILE)), model)
        _write_side_files(staging, model, tokenizer)
        files = _move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sizes = {name: os.path.getsize(os.path.join(out_dir, name)) for name in files}
    return {"out": out_dir, "files": sizes, "checks": checks}


def export_onnx(model_spec: str, out_dir: str, quantize: str | None = None) -> dict:
    """`gptwo export onnx`: load a model (folder, run, hub id or GGUF) and export it with its tokenizer."""
    from gptwo.weights import load_model

    check_out_dir(out_dir)
    model, tokenizer = load_model(model_spec, device="cpu")
    return {"model": model_spec, **export_model(model, tokenizer, out_dir, quantize)}
