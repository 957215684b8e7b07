"""GGUF in: a llama.cpp model file of the gpt2 architecture as a gptwo model and tokenizer.

`--model FILE.gguf` (weights.load_pretrained/load_model) reads one through here: the metadata gives the
GPTConfig, the tensors (f32, f16, bf16 or q8_0, which is dequantized) come back under gptwo's names, and
the tokenizer is GPT-2's BPE when the file holds GPT-2's vocabulary and merges, else a byte-level BPE
built from the file's tokens and merges. The tensor names and the q8_0 block are llama.cpp's
(`convert_hf_to_gguf.py` GPT2Model, ggml's `block_q8_0`); gptwo.export.gguf writes files the same way.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from gptwo.config import GPTConfig
from gptwo.errors import GptwoError, require
from gptwo.model import describe, param_count
from gptwo.runtime import check_memory
from gptwo.tokenizer import EOT, Tokenizer, gpt2_files

ARCHITECTURE = "gpt2"
# gptwo's name in a block → llama.cpp's (gguf-py's TensorNameMap for MODEL_ARCH.GPT2)
BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
TOP_NAMES = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
OUTPUT = "output.weight"  # the head; GPT-2 ties it to token_embd
Q8_0_BLOCK = 32  # values per q8_0 block, after one fp16 scale
Q8_0_BYTES = 2 + Q8_0_BLOCK
# the tokenizer.ggml.pre names llama.cpp splits with GPT-2's regex (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2)
GPT2_PRE_NAMES = ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es", "jina-v2-de")
GPT2_PRE_NAMES += ("jina-v2-code", "roberta-bpe")
CONTROL = 3  # tokenizer.ggml.token_type of a special token (gguf.TokenType.CONTROL)
FIX = "use a GGUF of a GPT-2 model (llama.cpp's convert_hf_to_gguf.py or 'gptwo export gguf' writes one)"


def gguf_name(ours: str) -> str:
    """llama.cpp's name of one of gptwo's tensors (e.g. transformer.h.3.mlp.c_fc.weight → blk.3.ffn_up.weight)."""
    stem, _, kind = ours.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    _, _, layer, inner = stem.split(".", 3)
    return f"blk.{layer}.{BLOCK_NAMES[inner]}.{kind}"


def our_name(name: str) -> str | None:
    """gptwo's name of a llama.cpp GPT-2 tensor, or None for the head (tied to the embedding)."""
    if name == OUTPUT:
        return None
    stem, _, kind = name.rpartition(".")
    for ours, theirs in TOP_NAMES.items():
        if stem == theirs:
            return f"{ours}.{kind}"
    parts = stem.split(".")
    inner = {theirs: ours for ours, theirs in BLOCK_NAMES.items()}.get(parts[-1])
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or inner is None:
        raise GptwoError(f"the GGUF holds a tensor {name} that GPT-2 does not have", FIX)
    return f"transformer.h.{int(parts[1])}.{inner}.{kind}"


