"""The supervised detector: logistic regression, cross-validation by document, the lexicon, save/load, and `detect`
using it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from detect_testing import save_tiny

from gptwo.cli import main
from gptwo.detect.calibrate import auroc
from gptwo.detect.classifier import Classifier, Lexicon, cross_validate, document_features, fit_logistic
from gptwo.detect.detector import Rule, judge_text, load_rule


def separable(rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    """Rows of 6 noise features, the first shifted by `shift` (a margin of 2 between the classes)."""
    x = rng.normal(size=(n, 6))
    x[:, 0] = rng.uniform(0, 1, n) + shift
    return x


def test_separable_features_give_auroc_one_on_held_out_rows():
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(6)]
    human, generated = separable(rng, 200, 0.0), separable(rng, 200, 3.0)
    model = fit_logistic(np.concatenate([human[:150], generated[:150]]), np.r_[np.zeros(150), np.ones(150)], names)
    assert auroc(model.scores(generated[150:]), model.scores(human[150:])) == 1.0


def test_the_fit_is_the_penalized_log_loss_optimum():
    """At the optimum the gradient of mean log-loss + l2·|w|², written out in numpy, vanishes."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(size=300) > 0).astype(float)
    model = fit_logistic(x, y, ["a", "b", "c", "d"], l2=0.01)
    xs = (x - x.mean(0)) / x.std(0)
    p = 1 / (1 + np.exp(-(xs @ np.array(model.weights) + model.bias)))
    grad_w = xs.T @ (p - y) / len(y) + 2 * 0.01 * np.array(model.weights)
    assert np.abs(grad_w).max() < 1e-5 and abs((p - y).mean()) < 1e-5
    assert model.scores(x) == pytest.approx(xs @ np.array(model.weights) + model.bias)


def test_cross_validation_keeps_each_document_in_one_fold():
    """A feature that only names the source document cannot help: documents never straddle train and test."""
    rng = np.random.default_rng(2)
    groups = [g for g in range(20) for _ in range(5)]
    ids = np.eye(20)[groups]  # one-hot document identity, the same for a human passage and its continuation
    labels_by_group = rng.permutation([0] * 10 + [1] * 10)
    human = np.c_[ids, rng.normal(size=(100, 1))]
    generated = np.c_[ids, rng.normal(size=(100, 1)) + 3.0]  # the real signal: the last feature
    names = [f"f{i}" for i in range(21)]
    oof_h, oof_g, sizes = cross_validate(human, generated, groups, groups, names, folds=5)
    assert [f["test"] for f in sizes] == [{"human": 20, "generated": 20}] * 5 and all(
        f["train"] == {"human": 80, "generated": 80} for f in sizes
    )
    assert auroc(oof_g, oof_h) > 0.95
    # labels that follow the document only: out-of-fold, memorizing documents is worth nothing
    x = ids[::5]
    y = labels_by_group.astype(float)
    pos, neg = x[y == 1], x[y == 0]
    oof_neg, oof_pos, _ = cross_validate(
        neg, pos, list(np.flatnonzero(y == 0)), list(np.flatnonzero(y == 1)), names[:20], folds=5
    )
    assert auroc(oof_pos, oof_neg) <= 0.75


def test_lexicon_features_against_a_direct_count():
    lexicon = Lexicon.from_texts(["the cat sat on the mat", "The dog sat"])
    assert lexicon.words == {"the": 3, "sat": 2, "cat": 1, "on": 1, "mat": 1, "dog": 1}
    got = lexicon.features("The cat flew; the zorp sat!")  # words: the cat flew the zorp sat
    assert got["lex_unseen"] == pytest.approx(2 / 6) and got["lex_rare"] == pytest.approx(
        4 / 6
    )  # counts 3,1,0,3,0,2: <3 are cat flew zorp sat
    assert got["lex_unseen_pairs"] == pytest.approx(4 / 5)  # only "the cat" was seen
    assert got["lex_log_count"] == pytest.approx(np.mean(np.log1p([3, 1, 0, 3, 0, 2])))
    assert Lexicon.from_json(lexicon.to_json()) == lexicon


