"""The llama.cpp anchor of `gptwo bench decode`: GGUF tensor tables, llama-bench's JSON, the rows, the errors.

No llama.cpp here: a fake `llama-bench` (written by the test) prints llama-bench's JSON shape (fields as
in its build 4748's json printer) with sample times it logs, and GGUF files are written by hand from
the format's spec, so the expected bytes and medians come from the test, not from the code under test.
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import sys

import pytest

from gptwo.bench.llamacpp import (
    GGUF_DTYPES,
    gguf_tensor_bytes,
    llamacpp_anchor,
    parse_llama_bench,
    streamed_bytes,
)
from gptwo.cli import main
from gptwo.errors import GptwoError

FAKE_LLAMA_BENCH = r"""#!{python}
import json, os, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")
with open(args["-m"], "rb") as f:
    if f.read(4) != b"GGUF":
        sys.exit("llama_model_load: error loading model: invalid magic")
calls = sum(1 for _ in open(log)) if os.path.exists(log) else 0
prompt, gen = (int(x) for x in args["-pg"].split(","))
ns = 10_000_000 * (1 + (7 * calls) % 5)  # varies from call to call, so the median is not any one call
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "ns": ns}}) + "\n")
entry = {{"build_commit": "c392e509", "build_number": 4748, "cpu_info": "Fake CPU", "gpu_info": "", "backends": "CPU",
         "model_filename": args["-m"], "model_type": "gpt2 0.1B all F32", "model_size": 1000, "model_n_params": 250,
         "n_batch": 2048, "n_ubatch": 512, "n_threads": int(args["-t"]), "cpu_mask": "0x0", "cpu_strict": False,
         "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99, "split_mode": "layer", "main_gpu": 0,
         "no_kv_offload": False, "flash_attn": False, "tensor_split": "0.00", "use_mmap": True, "embeddings": False,
         "n_prompt": prompt, "n_gen": gen, "test_time": "2026-11-26T17:00:00Z", "avg_ns": ns, "stddev_ns": 0,
         "avg_ts": (prompt + gen) / ns * 1e9, "stddev_ts": 0.0, "samples_ns": [ns],
         "samples_ts": [(prompt + gen) / ns * 1e9]}}
print(json.dumps([entry], indent=2))
"""


def write_gguf(path: str, tensors: list[tuple[str, int, int]], alignment: int = 32) -> None:
    """A GGUF v3 file by the spec: metadata of several kinds, then tensors given as (name, ggml type, data bytes)."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    kv = [
        string("general.architecture") + struct.pack("<I", 8) + string("gpt2"),
        string("general.alignment") + struct.pack("<II", 4, alignment),
        string("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 3)
        + b"".join(string(t) for t in ("a", "bc", "<|endoftext|>")),
        string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0.0, 1.0, 2.0),
        string("gpt2.layer_norm_epsilon") + struct.pack("<If", 6, 1e-5),
        string("general.flag") + struct.pack("<I?", 7, True),
    ]
    infos, offset = [], 0
    for name, kind, nbytes in tensors:
        infos.append(
            string(name) + struct.pack("<I", 2) + struct.pack("<QQ", nbytes, 1) + struct.pack("<IQ", kind, offset)
        )
        offset += -(-nbytes // alignment) * alignment
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head + b"\1" * offset)


TENSORS = [
    ("token_embd.weight", 0, 4096),
    ("position_embd.weight", 0, 1024),
    ("blk.0.attn_qkv.weight", 8, 136),
    ("blk.0.attn_norm.weight", 0, 128),
    ("output_norm.weight", 0, 128),
    ("output.weight", 8, 1088),
]


@pytest.fixture
def fake_llama(tmp_path) -> str:
    """A build folder holding a fake bin/llama-bench; its calls land in bin/calls.jsonl."""
    binary = tmp_path / "build" / "bin" / "llama-bench"
    binary.parent.mkdir(parents=True)
    binary.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    binary.chmod(0o755)
    return str(tmp_path / "build")


