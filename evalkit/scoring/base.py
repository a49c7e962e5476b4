"""The scorer contract: scorers collect rows in `update` and return them in `compute`, as torchmetrics metrics do.

Every row is one value of one metric for one image, a `ScoreRow` (evalkit/records.py) keyed by (model, method,
variant, dataset, prompt_id, seed), and carries the scorer's `provenance` so a results table says which model,
checkpoint and preprocessing produced each value. A scorer registers with `@SCORERS.register` under its `name`, the
key a `conf/scorer/*.yaml` gives.
A set-level metric (FID) gives one row per set instead: prompt_id and seed empty, and `n_images`, the number of
images the value was computed from.
The score stage scores one set at a time (one variant of one model on one dataset): `reset`, `begin_set`, `update`
with the set's images, `compute`.

The base class owns what every scorer shares: `batch_size` (checked once, here), and `update`, which drops failed
generations (they get no rows), checks that image scorers get images, and hands the rest to `score_batch` in
batches of `batch_size`, in order, under one progress bar. A scorer is its metric: `score_batch` adds the rows of
one batch with `_add_row` (or keeps what a set-level `compute` needs). A batch bounds every model call: a scorer
that needs other groupings (images sharing their detection queries, questions of one token length) forms them inside
its batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from tqdm import tqdm

from evalkit.errors import ConfigError
from evalkit.prompts import PromptSpec
from evalkit.records import GenerationManifest, ScoreRow
from evalkit.registry import Registry
from evalkit.store import ImageStore

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class ScoredImage:
    """One generated image with its identity and its generation record (None image: not loaded or not generated)."""

    model: str
    method: str
    variant: str
    dataset: str
    prompt_id: str
    seed: int
    prompt: str
    subjects: tuple[str, ...]
    image: Image.Image | None
    record: dict


@dataclass(frozen=True)
class ScoredSet:
    """The set being scored, as its generation manifest describes it, and what else the experiment generated."""

    manifest: GenerationManifest
    manifests: list[GenerationManifest]  # every generated (model, variant, dataset) of the experiment, this one included
    store: ImageStore


class Scorer(ABC):
    """Base class of all scorers; subclasses set `name` (the registry key), `metrics`, and in `__init__`
    `provenance` (which model, checkpoint and preprocessing), and implement `score_batch`."""

    # metric name -> higher is better; a family of metrics "name/<part>" (one per subject, say) is listed as "name/"
    metrics: ClassVar[dict[str, bool]]
    needs_images: ClassVar[bool] = True
    # one value per set (FID): the set cannot be split between scoring shards (evalkit/sharding.py)
    set_level: ClassVar[bool] = False
    name: ClassVar[str]
    provenance: str

    def __init__(self, device: torch.device, batch_size: int = DEFAULT_BATCH_SIZE):
        self.check_batch_size(batch_size)
        self.device = device
        self.batch_size = batch_size
        self._rows: list[ScoreRow] = []

    @classmethod
    def check_batch_size(cls, batch_size: Any) -> None:
        """ConfigError unless `batch_size` (images per model call) is a positive integer."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"scorer {cls.name}: batch_size must be an integer of at least 1, got {batch_size!r}")

    @classmethod
    def check_weights(cls, tiny: bool, random_weights: bool) -> None:
        """ConfigError for a scorer asked for both its tiny stand-in and its full-size random-weight architecture."""
        if tiny and random_weights:
            raise ConfigError(f"scorer {cls.name}: tiny and random_weights exclude each other (tiny models are random "
                              "already)")

    @classmethod
    def preflight(cls, params: Mapping[str, Any], methods: Sequence[str], specs: Sequence[PromptSpec]) -> None:
        """Raise ConfigError or PromptError, naming the first problem, if this scorer (its config's `params`) cannot
        score an experiment generating `methods` on the prompts `specs`. Called before any image is generated, so
        it loads no model; `specs` is empty where the prompts are not known yet. Most scorers can score anything."""

    def begin_set(self, scored_set: ScoredSet) -> None:
        """Called after `reset`, before the set's images are passed to `update`; scorers that read more than the
        images they are given (another variant's images) find it here."""

    def update(self, items: Iterable[ScoredImage]) -> None:
        """Score `items` and keep their rows until `compute`: failed generations get no rows, the others go to
        `score_batch` in batches of `batch_size`. `items` may be lazy (the score stage reads each image from the store
        as it is reached), so a set's images are never all in memory."""
        with tqdm(total=len(items) if isinstance(items, Sized) else None, desc=self.name, unit="image") as progress:
            batch: list[ScoredImage] = []
            for index, item in enumerate(items):
                if index == 0 and item.variant:  # the score stage passes one variant's images
                    progress.set_description(f"{self.name} {item.variant}", refresh=False)
                if item.record["status"] != "ok":
                    progress.update(1)
                    continue
                if self.needs_images and item.image is None:
                    raise ValueError(f"scorer {self.name} needs images; {item.prompt_id} seed {item.seed} was passed "
                                     f"without one")
                batch.append(item)
                if len(batch) == self.batch_size:
                    self.score_batch(batch)
                    progress.update(len(batch))
                    batch = []
            if batch:
                self.score_batch(batch)
                progress.update(len(batch))

    @abstractmethod
    def score_batch(self, items: list[ScoredImage]) -> None:
        """Score one batch (at most `batch_size` items, each generated, with its image where `needs_images`): add
        its rows with `_add_row`."""

    def compute(self) -> list[dict]:
        """The rows of every item passed to `update` since the last `reset`, as dicts (`ScoreRow.as_dict`)."""
        return [row.as_dict() for row in self._rows]

    def reset(self) -> None:
        self._rows = []

    def _add_row(self, item: ScoredImage, metric: str, value: float) -> None:
        self._rows.append(ScoreRow(
            model=item.model, method=item.method, variant=item.variant, dataset=item.dataset,
            prompt_id=item.prompt_id, seed=item.seed, metric=metric, value=float(value), scorer=self.provenance,
        ))

    def _set_row(self, scored_set: ScoredSet, metric: str, value: float, n_images: int) -> ScoreRow:
        """The row of a set-level metric: no prompt_id or seed, and how many images the value comes from."""
        manifest = scored_set.manifest
        return ScoreRow(
            model=manifest.model, method=manifest.method, variant=manifest.variant, dataset=manifest.dataset,
            prompt_id=None, seed=None, metric=metric, value=float(value), scorer=self.provenance, n_images=n_images,
        )


SCORERS: Registry[Scorer] = Registry("scorer", "evalkit.scoring")


def preflight_scorer(config: Mapping[str, Any], methods: Sequence[str], specs: Sequence[PromptSpec] = ()) -> None:
    """Raise ConfigError or PromptError for a scorer config that cannot score an experiment generating `methods` on
    `specs`, without building the scorer (no model is loaded)."""
    cls, params = SCORERS.resolve(config, supplied=1)  # the device is the caller's
    if "batch_size" in params:
        cls.check_batch_size(params["batch_size"])
    cls.preflight(params, methods, specs)
