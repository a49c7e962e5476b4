"""Aggregation of per-image scores and the written report (README.md, index.html, plots, image grids)."""

from evalkit.reporting.aggregate import (
    bootstrap_ci,
    failures,
    paired_difference,
    relative_overhead,
    split_set_level,
    summarize,
    summarize_sets,
)
from evalkit.reporting.render import write_report

__all__ = [
    "bootstrap_ci", "failures", "paired_difference", "relative_overhead", "split_set_level", "summarize",
    "summarize_sets", "write_report",
]
