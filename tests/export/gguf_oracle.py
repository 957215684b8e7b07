"""The GGUF llama.cpp's `convert_hf_to_gguf.py` (GPT2Model) writes for an HF GPT-2 folder, re-written here from its
documented steps with gguf-py's own pieces (TensorNameMap, quants.quantize, GGUFWriter), not gptwo's: the oracle
the export tests hold `gptwo export gguf` to when no llama.cpp tree is given (and beside it when one is).

The steps (convert_hf_to_gguf.py: Model.prepare_tensors, prepare_metadata, _set_vocab_gpt2; GPT2Model):
tensors in the safetensors file's order, the attention-mask buffers dropped, Conv1D weights transposed, names
mapped by gguf-py's TensorNameMap, `output.weight` added after `token_embd.weight` (tied); 1-D tensors, norms,
biases and the position table f32, the rest of the file type (q8_0 falling back to f16 where rows are not whole
blocks); then general.type/name/size_label, the gpt2.* hyper-parameters, general.file_type, the tokenizer
(tokens by id, CONTROL for special added tokens, merges, bos/eos/unk from tokenizer_config.json) and the
quantization version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np

CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


def _read_json(directory: str, name: str) -> dict:
    with open(os.path.join(directory, name), encoding="utf-8") as f:
        return json.load(f)


def _tensors(writer: gguf.GGUFWriter, directory: str, n_layer: int, outtype: str) -> None:
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, n_layer)
    with safe_open(os.path.join(directory, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            data = f.get_tensor(key).float()
            if key.endswith(CONV1D):
                data = data.T
            new = names.get_name(key, try_suffixes=(".weight", ".bias"))
            for name in [new, "output.weight"] if new == "token_embd.weight" else [new]:
                values = data.contiguous().numpy()
                f32 = values.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
                qtype = QTYPES["f32" if f32 or name == "position_embd.weight" else outtype]
                try:
                    packed = gguf.quants.quantize(values, qtype)
                except gguf.QuantError:
                    qtype = gguf.GGMLQuantizationType.F16
                    packed = gguf.quants.quantize(values, qtype)
                writer.add_tensor(name, packed, raw_dtype=qtype)


def _vocab(writer: gguf.GGUFWriter, directory: str, vocab_size: int) -> None:
    spec = _read_json(directory, "tokenizer.json")
    added = {entry["id"]: entry for entry in spec["added_tokens"]}
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            special = i in added and added[i]["special"]
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    settings = _read_json(directory, "tokenizer_config.json")
    ids = {token: i for i, token in by_id.items()}
    writer.add_bos_token_id(ids[settings["bos_token"]])
    writer.add_eos_token_id(ids[settings["eos_token"]])
    writer.add_unk_token_id(ids[settings["unk_token"]])


def write_converter_layout(directory: str, out: str, outtype: str, name: str) -> None:
    """Write what convert_hf_to_gguf.py --outtype `outtype` writes for the HF folder `directory`, named `name`."""
    hf = _read_json(directory, "config.json")
    writer = gguf.GGUFWriter(path=None, arch="gpt2")
    _tensors(writer, directory, hf["n_layer"], outtype)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_block_count(hf["n_layer"])
    writer.add_context_length(hf["n_ctx"])
    writer.add_embedding_length(hf["n_embd"])
    writer.add_feed_forward_length(4 * hf["n_embd"])
    writer.add_head_count(hf["n_head"])
    writer.add_layer_norm_eps(hf["layer_norm_epsilon"])
    writer.add_file_type(FILE_TYPES[outtype])
    _vocab(writer, directory, hf["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file(path=Path(out))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def assert_same_gguf(ours: str, theirs: str) -> None:
    """Key by key (order, type, value) and tensor by tensor (order, name, type, shape, bytes), then the whole file."""
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    assert list(a.fields) == list(b.fields)
    for key, field in a.fields.items():
        other = b.fields[key]
        assert field.types == other.types, key
        assert [p.tobytes() for p in field.parts] == [p.tobytes() for p in other.parts], key
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type, ta.name
        assert list(ta.shape) == list(tb.shape), ta.name
        assert np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)), ta.name
    with open(ours, "rb") as f, open(theirs, "rb") as g:
        assert f.read() == g.read()
