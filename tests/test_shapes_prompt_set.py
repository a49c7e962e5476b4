"""The shapes world's prompt sets (datasets/shapes_{seen,unseen}.jsonl): what the generator writes, the split, the
layouts. tests/test_datasets.py checks, as for every set, that each row's words index in the tokenizer."""

import collections

import numpy as np
import pytest

from evalkit.models.tokenizer import clip_tokenizer
from evalkit.paths import PROJECT_ROOT
from evalkit.prompts import TokenIndexer, load_prompt_set, read_mask
from evalkit.sampling.method import METHODS
from evalkit.scoring.shapes_detection import named_colours
from evalkit.world.prompt_set import RESOLUTION, write_prompt_sets
from evalkit.world.split import SEEN_PAIRS, UNSEEN_PAIRS

DATASETS = PROJECT_ROOT / "datasets"


def split_specs(split: str):
    return load_prompt_set(DATASETS / f"shapes_{split}.jsonl")


def test_committed_sets_are_what_the_generator_writes(tmp_path):
    counts = write_prompt_sets(tmp_path)
    assert counts == {"seen": 160, "unseen": 80}
    for split in counts:
        name = f"shapes_{split}.jsonl"
        assert (tmp_path / name).read_text() == (DATASETS / name).read_text(), "regenerate: python -m evalkit.world.prompt_set"
    written = sorted(path.relative_to(tmp_path) for path in (tmp_path / "shapes" / "masks").glob("*.png"))
    assert written == sorted(path.relative_to(DATASETS) for path in (DATASETS / "shapes" / "masks").glob("*.png"))
    for path in written:  # pixels, not bytes: another PNG encoder may compress differently
        assert np.array_equal(read_mask(tmp_path / path), read_mask(DATASETS / path)), path


@pytest.mark.parametrize("split", ["seen", "unseen"])
def test_split_forms_and_annotations(split):
    specs = split_specs(split)
    pairs = {frozenset(spec.subjects) for spec in specs}
    assert all(spec.extra["split"] == split for spec in specs)
    assert pairs == (UNSEEN_PAIRS if split == "unseen" else SEEN_PAIRS)
    per_pair = 16  # both orders x (1 shape pair + 1 "with" + 6 colourings)
    assert len(specs) == per_pair * len(pairs)
    subsets = collections.Counter(spec.extra["subset"] for spec in specs)
    assert subsets == {"shape_pair": 2 * len(pairs), "shape_with_shape": 2 * len(pairs), "coloured_pair": 12 * len(pairs)}
    assert len({spec.prompt for spec in specs}) == len(specs)
    for spec in specs:
        colours = named_colours(spec)  # the detector reads each prompt's colours as the row states them
        if spec.extra["subset"] == "coloured_pair":
            assert list(colours.values()) == spec.extra["colours"] == [group[0] for group in spec.groups]
            assert len(set(spec.extra["colours"])) == 2
        else:
            assert set(colours.values()) == {None} and "colours" not in spec.extra


@pytest.mark.parametrize("split", ["seen", "unseen"])
def test_layouts_are_a_background_and_one_disjoint_mask_per_subject(split):
    dense_diffusion = METHODS.build({"name": "dense_diffusion"})
    indexer = TokenIndexer(clip_tokenizer())
    for spec in split_specs(split):
        dense_diffusion.preflight(spec, indexer)  # phrases are words of the prompt, masks readable and binary
        background, *items = spec.segments
        assert background.phrase == "" and [s.phrase.split()[-1] for s in items] == list(spec.subjects)
        masks = np.stack([read_mask(segment.mask) for segment in spec.segments])
        assert masks.shape == (3, RESOLUTION, RESOLUTION)
        assert (masks.sum(axis=0) == 1).all(), spec.id  # disjoint and covering the image
        assert (masks[1:].sum(axis=(1, 2)) >= 0.02 * RESOLUTION**2).all(), spec.id
