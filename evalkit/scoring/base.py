"""The scorer contract: scorers collect rows in `update` and return them in `compute`, as torchmetrics metrics do.

Every row is one value of one metric for one image, keyed by (model, method, variant, dataset, prompt_id, seed), and
carries the scorer's `name` so a results table says which model, checkpoint and preprocessing produced each value.
A set-level metric (FID) gives one row per set instead: prompt_id and seed empty, and `n_images`, the number of
images the value was computed from.
The score stage scores one set at a time (one variant of one model on one dataset): `reset`, `begin_set`, `update`
for batches of its images, `compute`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from PIL import Image

from evalkit.errors import ConfigError
from evalkit.prompts import PromptSpec
from evalkit.store import ImageStore


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

    manifest: dict
    manifests: list[dict]  # every generated (model, variant, dataset) of the experiment, this one included
    store: ImageStore


class Scorer(ABC):
    """Base class of all scorers; subclasses set `metrics`, `name` and implement `update`."""

    # metric name -> higher is better; a family of metrics "name/<part>" (one per subject, say) is listed as "name/"
    metrics: ClassVar[dict[str, bool]]
    needs_images: ClassVar[bool] = True
    # one value per set (FID): the set cannot be split between scoring shards (evalkit/sharding.py)
    set_level: ClassVar[bool] = False
    name: str

    def __init__(self, device: torch.device):
        self.device = device
        self._rows: list[dict] = []

    @classmethod
    def check(cls, params: dict[str, Any], methods: list[str]) -> None:
        """Raise ConfigError for what makes these parameters unusable in an experiment generating `methods`; called
        before any image is generated, so it loads no model."""

    @classmethod
    def check_prompt(cls, spec: PromptSpec) -> None:
        """Raise PromptError if this scorer cannot score images of `spec` (called before any generation)."""

    def begin_set(self, scored_set: ScoredSet) -> None:
        """Called after `reset`, before the set's images are passed to `update`; scorers that read more than the
        images they are given (another variant's images) find it here."""

    @staticmethod
    def generated_images(items: list[ScoredImage]) -> list[ScoredImage]:
        """The items whose generation succeeded, each with its image; failed generations have none and get no rows."""
        scored = [item for item in items if item.record["status"] == "ok"]
        for item in scored:
            if item.image is None:
                raise ValueError(f"image scorers need images; {item.prompt_id} seed {item.seed} was passed without one")
        return scored

    @abstractmethod
    def update(self, items: list[ScoredImage]) -> None:
        """Score `items` and keep their rows until `compute`."""

    @classmethod
    def check_prompts(cls, config: Mapping[str, Any], specs: Sequence[PromptSpec]) -> None:
        """Raise an error naming the first prompt this scorer (built from `config`) could not score; generation
        calls it before making any image. Most scorers can score any prompt."""

    def compute(self) -> list[dict]:
        """The rows of every item passed to `update` since the last `reset`."""
        return list(self._rows)

    def reset(self) -> None:
        self._rows = []

    def _add_row(self, item: ScoredImage, metric: str, value: float) -> None:
        self._rows.append(
            {
                "model": item.model,
                "method": item.method,
                "variant": item.variant,
                "dataset": item.dataset,
                "prompt_id": item.prompt_id,
                "seed": item.seed,
                "metric": metric,
                "value": float(value),
                "scorer": self.name,
            }
        )

    def _set_row(self, scored_set: ScoredSet, metric: str, value: float, n_images: int) -> dict:
        """The row of a set-level metric: no prompt_id or seed, and how many images the value comes from."""
        manifest = scored_set.manifest
        return {
            "model": manifest["model"],
            "method": manifest["method"],
            "variant": manifest["variant"],
            "dataset": manifest["dataset"],
            "prompt_id": None,
            "seed": None,
            "metric": metric,
            "value": float(value),
            "scorer": self.name,
            "n_images": n_images,
        }


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make the scorer buildable as `{"name": name, ...}`."""

    def register(scorer_class: type[Scorer]) -> type[Scorer]:
        SCORERS[name] = scorer_class
        return scorer_class

    return register


def scorer_class(name: str) -> type[Scorer]:
    """The registered scorer called `name`."""
    # Importing the scorer modules registers them; done here so that importing this module stays cheap.
    import evalkit.scoring.clip_score  # noqa: F401
    import evalkit.scoring.fid  # noqa: F401
    import evalkit.scoring.lpips_score  # noqa: F401
    import evalkit.scoring.detection  # noqa: F401
    import evalkit.scoring.overhead  # noqa: F401
    import evalkit.scoring.shapes_clip  # noqa: F401
    import evalkit.scoring.shapes_detection  # noqa: F401
    import evalkit.scoring.text_similarity  # noqa: F401
    import evalkit.scoring.tifa  # noqa: F401

    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)}")
    return SCORERS[name]


def _class_and_params(config: Mapping[str, Any]) -> tuple[type[Scorer], dict[str, Any]]:
    name = config.get("name")
    cls = scorer_class(name)
    params = {key: value for key, value in config.items() if key != "name"}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "device"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"scorer {name}: unknown parameters {unknown}; it takes {sorted(accepted)}")
    return cls, params


def check_scorer(config: Mapping[str, Any], methods: list[str]) -> None:
    """Raise ConfigError for a scorer config that cannot score an experiment generating `methods`, without
    building the scorer (no model is loaded)."""
    cls, params = _class_and_params(config)
    cls.check(params, methods)


def build_scorer(config: Mapping[str, Any], device: torch.device) -> Scorer:
    """The scorer `config["name"]` names, built with the config's other keys as parameters, on `device`."""
    cls, params = _class_and_params(config)
    return cls(device=device, **params)
