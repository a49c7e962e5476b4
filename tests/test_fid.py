"""FID: our distance against pytorch-fid's and torchmetrics' on the same features, FID of a set against itself,
the resize policy against clean-fid's, the cached real-image statistics, and set-level rows in the report."""

import logging
import math
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch
from cleanfid.resize import make_resizer
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance
from torchmetrics.image.fid import FrechetInceptionDistance

from evalkit.errors import ConfigError, MissingWeightsError
from evalkit.reporting.render import write_report
from evalkit.scoring.base import SCORERS, ScoredImage, ScoredSet, preflight_scorer
from evalkit.scoring.fid import (
    FidScorer,
    fid_input,
    frechet_distance,
    gaussian_statistics,
)
from evalkit.store import ImageStore
from tests.conftest import generation_manifest

CPU = torch.device("cpu")
MANIFEST = generation_manifest("vanilla", experiment="fid", seeds=[0])


class GivenFeatures(torch.nn.Module):
    """Hands torchmetrics the features themselves in place of images, so it computes FID on our features."""

    def __init__(self, dims: int):
        super().__init__()
        self.num_features = dims

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def feature_sets(n_first: int, n_second: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated, differently shifted and scaled feature sets, float64."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(dims, dims)) / math.sqrt(dims)
    first = rng.normal(size=(n_first, dims)) @ mixing
    second = 1.3 * rng.normal(size=(n_second, dims)) @ mixing + rng.normal(scale=0.3, size=dims)
    return torch.from_numpy(first), torch.from_numpy(second)


def torchmetrics_fid(generated: torch.Tensor, real: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=GivenFeatures(generated.shape[1]))
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


@pytest.mark.parametrize("n_first, n_second, dims", [(400, 300, 64), (600, 500, 128)])
def test_distance_equals_pytorch_fid_and_torchmetrics_on_the_same_features(n_first, n_second, dims):
    generated, real = feature_sets(n_first, n_second, dims)
    mu1, sigma1 = gaussian_statistics(generated)
    mu2, sigma2 = gaussian_statistics(real)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    pytorch_fid = calculate_frechet_distance(mu1.numpy(), sigma1.numpy(), mu2.numpy(), sigma2.numpy())
    assert ours > 1.0  # different sets: the comparison is not between zeros
    assert ours == pytest.approx(pytorch_fid, rel=1e-9)
    assert ours == pytest.approx(torchmetrics_fid(generated, real), rel=1e-7)


def test_statistics_are_numpys_mean_and_covariance():
    features, _ = feature_sets(50, 2, 8)
    mu, sigma = gaussian_statistics(features.float())
    np.testing.assert_allclose(mu.numpy(), features.float().double().numpy().mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(features.float().double().numpy(), rowvar=False), rtol=1e-10)


@pytest.mark.parametrize("n_images", [300, 40])  # more and fewer images than the 64 dimensions (singular covariance)
def test_fid_of_a_set_against_itself_is_zero(n_images):
    features, _ = feature_sets(n_images, 2, 64)
    mu, sigma = gaussian_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * float(sigma.trace())


def test_resize_is_clean_fids_clean_resize_after_a_centre_crop():
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, size=(80, 80, 3), dtype=np.uint8)
    clean = make_resizer("PIL", False, "bicubic", (299, 299))(square)  # clean-fid's mode="clean"
    np.testing.assert_allclose(fid_input(Image.fromarray(square)).permute(1, 2, 0).numpy(), clean / 255.0, atol=1e-6)
    # A wide image loses equal strips left and right: red and blue borders go, the green middle stays.
    wide = np.zeros((80, 120, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:100] = (0, 255, 0)
    wide[:, 100:] = (0, 0, 255)
    pixels = fid_input(Image.fromarray(wide))
    assert pixels.shape == (3, 299, 299)
    np.testing.assert_allclose(pixels[1].numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(pixels[[0, 2]].numpy(), 0.0, atol=1e-6)


def write_images(folder, n_images: int, seed: int, size=(48, 40)) -> list[Image.Image]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)) for _ in range(n_images)]
    for index, image in enumerate(images):
        image.save(folder / f"{index}.png")
    return images


def tiny_config(reference_dir, cache_dir, **overrides) -> dict:
    return {"name": "fid", "tiny": True, "dims": 64, "reference_dir": str(reference_dir),
            "reference_label": "random test images", "cache_dir": str(cache_dir), **overrides}


def set_row(scorer: FidScorer, images: list[Image.Image]) -> dict:
    scorer.reset()
    scorer.begin_set(ScoredSet(MANIFEST, [MANIFEST], ImageStore("unused")))
    scorer.update([ScoredImage("tiny", "vanilla", MANIFEST.variant, "toy", f"p{index}", 0, "a cat", (), image,
                               {"status": "ok"}) for index, image in enumerate(images)])
    [row] = scorer.compute()
    return row


def test_scorer_gives_one_set_row_and_zero_against_its_own_reference(tmp_path, caplog):
    reference = write_images(tmp_path / "real", 4, seed=0)
    with caplog.at_level(logging.WARNING, logger="evalkit"):
        scorer = SCORERS.build(tiny_config(tmp_path / "real", tmp_path / "cache"), CPU)
    assert "has 4 images, fewer than the 64 feature dimensions" in caplog.text
    row = set_row(scorer, reference)
    assert row["prompt_id"] is None and row["seed"] is None and row["n_images"] == 4
    assert row["metric"] == "fid" and abs(row["value"]) < 1e-6
    assert "random test images (4 images," in row["scorer"] and "64 features" in row["scorer"]
    other = set_row(scorer, write_images(tmp_path / "other", 3, seed=1))
    assert other["value"] > 1e-3 and other["n_images"] == 3
    # The distance on the scorer's own features equals pytorch-fid's.
    generated = torch.cat([scorer.features(write_images(tmp_path / "other", 3, seed=1))])
    mu, sigma = gaussian_statistics(generated)
    expected = calculate_frechet_distance(mu.numpy(), sigma.numpy(), scorer.reference_mu.numpy(),
                                          scorer.reference_sigma.numpy())
    assert other["value"] == pytest.approx(expected, rel=1e-6)


