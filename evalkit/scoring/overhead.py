"""Computational overhead read from the generation records: wall time and peak accelerator memory per image.

The relative overhead against the vanilla method is a comparison between methods, made in aggregation.
"""

from __future__ import annotations

import math

from evalkit.scoring.base import SCORERS, ScoredImage, Scorer

BYTES_PER_MB = 2**20  # MiB, the unit torch.cuda memory statistics are usually reported in


@SCORERS.register
class OverheadScorer(Scorer):
    name = "overhead"
    metrics = {"seconds_per_image": False, "peak_memory_mb": False}
    needs_images = False
    provenance = "generation records (wall time per image, warm-up excluded; peak accelerator memory)"

    def score_batch(self, items: list[ScoredImage]) -> None:
        """Memory is NaN where none was measured (CPU runs)."""
        for item in items:
            record = item.record
            self._add_row(item, "seconds_per_image", record["seconds_per_image"])
            peak_bytes = record["peak_memory_bytes"]
            self._add_row(item, "peak_memory_mb", math.nan if peak_bytes is None else peak_bytes / BYTES_PER_MB)
