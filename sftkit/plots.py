"""Figures of overlap statistics: a heatmap for a pairwise matrix (paper Fig. 3), grouped bars for
language-vs-task comparisons per method (Fig. 2) and for a pair's per-layer / per-module breakdown.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend state), so this
works headless and inside other programs that use matplotlib. Files are written atomically.
matplotlib is imported inside the drawing functions: `sftkit overlap` uses this module's formatting
for its tables and needs matplotlib (≈ 0.5 s to import) only with --plot.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sftkit.errors import BadInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sftkit.overlap import MethodComparison, OverlapMatrix, PairOverlap

PERCENT_STATISTICS = ("overlap", "jaccard", "frac_of_a", "frac_of_b", "sign_agreement")
TITLES = {
    "overlap": "overlap % = shared / min(|A|, |B|)",
    "jaccard": "Jaccard % = shared / |A ∪ B|",
    "frac_of_a": "% of A (row) shared with B (column)",
    "frac_of_b": "% of B (column) shared with A (row)",
    "shared": "shared entries",
    "sign_agreement": "sign agreement % on shared entries",
    "abs_ratio": "mean |φ_A| / mean |φ_B| on shared entries",
}


def format_value(value: float | int | None, statistic: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if statistic in PERCENT_STATISTICS:
        return f"{100 * value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.2f}"


def _scaled(value: float | int | None, statistic: str) -> float:
    if value is None:
        return math.nan
    return 100.0 * value if statistic in PERCENT_STATISTICS else float(value)


def _short(labels: Sequence[str], limit: int = 24) -> list[str]:
    """Tick labels that cannot squeeze the plot away."""
    return [label if len(label) <= limit else label[: limit - 1] + "…" for label in labels]


def _axis_label(statistic: str) -> str:
    return TITLES.get(statistic, statistic)


def heatmap(
    values: Sequence[Sequence[float | int | None]],
    labels: Sequence[str],
    path: str | os.PathLike[str],
    statistic: str = "overlap",
    title: str | None = None,
    size: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """An annotated N×N heatmap (rows = A, columns = B); fractions are shown in percent."""
    import numpy as np
    from matplotlib.figure import Figure

    grid = np.array([[_scaled(v, statistic) for v in row] for row in values], dtype=float)
    count = len(labels)
    if grid.shape != (count, count):
        raise BadInputError(f"heatmap needs a {count}×{count} matrix, got {grid.shape}")
    side = max(4.0, 0.7 * count + 2.5)
    fig = Figure(figsize=size or (side + 1.0, side), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    percent = statistic in PERCENT_STATISTICS
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap="viridis",
        vmin=0.0,
        vmax=100.0 if percent else None,
    )
    fig.colorbar(image, ax=ax, label="%" if percent else statistic)
    ax.set_xticks(range(count), labels=_short(labels), rotation=45, ha="right")
    ax.set_yticks(range(count), labels=_short(labels))
    ax.set_xlabel("B")
    ax.set_ylabel("A")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(count):
        for j in range(count):
            colour = "black" if np.isfinite(grid[i, j]) and grid[i, j] > middle else "white"
            ax.text(j, i, format_value(values[i][j], statistic), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(title or _axis_label(statistic))
    return _save(fig, path)


def grouped_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | int | None]],
    path: str | os.PathLike[str],
    statistic: str = "overlap",
    title: str | None = None,
    xlabel: str | None = None,
    size: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """Bars per category, one coloured bar per series (e.g. languages × methods); a missing value leaves a gap."""
    from matplotlib.figure import Figure

    if not categories or not series:
        raise BadInputError("nothing to plot: no categories or no series")
    for name, values in series.items():
        if len(values) != len(categories):
            raise BadInputError(f"series {name!r} has {len(values)} values for {len(categories)} categories")
    width = 0.8 / len(series)
    fig = Figure(
        figsize=size or (max(6.0, 0.45 * len(categories) * len(series) + 2.0), 4.5), dpi=dpi, layout="constrained"
    )
    ax = fig.add_subplot()
    for position, (name, values) in enumerate(series.items()):
        offsets = [i - 0.4 + width * (position + 0.5) for i in range(len(categories))]
        ax.bar(offsets, [_scaled(v, statistic) for v in values], width=width, label=name)
    crowded = len(categories) > 8 or max(len(c) for c in categories) > 6
    ax.set_xticks(
        range(len(categories)),
        labels=_short(categories),
        rotation=35 if crowded else 0,
        ha="right" if crowded else "center",
    )
    ax.set_ylabel("%" if statistic in PERCENT_STATISTICS else statistic)
    if xlabel:
        ax.set_xlabel(xlabel)
    if len(series) > 1:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or _axis_label(statistic))
    return _save(fig, path)


# ------------------------------------------------------------------------ figures of overlap results
def plot_matrix(matrix: OverlapMatrix, path: str | os.PathLike[str], statistic: str = "overlap", **kwargs) -> Path:
    """Paper Fig. 3: the pairwise matrix of N SFTs."""
    return heatmap(matrix.matrix(statistic), matrix.labels, path, statistic, **kwargs)


def plot_methods(
    comparison: MethodComparison, path: str | os.PathLike[str], statistic: str = "overlap", **kwargs
) -> Path:
    """Paper Fig. 2: language-vs-task overlap, languages on the x-axis, one bar per method."""
    kwargs.setdefault("title", f"language vs task SFT: {_axis_label(statistic)}")
    return grouped_bars(comparison.languages, comparison.table(statistic), path, statistic, xlabel="language", **kwargs)


def plot_breakdown(
    pair: PairOverlap,
    path: str | os.PathLike[str],
    by: str = "layer",
    statistic: str = "overlap",
    label: str = "A vs B",
    **kwargs,
) -> Path:
    """One pair's statistic per layer or per module kind."""
    groups = pair.by(by)
    kwargs.setdefault("title", f"{label}: {_axis_label(statistic)} by {by}")
    series = {label: [counts.statistic(statistic) for _, counts in groups]}
    return grouped_bars([group for group, _ in groups], series, path, statistic, xlabel=by, **kwargs)


def check_path(path: str | os.PathLike[str]) -> Path:
    """Fail before any work when a plot cannot be written there (unknown extension, missing directory)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = Path(path)
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if target.suffix.lower().lstrip(".") not in supported:
        raise BadInputError(
            f"cannot write a plot to {target}: use one of the extensions {', '.join(sorted(supported))}"
        )
    if not target.parent.is_dir():
        raise BadInputError(f"cannot write a plot to {target}: directory {target.parent} does not exist")
    return target


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render to a temporary name next to ``path``, then rename: never a half-written image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    target = check_path(path)
    FigureCanvasAgg(fig)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(staging, format=target.suffix.lower().lstrip("."))
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return target
