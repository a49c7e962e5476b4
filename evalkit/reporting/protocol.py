"""A reproduce experiment's protocol beside the paper's: what we ran, read from the generation and scoring manifests,
against what the paper (or its released code) did, as the experiment declares it in `paper_table.protocol`.

Each item of the declaration is `{paper: <value>, note: <where it is stated, or why ours differs>}`; the value is
written in our vocabulary (a hub id, our scheduler name with its options, our dataset names) so that it compares
with ours, and `paper: null` says that the paper does not publish it. A value may be a list (one entry per model or
dataset of the report) or, for `prompt_set_source_sha256`, a mapping from our dataset name to the sha256 of the
file the paper's prompts come from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from evalkit.errors import ConfigError
from evalkit.records import RATE_METRIC
from evalkit.scoring.base import SCORERS

# Item key -> the label the report prints, in the report's order.
PROTOCOL_ITEMS = {
    "model": "model",
    "scheduler": "scheduler (with options)",
    "steps": "denoising steps",
    "guidance": "guidance scale",
    "images_per_prompt": "images per prompt",
    "seeds": "seeds",
    "timing_batch": "images per sampling call when timed",
    "detector": "detector",
    "detection_threshold": "detection threshold",
    "prompt_set": "prompt set",
    "prompt_set_source_sha256": "sha256 of the prompt set's source file",
}
SAME, DIFFERS, NOT_PUBLISHED, SAME_WHERE_PUBLISHED = "same", "⚠ differs", "not published", "same where published"


@dataclasses.dataclass(frozen=True)
class ProtocolRow:
    label: str
    ours: str
    paper: str
    status: str  # SAME, DIFFERS, NOT_PUBLISHED or SAME_WHERE_PUBLISHED
    note: str


def check_protocol(protocol: Mapping[str, Any]) -> None:
    """Raise ConfigError for a declaration the report cannot compare: an unknown item, or one without `paper`."""
    for key, entry in protocol.items():
        if key == "source":
            continue
        if key not in PROTOCOL_ITEMS:
            raise ConfigError(f"paper_table.protocol: unknown item {key!r}; known: source, {', '.join(PROTOCOL_ITEMS)}")
        if not isinstance(entry, Mapping) or "paper" not in entry or set(entry) - {"paper", "note"}:
            raise ConfigError(f"paper_table.protocol.{key}: write it as {{paper: <value or null>, note: <text>}}")
        if key == "prompt_set_source_sha256" and not isinstance(entry["paper"], (Mapping, type(None))):
            raise ConfigError(f"paper_table.protocol.{key}: paper must map our dataset names to sha256 hex digests")


def _seed_ranges(seeds: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    ranges: list[list[int]] = []
    for seed in sorted(seeds):
        if ranges and seed == ranges[-1][1] + 1:
            ranges[-1][1] = seed
        else:
            ranges.append([seed, seed])
    return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def scheduler_text(name: str, options: Mapping[str, Any] | None) -> str:
    """The scheduler as the protocol compares it: "dpm_solver" or "dpm_solver, final_sigmas_type=sigma_min"."""
    return ", ".join([name, *(f"{key}={value}" for key, value in sorted((options or {}).items()))])


def _detector_configs(scoring_manifests: list[dict]) -> list[dict]:
    """The configs of the scorers that produced a detection rate (the experiment's detectors)."""
    return [m["config"] for m in scoring_manifests if RATE_METRIC in SCORERS[m["config"]["name"]].metrics]


def our_protocol(manifests: list[dict]) -> dict[str, set[str]]:
    """Per protocol item, the distinct values the experiment's generation and scoring manifests record."""
    generated = [m for m in manifests if m.get("stage") == "generate"]
    detectors = _detector_configs([m for m in manifests if m.get("stage") == "score"])
    readers: dict[str, Callable[[dict], Any]] = {
        "model": lambda m: m["model_source"],
        "scheduler": lambda m: scheduler_text(m["config"]["sampling"]["scheduler"],
                                              m["config"]["sampling"].get("scheduler_options")),
        "steps": lambda m: m["config"]["sampling"]["num_inference_steps"],
        "guidance": lambda m: m["config"]["sampling"]["guidance_scale"],
        "images_per_prompt": lambda m: len(m["seeds"]),
        "seeds": lambda m: f"{_seed_ranges(m['seeds'])} (one CPU generator per image)",
        # A call samples at most as many images as a prompt has seeds.
        "timing_batch": lambda m: min(int(m["config"]["batch_size"]), len(m["seeds"])),
        "prompt_set": lambda m: m["dataset"],
    }
    ours = {key: {str(read(m)) for m in generated} for key, read in readers.items()}
    ours["prompt_set_source_sha256"] = {
        f"{m['dataset']}: {m['config']['dataset'].get('source_sha256') or 'no source declared'}" for m in generated
    }
    # An analytic detector (shapes_detection) has no checkpoint: its scorer name says what it is.
    ours["detector"] = {f"{c.get('hub_id', c['name'])}{' (tiny random stand-in)' if c.get('tiny') else ''}" for c in detectors}
    ours["detection_threshold"] = {str(c["threshold"]) for c in detectors}
    return ours


def _paper_values(key: str, paper: Any) -> set[str] | None:
    if paper is None:
        return None
    if key == "prompt_set_source_sha256":
        return {f"{dataset}: {digest or NOT_PUBLISHED}" for dataset, digest in paper.items()}
    return {str(value) for value in (paper if isinstance(paper, (list, tuple)) else [paper])}


def _status(key: str, ours: set[str], paper: Any) -> str:
    if paper is None:
        return NOT_PUBLISHED
    if key == "prompt_set_source_sha256":
        # Compared per dataset; one whose source file the paper does not identify cannot be the same or differ.
        published = {dataset: digest for dataset, digest in paper.items() if digest is not None}
        ours_by_dataset = dict(value.split(": ", 1) for value in ours)
        if any(ours_by_dataset.get(dataset) != digest for dataset, digest in published.items()):
            return DIFFERS
        if not published:
            return NOT_PUBLISHED
        return SAME if len(published) == len(ours_by_dataset) else SAME_WHERE_PUBLISHED
    return SAME if ours == _paper_values(key, paper) else DIFFERS


def compare_protocol(protocol: Mapping[str, Any], manifests: list[dict]) -> list[ProtocolRow]:
    """One row per declared item, in PROTOCOL_ITEMS order: ours, the paper's, and whether they are the same."""
    ours = our_protocol(manifests)
    rows = []
    for key, label in PROTOCOL_ITEMS.items():
        if key not in protocol:
            continue
        paper = protocol[key]["paper"]
        paper_values = _paper_values(key, paper)
        rows.append(ProtocolRow(
            label,
            "; ".join(sorted(ours[key])) or "– (not measured: no such scorer)",
            "; ".join(sorted(paper_values)) if paper_values is not None else "not published",
            _status(key, ours[key], paper),
            str(protocol[key].get("note") or ""),
        ))
    return rows
