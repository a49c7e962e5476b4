"""Write an evaluation report: README.md and a self-contained index.html with result tables, a bar plot per metric,
image grids per prompt and the run manifests.

Both documents are rendered from one list of sections, so they always show the same numbers.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from evalkit.reporting.aggregate import (
    SECONDS_METRIC,
    failures,
    paired_difference,
    relative_overhead,
    split_set_level,
    summarize,
    summarize_sets,
)
from evalkit.reporting.completeness import Missing
from evalkit.store import atomic_write_bytes

PEAK_MEMORY_METRIC = "peak_memory_mb"
# Compute metrics get their own table; the quality tables and paired differences leave them out.
COMPUTE_METRICS = (SECONDS_METRIC, PEAK_MEMORY_METRIC)
GRID_CELL_PX = 192
MISSING = "–"

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
.notice { border: 3px solid #c0392b; background: #fdecea; padding: 1em; font-size: 1.2em; font-weight: bold; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; }
th { background: #f4f4f4; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figure img { max-width: 100%; }
figcaption { max-width: 40em; }
pre { background: #f8f8f8; padding: 1em; overflow: auto; }
"""


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclasses.dataclass
class Paragraph:
    text: str


@dataclasses.dataclass
class JsonBlock:
    summary: str
    json_text: str


@dataclasses.dataclass
class Picture:
    path: str  # relative to the report folder
    caption: str


@dataclasses.dataclass
class Gallery:
    """Shown as images in HTML, linked in Markdown."""

    pictures: list[Picture]


Block = Table | Paragraph | JsonBlock | Gallery


@dataclasses.dataclass
class Section:
    heading: str
    blocks: list[Block]


