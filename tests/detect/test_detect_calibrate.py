"""Calibration arithmetic against direct computations, and `gptwo detect calibrate` end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from detect_testing import save_tiny

from gptwo.cli import main
from gptwo.detect.calibrate import auroc, evaluate, roc_curve, threshold_at_fpr, tpr_at


def direct_auroc(pos: list[float], neg: list[float]) -> float:
    """Every (generated, human) pair: 1 when the generated text scores higher, 1/2 on a tie."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_separable_scores_give_auroc_one_and_full_tpr_at_one_percent_fpr():
    rng = random.Random(0)
    human = [{"fast_detectgpt": rng.uniform(-5, -1), "log_rank": rng.uniform(2, 3)} for _ in range(300)]
    generated = [{"fast_detectgpt": rng.uniform(0, 4), "log_rank": rng.uniform(0, 1)} for _ in range(200)]
    report = evaluate(generated, human, max_fpr=0.01)
    for name in ("fast_detectgpt", "log_rank"):  # log_rank points down: smaller means generated
        assert report[name]["auroc"] == 1.0
        assert report[name]["tpr"] == 1.0 and report[name]["fpr"] <= 0.01


def test_auroc_matches_the_pairwise_count_with_ties():
    rng = random.Random(1)
    for _ in range(20):
        pos = [rng.choice([0.0, 0.5, 1.0, rng.gauss(0.5, 1)]) for _ in range(rng.randint(1, 40))]
        neg = [rng.choice([0.0, 0.5, rng.gauss(0, 1)]) for _ in range(rng.randint(1, 40))]
        assert auroc(pos, neg) == pytest.approx(direct_auroc(pos, neg), abs=1e-12)
        fpr, tpr = roc_curve(pos, neg)  # the area under the step-free ROC polyline is the same number
        assert float(torch.trapezoid(torch.tensor(tpr), torch.tensor(fpr))) == pytest.approx(
            direct_auroc(pos, neg), abs=1e-9
        )


def test_threshold_keeps_the_false_positive_budget():
    rng = random.Random(2)
    neg = [rng.gauss(0, 1) for _ in range(1000)]
    for budget in (0.0, 0.01, 0.05, 0.5):
        t = threshold_at_fpr(neg, budget)
        assert tpr_at(neg, t) <= budget + 1e-12
        assert tpr_at(neg, t - 1e-9) > budget or t == min(neg)  # the lowest such threshold


