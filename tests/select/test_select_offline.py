"""Offline selection: document scores match transformers and resume after a kill; `select filter`
keeps the asked band and its output prepares and trains; DSIR resamples toward a target."""

import json
import os
import random

import pytest
import torch
import zstandard
from select_fixtures import (
    TINY,
    clean_document,
    cli,
    is_noise,
    metrics,
    mixed_corpus,
    noise_document,
    reference_run,
    tokenizer_file,
    write_jsonl,
)

from gptwo.errors import GptwoError
from gptwo.select.offline import dsir_resample, filter_documents, kept_ids
from gptwo.select.score import score_documents
from gptwo.train.loop import run_training
from gptwo.weights import load_model


def read_zst(path: str) -> list[str]:
    with open(path, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line)["text"] for line in raw.decode().splitlines()]


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def hf_document_loss(theirs, tok, text: str) -> float:
    """Oracle: transformers' mean loss over `[eot] + tokens`, cut into windows of the context that share one token."""
    stream, block, total = [tok.eot_token, *tok.encode(text)], theirs.config.n_positions, 0.0
    for start in range(0, len(stream) - 1, block):
        window = torch.tensor([stream[start : start + block + 1]])  # labels are shifted inside transformers
        with torch.no_grad():
            total += float(
                theirs(window[:, :-1], labels=None).logits.log_softmax(-1)[0].gather(1, window[0, 1:, None]).sum()
            )
    return -total / (len(stream) - 1)


def test_score_matches_transformers_streams_and_resumes_after_a_kill(tmp_path):
    corpus, texts = mixed_corpus()
    model = reference_run()
    out = str(tmp_path / "scores.jsonl")
    result = cli("select", "score", "--model", model, corpus, "--out", out, "--batch-tokens", "300", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert [r["id"] for r in rows] == list(range(len(texts)))
    _, tok = load_model(model, device="cpu")
    assert all(r["tokens"] == len(tok.encode(texts[r["id"]])) for r in rows)
    assert rows[0]["tokens"] > 32 and rows[1]["tokens"] > 32  # several windows of the 32-token context
    from transformers import GPT2LMHeadModel

    theirs = GPT2LMHeadModel.from_pretrained(model).eval()
    for row in rows[:3]:
        assert row["loss"] == pytest.approx(hf_document_loss(theirs, tok, texts[row["id"]]), abs=1e-5)
    # a kill leaves complete lines and perhaps half a line: rerunning continues after the last complete one
    with open(out, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    with open(out, "wb") as f:
        f.write(b"".join(lines[:7]) + lines[7][:10])
    assert score_documents(model, [corpus], out, batch_tokens=300, progress=False) == len(texts) - 7
    resumed = read_rows(out)
    assert [r["id"] for r in resumed] == [r["id"] for r in rows]
    assert all(a["loss"] == pytest.approx(b["loss"], abs=1e-5) for a, b in zip(rows, resumed))


def test_filter_keeps_the_low_loss_band_and_its_output_prepares_and_trains(tmp_path):
    corpus, texts = mixed_corpus()
    scores, kept = str(tmp_path / "scores.jsonl"), str(tmp_path / "kept.jsonl.zst")
    score_documents(reference_run(), [corpus], scores, reference=reference_run(), progress=False)
    rows = read_rows(scores)
    assert all(r["reducible"] == pytest.approx(0.0, abs=1e-6) for r in rows)  # a model against itself
    result = cli("select", "filter", corpus, "--scores", scores, "--by", "loss", "--keep", "0.5", "--out", kept)
    assert result.returncode == 0, result.stderr
    lowest = sorted(rows, key=lambda r: r["loss"])[: round(len(rows) / 2)]
    assert read_zst(kept) == [texts[i] for i in sorted(r["id"] for r in lowest)]  # the lowest-loss half, in input order
    assert not any(is_noise(t) for t in read_zst(kept))  # the reference never saw the planted noise: high loss
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    result = cli(
        "prepare",
        kept,
        "--out",
        data,
        "--tokenizer",
        tokenizer_file(),
        "--val-fraction",
        "0.2",
        "--quiet",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    run_training(data, run, overrides=TINY + ["max_steps=3"], progress=False)
    assert [r["step"] for r in metrics(run) if "flops" in r] == [1, 2, 3]


def test_bands_pick_the_low_middle_and_high_scores():
    scores = {i: float(s) for i, s in enumerate([5, 1, 4, 2, 3, 9, 0, 7, 8, 6])}
    assert kept_ids(scores, 0.3, "low") == {6, 1, 3}
    assert kept_ids(scores, 0.3, "high") == {8, 5, 7}
    assert kept_ids(scores, 0.2, "middle") == {2, 0}  # scores 4 and 5 of 0..9
    with pytest.raises(GptwoError, match="--keep 1.5 is outside"):
        kept_ids(scores, 1.5, "low")


def test_filter_errors_are_one_line(tmp_path):
    corpus, _ = mixed_corpus()
    scores = str(tmp_path / "scores.jsonl")
    score_documents(reference_run(), [corpus], scores, progress=False)
    result = cli(
        "select",
        "filter",
        corpus,
        "--scores",
        scores,
        "--by",
        "reducible",
        "--keep",
        "0.5",
        "--out",
        str(tmp_path / "k.jsonl.zst"),
    )
    assert (
        result.returncode == 2
        and result.stderr.startswith("error: ")
        and "--reference" in result.stderr
        and "Traceback" not in result.stderr
    )
    other = write_jsonl(str(tmp_path / "other.jsonl"), ["just one document"])
    with pytest.raises(GptwoError, match="score the same inputs"):
        filter_documents([other], scores, str(tmp_path / "k.jsonl.zst"), keep=0.5)
    assert not os.path.exists(tmp_path / "k.jsonl.zst")  # nothing half-written
    with pytest.raises(GptwoError, match="holds 60 rows but these inputs only 1 documents"):
        score_documents(reference_run(), [other], scores, progress=False)  # resuming someone else's scores


def test_dsir_resamples_toward_the_target(tmp_path):
    rng = random.Random(5)
    corpus, texts = mixed_corpus()
    target = write_jsonl(str(tmp_path / "target.jsonl"), [clean_document(rng) for _ in range(10)])
    out = str(tmp_path / "dsir.jsonl.zst")
    result = dsir_resample([corpus], [target], out, keep=0.4, buckets=4096)
    kept = read_zst(out)
    assert result["kept"] == len(kept) == round(0.4 * len(texts))
    assert sum(map(is_noise, kept)) == 0 < sum(map(is_noise, texts))
    noisy_target = write_jsonl(str(tmp_path / "noisy.jsonl"), [noise_document(rng) for _ in range(10)])
    result = cli("select", "dsir", corpus, "--target", noisy_target, "--keep", "0.3", "--out", out)
    assert result.returncode == 0, result.stderr
    assert all(map(is_noise, read_zst(out)))
