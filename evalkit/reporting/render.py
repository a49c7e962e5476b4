"""Write an evaluation report: README.md and a self-contained index.html, in the order a researcher reads it.

First the headline table (one row per method, the experiment's main metrics with intervals, the paper's values
beside them, the best per column marked), then the image grids (per dataset, the prompts where the methods disagree
most first; every prompt on a grid page of the dataset), the protocol beside the paper's, plots that show
differences (paired differences from the baseline as a forest plot, quality against seconds per image), the paired
differences, compute, the paper's cells one by one, and then the detail: breakdowns per subject, per TIFA element
type and per subset in collapsible sections, failures, scorers, manifests.

Both documents are rendered from one list of sections, so they always show the same numbers in the same order.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from evalkit.reporting.aggregate import (
    OVERHEAD_METRIC,
    SECONDS_METRIC,
    failures,
    paired_difference,
    relative_overhead,
    split_set_level,
    summarize,
    summarize_sets,
)
from evalkit.reporting.completeness import Missing
from evalkit.reporting.diagnostics import diagnostics_sections
from evalkit.reporting.document import (
    MISSING,
    Block,
    Details,
    Gallery,
    JsonBlock,
    Link,
    Paragraph,
    Picture,
    Section,
    Table,
    file_stem,
    html_document,
    interval_text,
    markdown_document,
)
from evalkit.reporting.labels import VariantLabels
from evalkit.reporting.paper_table import PaperTable
from evalkit.reporting.plots import Estimate, Panel, compute_plot, forest_plot
from evalkit.reporting.protocol import DIFFERS, compare_protocol
from evalkit.sampling.method import METHODS
from evalkit.store import atomic_write_bytes

PEAK_MEMORY_METRIC = "peak_memory_mb"
# Compute metrics get their own table; the quality tables and paired differences leave them out.
COMPUTE_METRICS = (SECONDS_METRIC, PEAK_MEMORY_METRIC)
# Methods that spend their extra compute on seeds of plain sampling; with the baseline they draw the curve on the
# quality-against-compute plot that a method must beat at its seconds per image.
SEED_SPENDING_METHODS = ("best_of_n",)
GRID_CELL_PX = 192
GRIDS_INLINE = 4  # grids per dataset on the main page; the dataset's grid page has every prompt
VERIFIER_MARK = " †"  # beside a value of the metric its method selected images by


def _metric_labels(summary: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(metric, scorer) -> the metric name, plus the scorer only where several scorers give the same metric."""
    pairs = summary[["metric", "scorer"]].drop_duplicates()
    scorers_per_metric = pairs.groupby("metric")["scorer"].nunique()
    return {
        (metric, scorer): f"{metric} [{scorer}]" if scorers_per_metric[metric] > 1 else metric
        for metric, scorer in pairs.itertuples(index=False)
    }


@dataclasses.dataclass
class _Numbers:
    """What the sections read, aggregated once: per (model, dataset, variant, metric, scorer) an Estimate (the
    overhead as a fraction, under OVERHEAD_METRIC with scorer None), the paired differences, and how to name and
    judge a metric."""

    per_image: pd.DataFrame  # score rows with a prompt_id
    summary: pd.DataFrame  # summarize() and summarize_sets() rows, compute metrics included
    overhead: pd.DataFrame
    differences: pd.DataFrame  # paired differences of quality metrics
    labels: VariantLabels
    metric_labels: dict[tuple[str, str], str]
    metric_info: dict[str, bool]
    baseline: str
    headline: list[str]
    # (model, dataset, variant) -> the (metric, scorer) a selecting method (best_of_n) chose its images by
    verifiers: dict[tuple[str, str, str], tuple[str, str]]

    def __post_init__(self):
        self.estimates: dict[tuple, Estimate] = {
            (row.model, row.dataset, row.variant, row.metric, row.scorer): Estimate(row.mean, row.ci_low, row.ci_high)
            for row in self.summary.itertuples()
        }
        for row in self.overhead.itertuples():
            key = (row.model, row.dataset, row.variant, OVERHEAD_METRIC, None)
            self.estimates[key] = Estimate(row.overhead, row.ci_low, row.ci_high)
        self.difference_estimates: dict[tuple, Estimate] = {
            (row.model, row.dataset, row.variant, row.metric, row.scorer):
                Estimate(row.mean_difference, row.ci_low, row.ci_high)
            for row in self.differences.itertuples()
        }

    def datasets(self) -> list[str]:
        return sorted(set(self.summary["dataset"]))

    def verifier_mark(self, key: tuple[str, str], dataset: str, metric: str, scorer: str | None) -> str:
        """VERIFIER_MARK where the variant `key` chose its images by this very metric, else nothing."""
        return VERIFIER_MARK if self.verifiers.get((key[0], dataset, key[1])) == (metric, scorer) else ""

    def variants(self, dataset: str, frame: pd.DataFrame | None = None) -> list[tuple[str, str]]:
        """The (model, variant) keys with rows on `dataset` in `frame` (default: the summary), baseline first."""
        frame = self.summary if frame is None else frame
        rows = frame[frame["dataset"] == dataset]
        return self.labels.ordered(zip(rows["model"], rows["variant"]))

    def higher_is_better(self, metric: str) -> bool | None:
        if metric == OVERHEAD_METRIC:
            return False
        # A metric family ("detection/<subject>") is listed once, as "detection/".
        return self.metric_info.get(metric, self.metric_info.get(metric.split("/")[0] + "/"))

    def relative_to_baseline(self, metric: str) -> bool:
        """Measured against the baseline's own images or time: the baseline has no value of its own to compare."""
        return metric == OVERHEAD_METRIC or metric.endswith(f"_vs_{self.baseline}")

    def column_label(self, metric: str, scorer: str | None) -> str:
        if metric == OVERHEAD_METRIC:
            return f"overhead % vs {self.baseline}" + _arrow(False)
        return self.metric_labels.get((metric, scorer), metric) + _arrow(self.higher_is_better(metric))

    def headline_columns(self, dataset: str) -> list[tuple[str, str | None]]:
        """The headline's (metric, scorer) columns on `dataset` in the configured order: a column per scorer that
        gives the metric, or one with scorer None (the overhead, or a metric nothing has scored yet)."""
        rows = self.summary[self.summary["dataset"] == dataset]
        columns: list[tuple[str, str | None]] = []
        for metric in self.headline:
            scorers = sorted(set(rows.loc[rows["metric"] == metric, "scorer"]))
            columns += [(metric, scorer) for scorer in scorers] or [(metric, None)]
        return columns

    def headline_quality_columns(self, dataset: str) -> list[tuple[str, str]]:
        """The headline's scored quality metrics (no compute metric, no overhead) on `dataset`."""
        return [(metric, scorer) for metric, scorer in self.headline_columns(dataset)
                if scorer is not None and metric not in COMPUTE_METRICS]


