"""Token shards on disk: gptwo's own format and llm.c's `.bin` format, both read memory-mapped.

gptwo shard (all integers little-endian):

    offset  size  field
    0       8     magic b"GPTWOTOK"
    8       4     version (uint32) = 1
    12      4     bytes per token (uint32): 2 = uint16, 4 = uint32
    16      8     token count (uint64)
    24      4     length L of the tokenizer identity (uint32)
    28      L     tokenizer identity, UTF-8 (e.g. "gpt2")
    ...           zero padding up to HEADER_BYTES (1024)
    1024    ...   the tokens

llm.c shard: 256 int32 header (magic 20240520, version 1, token count), then uint16 tokens.

Loss mask (`NAME.mask` beside shard `NAME.bin`, for chat data): which tokens the loss counts.

    offset  size  field
    0       8     magic b"GPTWOMSK"
    8       4     version (uint32) = 1
    12      4     zero
    16      8     token count (uint64), equal to the shard's
    24      ...   one byte per token: 1 = counted, 0 = not
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from gptwo.errors import GptwoError
from gptwo.fileio import atomic_write

MAGIC = b"GPTWOTOK"
VERSION = 1
HEADER_BYTES = 1024
_FIXED = struct.Struct("<8sIIQI")  # magic, version, bytes per token, token count, identity length
LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_BYTES = 256 * 4
LLMC_IDENTITY = "gpt2"
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_FIX = "re-create the data with 'gptwo prepare'"
MASK_MAGIC = b"GPTWOMSK"
_MASK_FIXED = struct.Struct("<8sIIQ")  # magic, version, zero, token count
MASK_HEADER_BYTES = _MASK_FIXED.size


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's header says: its format, token count, token dtype and tokenizer."""

    format: str  # "gptwo" or "llm.c"
    version: int
    num_tokens: int
    dtype: np.dtype
    tokenizer_identity: str
    data_offset: int


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest shard dtype for a vocabulary: uint16 up to 65,535 tokens, else uint32."""
    return _DTYPES[2] if n_vocab <= 65535 else _DTYPES[4]


def encode_header(num_tokens: int, dtype: np.dtype, tokenizer_identity: str) -> bytes:
    """The HEADER_BYTES-long header of a gptwo shard."""
    identity = tokenizer_identity.encode("utf-8")
    if len(identity) > HEADER_BYTES - _FIXED.size:
        raise GptwoError(
            f"tokenizer identity '{tokenizer_identity[:40]}...' is too long for a shard header",
            "use a shorter tokenizer name",
        )
    fixed = _FIXED.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, num_tokens, len(identity))
    return (fixed + identity).ljust(HEADER_BYTES, b"\0")


def write_shard(path: str, tokens: np.ndarray, tokenizer_identity: str, dtype: np.dtype | str | None = None) -> None:
    """Write `tokens` as a gptwo shard at `path`, atomically (uint16 if every id fits, else uint32)."""
    tokens = np.asarray(tokens)
    if dtype is None:
        dtype = _DTYPES[2] if not tokens.size or int(tokens.max()) <= 65535 else _DTYPES[4]
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype.itemsize not in _DTYPES or dtype.kind != "u":
        raise GptwoError(f"shard dtype {dtype} is not supported", "use uint16 or uint32")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(dtype).max):
        raise GptwoError(
            f"token ids in {path} do not fit {dtype.name}", "use uint32 shards for vocabularies over 65,535 tokens"
        )
    atomic_write(
        path,
        encode_header(tokens.size, dtype, tokenizer_identity),
        memoryview(np.ascontiguousarray(tokens, dtype=dtype)).cast("B"),
    )


def read_header(path: str) -> ShardHeader:
    """Parse and check a shard's header (gptwo or llm.c, told apart by the magic); checks the file size too."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as err:
        raise GptwoError(f"cannot read shard {path} ({err.strerror or err})", _FIX) from None
    if head[:8] == MAGIC:
        header = _parse_gptwo(path, head)
    elif len(head) >= 12 and struct.unpack("<i", head[:4])[0] == LLMC_MAGIC:
        header = _parse_llmc(path, head)
    else:
        raise GptwoError(f"{path} is not a token shard (bad magic)", _FIX)
    expected = header.data_offset + header.num_tokens * header.dtype.itemsize
    if size != expected:
        raise GptwoError(
            f"shard {path} is {size} bytes but its header promises {header.num_tokens} tokens "
            f"({expected} bytes): it is truncated or corrupt",
            _FIX,
        )
    return header


def _parse_gptwo(path: str, head: bytes) -> ShardHeader:
    if len(head) < HEADER_BYTES:
        raise GptwoError(f"shard {path} is truncated inside its header", _FIX)
    magic, version, itemsize, count, id_len = _FIXED.unpack_from(head)
    if version != VERSION:
        raise GptwoError(f"shard {path} has format version {version}; this gptwo reads version {VERSION}", _FIX)
    if itemsize not in _DTYPES or id_len > HEADER_BYTES - _FIXED.size:
        raise GptwoError(f"shard {path} has a corrupt header", _FIX)
    identity = head[_FIXED.size : _FIXED.size + id_len].decode("utf-8", errors="replace")
    return ShardHeader("gptwo", version, count, _DTYPES[itemsize], identity, HEADER_BYTES)


def _parse_llmc(path: str, head: bytes) -> ShardHeader:
    if len(head) < LLMC_HEADER_BYTES:
        raise GptwoError(
            f"llm.c shard {path} is truncated inside its header",
            "re-create it with llm.c's data scripts or use 'gptwo prepare'",
        )
    _, version, count = struct.unpack_from("<iii", head)
    if version != LLMC_VERSION or count < 0:
        raise GptwoError(
            f"llm.c shard {path} has version {version}; gptwo reads version 1 (GPT-2, uint16)",
            "use GPT-2 shards or 'gptwo prepare'",
        )
    return ShardHeader("llm.c", version, count, _DTYPES[2], LLMC_IDENTITY, LLMC_HEADER_BYTES)


def read_shard(path: str) -> np.ndarray:
    """A shard's tokens as a read-only memory-mapped array (nothing is loaded until used)."""
    header = read_header(path)
    if header.num_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=header.data_offset, shape=(header.num_tokens,))


def mask_path(shard_path: str) -> str:
    """The loss mask file beside a shard: `train_000000.bin` → `train_000000.mask`."""
    return os.path.splitext(shard_path)[0] + ".mask"


def write_mask(path: str, mask: np.ndarray) -> None:
    """Write a loss mask (one bool per token of its shard) at `path`, atomically."""
    mask = np.asarray(mask, dtype=bool)
    atomic_write(path, _MASK_FIXED.pack(MASK_MAGIC, VERSION, 0, mask.size), mask.astype(np.uint8).tobytes())


def read_mask(path: str) -> np.ndarray:
    """A loss mask as a read-only memory-mapped uint8 array (1 = the token is counted), its header checked."""
    try:
        with open(path, "rb") as f:
            head = f.read(MASK_HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as err:
        raise GptwoError(f"cannot read loss mask {path} ({err.strerror or err})", _FIX) from None
    if len(head) < MASK_HEADER_BYTES or head[:8] != MASK_MAGIC:
        raise GptwoError(f"{path} is not a loss mask (bad magic)", _FIX)
    _, version, _, count = _MASK_FIXED.unpack(head)
    if version != VERSION or size != MASK_HEADER_BYTES + count:
        raise GptwoError(f"loss mask {path} is truncated or corrupt ({size} bytes for {count} tokens)", _FIX)
    if count == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=MASK_HEADER_BYTES, shape=(count,))
