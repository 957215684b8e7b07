"""`gptwo export gguf`: a GPT-2 as llama.cpp's GGUF file, written with the `gguf` package (llama.cpp's gguf-py).

The file holds what llama.cpp's `convert_hf_to_gguf.py` (GPT2Model) writes for the same model saved as a
Hugging Face folder, key by key and tensor by tensor: the same metadata, tensor names and order, the
same per-tensor types (norms, biases and the position table stay f32), and the tokenizer as
`tokenizer.ggml.model = "gpt2"` with its tokens, types and merges. The pre-tokenizer is `"gpt-2"`
for GPT-2's BPE and for gptwo-trained ones alike: both split text with GPT-2's regex (HF's ByteLevel
pre-tokenizer; llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2), which the converter cannot tell for a new
vocabulary ("BPE pre-tokenizer was not recognized", llama.cpp #7338). q8_0 is quantized here, in
ggml's block_q8_0 layout with its rounding (ggml-quants.c `quantize_row_q8_0_ref`).
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from gptwo.errors import GptwoError, require
from gptwo.gguf import ARCHITECTURE, OUTPUT, Q8_0_BLOCK, gguf_name
from gptwo.infer.prepare import prepared_settings
from gptwo.model import GPT
from gptwo.tokenizer import Tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # convert_hf_to_gguf.py's --outtype names
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}  # llama.cpp's LlamaFileType (general.file_type)
NORMAL, USER_DEFINED, CONTROL, UNUSED = 1, 4, 3, 5  # tokenizer.ggml.token_type values (gguf.TokenType)


# ---------------------------------------------------------------- tensors
def _roundf(values: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exactly: the fraction a - floor(a) of a float32 is exact."""
    magnitude = np.abs(values)
    whole = np.floor(magnitude)
    return np.copysign(whole + (magnitude - whole >= 0.5), values)


