"""Splitting a run between jobs: `shard=i/n` gives job i its share of the work, and the n shares together are
exactly the unsharded run, whatever n.

Generation. A method's work items are its (prompt, seed) pairs. Seeds of one prompt are sampled in batches of
`batch_size`, taken in the order `seeds` lists them, and a shard never splits a batch: a seed sampled in a batch and
the same seed sampled alone differ in float rounding, which changes a few pixel values of the PNG (measured on the
tiny model: 6 of 8 images, by one level), so splitting batches would make a sharded run's images differ from the
unsharded run's. The batches, prompt by prompt in dataset order, are dealt round-robin: batch k goes to shard
k mod n. Shards then differ by at most one batch, and shard i of method m is the same (prompt, seed) items for every
m, so a sweep over methods x shards covers every (method, prompt, seed) once.

Scoring. The score stage sees whatever the store holds when it runs, and shards may run while generation is still
adding images, so no list of images is shared between them. An image (prompt_id, seed) goes to shard
sha256("<prompt_id>/<seed>") mod n instead: a rule that needs no list, so shards never overlap and never miss an image
that all of them see. A set-level scorer (FID) needs every image of a set in one computation; its tables, one per
(scorer, model, variant, dataset), are dealt by the same hash of the table's name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from evalkit.errors import ConfigError

T = TypeVar("T")

_PART_SUFFIX = re.compile(r"\.shard-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: object) -> Shard:
        """`"i/n"` with 0 <= i < n."""
        try:
            index, count = (int(part) for part in str(text).split("/"))
        except ValueError:
            raise ConfigError(f"shard must look like i/n, got {text!r}") from None
        if not 0 <= index < count:
            raise ConfigError(f"shard {text}: need 0 <= i < n")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def deal(self, items: Sequence[T]) -> list[T]:
        """This shard's items when `items` are dealt round-robin: item k to shard k mod n."""
        return list(items[self.index :: self.count])

    def owns(self, name: str) -> bool:
        """Whether the item called `name` hashes to this shard; the same for every process and Python version."""
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % self.count == self.index

    @property
    def part_suffix(self) -> str:
        """Appended to the stem of a table that holds one shard's part; empty for the unsharded 0/1."""
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"

    @classmethod
    def of_part(cls, stem: str) -> tuple[str, Shard]:
        """(the whole table's stem, the shard) of a table's file stem: `x.shard-1-of-4` -> (`x`, 1/4), `x` -> (`x`, 0/1)."""
        match = _PART_SUFFIX.search(stem)
        if match is None:
            return stem, cls(0, 1)
        return stem[: match.start()], cls.parse(f"{match.group(1)}/{match.group(2)}")


def generation_batches(specs: Sequence[T], seeds: Sequence[int], batch_size: int) -> list[tuple[T, list[int]]]:
    """A method's work as the generate stage samples it: (prompt, seeds) batches, prompt by prompt, each prompt's
    seeds in batches of `batch_size` in the order given; `Shard.deal` splits this list between shards."""
    return [(spec, list(seeds[start : start + batch_size])) for spec in specs for start in range(0, len(seeds), batch_size)]


def image_name(prompt_id: str, seed: int) -> str:
    """What the scoring shards hash for an image."""
    return f"{prompt_id}/{seed}"
