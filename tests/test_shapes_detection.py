"""The shapes world's analytic detector (evalkit/world/detector.py) and its scorer (shapes_detection)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage

from evalkit.errors import ConfigError, PromptError
from evalkit.paths import config_file
from evalkit.prompts import PromptSpec
from evalkit.scoring.base import SCORERS, ScoredImage
from evalkit.scoring.shapes_detection import ShapesDetectionScorer
from evalkit.world.detector import blank_and_noise_detections, detect, measure_accuracy
from evalkit.world.scenes import Item, Scene, render, sample_scene

CPU = torch.device("cpu")


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "degraded"])
def test_per_object_accuracy_on_held_out_renders(degraded):
    """The figures the model card quotes (`python -m evalkit.world.detector`): 2,200 objects in 1,200 scenes of
    every caption form, one to three items; degraded: blurred, colour-cast, colour-drifting and noisy, as a small
    model's images may be."""
    accuracy = measure_accuracy(degraded)
    assert accuracy.objects == 2200
    assert accuracy.rate >= 0.99, accuracy
    assert accuracy.false_detections <= 0.01 * accuracy.objects, accuracy


def test_touching_objects_of_different_colours_are_found_apart():
    # The square's right edge (0.3 + 0.85 x 0.2) is where the circle's left edge (0.67 - 0.2) is.
    scene = Scene((Item("square", "red", 0.3, 0.5, 0.2), Item("circle", "blue", 0.67, 0.5, 0.2)), "coloured_pair")
    image, masks = render(scene, 128)
    assert (ndimage.binary_dilation(masks[0]) & masks[1]).any()  # one foreground region
    assert {(d.shape, d.colour) for d in detect(image)} == {("square", "red"), ("circle", "blue")}


def test_no_detections_without_objects():
    assert blank_and_noise_detections() == {"blank": 0, "solid red": 0, "uniform noise": 0, "background noise": 0}


def scored(index: int, prompt: str, subjects: tuple[str, ...], image, status: str = "ok") -> ScoredImage:
    return ScoredImage("shapes", "vanilla", "vanilla", "shapes_unseen", f"p{index}", 0, prompt, subjects, image, {"status": status})


def test_rows_detection_and_colour_detection():
    """One image of a red circle and a blue star, scored against prompts that it fits, that swap its colours, that
    miss a shape, and that name no colour."""
    scene = sample_scene(np.random.default_rng(0), "coloured_pair", ("circle", "star"), ("red", "blue"))
    image = render(scene, 128)[0]
    scorer = SCORERS.build({"name": "shapes_detection"}, CPU)
    scorer.update([
        scored(0, "a red circle and a blue star", ("circle", "star"), image),
        scored(1, "a blue circle and a red star", ("circle", "star"), image),
        scored(2, "a red heart with a blue star", ("heart", "star"), image),
        scored(3, "a star and a circle", ("star", "circle"), image),
        scored(4, "a star and a square", ("star", "square"), None, status="failed"),
    ])
    rows = {(row["prompt_id"], row["metric"]): row["value"] for row in scorer.compute()}
    assert rows == {
        ("p0", "detection_rate"): 1.0, ("p0", "detection/circle"): 1.0, ("p0", "detection/star"): 1.0,
        ("p0", "colour_detection_rate"): 1.0, ("p0", "colour_detection/circle"): 1.0, ("p0", "colour_detection/star"): 1.0,
        ("p1", "detection_rate"): 1.0, ("p1", "detection/circle"): 1.0, ("p1", "detection/star"): 1.0,
        ("p1", "colour_detection_rate"): 0.0, ("p1", "colour_detection/circle"): 0.0, ("p1", "colour_detection/star"): 0.0,
        ("p2", "detection_rate"): 0.0, ("p2", "detection/heart"): 0.0, ("p2", "detection/star"): 1.0,
        ("p2", "colour_detection_rate"): 0.0, ("p2", "colour_detection/heart"): 0.0, ("p2", "colour_detection/star"): 1.0,
        ("p3", "detection_rate"): 1.0, ("p3", "detection/star"): 1.0, ("p3", "detection/circle"): 1.0,
    }
    assert {row["scorer"] for row in scorer.compute()} == {scorer.provenance} and "analytic" in scorer.provenance


def test_a_subject_without_a_named_colour_counts_in_any_colour():
    scene = sample_scene(np.random.default_rng(1), "coloured_pair", ("square", "cross"), ("green", "purple"))
    scorer = SCORERS.build({"name": "shapes_detection"}, CPU)
    scorer.update([scored(0, "a square and a yellow cross", ("square", "cross"), render(scene, 128)[0])])
    rows = {row["metric"]: row["value"] for row in scorer.compute()}
    assert rows["colour_detection/square"] == 1.0 and rows["colour_detection/cross"] == 0.0
    assert rows["detection_rate"] == 1.0 and rows["colour_detection_rate"] == 0.0


@pytest.mark.parametrize(
    ("prompt", "subjects", "message"),
    [
        ("a cat and a dog", ("cat", "dog"), r"\['cat', 'dog'\] are not words of the shapes world"),
        ("a pink circle and a star", ("circle", "star"), r"\['pink'\] are not words"),
        ("a circle and a star", ("circle",), r"the shapes it names, \['circle', 'star'\], must be its subjects"),
        ("a circle and a circle", ("circle", "circle"), "must be distinct shapes"),
        ("a circle and a star", (), "must be distinct shapes"),
        ("a circle red and a star", ("circle", "star"), "the colour 'red' is not right before a shape"),
    ],
)
def test_prompts_outside_the_world_are_refused_in_one_line(prompt, subjects, message):
    with pytest.raises(PromptError, match=message) as error:
        ShapesDetectionScorer.preflight({}, ["vanilla"], [PromptSpec("bad", prompt, subjects)])
    assert "\n" not in str(error.value) and "'bad'" in str(error.value)


def test_config_builds_and_a_bad_threshold_is_refused():
    config = OmegaConf.to_container(config_file("scorer", "shapes_detection"))
    assert SCORERS.build(config, CPU).threshold == config["threshold"]
    with pytest.raises(ConfigError, match="threshold is a shape score in"):
        SCORERS.build({**config, "threshold": 1.5}, CPU)
