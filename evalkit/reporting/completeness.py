"""What an experiment has done so far: score tables assembled from their shard parts, and what is still missing.

The score stage writes one table per (scorer, model, variant, dataset), `<stem>.csv`, or when sharded one part per
shard, `<stem>.shard-i-of-n.csv` (evalkit/sharding.py). Aggregation reads whatever parts exist, so a report can be
made while shards are still running or after some failed, and lists each set that is not complete: images the
experiment asks for that are not generated, images not scored by a scorer (with the shard parts that are absent), and
set-level scores (FID) that are absent or were computed from fewer images than the store now holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from evalkit.records import SCORE_COLUMNS
from evalkit.sharding import Shard

_EXAMPLES = 5  # images named in a missing entry; the rest are counted


@dataclass(frozen=True)
class Missing:
    """One incomplete piece of work: `n_missing` of `n_expected` images of a set lack `stage` ("generate" or
    "score <scorer>")."""

    model: str
    variant: str
    dataset: str
    stage: str
    n_missing: int
    n_expected: int
    detail: str

    def __str__(self) -> str:
        return (f"{self.stage}: {self.model}/{self.variant}/{self.dataset}: {self.n_missing} of {self.n_expected} "
                f"images missing ({self.detail})")


def table_files(folder: Path, stem: str) -> list[tuple[Path, Shard]]:
    """The table `<stem>.csv` and its shard parts `<stem>.shard-i-of-n.csv` in `folder`, oldest first."""
    found = []
    for path in folder.glob(f"{stem}*.csv"):
        whole, shard = Shard.of_part(path.stem)
        if whole == stem:
            found.append((path, shard))
    return sorted(found, key=lambda item: (item[0].stat().st_mtime_ns, item[0].name))


def merge_tables(files: list[tuple[Path, Shard]]) -> pd.DataFrame:
    """The rows of every file; where files overlap (the set was scored unsharded, then re-scored with other shard
    counts), an image's metric keeps its row from the newest file."""
    tables = [pd.read_csv(path, dtype={"prompt_id": str}) for path, _ in files]
    if not tables:
        return pd.DataFrame(columns=SCORE_COLUMNS)
    rows = pd.concat(tables, ignore_index=True)
    per_image = rows["prompt_id"].notna()
    newest = ~rows[per_image].duplicated(["prompt_id", "seed", "metric"], keep="last")
    return pd.concat([rows[per_image][newest], rows[~per_image]], ignore_index=True)


def absent_parts(files: list[tuple[Path, Shard]]) -> list[Shard]:
    """For every shard count n that has parts, the parts i/n that do not exist."""
    present = {shard for _, shard in files if shard.count > 1}
    counts = sorted({shard.count for shard in present})
    return [Shard(i, n) for n in counts for i in range(n) if Shard(i, n) not in present]


def _examples(images: set[tuple[str, int]]) -> str:
    named = sorted(images)[:_EXAMPLES]
    more = len(images) - len(named)
    return ", ".join(f"{prompt_id} seed {seed}" for prompt_id, seed in named) + (f", and {more} more" if more else "")


def missing_images(
    set_id: tuple[str, str, str], stage: str, expected: set[tuple[str, int]], done: set[tuple[str, int]], note: str = ""
) -> Missing | None:
    """The `expected` (prompt_id, seed) images not in `done`, or None when every one is."""
    lacking = expected - done
    if not lacking:
        return None
    detail = _examples(lacking) + (f"; {note}" if note else "")
    return Missing(*set_id, stage, len(lacking), len(expected), detail)


def missing_scores(
    set_id: tuple[str, str, str], scorer_key: str, set_level: bool, files: list[tuple[Path, Shard]],
    scores: pd.DataFrame, images: set[tuple[str, int]],
) -> Missing | None:
    """What the tables `files` (merged into `scores`) lack of a scorer's results for a set whose generated images
    are `images`, or None when they are complete."""
    stage = f"score {scorer_key}"
    if set_level:
        if scores.empty:
            return Missing(*set_id, stage, len(images), len(images), "the set-level score is not computed")
        scored = int(scores["n_images"].max())
        if scored == len(images):
            return None
        return Missing(*set_id, stage, len(images) - scored, len(images),
                       f"the set-level score was computed from {scored} images; re-run score")
    absent = absent_parts(files)
    if not files:
        note = "no table"
    elif absent:
        note = "shard parts not written: " + ", ".join(str(shard) for shard in absent)
    else:
        note = ""
    return missing_images(set_id, stage, images, set(zip(scores["prompt_id"], scores["seed"].astype(int))), note)