def test_saved_and_loaded_classifier_scores_the_same():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 3))
    model = fit_logistic(x, (x[:, 0] > 0).astype(float), ["a", "b", "c"])
    loaded = Classifier.from_dict(json.loads(json.dumps(model.to_dict())))
    assert loaded == model
    row = {"a": 0.3, "b": -1.0, "c": 2.0}
    assert loaded.score(row) == model.score(row) == pytest.approx(float(model.scores(np.array([[0.3, -1.0, 2.0]]))[0]))


def test_calibrate_fits_the_classifier_and_detect_uses_it(tmp_path, capsys):
    model_dir = save_tiny(str(tmp_path / "model"), block_size=64)
    from gptwo.weights import load_model

    model, tok = load_model(model_dir, device="cpu")
    rng = random.Random(4)
    words = "the a cat dog house river stone light quick slow under over through with from green blue".split()
    for kind in ("human", "generated", "train"):
        (tmp_path / kind).mkdir()
    prompts = torch.tensor([tok.encode(" ".join(rng.choice(words) for _ in range(3))) for _ in range(10)])
    sampled = model.generate(
        prompts, 30, generator=torch.Generator().manual_seed(0)
    )  # the tiny model's own pure samples
    for i in range(10):
        (tmp_path / "human" / f"{i:05d}.txt").write_text(" ".join(rng.choice(words) for _ in range(24)))
        (tmp_path / "generated" / f"{i:05d}.txt").write_text(tok.decode(sampled[i].tolist()))
    (tmp_path / "train" / "words.txt").write_text(" ".join(words * 3))
    assert (
        main(
            [
                "detect",
                "calibrate",
                "--model",
                model_dir,
                "--human",
                str(tmp_path / "human"),
                "--generated",
                str(tmp_path / "generated"),
                "--min-tokens",
                "16",
                "--device",
                "cpu",
                "--lexicon",
                str(tmp_path / "train"),
                "--folds",
                "5",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["detector"] == "classifier" and report["lexicon"] == "detect-calibration-lexicon.json"
    folds = report["classifier_evaluation"]["folds"]
    assert (
        len(folds) == 5
        and sum(f["test"]["human"] for f in folds) == 10
        and all(f["train"]["human"] == 8 for f in folds)
    )
    assert (
        report["statistics"]["classifier"]["auroc"] == 1.0
    )  # out of fold: random words vs a random model's samples are far apart

    rule = load_rule(model_dir)
    assert rule.detector == "classifier" and rule.calibrated and rule.lexicon.words["cat"] == 3
    text = (tmp_path / "generated" / "00003.txt").read_text()
    doc = judge_text(model, tok, text, "g", rule)
    expected = Classifier.from_dict(report["classifier"]).score(document_features(doc.table, text, rule.lexicon))
    assert doc.score == doc.scores["classifier"] == pytest.approx(expected, abs=1e-9)

    assert (
        main(
            [
                "detect",
                "--model",
                model_dir,
                "--device",
                "cpu",
                "--json",
                str(tmp_path / "human" / "00000.txt"),
                str(tmp_path / "generated" / "00003.txt"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["detector"] for r in rows] == ["classifier", "classifier"] and all(r["calibrated"] for r in rows)
    assert rows[1]["score"] == pytest.approx(doc.score) and rows[1]["verdict"] == (
        "generated" if doc.score > report["threshold"] else "human"
    )
    assert rows[0]["verdict"] == "human"


def test_without_a_calibration_the_verdict_comes_from_fast_detectgpt(tmp_path, capsys):
    model_dir = save_tiny(str(tmp_path / "model"), block_size=64)
    (tmp_path / "a.txt").write_text("the cat sat on the mat and the dog sat under the green light " * 3)
    assert main(["detect", "--model", model_dir, "--device", "cpu", "--json", str(tmp_path / "a.txt")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["detector"] == "fast_detectgpt" and not row["calibrated"] and "classifier" not in row["scores"]
    assert Rule().detector == "fast_detectgpt"