def quantize_q8_0(values: np.ndarray) -> np.ndarray:
    """Rows of float32 as q8_0 bytes: per 32 values an fp16 scale d = max|x| / 127, then round(x / d) as int8."""
    rows = values.shape[0]
    blocks = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, Q8_0_BLOCK)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(scale == 0, np.float32(0), np.float32(1) / scale)
    quants = _roundf(blocks * inverse).astype(np.int8)
    packed = np.concatenate([scale.astype(np.float16).view(np.uint8), quants.view(np.uint8)], axis=1)
    return packed.reshape(rows, -1)


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 as bfloat16 bytes, rounded to nearest even (the weights are finite: loading refuses NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    return rounded.astype(np.uint16).view(np.uint8).reshape(*values.shape[:-1], -1)


def _kept_f32(name: str, values: np.ndarray) -> bool:
    """The tensors llama.cpp keeps in f32 whatever the file type: 1-D ones, norms, biases, the position table."""
    kept = values.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
    return kept or name == "position_embd.weight"


def encode_tensor(name: str, values: np.ndarray, file_type: str):
    """(data, ggml type) of one float32 tensor in a file of `file_type`, as the converter chooses them."""
    from gguf import GGMLQuantizationType as T

    if file_type == "f32" or _kept_f32(name, values):
        return values.astype(np.float32, copy=False), T.F32
    if file_type == "bf16":
        return to_bf16(values), T.BF16
    if file_type == "q8_0" and values.shape[-1] % Q8_0_BLOCK == 0:
        return quantize_q8_0(values), T.Q8_0
    return values.astype(np.float16), T.F16  # f16, and q8_0 rows that are not whole blocks (the converter's fallback)


def gguf_tensors(model: GPT, file_type: str) -> list[tuple[str, np.ndarray, object]]:
    """(GGUF name, data, type) of every tensor, in the converter's order: the checkpoint's names sorted (as a
    safetensors file lists them), the head written right after the embedding it is tied to."""
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors = []
    for ours in sorted(state):
        values = state[ours].detach().to("cpu").float().contiguous().numpy()
        name = gguf_name(ours)
        tensors.append((name, *encode_tensor(name, values, file_type)))
        if name == "token_embd.weight":
            tensors.append((OUTPUT, *tensors[-1][1:]))
    return tensors


# ---------------------------------------------------------------- tokenizer
def check_byte_level(spec: dict) -> None:
    """The tokenizer must split text as llama.cpp's 'gpt-2' pre-tokenizer does: a byte-level BPE, GPT-2's regex,
    no normalizer and no prefix space."""
    pre = spec.get("pre_tokenizer") or {}
    plain = (
        spec.get("model", {}).get("type") == "BPE"
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )
    if not plain:
        raise GptwoError(
            "the model's tokenizer is not a GPT-2 style byte-level BPE (GPT-2's split, no normalizer, no prefix "
            "space), so llama.cpp's 'gpt-2' pre-tokenizer would split its text differently",
            "export a model whose tokenizer is GPT-2's or one trained by 'gptwo tokenizer train'",
        )


def vocab_metadata(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """The tokens (vocab-file strings by id, padding ids as [PADn]), their types and the merges ('a b')."""
    spec = json.loads(tokenizer.to_json())
    check_byte_level(spec)
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    by_id.update({i: entry["content"] for i, entry in added.items()})
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(token)
        if i not in added:
            types.append(NORMAL)
        else:
            special = added[i].get("special") or (token.startswith("<|") and token.endswith("|>"))
            types.append(CONTROL if special else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


# ---------------------------------------------------------------- the file
def check_out_file(path: str, suffix: str) -> None:
    """An output file path must end in `suffix` and lie in an existing folder (a typo'd folder is not created)."""
    if not path.lower().endswith(suffix):
        raise GptwoError(f"--out {path} does not end in {suffix}", f"name the file like model{suffix}")
    if os.path.isdir(path):
        raise GptwoError(f"--out {path} is a folder", f"give a file name, e.g. {os.path.join(path, 'model' + suffix)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GptwoError(f"the folder of --out {path} ({folder}) does not exist", "create it, or choose another path")


def write_gguf(
    model: GPT,
    tokenizer: Tokenizer,
    path: str,
    file_type: str = "f32",
    name: str = "gptwo",
    chat_template: str | None = None,
) -> dict:
    """Write `model` and `tokenizer` (and a chat template, as llama.cpp's converter stores one) as a GGUF file at
    `path` (atomically: a temporary file, then renamed)."""
    gguf = require("gguf", "gptwo export gguf", "export")
    if file_type not in GGUF_TYPES:
        raise GptwoError(f"unknown GGUF type '{file_type}'", f"use one of {', '.join(GGUF_TYPES)}")
    if prepared_settings(model) is not None:
        raise GptwoError(
            "a model prepared for inference (quantized or re-laid) cannot be exported", "export it before preparing"
        )
    check_out_file(path, ".gguf")
    config = model.config
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE)
    tensors = gguf_tensors(model, file_type)
    for tensor_name, data, kind in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
    tokens, types, merges = vocab_metadata(tokenizer, config.vocab_size)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_file_type(FILE_TYPES[file_type])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id):
        add(tokenizer.eot_token)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_atomically(writer, path)
    return {
        "path": path,
        "type": file_type,
        "bytes": os.path.getsize(path),
        "tensors": len(tensors),
        "tokens": len(tokens),
        "tokenizer": "gpt2" if tokenizer.name == "gpt2" else "byte-level BPE",
    }


def _write_atomically(writer, path: str) -> None:
    """The writer's file, written to a temporary file beside `path`, flushed to disk, then renamed onto it."""
    from pathlib import Path

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        for f in writer.fout:
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_gguf(model_spec: str, out: str, file_type: str = "f32", name: str | None = None) -> dict:
    """`gptwo export gguf`: load a model (folder, run, hub id or GGUF) with its tokenizer and write it as GGUF."""
    from gptwo.weights import load_model, model_chat_template

    if file_type not in GGUF_TYPES:
        raise GptwoError(f"unknown GGUF type '{file_type}'", f"use one of {', '.join(GGUF_TYPES)}")
    check_out_file(out, ".gguf")
    model, tokenizer = load_model(model_spec, device="cpu")
    default_name = os.path.basename(os.path.normpath(model_spec)).removesuffix(".gguf") or "gptwo"
    template = model_chat_template(model_spec)
    return {"model": model_spec, **write_gguf(model, tokenizer, out, file_type, name or default_name, template)}
