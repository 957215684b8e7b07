"""What this machine has: CPU features and name, and the dtype names every part accepts (one place).

The CPU is read once from /proc/cpuinfo (Linux; x86's `flags`, ARM's `Features`), so the native kernels'
ISA choice, the benches' reports and the precision defaults agree. Importing this module does not import
torch: `DTYPES` is built on first use.
"""

from __future__ import annotations

import functools
import platform

KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "asimd")


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return tuple(f.read().splitlines())
    except OSError:
        return ()


def cpu_flag_set() -> frozenset[str]:
    """The CPU's feature flags (x86's `flags`, ARM's `Features`); empty where /proc/cpuinfo is absent."""
    line = next((line for line in _cpuinfo() if line.startswith(("flags", "Features"))), "")
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def cpu_flags() -> list[str]:
    """The CPU features that matter to decoding kernels (AVX2/FMA, AVX-512, native bf16, VNNI, AMX, NEON), sorted."""
    return sorted(cpu_flag_set() & set(KERNEL_FLAGS))


def cpu_name() -> str:
    """The CPU's model name, else what `platform` reports."""
    line = next((line for line in _cpuinfo() if line.startswith("model name")), "")
    return line.split(":", 1)[1].strip() if ":" in line else platform.processor() or platform.machine()


def __getattr__(name: str):
    if name == "DTYPES":  # {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    raise AttributeError(f"module 'gptwo.runtime' has no attribute {name!r}")
