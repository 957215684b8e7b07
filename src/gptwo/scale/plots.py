"""The fit's pictures: IsoFLOP curves, loss against compute with the fitted frontier, fitted against measured."""

from __future__ import annotations

import io

import numpy as np

from gptwo.scale.fit import compute_optimal, predict
from gptwo.scale.repeats import effective_tokens


def _corpus(report: dict) -> tuple[float, float] | None:
    """(U, R*) when the fit counts repeated tokens as effective data (--repeats), else None."""
    return (report["repeats"]["unique_tokens"], report["repeats"]["rstar"]) if "repeats" in report else None


def _loss_read(report: dict, params: float, tokens_read: float) -> float:
    """The fitted loss of N parameters reading D tokens (through D' when the fit counts repeats)."""
    corpus = _corpus(report)
    return predict(report, params, effective_tokens(tokens_read, *corpus) if corpus else tokens_read)


def plot_fit(points: list[dict], report: dict, png_path: str, extra: list[dict] | None = None) -> None:
    """Three panels in one PNG; `extra` are runs left out of the fit (drawn hollow, to judge the prediction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptwo.fileio import atomic_write

    held_out = [p for p in extra or [] if p not in points]
    everything = points + held_out
    fig, (ax_iso, ax_front, ax_fit) = plt.subplots(1, 3, figsize=(15, 4.6))
    budgets = sorted({p.get("budget") or p["flops"] for p in everything})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(budgets))))
    for budget, color in zip(budgets, colors):
        group = sorted(
            (p for p in everything if np.isclose(p.get("budget") or p["flops"], budget)), key=lambda p: p["params"]
        )
        _isoflop(ax_iso, group, report, budget, color, held_out)
        for p in group:
            ax_front.scatter(
                p["flops"], p["loss"], color=color, facecolors="none" if p in held_out else color, zorder=3
            )
    _frontier(ax_front, everything, report)
    _fitted_vs_measured(ax_fit, points, held_out, report)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write(png_path, buffer.getvalue())


def _isoflop(ax, group: list[dict], report: dict, budget: float, color, held_out: list[dict]) -> None:
    """One budget's measured losses against N, and the fitted L(N, C/6N) through them."""
    from matplotlib.ticker import NullFormatter

    ns = np.geomspace(group[0]["params"] / 1.5, group[-1]["params"] * 1.5, 60)
    ax.plot(ns, [_loss_read(report, n, budget / (6 * n)) for n in ns], color=color, lw=1)
    ax.scatter(
        [p["params"] for p in group],
        [p["loss"] for p in group],
        color=color,
        zorder=3,
        facecolors=["none" if p in held_out else color for p in group],
        label=f"C = {budget:.2g}" + (" (held out)" if group[0] in held_out else ""),
    )
    ax.set(
        xscale="log",
        xlabel="parameters N",
        ylabel="held-out loss (nats/token)",
        title="IsoFLOP curves: measured (dots), fitted (lines)",
    )
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)


def _frontier(ax, points: list[dict], report: dict) -> None:
    flops = np.geomspace(min(p["flops"] for p in points) / 2, max(p["flops"] for p in points) * 3, 60)
    ax.plot(
        flops,
        [compute_optimal(report, c, _corpus(report))["loss"] for c in flops],
        color="black",
        lw=1.2,
        label="fitted compute-optimal frontier",
    )
    ax.set(
        xscale="log", xlabel="training FLOPs C = 6ND", ylabel="held-out loss (nats/token)", title="loss against compute"
    )
    ax.legend(fontsize=7)


def _fitted_vs_measured(ax, points: list[dict], held_out: list[dict], report: dict) -> None:
    for group, style, label in (
        (points, dict(color="C0"), "fitted runs"),
        (held_out, dict(color="C3", facecolors="none"), "held out (predicted)"),
    ):
        if group:
            ax.scatter(
                [p["loss"] for p in group],
                [predict(report, p["params"], p["tokens"]) for p in group],
                label=label,
                zorder=3,
                **style,
            )
    losses = [p["loss"] for p in points + held_out]
    span = [min(losses) * 0.98, max(losses) * 1.02]
    ax.plot(span, span, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="measured loss", ylabel="fitted L(N, D)", title="fitted against measured")
    ax.legend(fontsize=7)
