"""RUN/loss.png: its title names the run, the steps done and the last validation bits/byte."""

from __future__ import annotations

import json

from PIL import Image

from gptwo.train.metrics import loss_title, plot_losses


def test_loss_png_is_titled_with_the_run_its_steps_and_its_validation_bits_per_byte(tmp_path):
    run = tmp_path / "tiny-run"
    run.mkdir()
    rows = [{"step": s, "loss": 6.0 - s / 100} for s in range(10, 310, 10)]
    rows += [{"step": 150, "val_loss": 4.8, "val_bpb": 2.1234}, {"step": 300, "val_loss": 3.9, "val_bpb": 1.7214}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_losses(str(run / "metrics.jsonl"), str(run / "loss.png"))
    with Image.open(run / "loss.png") as image:
        assert image.format == "PNG" and image.text["Title"] == "tiny-run · 300 steps · validation 1.721 bits/byte"

    assert loss_title("run", [{"step": 20, "loss": 5.0}]) == "run · 20 steps"  # no validation yet
    assert loss_title("run", []) == "run"
