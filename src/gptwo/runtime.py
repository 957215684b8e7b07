"""What this machine has and how gptwo runs on it, in one place: CPU features and name, native bf16,
memory, the device `--device` names and the dtype `--dtype` names (and what `auto` picks).

The CPU is read once from /proc/cpuinfo (Linux; x86's `flags`, ARM's `Features`), so the native kernels'
ISA choice, the benches' reports and the precision defaults agree. The bottom layer (docs/core.md,
Layers): it imports no other gptwo module but gptwo.errors, and importing it does not import torch
(`DTYPES` is built on first use; functions import torch when called).
"""

from __future__ import annotations

import functools
import os
import platform
from typing import TYPE_CHECKING

from gptwo.errors import GptwoError

if TYPE_CHECKING:
    import torch

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


def forced_isa() -> str:
    """The instruction set `GPTWO_KERNEL_ISA` forces on gptwo's kernels (lower case), or "" for none or auto;
    gptwo.infer.native checks that it names one this CPU runs."""
    import os

    forced = os.environ.get("GPTWO_KERNEL_ISA", "").strip().lower()
    return "" if forced == "auto" else forced


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): where torch's bf16 matmuls are fast.

    False where `GPTWO_KERNEL_ISA` forces an instruction set without it (avx2, neon, generic): forcing one
    stands for a machine that has only that, so training picks that machine's precision too.
    """
    import torch

    if forced_isa() in ("avx2", "neon", "generic"):
        return False

    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and/or torch.compile wrappers (the one the wrappers run)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def __getattr__(name: str):
    if name == "DTYPES":  # {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        return _dtypes()
    raise AttributeError(f"module 'gptwo.runtime' has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The `DTYPES` name of a torch dtype ('fp32', 'bf16', 'fp16'), else torch's own name for it."""
    return next((name for name, known in _dtypes().items() if known == dtype), str(dtype))


# ---------------------------------------------------------------- devices and the dtype `auto` picks
def resolve_device(device: str | None = "auto") -> torch.device:
    """The torch.device `--device` names; 'auto' (or None) picks CUDA, then MPS, then CPU.

    A device this machine lacks (CUDA without a CUDA build, cuda:N past the last GPU, MPS off Apple
    silicon) or an unknown name is one line naming the choices.
    """
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps") or (dev.type != "cuda" and dev.index not in (None, 0)):
        raise GptwoError(f"unknown device '{device}'", "use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptwoError(
            "CUDA was asked for but is not available", "use --device cpu, or install a CUDA build of torch"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise GptwoError(
            f"device {device} does not exist (this machine has {count} CUDA device{'s' if count != 1 else ''})",
            f"use cuda:0 to cuda:{count - 1}, or cuda",
        )
    if dev.type == "mps" and not _mps_available():
        raise GptwoError("MPS (Apple GPU) was asked for but is not available", "use --device cpu or auto")
    return torch.device("cpu") if dev.type == "cpu" else dev


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' torch dtype for `--dtype NAME` on `device`: a `DTYPES` name, or 'auto'.

    auto is bf16 where the hardware multiplies bf16 natively, else fp16 on CUDA and fp32 on a CPU: on
    a CPU with AVX-512 BF16 or AMX a batched decode step in bf16 takes about a third of fp32's time
    (docs/serve.md); without them bf16 is emulated and slower than fp32.
    """
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bf16() else torch.float32
    dtypes = _dtypes()
    if name not in dtypes:
        raise GptwoError(f"unknown dtype '{name}'", "use auto, fp32, bf16 or fp16")
    return dtypes[name]


# ---------------------------------------------------------------- memory, before anything is allocated
def _read_number(path: str, key: str | None = None) -> int | None:
    """An integer from a /proc or cgroup file: the whole file, or the value on the line starting with `key`."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if key is None:
                    return int(parts[0]) if parts and parts[0].isdigit() else None
                if parts and parts[0].rstrip(":") == key:
                    return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes that can still be allocated on `device` (host memory by default), or None when it cannot be told.

    Host: the kernel's MemAvailable, lowered to what a cgroup (v2) memory limit leaves; elsewhere the
    free physical pages. CUDA: the device's free memory.
    """
    import torch

    device = torch.device(device or "cpu")
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    found = []
    meminfo = _read_number("/proc/meminfo", "MemAvailable")
    if meminfo is None:
        try:
            meminfo = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            meminfo = None
    if meminfo is not None:
        found.append(meminfo)
    limit = _read_number("/sys/fs/cgroup/memory.max")  # "max" (no limit) reads as None
    if limit is not None:
        used = _read_number("/sys/fs/cgroup/memory.stat", "anon")  # page cache can be reclaimed, so only anon counts
        found.append(max(0, limit - (used or 0)))
    return min(found) if found else None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.0f} MiB"


def check_memory(nbytes: int, what: str, fix: str, device: torch.device | str | None = None) -> None:
    """Refuse, with one line naming `what`, to allocate `nbytes` when `device` has less memory available."""
    import torch

    if nbytes < 2**28:  # a quarter GiB: not worth probing
        return
    free = available_memory(device)
    if free is not None and nbytes > free:
        where = "" if torch.device(device or "cpu").type == "cpu" else f" on {device}"
        raise GptwoError(f"{what} needs about {_gib(nbytes)} of memory but {_gib(free)} is available{where}", fix)
