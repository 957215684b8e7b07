"""Native CPU kernels (kernels/gptwo_kernels.c): built once per instruction set, loaded with ctypes,
called on tensor pointers.

One C source serves every CPU: it is compiled for the best instruction set this CPU has (`avx512`,
`avx2`, `neon`, else `generic`), or the one `GPTWO_KERNEL_ISA` names, with the system compiler
(`cc -O3 -fopenmp -shared` plus the set's flags; `$CC` overrides `cc`) into a private per-user cache
(0700, owned by the user; anything else is refused). The cache key covers the source, the command, the
compiler's path and `--version`, the ISA and, for `-march=native` builds, the CPU's flags; a build has a
time limit (`GPTWO_KERNEL_BUILD_TIMEOUT`, default 120 s) and is written atomically with a checksum that
is checked before each load, and the library's ABI version and ISA are checked after it.
Without a compiler, or with `GPTWO_NATIVE=0`, `library()` returns None after a one-line note and
gptwo keeps torch's matmul. `GPTWO_NATIVE_BF16=dp|widen` and `GPTWO_NATIVE_INT8=w16|widen|vnni` pick
the bf16 / int8 kernel, and `GPTWO_NATIVE_THREADS=N` the decode step's threads (default: torch's)
(docs/inference.md). `gptwo kernels info` shows what is in use and why; `gptwo kernels build` builds ahead.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from importlib import resources
from typing import TYPE_CHECKING

import torch

from gptwo.config import GPTConfig
from gptwo.errors import GptwoError
from gptwo.infer.kvcache import PagedKVCache
from gptwo.runtime import cpu_flag_set, forced_isa, native_bf16  # noqa: F401 - native.native_bf16: the probe callers patch

if TYPE_CHECKING:  # step.py imports this module to choose between the steps
    from gptwo.infer.step import StepInput

F32, BF16, BF16_DP, I8, I8_VNNI, I8_W16 = range(6)  # kernel kinds, as in the C source
KIND_NAMES = {
    F32: "fp32",
    BF16: "bf16 widened to fp32",
    BF16_DP: "bf16 dot (activations rounded to bf16)",
    I8: "int8 widened to fp32",
    I8_VNNI: "int8 x int8 (activations int8 per 64)",
    I8_W16: "int8 x int16 (activations int16 per token)",
}
ABI = 3  # GPTWO_ABI in the C source: the signatures, gptwo_step's pointer table, dimensions and batch layout
ISAS = ("avx512", "avx2", "neon", "generic")  # best first
ISA_FLAGS = {
    "avx512": ["-march=native"],
    "avx2": ["-march=x86-64-v3", "-mtune=native"],
    "neon": ["-march=armv8-a"],
    "generic": ["-DGPTWO_GENERIC"],
}
SOURCE = "gptwo_kernels.c"
BUILD_TIMEOUT_S = 120.0
_libs: dict[str, ctypes.CDLL | None] = {}  # ISA -> the loaded library, or None when it could not be had
_why: dict[str, str] = {}  # ISA -> why not
_compilers: dict[str, tuple[str, str]] = {}  # $CC -> (resolved path, --version's first line)


class KernelBuildError(OSError):
    """The compiler failed or timed out; `stderr` is its whole error output (shown with --debug)."""

    def __init__(self, message: str, stderr: str = ""):
        super().__init__(message)
        self.stderr = stderr


def isa_support(flags: set[str] | frozenset[str] | None = None, machine: str | None = None) -> dict[str, str | None]:
    """Per ISA: None when this CPU runs it, else why not."""
    flags = cpu_flag_set() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64")
    missing = lambda need: [f for f in need if f not in flags]  # noqa: E731
    why: dict[str, str | None] = {}
    lacks512, lacks2 = missing(("avx512f", "avx512bw", "avx512vl")), missing(("avx2", "fma"))
    why["avx512"] = "not an x86-64 CPU" if not x86 else f"this CPU lacks {', '.join(lacks512)}" if lacks512 else None
    why["avx2"] = "not an x86-64 CPU" if not x86 else f"this CPU lacks {', '.join(lacks2)}" if lacks2 else None
    why["neon"] = None if machine in ("aarch64", "arm64") else "not an aarch64 CPU"
    why["generic"] = None
    return why


def best_isa() -> str:
    """The fastest instruction set this CPU runs."""
    support = isa_support()
    return next(isa for isa in ISAS if support[isa] is None)


def chosen_isa() -> str:
    """`GPTWO_KERNEL_ISA` when set (it must name an ISA this CPU runs), else the best one here."""
    forced = forced_isa()
    if not forced:
        return best_isa()
    if forced not in ISAS:
        raise GptwoError(
            f"GPTWO_KERNEL_ISA={forced} is not an instruction set of gptwo's kernels",
            f"use one of {', '.join(ISAS)} or auto, or unset it",
        )
    why = isa_support()[forced]
    if why is not None:
        raise GptwoError(
            f"GPTWO_KERNEL_ISA={forced} cannot run here: {why}",
            f"use {best_isa()} (this CPU's best) or generic, or unset it",
        )
    return forced


def cache_dir() -> str:
    """Where built kernels live: $GPTWO_KERNEL_CACHE, else $XDG_CACHE_HOME/gptwo/kernels (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("GPTWO_KERNEL_CACHE") or os.path.join(base, "gptwo", "kernels")


def private_dir(directory: str) -> str:
    """`directory`, made 0700 if new; refused (OSError) unless it is a folder owned by this user
    that nobody else can write."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(
            f"the kernel cache {directory} is not a folder — remove it or set GPTWO_KERNEL_CACHE to a private folder"
        )
    if info.st_uid != os.geteuid():
        raise OSError(
            f"the kernel cache {directory} belongs to another user (uid {info.st_uid}) — "
            "set GPTWO_KERNEL_CACHE to a folder of your own"
        )
    if info.st_mode & 0o022:
        raise OSError(
            f"the kernel cache {directory} is writable by others (mode {stat.S_IMODE(info.st_mode):o}) — "
            f"remove it (rm -r {directory}) or set GPTWO_KERNEL_CACHE to a private folder"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)  # ours and not writable by others: made private, nothing planted could be in it
    return directory


def compiler() -> tuple[str, str]:
    """The C compiler ($CC, else cc): its resolved path and the first line of its --version."""
    name = os.environ.get("CC", "cc")
    if name not in _compilers:
        found = shutil.which(name)
        if found is None:
            raise OSError(f"no C compiler ('{name}' not found) — install gcc (with OpenMP) or set CC to one")
        path = os.path.realpath(found)
        try:
            done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise OSError(f"the C compiler {path} does not answer --version ({err})") from None
        _compilers[name] = (path, (done.stdout.strip().splitlines() or ["unknown version"])[0])
    return _compilers[name]


def build_command(isa: str, compiler_path: str) -> list[str]:
    return [
        compiler_path,
        "-O3",
        "-ffp-contract=fast",
        *ISA_FLAGS[isa],
        "-fopenmp",
        "-shared",
        "-fPIC",
    ]  # then -o OUT SOURCE -lm


def library_path(isa: str, source: bytes) -> str:
    """Where the library of this source, compiler and ISA lives in the cache (built or not)."""
    path, version = compiler()
    key_parts = [source, " ".join(build_command(isa, path)).encode(), version.encode(), f"abi {ABI}".encode()]
    if "-march=native" in ISA_FLAGS[isa]:
        key_parts.append(" ".join(sorted(cpu_flag_set())).encode())
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    return os.path.join(cache_dir(), f"gptwo_kernels_{isa}_{key}.so")


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _trusted(target: str) -> bool:
    """Whether `target` is a library this user built here: owned by them, not writable by others,
    its checksum as recorded."""
    try:
        info = os.lstat(target)
        with open(target + ".sha256", encoding="ascii") as f:
            recorded = f.read().strip()
    except OSError:
        return False
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & 0o022
        and _digest(target) == recorded
    )


def _build(isa: str, source: bytes) -> str:
    """Path of the shared library for this source, compiler and ISA, compiling it if the cache has no trusted copy."""
    path, _ = compiler()
    directory = private_dir(cache_dir())
    target = library_path(isa, source)
    if _trusted(target):
        return target
    print(f"note: compiling gptwo's native CPU kernels for {isa} (once; cached in {directory})", file=sys.stderr)
    timeout = float(os.environ.get("GPTWO_KERNEL_BUILD_TIMEOUT") or BUILD_TIMEOUT_S)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        with open(os.path.join(tmp, SOURCE), "wb") as f:
            f.write(source)
        command = [
            *build_command(isa, path),
            "-o",
            "k.so",
            SOURCE,
            "-lm",
        ]  # relative names: the same bytes from every build
        try:
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise KernelBuildError(f"the compiler took over {timeout:g} s (GPTWO_KERNEL_BUILD_TIMEOUT)") from None
        if done.returncode != 0:
            lines = (
                [line for line in done.stderr.splitlines() if "error" in line]
                or done.stderr.strip().splitlines()
                or ["?"]
            )
            raise KernelBuildError(f"the compiler failed: {lines[0].strip()}", done.stderr)
        built = os.path.join(tmp, "k.so")
        os.chmod(built, 0o600)
        digest = _digest(built)
        with open(os.path.join(tmp, "k.sha256"), "w", encoding="ascii") as f:
            f.write(digest + "\n")
        os.replace(os.path.join(tmp, "k.sha256"), target + ".sha256")
        os.replace(built, target)  # atomic: a concurrent build or reader never sees half a file
    if not _trusted(target):
        raise OSError(f"{target} changed while it was being written — run again")
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, i64p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
    lib.gptwo_caps.restype = i
    lib.gptwo_isa.restype = ctypes.c_char_p
    lib.gptwo_linear.argtypes = [i, p, p, p, p, p, i, i, i, i]
    lib.gptwo_linear.restype = i
    lib.gptwo_step_scratch_bytes.argtypes = [i64p]
    lib.gptwo_step_scratch_bytes.restype = ctypes.c_size_t
    # P, D, eps, T, tokens, S, seqs, tables, n_tables, R, rows, logits, scratch, scratch_len
    lib.gptwo_step.argtypes = [p, i64p, ctypes.c_float, i, p, i, p, p, ctypes.c_int64, i, p, p, p, ctypes.c_size_t]
    lib.gptwo_step.restype = i
    lib.gptwo_step_check.argtypes = [i64p, i, p, i, p, p, ctypes.c_int64, i, p]  # D, then T..rows as gptwo_step
    lib.gptwo_step_check.restype = i
    return lib


def source() -> bytes:
    """The kernels' C source as shipped in the package."""
    return resources.files("gptwo.infer").joinpath("kernels", SOURCE).read_bytes()


def load(isa: str) -> ctypes.CDLL:
    """The kernels built for `isa` (built now if need be), checked for their ABI version and ISA;
    OSError if they cannot be had."""
    path = _build(isa, source())
    lib = ctypes.CDLL(path)
    try:
        abi = lib.gptwo_abi()
    except AttributeError:
        raise OSError(f"{path} has no ABI version — remove it (rm {path}) and run again") from None
    if abi != ABI:
        raise OSError(f"{path} has ABI {abi}, this gptwo needs {ABI} — remove it (rm {path}) and run again")
    try:
        lib = _bind(lib)
    except AttributeError as err:  # a library of this ABI that lacks a function: not ours
        raise OSError(f"{path} lacks a kernel function ({err}) — remove it (rm {path}) and run again") from None
    built_for = lib.gptwo_isa().decode()
    if built_for != isa:
        raise OSError(
            f"the compiler built the {isa} kernels as {built_for} "
            f"(its flags {' '.join(ISA_FLAGS[isa])} were not honoured)"
        )
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels for the chosen ISA, or None (with a one-line note on stderr, once)
    when they cannot be had here."""
    if os.environ.get("GPTWO_NATIVE", "1") == "0":
        return None
    isa = chosen_isa()
    if isa not in _libs:  # torch (imported above) has loaded its libgomp.so.1: the kernels bind to it, one runtime
        try:
            _libs[isa] = load(isa)
        except OSError as err:
            _libs[isa], _why[isa] = None, str(err)
            print(f"note: gptwo's native CPU kernels are off ({err}); using torch's matmul", file=sys.stderr)
            if isinstance(err, KernelBuildError) and err.stderr and os.environ.get("GPTWO_DEBUG"):
                print(err.stderr, file=sys.stderr)
    return _libs[isa]


def why_off() -> str | None:
    """Why `library()` is None (None when the kernels are on or were not asked for yet)."""
    if os.environ.get("GPTWO_NATIVE", "1") == "0":
        return "GPTWO_NATIVE=0"
    return _why.get(chosen_isa())


def reset() -> None:
    """Forget the loaded libraries (tests switch the environment and load again)."""
    _libs.clear()
    _why.clear()
    _compilers.clear()


def kind_for(weight_dtype: str) -> int | None:
    """The kernel kind for 'fp32', 'bf16' or 'int8' weights on this CPU, or None when the kernels are off."""
    lib = library()
    if lib is None:
        return None
    if weight_dtype == "fp32":
        return F32
    if (
        weight_dtype == "bf16"
    ):  # the bf16 dot only where the CPU has it: emulated, it is the widening kernel plus rounding
        return BF16_DP if os.environ.get("GPTWO_NATIVE_BF16", "dp") == "dp" and has_instruction(BF16_DP) else BF16
    return {"vnni": I8_VNNI, "w16": I8_W16, "widen": I8}.get(os.environ.get("GPTWO_NATIVE_INT8", "w16"), I8_W16)


def has_instruction(kind: int) -> bool:
    """Whether `kind` runs on an instruction made for it with the kernels in use (every kind runs, some emulated)."""
    lib = library()
    return lib is not None and bool(lib.gptwo_caps() & (1 << kind))


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(
    kind: int, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """`x (M, K) fp32 @ weight.T * scale + bias` on the native kernel:
    weight (N, K) contiguous, scale/bias fp32 (N,)."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    status = library().gptwo_linear(
        kind, ptr(weight), ptr(scale), ptr(bias), ptr(x), ptr(y), M, K, N, torch.get_num_threads()
    )
    if status:
        raise (
            MemoryError(f"the native linear could not allocate its scratch ({M}x{K})")
            if status == 2
            else ValueError(f"kernel kind {kind} or shape {M}x{K}x{N} is not valid")
        )
    return y