# ---------------------------------------------------------------- tensors
def dequantize_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of q8_0 blocks (ggml's block_q8_0: an fp16 scale d, then 32 int8 q; value = d * q)."""
    blocks = np.ascontiguousarray(raw).reshape(-1, Q8_0_BYTES)
    scales = blocks[:, :2].view(np.float16).astype(np.float32)
    return (blocks[:, 2:].view(np.int8).astype(np.float32) * scales).reshape(shape)


def tensor_values(tensor, source: str) -> torch.Tensor:
    """A GGUF reader tensor as float32 (a copy of the memory-mapped file) in numpy's row-major shape: ggml lists
    dimensions innermost first."""
    from gguf import GGMLQuantizationType as T

    shape = tuple(int(n) for n in reversed(tensor.shape))
    kind = tensor.tensor_type
    if kind == T.F32:
        values = np.array(tensor.data, dtype=np.float32)
    elif kind == T.F16:
        values = np.asarray(tensor.data).view(np.float16).astype(np.float32)
    elif kind == T.BF16:
        values = (np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif kind == T.Q8_0:
        values = dequantize_q8_0(np.asarray(tensor.data).view(np.uint8), shape)
    else:
        raise GptwoError(
            f"{tensor.name} in {source} is stored as {kind.name}, which gptwo does not read",
            "use an f32, f16, bf16 or q8_0 GGUF ('gptwo export gguf --type' or convert_hf_to_gguf.py --outtype)",
        )
    return torch.from_numpy(values.reshape(shape))


def _open(path: str):
    """A GGUF reader on `path`, or one line saying why the file is not a GGUF model."""
    gguf = require("gguf", f"reading the GGUF file {path}", "export")
    if not os.path.isfile(path):
        what = "is a folder, not a GGUF file" if os.path.isdir(path) else "not found"
        raise GptwoError(f"GGUF file {path} {what}", "check the path")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GptwoError(f"{path} is not a GGUF file (it does not start with 'GGUF')", FIX)
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        raise GptwoError(f"GGUF file {path} is damaged or truncated ({err})", "re-create or re-download it") from None


def _field(reader, key: str, source: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise GptwoError(f"GGUF file {source} has no {key}", FIX)
    return field.contents()


def _config(reader, source: str, vocab_size: int) -> GPTConfig:
    """GPT-2's shape from the metadata llama.cpp's converter writes."""
    arch = _field(reader, "general.architecture", source)
    if arch != ARCHITECTURE:
        raise GptwoError(f"{source} is a GGUF of the {arch!r} architecture, not GPT-2 ({ARCHITECTURE!r})", FIX)
    width = int(_field(reader, "gpt2.embedding_length", source))
    ffn = int(_field(reader, "gpt2.feed_forward_length", source, 4 * width))
    if ffn != 4 * width:
        raise GptwoError(
            f"{source} has a feed-forward width of {ffn}, not GPT-2's 4 x {width}", "use a standard GPT-2 model"
        )
    try:
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=int(_field(reader, "gpt2.context_length", source)),
            n_layer=int(_field(reader, "gpt2.block_count", source)),
            n_head=int(_field(reader, "gpt2.attention.head_count", source)),
            n_embd=width,
            layer_norm_eps=float(_field(reader, "gpt2.attention.layer_norm_epsilon", source)),
        )
    except GptwoError as err:
        raise GptwoError(f"{source}: {err.what}", err.fix) from None


def _state(reader, source: str) -> dict[str, torch.Tensor]:
    """The tensors under gptwo's names; the head must be the embedding (GPT-2 ties them), or absent."""
    raw = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in raw:
        raise GptwoError(f"GGUF file {source} has no token_embd.weight", FIX)
    head = raw.get(OUTPUT)
    embd = raw["token_embd.weight"]
    if head is not None and (head.tensor_type != embd.tensor_type or not np.array_equal(head.data, embd.data)):
        raise GptwoError(
            f"the head ({OUTPUT}) of {source} is not its token embedding, but gptwo's GPT-2 ties the two",
            "use a GPT-2 whose head is tied to its embedding (as GPT-2's own are)",
        )
    return {our_name(name): tensor_values(t, source) for name, t in raw.items() if name != OUTPUT}


# ---------------------------------------------------------------- tokenizer
def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise GptwoError("a tokenizer.ggml.merges entry is not two tokens separated by a space", FIX)
    return pairs  # type: ignore[return-value]


def is_gpt2_vocab(tokens: list[str], merges: list[str]) -> bool:
    """Whether the tokens and merges are GPT-2's BPE (encoder.json in id order, vocab.bpe's merges)."""
    encoder, bpe = gpt2_files()
    with open(encoder, encoding="utf-8") as f:
        vocab = json.load(f)
    if len(tokens) != len(vocab) or any(vocab.get(token) != i for i, token in enumerate(tokens)):
        return False
    with open(bpe, encoding="utf-8") as f:
        return [line for line in f.read().splitlines()[1:] if line] == merges


def byte_level_bpe(tokens: list[str], merges: list[str], special: list[str]) -> Tokenizer:
    """A gptwo byte-level BPE (GPT-2's split, as gptwo trains them) of these tokens, merges and special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GptwoError("the GGUF's tokenizer.ggml.tokens holds the same token twice", FIX)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(special)
    return Tokenizer.from_file_contents(hf.to_str())


def _tokenizer(reader, source: str) -> Tokenizer:
    """GPT-2's BPE when the file holds it, else a byte-level BPE of the file's vocabulary."""
    model = _field(reader, "tokenizer.ggml.model", source)
    if model != "gpt2":
        raise GptwoError(f"{source} has a {model!r} tokenizer, not a GPT-2 style byte-level BPE ('gpt2')", FIX)
    pre = _field(reader, "tokenizer.ggml.pre", source, "gpt-2")
    if pre not in GPT2_PRE_NAMES:
        raise GptwoError(
            f"{source} pre-tokenizes with {pre!r}, not GPT-2's split, so gptwo would tokenize its text differently",
            "use a GGUF whose tokenizer.ggml.pre is 'gpt-2'",
        )
    tokens = _field(reader, "tokenizer.ggml.tokens", source)
    merges = _field(reader, "tokenizer.ggml.merges", source)
    if is_gpt2_vocab(tokens, merges):
        return Tokenizer.gpt2()
    types = _field(reader, "tokenizer.ggml.token_type", source, [1] * len(tokens))
    special = [token for token, kind in zip(tokens, types) if kind == CONTROL]
    if EOT not in special:
        raise GptwoError(f"the tokenizer in {source} has no {EOT} control token, which gptwo's tokenizers end on", FIX)
    return byte_level_bpe(tokens, merges, special)


# ---------------------------------------------------------------- the model
def read_gguf(path: str) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    """The GPTConfig, the state dict (gptwo's names, float32) and the tokenizer of a gpt2 GGUF file."""
    reader = _open(path)
    tokenizer = _tokenizer(reader, path)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab_size = int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else tokenizer.n_vocab
    config = _config(reader, path, vocab_size)
    check_memory(
        2 * param_count(config) * 4, f"loading {path} ({describe(config)})", "load it on a machine with more memory"
    )
    return config, _state(reader, path), tokenizer


def read_gguf_chat_template(path: str) -> str | None:
    """The chat template in a GGUF file's metadata (tokenizer.chat_template, as llama.cpp's converter writes it)."""
    template = _open(path).fields.get("tokenizer.chat_template")
    if template is None:
        return None
    value = template.contents()
    if not isinstance(value, str):
        raise GptwoError(f"GGUF file {path}: tokenizer.chat_template is not a string", FIX)
    return value


def is_gguf_spec(spec: str) -> bool:
    """Whether a --model spec names a GGUF file: by its name (which reading then checks) or by its first bytes."""
    if spec.lower().endswith(".gguf"):
        return True
    try:
        with open(spec, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a folder, a hub id, or a path that is not there
        return False
