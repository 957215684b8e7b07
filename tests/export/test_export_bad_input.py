"""Bad input to `gptwo export` and to `--model FILE.gguf`: one-line errors, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import sys

import gguf
import numpy as np
import pytest
from cli_testing import assert_one_line_error, run, write_file

from gptwo.export.gguf import export_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory, trained_dir) -> str:
    return export_gguf(trained_dir, str(tmp_path_factory.mktemp("good") / "good.gguf"), "f32")["path"]


def copy_gguf(src: str, dst: str, arch: str = "gpt2", fields: dict | None = None, tensors: dict | None = None) -> str:
    """`src` rewritten to `dst` with some fields (key → (value, type) or None to drop) and tensors (name → (data,
    type) or None to drop) changed or added."""
    fields, tensors = fields or {}, tensors or {}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in fields:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, change in fields.items():
        if change is not None:
            writer.add_key_value(key, change[0], change[1])
    for t in reader.tensors:
        if t.name not in tensors:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, change in tensors.items():
        if change is not None:
            writer.add_tensor(name, change[0], raw_dtype=change[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


STRING, UINT32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
Q4_K_ROWS = np.zeros((64, 144), dtype=np.uint8)  # 64 rows of 256 values: one Q4_K super-block (144 bytes) each


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda good, d: write_file(os.path.join(d, "x.gguf"), "not a model"), "is not a GGUF file"),
        (lambda good, d: os.path.join(d, "missing.gguf"), "not found"),
        (lambda good, d: write_file(os.path.join(d, "cut.gguf"), open(good, "rb").read()[:5000]), "damaged or trunc"),
        (lambda good, d: copy_gguf(good, os.path.join(d, "l.gguf"), arch="llama"), "'llama' architecture"),
        (
            lambda good, d: copy_gguf(good, os.path.join(d, "k.gguf"), fields={"gpt2.block_count": None}),
            "has no gpt2.block_count",
        ),
        (
            lambda good, d: copy_gguf(
                good, os.path.join(d, "p.gguf"), fields={"tokenizer.ggml.pre": ("llama-bpe", STRING)}
            ),
            "pre-tokenizes with 'llama-bpe'",
        ),
        (
            lambda good, d: copy_gguf(
                good, os.path.join(d, "t.gguf"), fields={"tokenizer.ggml.model": ("llama", STRING)}
            ),
            "has a 'llama' tokenizer",
        ),
        (
            lambda good, d: copy_gguf(
                good,
                os.path.join(d, "q.gguf"),
                tensors={"blk.0.ffn_down.weight": (Q4_K_ROWS, gguf.GGMLQuantizationType.Q4_K)},
            ),
            "stored as Q4_K",
        ),
        (
            lambda good, d: copy_gguf(
                good, os.path.join(d, "h.gguf"), tensors={"output.weight": (np.zeros((320, 64), np.float32), None)}
            ),
            "ties the two",
        ),
        (
            lambda good, d: copy_gguf(
                good, os.path.join(d, "x.gguf"), tensors={"blk.0.attn_q.weight": (np.zeros((64, 64), np.float32), None)}
            ),
            "blk.0.attn_q.weight that GPT-2 does not have",
        ),
        (
            lambda good, d: copy_gguf(good, os.path.join(d, "c.gguf"), fields={"gpt2.block_count": (3, UINT32)}),
            "n_layer=3",
        ),
    ],
    ids=["junk", "missing", "truncated", "llama", "no-key", "pre", "tokenizer", "q4_k", "untied", "extra", "layers"],
)
def test_bad_gguf_model(good, tmp_path, capsys, make, expected):
    path = make(good, str(tmp_path))
    assert_one_line_error(*run(["generate", "hi", "--model", path, "--max-new-tokens", "1"], capsys)[::2], expected)


def test_a_plain_file_is_still_not_a_model_folder(tmp_path, capsys):
    path = write_file(str(tmp_path / "notes.txt"), "hello")
    assert_one_line_error(*run(["generate", "hi", "--model", path], capsys)[::2], "neither a model folder nor a hub id")


@pytest.mark.parametrize(
    "out,expected",
    [
        ("{tmp}/no/such/folder/m.gguf", "does not exist"),
        ("{tmp}/m.bin", "does not end in .gguf"),
        ("{tmp}/dir.gguf", "is a folder"),
    ],
)
def test_bad_gguf_out(trained_dir, tmp_path, capsys, out, expected):
    os.makedirs(tmp_path / "dir.gguf")
    argv = ["export", "gguf", "--model", trained_dir, "--out", out.format(tmp=tmp_path)]
    assert_one_line_error(*run(argv, capsys)[::2], expected)


@pytest.mark.parametrize(
    "out,expected", [("{tmp}/file", "is a file, not a folder"), ("{tmp}/no/such/out", "does not exist")]
)
def test_bad_onnx_out(trained_dir, tmp_path, capsys, out, expected):
    write_file(str(tmp_path / "file"), "x")
    argv = ["export", "onnx", "--model", trained_dir, "--out", out.format(tmp=tmp_path)]
    assert_one_line_error(*run(argv, capsys)[::2], expected)


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(trained_dir, tmp_path, capsys):
    folder = str(tmp_path / "model")
    shutil.copytree(trained_dir, folder)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    spec["pre_tokenizer"]["add_prefix_space"] = True
    write_file(os.path.join(folder, "tokenizer.json"), json.dumps(spec))
    argv = ["export", "gguf", "--model", folder, "--out", str(tmp_path / "m.gguf")]
    assert_one_line_error(*run(argv, capsys)[::2], "not a GPT-2 style byte-level BPE")
    assert not os.path.exists(tmp_path / "m.gguf")


@pytest.mark.parametrize("module,argv", [("gguf", ["export", "gguf"]), ("onnxscript", ["export", "onnx"])])
def test_missing_package_names_the_extra(trained_dir, tmp_path, capsys, monkeypatch, module, argv):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    out = str(tmp_path / ("m.gguf" if module == "gguf" else "onnx"))
    code, _, err = run([*argv, "--model", trained_dir, "--out", out], capsys)
    assert_one_line_error(code, err, "pip install 'gptwo[export]'")