def _arrow(higher_is_better: bool | None) -> str:
    return {True: " ↑", False: " ↓", None: ""}[higher_is_better]


def _estimate_text(estimate: Estimate | None, metric: str, sign: str = "") -> str:
    """Mean [interval] (`sign` "+": of a difference); the overhead in percent; a set-level value (no interval)
    alone."""
    if estimate is None or np.isnan(estimate.mean):
        return MISSING
    if metric == OVERHEAD_METRIC:
        return interval_text(100 * estimate.mean, 100 * estimate.low, 100 * estimate.high, "+", decimals=1)
    if np.isnan(estimate.low):
        return f"{estimate.mean:{sign}.3f}"
    return interval_text(estimate.mean, estimate.low, estimate.high, sign)


def _best_marks(numbers: _Numbers, metric: str, variants: Sequence[tuple[str, str]],
                estimates: Sequence[Estimate | None]) -> set[int]:
    """The indices of the best means of `estimates` (one per variant; all of them on a tie), none where the metric's
    direction is unknown; a metric measured against the baseline is compared among the other variants."""
    higher_is_better = numbers.higher_is_better(metric)
    means = {
        index: estimate.mean for index, (estimate, key) in enumerate(zip(estimates, variants))
        if estimate is not None and np.isfinite(estimate.mean)
        and not (numbers.relative_to_baseline(metric) and numbers.labels.method(*key) == numbers.baseline)
    }
    if higher_is_better is None or not means:
        return set()
    best = max(means.values()) if higher_is_better else min(means.values())
    return {index for index, mean in means.items() if mean == best}


def _paper_values(paper: PaperTable | None) -> dict[tuple, str]:
    """(dataset or None, method, metric) -> the paper's printed value; None: the cell holds for every dataset."""
    if paper is None or paper.cells is None:
        return {}
    return {
        (None if pd.isna(row.dataset) else row.dataset, row.method, row.metric): str(row.paper_text)
        for row in paper.cells.itertuples()
    }


def _headline_sections(numbers: _Numbers, paper: PaperTable | None, protocol_note: str | None) -> list[Section]:
    """Per dataset: one row per method, the headline metrics with intervals, the paper's value beside each where it
    publishes one, and the best of each column in bold."""
    published = _paper_values(paper)
    sections = []
    for dataset in numbers.datasets():
        variants = numbers.variants(dataset)
        headers, cells_by_column, bold = ["method"], [[numbers.labels.label(*key) for key in variants]], set()
        for metric, scorer in numbers.headline_columns(dataset):
            estimates = [numbers.estimates.get((model, dataset, variant, metric, scorer)) for model, variant in variants]
            bold |= {(index, len(headers)) for index in _best_marks(numbers, metric, variants, estimates)}
            headers.append(numbers.column_label(metric, scorer))
            cells_by_column.append([_estimate_text(estimate, metric) + numbers.verifier_mark(key, dataset, metric, scorer)
                                    for estimate, key in zip(estimates, variants)])
            paper_cells = [
                published.get((dataset, method, metric), published.get((None, method, metric), MISSING))
                for method in (numbers.labels.method(*key) for key in variants)
            ]
            if any(cell != MISSING for cell in paper_cells):
                headers.append(f"{metric} in the paper")
                cells_by_column.append(paper_cells)
        rows = [list(row) for row in zip(*cells_by_column)]
        sections.append(Section(f"Results: {dataset}", [Table(headers, rows, frozenset(bold))]))
    if sections:
        legend = (
            "Cells: mean [low, high], the 95% bootstrap interval over images; a set-level metric (FID) has one value "
            "per set and no interval. ↑ higher is better, ↓ lower is better; bold: the best mean of its column (for "
            f"a metric measured against {numbers.baseline}, among the other methods). The breakdowns, paired "
            "differences and plots below hold the detail."
        )
        if published:
            legend += f" 'in the paper': {paper.title}, as printed."
        if numbers.verifiers:
            legend += (f" {VERIFIER_MARK}: the metric this method chose its images by (best_of_n's verifier); its "
                       "value is selected, not an independent measurement.")
        sections[0].blocks.insert(0, Paragraph(legend))
        if protocol_note:
            sections[-1].blocks.append(Paragraph(protocol_note))
    return sections