def test_fewer_than_two_images_give_nan_and_a_warning(tmp_path, caplog):
    reference = write_images(tmp_path / "real", 2, seed=0)
    scorer = SCORERS.build(tiny_config(tmp_path / "real", tmp_path / "cache"), CPU)
    with caplog.at_level(logging.WARNING, logger="evalkit"):
        row = set_row(scorer, reference[:1])
    assert math.isnan(row["value"]) and row["n_images"] == 1
    assert "tiny/vanilla@0123456789/toy has 1 images; FID needs at least 2" in caplog.text


def test_real_statistics_are_cached_under_a_hash_of_the_files_and_settings(tmp_path, monkeypatch):
    write_images(tmp_path / "real", 3, seed=0)
    config = tiny_config(tmp_path / "real", tmp_path / "cache")
    first = SCORERS.build(config, CPU)
    [cache_file] = (tmp_path / "cache").iterdir()

    def must_not_run(self, images):
        raise AssertionError("the cached statistics should have been used")

    monkeypatch.setattr(FidScorer, "features", must_not_run)
    second = SCORERS.build(config, CPU)
    assert torch.equal(first.reference_sigma, second.reference_sigma) and first.provenance == second.provenance
    monkeypatch.undo()
    write_images(tmp_path / "real", 3, seed=5)  # same names, other bytes
    changed = SCORERS.build(config, CPU)
    SCORERS.build({**config, "dims": 192}, CPU)
    assert len(list((tmp_path / "cache").iterdir())) == 3 and cache_file.is_file()
    assert changed.provenance != first.provenance


def test_bad_reference_folder_or_dims_fail_the_check_before_generation(tmp_path):
    with pytest.raises(ConfigError, match="real-image folder .*missing does not exist"):
        preflight_scorer(tiny_config(tmp_path / "missing", tmp_path), ["vanilla"])
    write_images(tmp_path / "one", 1, seed=0)
    with pytest.raises(ConfigError, match="holds 1 images; FID needs at least 2"):
        preflight_scorer(tiny_config(tmp_path / "one", tmp_path), ["vanilla"])
    with pytest.raises(ConfigError, match="dims must be one of"):
        preflight_scorer(tiny_config(tmp_path / "one", tmp_path, dims=100), ["vanilla"])
    with pytest.raises(ConfigError, match="set reference_dir"):
        preflight_scorer({"name": "fid"}, ["vanilla"])


def test_real_inception_offline_is_one_line_missing_weights_error(monkeypatch, tmp_path):
    write_images(tmp_path / "real", 2, seed=0)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache

    def no_network(url, destination, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(MissingWeightsError, match="pt_inception-2015-12-05-6726825d.pth is not in torch") as error:
        SCORERS.build({**tiny_config(tmp_path / "real", tmp_path), "tiny": False}, CPU)
    assert "github.com/mseitzer/pytorch-fid" in str(error.value) and "\n" not in str(error.value)


def test_report_shows_set_rows_apart_and_keeps_per_image_aggregation(tmp_path):
    per_image = [
        {"model": "tiny", "method": method, "variant": f"{method}@0123456789", "dataset": "toy", "prompt_id": "p0",
         "seed": seed, "metric": "clip", "value": value, "scorer": "clip-test"}
        for method, values in (("vanilla", [0.2, 0.4]), ("attend_and_excite", [0.5, 0.7]))
        for seed, value in enumerate(values)
    ]
    set_level = [
        {"model": "tiny", "method": method, "variant": f"{method}@0123456789", "dataset": "toy", "prompt_id": None,
         "seed": None, "metric": "fid", "value": value, "scorer": "fid-test", "n_images": 2}
        for method, value in (("vanilla", 12.5), ("attend_and_excite", 17.25))
    ]
    # Through a CSV as the score stage writes it, so empty prompt_id and seed come back as NaN.
    (tmp_path / "scores.csv").write_text(pd.DataFrame(per_image + set_level).to_csv(index=False))
    scores = pd.read_csv(tmp_path / "scores.csv", dtype={"prompt_id": str})
    records = pd.DataFrame([{**{k: row[k] for k in ("model", "method", "variant", "dataset", "prompt_id", "seed")},
                             "status": "ok", "failed_step": None, "prompt": "a cat"} for row in per_image])
    no_images = pd.DataFrame(columns=["model", "method", "variant", "dataset", "prompt_id", "seed", "path"])
    write_report(tmp_path / "report", "toy", scores, records, [], no_images, None, {"clip": True, "fid": False})
    readme = (tmp_path / "report" / "README.md").read_text()
    results, set_section = readme.split("## Set-level results")[0], readme.split("## Set-level results")[1]
    set_section = set_section.split("## ")[0]
    # the headline: per-image mean and interval for CLIP; FID one value per set, without an interval
    assert "| attend_and_excite | **0.600 \\[0.500, 0.700\\]** | 17.250 |" in results
    assert "| toy | attend_and_excite | fid ↓ | 17.250 | 2 |" in set_section
    assert "| toy | vanilla | fid ↓ | 12.500 | 2 |" in set_section
    paired = readme.split("## Paired differences vs vanilla")[1].split("## ")[0]
    assert "clip" in paired and "fid" not in paired
    assert (tmp_path / "report" / "plots" / "toy__paired_differences.png").is_file()
