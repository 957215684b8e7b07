"""GPT-2's BPE against transformers' GPT2TokenizerFast built from the same published files."""

import inspect
import json
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2TokenizerFast

from gptwo import Tokenizer
from gptwo.tokenizer import gpt2_files


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    encoder, bpe = gpt2_files()
    shutil.copy(encoder, folder / "vocab.json")
    shutil.copy(bpe, folder / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(folder)


def varied_text(size: int, seed: int = 0) -> list[str]:
    """Documents of prose, code, Unicode, emoji, whitespace runs and digits, about `size` characters."""
    import pydoc_data.topics

    rng = random.Random(seed)
    prose = list(pydoc_data.topics.topics.values())
    code = [inspect.getsource(m) for m in (json, random, shutil, inspect)]
    alphabets = [
        "абвгдежзийклмнопрстуфхцчшщыэюя",
        "αβγδεζηθικλμνξοπρστυφχψω",
        "的一是不了人我在有他这为之大来以个中上们",
        "あいうえおかきくけこさしすせそ",
        "한국어조선말",
        "àéîõüçñßøåæœ",
        "שלוםעולם",
        "مرحبابالعالم",
        "नमस्तेदुनिया",
    ]
    emoji = "😀🎉👍🏽🇫🇷👨‍👩‍👧‍👦❤️🔥✨🤖🧪"
    docs, total = [], 0
    while total < size:
        kind = rng.randrange(6)
        if kind == 0:
            text = rng.choice(prose)
            start = rng.randrange(max(1, len(text) - 3000))
            doc = text[start : start + rng.randrange(200, 3000)]
        elif kind == 1:
            text = rng.choice(code)
            start = rng.randrange(max(1, len(text) - 3000))
            doc = text[start : start + rng.randrange(200, 3000)]
        elif kind == 2:
            alphabet = rng.choice(alphabets)
            doc = " ".join(
                "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 9))) for _ in range(rng.randrange(20, 200))
            )
        elif kind == 3:
            doc = "".join(
                rng.choice([rng.choice(emoji), " ", "a", "\u200d", "\ufe0f"]) for _ in range(rng.randrange(20, 300))
            )
        elif kind == 4:
            doc = "".join(
                rng.choice(
                    [
                        " " * rng.randrange(1, 12),
                        "\t" * rng.randrange(1, 4),
                        "\n" * rng.randrange(1, 5),
                        "\r\n",
                        "word",
                        "'s",
                        "'ll",
                        "x'Y",
                    ]
                )
                for _ in range(rng.randrange(20, 300))
            )
        else:
            doc = " ".join(
                rng.choice(
                    [
                        str(rng.randrange(10 ** rng.randrange(1, 15))),
                        f"{rng.random():.6f}",
                        "1,000,000",
                        "3.14e-10",
                        "2026-11-26",
                    ]
                )
                for _ in range(rng.randrange(20, 200))
            )
        docs.append(doc)
        total += len(doc.encode())
    return docs


def test_gpt2_equals_transformers_on_a_megabyte(hf_gpt2):
    tok = Tokenizer.gpt2()
    docs = varied_text(1_100_000)
    assert sum(len(d.encode()) for d in docs) >= 1_000_000
    mismatches = [d for d in docs if tok.encode(d) != hf_gpt2.encode(d)]
    assert not mismatches, f"{len(mismatches)} documents differ, first: {mismatches[0][:200]!r}"
    assert tok.encode_batch(docs[:50]) == [hf_gpt2.encode(d) for d in docs[:50]]


def test_gpt2_special_token_and_sizes(hf_gpt2):
    tok = Tokenizer.gpt2()
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    text = "end of one<|endoftext|>start of two"
    assert tok.encode(text) == hf_gpt2.encode(text)
    assert 50256 in tok.encode(text)
    assert 50256 not in tok.encode_ordinary(text)
    assert tok.decode(tok.encode_ordinary(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_gpt2_round_trip_is_lossless(text):
    tok = Tokenizer.gpt2()
    assert tok.decode(tok.encode_ordinary(text)) == text
    assert tok.decode_bytes(tok.encode(text)) == text.encode()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(varied_text(200_000, seed=1)[:60]):
        (folder / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return Tokenizer.train([str(folder)], vocab_size=600)


def test_trained_tokenizer_save_load_and_round_trip(trained, tmp_path):
    assert trained.n_vocab == 600
    path = tmp_path / "tok.json"
    trained.save(str(path))
    loaded = Tokenizer.from_file(str(path))
    sample = "Some new text, 12345 — ünïcode 🎉<|endoftext|>"
    assert loaded.encode(sample) == trained.encode(sample)
    assert loaded.identity == trained.identity != Tokenizer.gpt2().identity
    assert loaded.decode(loaded.encode_ordinary(sample)) == sample
    assert trained.eot_token in loaded.encode(sample)
    assert trained.eot_token not in loaded.encode_ordinary(sample)
    assert len(loaded.encode("the quick brown fox " * 20)) < len(("the quick brown fox " * 20).encode())


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_trained_round_trip_is_lossless(trained, text):
    assert trained.decode(trained.encode_ordinary(text)) == text


def test_gpt2_saves_as_a_tokenizer_json_that_loads_back_fast(tmp_path, hf_gpt2):
    path = tmp_path / "tokenizer.json"
    Tokenizer.gpt2().save(str(path))
    loaded = Tokenizer.from_file(str(path))
    assert loaded.name == "gpt2"  # recognised, so it takes the tiktoken path
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).encode("Hello there, 123") == hf_gpt2.encode("Hello there, 123")


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    from gptwo.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(varied_text(50_000, seed=2)), encoding="utf-8")
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    assert Tokenizer.from_file(str(out)).n_vocab == 400


def test_tokenizers_pickle_for_worker_processes(trained):
    import pickle

    text = "plain <|endoftext|> text"
    for tok in (trained, Tokenizer.gpt2()):
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.identity == tok.identity
        assert copy.encode_ordinary(text) == tok.encode_ordinary(text)
        assert copy.encode(text) == tok.encode(text)


def test_other_vocab_and_merges_files_save_what_they_encode(tmp_path, trained):
    """A GPT-2-style vocab.json + merges.txt that is not GPT-2's: encoded alike before and after saving."""
    spec = json.loads(trained.to_json())
    (tmp_path / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    from_files = Tokenizer.from_bpe_files(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    from_files.save(str(tmp_path / "tokenizer.json"))
    reloaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    sample = "Some new text, 12345 — ünïcode 🎉"
    assert from_files.encode(sample) == reloaded.encode(sample) == trained.encode(sample)
    assert from_files.identity == reloaded.identity
    assert oct((tmp_path / "tokenizer.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
