"""RUN/metrics.jsonl (one JSON object per logged step) and the loss curve drawn from it."""

from __future__ import annotations

import io
import json
import os

from gptwo.fileio import atomic_write


class MetricsLog:
    """Appends rows to a JSON-lines file (rank 0 only); a resumed run first drops rows past its step."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep only rows up to `step` (what the checkpoint being resumed had seen)."""
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (a line cut short by a crash is skipped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Training and validation loss against step, as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(png_path, buffer.getvalue())
