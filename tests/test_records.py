"""Typed records: score rows and manifests fail where a key is written or read, not when a report is made; and the
scorer base class that builds the rows (batching, failed generations, batch_size)."""

import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from evalkit import stages
from evalkit.errors import ConfigError, StoreError
from evalkit.records import SCORE_COLUMNS, GenerationManifest, ScoreRow, ScoringManifest
from evalkit.scoring.base import ScoredImage, ScoredSet, Scorer, preflight_scorer
from evalkit.store import ImageStore

# The keys the stages have always written: stores made before the manifests were typed must still read.
GENERATION_KEYS = {
    "stage", "experiment", "model", "method", "variant", "dataset", "dataset_path", "dataset_version",
    "dataset_sha256", "model_source", "model_revision", "seeds", "limit", "config", "identity", "versions",
    "git_commit", "hardware",
}
SCORING_KEYS = {"stage", "experiment", "scorer_key", "scorer", "config", "versions", "git_commit", "hardware"}


def generation_manifest(**changes) -> GenerationManifest:
    fields = dict(
        experiment="e", model="tiny", method="vanilla", variant="vanilla@0123456789", dataset="demo",
        dataset_path="datasets/demo.jsonl", dataset_version=1, dataset_sha256="0" * 64, model_source="random",
        model_revision=None, seeds=[0, 1], limit=None, config={"seeds": [0, 1]}, identity={"sampling": {}},
        versions={"torch": "2"}, git_commit=None, hardware={"device": "cpu"},
    )
    return GenerationManifest(**{**fields, **changes})


def scoring_manifest() -> ScoringManifest:
    return ScoringManifest(experiment="e", scorer_key="clip", scorer="clip tiny", config={"name": "clip"},
                           versions={}, git_commit=None, hardware={})


def run_config(tmp_path):
    return OmegaConf.create({"runs_root": str(tmp_path), "experiment_name": "e", "scorers": {"clip": {"name": "clip"}}})


# Score rows


def test_score_columns_are_the_row_fields_in_order():
    assert SCORE_COLUMNS == ["model", "method", "variant", "dataset", "prompt_id", "seed", "metric", "value", "scorer"]
    row = ScoreRow("tiny", "vanilla", "vanilla@0", "demo", "p0", 0, "clip_full", 0.25, "clip tiny")
    assert list(row.as_dict()) == SCORE_COLUMNS
    set_row = ScoreRow("tiny", "vanilla", "vanilla@0", "demo", None, None, "fid", 12.5, "fid tiny", n_images=4)
    assert list(set_row.as_dict()) == [*SCORE_COLUMNS, "n_images"]


def test_a_renamed_or_missing_row_key_fails_where_the_row_is_written():
    fields = dict(model="tiny", method="vanilla", variant="v", dataset="demo", prompt_id="p0", seed=0,
                  metric="clip_full", value=0.25, scorer="clip")
    with pytest.raises(TypeError, match="score"):
        ScoreRow(**{**{k: v for k, v in fields.items() if k != "value"}, "score": 0.25})
    with pytest.raises(TypeError, match="value"):
        ScoreRow(**{k: v for k, v in fields.items() if k != "value"})
    with pytest.raises(ValueError, match="per-image row has prompt_id and seed"):
        ScoreRow(**{**fields, "seed": None})
    with pytest.raises(ValueError, match="set-level row has n_images"):
        ScoreRow(**{**fields, "prompt_id": None, "seed": None})
    with pytest.raises(TypeError, match="value must be a float"):
        ScoreRow(**{**fields, "value": "0.25"})


# Manifests


def test_manifests_write_the_keys_they_always_had_and_read_back_equal(tmp_path):
    generation, scoring = generation_manifest(), scoring_manifest()
    assert set(generation.to_dict()) == GENERATION_KEYS and generation.to_dict()["stage"] == "generate"
    assert set(scoring.to_dict()) == SCORING_KEYS and scoring.to_dict()["stage"] == "score"
    cfg = run_config(tmp_path)
    (tmp_path / "e" / "manifests").mkdir(parents=True)
    (tmp_path / "e" / "manifests" / "x.json").write_text(json.dumps(generation.to_dict()))
    (tmp_path / "e" / "scores" / "clip").mkdir(parents=True)
    (tmp_path / "e" / "scores" / "clip" / "manifest.json").write_text(json.dumps(scoring.to_dict()))
    assert stages.read_manifests(cfg) == [generation]
    assert stages.read_scoring_manifests(cfg) == [scoring]


