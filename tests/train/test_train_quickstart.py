"""The quickstart's whole pipeline (built-in corpus → BPE → shards → training → report) at a tiny size."""

import os

from train_fixtures import cli, metrics

from gptwo.train.quickstart import PROMPTS, quickstart


def test_quickstart_tiny_end_to_end(tmp_path, capsys):
    run = str(tmp_path / "quickstart")
    summary = quickstart(run, tiny=True, progress=False)
    assert summary["step"] == 20 and 0 < summary["val_bpb"] < 8  # a 512-token BPE: ~2.6 bytes per token
    assert set(summary["samples"]) == set(PROMPTS)
    out = capsys.readouterr().out
    assert "bits per byte" in out and f"gptwo generate --model {run}" in out
    # the honest summary: steps done, dtype and why, threads, tokens/s
    done = next(line for line in out.splitlines() if line.startswith("trained "))
    assert done.startswith("trained 20 steps in ") and "float32 (no native bf16 here)" in done
    assert f"{summary['threads']} threads" in done and summary["tokens_per_s"] > 0 and summary["planned_steps"] == 20
    assert os.path.isfile(os.path.join(run, "data", "meta.json")) and os.path.isfile(os.path.join(run, "loss.png"))
    assert any("val_bpb" in row for row in metrics(run))
    # the README's next line works on the run folder
    result = cli("generate", "--model", run, "--max-new-tokens", "8", "--seed", "1", "The")
    assert result.returncode == 0 and result.stdout
    # running it again continues the finished run instead of failing
    again = quickstart(run, tiny=True, progress=False)
    assert again["step"] == 20 and again["val_bpb"] == summary["val_bpb"]
