"""A table of bad inputs, tried the way a careless user would: each gives exit 2, one `error: … — …`
line naming the offending file, option or field, and leaves every file that was there before as it was.

Rows run in process through `gptwo.cli.main` (stdin rows in a subprocess). Fixtures are generated:
a 300-token BPE, a few KB of text prepared into shards, a 1-layer width-32 model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import zstandard
from cli_testing import SENTENCES, TRAIN, tiny_corpus
from cli_testing import write_file as _write

from gptwo import GPT, GPTConfig
from gptwo.cli import main, parse_args
from gptwo.data.shard_corpus import prepare
from gptwo.data.shards import read_header, read_shard, write_shard
from gptwo.errors import GptwoError, from_library_error
from gptwo.weights import save_pretrained


def _jsonl_zst(path: str, documents: int) -> bytes:
    lines = "".join(json.dumps({"text": f"document {i}: " + " ".join(SENTENCES)}) + "\n" for i in range(documents))
    data = zstandard.ZstdCompressor().compress(lines.encode())
    _write(path, data)
    return data


def _data_variant(root: str, name: str, change) -> str:
    """A copy of the prepared data folder with `change(folder)` applied."""
    folder = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "data"), folder)
    change(folder)
    return folder


def _edit_meta(**fields):
    def change(folder: str) -> None:
        path = os.path.join(folder, "meta.json")
        with open(path) as f:
            meta = json.load(f)
        meta.update(fields)
        _write(path, json.dumps(meta))

    return change


def _ids_beyond_vocab(folder: str) -> None:
    path = os.path.join(folder, "train_000000.bin")
    header, tokens = read_header(path), np.array(read_shard(path))
    tokens[5] = 9000  # a corrupt id: fits uint16, not the 300-token vocabulary
    write_shard(path, tokens, header.tokenizer_identity, dtype=header.dtype)


def _model_variant(root: str, name: str, config) -> str:
    """A copy of the model folder whose config.json is replaced by `config` (a JSON value or raw text)."""
    folder = os.path.join(root, name)
    shutil.copytree(os.path.join(root, "model"), folder)
    if callable(config):
        with open(os.path.join(folder, "config.json")) as f:
            config = config(json.load(f))
    _write(os.path.join(folder, "config.json"), config if isinstance(config, str) else json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    """Everything the rows point at, in one folder."""
    root = str(tmp_path_factory.mktemp("bad-input"))
    tok = tiny_corpus(root)
    prepare(
        [os.path.join(root, "corpus")],
        os.path.join(root, "data"),
        tokenizer=tok,
        val_fraction=0.2,
        workers=1,
        progress=False,
    )
    save_pretrained(
        GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=1, n_embd=32)),
        os.path.join(root, "model"),
        tokenizer=tok,
    )
    os.makedirs(os.path.join(root, "emptydir"))
    os.makedirs(os.path.join(root, "folder"))
    _write(os.path.join(root, "doc.txt"), "A short document for evaluation and encoding.\n")
    _write(os.path.join(root, "out.txt"), "an earlier output that must survive\n")
    _write(os.path.join(root, "latin1.txt"), "caf\xe9 au lait".encode("latin-1"))
    _write(os.path.join(root, "blank.txt"), "  \n\n")
    _write(os.path.join(root, "binary.txt"), bytes(range(256)) * 4)
    _write(os.path.join(root, "list.json"), "[1, 2, 3]")
    _write(os.path.join(root, "broken.json"), '{"lr": 0.001,')
    _write(os.path.join(root, "string_layers.json"), '{"n_layer": "2"}')
    _write(os.path.join(root, "float_layers.json"), '{"n_layer": 1.5}')
    _write(os.path.join(root, "shape.json"), '{"n_layer": 2, "lr": 0.001}')
    _write(os.path.join(root, "bad.jsonl"), "[1, 2]\n")
    whole = _jsonl_zst(os.path.join(root, "whole.jsonl.zst"), 40)
    _write(os.path.join(root, "cut", "cut.jsonl.zst"), whole[: int(len(whole) * 0.6)])
    _write(os.path.join(root, "garbage.jsonl.zst"), bytes(random.Random(1).randrange(256) for _ in range(4096)))
    _data_variant(root, "data_bad_ids", _ids_beyond_vocab)
    _data_variant(root, "data_small_vocab", _edit_meta(n_vocab=10, eot_token=9))
    _data_variant(root, "data_string_vocab", _edit_meta(n_vocab="300"))
    _data_variant(root, "data_meta_list", lambda folder: _write(os.path.join(folder, "meta.json"), "[]"))
    _model_variant(root, "model_config_list", [1, 2])
    _model_variant(root, "model_string_layers", lambda c: {**c, "n_layer": "1"})
    _model_variant(root, "model_float_embd", lambda c: {**c, "n_embd": 32.5})
    _model_variant(root, "model_broken_json", "{not json")
    return root


@dataclass
class Case:
    """One bad input: the command line, what its error line must name, and stdin bytes (subprocess) if any."""

    id: str
    argv: list[str]
    names: list[str]
    stdin: bytes | None = None
    extra: dict = field(default_factory=dict)


def _generate(*options: str) -> list[str]:
    return ["generate", "--model", "model", "--max-new-tokens", "2", *options, "hello"]


def _train(data: str = "data", out: str = "new_run", *extra: str) -> list[str]:
    return ["train", "--data", data, "--out", out, *TRAIN, *extra]


CASES = [
    # tokenizer train: paths exist, numbers in range, the output is a file
    Case(
        "tok-train-missing-path",
        ["tokenizer", "train", "no_such_dir", "--vocab-size", "300", "--out", "t.json"],
        ["no_such_dir"],
    ),
    Case(
        "tok-train-one-typo",
        ["tokenizer", "train", "corpus", "typo_dir", "--vocab-size", "300", "--out", "t.json"],
        ["typo_dir"],
    ),
    Case(
        "tok-train-negative-min-frequency",
        ["tokenizer", "train", "corpus", "--vocab-size", "300", "--min-frequency", "-1", "--out", "t.json"],
        ["--min-frequency"],
    ),
    Case(
        "tok-train-vocab-too-small",
        ["tokenizer", "train", "corpus", "--vocab-size", "100", "--out", "t.json"],
        ["--vocab-size"],
    ),
    Case(
        "tok-train-vocab-huge",
        ["tokenizer", "train", "corpus", "--vocab-size", "99999999999999", "--out", "t.json"],
        ["--vocab-size"],
    ),
    Case(
        "tok-train-vocab-not-int",
        ["tokenizer", "train", "corpus", "--vocab-size", "3e2", "--out", "t.json"],
        ["--vocab-size"],
    ),
    Case(
        "tok-train-out-is-folder",
        ["tokenizer", "train", "corpus", "--vocab-size", "300", "--out", "folder"],
        ["folder"],
    ),
    Case(
        "tok-train-out-under-a-file",
        ["tokenizer", "train", "corpus", "--vocab-size", "300", "--out", "doc.txt/t.json"],
        ["doc.txt"],
    ),
    Case(
        "tok-train-not-utf8",
        ["tokenizer", "train", "latin1.txt", "--vocab-size", "300", "--out", "t.json"],
        ["latin1.txt"],
    ),
    Case(
        "tok-train-truncated-zst",
        ["tokenizer", "train", "cut", "--vocab-size", "300", "--out", "t.json"],
        ["cut.jsonl.zst", "truncated"],
    ),
    # tokenizer encode: the tokenizer is a tokenizer, stdin is UTF-8
    Case("tok-encode-empty-folder", ["tokenizer", "encode", "--tokenizer", "emptydir", "hello"], ["emptydir"]),
    Case("tok-encode-missing-file", ["tokenizer", "encode", "--tokenizer", "nope.json", "hello"], ["nope.json"]),
    Case("tok-encode-text-as-tokenizer", ["tokenizer", "encode", "--tokenizer", "doc.txt", "hello"], ["doc.txt"]),
    Case("tok-encode-json-list", ["tokenizer", "encode", "--tokenizer", "list.json", "hello"], ["list.json"]),
    Case(
        "tok-encode-undecodable-argument",
        ["tokenizer", "encode", "--tokenizer", "tok.json", "a\udcedb"],
        ["TEXT", "UTF-8"],
    ),
    Case(
        "tok-encode-binary-stdin",
        ["tokenizer", "encode", "--tokenizer", "tok.json", "-"],
        ["stdin"],
        stdin=b"\xff\xfe\x00\x01binary",
    ),
    Case(
        "tok-encode-latin1-stdin",
        ["tokenizer", "encode", "--tokenizer", "tok.json", "-"],
        ["stdin"],
        stdin="caf\xe9".encode("latin-1"),
    ),
    # generate: sampling numbers finite and in range; the model folder's config.json typed
    Case("gen-temperature-nan", _generate("--temperature", "nan"), ["--temperature"]),
    Case("gen-temperature-inf", _generate("--temperature", "inf"), ["--temperature"]),
    Case("gen-temperature-negative", _generate("--temperature", "-0.5"), ["--temperature"]),
    Case("gen-top-p-zero", _generate("--top-p", "0"), ["--top-p"]),
    Case("gen-top-p-nan", _generate("--top-p", "nan"), ["--top-p"]),
    Case("gen-top-k-zero", _generate("--top-k", "0"), ["--top-k"]),
    Case("gen-max-new-tokens-negative", _generate("--max-new-tokens", "-3"), ["--max-new-tokens"]),
    Case("gen-num-samples-zero", _generate("--num-samples", "0"), ["--num-samples"]),
    Case("gen-seed-overflow", _generate("--seed", str(10**23)), ["--seed"]),
    Case(
        "gen-binary-stdin",
        ["generate", "--model", "model", "--max-new-tokens", "2", "-"],
        ["PROMPT", "stdin"],
        stdin=b"\x89PNG\r\n\x1a\n\xff\x00",
    ),
    Case(
        "gen-config-not-object",
        ["generate", "--model", "model_config_list", "hi"],
        ["model_config_list", "config.json"],
    ),
    Case("gen-config-string-field", ["generate", "--model", "model_string_layers", "hi"], ["config.json", "n_layer"]),
    Case("gen-config-float-field", ["generate", "--model", "model_float_embd", "hi"], ["config.json", "n_embd"]),
    Case("gen-config-broken-json", ["generate", "--model", "model_broken_json", "hi"], ["config.json"]),
    Case("gen-model-empty-folder", ["generate", "--model", "emptydir", "hi"], ["emptydir"]),
    # prepare: streams end cleanly, the tokenizer is one, the output is a folder
    Case("prep-truncated-zst", ["prepare", "cut", "--out", "new_data", "--quiet"], ["cut.jsonl.zst", "truncated"]),
    Case("prep-garbage-zst", ["prepare", "garbage.jsonl.zst", "--out", "new_data", "--quiet"], ["garbage.jsonl.zst"]),
    Case(
        "prep-tokenizer-empty-folder",
        ["prepare", "corpus", "--out", "new_data", "--tokenizer", "emptydir", "--quiet"],
        ["emptydir"],
    ),
    Case("prep-out-is-a-file", ["prepare", "corpus", "--out", "out.txt", "--quiet"], ["out.txt"]),
    Case(
        "prep-into-existing-data-fails-cleanly",
        ["prepare", "corpus", "cut", "--out", "data", "--tokenizer", "tok.json", "--quiet"],
        ["cut.jsonl.zst"],
    ),
    Case(
        "prep-val-fraction-one", ["prepare", "corpus", "--out", "new_data", "--val-fraction", "1"], ["--val-fraction"]
    ),
    Case(
        "prep-val-fraction-nan", ["prepare", "corpus", "--out", "new_data", "--val-fraction", "nan"], ["--val-fraction"]
    ),
    Case(
        "prep-shard-tokens-zero", ["prepare", "corpus", "--out", "new_data", "--shard-tokens", "0"], ["--shard-tokens"]
    ),
    Case("prep-workers-zero", ["prepare", "corpus", "--out", "new_data", "--workers", "0"], ["--workers"]),
    Case("prep-seed-negative", ["prepare", "corpus", "--out", "new_data", "--seed", "-1"], ["--seed"]),
    Case("prep-missing-input", ["prepare", "corpus", "no_such.txt", "--out", "new_data"], ["no_such.txt"]),
    Case("prep-jsonl-not-object", ["prepare", "bad.jsonl", "--out", "new_data", "--quiet"], ["bad.jsonl:1"]),
    Case("prep-not-utf8", ["prepare", "latin1.txt", "--out", "new_data", "--quiet"], ["latin1.txt"]),
    # train: config files are objects with typed fields, numbers finite, ids fit the vocabulary
    Case(
        "train-init-from-shape-override",
        ["train", "--data", "data", "--out", "new_run", "--init-from", "model", "n_embd=128"],
        ["n_embd", "--init-from", "its n_embd is 32"],
    ),
    Case(
        "train-init-from-shape-in-config",
        ["train", "--data", "data", "--out", "new_run", "--init-from", "model", "--config", "shape.json"],
        ["n_layer", "--init-from"],
    ),
    Case(
        "train-init-from-hub-shape-unknown",
        ["train", "--data", "data", "--out", "new_run", "--init-from", "someone/some-model", "n_head=4"],
        ["n_head", "not known"],
    ),
    Case("train-config-folder", ["train", "--data", "data", "--out", "new_run", "--config", "folder"], ["folder"]),
    Case(
        "train-config-not-object",
        ["train", "--data", "data", "--out", "new_run", "--config", "list.json"],
        ["list.json"],
    ),
    Case(
        "train-config-broken-json",
        ["train", "--data", "data", "--out", "new_run", "--config", "broken.json"],
        ["broken.json"],
    ),
    Case(
        "train-config-string-field",
        ["train", "--data", "data", "--out", "new_run", "--config", "string_layers.json"],
        ["n_layer", "string_layers.json"],
    ),
    Case(
        "train-config-float-field",
        ["train", "--data", "data", "--out", "new_run", "--config", "float_layers.json"],
        ["n_layer", "float_layers.json"],
    ),
    Case("train-lr-nan", _train("data", "new_run", "lr=nan"), ["lr"]),
    Case("train-weight-decay-nan", _train("data", "new_run", "weight_decay=nan"), ["weight_decay"]),
    Case("train-dropout-inf", _train("data", "new_run", "dropout=inf"), ["dropout"]),
    Case("train-seed-negative", _train("data", "new_run", "seed=-1"), ["seed"]),
    Case("train-unknown-key", _train("data", "new_run", "n_layers=2"), ["n_layers"]),
    Case("train-max-steps-zero", ["train", "--data", "data", "--out", "new_run", "--max-steps", "0"], ["--max-steps"]),
    Case("train-stray-argument", ["train", "--data", "data", "--out", "new_run", "oops"], ["oops"]),
    Case("train-out-is-a-file", _train("data", "out.txt"), ["out.txt"]),
    Case("train-missing-data", _train("no_data", "new_run"), ["no_data"]),
    Case("train-shard-id-beyond-vocab", _train("data_bad_ids", "new_run"), ["train_000000.bin", "9000"]),
    Case("train-meta-vocab-too-small", _train("data_small_vocab", "new_run"), ["meta.json", "n_vocab"]),
    Case("train-meta-vocab-string", _train("data_string_vocab", "new_run"), ["meta.json", "n_vocab"]),
    Case("train-meta-not-object", _train("data_meta_list", "new_run"), ["meta.json"]),
    # eval ppl: files are text, numbers in range
    Case("ppl-empty-folder", ["eval", "ppl", "--model", "model", "emptydir"], ["emptydir"]),
    Case("ppl-missing-file", ["eval", "ppl", "--model", "model", "no_such.txt"], ["no_such.txt"]),
    Case("ppl-binary-file", ["eval", "ppl", "--model", "model", "binary.txt"], ["binary.txt"]),
    Case("ppl-blank-file", ["eval", "ppl", "--model", "model", "blank.txt"], ["blank.txt"]),
    Case("ppl-stride-zero", ["eval", "ppl", "--model", "model", "doc.txt", "--stride", "0"], ["--stride"]),
    Case("ppl-batch-size-zero", ["eval", "ppl", "--model", "model", "doc.txt", "--batch-size", "0"], ["--batch-size"]),
    Case("ppl-model-config-not-object", ["eval", "ppl", "--model", "model_config_list", "doc.txt"], ["config.json"]),
]


def _snapshot(root: str) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return files


def _run(case: Case, root: str, capsys) -> tuple[int, str]:
    if case.stdin is None:
        try:
            code = main(case.argv)
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        return code, capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "gptwo.cli", *case.argv],
        input=case.stdin,
        capture_output=True,
        cwd=root,
        env=env,
        timeout=120,
    )
    return done.returncode, done.stderr.decode("utf-8", errors="replace")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_keeps_outputs(case: Case, world: str, capsys, monkeypatch):
    monkeypatch.chdir(world)
    before = _snapshot(world)
    code, err = _run(case, world, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert "Traceback" not in err and " — " in errors[0], err
    for name in case.names:
        assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    after = _snapshot(world)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"files changed or removed: {changed}"
    for out in ("new_data", "t.json"):  # a failed command leaves no half-made output behind
        assert not os.path.exists(os.path.join(world, out)), out
    shutil.rmtree(os.path.join(world, "new_run"), ignore_errors=True)


def test_case_count_by_command():
    """The table covers every command in this area (the count is quoted in the issue's closing note)."""
    counts: dict[str, int] = {}
    for case in CASES:
        command = " ".join(case.argv[:2]) if case.argv[0] in ("tokenizer", "eval") else case.argv[0]
        counts[command] = counts.get(command, 0) + 1
    assert set(counts) == {"tokenizer train", "tokenizer encode", "generate", "prepare", "train", "eval ppl"}
    assert len(CASES) >= 40


# ---------------------------------------------------------------- behaviour that replaced silent results
def test_whole_zst_streams_read_fully_one_frame_or_many(world, tmp_path):
    from gptwo.data.sources import iter_documents

    assert len(list(iter_documents([os.path.join(world, "whole.jsonl.zst")]))) == 40
    frames = b"".join(
        _jsonl_zst(str(tmp_path / f"part{i}.zst"), 3) for i in range(4)
    )  # concatenated frames, as zstd -c a b writes
    _write(str(tmp_path / "multi.jsonl.zst"), frames)
    assert len(list(iter_documents([str(tmp_path / "multi.jsonl.zst")]))) == 12


def test_eval_ppl_of_a_folder_scores_its_text_files(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    assert main(["eval", "ppl", "--model", "model", "corpus", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in report["files"]] == [os.path.join("corpus", f"doc{i:02d}.txt") for i in range(16)]


def test_short_validation_split_warns_and_progress_has_no_carriage_returns(world, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(world)
    run = str(tmp_path / "run")
    assert main(["train", "--data", "data", "--out", run, *TRAIN, "block_size=16", "batch_size=64", "max_steps=3"]) == 0
    err = capsys.readouterr().err
    assert "warning: the validation split" in err and "without validation" in err
    assert "\r" not in err and "train: step 3/3" in err and "loss" in err


def test_init_from_accepts_the_shape_it_keeps(world):
    from gptwo.config import load_train_config

    config = load_train_config(
        overrides=[f"init_from={os.path.join(world, 'model')}", "n_layer=1", "n_embd=32", "block_size=16"]
    )
    assert (config.n_layer, config.n_embd) == (1, 32)
    assert load_train_config(overrides=["init_from=gpt2", "n_layer=12"]).n_layer == 12


def test_overrides_may_follow_options():
    args = parse_args(
        [
            "train",
            "--data",
            "D",
            "--out",
            "R",
            "lr=1e-4",
            "--init-from",
            "gpt2",
            "n_layer=2",
            "--max-steps",
            "3",
            "dropout=0.1",
        ]
    )
    assert (
        args.overrides == ["lr=1e-4", "n_layer=2", "dropout=0.1"] and args.init_from == "gpt2" and args.max_steps == 3
    )
    assert parse_args(["train", "--data", "D", "--out", "R", "--init-from", "gpt2", "lr=1e-4"]).overrides == ["lr=1e-4"]


def test_interrupted_training_names_resume(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gptwo.train.loop.run_training", interrupted)
    assert main(["train", "--data", "D", "--out", "R"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_a_genuine_bug_says_so_with_exit_1(monkeypatch, capsys):
    def broken(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr("gptwo.train.loop.run_training", broken)
    assert main(["train", "--data", "D", "--out", "R"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: KeyError:") and "this is a bug: please report it with the output of --debug" in err


def test_library_errors_map_to_one_error_type(tmp_path):
    import sqlite3

    database = tmp_path / "crawl.db"
    database.write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError) as sqlite_error:
        sqlite3.connect(database).execute("select * from t")
    with pytest.raises(zstandard.ZstdError) as zstd_error:
        zstandard.ZstdDecompressor().decompress(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(OSError) as os_error:
        open(tmp_path, "rb")
    with pytest.raises(json.JSONDecodeError) as json_error:
        json.loads("{")
    with pytest.raises(UnicodeDecodeError) as unicode_error:
        b"\xff".decode("utf-8")
    for raised, fragment in [
        (sqlite_error, "sqlite3"),
        (zstd_error, "zstandard"),
        (os_error, str(tmp_path)),
        (json_error, "JSON"),
        (unicode_error, "UTF-8"),
    ]:
        mapped = from_library_error(raised.value)
        assert isinstance(mapped, GptwoError) and mapped.code == 2 and fragment in mapped.what and mapped.fix
    assert from_library_error(KeyError("x")) is None and from_library_error(ZeroDivisionError()) is None


# ---------------------------------------------------------------- optional extras (issue 9, item 4)
EXTRAS = [
    ("serve", ["serve", "--model", "model"], "fastapi", "gptwo serve needs FastAPI and uvicorn", "gptwo[serve]"),
    (
        "harness",
        ["eval", "harness", "run", "--tasks", "x"],
        "lm_eval",
        "gptwo eval harness needs lm-evaluation-harness",
        "gptwo[eval]",
    ),
    (
        "zst",
        ["prepare", "whole.jsonl.zst", "--out", "new_data", "--quiet"],
        "zstandard",
        "whole.jsonl.zst needs zstandard",
        "gptwo[data]",
    ),
    (
        "parquet",
        ["prepare", "x.parquet", "--out", "new_data", "--quiet"],
        "pyarrow",
        "x.parquet needs pyarrow",
        "gptwo[data]",
    ),
    (
        "hf",
        ["prepare", "hf:someone/corpus", "--out", "new_data", "--quiet"],
        "datasets",
        "needs Hugging Face datasets",
        "gptwo[data]",
    ),
    (
        "webtext",
        ["webtext", "urls", "whole.jsonl.zst", "--out", "urls.jsonl.zst", "--workers", "1"],
        "zstandard",
        "needs zstandard",
        "gptwo[webtext]",
    ),
]


@pytest.mark.parametrize("argv,module,what,extra", [e[1:] for e in EXTRAS], ids=[e[0] for e in EXTRAS])
def test_a_missing_extra_names_it(argv, module, what, extra, world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    _write(os.path.join(world, "x.parquet"), b"PAR1")
    users = (
        module,
        "gptwo.serve",
        "gptwo.eval.harness",
        "gptwo.webtext",
    )  # gptwo modules that import an extra when loaded
    for name in [m for m in sys.modules if any(m == u or m.startswith(u + ".") for u in users)]:
        monkeypatch.delitem(sys.modules, name)  # so the import runs again, here, and fails
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and what in err[-1] and f"pip install '{extra}'" in err[-1], err
    assert not os.path.exists(os.path.join(world, "new_data"))