class VariantLabels:
    """Names variants as the method, plus @hash only where a method has several variants, plus the model where
    the report covers several models; orders them baseline first."""

    def __init__(self, frames: Iterable[pd.DataFrame], baseline_method: str):
        variants = pd.concat([frame[["model", "method", "variant"]] for frame in frames]).drop_duplicates()
        variants_per_method = variants.groupby("method")["variant"].nunique()
        several_models = variants["model"].nunique() > 1
        self._labels: dict[tuple[str, str], str] = {}
        self._sort_keys: dict[tuple[str, str], tuple] = {}
        for model, method, variant in variants.itertuples(index=False):
            label = variant if variants_per_method[method] > 1 else method
            self._labels[(model, variant)] = f"{label} ({model})" if several_models else label
            self._sort_keys[(model, variant)] = (model, method != baseline_method, label)

    def knows(self, model: str, variant: str) -> bool:
        return (model, variant) in self._labels

    def label(self, model: str, variant: str) -> str:
        return self._labels[(model, variant)]

    def ordered(self, keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return sorted(set(keys), key=self._sort_keys.__getitem__)


def _metric_labels(summary: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(metric, scorer) -> the metric name, plus the scorer only where several scorers give the same metric."""
    pairs = summary[["metric", "scorer"]].drop_duplicates()
    scorers_per_metric = pairs.groupby("metric")["scorer"].nunique()
    return {
        (metric, scorer): f"{metric} [{scorer}]" if scorers_per_metric[metric] > 1 else metric
        for metric, scorer in pairs.itertuples(index=False)
    }


def _arrow(metric: str, metric_info: dict[str, bool]) -> str:
    # A metric family ("detection/<subject>") is listed once, as "detection/".
    higher_is_better = metric_info.get(metric, metric_info.get(metric.split("/")[0] + "/"))
    if higher_is_better is None:
        return ""
    return " ↑" if higher_is_better else " ↓"


def _interval(mean: float, low: float, high: float, number_format: str = ".3f") -> str:
    if np.isnan(mean):
        return MISSING
    return f"{mean:{number_format}} [{low:{number_format}}, {high:{number_format}}]"


def _file_stem(name: str, used: set[str]) -> str:
    """A file-system and URL safe stem for `name`, distinct from those already in `used`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"
    candidate, number = stem, 1
    while candidate in used:
        number += 1
        candidate = f"{stem}_{number}"
    used.add(candidate)
    return candidate


def _results_sections(
    quality: pd.DataFrame, labels: VariantLabels, metric_labels: dict, metric_info: dict[str, bool]
) -> list[Section]:
    sections = []
    for dataset, rows in quality.groupby("dataset", sort=True):
        columns = sorted({(row.metric, row.scorer) for row in rows.itertuples()}, key=metric_labels.__getitem__)
        cells = {(row.model, row.variant, row.metric, row.scorer): row for row in rows.itertuples()}
        table_rows = []
        for model, variant in labels.ordered(zip(rows["model"], rows["variant"])):
            row_cells = [labels.label(model, variant)]
            for metric, scorer in columns:
                cell = cells.get((model, variant, metric, scorer))
                row_cells.append(MISSING if cell is None else _interval(cell.mean, cell.ci_low, cell.ci_high))
            table_rows.append(row_cells)
        headers = ["variant", *(metric_labels[column] + _arrow(column[0], metric_info) for column in columns)]
        sections.append(Section(f"Results: {dataset}", [Table(headers, table_rows)]))
    if sections:
        legend = "Cells: mean [low, high], the 95% bootstrap interval over images. ↑ higher is better, ↓ lower is better."
        sections[0].blocks.insert(0, Paragraph(legend))
    return sections


def _set_level_section(
    set_summary: pd.DataFrame, labels: VariantLabels, metric_labels: dict, metric_info: dict[str, bool]
) -> Section | None:
    if set_summary.empty:
        return None
    table_rows = [
        [
            row.dataset,
            labels.label(row.model, row.variant),
            metric_labels[(row.metric, row.scorer)] + _arrow(row.metric, metric_info),
            MISSING if np.isnan(row.mean) else f"{row.mean:.3f}",
            str(row.n),
        ]
        for row in set_summary.sort_values(["dataset", "model", "variant", "metric", "scorer"]).itertuples()
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
                MISSING if seconds is None else _interval(seconds.mean, seconds.ci_low, seconds.ci_high),
                MISSING
                if variant_overhead is None
                else _interval(
                    100 * variant_overhead.overhead, 100 * variant_overhead.ci_low, 100 * variant_overhead.ci_high, "+.1f"
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


def _paired_section(
    differences: pd.DataFrame, labels: VariantLabels, metric_labels: dict, metric_info: dict[str, bool], baseline: str
) -> Section | None:
    differences = differences[~differences["metric"].isin(COMPUTE_METRICS)]
    if differences.empty:
        return None
    table_rows = [
        [
            row.dataset,
            labels.label(row.model, row.variant),
            metric_labels[(row.metric, row.scorer)] + _arrow(row.metric, metric_info),
            _interval(row.mean_difference, row.ci_low, row.ci_high, "+.3f"),
            str(row.n_pairs),
        ]
        for row in differences.sort_values(["dataset", "model", "variant", "metric", "scorer"]).itertuples()
    ]
    note = f"Mean of (variant - {baseline}) over the same (prompt, seed) pairs, with a paired 95% bootstrap interval."
    headers = ["dataset", "variant", "metric", f"difference vs {baseline} [95% CI]", "pairs"]
    return Section(f"Paired difference vs {baseline}", [Paragraph(note), Table(headers, table_rows)])


OVERHEAD_METRIC = "overhead"  # a paper's compute overhead, compared with `relative_overhead`


@dataclasses.dataclass
class PaperTable:
    """The published table an experiment reproduces: its name, and its cells (`reports/references/*.csv` rows:
    model, dataset, method, metric, value, paper_text, source), or why they are not available."""

    title: str
    cells: pd.DataFrame | None
    not_available: str | None = None


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
        scale, number_format = (100, ".1f") if percent else (1, ".3f")
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
                _interval(scale * row.mean, scale * row.ci_low, scale * row.ci_high, number_format) if measured else MISSING,
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


def _plot_metric(path: Path, rows: pd.DataFrame, labels: VariantLabels, axis_label: str) -> None:
    """Bar plot of the mean with its interval as error bars: one group per dataset, one bar per variant."""
    datasets = sorted(rows["dataset"].unique())
    variants = labels.ordered(zip(rows["model"], rows["variant"]))
    by_bar = {(row.dataset, row.model, row.variant): row for row in rows.itertuples()}
    bar_width = 0.8 / len(variants)
    figure = Figure(figsize=(max(5.0, 1.5 + 0.4 * len(datasets) * len(variants)), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(datasets))
    for index, (model, variant) in enumerate(variants):
        bars = [by_bar.get((dataset, model, variant)) for dataset in datasets]
        means = np.array([np.nan if bar is None else bar.mean for bar in bars])
        lows = np.array([np.nan if bar is None else bar.ci_low for bar in bars])
        highs = np.array([np.nan if bar is None else bar.ci_high for bar in bars])
        # Bars without an interval (NaN) get no error bar rather than a broken one.
        errors = np.nan_to_num(np.clip([means - lows, highs - means], 0.0, None))
        offset = (index - (len(variants) - 1) / 2) * bar_width
        axes.bar(positions + offset, means, bar_width, yerr=errors, capsize=3, label=labels.label(model, variant))
    axes.set_xticks(positions, datasets)
    axes.set_ylabel(axis_label)
    axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def _plots_section(
    out_dir: Path, summary: pd.DataFrame, labels: VariantLabels, metric_labels: dict, metric_info: dict[str, bool]
) -> Section | None:
    if summary.empty:
        return None
    (out_dir / "plots").mkdir(exist_ok=True)
    used_stems: set[str] = set()
    grouped = summary.assign(metric_label=[metric_labels[pair] for pair in zip(summary["metric"], summary["scorer"])])
    pictures = []
    for metric_label, rows in grouped.groupby("metric_label", sort=True):
        path = f"plots/{_file_stem(metric_label, used_stems)}.png"
        _plot_metric(out_dir / path, rows, labels, metric_label + _arrow(rows["metric"].iloc[0], metric_info))
        pictures.append(Picture(path, metric_label))
    return Section("Plots", [Gallery(pictures)])


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


def _grids_section(
    out_dir: Path, image_paths: pd.DataFrame, records: pd.DataFrame, labels: VariantLabels, max_grids: int
) -> Section | None:
    if image_paths.empty:
        return None
    (out_dir / "grids").mkdir(exist_ok=True)
    prompts = records.drop_duplicates(["dataset", "prompt_id"]).set_index(["dataset", "prompt_id"])["prompt"]
    prompt_groups = list(image_paths.groupby(["dataset", "prompt_id"], sort=True))
    used_stems: set[str] = set()
    pictures = []
    for (dataset, prompt_id), images in prompt_groups[:max_grids]:
        path = f"grids/{_file_stem(f'{dataset}__{prompt_id}', used_stems)}.png"
        _draw_grid(out_dir / path, images, labels)
        pictures.append(Picture(path, f"{dataset} / {prompt_id}: {prompts.get((dataset, prompt_id), '')}"))
    blocks: list[Block] = [Gallery(pictures)]
    if len(prompt_groups) > max_grids:
        blocks.insert(0, Paragraph(f"Showing {max_grids} of {len(prompt_groups)} prompts."))
    return Section("Image grids", blocks)


def _method_notes_section(records: pd.DataFrame) -> Section | None:
    """What each method in the report declares about its implementation (`Method.report_note`)."""
    from evalkit.sampling.method import registered_methods

    known = registered_methods()
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


def _markdown_text(text: str) -> str:
    """Escaped so that user text shows literally: no raw HTML, no table or link breaking characters."""
    return re.sub(r"([\\|\[\]`*])", r"\\\1", html.escape(str(text), quote=False))


def _markdown_block(block: Block) -> str:
    match block:
        case Paragraph(text):
            return _markdown_text(text)
        case Table(headers, rows):
            lines = ["| " + " | ".join(_markdown_text(header) for header in headers) + " |"]
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(_markdown_text(cell) for cell in row) + " |" for row in rows]
            return "\n".join(lines)
        case JsonBlock(summary, json_text):
            # A fence longer than any backtick run inside the JSON cannot be closed by it.
            longest_run = max((len(run) for run in re.findall(r"`+", json_text)), default=0)
            fence = "`" * max(3, longest_run + 1)
            return f"**{_markdown_text(summary)}**\n\n{fence}json\n{json_text}\n{fence}"
        case Gallery(pictures):
            return "\n".join(f"- [{_markdown_text(picture.caption)}]({picture.path})" for picture in pictures)


def _markdown(title: str, notice: str | None, sections: list[Section]) -> str:
    parts = []
    if notice:
        parts.append(f"> **⚠ {_markdown_text(notice)}**")
    parts.append(f"# {_markdown_text(title)}")
    for section in sections:
        parts.append(f"## {_markdown_text(section.heading)}")
        parts += [_markdown_block(block) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def _html_block(block: Block) -> str:
    escape = html.escape
    match block:
        case Paragraph(text):
            return f"<p>{escape(text)}</p>"
        case Table(headers, rows):
            head = "".join(f"<th>{escape(header)}</th>" for header in headers)
            body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
            return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        case JsonBlock(summary, json_text):
            return f"<details><summary>{escape(summary)}</summary><pre>{escape(json_text)}</pre></details>"
        case Gallery(pictures):
            return "".join(
                f'<figure><a href="{escape(picture.path)}"><img src="{escape(picture.path)}" '
                f'alt="{escape(picture.caption)}"></a><figcaption>{escape(picture.caption)}</figcaption></figure>'
                for picture in pictures
            )


def _html(title: str, notice: str | None, sections: list[Section]) -> str:
    body = []
    if notice:
        body.append(f'<div class="notice" role="alert">⚠ {html.escape(notice)}</div>')
    body.append(f"<h1>{html.escape(title)}</h1>")
    for section in sections:
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        body += [_html_block(block) for block in section.blocks]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


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
) -> Path:
    """Write README.md, index.html, plots/<metric>.png and grids/<dataset>__<prompt_id>.png into `out_dir`.

    `metric_info` maps a metric to whether higher is better; `records` needs a `prompt` column for grid captions.
    `missing`: the work not done yet (evalkit/reporting/completeness.py); listed first when there is any.
    `timing_note`: the experiment's word on how its times compare with the paper's (the batch they were taken at).
    Returns the path of index.html.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image, set_level = split_set_level(scores)
    summary = summarize(per_image)
    set_summary = summarize_sets(set_level)
    present = [frame for frame in (summary, set_summary) if not frame.empty]
    all_summaries = pd.concat(present, ignore_index=True) if present else summary
    labels = VariantLabels([scores, records, image_paths], baseline_method)
    metric_labels = _metric_labels(all_summaries)
    quality = summary[~summary["metric"].isin(COMPUTE_METRICS)]
    overhead = relative_overhead(per_image, baseline_method)
    sections = [
        _missing_section(missing, labels),
        *_results_sections(quality, labels, metric_labels, metric_info),
        _set_level_section(set_summary, labels, metric_labels, metric_info),
        _compute_section(summary, overhead, records, labels, timing_note),
        _paired_section(
            paired_difference(per_image, baseline_method), labels, metric_labels, metric_info, baseline_method
        ),
        None if paper is None else _paper_section(paper, all_summaries, overhead, labels),
        _failures_section(records, labels),
        _method_notes_section(records),
        _plots_section(out_dir, all_summaries, labels, metric_labels, metric_info),
        _grids_section(out_dir, image_paths, records, labels, max_grids),
        _scorers_section(all_summaries),
        _manifests_section(manifests),
    ]
    sections = [section for section in sections if section is not None]
    # Written whole or not at all, after the plots and grids they show: a killed report leaves no partial page.
    atomic_write_bytes(out_dir / "README.md", _markdown(title, notice, sections).encode("utf-8"))
    index_path = out_dir / "index.html"
    atomic_write_bytes(index_path, _html(title, notice, sections).encode("utf-8"))
    return index_path
