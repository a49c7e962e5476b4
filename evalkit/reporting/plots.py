"""The report's two plots that show differences: a forest plot of paired differences from the baseline, and each
method's quality against its seconds per image. Both label every point or row on the axes themselves (no legend to
hide anything behind) and fit their axes to the data, so a difference of 0.01 is as visible as one of 10.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.ticker import MaxNLocator

from evalkit.store import atomic_write_bytes

BETTER, WORSE, UNDECIDED = "#1a7f37", "#c0392b", "#555555"
_FOREST_PANELS_PER_ROW = 4
_COMPUTE_PANELS_PER_ROW = 3
# Seconds spanning more than this factor are drawn on a log axis, where a method 10x slower still leaves the fast
# ones apart.
_LOG_SECONDS_RATIO = 8.0


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval; low and high are NaN where there is no interval (one value per set)."""

    mean: float
    low: float
    high: float

    def errors(self) -> list[float]:
        """Distances to the interval's ends, for matplotlib's error bars (0 without an interval)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return [0.0, 0.0]
        return [max(self.mean - self.low, 0.0), max(self.high - self.mean, 0.0)]


@dataclass(frozen=True)
class Panel:
    """One metric: its axis title, whether higher is better (None: unknown) and an estimate per row label."""

    title: str
    higher_is_better: bool | None
    estimates: dict[str, Estimate]


def save_figure(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def panel_grid(count: int, per_row: int, panel_size: tuple[float, float], sharey: bool = False):
    columns = min(count, per_row)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, sharey=sharey)
    for unused in axes.flat[count:]:
        unused.set_visible(False)
    return figure, list(axes.flat[:count])


def _fit(axis_limits, values: Sequence[float], include_zero: bool) -> None:
    """Limits around the finite `values` (and 0) with a margin; a flat range gets a small symmetric one."""
    finite = [value for value in values if math.isfinite(value)] + ([0.0] if include_zero else [])
    if not finite:
        return
    low, high = min(finite), max(finite)
    margin = 0.08 * (high - low) if high > low else max(abs(high), 1.0) * 0.05
    axis_limits(low - margin, high + margin)


def _verdict_colour(estimate: Estimate, higher_is_better: bool | None) -> str:
    """Green where the interval lies wholly on the better side of zero, red wholly on the worse side."""
    if higher_is_better is None or math.isnan(estimate.low):
        return UNDECIDED
    if estimate.low > 0 or estimate.high < 0:
        return BETTER if (estimate.low > 0) == higher_is_better else WORSE
    return UNDECIDED


def forest_plot(path: Path, rows: Sequence[str], panels: Sequence[Panel], baseline: str) -> None:
    """One panel per metric: each row's paired difference from the baseline with its interval, and the zero line.
    Rows (methods) read top to bottom in the order given."""
    figure, axes_list = panel_grid(len(panels), _FOREST_PANELS_PER_ROW, (3.2, 0.9 + 0.32 * len(rows)), sharey=True)
    positions = np.arange(len(rows))[::-1]
    for axes, panel in zip(axes_list, panels):
        bounds = []
        for position, row in zip(positions, rows):
            estimate = panel.estimates.get(row)
            if estimate is None or math.isnan(estimate.mean):
                continue
            errors = np.array(estimate.errors()).reshape(2, 1)
            colour = _verdict_colour(estimate, panel.higher_is_better)
            axes.errorbar(estimate.mean, position, xerr=errors, fmt="o", color=colour, capsize=3, markersize=4)
            bounds += [estimate.mean - errors[0, 0], estimate.mean + errors[1, 0]]
        axes.axvline(0.0, color="black", linewidth=0.8)
        _fit(axes.set_xlim, bounds, include_zero=True)
        axes.set_title(panel.title, fontsize=9)
        better = {True: " (→ better)", False: " (← better)", None: ""}[panel.higher_is_better]
        axes.set_xlabel(f"difference vs {baseline}{better}", fontsize=8)
        axes.xaxis.set_major_locator(MaxNLocator(nbins=4))  # a narrow panel has room for few tick labels
        axes.tick_params(labelsize=8)
        axes.grid(axis="x", color="#dddddd", linewidth=0.5)
    axes_list[0].set_yticks(positions, rows)
    axes_list[0].set_ylim(-0.6, len(rows) - 0.4)
    save_figure(figure, path)


def _spread_labels(figure: Figure, labels_per_axes: list[list[Annotation]]) -> None:
    """Moves point labels up, in display pixels, until no two of one panel overlap, so each stays readable."""
    figure.canvas.draw()  # text extents need a laid-out figure
    renderer = figure.canvas.get_renderer()
    for labels in labels_per_axes:
        placed = []
        for label in sorted(labels, key=lambda text: text.get_window_extent(renderer).y0):
            box = label.get_window_extent(renderer)
            shift = 0.0
            for other in sorted(placed, key=lambda other_box: other_box.y0):
                if box.translated(0, shift).overlaps(other):
                    shift = other.y1 - box.y0 + 1.0
            if shift:
                x_points, y_points = label.xyann
                label.xyann = (x_points, y_points + shift * 72.0 / figure.dpi)
            placed.append(box.translated(0, shift))


def compute_plot(
    path: Path, seconds: dict[str, Estimate], panels: Sequence[Panel], colours: dict[str, str],
    seed_spending: Sequence[str],
) -> None:
    """One panel per metric: each method's mean against its mean seconds per image, both with intervals, every point
    labelled beside it. `seed_spending`: the methods that spend compute on more seeds of plain sampling (the
    baseline and best-of-n variants), joined by a dashed line in order of seconds, the curve the others must beat."""
    figure, axes_list = panel_grid(len(panels), _COMPUTE_PANELS_PER_ROW, (4.2, 3.4))
    all_seconds = [estimate.mean for estimate in seconds.values() if estimate.mean > 0]
    log_seconds = bool(all_seconds) and max(all_seconds) / min(all_seconds) > _LOG_SECONDS_RATIO
    labels_per_axes = []
    for axes, panel in zip(axes_list, panels):
        points = [(row, seconds[row], estimate) for row, estimate in panel.estimates.items()
                  if row in seconds and not math.isnan(estimate.mean) and not math.isnan(seconds[row].mean)]
        curve = sorted((time.mean, quality.mean) for row, time, quality in points if row in seed_spending)
        if len(curve) > 1:
            axes.plot(*zip(*curve), linestyle="--", color="#999999", linewidth=1, zorder=1)
        labels = []
        for row, time, quality in points:
            axes.errorbar(time.mean, quality.mean, xerr=np.array(time.errors()).reshape(2, 1),
                          yerr=np.array(quality.errors()).reshape(2, 1), fmt="o", color=colours[row], capsize=3,
                          markersize=5, zorder=2)
            labels.append(axes.annotate(row, (time.mean, quality.mean), xytext=(7, 0), textcoords="offset points",
                                        va="center", fontsize=8, color=colours[row], zorder=3,
                                        # readable where it crosses another method's error bar
                                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                                              "alpha": 0.8},
                                        arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "linewidth": 0.5}))
        labels_per_axes.append(labels)
        if log_seconds:
            axes.set_xscale("log")
        else:
            _fit(axes.set_xlim, [t.mean + sign * e for _, t, _ in points for sign, e in zip((-1, 1), t.errors())],
                 include_zero=False)
        _fit(axes.set_ylim, [q.mean + sign * e for _, _, q in points for sign, e in zip((-1, 1), q.errors())],
             include_zero=False)
        axes.set_xlabel("seconds per image" + (" (log scale)" if log_seconds else ""), fontsize=8)
        axes.set_ylabel(panel.title, fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(color="#eeeeee", linewidth=0.5)
    _spread_labels(figure, labels_per_axes)
    save_figure(figure, path)
