"""llama.cpp as a same-run anchor for `gptwo bench decode`: its llama-bench on GGUF files of the same weights.

Each round of the decode benchmark calls `llama-bench -pg P,N -r 1 -o json` once per GGUF precision,
taking turns with transformers and gptwo; llama-bench's own timing (its `samples_ns`: the P-token
prompt plus N generated tokens, model loading excluded) counts, so the rows time the workload the
other rows time. The GGUF files come from llama.cpp's own `convert_hf_to_gguf.py` (experiments/llamacpp.sh,
or on the fly from the source tree the binary was built in). The weight bytes of a row are read from
the GGUF file's tensor table: every tensor but the token and position embeddings (lookups).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import struct
import sys
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from gptwo.bench import DEFAULT_TIMEOUT_S, bench_model, run_tool
from gptwo.errors import GptwoError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")  # convert_hf_to_gguf.py's --outtype names
LOOKUPS = ("token_embd.weight", "position_embd.weight")  # read one row per token, not streamed
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}  # GGUF value types
_STRING, _ARRAY = 8, 9


def gguf_name(dtype: str) -> str:
    """The file name experiments/llamacpp.sh and the on-the-fly conversion give a precision's GGUF."""
    return f"model-{dtype}.gguf"


# ---------------------------------------------------------------- finding llama.cpp
def find_llama_bench(path: str) -> str:
    """The llama-bench binary: PATH itself, PATH/bin/llama-bench (a build folder) or PATH/build/bin/llama-bench (a
    source tree)."""
    for candidate in (
        path,
        os.path.join(path, "bin", "llama-bench"),
        os.path.join(path, "build", "bin", "llama-bench"),
    ):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise GptwoError(
        f"no llama-bench binary at {path}",
        "pass the llama-bench binary or llama.cpp's build folder (experiments/llamacpp.sh builds one)",
    )


def find_converter(binary: str) -> str | None:
    """llama.cpp's convert_hf_to_gguf.py in a folder above the binary (the source tree it was built in), if there is
    one."""
    folder = os.path.dirname(binary)
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        script = os.path.join(folder, "convert_hf_to_gguf.py")
        if os.path.isfile(script):
            return script
    return None


def gguf_files(directory: str, dtypes: tuple[str, ...] = GGUF_DTYPES) -> dict[str, str]:
    """The GGUF file of each precision in `directory`, all of which must exist."""
    files = {dtype: os.path.join(directory, gguf_name(dtype)) for dtype in dtypes}
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise GptwoError(
            f"GGUF file {missing[0]} not found",
            "write the files with experiments/llamacpp.sh, or leave --gguf out to convert on the fly",
        )
    return files


# ---------------------------------------------------------------- GGUF files of the bench model
def save_bench_model(directory: str, model: str | None = None) -> None:
    """Write the decode benchmark's model as an HF folder with its tokenizer, for the converter (default: GPT-2 124M's
    shape, seed 0, GPT-2's BPE)."""
    import torch

    from gptwo.tokenizer import Tokenizer
    from gptwo.weights import load_model, save_pretrained

    gpt, tokenizer = (
        load_model(model, device="cpu") if model else (bench_model(None, torch.device("cpu")), Tokenizer.gpt2())
    )
    save_pretrained(gpt, directory, tokenizer)


