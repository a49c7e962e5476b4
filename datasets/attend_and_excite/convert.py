"""Convert the Attend-and-Excite benchmark (upstream `a.e_prompts.txt`, JSON) into `datasets/attend_and_excite.jsonl`.

Run once from the project root: `python datasets/attend_and_excite/convert.py ../shared/data/attend_and_excite/a.e_prompts.json`.
Every prompt has one of three shapes, each word a known animal, object or colour (see README.md); anything else
stops the conversion, so a new upstream copy cannot slip in a row we annotate wrongly.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ANIMALS = {"bear", "bird", "cat", "dog", "elephant", "frog", "horse", "lion", "monkey", "mouse", "rabbit", "turtle"}
OBJECTS = {"apple", "backpack", "balloon", "bench", "bowl", "car", "chair", "clock", "suitcase", "bow", "crown", "glasses"}
COLOURS = {"black", "blue", "brown", "gray", "green", "orange", "pink", "purple", "red", "white", "yellow"}
SUBSETS = {"animals": 66, "animals_objects": 144, "objects": 66}

# "a cat and a dog", "a cat with a crown", "a cat and a red car", "a red car and a blue bowl" ("an" allowed).
_OBJECT = r"an? (?:(?P<{c}>\w+) )?(?P<{n}>\w+)"
_PATTERN = re.compile("^" + _OBJECT.format(c="c1", n="n1") + r" (?:and|with) " + _OBJECT.format(c="c2", n="n2") + "$")


def annotate(prompt: str) -> tuple[list[str], list[list[str]]]:
    """Subjects (the two nouns) and groups (each noun with its colour, colour first) of one prompt."""
    match = _PATTERN.match(prompt)
    if match is None:
        raise ValueError(f"unexpected prompt shape: {prompt!r}")
    subjects, groups = [], []
    for colour_key, noun_key in (("c1", "n1"), ("c2", "n2")):
        colour, noun = match[colour_key], match[noun_key]
        if noun not in ANIMALS | OBJECTS or (colour is not None and colour not in COLOURS):
            raise ValueError(f"unknown word in {prompt!r}: {colour!r} {noun!r}")
        subjects.append(noun)
        groups.append([colour, noun] if colour else [noun])
    return subjects, groups


def convert(source: Path, target: Path) -> None:
    data = json.loads(source.read_text())
    if {k: len(v) for k, v in data.items()} != SUBSETS:
        raise ValueError(f"expected subsets {SUBSETS}, got { {k: len(v) for k, v in data.items()} }")
    rows = []
    for subset, prompts in data.items():
        for number, prompt in enumerate(prompts):
            subjects, groups = annotate(prompt)
            rows.append({"id": f"{subset}-{number:03d}", "prompt": prompt, "subjects": subjects, "groups": groups,
                         "extra": {"subset": subset}})
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {target}")


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(__file__).resolve().parent.parent / "attend_and_excite.jsonl")
