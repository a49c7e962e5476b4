"""Detection rate in the shapes world (evalkit/world/), with the OWLv2 scorer's rows and colour-correct detection.

The detector is analytic (evalkit/world/detector.py: palette colours, connected regions, outline templates); its
per-object accuracy on held-out renders is measured by `python -m evalkit.world.detector` and held by a test.

Rows per image, as the owlv2 scorer's: `detection_rate` (1 or 0: every subject found, in any colour) and
`detection/<subject>`. For prompts that name colours ("a red circle and a blue star"), also
`colour_detection_rate` (every subject found in the colour the prompt gives it) and `colour_detection/<subject>`:
a red circle and a red star for that prompt detect both shapes but only the circle in its colour. A subject
whose colour the prompt does not name counts in any colour.

A prompt's colours are read from its words (the word before a shape), since scorers see the prompt and its
subjects; so that nothing is scored on a misreading, a prompt must be written in the world's words only (articles,
the caption forms' joining words, shapes, colours), name each shape once, list every shape as a subject, and put
each colour right before a shape.
"""

from __future__ import annotations

import re

import torch

from evalkit.errors import ConfigError, PromptError
from evalkit.prompts import PromptSpec
from evalkit.records import RATE_METRIC, SUBJECT_METRIC_PREFIX
from evalkit.scoring.base import SCORERS, ScoredImage, Scorer
from evalkit.world.detector import (
    MAX_AREA_SHARE,
    MIN_AREA_SHARE,
    MIN_SHAPE_SCORE,
    TEMPLATE_SIDE,
    detect,
)
from evalkit.world.scenes import COLOURS, FORMS, SHAPES

COLOUR_RATE_METRIC = "colour_detection_rate"
COLOUR_SUBJECT_METRIC_PREFIX = "colour_detection/"
ARTICLES = frozenset({"a", "an"})
JOINING_WORDS = frozenset(word for template in FORMS.values() for word in re.findall(r"[a-z]+", template))
WORLD_WORDS = ARTICLES | JOINING_WORDS | frozenset(SHAPES) | frozenset(COLOURS)


def named_colours(spec: PromptSpec) -> dict[str, str | None]:
    """Each subject of a world prompt and the colour the prompt gives it (None: no colour named)."""
    words = re.findall(r"[a-z]+", spec.prompt.lower())
    where = f"prompt {spec.id!r} ({spec.prompt!r})"
    outside = sorted(set(words) - WORLD_WORDS)
    if outside:
        raise PromptError(f"{where}: {outside} are not words of the shapes world; the shapes_detection scorer "
                          f"reads prompts of shapes ({', '.join(SHAPES)}) and colours ({', '.join(COLOURS)}) only")
    if not spec.subjects or len(set(spec.subjects)) != len(spec.subjects) or set(spec.subjects) - set(SHAPES):
        raise PromptError(f"{where}: its subjects {list(spec.subjects)} must be distinct shapes of the world "
                          f"({', '.join(SHAPES)})")
    named = [word for word in words if word in SHAPES]
    if sorted(named) != sorted(spec.subjects):
        raise PromptError(f"{where}: the shapes it names, {named}, must be its subjects {list(spec.subjects)}, "
                          f"each named once")
    colours: dict[str, str | None] = dict.fromkeys(spec.subjects)
    for position, word in enumerate(words):
        if word in COLOURS:
            if position + 1 == len(words) or words[position + 1] not in SHAPES:
                raise PromptError(f"{where}: the colour {word!r} is not right before a shape")
            colours[words[position + 1]] = word
    return colours


@SCORERS.register
class ShapesDetectionScorer(Scorer):
    name = "shapes_detection"
    metrics = {RATE_METRIC: True, SUBJECT_METRIC_PREFIX: True, COLOUR_RATE_METRIC: True, COLOUR_SUBJECT_METRIC_PREFIX: True}

    def __init__(self, device: torch.device, threshold: float = MIN_SHAPE_SCORE):
        super().__init__(device)  # numpy on the CPU whatever the device
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"scorer shapes_detection: threshold is a shape score in (0, 1], got {threshold}")
        self.threshold = threshold
        self.provenance = (
            f"shapes_detection: analytic detector of the shapes world (evalkit/world/detector.py): pixels matched "
            f"to palette colour rays from the background, 8-connected regions of {MIN_AREA_SHARE:.1%}-"
            f"{MAX_AREA_SHARE:.0%} of the image (split by colour where no shape fits), shape by outline template "
            f"IoU at {TEMPLATE_SIDE}x{TEMPLATE_SIDE} x aspect agreement >= {threshold}, colour the region's most "
            f"frequent; success = every subject found (colour_detection: in the colour the prompt names)"
        )

    @classmethod
    def preflight(cls, params, methods, specs) -> None:
        for spec in specs:
            named_colours(spec)

    def score_batch(self, items: list[ScoredImage]) -> None:
        for item in items:
            colours = named_colours(PromptSpec(item.prompt_id, item.prompt, item.subjects))
            found = {(d.shape, d.colour) for d in detect(item.image, self.threshold)}
            shapes_found = {shape for shape, _ in found}
            detected = {subject: subject in shapes_found for subject in colours}
            self._add_row(item, RATE_METRIC, float(all(detected.values())))
            for subject, hit in detected.items():
                self._add_row(item, SUBJECT_METRIC_PREFIX + subject, float(hit))
            if any(colours.values()):
                in_colour = {subject: detected[subject] if colour is None else (subject, colour) in found
                             for subject, colour in colours.items()}
                self._add_row(item, COLOUR_RATE_METRIC, float(all(in_colour.values())))
                for subject, hit in in_colour.items():
                    self._add_row(item, COLOUR_SUBJECT_METRIC_PREFIX + subject, float(hit))