def _disagreement(per_image: pd.DataFrame, dataset: str, metric: str) -> pd.Series:
    """Per prompt: the range (max - min) over variants of the prompt's mean `metric`."""
    rows = per_image[(per_image["dataset"] == dataset) & (per_image["metric"] == metric)]
    means = rows.groupby(["prompt_id", "model", "variant"])["value"].mean()
    return means.groupby(level="prompt_id").agg(lambda values: values.max() - values.min())


def _grid_page(out_dir: Path, stem: str, title: str, notice: str | None, sections: list[Section]) -> Link:
    """Writes grids/<stem>.html and .md (pictures relative to grids/) and returns the link to them."""
    atomic_write_bytes(out_dir / "grids" / f"{stem}.md", markdown_document(title, notice, sections).encode("utf-8"))
    atomic_write_bytes(out_dir / "grids" / f"{stem}.html", html_document(title, notice, sections).encode("utf-8"))
    return Link(title, f"grids/{stem}.html", f"grids/{stem}.md")


def _grids_section(
    out_dir: Path, numbers: _Numbers, image_paths: pd.DataFrame, records: pd.DataFrame, title: str,
    notice: str | None, max_grids: int,
) -> Section | None:
    """Per dataset, the prompts where the methods disagree most on the first headline metric, first: the top
    GRIDS_INLINE grids here, up to `max_grids` on the dataset's grid page."""
    if image_paths.empty:
        return None
    (out_dir / "grids").mkdir(exist_ok=True)
    prompts = records.drop_duplicates(["dataset", "prompt_id"]).set_index(["dataset", "prompt_id"])["prompt"]
    used_stems: set[str] = set()
    blocks: list[Block] = []
    for dataset, images in image_paths.groupby("dataset", sort=True):
        ranked_by = next((metric for metric, _ in numbers.headline_quality_columns(dataset)
                          if metric in set(numbers.per_image.loc[numbers.per_image["dataset"] == dataset, "metric"])),
                         None)
        spread = _disagreement(numbers.per_image, dataset, ranked_by) if ranked_by else pd.Series(dtype=float)
        prompt_ids = sorted(set(images["prompt_id"]),
                            key=lambda prompt_id: (-spread.get(prompt_id, -np.inf), prompt_id))
        pictures = []
        for prompt_id in prompt_ids[:max_grids]:
            stem = file_stem(f"{dataset}__{prompt_id}", used_stems)
            _draw_grid(out_dir / "grids" / f"{stem}.png", images[images["prompt_id"] == prompt_id], numbers.labels)
            caption = f"{dataset} / {prompt_id}: {prompts.get((dataset, prompt_id), '')}"
            if prompt_id in spread.index:
                caption += f" ({ranked_by} range over methods: {spread[prompt_id]:.3f})"
            pictures.append(Picture(f"{stem}.png", caption))
        order = (f"Prompts in order of how much the methods disagree: the range (max - min) over methods of the "
                 f"prompt's mean {ranked_by}, largest first." if ranked_by else "Prompts in the order of their ids.")
        shown = f" Showing {len(pictures)} of {len(prompt_ids)} prompts." if len(prompt_ids) > len(pictures) else ""
        page_title = f"{title}: image grids, {dataset}"
        link = _grid_page(out_dir, file_stem(dataset, used_stems), page_title, notice, [
            Section(f"Image grids: {dataset}", [Paragraph(order + shown), Gallery(pictures),
                                                 Link("Back to the report", "../index.html", "../README.md")]),
        ])
        inline = [Picture(f"grids/{picture.path}", picture.caption) for picture in pictures[:GRIDS_INLINE]]
        blocks += [
            Paragraph(f"{dataset}: one row per seed, one column per method. {order} The first {len(inline)} of "
                      f"{len(prompt_ids)} prompts:"),
            Gallery(inline),
            Link(f"All {len(pictures)} grids of {dataset}, in that order", link.html_path, link.markdown_path),
        ]
    return Section("Image grids", blocks)


