"""The typed records the stages write and read: score rows, generation manifests and scoring manifests.

A row or manifest is built through its dataclass, so a renamed or missing key fails where it is written (a
TypeError naming the keyword), and a manifest read back from JSON is checked against the same fields, so a file
without one fails where it is read (a StoreError naming the file and the keys), never later when a report is made.
The JSON on disk keeps the keys the stages have always written.

A leaf module: the standard library and evalkit's errors only, importable from scoring and reporting alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from evalkit.errors import StoreError

# The detection metrics (owlv2, shapes_detection) that the report reads by name.
RATE_METRIC = "detection_rate"
SUBJECT_METRIC_PREFIX = "detection/"


@dataclass(frozen=True)
class ScoreRow:
    """One value of one metric. A per-image row is keyed by (model, method, variant, dataset, prompt_id, seed); a
    set-level row (FID) has no prompt_id or seed and gives `n_images`, the number of images its value comes from.
    `scorer` is the scorer's provenance: which model, checkpoint and preprocessing produced the value."""

    model: str
    method: str
    variant: str
    dataset: str
    prompt_id: str | None
    seed: int | None
    metric: str
    value: float
    scorer: str
    n_images: int | None = None

    def __post_init__(self):
        per_image = self.prompt_id is not None
        if per_image != (self.seed is not None) or per_image == (self.n_images is not None):
            raise ValueError(f"score row {self}: a per-image row has prompt_id and seed and no n_images; a set-level "
                             f"row has n_images and neither prompt_id nor seed")
        if not isinstance(self.value, float):
            raise TypeError(f"score row {self}: value must be a float, got {type(self.value).__name__}")

    def as_dict(self) -> dict[str, Any]:
        """The row as a table has it: per-image rows have the columns SCORE_COLUMNS, set-level rows n_images too."""
        row = asdict(self)
        if self.n_images is None:
            del row["n_images"]
        return row


# The columns of a score table, in order (a table with set-level rows has n_images after them).
SCORE_COLUMNS = [field.name for field in fields(ScoreRow) if field.default is MISSING]

Manifest = TypeVar("Manifest", bound="_Manifest")


class _Manifest:
    """A manifest written as JSON with exactly its fields' keys; `stage` says which stage wrote it."""

    STAGE: ClassVar[str]

    def __post_init__(self):
        if self.stage != self.STAGE:
            raise ValueError(f"{type(self).__name__}: stage must be {self.STAGE!r}, got {self.stage!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[Manifest], data: Mapping[str, Any], source: str | Path = "a manifest") -> Manifest:
        """The manifest `data` holds; a StoreError naming `source` for a key missing or unknown."""
        if not isinstance(data, Mapping):
            raise StoreError(f"{source}: a {cls.STAGE} manifest must be a JSON object, got {type(data).__name__}")
        names = [field.name for field in fields(cls)]
        problems = [f"{what} keys {keys}" for what, keys in (
            ("missing", [name for name in names if name not in data]), ("unknown", sorted(set(data) - set(names)))
        ) if keys]
        if problems:
            raise StoreError(f"{source}: not a {cls.STAGE} manifest of this evalkit ({'; '.join(problems)}); "
                             f"re-run {cls.STAGE} to rewrite it")
        try:
            return cls(**data)
        except ValueError as error:
            raise StoreError(f"{source}: {error}") from None

    @classmethod
    def read(cls: type[Manifest], path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StoreError(f"{path}: unreadable {cls.STAGE} manifest ({error}); re-run {cls.STAGE} to rewrite it") from None
        return cls.from_dict(data, path)


@dataclass(frozen=True)
class GenerationManifest(_Manifest):
    """What one generated set (a method variant on one model and dataset) was made from: written by `generate`."""

    STAGE: ClassVar[str] = "generate"

    experiment: str
    model: str
    method: str
    variant: str
    dataset: str
    dataset_path: str
    dataset_version: Any
    dataset_sha256: str
    model_source: Any
    model_revision: Any
    seeds: list[int]
    limit: int | None
    config: dict[str, Any]  # the resolved experiment config
    identity: dict[str, Any]  # what the variant's hash covers: method, sampling, model (stages.variant_of)
    versions: dict[str, Any]
    git_commit: str | None
    hardware: dict[str, Any]
    stage: str = STAGE


@dataclass(frozen=True)
class ScoringManifest(_Manifest):
    """Which scorer scored an experiment under a key of its `scorers`, and on what: written by `score`."""

    STAGE: ClassVar[str] = "score"

    experiment: str
    scorer_key: str
    scorer: str  # the scorer's provenance, as its rows carry it
    config: dict[str, Any]
    versions: dict[str, Any]
    git_commit: str | None
    hardware: dict[str, Any]
    stage: str = STAGE
