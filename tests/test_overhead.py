import math

import torch

from evalkit.scoring.base import SCORERS, ScoredImage

CPU = torch.device("cpu")


def item(prompt_id: str, seconds: float, peak_bytes: int | None, status: str = "ok") -> ScoredImage:
    return ScoredImage(
        model="tiny",
        method="attend_and_excite",
        variant="default",
        dataset="demo",
        prompt_id=prompt_id,
        seed=0,
        prompt="a cat and a dog",
        subjects=("cat", "dog"),
        image=None,
        record={"seconds_per_image": seconds, "peak_memory_bytes": peak_bytes, "status": status},
    )


def test_overhead_rows_come_from_the_records():
    scorer = SCORERS.build({"name": "overhead"}, CPU)
    assert not scorer.needs_images
    assert scorer.metrics == {"seconds_per_image": False, "peak_memory_mb": False}
    scorer.update([item("p0", 2.5, 3 * 2**20), item("p1", 1.5, None), item("p2", 9.0, 2**30, status="failed")])
    rows = {(row["prompt_id"], row["metric"]): row for row in scorer.compute()}
    assert set(rows) == {
        ("p0", "seconds_per_image"), ("p0", "peak_memory_mb"), ("p1", "seconds_per_image"), ("p1", "peak_memory_mb")
    }
    assert rows["p0", "seconds_per_image"]["value"] == 2.5
    assert rows["p0", "peak_memory_mb"]["value"] == 3.0
    assert math.isnan(rows["p1", "peak_memory_mb"]["value"])
    assert rows["p0", "seconds_per_image"]["scorer"].startswith("generation records")
    assert rows["p0", "seconds_per_image"]["method"] == "attend_and_excite"


def test_reset_clears_rows():
    scorer = SCORERS.build({"name": "overhead"}, CPU)
    scorer.update([item("p0", 1.0, None)])
    scorer.reset()
    assert scorer.compute() == []