def _protocol_section(paper: PaperTable | None, manifests: list[dict]) -> tuple[Section | None, str | None]:
    """Ours beside the paper's protocol, every difference flagged; and a one-line pointer for the headline."""
    if paper is None or not paper.protocol:
        return None, None
    rows = compare_protocol(paper.protocol, manifests)
    differing = [row for row in rows if row.status == DIFFERS]
    table = Table(
        ["item", "ours", "the paper (or its released code)", "compared", "where the paper says so, and why ours differs"],
        [[row.label, row.ours, row.paper, row.status, row.note] for row in rows],
        frozenset((index, 3) for index, row in enumerate(rows) if row.status == DIFFERS),
    )
    source = paper.protocol.get("source")
    blocks: list[Block] = [Paragraph(f"{paper.title}. Source: {source}.")] if source else []
    section = Section("Protocol: ours beside the paper's", [*blocks, table])
    pointer = (f"Our protocol differs from the paper's in {len(differing)} of {len(rows)} items "
               f"({', '.join(row.label for row in differing) or 'none'}): see 'Protocol: ours beside the paper's'.")
    return section, pointer


def _plots_section(out_dir: Path, numbers: _Numbers) -> Section | None:
    """Per dataset: the forest plot of paired differences and the quality-against-compute plot."""
    (out_dir / "plots").mkdir(exist_ok=True)
    used_stems: set[str] = set()
    pictures = []
    for dataset in numbers.datasets():
        columns = numbers.headline_quality_columns(dataset)
        compared = numbers.variants(dataset, numbers.differences)
        forest_panels = [
            Panel(numbers.column_label(metric, scorer), numbers.higher_is_better(metric), {
                numbers.labels.label(model, variant): numbers.difference_estimates[key]
                for model, variant in compared
                if (key := (model, dataset, variant, metric, scorer)) in numbers.difference_estimates
            })
            for metric, scorer in columns
        ]
        forest_panels = [panel for panel in forest_panels if panel.estimates]
        if forest_panels:
            path = f"plots/{file_stem(f'{dataset}__paired_differences', used_stems)}.png"
            rows = [numbers.labels.label(*key) for key in compared]
            forest_plot(out_dir / path, rows, forest_panels, numbers.baseline)
            pictures.append(Picture(path, (
                f"{dataset}: each method's paired difference from {numbers.baseline} (same prompt and seed) with "
                "its 95% interval, one panel per headline metric, each on its own scale. Green: the interval lies "
                "wholly on the better side of zero; red: wholly on the worse side.")))
        variants = numbers.variants(dataset)
        seconds = {numbers.labels.label(model, variant): numbers.estimates[key] for model, variant in variants
                   if (key := (model, dataset, variant, SECONDS_METRIC, _scorer_of(numbers, dataset, SECONDS_METRIC)))
                   in numbers.estimates}
        compute_panels = [
            Panel(numbers.column_label(metric, scorer), numbers.higher_is_better(metric), {
                numbers.labels.label(model, variant): numbers.estimates[key] for model, variant in variants
                if (key := (model, dataset, variant, metric, scorer)) in numbers.estimates
            })
            for metric, scorer in columns
        ]
        compute_panels = [panel for panel in compute_panels if set(panel.estimates) & set(seconds)]
        if seconds and compute_panels:
            colours = {numbers.labels.label(*key): f"C{index % 10}" for index, key in enumerate(variants)}
            seed_spending = [
                [numbers.labels.label(model, variant) for model, variant in variants if model == curve_model
                 and numbers.labels.method(model, variant) in (numbers.baseline, *SEED_SPENDING_METHODS)]
                for curve_model in sorted({model for model, _ in variants})
            ]
            path = f"plots/{file_stem(f'{dataset}__quality_vs_compute', used_stems)}.png"
            compute_plot(out_dir / path, seconds, compute_panels, colours, seed_spending)
            pictures.append(Picture(path, (
                f"{dataset}: each method's headline metric against its mean seconds per image, both with 95% "
                f"intervals. The dashed line joins {numbers.baseline} and the methods that spend their compute on "
                f"more seeds ({', '.join(SEED_SPENDING_METHODS)}) where there are any: a method above it at the "
                "same seconds per image uses its compute better.")))
    return Section("Plots", [Gallery(pictures)]) if pictures else None


def _scorer_of(numbers: _Numbers, dataset: str, metric: str) -> str | None:
    """The scorer that gives `metric` on `dataset` (compute metrics have one: the overhead scorer)."""
    rows = numbers.summary[(numbers.summary["dataset"] == dataset) & (numbers.summary["metric"] == metric)]
    return rows["scorer"].iloc[0] if len(rows) else None


def _method_by_metric_table(
    numbers: _Numbers, dataset: str, metrics: Sequence[tuple[str, str]], variants: Sequence[tuple[str, str]],
    estimates: Mapping[tuple, Estimate], mark, sign: str = "",
) -> Table:
    """Rows: metrics; columns: variants (their number stays small however many metrics a scorer breaks down into,
    so the table fits the page). `mark(metric, row_estimates)` gives the column indices to show in bold; `sign`
    "+" for differences."""
    rows, bold = [], set()
    for row_index, (metric, scorer) in enumerate(metrics):
        row_estimates = [estimates.get((model, dataset, variant, metric, scorer)) for model, variant in variants]
        rows.append([numbers.column_label(metric, scorer), *(_estimate_text(e, metric, sign) for e in row_estimates)])
        bold |= {(row_index, column + 1) for column in mark(metric, row_estimates)}
    return Table(["metric", *(numbers.labels.label(*key) for key in variants)], rows, frozenset(bold))


def _excludes_zero(row_estimates: Sequence[Estimate | None]) -> set[int]:
    return {index for index, e in enumerate(row_estimates) if e is not None and (e.low > 0 or e.high < 0)}