@pytest.fixture
def gguf_dir(tmp_path) -> str:
    """model-<dtype>.gguf for each precision, of different sizes."""
    directory = tmp_path / "gguf"
    directory.mkdir()
    for i, dtype in enumerate(GGUF_DTYPES):
        write_gguf(
            str(directory / f"model-{dtype}.gguf"), [(name, kind, nbytes * (i + 1)) for name, kind, nbytes in TENSORS]
        )
    return str(directory)


def test_gguf_tensor_bytes_reads_the_tensor_table(tmp_path):
    path = str(tmp_path / "m.gguf")
    write_gguf(path, TENSORS, alignment=64)
    sizes = gguf_tensor_bytes(path)
    assert sizes == {
        name: -(-nbytes // 64) * 64 for name, _, nbytes in TENSORS
    }  # each tensor's data, padded to the file's alignment
    assert streamed_bytes(path) == 192 + 128 + 128 + 1088  # the embedding lookups are not streamed
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(32))
    with pytest.raises(GptwoError, match="not a GGUF file"):
        gguf_tensor_bytes(str(tmp_path / "bad.gguf"))


def test_bench_decode_times_llamacpp_in_the_same_rounds(tiny_model, fake_llama, gguf_dir, capsys):
    args = [
        "bench",
        "decode",
        "--model",
        tiny_model,
        "--variants",
        "fp32",
        "--new-tokens",
        "4",
        "--prompt-tokens",
        "3",
        "--rounds",
        "3",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--llama-cpp",
        fake_llama,
        "--gguf",
        gguf_dir,
    ]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    with open(os.path.join(fake_llama, "bin", "calls.jsonl")) as f:
        calls = [json.loads(line) for line in f]
    files = [os.path.join(gguf_dir, f"model-{dtype}.gguf") for dtype in GGUF_DTYPES]
    assert [
        c["argv"][1] for c in calls
    ] == files * 4  # one warm-up call each, then the precisions take turns in each of 3 rounds
    assert all(c["argv"][2:] == ["-p", "0", "-n", "0", "-pg", "3,4", "-t", "1", "-r", "1", "-o", "json"] for c in calls)
    rows = report["rows"]
    assert [(r["tool"], r["dtype"]) for r in rows] == [("transformers", "fp32"), ("gptwo", "fp32")] + [
        ("llama.cpp", d) for d in GGUF_DTYPES
    ]
    anchor = rows[0]["tokens_per_s"]
    for i, (row, path) in enumerate(zip(rows[2:], files)):
        median_ns = statistics.median(c["ns"] for c in calls[4:] if c["argv"][1] == path)  # warm-up calls left out
        assert row["tokens_per_s"] == pytest.approx(4 / (median_ns / 1e9))
        assert row["ratio_vs_transformers"] == pytest.approx(row["tokens_per_s"] / anchor)
        written = [
            -(-nbytes * (i + 1) // 32) * 32 for name, _, nbytes in TENSORS if "embd" not in name
        ]  # 32-byte aligned, lookups left out
        assert row["weight_mb"] * 1e6 == pytest.approx(sum(written))
        assert row["ceiling_tokens_per_s"] == pytest.approx(report["bandwidth_gb_s"] * 1e3 / row["weight_mb"])
        assert row["token_agreement"] is None
    assert report["llama_cpp"] == {
        "binary": os.path.join(fake_llama, "bin", "llama-bench"),
        "build_commit": "c392e509",
        "build_number": 4748,
        "cpu_info": "Fake CPU",
        "gguf": dict(zip(GGUF_DTYPES, files)),
    }
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in table[2:8]][2:] == [["llama.cpp", d] for d in GGUF_DTYPES]
    assert table[5].split()[-1] == "-" and table[-1].startswith(
        "llama.cpp: llama-bench build 4748 (c392e509), -pg 3,4 -t 1"
    )


