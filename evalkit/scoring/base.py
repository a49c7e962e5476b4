"""The scorer contract: scorers collect rows in `update` and return them in `compute`, as torchmetrics metrics do.

Every row is one value of one metric for one image, keyed by (model, method, variant, dataset, prompt_id, seed), and
carries the scorer's `name` so a results table says which model, checkpoint and preprocessing produced each value.
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


class Scorer(ABC):
    """Base class of all scorers; subclasses set `metrics`, `name` and implement `update`."""

    metrics: ClassVar[dict[str, bool]]  # metric name -> higher is better
    needs_images: ClassVar[bool] = True
    name: str

    def __init__(self, device: torch.device):
        self.device = device
        self._rows: list[dict] = []

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
    import evalkit.scoring.overhead  # noqa: F401
    import evalkit.scoring.tifa  # noqa: F401

    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)}")
    return SCORERS[name]


def build_scorer(config: Mapping[str, Any], device: torch.device) -> Scorer:
    """The scorer `config["name"]` names, built with the config's other keys as parameters, on `device`."""
    name = config.get("name")
    cls = scorer_class(name)
    params = {key: value for key, value in config.items() if key != "name"}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "device"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"scorer {name}: unknown parameters {unknown}; it takes {sorted(accepted)}")
    return cls(device=device, **params)
