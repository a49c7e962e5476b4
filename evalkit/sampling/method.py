"""The plugin contract between the shared denoising loop and a method, and the method registry: a method is a
`@METHODS.register` dataclass in `evalkit/methods/<name>.py`, configured by `conf/method/<name>.yaml`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from evalkit.errors import PromptError
from evalkit.prompts import PromptSpec
from evalkit.registry import Registry

if TYPE_CHECKING:
    from evalkit.sampling.loop import DenoisingRun, SampleResult


@dataclasses.dataclass
class Method:
    """A method brings only what its paper adds to plain sampling; each hook's default is plain Stable Diffusion.

    Subclasses are dataclasses whose fields are the paper's hyperparameters (defaults in `conf/method/`).
    `requires` names the prompt annotations the method reads: "subjects", "groups", "segments". `report_note`:
    what a reader of a report must know about our implementation (a deliberate difference from the paper's code).
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    report_note: ClassVar[str | None] = None

    def preflight(self, spec: PromptSpec, indexer) -> None:
        """Fail before any generation if the prompt is too long, lacks what the method needs or names words not in
        it. Every method refuses a prompt past the text encoder's length rather than have it silently truncated."""
        indexer.check_length(spec.id, spec.prompt)
        for annotation in self.requires:
            if not getattr(spec, annotation):
                raise PromptError(f"method {self.name} needs {annotation} for prompt {spec.id!r} ({spec.prompt!r}); the prompt set gives none")
        if "subjects" in self.requires:
            indexer.subject_indices(spec)
        if "groups" in self.requires:
            indexer.group_indices(spec)

    def configure_for_experiment(self, scorers: Mapping[str, Mapping[str, Any]]) -> None:
        """Take from the experiment's scorer configs (by key) what the method needs beyond its own parameters, or
        raise ConfigError; called before any model loads. Most methods need nothing (best_of_n: its verifier)."""

    def sample_images(self, sample_call: Callable[[list[int]], SampleResult], spec: PromptSpec, seeds: list[int]) -> SampleResult:
        """The images of `seeds` for `spec`: one call of the shared loop with this method (`sample_call(seeds)`). A
        method that spends its compute on more seeds (best_of_n) samples candidates and keeps some."""
        return sample_call(seeds)

    def plain_samples_per_image(self) -> int | None:
        """For a method that only chooses among plain samples (best_of_n), how many it draws per image it keeps;
        the benchmark times it as that many vanilla images plus its verifier. None: the method changes sampling."""
        return None

    def setup(self, run: DenoisingRun) -> None:
        """Called once per sampling call, after the prompt is encoded and the initial latents drawn."""

    def teardown(self, run: DenoisingRun) -> None:
        """Undo whatever `setup` installed; called even if setup or sampling fails part-way."""

    def update_latents(self, run: DenoisingRun, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Change the latents before loop step `i` (gradient steps on a loss over attention maps)."""
        return latents

    def predict_noise(self, run: DenoisingRun, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The noise prediction the scheduler steps with; classifier-free guidance by default."""
        return run.guided_noise(t, latents)


METHODS: Registry[Method] = Registry("method", "evalkit.methods")