def test_calibrate_saves_a_threshold_that_detect_then_uses(tmp_path, capsys):
    model_dir = save_tiny(str(tmp_path / "model"), block_size=128)
    from gptwo.weights import load_model

    model, tok = load_model(model_dir, device="cpu")
    (tmp_path / "human").mkdir()
    (tmp_path / "generated").mkdir()
    rng = random.Random(3)
    words = "the a cat dog house river stone light quick slow under over through with from green blue".split()
    prompts = torch.tensor(
        [tok.encode(" ".join(rng.choice(words) for _ in range(3))) for _ in range(5)]
    )  # 3 one-token words each
    greedy = model.generate(prompts, 24, top_k=1)  # the model's own greedy text: every token rank 1
    for i in range(5):
        (tmp_path / "human" / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(24)))
        (tmp_path / "generated" / f"{i}.txt").write_text(tok.decode(greedy[i].tolist()))
    (tmp_path / "human" / "short.txt").write_text("too short")
    code = main(
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
            "--detector",
            "fast_detectgpt",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == {"human": 5, "generated": 5}
    assert report["statistics"]["fast_detectgpt"]["auroc"] == 1.0 and report["statistics"]["log_rank"]["auroc"] == 1.0
    saved = json.loads((tmp_path / "model" / "detect-calibration.json").read_text())
    assert (
        saved["detector"] == "fast_detectgpt"
        and saved["threshold"] == report["statistics"]["fast_detectgpt"]["threshold"]
    )
    assert (tmp_path / "model" / "detect-calibration-roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert (
        main(
            [
                "detect",
                "--model",
                model_dir,
                "--device",
                "cpu",
                "--json",
                str(tmp_path / "human" / "0.txt"),
                str(tmp_path / "generated" / "0.txt"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["verdict"] for r in rows] == ["human", "generated"] and all(r["calibrated"] for r in rows)
    assert rows[0]["score"] == rows[0]["scores"]["fast_detectgpt"] and rows[0]["threshold"] == saved["threshold"]


def test_calibration_says_what_it_was_fitted_for_and_pools_one_set_per_setting(tmp_path, capsys):
    """A detector sees only text: a calibration fitted on top-k-40 samples records so (saved file, table, every
    verdict's rule) with the default detector beside it; --generated once per setting pools the settings."""
    from gptwo.detect.calibrate import _rule_text, describe_setting

    model_dir = save_tiny(str(tmp_path / "model"), block_size=128)
    from gptwo.weights import load_model

    model, tok = load_model(model_dir, device="cpu")
    rng = random.Random(4)
    words = "the a cat dog house river stone light quick slow under over through with from green blue".split()
    prompts = torch.tensor([tok.encode(" ".join(rng.choice(words) for _ in range(3))) for _ in range(6)])
    greedy = model.generate(prompts, 24, top_k=1)
    for name, setting in (("topk", {"temperature": 1.0, "top_k": 40, "top_p": None}), ("pure", None)):
        for kind in ("human", "generated"):
            (tmp_path / name / kind).mkdir(parents=True)
        for i in range(6):
            (tmp_path / name / "human" / f"{i:05d}.txt").write_text(" ".join(rng.choice(words) for _ in range(24)))
            (tmp_path / name / "generated" / f"{i:05d}.txt").write_text(tok.decode(greedy[i].tolist()))
        if setting:
            (tmp_path / name / "sample.json").write_text(json.dumps({**setting, "documents": list(range(6))}))
    args = ["detect", "calibrate", "--model", model_dir, "--human", str(tmp_path / "topk" / "human")]
    common = ["--min-tokens", "16", "--device", "cpu", "--lexicon", "none", "--folds", "3"]
    assert main([*args, "--generated", str(tmp_path / "topk" / "generated"), *common]) == 0
    table = capsys.readouterr().out
    assert "fitted for: samples at temperature 1, top-k 40." in table and "may be called human" in table
    log_rank = next(line for line in table.splitlines() if line.startswith("log_rank"))
    assert "  < " in log_rank and "  < -" not in log_rank  # a statistic that falls for generated text: its own sign
    assert "default" in table and "fast_detectgpt > 1 (uncalibrated" in table
    saved = json.loads((tmp_path / "model" / "detect-calibration.json").read_text())
    assert saved["fitted_for"] == "samples at temperature 1, top-k 40"
    assert saved["sampling"] == [{"temperature": 1.0, "top_k": 40, "top_p": None}]
    assert set(saved["default_detector"]) == {"rule", "tpr", "fpr"}

    assert (
        main(["detect", "--model", model_dir, "--device", "cpu", str(tmp_path / "pure" / "generated" / "00000.txt")])
        == 0
    )
    assert "calibrated for samples at temperature 1, top-k 40" in capsys.readouterr().out

    both = ["--generated", str(tmp_path / "topk" / "generated"), "--generated", str(tmp_path / "pure" / "generated")]
    assert main([*args, *both, *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == {"human": 6, "generated": 12}
    assert report["fitted_for"] == (
        "samples at temperature 1, top-k 40; generated text of unknown sampling (no sample.json beside the folder)"
    )

    assert _rule_text("log_rank", -2.05) == "< 2.05" and _rule_text("fast_detectgpt", -0.5) == "> -0.5"
    assert _rule_text("classifier", -2.1972) == "> -2.197 (p > 0.1)"
    assert (
        describe_setting({"temperature": 0.8, "top_k": None, "top_p": 0.95}) == "samples at temperature 0.8, top-p 0.95"
    )
