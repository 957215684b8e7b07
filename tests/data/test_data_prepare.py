"""`prepare`: every input format, the train/val split, meta.json, atomic output and clear errors."""

import json
import os

import numpy as np
import pytest

import gptwo.data.shard_corpus as prepare_module
from gptwo.data.shard_corpus import prepare
from gptwo.data.shards import read_header, read_shard
from gptwo.errors import GptwoError
from gptwo.tokenizer import Tokenizer

DOCS = [
    f"Document number {i}: the quick brown fox jumps over the lazy dog. Ünïcode — ok.\n" * (i % 3 + 1)
    for i in range(40)
]


def split_tokens(out, split):
    """All tokens of one split, in order."""
    meta = json.loads((out / "meta.json").read_text())
    shards = [read_shard(str(out / s["file"])) for s in meta["splits"][split]["shards"]]
    return np.concatenate(shards) if shards else np.zeros(0, dtype=np.int64)


def documents_of(tokens, eot):
    """Token lists of the documents in a split stream (each ends with end-of-text)."""
    ids = tokens.tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == eot:
            docs.append(ids[start:i])
            start = i + 1
    assert start == len(ids), "a split must end with end-of-text"
    return docs


def write_inputs(folder):
    """The same 40 documents spread over every supported file type."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir()
    (folder / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (folder / "b.md").write_text(DOCS[1], encoding="utf-8")
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[2:15]), encoding="utf-8")
    lines = "".join(json.dumps({"text": d, "meta": 1}) + "\n" for d in DOCS[15:30]).encode()
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": DOCS[30:], "n": list(range(10))}), folder / "e.parquet")
    (folder / "ignored.csv").write_text("not,read\n")


def test_folder_of_every_format(tmp_path):
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    meta = prepare([str(tmp_path / "in")], str(out), val_fraction=0.1, progress=False)
    tok = Tokenizer.gpt2()
    got = documents_of(split_tokens(out, "train"), tok.eot_token) + documents_of(
        split_tokens(out, "val"), tok.eot_token
    )
    assert sorted(got) == sorted(tok.encode_ordinary(d) for d in DOCS)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    assert meta["splits"]["val"]["documents"] >= 1
    assert (meta["tokenizer"], meta["n_vocab"], meta["eot_token"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    val_docs = documents_of(split_tokens(out, "val"), tok.eot_token)
    assert meta["val_tokens"] == sum(len(d) + 1 for d in val_docs)
    assert meta["val_bytes"] == sum(len(tok.decode_bytes(d)) + 1 for d in val_docs)  # separator counts one byte
    assert json.loads((out / "meta.json").read_text()) == meta
    assert read_header(str(out / "train_000000.bin")).tokenizer_identity == "gpt2"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_files_one_by_one_match_in_order(tmp_path):
    write_inputs(tmp_path / "in")
    names = ["a.txt", "b.md", "c.jsonl", "d.jsonl.zst", "e.parquet"]
    meta = prepare([str(tmp_path / "in" / n) for n in names], str(tmp_path / "out"), val_fraction=0.0, progress=False)
    tok = Tokenizer.gpt2()
    assert documents_of(split_tokens(tmp_path / "out", "train"), tok.eot_token) == [
        tok.encode_ordinary(d) for d in DOCS
    ]
    assert meta["val_tokens"] == 0 and meta["splits"]["val"]["shards"] == []


def test_split_is_deterministic_and_seeded(tmp_path):
    write_inputs(tmp_path / "in")
    runs = [
        prepare([str(tmp_path / "in")], str(tmp_path / f"o{i}"), val_fraction=0.3, seed=s, progress=False)
        for i, s in enumerate([1, 1, 2])
    ]
    assert runs[0]["splits"] == runs[1]["splits"]
    assert (tmp_path / "o0" / "val_000000.bin").read_bytes() == (tmp_path / "o1" / "val_000000.bin").read_bytes()
    assert split_tokens(tmp_path / "o0", "val").tolist() != split_tokens(tmp_path / "o2", "val").tolist()


def test_two_documents_give_val_one(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    meta = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tmp_path / "out"), progress=False)
    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["val"]["documents"] == 1


def test_single_document_gives_val_its_end(tmp_path):
    text = "To be, or not to be, that is the question. " * 200
    (tmp_path / "play.txt").write_text(text)
    meta = prepare([str(tmp_path / "play.txt")], str(tmp_path / "out"), val_fraction=0.1, progress=False)
    tok = Tokenizer.gpt2()
    ids = tok.encode_ordinary(text)
    train, val = split_tokens(tmp_path / "out", "train").tolist(), split_tokens(tmp_path / "out", "val").tolist()
    assert train + val == ids + [tok.eot_token]
    assert len(val) - 1 == round(len(ids) * 0.1)
    assert meta["train_bytes"] + meta["val_bytes"] == len(text.encode()) + 1


def test_shards_split_at_shard_tokens(tmp_path):
    write_inputs(tmp_path / "in")
    meta = prepare([str(tmp_path / "in")], str(tmp_path / "out"), val_fraction=0.0, shard_tokens=100, progress=False)
    counts = [s["tokens"] for s in meta["splits"]["train"]["shards"]]
    assert counts[:-1] == [100] * (len(counts) - 1) and 0 < counts[-1] <= 100 and sum(counts) == meta["train_tokens"]
    assert [s["file"] for s in meta["splits"]["train"]["shards"]][:2] == ["train_000000.bin", "train_000001.bin"]


def test_trained_tokenizer_is_copied_and_readable_by_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.train(DOCS, vocab_size=300)
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "d.txt").write_text(DOCS[3])
    meta = prepare(
        [str(tmp_path / "d.txt")], str(tmp_path / "out"), tokenizer=str(tmp_path / "tok.json"), progress=False
    )
    assert meta["tokenizer"] == tok.identity and meta["n_vocab"] == 300 and meta["eot_token"] == tok.eot_token
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    stream = split_tokens(tmp_path / "out", "train").tolist() + split_tokens(tmp_path / "out", "val").tolist()
    assert stream == oracle.encode(DOCS[3]) + [tok.eot_token]


@pytest.mark.parametrize("kind", ["gpt2", "trained"])
def test_process_pool_matches_in_process(tmp_path, monkeypatch, kind):
    docs = DOCS + ["a literal <|endoftext|> in text is plain text"]
    tok = Tokenizer.gpt2() if kind == "gpt2" else Tokenizer.train(DOCS, vocab_size=300)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    serial = prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "serial"), tokenizer=tok, workers=1, progress=False)
    monkeypatch.setattr(prepare_module, "IN_PROCESS_CHUNKS", 0)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 500)
    assert prepare_module._worker_recipe(tok) is not None
    pooled = prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "pooled"), tokenizer=tok, workers=2, progress=False)
    assert pooled == serial
    for split in ("train", "val"):
        assert split_tokens(tmp_path / "pooled", split).tolist() == split_tokens(tmp_path / "serial", split).tolist()


def test_hf_dataset_from_a_local_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "ds" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"content": DOCS[:10]}), tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"content": DOCS[10:12]}), tmp_path / "ds" / "data" / "test-00000-of-00001.parquet")
    tok = Tokenizer.gpt2()
    meta = prepare(
        [f"hf:{tmp_path / 'ds'}@test"], str(tmp_path / "out"), text_field="content", val_fraction=0.0, progress=False
    )
    assert documents_of(split_tokens(tmp_path / "out", "train"), tok.eot_token) == [
        tok.encode_ordinary(d) for d in DOCS[10:12]
    ]
    assert meta["inputs"] == [f"hf:{tmp_path / 'ds'}@test"]
    with pytest.raises(GptwoError, match="no 'text' column"):
        prepare([f"hf:{tmp_path / 'ds'}"], str(tmp_path / "out2"), progress=False)


def test_failed_prepare_keeps_previous_output(tmp_path):
    (tmp_path / "good.txt").write_text("good text " * 50)
    prepare([str(tmp_path / "good.txt")], str(tmp_path / "out"), progress=False)
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(GptwoError, match=r"bad.jsonl:2 .*'text' field"):
        prepare([str(tmp_path / "good.txt"), str(tmp_path / "bad.jsonl")], str(tmp_path / "out"), progress=False)
    assert {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")} == before


def test_reprepare_removes_stale_shards(tmp_path):
    write_inputs(tmp_path / "in")
    prepare([str(tmp_path / "in")], str(tmp_path / "out"), shard_tokens=100, progress=False)
    assert (tmp_path / "out" / "train_000003.bin").exists()
    prepare([str(tmp_path / "in" / "a.txt")], str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]


@pytest.mark.parametrize(
    "setup, inputs, kwargs, message",
    [
        (lambda p: (p / "e.txt").write_text("  \n\n"), ["e.txt"], {}, "no documents"),
        (lambda p: (p / "l.txt").write_bytes("caf\xe9".encode("latin-1")), ["l.txt"], {}, "not UTF-8"),
        (lambda p: None, ["missing.txt"], {}, "does not exist"),
        (lambda p: (p / "ok.txt").write_text("x"), ["ok.txt"], {"tokenizer": "nope.json"}, "not found"),
        (lambda p: (p / "ok.txt").write_text("x"), ["ok.txt"], {"val_fraction": 1.5}, "not in"),
        (lambda p: (p / "t.parquet").write_bytes(b"PAR1 garbage"), ["t.parquet"], {}, "not a readable parquet"),
    ],
)
def test_errors(tmp_path, setup, inputs, kwargs, message):
    setup(tmp_path)
    with pytest.raises(GptwoError, match=message) as err:
        prepare([str(tmp_path / i) for i in inputs], str(tmp_path / "out"), progress=False, **kwargs)
    assert err.value.fix
    assert not (tmp_path / "out").exists()


def test_parquet_without_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(GptwoError, match="no 'text' column"):
        prepare([str(tmp_path / "t.parquet")], str(tmp_path / "out"), progress=False)


def test_single_document_keeps_a_train_token(tmp_path):
    (tmp_path / "two.txt").write_text("Hello world")
    meta = prepare([str(tmp_path / "two.txt")], str(tmp_path / "out"), val_fraction=0.99, progress=False)
    assert (meta["train_tokens"], meta["val_tokens"]) == (1, 2)
    assert (meta["train_bytes"], meta["val_bytes"]) == (5, 7)
