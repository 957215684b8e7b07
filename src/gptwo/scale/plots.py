"""The fit's pictures: IsoFLOP curves, loss against compute with the fitted frontier, fitted against measured."""

from __future__ import annotations

import io
import math

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
    """Three panels in one PNG; `extra` are runs left out of the fit (drawn hollow, to judge the prediction).

    Sized to read with few budgets: 12-13 pt text, tick labels at 1-2-5 steps on short log axes (no overlapping
    minor labels), the budgets' legend below the panels, and a red line over them when the fit is degenerate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptwo.fileio import atomic_write

    held_out = [p for p in extra or [] if p not in points]
    everything = points + held_out
    with plt.rc_context(STYLE):
        fig, (ax_iso, ax_front, ax_fit) = plt.subplots(1, 3, figsize=(16, 5.6))
        budgets = sorted({p.get("budget") or p["flops"] for p in everything})
        colors = plt.cm.viridis(np.linspace(0, 0.85, max(1, len(budgets))))
        for budget, color in zip(budgets, colors):
            group = sorted(
                (p for p in everything if np.isclose(p.get("budget") or p["flops"], budget)), key=lambda p: p["params"]
            )
            _isoflop(ax_iso, group, report, budget, color, held_out)
            for p in group:
                ax_front.scatter(
                    p["flops"], p["loss"], s=50, color=color, facecolors="none" if p in held_out else color, zorder=3
                )
        _frontier(ax_front, everything, report)
        _fitted_vs_measured(ax_fit, points, held_out, report)
        for ax in (ax_iso, ax_front):
            _readable_log_x(ax)
        handles, labels = ax_iso.get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="lower center",
            ncol=min(len(labels), 6),
            title="budget (training FLOPs)",
            frameon=False,
        )
        bottom = 0.02 + 0.07 * math.ceil(len(labels) / 6)
        top = 0.86 if report.get("warnings") else 0.93
        fig.tight_layout(rect=(0, bottom, 1, top))
        fig.suptitle(_title(report), y=0.985)
        if report.get("warnings"):
            fig.text(0.5, 0.915, _warning_text(report), ha="center", va="center", color="#b00000", fontsize=12)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
    atomic_write(png_path, buffer.getvalue())


STYLE = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12.5,
    "xtick.labelsize": 11.5,
    "ytick.labelsize": 11.5,
    "legend.fontsize": 11.5,
    "legend.title_fontsize": 11.5,
    "figure.titlesize": 14,
    "axes.grid": True,
    "grid.alpha": 0.25,
}


def _title(report: dict) -> str:
    fit = (
        f"L(N, D) = {report['E']:.3g} + {report['A']:.3g}/N^{report['alpha']:.2f} + "
        f"{report['B']:.3g}/D^{report['beta']:.2f}"
    )
    return f"{fit}   ({report['runs']} runs, rms log residual {report['residuals']['rms_log']:.3f})"


def _warning_text(report: dict) -> str:
    head = "degenerate fit: the runs do not determine its constants" if report.get("degenerate") else "fit warning"
    more = f"  (+{len(report['warnings']) - 1} more: see the report)" if len(report["warnings"]) > 1 else ""
    return f"{head}: {report['warnings'][0]}{more}"


def _readable_log_x(ax) -> None:
    """Tick labels a short log axis can hold: decades, or 1-2-5 steps within under two decades, rotated when
    crowded; minor labels off (they overlapped with two budgets)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = ax.get_xlim()
    decades = math.log10(high / low)
    subs = (1.0,) if decades >= 2 else (1.0, 2.0, 5.0) if decades >= 0.7 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _short(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len([t for t in ax.get_xticks() if low <= t <= high]) > 6:
        for label in ax.get_xticklabels():
            label.set_rotation(30)
            label.set_horizontalalignment("right")


def _short(value: float) -> str:
    """1e5 -> '100k', 2e6 -> '2M', 3e13 -> '3e13': short tick labels."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            if value >= 1e15:
                return f"{value:.0e}".replace("e+", "e")
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _isoflop(ax, group: list[dict], report: dict, budget: float, color, held_out: list[dict]) -> None:
    """One budget's measured losses against N, and the fitted L(N, C/6N) through them."""
    ns = np.geomspace(group[0]["params"] / 1.5, group[-1]["params"] * 1.5, 60)
    ax.plot(ns, [_loss_read(report, n, budget / (6 * n)) for n in ns], color=color, lw=1.8)
    ax.scatter(
        [p["params"] for p in group],
        [p["loss"] for p in group],
        color=color,
        zorder=3,
        facecolors=["none" if p in held_out else color for p in group],
        s=50,
        label=f"C = {budget:.2g}" + (" (held out)" if group[0] in held_out else ""),
    )
    ax.set(
        xscale="log",
        xlabel="parameters N",
        ylabel="held-out loss (nats/token)",
        title="IsoFLOP curves: measured (dots), fitted (lines)",
    )


def _frontier(ax, points: list[dict], report: dict) -> None:
    flops = np.geomspace(min(p["flops"] for p in points) / 2, max(p["flops"] for p in points) * 3, 60)
    ax.plot(
        flops,
        [compute_optimal(report, c, _corpus(report))["loss"] for c in flops],
        color="black",
        lw=1.8,
        label="fitted compute-optimal frontier",
    )
    ax.set(
        xscale="log", xlabel="training FLOPs C = 6ND", ylabel="held-out loss (nats/token)", title="loss against compute"
    )
    ax.legend(loc="upper right")


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
                s=50,
                **style,
            )
    losses = [p["loss"] for p in points + held_out]
    span = [min(losses) * 0.98, max(losses) * 1.02]
    ax.plot(span, span, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="measured loss", ylabel="fitted L(N, D)", title="fitted against measured")
    ax.legend(loc="upper left")
