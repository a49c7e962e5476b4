"""The FID set's rule on a synthetic COCO annotation file: deterministic, first caption, real images linked."""

import json

import pytest

from evalkit import stages
from evalkit.coco_fid import build, choose_captions
from evalkit.errors import ConfigError, DatasetError
from evalkit.prompts import load_prompt_set
from tests.conftest import compose_config


def test_rule_picks_the_same_images_and_the_first_caption(synthetic_coco):
    annotations = json.loads(synthetic_coco[0].read_text())
    rows = choose_captions(annotations, count=4, seed=0)
    # numpy.random.default_rng(0).choice(12, 4, replace=False) -> [3, 5, 7, 6]: ids 121, 135, 149, 142, sorted
    assert [row["extra"]["coco_image_id"] for row in rows] == [121, 135, 142, 149]
    assert rows[0] == {"id": "coco-121", "prompt": "first caption of 121",
                       "extra": {"coco_image_id": 121, "coco_file_name": "COCO_val2014_000000000121.jpg"}}
    assert choose_captions(annotations, count=4, seed=0) == rows
    assert choose_captions(annotations, count=4, seed=1) != rows
    with pytest.raises(DatasetError, match="captions for 12 images; cannot choose 13"):
        choose_captions(annotations, count=13, seed=0)


def test_build_writes_a_valid_prompt_set_and_links_the_real_images(tmp_path, synthetic_coco):
    captions, images = synthetic_coco
    prompts = build(captions, images, tmp_path / "out", count=4, seed=0)
    specs = load_prompt_set(prompts)
    assert [spec.id for spec in specs] == ["coco-121", "coco-135", "coco-142", "coco-149"]
    linked = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert linked == [spec.extra["coco_file_name"] for spec in specs]
    assert all((tmp_path / "out" / "images" / name).resolve().parent == images.resolve() for name in linked)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rule_version"] == 1 and manifest["count"] == 4 and len(manifest["captions_sha256"]) == 64
    build(captions, images, tmp_path / "out", count=4, seed=0)  # re-running over an existing set is fine

    (images / "COCO_val2014_000000000135.jpg").unlink()
    with pytest.raises(DatasetError, match="1 chosen images are not in"):
        build(captions, images, tmp_path / "again", count=4, seed=0)


def test_generating_on_the_set_before_it_is_built_says_how_to_build_it(tmp_path):
    cfg = compose_config(["dataset=coco_fid3k", f"dataset.path={tmp_path / 'absent.jsonl'}", "model=tiny"])
    with pytest.raises(ConfigError, match=r"does not exist; build it with `python -m evalkit.coco_fid --captions"):
        stages.generate(cfg)