def convert(
    model_dir: str,
    converter: str,
    out_dir: str,
    dtypes: tuple[str, ...] = GGUF_DTYPES,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, str]:
    """GGUF files of an HF folder at each precision, written by llama.cpp's convert_hf_to_gguf.py (its gguf-py
    beside it); each conversion may take `timeout` seconds."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            filter(None, [os.path.join(os.path.dirname(converter), "gguf-py"), os.environ.get("PYTHONPATH")])
        ),
    )
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for dtype in dtypes:
        files[dtype] = os.path.join(out_dir, gguf_name(dtype))
        done = run_tool(
            [sys.executable, converter, model_dir, "--outtype", dtype, "--outfile", files[dtype]],
            timeout,
            f"llama.cpp's converter ({dtype})",
            "convert with experiments/llamacpp.sh and pass --gguf",
            env=env,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise GptwoError(
                f"llama.cpp's converter failed on {model_dir} at {dtype} ({last})",
                "convert with experiments/llamacpp.sh and pass --gguf",
            )
    return files


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GptwoError(f"GGUF file {f.name} ends early", "re-create it with experiments/llamacpp.sh")
    return struct.unpack(fmt, data)[0]


def _value(f: BinaryIO, kind: int):
    """One metadata value (arrays are skipped: None)."""
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return f.read(_read(f, "<Q")).decode("utf-8", "replace")
    if kind == _ARRAY:
        elem, count = _read(f, "<I"), _read(f, "<Q")
        if elem in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[elem]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _value(f, elem)
        return None
    raise GptwoError(
        f"GGUF file {f.name} has a metadata value of unknown type {kind}", "re-create it with experiments/llamacpp.sh"
    )


def gguf_tensor_bytes(path: str) -> dict[str, int]:
    """Bytes of each tensor in a GGUF file, from its tensor table's offsets (whatever the quantization; alignment
    padding included)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GptwoError(f"{path} is not a GGUF file", "re-create it with experiments/llamacpp.sh")
        version, n_tensors, n_kv = _read(f, "<I"), _read(f, "<Q"), _read(f, "<Q")
        if version < 2:
            raise GptwoError(f"{path} is GGUF version {version}", "re-create it with a current llama.cpp")
        alignment = 32
        for _ in range(n_kv):
            key = f.read(_read(f, "<Q")).decode("utf-8", "replace")
            value = _value(f, _read(f, "<I"))
            if key == "general.alignment":
                alignment = value
        offsets = {}
        for _ in range(n_tensors):
            name = f.read(_read(f, "<Q")).decode("utf-8", "replace")
            f.seek(8 * _read(f, "<I") + 4, os.SEEK_CUR)  # the dimensions and the type
            offsets[name] = _read(f, "<Q")
        data_start = -(-f.tell() // alignment) * alignment
        end = os.fstat(f.fileno()).st_size - data_start
    ordered = sorted(offsets.items(), key=lambda item: item[1])
    ends = [offset for _, offset in ordered[1:]] + [end]
    return {name: stop - offset for (name, offset), stop in zip(ordered, ends)}


def streamed_bytes(path: str) -> int:
    """Bytes one decode step reads from a GGUF model: every tensor but the embedding lookups."""
    return sum(n for name, n in gguf_tensor_bytes(path).items() if name not in LOOKUPS)


# ---------------------------------------------------------------- llama-bench
def parse_llama_bench(text: str, prompt_tokens: int, new_tokens: int) -> tuple[float, dict]:
    """Seconds of the prompt+generation test in llama-bench's JSON output (mean of its samples), and that entry."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError:
        raise GptwoError(
            "llama-bench printed no JSON", "check that the binary is llama.cpp's llama-bench (it must take -o json)"
        ) from None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise GptwoError(
            f"llama-bench printed JSON of another shape (not a list of test objects: {text.strip()[:60]})",
            "check that the binary is llama.cpp's llama-bench (its -o json prints a list of tests)",
        )
    for entry in entries:
        if entry.get("n_prompt") == prompt_tokens and entry.get("n_gen") == new_tokens and entry.get("samples_ns"):
            samples = entry["samples_ns"]
            if not isinstance(samples, list) or not all(
                isinstance(ns, (int, float)) and not isinstance(ns, bool) and math.isfinite(ns) and ns > 0
                for ns in samples
            ):
                raise GptwoError(
                    f"llama-bench's samples_ns is not a list of positive times ({str(samples)[:80]})",
                    "check the llama-bench build",
                )
            return statistics.fmean(samples) / 1e9, entry
    raise GptwoError(
        f"llama-bench's JSON has no {prompt_tokens}-token prompt + {new_tokens} token test",
        "check the llama-bench build (it must take -pg)",
    )


class LlamaCppAnchor:
    """llama-bench on each GGUF precision, one call per round; keeps llama-bench's own seconds for the medians."""

    def __init__(
        self,
        binary: str,
        files: dict[str, str],
        prompt_tokens: int,
        new_tokens: int,
        threads: int,
        scratch: object = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        self.binary, self.files, self.prompt_tokens, self.new_tokens, self.threads = (
            binary,
            files,
            prompt_tokens,
            new_tokens,
            threads,
        )
        self.scratch = scratch  # the temporary folder of converted files, removed with the anchor
        self.timeout = timeout  # seconds one llama-bench call may take
        self.seconds: dict[str, list[float]] = {dtype: [] for dtype in files}
        self.build: dict = {}

    def time(self, dtype: str) -> float:
        """One llama-bench call on this precision's file: seconds for the prompt and the new tokens."""
        command = [
            self.binary,
            "-m",
            self.files[dtype],
            "-p",
            "0",
            "-n",
            "0",
            "-pg",
            f"{self.prompt_tokens},{self.new_tokens}",
            "-t",
            str(self.threads),
            "-r",
            "1",
            "-o",
            "json",
        ]
        done = run_tool(
            command,
            self.timeout,
            f"llama-bench on {self.files[dtype]}",
            "check that the binary is llama.cpp's llama-bench and the file a GGUF model it reads",
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise GptwoError(
                f"llama-bench failed on {self.files[dtype]} ({last})",
                "check that the file is a GGUF model this llama.cpp build reads",
            )
        seconds, entry = parse_llama_bench(done.stdout, self.prompt_tokens, self.new_tokens)
        self.build = {
            "build_commit": entry.get("build_commit"),
            "build_number": entry.get("build_number"),
            "cpu_info": entry.get("cpu_info"),
        }
        return seconds

    def runs(self) -> dict[tuple[str, str], Callable[[], None]]:
        """One callable per precision for the interleaved rounds; each records llama-bench's seconds."""
        return {
            ("llama.cpp", dtype): (lambda dtype=dtype: self.seconds[dtype].append(self.time(dtype)))
            for dtype in self.files
        }

    def rows(self, bandwidth_gb_s: float, anchor_tokens_per_s: float) -> list[dict]:
        """A decode-report row per precision: tokens/s from the median round, ratio, GGUF weight bytes, bandwidth
        ceiling."""
        rows = []
        for dtype, path in self.files.items():
            rate = self.new_tokens / statistics.median(self.seconds[dtype])
            nbytes = streamed_bytes(path)
            rows.append(
                {
                    "tool": "llama.cpp",
                    "dtype": dtype,
                    "tokens_per_s": rate,
                    "ratio_vs_transformers": rate / anchor_tokens_per_s,
                    "weight_mb": nbytes / 1e6,
                    "ceiling_tokens_per_s": bandwidth_gb_s * 1e9 / nbytes,
                    "token_agreement": None,
                }
            )
        return rows

    def summary(self) -> dict:
        """The report's `llama_cpp` field: the binary, its build, the GGUF files."""
        return {"binary": self.binary, **self.build, "gguf": dict(self.files)}


def llamacpp_anchor(
    path: str,
    gguf_dir: str | None,
    model: str | None,
    prompt_tokens: int,
    new_tokens: int,
    threads: int,
    progress: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> LlamaCppAnchor:
    """The anchor for `--llama-cpp PATH [--gguf DIR]`: DIR's GGUF files, or the bench model converted by the binary's
    source tree into a temporary folder."""
    binary = find_llama_bench(path)
    if gguf_dir:
        return LlamaCppAnchor(binary, gguf_files(gguf_dir), prompt_tokens, new_tokens, threads, timeout=timeout)
    converter = find_converter(binary)
    if converter is None:
        raise GptwoError(
            f"no convert_hf_to_gguf.py above {binary} to convert the model with",
            "pass --gguf DIR written by experiments/llamacpp.sh",
        )
    if progress:
        print(f"converting the model to GGUF with {converter}", file=sys.stderr)
    scratch = tempfile.TemporaryDirectory(prefix="gptwo-gguf-")
    save_bench_model(os.path.join(scratch.name, "hf"), model)
    files = convert(os.path.join(scratch.name, "hf"), converter, scratch.name, timeout=timeout)
    return LlamaCppAnchor(binary, files, prompt_tokens, new_tokens, threads, scratch, timeout)
