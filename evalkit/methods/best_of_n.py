"""Best-of-n: the compute-matched baseline. It spends its extra compute on seeds instead of on the sampling:
for each (prompt, seed) it samples n candidates with plain Stable Diffusion and keeps the one a verifier scores
best, so a method can be compared with best-of-n at equal seconds per image (does Attend-and-Excite beat four
tries of vanilla?).

- The verifier is one of the experiment's scorers (`verifier`: its key in `scorers`, e.g. `owlv2` or `clip`) and
  one of its metrics (`verifier_metric`); both are method parameters, so they are part of the variant's name
  (its hash also covers the verifier's scorer config: another threshold keeps other images). A report metric
  from the same scorer rates what best-of-n selected for; each record's `selection.verifier_scorer` names that
  scorer exactly as its score rows do, and the report marks that metric (†) in best_of_n's rows.
- Candidate 0 of seed s is seed s itself (plain sampling's image of that seed, bit for bit: best-of-1 is
  vanilla); candidate k >= 1 is a seed derived from (s, k) by SHA-256, the same for every n, so best-of-2's
  candidates are best-of-4's first two. Candidate k of every seed of a call is sampled as one batch of the call's
  size, as vanilla samples the seeds.
- Ties keep the earliest candidate; a candidate whose generation failed (NaN) is never kept, nor one the verifier
  gives no score (NaN); when every candidate failed, the image is recorded failed, at candidate 0's step.
- Cost: `seconds_per_image` counts the sampling of all n candidates and the verifier's scoring of them (selecting
  is part of the method; the verifier's model loading and first call are not timed, as the loop's warm-up is not).
  Peak memory is the sampling's; the verifier's model is not counted in it. The record's `selection` gives the
  candidates, their scores and both times.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from evalkit.errors import ConfigError
from evalkit.sampling.loop import SampleResult
from evalkit.sampling.method import METHODS, Method
from evalkit.scoring.base import SCORERS, ScoredImage, Scorer


def candidate_seed(seed: int, k: int) -> int:
    """Candidate k of `seed`: the seed itself for k = 0, else 63 bits of SHA-256 of (seed, k)."""
    if k == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"best_of_n/{seed}/{k}".encode()).digest()[:8], "big") >> 1


def best_candidate(scores: list[float], higher_is_better: bool) -> int | None:
    """The index of the best score (the earliest among ties), ignoring NaN; None when every score is NaN."""
    valid = [(score if higher_is_better else -score, -k) for k, score in enumerate(scores) if not math.isnan(score)]
    return -max(valid)[1] if valid else None


@METHODS.register
@dataclass
class BestOfN(Method):
    """`n` plain samples per (prompt, seed), the one `verifier`'s `verifier_metric` rates best kept."""

    name = "best_of_n"

    n: int = 4
    verifier: str = "owlv2"
    verifier_metric: str = "detection_rate"
    # The verifier's scorer config, from the experiment (`configure_for_experiment`), and the scorer once built.
    verifier_config: dict | None = field(default=None, init=False, repr=False, compare=False)
    _verifier: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer of at least 1 (samples per image), got {self.n!r}")

    def configure_for_experiment(self, scorers: Mapping[str, Mapping[str, Any]]) -> None:
        if self.verifier not in scorers:
            raise ConfigError(
                f"method {self.name}: verifier {self.verifier!r} is not among the experiment's scorers "
                f"({', '.join(sorted(scorers)) or 'none'}); name one of them, or add it with scorer=[...]"
            )
        config = dict(scorers[self.verifier])
        cls = SCORERS[config["name"]]
        if cls.set_level or not cls.needs_images or cls.begin_set is not Scorer.begin_set:
            raise ConfigError(
                f"method {self.name}: verifier {self.verifier!r} ({config['name']}) cannot rate one image alone; "
                "use a per-image scorer such as owlv2 or clip"
            )
        if self.verifier_metric not in cls.metrics or self.verifier_metric.endswith("/"):
            metrics = [metric for metric in cls.metrics if not metric.endswith("/")]
            raise ConfigError(
                f"method {self.name}: verifier {self.verifier!r} gives no metric {self.verifier_metric!r}; "
                f"it gives {metrics}"
            )
        self.verifier_config = config

    def plain_samples_per_image(self) -> int:
        return self.n

    def sample_images(self, sample_call, spec, seeds):
        if self.verifier_config is None:
            raise RuntimeError("best_of_n needs configure_for_experiment(scorers) before sampling")
        candidates = [[candidate_seed(seed, k) for seed in seeds] for k in range(self.n)]
        results = [sample_call(batch) for batch in candidates]
        if self._verifier is None:  # built and run once outside the timing, as the loop's warm-up
            self._verifier = SCORERS.build(self.verifier_config, results[0].latents.device)
            self._scores(spec, candidates[:1], results[:1])
        start = time.perf_counter()
        scores = self._scores(spec, candidates, results)
        verifier_seconds = time.perf_counter() - start
        sampling_seconds = sum(result.seconds for result in results)

        higher_is_better = type(self._verifier).metrics[self.verifier_metric]
        chosen = [best_candidate([scores[k][j] for k in range(self.n)], higher_is_better) for j in range(len(seeds))]
        kept = [(0 if k is None else k, j) for j, k in enumerate(chosen)]  # all failed: candidate 0's failure
        diagnostics = [None if results[k].attention_diagnostics is None else results[k].attention_diagnostics[j] for k, j in kept]
        peaks = [result.peak_memory_bytes for result in results if result.peak_memory_bytes is not None]
        share = len(seeds)
        selection = [
            {
                "n": self.n, "verifier": self.verifier, "verifier_scorer": self._verifier.provenance,
                "verifier_metric": self.verifier_metric, "higher_is_better": higher_is_better,
                "candidate_seeds": [candidates[k][j] for k in range(self.n)],
                "candidate_scores": [None if math.isnan(scores[k][j]) else scores[k][j] for k in range(self.n)],
                "chosen": chosen[j], "sampling_seconds": sampling_seconds / share, "verifier_seconds": verifier_seconds / share,
            }
            for j in range(len(seeds))
        ]
        return SampleResult(
            images=[results[k].images[j] for k, j in kept],
            latents=torch.stack([results[k].latents[j] for k, j in kept]),
            seconds=sampling_seconds + verifier_seconds,
            peak_memory_bytes=max(peaks) if peaks else None,
            failed_step=[None if chosen[j] is not None else results[0].failed_step[j] for j in range(len(seeds))],
            notes=list(dict.fromkeys(note for result in results for note in result.notes)),
            attention_diagnostics=None if any(d is None for d in diagnostics) else diagnostics,
            attention_diagnostics_skipped=results[0].attention_diagnostics_skipped,
            selection=selection,
        )

    def _scores(self, spec, candidates: list[list[int]], results) -> list[list[float]]:
        """scores[k][j]: the verifier metric of candidate k of seed j; NaN where it failed or has no score."""
        verifier = self._verifier
        verifier.reset()
        # The verifier keys its rows by seed; the other fields of an item name no stored image.
        items = [
            ScoredImage("", self.name, "", "", spec.id, seed, spec.prompt, spec.subjects, image, {"status": "ok"})
            for batch, result in zip(candidates, results)
            for seed, image, failed in zip(batch, result.images, result.failed_step)
            if failed is None
        ]
        verifier.update(items)
        by_seed = {row["seed"]: row["value"] for row in verifier.compute() if row["metric"] == self.verifier_metric}
        return [[by_seed.get(seed, math.nan) for seed in batch] for batch in candidates]
