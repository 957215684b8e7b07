"""RUN/metrics.jsonl (one JSON object per logged step) and the loss curve drawn from it."""

from __future__ import annotations

import io
import json
import os

from gptwo.fileio import atomic_write


class MetricsLog:
    """Appends rows to a JSON-lines file (rank 0 only). Rows are never removed: a run that starts again at
    step N (resumed, or restarted before its first checkpoint) appends a `{"step": N, "restart": true}` row,
    and `read_metrics` drops the earlier rows past N (the steps trained again)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def restart(self, step: int) -> None:
        """Mark where this run starts (at `step`) in a file that already holds rows."""
        if not self.enabled or not os.path.isfile(self.path) or not os.path.getsize(self.path):
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"  # a last line cut short by a crash: the marker starts a line of its own
            f.write(("\n" if cut else "").encode() + json.dumps({"step": step, "restart": True}).encode() + b"\n")


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl as the run that wrote it last sees them: a restart at step N drops the rows
    before it past N; restart markers and lines cut short by a crash are skipped."""
    if not os.path.isfile(path):
        return []
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            if row.get("restart"):
                rows = [r for r in rows if r.get("step", 0) <= row.get("step", 0)]
                continue
            rows.append(row)
    return rows


def loss_title(run_name: str, rows: list[dict]) -> str:
    """The loss plot's title: the run folder's name, the steps done and the last validation bits/byte (if any)."""
    parts = [run_name]
    steps = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=None)
    if steps is not None:
        parts.append(f"{steps:,} steps")
    bpb = [r["val_bpb"] for r in rows if isinstance(r.get("val_bpb"), (int, float))]
    if bpb:
        parts.append(f"validation {bpb[-1]:.3f} bits/byte")
    return " · ".join(parts)


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Training and validation loss against step, as a PNG (matplotlib's Agg backend: no display needed), titled
    by loss_title (also the PNG's Title text field)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    title = loss_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))), rows)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.8)
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("step", fontsize=12)
    ax.set_ylabel("loss (nats/token)", fontsize=12)
    ax.tick_params(labelsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Title": title})
    atomic_write(png_path, buffer.getvalue())