def _paired_section(numbers: _Numbers) -> Section | None:
    """Per dataset, a method x metric table of paired differences: the headline metrics, then every other one in a
    collapsed table."""
    if numbers.differences.empty:
        return None
    legend = (f"Mean of (method - {numbers.baseline}) over the same (prompt, seed) pairs, with a paired 95% bootstrap "
              "interval; bold where the interval excludes zero.")
    if numbers.verifiers:
        legend += f"{VERIFIER_MARK}: the metric the method chose its images by."
    blocks: list[Block] = [Paragraph(legend)]
    for dataset in numbers.datasets():
        variants = numbers.variants(dataset, numbers.differences)
        if not variants:
            continue
        headline = [column for column in numbers.headline_quality_columns(dataset)
                    if any((m, dataset, v, *column) in numbers.difference_estimates for m, v in variants)]
        rows, bold = [], set()
        for row_index, key in enumerate(variants):
            estimates = [numbers.difference_estimates.get((key[0], dataset, key[1], *column)) for column in headline]
            rows.append([numbers.labels.label(*key), *(_estimate_text(e, metric, "+") + numbers.verifier_mark(key, dataset, metric, scorer)
                                                        for e, (metric, scorer) in zip(estimates, headline))])
            bold |= {(row_index, column + 1) for column in _excludes_zero(estimates)}
        headers = ["method", *(numbers.column_label(*column) for column in headline)]
        blocks += [Paragraph(f"{dataset}:"), Table(headers, rows, frozenset(bold))]
        others = sorted({(row.metric, row.scorer) for row in numbers.differences.itertuples()
                         if row.dataset == dataset} - set(headline), key=lambda column: numbers.column_label(*column))
        if others:
            blocks.append(Details(f"{dataset}: paired differences of the other {len(others)} metrics", [
                _method_by_metric_table(numbers, dataset, others, variants, numbers.difference_estimates,
                                        lambda metric, estimates: _excludes_zero(estimates), sign="+")]))
    return Section(f"Paired differences vs {numbers.baseline}", blocks)


