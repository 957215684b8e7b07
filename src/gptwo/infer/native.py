"""Native CPU kernels (kernels/gptwo_kernels.c): compiled on first use, loaded with ctypes, called on tensor pointers.

The C source ships in the package and is built with the system compiler (`cc -O3 -march=native -fopenmp
-shared`, `$CC` overrides `cc`) into a per-user cache keyed by the source, the command and the CPU's flags,
written atomically. It needs x86-64 with AVX-512 (f, bw, vl); without a compiler or those flags, or with
`GPTWO_NATIVE=0`, `library()` returns None after a one-line note and gptwo keeps torch's matmul.
`GPTWO_NATIVE_BF16=dp|widen` and `GPTWO_NATIVE_INT8=w16|widen|vnni` pick the bf16 / int8 kernel, and
`GPTWO_NATIVE_THREADS=N` the decode step's threads (default: torch's) (docs/inference.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import resources

import torch

from gptwo.errors import GptwoError

F32, BF16, BF16_DP, I8, I8_VNNI, I8_W16 = range(6)  # kernel kinds, as in the C source
KIND_NAMES = {F32: "fp32", BF16: "bf16 widened to fp32", BF16_DP: "bf16 vdpbf16ps", I8: "int8 widened to fp32", I8_VNNI: "int8 vpdpbusd (activations int8 per 64)",
              I8_W16: "int8 vpdpwssd (activations int16 per token)"}
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl")
SOURCE = "gptwo_kernels.c"
_state: dict = {}  # "lib": the loaded library or None, "why": why not


def cpu_flag_set() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cache_dir() -> str:
    """Where built kernels live: $GPTWO_KERNEL_CACHE, else $XDG_CACHE_HOME/gptwo/kernels (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("GPTWO_KERNEL_CACHE") or os.path.join(base, "gptwo", "kernels")


def _build(source: bytes, flags: set[str]) -> str:
    """Path of the shared library for this source, compiler and CPU, compiling it if not cached."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ('{compiler}' not found)")
    command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(source + " ".join(command).encode() + " ".join(sorted(flags)).encode()).hexdigest()[:16]
    directory = cache_dir()
    target = os.path.join(directory, f"gptwo_kernels_{key}.so")
    if os.path.exists(target):
        return target
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, out = os.path.join(tmp, SOURCE), os.path.join(tmp, "k.so")
        with open(src, "wb") as f:
            f.write(source)
        done = subprocess.run([*command, "-o", out, src], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise OSError(f"the compiler failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
        os.replace(out, target)  # atomic: a concurrent build or reader never sees half a file
    return target


def _load() -> ctypes.CDLL:
    if os.environ.get("GPTWO_NATIVE", "1") == "0":
        raise OSError("GPTWO_NATIVE=0")
    flags = cpu_flag_set()
    if platform.machine() not in ("x86_64", "AMD64") or not set(REQUIRED_FLAGS) <= flags:
        raise OSError("this CPU lacks AVX-512 (f, bw, vl)")
    source = resources.files("gptwo.infer").joinpath("kernels", SOURCE).read_bytes()
    lib = ctypes.CDLL(_build(source, flags))
    p, i, i64p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
    lib.gptwo_caps.restype = i
    lib.gptwo_linear.argtypes = [i, p, p, p, p, p, i, i, i, i]
    lib.gptwo_linear.restype = None
    lib.gptwo_step_scratch_bytes.argtypes = [i64p, i]
    lib.gptwo_step_scratch_bytes.restype = ctypes.c_size_t
    lib.gptwo_step.argtypes = [p, i64p, ctypes.c_float, p, i, i, p, p]
    lib.gptwo_step.restype = i
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with a one-line note on stderr, once) when they cannot be built here."""
    if "lib" not in _state:  # torch (imported above) has loaded its libgomp.so.1: the kernels bind to it, one runtime
        try:
            _state["lib"], _state["why"] = _load(), None
        except OSError as err:
            _state["lib"], _state["why"] = None, str(err)
            if str(err) != "GPTWO_NATIVE=0":
                print(f"note: gptwo's native CPU kernels are off ({err}); using torch's matmul", file=sys.stderr)
    return _state["lib"]


def reset() -> None:
    """Forget the loaded library (tests switch the environment and load again)."""
    _state.clear()


def kind_for(weight_dtype: str) -> int | None:
    """The kernel kind for 'fp32', 'bf16' or 'int8' weights on this CPU, or None when the kernels are off."""
    lib = library()
    if lib is None:
        return None
    caps = lib.gptwo_caps()
    if weight_dtype == "fp32":
        return F32
    if weight_dtype == "bf16":
        return BF16_DP if os.environ.get("GPTWO_NATIVE_BF16", "dp") == "dp" and caps & (1 << BF16_DP) else BF16
    choice = {"vnni": I8_VNNI, "w16": I8_W16}.get(os.environ.get("GPTWO_NATIVE_INT8", "w16"), I8)
    return choice if caps & (1 << choice) else I8


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(kind: int, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`x (M, K) fp32 @ weight.T * scale + bias` on the native kernel: weight (N, K) contiguous, scale/bias fp32 (N,)."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    library().gptwo_linear(kind, ptr(weight), ptr(scale), ptr(bias), ptr(x), ptr(y), M, K, N, torch.get_num_threads())
    return y


STEP_CHUNK = 64  # prompt tokens per native step call (its scratch is sized for this many)


class NativeStep:
    """GPT-2's whole forward for a batch of one, in one C call per token, over a preallocated fp32 KV cache.

    Embeddings, LayerNorms, the QKV/projection/MLP linears on the native kernels, attention over the cache,
    GELU and residuals all run inside one OpenMP region (kernels/gptwo_kernels.c: `gptwo_step`), so a token
    costs one Python call instead of a few hundred torch ops. Activations and the cache are fp32 whatever
    the weights are. Built from a model prepared with native linears (`supports`).
    """

    def __init__(self, model: torch.nn.Module, max_len: int):
        lib, config, tf = library(), model.config, model.transformer
        self.lib, self.max_len, self.vocab = lib, max_len, config.vocab_size
        self.keep: list[torch.Tensor] = []
        pointers: list[int | None] = []
        for block in tf.h:
            parts = [f32(block.ln_1.weight), f32(block.ln_1.bias), *_linear_parts(block.attn.c_attn), *_linear_parts(block.attn.c_proj),
                     f32(block.ln_2.weight), f32(block.ln_2.bias), *_linear_parts(block.mlp.c_fc), *_linear_parts(block.mlp.c_proj)]
            self.keep += [t for t in parts if t is not None]
            pointers += [ptr(t) for t in parts]
        shape = (config.n_layer, config.n_head, max_len, config.head_dim)
        self.k, self.v = torch.empty(shape), torch.empty(shape)  # only written slots are read
        head_w, head_scale, _ = _linear_parts(model.lm_head)
        wte, wpe = tf.wte.weight.detach().contiguous(), tf.wpe.weight.detach().contiguous()
        tail = [wte, wpe, f32(tf.ln_f.weight), f32(tf.ln_f.bias), head_w, head_scale, self.k, self.v]
        self.keep += [t for t in tail if t is not None]
        pointers += [ptr(t) for t in tail]
        self.pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        threads = int(os.environ.get("GPTWO_NATIVE_THREADS") or torch.get_num_threads())
        dims = [config.n_layer, config.n_embd, config.n_head, config.vocab_size, max_len, model.lm_head.kind, int(wte.dtype == torch.bfloat16), threads]
        self.dims = (ctypes.c_int64 * len(dims))(*dims)
        self.eps = float(config.layer_norm_eps)
        self.scratch = torch.empty(lib.gptwo_step_scratch_bytes(self.dims, STEP_CHUNK), dtype=torch.uint8)
        self.logits = torch.empty(config.vocab_size)
        self.length: int | None = None  # tokens in the cache after the last call

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether every linear of `model` is one native kind and its embeddings are fp32 or bf16 on the CPU."""
        from gptwo.infer.linear import NativeLinear

        tf = model.transformer
        linears = [m for b in tf.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)] + [model.lm_head]
        return (all(isinstance(m, NativeLinear) for m in linears) and len({m.kind for m in linears}) == 1
                and tf.wte.weight.device.type == "cpu" and tf.wte.weight.dtype in (torch.float32, torch.bfloat16)
                and model.config.n_embd % model.config.n_head == 0 and library() is not None)

    def __call__(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (1, vocab) after tokens `idx` (1, T) at positions start..start+T-1; their keys/values enter the cache."""
        tokens = idx.reshape(-1).to(torch.int64).contiguous()
        for first in range(0, tokens.numel(), STEP_CHUNK):
            chunk = tokens[first : first + STEP_CHUNK]
            if self.lib.gptwo_step(self.pointers, self.dims, self.eps, ptr(chunk), chunk.numel(), start + first, ptr(self.logits), ptr(self.scratch)):
                raise GptwoError(f"{tokens.numel()} tokens at position {start} do not fit {self.max_len} slots, or an id is outside the vocabulary",
                                 "pass token ids below the vocabulary size and stay within the context")
        self.length = start + tokens.numel()
        return self.logits.clone()[None]


def f32(t: torch.Tensor) -> torch.Tensor:
    """A small tensor (LayerNorm, bias) as the contiguous fp32 the C step reads."""
    return t.detach().float().contiguous()


def _linear_parts(linear: torch.nn.Module) -> list[torch.Tensor | None]:
    """A native linear's (weights, scales, bias) as the C step reads them."""
    return [linear.w, linear.scales, linear.bias]
