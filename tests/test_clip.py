import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from evalkit.errors import ConfigError, MissingWeightsError
from evalkit.scoring.base import SCORERS, ScoredImage
from evalkit.scoring.clip import TINY_MODEL_CONFIG, split_prompt, template_texts

CPU = torch.device("cpu")
PROMPTS = ["a cat and a dog", "a pink crown with a purple bow", "a lonely lighthouse"]


def scored_images() -> list[ScoredImage]:
    rng = np.random.default_rng(0)
    return [
        ScoredImage(
            model="tiny",
            method="vanilla",
            variant="default",
            dataset="demo",
            prompt_id=f"p{index}",
            seed=index,
            prompt=prompt,
            subjects=(),
            image=Image.fromarray(rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)),
            record={"seconds_per_image": 1.0, "peak_memory_bytes": None, "status": "ok"},
        )
        for index, prompt in enumerate(PROMPTS)
    ]


def values(rows: list[dict], metric: str) -> list[float]:
    return [row["value"] for row in rows if row["metric"] == metric]


def tiny_scorer_rows(batch_size: int) -> list[dict]:
    scorer = SCORERS.build({"name": "clip", "tiny": True, "batch_size": batch_size}, CPU)
    scorer.update(scored_images())
    return scorer.compute()


@pytest.fixture(scope="module")
def batched_rows() -> list[dict]:
    return tiny_scorer_rows(batch_size=3)


def reference_scores(items: list[ScoredImage]) -> tuple[list[float], list[float]]:
    """A&E's computation written out directly against open_clip, one image at a time."""
    open_clip.add_model_config(TINY_MODEL_CONFIG)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip")

    def text_embedding(text: str) -> torch.Tensor:
        templates = open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
        texts = [template(text).replace("a a", "a").replace("the a", "a") for template in templates]
        embeddings = model.encode_text(tokenizer(texts))
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        return mean / mean.norm()

    full, min_object = [], []
    with torch.no_grad():
        for item in items:
            image = model.encode_image(preprocess(item.image).unsqueeze(0))[0]
            image = image / image.norm()
            full.append(float(image @ text_embedding(item.prompt)))
            if " and " in item.prompt:
                first, second = item.prompt.split(" and ")
            elif " with " in item.prompt:
                first, second = item.prompt.split(" with ")
            else:
                min_object.append(math.nan)
                continue
            min_object.append(min(float(image @ text_embedding(first)), float(image @ text_embedding(second))))
    return full, min_object


def test_tiny_scores_match_direct_open_clip_computation(batched_rows):
    expected_full, expected_min_object = reference_scores(scored_images())
    np.testing.assert_allclose(values(batched_rows, "clip_full"), expected_full, atol=1e-5)
    np.testing.assert_allclose(values(batched_rows, "clip_min_object"), expected_min_object, atol=1e-5)
    assert math.isnan(values(batched_rows, "clip_min_object")[2])
    assert all(-1.0 <= value <= 1.0 for value in values(batched_rows, "clip_full"))  # raw cosine, not x100


def test_rows_carry_identity_and_scorer_name(batched_rows):
    assert len(batched_rows) == 2 * len(PROMPTS)
    first = batched_rows[0]
    assert {key: first[key] for key in ("model", "method", "variant", "dataset", "prompt_id", "seed")} == {
        "model": "tiny", "method": "vanilla", "variant": "default", "dataset": "demo", "prompt_id": "p0", "seed": 0
    }
    assert "random" in first["scorer"] and "tiny" in first["scorer"]


def test_batch_size_does_not_change_scores(batched_rows):
    one_at_a_time, all_at_once = tiny_scorer_rows(batch_size=1), batched_rows
    for metric in ("clip_full", "clip_min_object"):
        np.testing.assert_allclose(values(one_at_a_time, metric), values(all_at_once, metric), atol=1e-6)


def test_failed_generations_get_no_rows_and_reset_clears():
    scorer = SCORERS.build({"name": "clip", "tiny": True}, CPU)
    failed = ScoredImage("tiny", "vanilla", "default", "demo", "p9", 9, "a cat and a dog", (), None,
                         {"seconds_per_image": 0.0, "peak_memory_bytes": None, "status": "failed"})
    scorer.update([failed])
    assert scorer.compute() == []
    scorer.update(scored_images()[:1])
    assert len(scorer.compute()) == 2
    scorer.reset()
    assert scorer.compute() == []


def test_split_prompt_follows_attend_and_excite():
    assert split_prompt("a cat and a dog") == ("a cat", "a dog")
    assert split_prompt("a pink crown with a purple bow") == ("a pink crown", "a purple bow")
    assert split_prompt("a cat with a hat and a dog") == ("a cat with a hat", "a dog")  # " and " wins
    assert split_prompt("a cat and a dog and a frog") == ("a cat", "a dog")  # A&E keeps the first two parts
    assert split_prompt("a lonely lighthouse") is None


def test_templates_are_attend_and_excite_ensemble():
    texts = template_texts("a cat")
    assert len(texts) == 80
    assert texts[0] == "a bad photo of a cat."  # "a bad photo of a a cat." with the double article removed
    assert texts[1] == "a photo of many a cat."
    assert texts[4] == "a low resolution photo of a cat."  # "the a" -> "a"
    assert texts[-1] == "a tattoo of a cat."


def test_unknown_scorer_and_parameter_are_config_errors():
    with pytest.raises(ConfigError, match="clip"):
        SCORERS.build({"name": "nope"}, CPU)
    with pytest.raises(ConfigError, match="templates"):
        SCORERS.build({"name": "clip", "tiny": True, "templates": 7}, CPU)


def test_real_checkpoint_offline_is_missing_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache, whatever this machine has downloaded
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="ViT-B-16/openai") as error:
        SCORERS.build({"name": "clip", "model": "ViT-B-16", "pretrained": "openai"}, CPU)
    assert "\n" not in str(error.value)
