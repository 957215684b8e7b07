"""Weights in one huge-page-backed arena, so batch-1 decoding streams them with few TLB misses.

A decode step reads every weight once per token. On 4 KiB pages that is one page (and one TLB entry)
per 4 KiB streamed, and the hardware prefetchers stop at each page boundary; 2 MiB transparent huge
pages remove most of those stalls. Measured on the 124M shape's native bf16 step, one AVX2 thread: 16-17
ms of CPU per token on 4 KiB pages, 12.7-13.2 ms with the weights in an MADV_HUGEPAGE arena
(experiments/README.md shows how to rerun it). Linux with transparent huge pages in `madvise` or
`always` mode; elsewhere (or when the arena cannot be had) the tensors stay where they are.
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


def into_arena(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Copies of CPU `tensors` (contiguous) laid out in one MADV_HUGEPAGE mapping, in order; None if unavailable.

    The mapping lives as long as any returned tensor (torch.frombuffer holds it). Tensors sharing one
    storage (a tied head and embedding) should be passed once and the result reused by the caller.
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
    start = -raw.data_ptr() % HUGE_PAGE  # the first tensor on a huge-page boundary
    out = []
    for t, offset, size in zip(tensors, offsets, sizes, strict=True):
        view = raw[start + offset : start + offset + size].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out