def test_a_renamed_manifest_key_fails_where_it_is_written():
    with pytest.raises(TypeError, match="dataset_hash"):
        generation_manifest(dataset_hash="0" * 64)
    with pytest.raises(TypeError, match="scorer_key"):
        ScoringManifest(experiment="e", scorer="clip", config={}, versions={}, git_commit=None, hardware={})
    with pytest.raises(ValueError, match="stage must be 'generate'"):
        generation_manifest(stage="score")


@pytest.mark.parametrize("change", ["rename", "drop"])
def test_a_renamed_or_missing_manifest_key_fails_where_it_is_read(tmp_path, change):
    data = generation_manifest().to_dict()
    sampling = data.pop("identity")
    if change == "rename":
        data["identity_config"] = sampling
    cfg = run_config(tmp_path)
    path = tmp_path / "e" / "manifests" / "x.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    expected = "missing keys \\['identity'\\]" + ("; unknown keys \\['identity_config'\\]" if change == "rename" else "")
    with pytest.raises(StoreError, match=f"{path}: not a generate manifest .*{expected}.*re-run generate"):
        stages.read_manifests(cfg)

    scoring = scoring_manifest().to_dict()
    del scoring["scorer_key"]
    path = tmp_path / "e" / "scores" / "clip" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(scoring))
    with pytest.raises(StoreError, match="missing keys \\['scorer_key'\\]"):
        stages.read_scoring_manifests(cfg)
    path.write_text("{")
    with pytest.raises(StoreError, match="unreadable score manifest"):
        stages.read_scoring_manifests(cfg)


# The scorer base class


class BatchRecorder(Scorer):
    """A scorer whose metric is its batch: it records each batch and rows each image with the batch's size."""

    name = "batch_recorder"
    metrics = {"batch": True}
    provenance = "batch recorder"

    def __init__(self, device, batch_size: int = 2):
        super().__init__(device, batch_size)
        self.batches: list[list[str]] = []

    def score_batch(self, items):
        self.batches.append([item.prompt_id for item in items])
        for item in items:
            self._add_row(item, "batch", len(items))


def item(index: int, status: str = "ok", image: bool = True) -> ScoredImage:
    picture = Image.new("RGB", (4, 4)) if image else None
    return ScoredImage("tiny", "vanilla", "vanilla@0", "demo", f"p{index}", 0, "a cat", ("cat",), picture,
                       {"status": status})


def test_update_drops_failed_generations_and_batches_the_rest_in_order():
    scorer = BatchRecorder(torch.device("cpu"), batch_size=2)
    items = [item(0), item(1, "failed", image=False), item(2), item(3), item(4)]
    scorer.update(iter(items))  # lazy: the score stage reads each image as the scorer reaches it
    assert scorer.batches == [["p0", "p2"], ["p3", "p4"]]
    rows = scorer.compute()
    assert [row["prompt_id"] for row in rows] == ["p0", "p2", "p3", "p4"]
    assert all(list(row) == SCORE_COLUMNS and row["scorer"] == "batch recorder" for row in rows)
    scorer.reset()
    assert scorer.compute() == []


def test_update_refuses_a_generated_item_without_its_image():
    with pytest.raises(ValueError, match="scorer batch_recorder needs images; p1 seed 0 was passed without one"):
        BatchRecorder(torch.device("cpu")).update([item(0), item(1, image=False)])


def test_set_rows_come_from_the_manifest():
    scorer = BatchRecorder(torch.device("cpu"))
    row = scorer._set_row(ScoredSet(generation_manifest(), [], ImageStore("unused")), "fid", 3, n_images=7)
    assert row.as_dict() == {"model": "tiny", "method": "vanilla", "variant": "vanilla@0123456789", "dataset": "demo",
                             "prompt_id": None, "seed": None, "metric": "fid", "value": 3.0, "scorer": "batch recorder",
                             "n_images": 7}


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_batch_size_is_checked_once_for_every_scorer(batch_size):
    with pytest.raises(ConfigError, match="^scorer batch_recorder: batch_size must be an integer of at least 1"):
        BatchRecorder(torch.device("cpu"), batch_size=batch_size)
    for name in ("clip", "owlv2", "lpips", "text_similarity", "tifa", "shapes_clip", "fid", "overhead"):
        with pytest.raises(ConfigError, match=f"^scorer {name}: batch_size must be an integer of at least 1"):
            preflight_scorer({"name": name, "batch_size": batch_size}, ["vanilla"])


def test_dataclass_replace_keeps_manifests_checked():
    with pytest.raises(ValueError, match="stage must be 'score'"):
        dataclasses.replace(scoring_manifest(), stage="generate")
