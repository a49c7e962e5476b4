"""The shapes world's prompt sets: `datasets/shapes_seen.jsonl` and `datasets/shapes_unseen.jsonl`.

`python -m evalkit.world.prompt_set` writes both, and one mask PNG per segment under `datasets/shapes/masks/`
(see datasets/shapes.README.md). The output is a function of the code and `SEED` alone.

Each split holds its pairs of shapes (evalkit/world/split.py) in the two-object caption forms of the
Attend-and-Excite benchmark, in both orders: "a circle and a star" and "a circle with a star" once per ordered
pair, "a red circle and a blue star" `COLOURINGS_PER_ORDER` times per ordered pair, with distinct pairs of
distinct colours drawn at random. Rows come in a seeded random order. Every row carries a DenseDiffusion
layout: a scene of its caption drawn by the renderer at the model's resolution, whose item masks are its
segments.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations, permutations
from pathlib import Path

import numpy as np
from PIL import Image

from evalkit.paths import PROJECT_ROOT
from evalkit.world.scenes import (
    COLOURED_FORMS,
    COLOURS,
    SHAPES,
    Scene,
    render,
    sample_scene,
)
from evalkit.world.split import UNSEEN_PAIRS

SEED = 1414
SPLITS = ("seen", "unseen")
FORMS_IN_SETS = ("shape_pair", "shape_with_shape", "coloured_pair")
COLOURINGS_PER_ORDER = 6
RESOLUTION = 128  # the shapes model's images (conf/model/tiny.yaml's resolution)
MASK_FOLDER = "shapes/masks"  # relative to the datasets folder, as rows name their masks


def ordered_pairs(split: str) -> list[tuple[str, str]]:
    """The split's pairs of shapes, each in both orders, in SHAPES' order."""
    pairs = [pair for pair in combinations(SHAPES, 2) if (frozenset(pair) in UNSEEN_PAIRS) == (split == "unseen")]
    return [ordered for a, b in pairs for ordered in ((a, b), (b, a))]


def _row(scene: Scene, split: str, prompt_id: str, masks: list[np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """The scene's dataset row and its mask files (path relative to the datasets folder -> mask)."""
    coloured = scene.form in COLOURED_FORMS
    files = {f"{MASK_FOLDER}/{prompt_id}_background.png": ~np.any(masks, axis=0)}
    segments = [{"phrase": "", "mask": f"{MASK_FOLDER}/{prompt_id}_background.png"}]
    for item, mask in zip(scene.items, masks):
        path = f"{MASK_FOLDER}/{prompt_id}_{item.shape}.png"
        files[path] = mask
        segments.append({"phrase": item.phrase(coloured), "mask": path})
    extra = {"split": split, "subset": scene.form}
    if coloured:
        extra["colours"] = [item.colour for item in scene.items]
    row = {
        "id": prompt_id,
        "prompt": scene.caption,
        "subjects": list(scene.subjects),
        "groups": [[item.colour, item.shape] if coloured else [item.shape] for item in scene.items],
        "segments": segments,
        "extra": extra,
    }
    return row, files


def build_split(split: str, seed: int = SEED) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The rows of one split and all their mask files."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    colourings = list(permutations(COLOURS, 2))
    rows, files = [], {}
    for form in FORMS_IN_SETS:
        for shapes in ordered_pairs(split):
            if form in COLOURED_FORMS:
                drawn = rng.choice(len(colourings), size=COLOURINGS_PER_ORDER, replace=False)
                variants = [colourings[index] for index in sorted(drawn)]
            else:
                variants = [None]
            for colours in variants:
                scene = sample_scene(rng, form, shapes, colours)
                words = [word for item in scene.items for word in ((item.colour, item.shape) if colours else (item.shape,))]
                row, row_files = _row(scene, split, "-".join([form, *words]), render(scene, RESOLUTION)[1])
                rows.append(row)
                files.update(row_files)
    # A seeded order, so that the first n rows (`limit=n`) are a random sample of the split, not one form.
    return [rows[index] for index in rng.permutation(len(rows))], files


def write_prompt_sets(datasets: Path) -> dict[str, int]:
    """Write both splits' JSON lines and masks under `datasets` (old masks removed first); rows per split."""
    mask_folder = datasets / MASK_FOLDER
    mask_folder.mkdir(parents=True, exist_ok=True)
    for old in mask_folder.glob("*.png"):
        old.unlink()
    counts = {}
    for split in SPLITS:
        rows, files = build_split(split)
        (datasets / f"shapes_{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        for path, mask in files.items():
            Image.fromarray(mask).save(datasets / path)  # a boolean array is a mode "1" image: 0 or 255
        counts[split] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=PROJECT_ROOT / "datasets", help="the folder to write into")
    counts = write_prompt_sets(parser.parse_args().datasets)
    print(", ".join(f"shapes_{split}: {count} prompts" for split, count in counts.items()))


if __name__ == "__main__":
    main()
