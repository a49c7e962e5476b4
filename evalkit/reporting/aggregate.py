"""Aggregate per-image scores into means with bootstrap confidence intervals, paired differences against the
baseline method, compute overhead and failure counts.

Scores come as a "long" frame, one row per image and metric, with columns
model, method, variant, dataset, prompt_id, seed, metric, value, scorer.
Set-level metrics (FID) have one row per set instead, with prompt_id and seed empty and an `n_images` column;
`split_set_level` separates them, and only per-image rows are bootstrapped or paired.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SCORE_GROUP = ["model", "dataset", "variant", "method", "metric", "scorer"]
PAIR_KEYS = ["prompt_id", "seed"]
SECONDS_METRIC = "seconds_per_image"
OVERHEAD_METRIC = "overhead"  # (T - T0) / T0 against the baseline: a headline column and a paper's cell
# Resample indices are drawn in blocks of at most this many, so large score sets bootstrap in bounded memory.
_MAX_BLOCK_INDICES = 1 << 22


def _without_nan(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[~np.isnan(values)]


def _resampled_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_resamples` resamples of `values`, drawn with replacement."""
    rows_per_block = max(1, _MAX_BLOCK_INDICES // len(values))
    means = []
    for start in range(0, n_resamples, rows_per_block):
        rows = min(rows_per_block, n_resamples - start)
        means.append(values[rng.integers(0, len(values), size=(rows, len(values)))].mean(axis=1))
    return np.concatenate(means)


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: np.ndarray, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean, NaN ignored.

    With one value every resample equals it, so the interval is (mean, mean); with none everything is NaN.
    """
    values = _without_nan(values)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    means = _resampled_means(values, n_resamples, np.random.default_rng(seed))
    low, high = _percentile_interval(means, confidence)
    return float(values.mean()), low, high


def _summarize_column(
    frame: pd.DataFrame, column: str, count_name: str, mean_name: str, n_resamples: int, confidence: float, seed: int
) -> pd.DataFrame:
    """One row per SCORE_GROUP: the non-NaN count, mean and bootstrap interval of `column`."""
    rows = []
    for keys, group in frame.groupby(SCORE_GROUP, sort=True, dropna=False):
        mean, low, high = bootstrap_ci(group[column].to_numpy(), n_resamples, confidence, seed)
        rows.append((*keys, int(group[column].notna().sum()), mean, low, high))
    return pd.DataFrame(rows, columns=[*SCORE_GROUP, count_name, mean_name, "ci_low", "ci_high"])


def summarize(scores: pd.DataFrame, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (model, dataset, variant, method, metric, scorer): n, mean, ci_low, ci_high."""
    return _summarize_column(scores, "value", "n", "mean", n_resamples, confidence, seed)


def split_set_level(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-image rows, set-level rows): set-level rows are those without a prompt_id."""
    set_level = scores["prompt_id"].isna()
    return scores[~set_level], scores[set_level]


def summarize_sets(set_rows: pd.DataFrame) -> pd.DataFrame:
    """The set-level rows in `summarize`'s columns: n is the number of images in the set, mean the value, and the
    interval NaN (one value per set, nothing to resample)."""
    duplicated = set_rows.duplicated(SCORE_GROUP)
    if duplicated.any():
        raise ValueError(f"{int(duplicated.sum())} set-level scores are duplicated for one set, metric and scorer")
    summary = set_rows[SCORE_GROUP].copy()
    summary["n"] = set_rows["n_images"].astype(int) if len(set_rows) else pd.Series(dtype=int)
    summary["mean"] = set_rows["value"].astype(float)
    summary["ci_low"] = summary["ci_high"] = float("nan")
    return summary.sort_values(SCORE_GROUP).reset_index(drop=True)


def _baseline_rows(scores: pd.DataFrame, baseline_method: str) -> pd.DataFrame:
    """The baseline's rows, refusing data where pairing against it would be ambiguous."""
    baseline = scores[scores["method"] == baseline_method]
    variants_per_run = baseline.groupby(["model", "dataset"])["variant"].nunique()
    ambiguous = variants_per_run[variants_per_run > 1]
    if len(ambiguous):
        raise ValueError(
            f"baseline {baseline_method!r} has several variants for (model, dataset) {list(ambiguous.index)}; "
            "keep the scores of one"
        )
    duplicated = baseline.duplicated(["model", "dataset", "metric", "scorer", *PAIR_KEYS])
    if duplicated.any():
        raise ValueError(f"baseline {baseline_method!r} has {int(duplicated.sum())} duplicated (prompt_id, seed) scores")
    return baseline


def paired_difference(
    scores: pd.DataFrame,
    baseline_method: str = "vanilla",
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per non-baseline variant and metric: mean of (value - baseline value) over the (prompt_id, seed) pairs that
    both scored, with a bootstrap interval that resamples pairs.

    Columns: model, dataset, variant, method, metric, scorer, n_pairs, mean_difference, ci_low, ci_high.
    """
    pair_columns = ["model", "dataset", "metric", "scorer", *PAIR_KEYS]
    baseline = _baseline_rows(scores, baseline_method)[[*pair_columns, "value"]]
    paired = scores[scores["method"] != baseline_method].merge(baseline, on=pair_columns, suffixes=("", "_baseline"))
    paired["difference"] = paired["value"] - paired["value_baseline"]
    return _summarize_column(paired, "difference", "n_pairs", "mean_difference", n_resamples, confidence, seed)


def relative_overhead(
    scores: pd.DataFrame,
    baseline_method: str = "vanilla",
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per non-baseline variant: (T - T0) / T0 from mean seconds_per_image, T0 the baseline's on the same model and
    dataset (NaN without one), with a bootstrap interval that resamples the images of both arms independently.

    Columns: model, dataset, variant, method, overhead, ci_low, ci_high.
    """
    seconds = scores[scores["metric"] == SECONDS_METRIC]
    baseline = _baseline_rows(seconds, baseline_method)
    baseline_seconds = {key: _without_nan(group["value"]) for key, group in baseline.groupby(["model", "dataset"])}
    rows = []
    variant_keys = ["model", "dataset", "variant", "method"]
    for (model, dataset, variant, method), group in seconds[seconds["method"] != baseline_method].groupby(variant_keys):
        variant_times = _without_nan(group["value"])
        baseline_times = baseline_seconds.get((model, dataset), np.empty(0))
        if len(variant_times) == 0 or len(baseline_times) == 0:
            rows.append((model, dataset, variant, method, float("nan"), float("nan"), float("nan")))
            continue
        rng = np.random.default_rng(seed)
        resampled = _resampled_means(variant_times, n_resamples, rng) / _resampled_means(baseline_times, n_resamples, rng)
        low, high = _percentile_interval(resampled - 1.0, confidence)
        overhead = float(variant_times.mean() / baseline_times.mean() - 1.0)
        rows.append((model, dataset, variant, method, overhead, low, high))
    return pd.DataFrame(rows, columns=[*variant_keys, "overhead", "ci_low", "ci_high"])


def failures(records: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, variant): n_records, n_failed (the records whose status is "failed") and failed_steps,
    the loop indices where their latents became NaN or inf with how many failed there ("1 (2), 7 (1)")."""
    failed = records["status"] == "failed"
    steps = records["failed_step"] if "failed_step" in records else pd.Series(None, index=records.index)
    return (
        records.assign(failed=failed, step=steps.where(failed))
        .groupby(["model", "method", "variant"], sort=True)
        .agg(n_records=("failed", "size"), n_failed=("failed", "sum"), failed_steps=("step", _step_counts))
        .reset_index()
    )


def _step_counts(steps: pd.Series) -> str:
    counts = steps.dropna().astype(int).value_counts().sort_index()
    return ", ".join(f"{step} ({count})" for step, count in counts.items())
