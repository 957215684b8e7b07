"""`gptwo export gguf` writes what llama.cpp's converter writes; gptwo, transformers and (given a tree) llama.cpp
read it back to the same model and tokenizer.

GPTWO_LLAMA_CPP=PATH (a llama.cpp source tree, with sentencepiece and transformers installed) also runs its
convert_hf_to_gguf.py on the same folders and, when a build under PATH/build*/bin or beside PATH has
llama-server, checks that llama.cpp tokenizes and decodes greedily as gptwo does.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from gguf_oracle import assert_same_gguf, write_converter_layout

from gptwo import GPT, GPTConfig
from gptwo.export.gguf import GGUF_TYPES, export_gguf, quantize_q8_0, to_bf16
from gptwo.tokenizer import GPT2_PATTERN, byte_to_unicode
from gptwo.weights import load_model, load_pretrained, model_chat_template, save_pretrained

LLAMA_CPP = os.environ.get("GPTWO_LLAMA_CPP")
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason="set GPTWO_LLAMA_CPP to a llama.cpp source tree")
PROBE = "Hello world! It's 2024, and we've   got\n\n tabs\tand ünïcödé 日本語 🚀 text<|endoftext|>more"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_dir) -> dict[str, str]:
    """The trained-tokenizer model exported at every type."""
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(trained_dir, str(out / f"ours-{t}.gguf"), t, name="Model")["path"] for t in GGUF_TYPES}


# ---------------------------------------------------------------- the file: llama.cpp's layout, byte for byte
@pytest.mark.parametrize("file_type", GGUF_TYPES)
def test_same_file_as_the_converter_layout(exported, trained_dir, tmp_path, file_type):
    oracle = str(tmp_path / "oracle.gguf")
    write_converter_layout(trained_dir, oracle, file_type, "Model")
    assert_same_gguf(exported[file_type], oracle)


def test_same_file_as_the_converter_layout_with_gpt2_bpe(gpt2_vocab_dir, tmp_path):
    ours = export_gguf(gpt2_vocab_dir, str(tmp_path / "ours.gguf"), "q8_0", name="Model")["path"]
    write_converter_layout(gpt2_vocab_dir, str(tmp_path / "oracle.gguf"), "q8_0", "Model")
    assert_same_gguf(ours, str(tmp_path / "oracle.gguf"))


def test_q8_0_and_bf16_encode_bit_for_bit_as_gguf_py():
    import gguf

    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 128)).astype(np.float32)
    values[0, :32] = 0.0  # a block of zeros: scale 0
    values[1, :32] = np.arange(32) * np.float32(0.25) - 4  # with 63.5 first, d = 0.5 and x / d lands on halves
    values[1, 0] = 63.5
    values[2] *= 1e-30  # subnormal scales
    for ours, kind in ((quantize_q8_0, "Q8_0"), (to_bf16, "BF16")):
        theirs = gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, kind))
        assert np.array_equal(ours(values).view(np.uint8), np.asarray(theirs).view(np.uint8)), kind


def test_a_chat_template_goes_into_the_gguf_where_llama_cpp_reads_it(exported, trained_tokenizer, tmp_path):
    """A folder's chat template is written under tokenizer.chat_template (the converter's key) and read back."""
    import gguf

    from gptwo.chat import CHAT_TEMPLATE

    folder = str(tmp_path / "chat")
    model = GPT(GPTConfig(vocab_size=trained_tokenizer.n_vocab, block_size=64, n_layer=1, n_head=1, n_embd=32))
    save_pretrained(model, folder, trained_tokenizer, chat_template=CHAT_TEMPLATE)
    path = export_gguf(folder, str(tmp_path / "chat.gguf"))["path"]
    assert gguf.GGUFReader(path).fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE].contents() == CHAT_TEMPLATE
    assert model_chat_template(path) == CHAT_TEMPLATE
    assert model_chat_template(exported["f32"]) is None


def test_trained_tokenizer_splits_as_gpt2s_regex(trained_tokenizer):
    """What 'gpt-2' tells llama.cpp: split with GPT-2's regex. A trained tokenizer's pre-tokenizer does just that."""
    import json

    import regex
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(trained_tokenizer.to_json())
    chars = byte_to_unicode()
    for text in [PROBE, "  leading and trailing  ", "a\n\n\nb", "x  \n y", "'s 'S 'll '  t"]:
        pieces = [piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
        expected = ["".join(chars[b] for b in m.encode()) for m in regex.findall(GPT2_PATTERN, text)]
        assert pieces == expected, text
    assert json.loads(trained_tokenizer.to_json())["normalizer"] is None


# ---------------------------------------------------------------- reading it back: gptwo
@pytest.mark.parametrize("file_type,tolerance", [("f32", 0.0), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_gguf_to_gptwo_same_logits(exported, trained_dir, file_type, tolerance):
    original, tokenizer = load_model(trained_dir, device="cpu")
    model, read = load_model(exported[file_type], device="cpu")
    ids = torch.tensor([tokenizer.encode(PROBE)[:60]])
    with torch.no_grad():
        diff = (model(ids) - original(ids)).abs().max().item()
    assert diff <= tolerance
    assert read.to_json() == tokenizer.to_json()  # the trained tokenizer survives: same tokenizer.json
    assert read.encode(PROBE) == tokenizer.encode(PROBE)


def test_gguf_q8_0_kept_as_int8(exported, trained_dir):
    original = load_pretrained(trained_dir)
    model = load_pretrained(exported["q8_0"], quantize="int8")
    ids = torch.arange(40)[None] % original.config.vocab_size
    with torch.no_grad():
        assert (model(ids) - original(ids)).abs().max().item() < 5e-2


def test_gpt2_bpe_comes_back_as_gpt2s(gpt2_vocab_dir, tmp_path):
    path = export_gguf(gpt2_vocab_dir, str(tmp_path / "m.gguf"), "f32")["path"]
    model, tokenizer = load_model(path, device="cpu")
    assert tokenizer.name == "gpt2" and tokenizer.encode(PROBE) == load_model(gpt2_vocab_dir, "cpu")[1].encode(PROBE)
    original = load_pretrained(gpt2_vocab_dir)
    ids = torch.tensor([tokenizer.encode(PROBE)[:60]])
    with torch.no_grad():
        assert torch.equal(model(ids), original(ids))


# ---------------------------------------------------------------- reading it back: transformers
def test_transformers_reads_our_gguf(exported, trained_dir):
    transformers = pytest.importorskip("transformers")
    original, tokenizer = load_model(trained_dir, device="cpu")
    ids = torch.tensor([tokenizer.encode(PROBE)[:60]])
    with torch.no_grad():
        reference = original(ids)
        for file_type, tolerance in (("f32", 1e-4), ("q8_0", 2e-2)):
            folder, name = os.path.split(exported[file_type])
            # transformers maps gpt2.context_length to n_ctx but sizes the position table by n_positions
            # (1024 unless given): a model whose context is not 1024 needs n_positions passed (docs/export.md)
            hf = transformers.GPT2LMHeadModel.from_pretrained(
                folder, gguf_file=name, n_positions=original.config.block_size
            ).eval()
            assert (hf(ids).logits - reference).abs().max().item() <= tolerance, file_type
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert hf_tokenizer.encode(PROBE) == tokenizer.encode(PROBE)


# ---------------------------------------------------------------- llama.cpp itself, given its tree
def _converter(directory: str, out: str, outtype: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(LLAMA_CPP, "gguf-py"))
    script = os.path.join(LLAMA_CPP, "convert_hf_to_gguf.py")
    command = [sys.executable, script, directory, "--outtype", outtype, "--outfile", out]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@needs_llama_cpp
@pytest.mark.parametrize("file_type", ["f32", "q8_0"])  # f16 and bf16 match too; the oracle above checks them
def test_same_file_as_llama_cpps_converter(gpt2_vocab_dir, tmp_path, file_type):
    theirs = str(tmp_path / "theirs.gguf")
    done = _converter(gpt2_vocab_dir, theirs, file_type)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = export_gguf(gpt2_vocab_dir, str(tmp_path / "ours.gguf"), file_type, name="Model")["path"]
    assert_same_gguf(ours, theirs)


@needs_llama_cpp
def test_llama_cpps_converter_does_not_know_a_trained_tokenizer(trained_dir, tmp_path):
    """The wall `gptwo export gguf` removes: a new vocabulary's pre-tokenizer hash is not in the converter's list."""
    done = _converter(trained_dir, str(tmp_path / "theirs.gguf"), "f32")
    assert done.returncode != 0 and "pre-tokenizer was not recognized" in done.stderr


def _llama_binary(name: str) -> str | None:
    roots = [os.path.join(LLAMA_CPP, "build*", "bin"), os.path.join(os.path.dirname(LLAMA_CPP), "build*", "bin")]
    found = [path for root in roots for path in glob.glob(os.path.join(root, name))]
    return found[0] if found else None


@contextlib.contextmanager
def llama_server(model: str):
    """llama.cpp's llama-server on `model` at a free local port; yields a function POSTing JSON to it."""
    binary = _llama_binary("llama-server")
    if binary is None:
        pytest.skip("no llama-server in the llama.cpp build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", "128", "-t", "1", "-np", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, "llama-server exited"
                time.sleep(0.5)
        yield post
    finally:
        proc.terminate()
        proc.wait(30)


@needs_llama_cpp
def test_llama_cpp_tokenizes_and_decodes_as_gptwo(exported, trained_dir, trained_tokenizer):
    """llama.cpp on gptwo's f32 GGUF of a gptwo-trained tokenizer: the same ids, the same greedy tokens."""
    model = load_pretrained(trained_dir)
    texts = [PROBE.replace("<|endoftext|>", " "), "  leading and trailing  ", "a\n\n\nb 3.14 'll"]
    with llama_server(exported["f32"]) as post:
        for text in texts:
            assert post("/tokenize", {"content": text, "add_special": False})["tokens"] == trained_tokenizer.encode(
                text
            )
        prompt = trained_tokenizer.encode(texts[0])[:8]
        body = {"prompt": prompt, "n_predict": 12, "temperature": 0, "top_k": 1, "samplers": ["top_k"]}
        theirs = post("/completion", {**body, "ignore_eos": True, "cache_prompt": False, "return_tokens": True})
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert theirs["tokens"] == ids[0, len(prompt) :].tolist()
