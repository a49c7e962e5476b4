import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
)

from evalkit.errors import ConfigError, MissingWeightsError, PromptError
from evalkit.models.tokenizer import clip_tokenizer
from evalkit.prompts import PromptSpec
from evalkit.reporting.aggregate import paired_difference, summarize
from evalkit.scoring.base import SCORERS, ScoredImage
from evalkit.scoring.owlv2 import TINY_MODEL_CONFIG, subject_detections
from tests.conftest import compose_config

CPU = torch.device("cpu")
# The tiny random detector's box scores mostly saturate near 1; at 0.9 the second image loses "frog" and the third
# "bowl" while the others keep every subject, so the decisions below are mixed and a wrong query or image order
# shows.
THRESHOLD = 0.9
SUBJECTS = [("cat", "dog"), ("frog", "crown"), ("car", "bowl", "cat"), ("cat", "dog"), ("bear",)]


def item(index: int, subjects: tuple[str, ...], image=None, status: str = "ok", method: str = "vanilla") -> ScoredImage:
    return ScoredImage("tiny", method, method, "demo", f"p{index}", index, " and ".join(f"a {s}" for s in subjects),
                       subjects, image, {"status": status})


def scored_images() -> list[ScoredImage]:
    rng = np.random.default_rng(0)
    # Not square: the processor pads to a square before resizing.
    return [item(i, s, Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))) for i, s in enumerate(SUBJECTS)]


@pytest.fixture(scope="module")
def scorer():
    return SCORERS.build({"name": "owlv2", "hub_id": "unused", "revision": "unused", "tiny": True,
                         "threshold": THRESHOLD, "batch_size": 8}, CPU)


def reference_detections(items: list[ScoredImage], threshold: float) -> list[set[str]]:
    """transformers' own recipe, one image at a time: processor, model, post-processing with text labels."""
    config = Owlv2Config(**json.loads(TINY_MODEL_CONFIG.read_text()))
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config).eval()
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                               tokenizer=clip_tokenizer(16, pad_token="!"))
    found = []
    with torch.no_grad():
        for scored in items:
            queries = list(scored.subjects)
            inputs = processor(text=[queries], images=scored.image, return_tensors="pt")
            outputs = model(**inputs)
            side = max(scored.image.size)
            result = processor.post_process_grounded_object_detection(
                outputs, threshold=threshold, target_sizes=[(side, side)], text_labels=[queries]
            )[0]
            found.append(set(result["text_labels"]))
    return found