def test_missing_llamacpp_pieces_are_one_line_errors(tiny_model, fake_llama, gguf_dir, tmp_path, capsys):
    base = [
        "bench",
        "decode",
        "--model",
        tiny_model,
        "--variants",
        "fp32",
        "--new-tokens",
        "2",
        "--rounds",
        "1",
        "--device",
        "cpu",
    ]
    empty = str(tmp_path / "empty")
    os.mkdir(empty)
    cases = [
        (["--llama-cpp", str(tmp_path / "nowhere")], "error: no llama-bench binary at"),
        (["--llama-cpp", fake_llama, "--gguf", empty], f"error: GGUF file {empty}/model-f32.gguf not found"),
        (["--gguf", gguf_dir], "error: --gguf names the llama.cpp anchor's files but no llama.cpp was given"),
        (
            ["--llama-cpp", fake_llama, "--gguf", gguf_dir, "--batch-size", "2"],
            "error: the llama.cpp anchor times batch 1 only",
        ),
        (["--llama-cpp", fake_llama], "error: no convert_hf_to_gguf.py above"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


def test_llama_bench_failures_name_the_cause(fake_llama, gguf_dir, tmp_path):
    bad = tmp_path / "model-f32.gguf"
    bad.write_bytes(b"not a model")
    anchor = llamacpp_anchor(fake_llama, gguf_dir, None, 3, 4, 1)
    anchor.files["f32"] = str(bad)
    with pytest.raises(GptwoError, match="llama-bench failed on .*invalid magic"):
        anchor.time("f32")
    with pytest.raises(GptwoError, match="printed no JSON"):
        parse_llama_bench("main: error", 3, 4)
    entry = {"n_prompt": 0, "n_gen": 4, "samples_ns": [1000]}
    with pytest.raises(GptwoError, match="no 3-token prompt \\+ 4 token test"):
        parse_llama_bench(json.dumps([entry]), 3, 4)
    assert parse_llama_bench(json.dumps([entry, {**entry, "n_prompt": 3, "samples_ns": [2000, 4000]}]), 3, 4)[
        0
    ] == pytest.approx(3e-6)


FAKE_CONVERTER = r"""import json, os, shutil, sys
import gguf  # from the gguf-py folder beside this script, as llama.cpp's converter imports it
model = sys.argv[1]
outtype, outfile = sys.argv[sys.argv.index("--outtype") + 1], sys.argv[sys.argv.index("--outfile") + 1]
config = json.load(open(os.path.join(model, "config.json")))
assert os.path.isfile(os.path.join(model, "model.safetensors"))
assert os.path.isfile(os.path.join(model, "tokenizer.json"))
with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
    f.write(f"{{outtype}} {{config['n_layer']}} {{config['vocab_size']}} {{gguf.NAME}}\n")
shutil.copy({template!r}, outfile)
"""


def test_without_gguf_the_source_trees_converter_writes_each_precision(tiny_model, tmp_path):
    source = tmp_path / "llama.cpp"
    (source / "gguf-py" / "gguf").mkdir(parents=True)
    (source / "gguf-py" / "gguf" / "__init__.py").write_text("NAME = 'gguf-py'\n")
    write_gguf(str(tmp_path / "template.gguf"), TENSORS)
    (source / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER.format(template=str(tmp_path / "template.gguf")))
    binary = source / "build" / "bin" / "llama-bench"
    binary.parent.mkdir(parents=True)
    binary.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    binary.chmod(0o755)
    anchor = llamacpp_anchor(str(source / "build"), None, tiny_model, 3, 4, 1)
    with open(os.path.join(tiny_model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    assert (source / "calls.txt").read_text().splitlines() == [f"{dtype} 2 {vocab} gguf-py" for dtype in GGUF_DTYPES]
    assert list(anchor.files) == list(GGUF_DTYPES) and all(os.path.isfile(path) for path in anchor.files.values())
    assert anchor.time("q8_0") > 0
    scratch = os.path.dirname(anchor.files["f32"])
    anchor.scratch.cleanup()
    assert not os.path.exists(scratch)
