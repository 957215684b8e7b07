"""Shard files: round trips, headers, llm.c shards, and clear errors for damaged files."""

import numpy as np
import pytest

from gptwo.data.shards import HEADER_BYTES, read_header, read_shard, token_dtype, write_shard
from gptwo.errors import GptwoError


@pytest.mark.parametrize("top, dtype", [(50256, np.uint16), (65535, np.uint16), (100_000, np.uint32)])
def test_round_trip_picks_the_smallest_dtype(tmp_path, top, dtype):
    tokens = np.array([0, 1, top, 7, top - 1], dtype=np.int64)
    path = str(tmp_path / "s.bin")
    write_shard(path, tokens, "gpt2")
    read = read_shard(path)
    assert read.dtype == dtype
    assert isinstance(read, np.memmap)
    np.testing.assert_array_equal(read, tokens)
    header = read_header(path)
    assert (header.format, header.num_tokens, header.tokenizer_identity, header.dtype) == (
        "gptwo",
        5,
        "gpt2",
        np.dtype(dtype),
    )
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 5 * np.dtype(dtype).itemsize


def test_token_dtype_follows_vocab_size():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_identity_and_empty_shard(tmp_path):
    path = str(tmp_path / "e.bin")
    write_shard(path, np.zeros(0, dtype=np.uint16), "bpe-0123456789abcdef")
    assert read_header(path).tokenizer_identity == "bpe-0123456789abcdef"
    assert len(read_shard(path)) == 0


def test_ids_too_large_for_dtype_are_refused(tmp_path):
    with pytest.raises(GptwoError, match="do not fit uint16"):
        write_shard(str(tmp_path / "s.bin"), np.array([70000]), "x", dtype=np.uint16)


def test_truncated_shard_names_file_and_fix(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(str(path), np.arange(100), "gpt2")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(GptwoError) as err:
        read_shard(str(path))
    assert str(path) in err.value.what and "truncated" in err.value.what
    assert "gptwo prepare" in err.value.fix


def test_bad_magic_and_short_header(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a shard at all" * 100)
    with pytest.raises(GptwoError, match="bad magic"):
        read_header(str(bad))
    short = tmp_path / "short.bin"
    write_shard(str(short), np.arange(4), "gpt2")
    short.write_bytes(short.read_bytes()[:40])
    with pytest.raises(GptwoError, match="truncated"):
        read_shard(str(short))


def write_llmc(path, tokens, version=1):
    """A shard as llm.c's dev/data/data_common.py write_datafile lays it out."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, version, len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_reads_llmc_shards(tmp_path):
    path = str(tmp_path / "tiny_val_000000.bin")
    tokens = [50256, 15496, 995, 13]
    write_llmc(path, tokens)
    header = read_header(path)
    assert (header.format, header.num_tokens, header.tokenizer_identity, header.data_offset) == (
        "llm.c",
        4,
        "gpt2",
        1024,
    )
    np.testing.assert_array_equal(read_shard(path), tokens)


def test_llmc_errors(tmp_path):
    path = tmp_path / "x_train_000000.bin"
    write_llmc(str(path), [1, 2, 3], version=7)
    with pytest.raises(GptwoError, match="version 7"):
        read_header(str(path))
    write_llmc(str(path), [1, 2, 3])
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(GptwoError, match="corrupt"):
        read_shard(str(path))