def rows_by_image(rows: list[dict]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        table.setdefault(row["prompt_id"], {})[row["metric"]] = row["value"]
    return table


def test_decisions_match_transformers_post_processing(scorer):
    scorer.reset()
    items = scored_images()
    scorer.update(items)  # one batch mixing two- and three-query images
    table = rows_by_image(scorer.compute())
    expected = reference_detections(items, THRESHOLD)
    for scored, found in zip(items, expected):
        row = table[scored.prompt_id]
        assert {metric for metric in row} == {"detection_rate", *(f"detection/{s}" for s in scored.subjects)}
        assert {s for s in scored.subjects if row[f"detection/{s}"] == 1.0} == found
        assert row["detection_rate"] == float(found == set(scored.subjects))
    rates = [table[s.prompt_id]["detection_rate"] for s in items]
    assert 0.0 < np.mean(rates) < 1.0  # mixed decisions: the comparison above can fail


def test_batch_size_and_order_do_not_change_decisions(scorer, monkeypatch):
    scorer.reset()
    scorer.update(scored_images())
    all_at_once = rows_by_image(scorer.compute())
    monkeypatch.setattr(scorer, "batch_size", 1)
    scorer.reset()
    scorer.update(scored_images()[::-1])
    assert rows_by_image(scorer.compute()) == all_at_once


def test_rates_from_hand_built_detections(scorer, monkeypatch):
    """Known answers: box labels are query indices into the distinct subjects of each image."""
    subjects = {"p0": ("cat", "dog"), "p1": ("cat", "dog"), "p2": ("frog", "crown"),
                "p3": ("cat", "cat", "dog")}  # a repeated subject is one query
    labels = {"p0": [0, 1, 1], "p1": [1], "p2": [], "p3": [0]}
    items = [item(i, subjects[f"p{i}"], Image.new("RGB", (8, 8), (i, 0, 0))) for i in range(4)]
    labels_of_image = {id(scored.image): labels[scored.prompt_id] for scored in items}
    monkeypatch.setattr(scorer, "box_labels", lambda images, queries: [labels_of_image[id(i)] for i in images])
    monkeypatch.setattr(scorer, "batch_size", 1)
    scorer.reset()
    scorer.update(items)
    rows = pd.DataFrame(scorer.compute())
    means = summarize(rows).set_index("metric")
    assert means.loc["detection_rate", "mean"] == pytest.approx(1 / 4)
    assert means.loc["detection/cat", "mean"] == pytest.approx(2 / 3)  # p0 yes, p1 no, p3 yes
    assert means.loc["detection/dog", "mean"] == pytest.approx(2 / 3)  # p0 yes, p1 yes, p3 no
    assert means.loc["detection/frog", "mean"] == 0.0 and means.loc["detection/crown", "mean"] == 0.0
    assert means.loc["detection/cat", "n"] == 3 and means.loc["detection/frog", "n"] == 1
    # One row per (image, metric): paired differences against the baseline aggregate per subject too.
    method_rows = rows.assign(method="attend_and_excite", variant="attend_and_excite", value=1.0)
    differences = paired_difference(pd.concat([rows, method_rows])).set_index("metric")
    assert differences.loc["detection_rate", "mean_difference"] == pytest.approx(3 / 4)
    assert differences.loc["detection/cat", "mean_difference"] == pytest.approx(1 / 3)


def test_subject_detections():
    assert subject_detections(("cat", "dog"), [1, 1]) == {"cat": False, "dog": True}
    assert subject_detections(("cat", "cat", "dog"), [0, 1]) == {"cat": True, "dog": True}
    assert subject_detections(("bear",), []) == {"bear": False}


def test_prompt_without_subjects_is_an_error(scorer):
    with pytest.raises(PromptError, match="'p7'.*subjects"):
        scorer.preflight({}, ["vanilla"], [PromptSpec("p7", "a lonely lighthouse")])
    with pytest.raises(PromptError, match="'p0'"):
        scorer.update([item(0, (), Image.new("RGB", (8, 8)))])


def test_failed_generations_get_no_rows(scorer):
    scorer.reset()
    scorer.update([item(0, ("cat",), None, status="failed")])
    assert scorer.compute() == []


def test_name_carries_settings(scorer):
    assert "tiny" in scorer.provenance and "random" in scorer.provenance
    assert f"> {THRESHOLD}" in scorer.provenance and "'{}'" in scorer.provenance and "64x64" in scorer.provenance


def test_bad_settings_are_config_errors():
    base = {"name": "owlv2", "hub_id": "x", "revision": "y", "tiny": True}
    with pytest.raises(ConfigError, match="query_template"):
        SCORERS.build({**base, "query_template": "a photo of a cat"}, CPU)
    with pytest.raises(ConfigError, match="threshold"):
        SCORERS.build({**base, "threshold": 1.5}, CPU)


def test_real_checkpoint_offline_is_missing_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="google/owlv2-base-patch16-ensemble@abc") as error:
        SCORERS.build({"name": "owlv2", "hub_id": "google/owlv2-base-patch16-ensemble", "revision": "abc"}, CPU)
    assert "\n" not in str(error.value) and "hf download" in str(error.value)


def test_generate_refuses_prompts_without_subjects_before_any_image(tmp_path):
    from evalkit import stages

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"id": "cat-dog", "prompt": "a cat and a dog", "subjects": ["cat", "dog"]}\n'
                       '{"id": "lighthouse", "prompt": "a lonely lighthouse"}\n')
    cfg = compose_config([
        "model=tiny", "scorer=[owlv2_tiny]", f"dataset.path={dataset}", f"store_root={tmp_path / 'store'}",
        f"runs_root={tmp_path / 'runs'}", "sampling.num_inference_steps=1",
    ])
    with pytest.raises(PromptError, match="'lighthouse'.*subjects"):
        stages.generate(cfg)
    assert not (tmp_path / "store").exists()
