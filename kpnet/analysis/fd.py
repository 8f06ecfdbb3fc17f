"""Side-by-side false-discovery rates of several detectors (the triplet paper's Table 3):
differences against the first, and a grouped bar chart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kpnet.evaluation import FD_KEYS


def fd_deltas(rates: Sequence[Mapping[str, float | None]]) -> list[dict[str, float | None]]:
    """Each row's FD rates minus the first row's (None where either is undefined)."""
    if not rates:
        return []
    base = rates[0]
    return [{k: (r[k] - base[k]) if r[k] is not None and base[k] is not None else None for k in FD_KEYS}
            for r in rates]


def plot_fd_bars(names: Sequence[str], rates: Sequence[Mapping[str, float | None]], path: str | Path) -> Path:
    """A grouped bar chart of FD, FD5, FD25, FD50, FD_S, FD_M, FD_L (in %), one bar per detector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kpnet.io import atomic_savefig

    x = np.arange(len(FD_KEYS))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(FD_KEYS) + 0.4 * len(names)), 4.5))
    for i, (name, r) in enumerate(zip(names, rates, strict=True)):
        values = [100.0 * r[k] if r[k] is not None else np.nan for k in FD_KEYS]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(x, list(FD_KEYS))
    ax.set_ylabel("false-discovery rate (%)")
    ax.set_title("False-discovery rates, IoU 0.05:0.05:0.5, maxDets 100 (lower is better)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = atomic_savefig(path, fig, dpi=100)
    plt.close(fig)
    return written
