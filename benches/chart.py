"""One PNG per run: the latency distributions each scenario recorded, ours beside its baselines.

Every row whose unit is milliseconds and that kept its samples gets a panel with empirical CDFs on a
log time axis: ours as a solid line, each baseline (one per row of the same name) dashed. A baseline
known only by its percentiles (the isolation cost that the Rust example prints) is drawn as vertical
lines at its p50 (dashed) and p99 (dotted). A curve further left is faster; a flatter, longer tail to
the right is a worse p99.
"""

from __future__ import annotations

import math
import textwrap
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .common import Result, percentile

MIN_SAMPLES = 5
"""Fewer samples than this are drawn as percentile lines, not as a curve."""

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


@dataclass
class Panel:
    name: str
    ours: list[float]
    baselines: list[tuple[str, list[float], float | None, float | None]] = field(default_factory=list)
    """(label, samples, p50, p99)"""


def panels(results: list[Result]) -> list[Panel]:
    """Latency rows grouped by name, in report order."""
    found: dict[str, Panel] = {}
    for r in results:
        if not r.unit.startswith("ms") or not r.samples or not r.samples.get("ours"):
            continue
        panel = found.setdefault(r.name, Panel(r.name, r.samples["ours"]))
        base = r.samples.get("baseline") or []
        if base or r.baseline is not None:
            p99 = r.extra.get("baseline_p99") if isinstance(r.extra.get("baseline_p99"), float | int) else None
            panel.baselines.append((r.baseline_name, base, r.baseline, p99))
    return list(found.values())


def _short(label: str, width: int = 95) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def write_chart(results: list[Result], path: Path, title: str) -> Path | None:
    """Write the PNG; returns its path, or None (with a printed reason) when there is nothing to draw or
    matplotlib is missing. Never raises: a chart is not worth failing a run for."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  no chart: matplotlib is not installed (pip install -e '.[bench]' or pip install matplotlib)")
        return None
    found = panels(results)
    if not found:
        print("  no chart: no latency samples in this run")
        return None
    try:
        cols = 2 if len(found) > 1 else 1
        rows = math.ceil(len(found) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 4.6 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, found, strict=False):
            _draw(ax, panel)
        for ax in list(axes.flat)[len(found) :]:
            ax.axis("off")
        fig.suptitle(f"{title}: latency distributions (empirical CDF, log time axis)", fontsize=12)
        fig.tight_layout(rect=(0, 0, 1, 0.98))
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception:
        traceback.print_exc()
        print("  no chart: drawing it failed (the report above is complete)")
        return None
    return path


def _draw(ax: object, panel: Panel) -> None:
    from matplotlib.axes import Axes
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    assert isinstance(ax, Axes)
    lows: list[float] = []
    _cdf(ax, panel.ours, f"ours (n={len(panel.ours)}, p50 {_ms(percentile(panel.ours, 50))})", COLORS[0], "-")
    lows.append(min(panel.ours))
    for i, (label, samples, p50, p99) in enumerate(panel.baselines, start=1):
        color = COLORS[i % len(COLORS)]
        if len(samples) >= MIN_SAMPLES:
            _cdf(ax, samples, f"{_short(label)} (p50 {_ms(percentile(samples, 50))})", color, "--")
            lows.append(min(samples))
        elif p50 is not None and p50 > 0:
            ax.axvline(p50, color=color, linestyle="--", label=f"{_short(label)}: p50 {_ms(p50)}")
            lows.append(p50)
            if p99 is not None and p99 > 0:
                ax.axvline(p99, color=color, linestyle=":", label=f"… its p99 {_ms(p99)}")
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    span = hi / lo if lo > 0 else 1000.0
    subs = (1.0, 2.0, 5.0) if span > 100 else (1.0, 2.0, 3.0, 5.0, 7.0) if span > 10 else tuple(range(1, 10))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("milliseconds (log scale)", fontsize=8)
    ax.set_ylabel("fraction of samples ≤ x", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="both", alpha=0.25)
    ax.set_title("\n".join(textwrap.wrap(panel.name, 70)), fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=1, frameon=False)


def _cdf(ax: object, samples: list[float], label: str, color: str, style: str) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    xs = sorted(max(x, 1e-4) for x in samples)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", color=color, linestyle=style, linewidth=1.4, label=label)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} ms" if value < 100 else f"{value:,.0f} ms"
