"""Which pairs of shapes the shapes-world model sees together in training, and which it never sees (the unseen split).

Every shape is seen, alone and with other shapes; five of the fifteen pairs of shapes never appear together in a
training scene (in any caption form, with or without colours, nor inside a scene of three). The unseen prompt
set is made of those pairs, so that a result on it is about composing known objects, not recalling a training
caption. Each shape is in at most two unseen pairs, so each keeps at least three seen partners.
"""

from __future__ import annotations

from itertools import combinations

from evalkit.world.scenes import SHAPES, Scene

UNSEEN_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset(pair)
    for pair in [("circle", "star"), ("square", "heart"), ("triangle", "cross"), ("circle", "cross"), ("square", "triangle")]
)
SEEN_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset(pair) for pair in combinations(SHAPES, 2) if frozenset(pair) not in UNSEEN_PAIRS
)


def is_seen(scene: Scene) -> bool:
    """Whether `scene` may appear in training: no two of its items form an unseen pair."""
    return all(frozenset(pair) not in UNSEEN_PAIRS for pair in combinations(scene.subjects, 2))
