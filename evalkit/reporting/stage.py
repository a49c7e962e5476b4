"""The report stage: gathers what the generate and score stages wrote (records, score tables, manifests), says
what is missing, and writes the report (evalkit/reporting/render.py). It reads only files, so it runs whenever
asked, on whatever part of an experiment is done."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from evalkit.errors import ConfigError
from evalkit.paths import config_file, project_path
from evalkit.prompts import load_prompt_set
from evalkit.records import SCORE_COLUMNS
from evalkit.reporting.aggregate import OVERHEAD_METRIC, SECONDS_METRIC
from evalkit.reporting.completeness import Missing, merge_tables, missing_images, missing_scores, table_files
from evalkit.reporting.paper_table import load_paper_table
from evalkit.reporting.render import write_report
from evalkit.scoring.base import SCORERS
from evalkit.stages import (
    experiment_seeds,
    read_manifests,
    read_scoring_manifests,
    scoreable_records,
    scores_folder,
    scores_stem,
)
from evalkit.store import ImageStore

log = logging.getLogger("evalkit")


def headline_metrics(cfg: DictConfig) -> list[str]:
    """The metrics of the report's first table: `headline_metrics`, or each configured scorer's first metric."""
    scorer_metrics = [list(SCORERS[c.name].metrics) for c in cfg.scorers.values()]
    if cfg.get("headline_metrics") is None:
        return [metrics[0] for metrics in scorer_metrics]
    # The overhead is computed from seconds per image, which the overhead scorer records.
    known = {metric for metrics in scorer_metrics for metric in metrics if not metric.endswith("/")}
    known |= {OVERHEAD_METRIC} if SECONDS_METRIC in known else set()
    for metric in cfg.headline_metrics:
        if metric not in known:
            raise ConfigError(f"headline_metrics: no configured scorer gives {metric!r}; "
                              f"choose from {', '.join(sorted(known))}")
    return list(cfg.headline_metrics)


def _diagnostics_and_verifier(record: dict) -> dict:
    """A record's attention diagnostics (evalkit/sampling/diagnostics.py) and, for a selecting method (best_of_n),
    its verifier: the scorer name its scores rows carry and the metric it selected by."""
    selection = record.get("selection") or {}
    return {"attention_diagnostics": record.get("attention_diagnostics"),
            "attention_diagnostics_skipped": record.get("attention_diagnostics_skipped"),
            "verifier_scorer": selection.get("verifier_scorer"), "verifier_metric": selection.get("verifier_metric")}


def _generation_wanted(cfg: DictConfig, dataset: str, dataset_path: str) -> set[tuple[str, int]]:
    """The (prompt_id, seed) images the experiment's `seeds` and `limit` ask of a method on a dataset."""
    exclude = cfg.dataset.get("exclude", ()) if dataset == cfg.dataset.name else ()
    specs = load_prompt_set(project_path(dataset_path), cfg.limit, exclude)
    return {(spec.id, seed) for spec in specs for seed in experiment_seeds(cfg)}


def report(cfg: DictConfig) -> Path:
    """Aggregate whatever is scored into `reports/<experiment>/` and say what is missing (in the log and the report)."""
    store = ImageStore(project_path(cfg.store_root))
    manifests = read_manifests(cfg)
    records, images, tables, missing, damaged = [], [], [], [], []
    for method in (config_file("method", name).name for name in cfg.methods):
        if not any(manifest.method == method for manifest in manifests):
            wanted = len(_generation_wanted(cfg, cfg.dataset.name, cfg.dataset.path))
            missing.append(Missing(cfg.model.name, method, cfg.dataset.name, "generate", wanted, wanted,
                                   "the experiment lists this method; none of its images is generated"))
    subsets: dict[str, dict[str, Any]] = {}  # per prompt set file, prompt id -> its subset (for the breakdown)
    for manifest in manifests:
        set_id = (manifest.model, manifest.variant, manifest.dataset)
        generated, scorable = set(), set()
        if manifest.dataset_path not in subsets:
            specs = load_prompt_set(project_path(manifest.dataset_path))
            subsets[manifest.dataset_path] = {spec.id: spec.extra.get("subset") for spec in specs}
        prompt_subsets = subsets[manifest.dataset_path]
        readable, unreadable = scoreable_records(store, manifest, needs_images=False)
        damaged += unreadable
        for key, record in readable.items():
            records.append({"model": key.model, "method": key.method, "variant": key.variant, "dataset": key.dataset,
                            "prompt_id": key.prompt_id, "seed": key.seed, "prompt": record.get("prompt"),
                            "status": record.get("status"), "failed_step": record.get("failed_step"),
                            "batch_size": record.get("batch_size"), "method_notes": record.get("method_notes", []),
                            "subset": prompt_subsets.get(key.prompt_id),
                            **_diagnostics_and_verifier(record)})
            generated.add((key.prompt_id, key.seed))
            if record.get("status") != "ok":
                continue
            problem = store.damage(key)  # grids draw only readable images
            if problem is None:
                images.append({**records[-1], "path": str(store.image_path(key))})
                scorable.add((key.prompt_id, key.seed))
            else:
                damaged.append(problem)
        wanted = _generation_wanted(cfg, manifest.dataset, manifest.dataset_path)
        missing.append(missing_images(set_id, "generate", wanted, generated))
        for scorer_key, scorer_cfg in cfg.scorers.items():
            files = table_files(scores_folder(cfg, scorer_key), scores_stem(manifest))
            scores = merge_tables(files)
            tables.append(scores)
            set_level = SCORERS[scorer_cfg.name].set_level
            missing.append(missing_scores(set_id, scorer_key, set_level, files, scores, scorable))
    missing = [entry for entry in missing if entry is not None]
    for entry in missing:
        log.warning("missing: %s", entry)
    if damaged:
        log.warning("the report leaves out %d damaged items of the store (re-run generate, then score):\n  %s",
                    len(damaged), "\n  ".join(damaged))
    metric_info = {m: up for c in cfg.scorers.values() for m, up in SCORERS[c.name].metrics.items()}
    present = [table for table in tables if not table.empty]
    scores = pd.concat(present, ignore_index=True) if present else pd.DataFrame(columns=SCORE_COLUMNS)
    out_dir = project_path(cfg.report_dir)
    manifest_dicts = [manifest.to_dict() for manifest in [*manifests, *read_scoring_manifests(cfg)]]
    index = write_report(out_dir, cfg.title, scores, pd.DataFrame(records), manifest_dicts,
                         pd.DataFrame(images), cfg.get("notice"), metric_info, load_paper_table(cfg), missing=missing,
                         timing_note=cfg.get("timing_note"), headline_metrics=headline_metrics(cfg))
    print(f"report written: {index} (and {out_dir / 'README.md'})")
    return index
