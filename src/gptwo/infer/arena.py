"""Weights in one huge-page-backed arena, so batch-1 decoding streams them with few TLB misses.

A decode step reads every weight once per token. On 4 KiB pages that is one page (and one TLB entry)
per 4 KiB streamed, and the hardware prefetchers stop at each page boundary; 2 MiB transparent huge
pages remove most of those stalls (docs/inference.md has the measurement). Linux with transparent huge
pages in `madvise` or `always` mode; elsewhere, with GPTWO_HUGE_PAGES=0, or when the mapping cannot be
had, the tensors stay where they are.
"""

from __future__ import annotations

import mmap
import os

import torch

HUGE_PAGE = 2 << 20
ALIGN = 4096  # each tensor starts on its own 4 KiB boundary inside the arena


def huge_pages_available() -> bool:
    """Whether this OS can back an anonymous mapping with transparent huge pages on request."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get("GPTWO_HUGE_PAGES", "1") == "0":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def arena_views(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Empty tensors shaped and typed as CPU `tensors`, laid out in one MADV_HUGEPAGE mapping; None if unavailable.

    The mapping lives as long as any returned tensor (torch.frombuffer holds it); the first starts on a
    huge-page boundary, each on a 4 KiB one. Pages are backed when written, so a caller that copies one
    tensor in and drops the original before the next keeps the peak near one model's size.
    """
    if not tensors or not huge_pages_available() or any(t.device.type != "cpu" for t in tensors):
        return None
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // ALIGN) * ALIGN
    try:
        area = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    raw = torch.frombuffer(area, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return [
        raw[start + offset : start + offset + size].view(t.dtype).view(t.shape)
        for t, offset, size in zip(tensors, offsets, sizes, strict=True)
    ]