def _subset_summary(numbers: _Numbers, records: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """summarize() of the headline per-image metrics on `dataset` per prompt subset (the `subset` of the records),
    the subset in the dataset column."""
    if "subset" not in records:
        return pd.DataFrame()
    subsets = records.loc[records["dataset"] == dataset, ["prompt_id", "subset"]].dropna().drop_duplicates("prompt_id")
    metrics = {metric for metric, _ in numbers.headline_quality_columns(dataset)}
    rows = numbers.per_image[(numbers.per_image["dataset"] == dataset) & numbers.per_image["metric"].isin(metrics)]
    rows = rows.merge(subsets, on="prompt_id")
    if rows["subset"].nunique() < 2:
        return pd.DataFrame()
    return summarize(rows.assign(dataset=rows["subset"]))


def _breakdowns_section(numbers: _Numbers, records: pd.DataFrame) -> Section | None:
    """Per dataset, collapsed: the metrics beside each headline metric from its scorer (per subject, per TIFA element
    type, ...), the other metrics, and the headline metrics per prompt subset."""
    blocks: list[Block] = []
    for dataset in numbers.datasets():
        variants = numbers.variants(dataset)

        def best_of_row(metric: str, row_estimates: Sequence[Estimate | None], variants=variants) -> set[int]:
            return _best_marks(numbers, metric, variants, row_estimates)

        quality = numbers.summary[(numbers.summary["dataset"] == dataset)
                                  & ~numbers.summary["metric"].isin(COMPUTE_METRICS)]
        headline = numbers.headline_quality_columns(dataset)
        remaining = {(row.metric, row.scorer) for row in quality.itertuples()} - set(headline)
        for metric, scorer in headline:
            beside = sorted((column for column in remaining if column[1] == scorer), key=lambda c: c[0])
            remaining -= set(beside)
            if beside:
                blocks.append(Details(
                    f"{dataset}: {metric} in detail, {len(beside)} more metrics of its scorer "
                    f"({', '.join(column[0] for column in beside[:3])}{', ...' if len(beside) > 3 else ''})",
                    [_method_by_metric_table(numbers, dataset, beside, variants, numbers.estimates, best_of_row)]))
        if remaining:
            others = sorted(remaining, key=lambda column: numbers.column_label(*column))
            blocks.append(Details(f"{dataset}: the other {len(others)} metrics", [
                _method_by_metric_table(numbers, dataset, others, variants, numbers.estimates, best_of_row)]))
        by_subset = _subset_summary(numbers, records, dataset)
        if not by_subset.empty:
            table_rows, bold = [], set()
            for row_index, ((subset, metric, scorer), group) in enumerate(
                    by_subset.groupby(["dataset", "metric", "scorer"], sort=True)):
                cells = {(row.model, row.variant): Estimate(row.mean, row.ci_low, row.ci_high) for row in group.itertuples()}
                row_estimates = [cells.get(key) for key in variants]
                table_rows.append([subset, numbers.column_label(metric, scorer),
                                   *(_estimate_text(e, metric) for e in row_estimates)])
                bold |= {(row_index, column + 2) for column in best_of_row(metric, row_estimates)}
            headers = ["subset", "metric", *(numbers.labels.label(*key) for key in variants)]
            blocks.append(Details(f"{dataset}: the headline metrics per prompt subset",
                                  [Table(headers, table_rows, frozenset(bold))]))
    if not blocks:
        return None
    note = "Collapsed: open one to see it. Cells: mean [95% interval]; bold: the best mean of its row."
    return Section("Breakdowns", [Paragraph(note), *blocks])


def _set_level_section(set_summary: pd.DataFrame, numbers: _Numbers) -> Section | None:
    if set_summary.empty:
        return None
    order = numbers.labels.ordered(zip(set_summary["model"], set_summary["variant"]))  # baseline first
    table_rows = [
        [
            row.dataset,
            numbers.labels.label(row.model, row.variant),
            numbers.column_label(row.metric, row.scorer),
            MISSING if np.isnan(row.mean) else f"{row.mean:.3f}",
            str(row.n),
        ]
        for row in sorted(set_summary.itertuples(),
                          key=lambda row: (row.dataset, order.index((row.model, row.variant)), row.metric, row.scorer))
    ]
    note = (
        "One value per set: computed once over all images of a variant on a dataset, so there is no per-image "
        "interval. Compare values only between sets of the same size."
    )
    headers = ["dataset", "variant", "metric", "value", "images"]
    return Section("Set-level results", [Paragraph(note), Table(headers, table_rows)])


def _timing_protocol(records: pd.DataFrame) -> dict[tuple[str, str, str], tuple[str, str]]:
    """Per (model, dataset, variant): the images per sampling call its times were measured at, and the notes its
    method gave on calls (work it skipped, with how many images)."""
    protocol = {}
    if records.empty or "batch_size" not in records:
        return protocol
    notes = records["method_notes"] if "method_notes" in records else pd.Series([None] * len(records), index=records.index)
    for key, group in records.assign(method_notes=notes).groupby(["model", "dataset", "variant"]):
        batches = ", ".join(str(int(b)) for b in sorted(group["batch_size"].dropna().unique()))
        counts: dict[str, int] = {}
        for image_notes in group["method_notes"]:
            for note in image_notes if isinstance(image_notes, list) else []:
                counts[note] = counts.get(note, 0) + 1
        protocol[key] = (batches, "; ".join(f"{n} of {len(group)} images: {note}" for note, n in counts.items()))
    return protocol


def _compute_section(
    summary: pd.DataFrame, overhead: pd.DataFrame, records: pd.DataFrame, labels: VariantLabels, timing_note: str | None
) -> Section | None:
    compute = summary[summary["metric"].isin(COMPUTE_METRICS)]
    if compute.empty:
        return None
    by_metric = {(row.model, row.dataset, row.variant, row.metric): row for row in compute.itertuples()}
    overhead_by_variant = {(row.model, row.dataset, row.variant): row for row in overhead.itertuples()}
    protocol = _timing_protocol(records)
    with_notes = any(notes for _, notes in protocol.values())  # the column only when a method skipped work
    with_memory = PEAK_MEMORY_METRIC in set(compute["metric"])
    headers = ["dataset", "variant", "images per sampling call", "seconds per image", "overhead % [95% CI]"]
    if with_memory:
        headers.append("peak memory MB (mean)")
    table_rows = []
    for dataset, rows in compute.groupby("dataset", sort=True):
        for model, variant in labels.ordered(zip(rows["model"], rows["variant"])):
            seconds = by_metric.get((model, dataset, variant, SECONDS_METRIC))
            variant_overhead = overhead_by_variant.get((model, dataset, variant))
            batches, notes = protocol.get((model, dataset, variant), (MISSING, ""))
            row_cells = [
                dataset,
                labels.label(model, variant),
                batches,
                MISSING if seconds is None else interval_text(seconds.mean, seconds.ci_low, seconds.ci_high),
                MISSING
                if variant_overhead is None
                else interval_text(
                    100 * variant_overhead.overhead, 100 * variant_overhead.ci_low, 100 * variant_overhead.ci_high, "+", 1
                ),
            ]
            if with_memory:
                memory = by_metric.get((model, dataset, variant, PEAK_MEMORY_METRIC))
                # NaN: generated on a CPU, where no accelerator peak is measured.
                row_cells.append(MISSING if memory is None or pd.isna(memory.mean) else f"{memory.mean:.1f}")
            if with_notes:
                row_cells.append(notes)
            table_rows.append(row_cells)
    if with_notes:
        headers.append("what the method skipped")
    note = (
        "Overhead: (T - T0) / T0 of mean seconds per image against the baseline on the same model and dataset, each "
        "timed at the images per sampling call shown (one call samples several seeds of a prompt as one batch). "
        "Peak memory is the accelerator's; – where images were generated on a CPU."
    )
    blocks = [Paragraph(note)] + ([Paragraph(f"Timing protocol: {timing_note}")] if timing_note else [])
    return Section("Compute overhead", [*blocks, Table(headers, table_rows)])


def _paper_section(paper: PaperTable, summary: pd.DataFrame, overhead: pd.DataFrame, labels: VariantLabels) -> Section:
    """The paper's value beside ours with our 95% interval, and whether the paper's value lies inside it."""
    if paper.cells is None:
        return Section("Published values", [Paragraph(f"{paper.title}: not available. {paper.not_available}")])
    ours = pd.concat(
        [
            summary[["model", "dataset", "variant", "method", "metric", "mean", "ci_low", "ci_high"]],
            overhead.rename(columns={"overhead": "mean"}).assign(metric=OVERHEAD_METRIC),
        ],
        ignore_index=True,
    )
    # A cell without a dataset (Table 1's overhead) is compared with ours on every dataset.
    published = paper.cells.rename(columns={"model": "paper_model", "value": "value_paper"})
    every_dataset = published[published["dataset"].isna()].drop(columns="dataset").merge(
        ours[["dataset"]].drop_duplicates(), how="cross"
    )
    published = pd.concat([published[published["dataset"].notna()], every_dataset], ignore_index=True)
    compared = published.merge(ours, on=["dataset", "method", "metric"], how="left")
    table_rows = []
    for row in compared.sort_values(["dataset", "method", "metric"]).itertuples():
        measured = pd.notna(row.variant) and pd.notna(row.mean)
        percent = str(row.paper_text).endswith("%")
        scale, decimals = (100, 1) if percent else (1, 3)
        if not measured:
            inside = MISSING
        elif pd.isna(row.ci_low):
            inside = "– (one value per set: no interval)"
        elif row.model != row.paper_model:
            inside = f"– (ours on {row.model}, the paper's on {row.paper_model})"
        else:
            inside = "yes" if row.ci_low <= row.value_paper <= row.ci_high else "no"
        table_rows.append(
            [
                row.dataset,
                labels.label(row.model, row.variant) if measured else row.method,
                row.metric,
                str(row.paper_text),
                interval_text(scale * row.mean, scale * row.ci_low, scale * row.ci_high, decimals=decimals) if measured else MISSING,
                inside,
            ]
        )
    sources = "; ".join(sorted(set(paper.cells["source"].astype(str))))
    note = f"{paper.title}. Source: {sources}. Our cells: mean [95% bootstrap interval]; – where we have no result."
    headers = ["dataset", "variant", "metric", "paper", "ours [95% CI]", "paper inside our CI"]
    return Section("Published values", [Paragraph(note), Table(headers, table_rows)])


def _failures_section(records: pd.DataFrame, labels: VariantLabels) -> Section:
    counts = failures(records)
    by_variant = {(row.model, row.variant): row for row in counts.itertuples()}
    table_rows = [
        [labels.label(*key), str(by_variant[key].n_failed), str(by_variant[key].n_records), by_variant[key].failed_steps]
        for key in labels.ordered(by_variant)
    ]
    headers = ["variant", "failed", "records", "failed at loop index (count)"]
    return Section("Failures per method", [Table(headers, table_rows)])


def _missing_section(missing: Sequence[Missing], labels: VariantLabels) -> Section | None:
    if not missing:
        return None
    note = ("These results are partial: the work below is not done (or its shard has not finished), and every table "
            "that follows covers only what is. Run the stage named to complete it.")
    table_rows = [
        [labels.label(entry.model, entry.variant) if labels.knows(entry.model, entry.variant) else entry.variant,
         entry.model, entry.dataset, entry.stage, f"{entry.n_missing} of {entry.n_expected}", entry.detail]
        for entry in missing
    ]
    headers = ["variant", "model", "dataset", "stage", "images missing", "detail"]
    return Section("Missing", [Paragraph(note), Table(headers, table_rows)])


def _truncated_text(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _fitted(image: Image.Image, size: int) -> Image.Image:
    scale = size / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(new_size, Image.Resampling.LANCZOS)


def _draw_grid(path: Path, images: pd.DataFrame, labels: VariantLabels) -> None:
    """One row per seed, one column per variant; a cell without an image (a failed sample) stays grey."""
    columns = labels.ordered(zip(images["model"], images["variant"]))
    seeds = sorted(images["seed"].unique())
    image_paths = {(row.model, row.variant, row.seed): row.path for row in images.itertuples()}
    header_px, margin_px, cell = 24, 72, GRID_CELL_PX
    grid = Image.new("RGB", (margin_px + cell * len(columns), header_px + cell * len(seeds)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, key in enumerate(columns):
        label = _truncated_text(draw, labels.label(*key), font, cell - 8)
        draw.text((margin_px + column * cell + 4, 6), label, fill="black", font=font)
    for row, seed in enumerate(seeds):
        top = header_px + row * cell
        draw.text((4, top + cell // 2), f"seed {seed}", fill="black", font=font)
        for column, (model, variant) in enumerate(columns):
            left = margin_px + column * cell
            image_path = image_paths.get((model, variant, seed))
            if image_path is None:
                draw.rectangle((left + 1, top + 1, left + cell - 2, top + cell - 2), fill="#dddddd")
                draw.text((left + 8, top + cell // 2), "no image", fill="black", font=font)
                continue
            with Image.open(image_path) as image:
                thumbnail = _fitted(image, cell - 4)  # a small gap keeps neighbouring images apart
            grid.paste(thumbnail, (left + (cell - thumbnail.width) // 2, top + (cell - thumbnail.height) // 2))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _method_notes_section(records: pd.DataFrame) -> Section | None:
    """What each method in the report declares about its implementation (`Method.report_note`)."""
    known = METHODS.classes()
    names = sorted(set(records["method"])) if "method" in records else []
    notes = [(name, known[name].report_note) for name in names if name in known and known[name].report_note]
    if not notes:
        return None
    return Section("Notes on methods", [Paragraph(f"{name}: {note}") for name, note in notes])


def _scorers_section(summary: pd.DataFrame) -> Section:
    pairs = summary[["metric", "scorer"]].drop_duplicates().sort_values(["metric", "scorer"])
    return Section("Scorers", [Table(["metric", "scorer"], [[metric, str(scorer)] for metric, scorer in pairs.values])])


def _manifest_label(manifest: dict, index: int) -> str:
    if manifest.get("stage") == "generate":
        return f"generation: {manifest['model']} / {manifest['variant']} / {manifest['dataset']}"
    if manifest.get("stage") == "score":
        return f"scoring: {manifest['scorer_key']} ({manifest['scorer']})"
    return str(manifest.get("variant") or f"run {index}")


def _manifests_section(manifests: list[dict]) -> Section:
    blocks: list[Block] = [
        JsonBlock(
            _manifest_label(manifest, index),
            json.dumps(manifest, indent=2, sort_keys=True, default=str, ensure_ascii=False),
        )
        for index, manifest in enumerate(manifests, start=1)
    ]
    return Section("Manifests", blocks)


def _verifiers(records: pd.DataFrame) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(model, dataset, variant) -> (metric, scorer) of each variant whose records name a verifier."""
    if "verifier_metric" not in records:
        return {}
    chosen = records.dropna(subset=["verifier_metric", "verifier_scorer"])
    return {(row.model, row.dataset, row.variant): (row.verifier_metric, row.verifier_scorer)
            for row in chosen.drop_duplicates(["model", "dataset", "variant"]).itertuples()}


def default_headline(metric_info: Mapping[str, bool]) -> list[str]:
    """Every metric that is not one of a family ("detection/<subject>") or a compute metric."""
    return [metric for metric in metric_info if not metric.endswith("/") and metric not in COMPUTE_METRICS]


def write_report(
    out_dir: Path,
    title: str,
    scores: pd.DataFrame,
    records: pd.DataFrame,
    manifests: list[dict],
    image_paths: pd.DataFrame,
    notice: str | None,
    metric_info: dict[str, bool],
    paper: PaperTable | None = None,
    baseline_method: str = "vanilla",
    max_grids: int = 50,
    missing: Sequence[Missing] = (),
    timing_note: str | None = None,
    headline_metrics: Sequence[str] | None = None,
) -> Path:
    """Write README.md, index.html, plots/*.png, and grids/<dataset>.{html,md} with grids/<dataset>__<prompt>.png
    into `out_dir`.

    `metric_info` maps a metric to whether higher is better; `records` needs a `prompt` column for grid captions
    (and may have a `subset` column: the breakdown per prompt subset). `headline_metrics`: the metrics of the first
    table, in order ("overhead" for the compute overhead; default: `default_headline`). `missing`: the work not
    done yet (evalkit/reporting/completeness.py); listed first when there is any. `timing_note`: the experiment's
    word on how its times compare with the paper's (the batch they were taken at). Returns the path of index.html.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image, set_level = split_set_level(scores)
    summary = summarize(per_image)
    set_summary = summarize_sets(set_level)
    present = [frame for frame in (summary, set_summary) if not frame.empty]
    all_summaries = pd.concat(present, ignore_index=True) if present else summary
    labels = VariantLabels([scores, records, image_paths], baseline_method)
    differences = paired_difference(per_image, baseline_method)
    numbers = _Numbers(
        per_image, all_summaries, relative_overhead(per_image, baseline_method),
        differences[~differences["metric"].isin(COMPUTE_METRICS)], labels, _metric_labels(all_summaries),
        metric_info, baseline_method, list(headline_metrics or default_headline(metric_info)), _verifiers(records),
    )
    protocol, protocol_note = _protocol_section(paper, manifests)
    sections = [
        _missing_section(missing, labels),
        *_headline_sections(numbers, paper, protocol_note),
        _grids_section(out_dir, numbers, image_paths, records, title, notice, max_grids),
        protocol,
        _plots_section(out_dir, numbers),
        _paired_section(numbers),
        _compute_section(all_summaries, numbers.overhead, records, labels, timing_note),
        None if paper is None else _paper_section(paper, all_summaries, numbers.overhead, labels),
        _breakdowns_section(numbers, records),
        *diagnostics_sections(out_dir, records, per_image, labels),
        _set_level_section(set_summary, numbers),
        _failures_section(records, labels),
        _method_notes_section(records),
        _scorers_section(all_summaries),
        _manifests_section(manifests),
    ]
    sections = [section for section in sections if section is not None]
    # Written whole or not at all, after the plots and grids they show: a killed report leaves no partial page.
    atomic_write_bytes(out_dir / "README.md", markdown_document(title, notice, sections).encode("utf-8"))
    index_path = out_dir / "index.html"
    atomic_write_bytes(index_path, html_document(title, notice, sections).encode("utf-8"))
    return index_path