MAX_STEP_TOKENS = 256  # new tokens per native step call (all sequences together), at most
STEP_SCRATCH_BUDGET = 256 * 2**20  # bytes of per-layer activations a call may hold; fewer tokens for big models
# gptwo_step's refusals, as in the C source
STEP_BAD_TOKEN, STEP_BAD_SIZE, STEP_BAD_POSITION, STEP_BAD_BLOCK, STEP_BAD_LAYOUT = range(1, 6)


def step_tokens(config: GPTConfig) -> int:
    """Tokens one native step call takes: MAX_STEP_TOKENS, fewer where their per-layer activations
    (10 x n_embd floats per layer and token) would pass STEP_SCRATCH_BUDGET, never below 16."""
    per_token = config.n_layer * 10 * config.n_embd * 4
    return max(16, min(MAX_STEP_TOKENS, STEP_SCRATCH_BUDGET // per_token))


class NativeStep:
    """`DecodeStep` on the CPU: GPT-2's whole forward over a ragged batch in one C call, reading and writing one
    paged fp32 KV cache (gptwo.infer.kvcache.PagedKVCache).

    Embeddings, LayerNorms, the QKV/projection/MLP linears on the native kernels (over every new token of
    the call at once, so each weight is read once per call), attention per (sequence, head) through each
    sequence's block table, GELU and residuals all run inside one OpenMP region per call
    (kernels/gptwo_kernels.c: `gptwo_step`); the final LayerNorm and the head only for the rows asked for.
    A batch of more than `max_tokens` new tokens runs as several calls in order (a sequence's tokens may
    be split; later calls read the earlier ones' keys from the cache). Activations and the cache are fp32
    whatever the weights are. Built from a model prepared with native linears (`supports`).
    """

    cache_dtype = torch.float32

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, max_tokens: int | None = None):
        lib, config, tf = library(), model.config, model.transformer
        _check_cache(cache, config)
        self.lib, self.cache, self.vocab = lib, cache, config.vocab_size
        self.max_tokens = max_tokens or step_tokens(config)
        self.keep: list[torch.Tensor] = []
        pointers: list[int | None] = []
        for block in tf.h:
            parts = [
                f32(block.ln_1.weight),
                f32(block.ln_1.bias),
                *_linear_parts(block.attn.c_attn),
                *_linear_parts(block.attn.c_proj),
                f32(block.ln_2.weight),
                f32(block.ln_2.bias),
                *_linear_parts(block.mlp.c_fc),
                *_linear_parts(block.mlp.c_proj),
            ]
            self.keep += [t for t in parts if t is not None]
            pointers += [ptr(t) for t in parts]
        head_w, head_scale, _ = _linear_parts(model.lm_head)
        wte, wpe = tf.wte.weight.detach().contiguous(), tf.wpe.weight.detach().contiguous()
        tail = [wte, wpe, f32(tf.ln_f.weight), f32(tf.ln_f.bias), head_w, head_scale, cache.k, cache.v]
        self.keep += [t for t in tail if t is not None]
        pointers += [ptr(t) for t in tail]
        self.pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.context = wpe.shape[0]
        threads = int(os.environ.get("GPTWO_NATIVE_THREADS") or torch.get_num_threads())
        dims = [  # D_* in the C source
            config.n_layer,
            config.n_embd,
            config.n_head,
            config.vocab_size,
            self.context,
            model.lm_head.kind,
            int(wte.dtype == torch.bfloat16),
            threads,
            cache.num_blocks,
            cache.block_size,
            self.max_tokens,
        ]
        self.dims = (ctypes.c_int64 * len(dims))(*dims)
        self.eps = float(config.layer_norm_eps)
        scratch_bytes = lib.gptwo_step_scratch_bytes(self.dims)
        if scratch_bytes == 0:
            raise GptwoError(
                f"the native step does not take this shape ({dims})", "use GPTWO_NATIVE=0 for torch's path"
            )
        self.scratch = torch.empty(scratch_bytes, dtype=torch.uint8)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether every linear of `model` is one native kind and its embeddings are fp32 or bf16 on the CPU."""
        tf = model.transformer
        linears = [m for b in tf.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)] + [model.lm_head]
        kinds = {getattr(m, "kind", None) for m in linears}  # a kernel kind: linear.NativeLinear (which imports us)
        return (
            len(kinds) == 1
            and kinds <= KIND_NAMES.keys()
            and tf.wte.weight.device.type == "cpu"
            and tf.wte.weight.dtype in (torch.float32, torch.bfloat16)
            and model.config.n_embd % model.config.n_head == 0
            and library() is not None
        )

    def __call__(self, batch: StepInput) -> torch.Tensor:
        """Logits (R, vocab) of `batch.output_rows()`; the new tokens' keys/values enter the cache.

        A batch the C step refuses (token ids, positions, block tables) raises GptwoError and writes nothing:
        one split into several calls is checked whole before the first runs."""
        if batch.adapters is not None and any(batch.adapters):
            raise GptwoError("the native step runs no LoRA adapters", "run a model carrying adapters on the torch step")
        calls = [self._call_args(*call) for call in self._calls(batch)]
        if len(calls) > 1:
            for _, args, _ in calls:
                self._raise_if_refused(self.lib.gptwo_step_check(self.dims, *args), batch)
        logits = torch.empty(sum(rows for _, _, rows in calls), self.vocab)
        row = 0
        for _, args, rows in calls:  # the first item keeps the arguments' buffer alive
            out = ptr(logits) + row * self.vocab * 4
            status = self.lib.gptwo_step(
                self.pointers, self.dims, self.eps, *args, out, ptr(self.scratch), self.scratch.numel()
            )
            self._raise_if_refused(status, batch)
            row += rows
        return logits

    def _calls(self, batch: StepInput):
        """The batch cut into calls of at most `max_tokens` tokens, in order: per call the flat tokens, per
        sequence piece (start, count, table offset, table length), the pieces' block tables and output rows."""
        tokens: list[int] = []
        seqs: list[int] = []
        tables: list[int] = []
        rows: list[int] = []
        bs, limit, every, skip = self.cache.block_size, self.max_tokens, batch.every, batch.skip
        for i, (new, start, table) in enumerate(zip(batch.tokens, batch.starts, batch.tables)):
            if not new:
                raise GptwoError(f"sequence {i} of the batch brings no tokens", "give every sequence a new token")
            done = 0
            while done < len(new):
                take = min(len(new) - done, limit - len(tokens))
                first, piece_start = len(tokens), start + done
                blocks = table[: max(0, -(-(piece_start + take) // bs))]
                tokens += new[done : done + take]
                seqs += (piece_start, take, len(tables), len(blocks))
                tables += blocks
                done += take
                if every is not None and every[i]:
                    rows += range(first, first + take)
                elif done == len(new) and (skip is None or not skip[i]):
                    rows.append(first + take - 1)
                if len(tokens) == limit:
                    yield tokens, seqs, tables, rows
                    tokens, seqs, tables, rows = [], [], [], []
        if tokens:
            yield tokens, seqs, tables, rows

    @staticmethod
    def _call_args(tokens: list[int], seqs: list[int], tables: list[int], rows: list[int]):
        """(int64 buffer, gptwo_step's batch arguments T..rows pointing into it, output rows) for one call."""
        try:
            flat = array.array("q", tokens + seqs + tables + rows)
        except (TypeError, OverflowError):
            raise GptwoError(
                "the batch's token ids, positions and block ids must be int64 integers", "pass Python ints"
            ) from None
        base, T, S = flat.buffer_info()[0], len(tokens), len(seqs) // 4
        at_tables, at_rows = base + 8 * (T + 4 * S), base + 8 * (T + 4 * S + len(tables))
        return flat, (T, base, S, base + 8 * T, at_tables, len(tables), len(rows), at_rows), len(rows)

    def _raise_if_refused(self, status: int, batch: StepInput) -> None:
        """A GptwoError naming the sequence at fault when the C step refused a call (looked for only then)."""
        if status == STEP_BAD_TOKEN:
            for i, new in enumerate(batch.tokens):
                bad = [t for t in new if not 0 <= t < self.vocab]
                if bad:
                    raise GptwoError(
                        f"token id {bad[0]} of sequence {i} is outside the vocabulary (0..{self.vocab - 1})",
                        "pass token ids below the vocabulary size",
                    )
        bs, blocks = self.cache.block_size, self.cache.num_blocks
        for i, (new, start, table) in enumerate(zip(batch.tokens, batch.starts, batch.tables)):
            end = start + len(new)
            if status == STEP_BAD_POSITION and not 0 <= start <= self.context - len(new):
                raise GptwoError(
                    f"{len(new)} tokens at position {start} do not fit the model's context of {self.context}",
                    "stay within the context (slide or shorten the sequence)",
                )
            needed = table[: -(-end // bs)]
            if status == STEP_BAD_BLOCK and (len(needed) * bs < end or any(not 0 < b < blocks for b in needed)):
                raise GptwoError(
                    f"the block table of sequence {i} ({len(table)} blocks) does not hold positions up to {end} "
                    f"in a cache of {blocks} blocks (ids 1..{blocks - 1})",
                    "grow the sequence's blocks (PagedKVCache.grow) before the step",
                )
        if status:
            raise GptwoError(f"the native step refused a call (status {status})", "report this as a gptwo bug")


def _check_cache(cache: PagedKVCache, config: GPTConfig) -> None:
    """Refuse a cache the C step cannot read as (n_layer, num_blocks, n_head, block_size, head_dim) fp32 on the CPU."""
    shape = (config.n_layer, cache.num_blocks, config.n_head, cache.block_size, config.n_embd // config.n_head)
    for t in (cache.k, cache.v):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
            raise GptwoError(
                f"the native step needs a contiguous fp32 CPU KV cache of shape {shape}, "
                f"not {t.dtype} {tuple(t.shape)} on {t.device}",
                "make the cache with dtype=NativeStep.cache_dtype on the CPU for this model",
            )


def f32(t: torch.Tensor) -> torch.Tensor:
    """A small tensor (LayerNorm, bias) as the contiguous fp32 the C step reads."""
    return t.detach().float().contiguous()


def _linear_parts(linear: torch.nn.Module) -> list[torch.Tensor | None]:
    """A native linear's (weights, scales, bias) as the C step reads them."""
    return [linear.w, linear.scales, linear.bias]
