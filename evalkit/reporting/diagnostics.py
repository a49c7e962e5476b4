"""The report's attention diagnostics (evalkit/sampling/diagnostics.py): each method's subject peaks and subject
overlaps against the denoising step, and how they relate to the outcome: the subjects a detector did not find
against those it found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from evalkit.records import RATE_METRIC, SUBJECT_METRIC_PREFIX
from evalkit.reporting.aggregate import bootstrap_ci
from evalkit.reporting.document import (
    MISSING,
    Gallery,
    Paragraph,
    Picture,
    Section,
    Table,
    file_stem,
    interval_text,
)
from evalkit.reporting.labels import VariantLabels
from evalkit.reporting.plots import panel_grid, save_figure

IMAGE_KEYS = ["model", "variant", "dataset", "prompt_id", "seed"]
PEAK, OVERLAP = "subject peak", "subject overlap"
DEFINITIONS = (
    "Read in every step's guided forward (the conditional half of the forward the scheduler steps with, after the "
    "method's latent update and with its attention edits), on the 16x16 cross-attention maps averaged over heads and "
    "layers, softmax over the text tokens, smoothed as Attend-and-Excite does. Subject peak: the maximum of a "
    "subject's map (what Attend-and-Excite maximises). Subject overlap: the maximum over positions of A*B/(A+B) for "
    "two subjects' maps (Separate-and-Enhance's Separate loss; CONFORM also pushes different subjects' maps apart). "
    "Recording them leaves the images unchanged; its cost is in the README."
)


def _long_frame(records: pd.DataFrame) -> pd.DataFrame:
    """One row per image, statistic, subject (or pair of subjects) and loop index: IMAGE_KEYS, statistic, item,
    step, value (NaN where the image's latents had failed)."""
    columns = {key: [] for key in [*IMAGE_KEYS, "statistic", "item", "step", "value"]}
    if "attention_diagnostics" not in records:
        return pd.DataFrame(columns)
    for row in records[records["attention_diagnostics"].notna()].itertuples(index=False):
        diagnostics = row.attention_diagnostics
        subjects = diagnostics["subjects"]
        series = [(PEAK, subject, values) for subject, values in zip(subjects, diagnostics["subject_peak"])]
        series += [(OVERLAP, f"{subjects[a]} & {subjects[b]}", values)
                   for (a, b), values in zip(diagnostics["pairs"], diagnostics["overlap"])]
        for statistic, item, values in series:
            for key in IMAGE_KEYS:
                columns[key] += [getattr(row, key)] * len(values)
            columns["statistic"] += [statistic] * len(values)
            columns["item"] += [item] * len(values)
            columns["step"] += diagnostics["steps"]
            columns["value"] += [np.nan if value is None else value for value in values]
    return pd.DataFrame(columns)


def _per_image(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Each image's mean over its subjects (or pairs), per `by` (e.g. the step): one value per image."""
    return frame.groupby([*IMAGE_KEYS, *by], as_index=False)["value"].mean()


def _against_step_plot(path: Path, frame: pd.DataFrame, labels: VariantLabels) -> None:
    """One panel per statistic: per variant, the mean over images against the loop index, with a band of +-1.96
    standard errors."""
    statistics = [statistic for statistic in (PEAK, OVERLAP) if statistic in set(frame["statistic"])]
    figure, axes = panel_grid(len(statistics), 2, (6.0, 4.0))
    variants = labels.ordered(zip(frame["model"], frame["variant"]))
    for axis, statistic in zip(axes, statistics):
        images = _per_image(frame[frame["statistic"] == statistic], ["step"])
        for index, (model, variant) in enumerate(variants):
            rows = images[(images["model"] == model) & (images["variant"] == variant)]
            if rows.empty:
                continue
            by_step = rows.groupby("step")["value"].agg(["mean", "std", "count"])
            half_width = 1.96 * by_step["std"].fillna(0.0) / np.sqrt(by_step["count"])
            colour = f"C{index % 10}"
            axis.plot(by_step.index, by_step["mean"], color=colour, label=labels.label(model, variant))
            axis.fill_between(by_step.index, by_step["mean"] - half_width, by_step["mean"] + half_width,
                              color=colour, alpha=0.15, linewidth=0)
        axis.set_xlabel("loop index (denoising step)")
        axis.set_ylabel(f"{statistic} (mean over images)")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    save_figure(figure, path)


def _by_outcome_plot(path: Path, peaks: pd.DataFrame, labels: VariantLabels) -> None:
    """One panel per variant: the mean subject peak against the loop index, over the subjects the detector found
    and over those it did not."""
    variants = labels.ordered(zip(peaks["model"], peaks["variant"]))
    figure, axes = panel_grid(len(variants), 4, (4.0, 3.0), sharey=True)
    for axis, (model, variant) in zip(axes, variants):
        rows = peaks[(peaks["model"] == model) & (peaks["variant"] == variant)]
        for detected, style, name in ((1.0, "-", "detected"), (0.0, "--", "not detected")):
            group = rows[rows["detected"] == detected]
            if not group.empty:
                by_step = group.groupby("step")["value"].mean()
                count = group.groupby(IMAGE_KEYS + ["item"]).ngroups
                axis.plot(by_step.index, by_step.values, style, color="C0" if detected else "C3", label=f"{name} ({count})")
        axis.set_title(labels.label(model, variant), fontsize="medium")
        axis.set_xlabel("loop index")
        axis.legend(fontsize="x-small", loc="best")
    axes[0].set_ylabel(PEAK)
    save_figure(figure, path)


def _estimate_cell(values: pd.Series) -> str:
    if values.empty:
        return MISSING
    return interval_text(*bootstrap_ci(values.to_numpy()))


def _outcome_table(long: pd.DataFrame, detections: pd.DataFrame, rates: pd.DataFrame, labels: VariantLabels) -> Table:
    """Per variant: the subject peak (mean over the steps) of the subjects found and of those not found, and the
    overlap (mean over steps and pairs) of the images with every subject found and of the others."""
    peaks = long[long["statistic"] == PEAK].groupby([*IMAGE_KEYS, "item"], as_index=False)["value"].mean()
    peaks = peaks.merge(detections, on=[*IMAGE_KEYS, "item"])
    overlaps = _per_image(long[long["statistic"] == OVERLAP], []).merge(rates, on=IMAGE_KEYS)
    rows = []
    for model, variant in labels.ordered(zip(peaks["model"], peaks["variant"])):
        cells = [labels.label(model, variant)]
        for frame in (peaks, overlaps):
            mine = frame[(frame["model"] == model) & (frame["variant"] == variant)]
            for outcome in (1.0, 0.0):
                values = mine.loc[mine["detected"] == outcome, "value"].dropna()
                cells += [str(len(values)), _estimate_cell(values)]
        rows.append(cells)
    headers = ["variant", "subjects found", "their peak", "subjects not found", "their peak",
               "images with every subject found", "their overlap", "other images", "their overlap"]
    return Table(headers, rows)


def diagnostics_sections(out_dir: Path, records: pd.DataFrame, scores: pd.DataFrame, labels: VariantLabels) -> list[Section]:
    """The "Attention diagnostics" section (per dataset, the statistics against the step per variant) and, where a
    detector scored the images, "Attention and detection"; none when no record has diagnostics."""
    long = _long_frame(records)
    if long.empty:
        return []
    (out_dir / "plots").mkdir(exist_ok=True)
    used_stems: set[str] = set()  # names of their own ("<dataset>__attention_..."), apart from the other plots'
    pictures, outcome_blocks = [], []
    # Detector rows per subject (detection/<subject>) and per image (every subject found), scorer by scorer.
    subject_rows = scores[scores["metric"].astype(str).str.startswith(SUBJECT_METRIC_PREFIX)]
    rate_rows = scores[scores["metric"] == RATE_METRIC]
    for dataset, frame in long.groupby("dataset", sort=True):
        path = f"plots/{file_stem(f'{dataset}__attention_diagnostics', used_stems)}.png"
        _against_step_plot(out_dir / path, frame, labels)
        pictures.append(Picture(path, f"{dataset}: subject peak and subject overlap against the loop index, per "
                                      "variant (mean over images, each image's mean over its subjects or pairs; band: "
                                      "+-1.96 standard errors)."))
        for scorer, found in subject_rows[subject_rows["dataset"] == dataset].groupby("scorer", sort=True):
            detections = found.assign(item=found["metric"].str[len(SUBJECT_METRIC_PREFIX):], detected=found["value"])
            detections = detections[[*IMAGE_KEYS, "item", "detected"]]
            rates = rate_rows[(rate_rows["dataset"] == dataset) & (rate_rows["scorer"] == scorer)]
            rates = rates.assign(detected=rates["value"])[[*IMAGE_KEYS, "detected"]]
            outcome_blocks += [Paragraph(f"{dataset}, detections by {scorer}:"),
                               _outcome_table(frame, detections, rates, labels)]
            peaks = frame[frame["statistic"] == PEAK].merge(detections, on=[*IMAGE_KEYS, "item"])
            if not peaks.empty:
                path = f"plots/{file_stem(f'{dataset}__attention_by_detection', used_stems)}.png"
                _by_outcome_plot(out_dir / path, peaks, labels)
                outcome_blocks.append(Gallery([Picture(path, (
                    f"{dataset}: per variant, the subject peak against the loop index for the subjects the detector "
                    "above found (solid) and those it did not (dashed); in brackets, how many (image, subject) pairs."))]))
    skipped = _skipped(records, labels)
    sections = [Section("Attention diagnostics", [Paragraph(DEFINITIONS), Gallery(pictures), *skipped])]
    if outcome_blocks:
        note = ("Does a subject the detector missed have a weaker attention peak? Peak: a subject's peak averaged "
                "over the steps; overlap: an image's overlap averaged over steps and subject pairs. Cells: mean "
                "[95% bootstrap interval] and how many subjects or images it is over.")
        sections.append(Section("Attention and detection", [Paragraph(note), *outcome_blocks]))
    return sections


def _skipped(records: pd.DataFrame, labels: VariantLabels) -> list[Paragraph]:
    """A line per variant with images without diagnostics: how many, and why (the records' reasons)."""
    without = records[records["attention_diagnostics"].isna()]
    groups = dict(list(without.groupby(["model", "variant"])))
    lines = []
    for key in labels.ordered(groups):
        reasons = sorted(set(groups[key].get("attention_diagnostics_skipped", pd.Series(dtype=str)).dropna().astype(str)))
        lines.append(Paragraph(f"{labels.label(*key)}: {len(groups[key])} images without diagnostics "
                               f"({'; '.join(reasons) or 'not recorded'})."))
    return lines
