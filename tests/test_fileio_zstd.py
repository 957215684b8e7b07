"""The zstd reader keeps memory bounded on highly compressible input (a "zip bomb") and still reads it all."""

import io

import pytest

zstandard = pytest.importorskip("zstandard")

from gptwo.fileio import ZSTD_FEED, DamagedStream, ZstdReader  # noqa: E402


def _bomb(total: int) -> bytes:
    """`total` zero bytes as one zstd frame, written in 1 MiB pieces (a few KB compressed)."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=19).stream_writer(out, closefd=False) as writer:
        zeros = bytes(1 << 20)
        for _ in range(total >> 20):
            writer.write(zeros)
    return out.getvalue()


def test_bomb_output_is_bounded_per_step_and_complete():
    total = 256 << 20
    data = _bomb(total)
    assert len(data) < 64 << 10  # the input really is a bomb: over 4,000x
    reader = ZstdReader(io.BytesIO(data))
    buffer = bytearray(1 << 20)
    largest, seen = 0, 0
    while n := reader.readinto(buffer):
        largest = max(largest, len(reader._out) + n)
        assert not any(buffer[:n:4096])
        seen += n
    assert seen == total
    # one step's output is bounded by what ZSTD_FEED compressed bytes can code (~32,000x), not the file
    assert largest <= ZSTD_FEED * 32_768


def test_truncated_bomb_still_reports_damage():
    data = _bomb(8 << 20)
    reader = ZstdReader(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(DamagedStream):
        while reader.readinto(bytearray(1 << 20)):
            pass
