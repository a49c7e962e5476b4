"""LPIPS against vanilla: the scorer's values equal the lpips package's own computation on the same image pairs."""

import logging
import urllib.error

import lpips
import numpy as np
import pytest
import torch

from evalkit.__main__ import run_all
from evalkit.errors import ConfigError, MissingWeightsError
from evalkit.records import GenerationManifest
from evalkit.scoring.base import SCORERS, ScoredImage, ScoredSet, preflight_scorer
from evalkit.store import ImageKey, ImageStore
from tests.conftest import compose_config, generation_manifest, random_image

CPU = torch.device("cpu")
SAMPLING = {"num_inference_steps": 2, "guidance_scale": 7.5}
PAIRS = [("p0", 0), ("p0", 1), ("p1", 0)]


def manifest(method: str, sampling: dict = SAMPLING) -> GenerationManifest:
    return generation_manifest(method, sampling, experiment="lpips")


@pytest.fixture
def store(tmp_path) -> ImageStore:
    """Vanilla and attend_and_excite images of three (prompt, seed) pairs."""
    store, rng = ImageStore(tmp_path / "store"), np.random.default_rng(0)
    for method in ("vanilla", "attend_and_excite"):
        for prompt_id, seed in PAIRS:
            key = ImageKey("tiny", manifest(method).variant, "toy", prompt_id, seed)
            store.put(key, random_image(rng), {"status": "ok"})
    return store


def items(store: ImageStore, method: str) -> list[ScoredImage]:
    keys = list(store.keys("tiny", manifest(method).variant, "toy"))
    return [ScoredImage(k.model, k.method, k.variant, k.dataset, k.prompt_id, k.seed, "a cat and a dog", (),
                        store.read_image(k), store.read_record(k)) for k in keys]


@pytest.fixture(scope="module")
def scorer():
    """One stand-in for the module (building the random AlexNet costs seconds); every use resets it."""
    return SCORERS.build({"name": "lpips", "tiny": True, "batch_size": 2}, CPU)


def scored_rows(scorer, store: ImageStore, method: str, manifests=None) -> list[dict]:
    scorer.reset()
    manifests = manifests or [manifest("vanilla"), manifest("attend_and_excite")]
    scorer.begin_set(ScoredSet(manifest(method), manifests, store))
    scorer.update(items(store, method))
    return scorer.compute()


def test_scores_equal_the_lpips_package_on_the_same_pairs(scorer, store):
    rows = scored_rows(scorer, store, "attend_and_excite")
    torch.manual_seed(0)  # the stand-in's seed: the same random AlexNet trunk
    reference = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False).eval()
    expected = []
    with torch.no_grad():
        for prompt_id, seed in PAIRS:
            method_image, vanilla_image = (
                np.asarray(store.read_image(ImageKey("tiny", manifest(m).variant, "toy", prompt_id, seed)))
                for m in ("attend_and_excite", "vanilla")
            )
            # lpips' own image-to-tensor helper: uint8 HWC -> [-1, 1] NCHW.
            expected.append(float(reference(lpips.im2tensor(method_image), lpips.im2tensor(vanilla_image))))
    assert [(row["prompt_id"], row["seed"]) for row in rows] == PAIRS
    np.testing.assert_allclose([row["value"] for row in rows], expected, rtol=1e-5, atol=1e-7)
    assert all(value > 0 for value in expected)  # random images differ: the comparison cannot pass by zeros
    assert {row["metric"] for row in rows} == {"lpips_vs_vanilla"}
    assert "random alex trunk" in rows[0]["scorer"] and "[-1, 1]" in rows[0]["scorer"]


def test_batch_size_does_not_change_scores(scorer, store, monkeypatch):
    monkeypatch.setattr(scorer, "batch_size", 1)
    one_at_a_time = [row["value"] for row in scored_rows(scorer, store, "attend_and_excite")]
    monkeypatch.setattr(scorer, "batch_size", 16)
    all_at_once = [row["value"] for row in scored_rows(scorer, store, "attend_and_excite")]
    np.testing.assert_allclose(one_at_a_time, all_at_once, rtol=1e-5)


def test_vanilla_scores_zero_against_itself(scorer, store):
    assert [row["value"] for row in scored_rows(scorer, store, "vanilla")] == [0.0] * len(PAIRS)


def test_missing_or_failed_vanilla_image_is_named_and_gets_no_row(scorer, store, caplog):
    vanilla = manifest("vanilla").variant
    store.image_path(ImageKey("tiny", vanilla, "toy", "p0", 1)).unlink()
    store.record_path(ImageKey("tiny", vanilla, "toy", "p0", 1)).unlink()
    store.put(ImageKey("tiny", vanilla, "toy", "p1", 0), None, {"status": "failed"})
    with caplog.at_level(logging.WARNING, logger="evalkit"):
        rows = scored_rows(scorer, store, "attend_and_excite")
    assert [(row["prompt_id"], row["seed"]) for row in rows] == [("p0", 0)]
    assert "2 images of attend_and_excite@0123456789 on tiny/toy have no vanilla@0123456789 image" in caplog.text
    assert "p0 seed 1" in caplog.text and "was not generated" in caplog.text
    assert "p1 seed 0" in caplog.text and "its generation failed" in caplog.text


def test_images_of_different_sizes_are_refused(scorer, store):
    key = ImageKey("tiny", manifest("vanilla").variant, "toy", "p1", 0)
    store.put(key, random_image(np.random.default_rng(1), size=(32, 32)), {"status": "ok"})
    with pytest.raises(ValueError, match=r"p1 seed 0 is \(64, 48\) but its vanilla@0123456789 image is \(32, 32\)"):
        scored_rows(scorer, store, "attend_and_excite")


def test_no_vanilla_run_with_the_same_settings_is_a_config_error(scorer, store):
    other_settings = manifest("vanilla", {**SAMPLING, "num_inference_steps": 50})
    with pytest.raises(ConfigError, match="no vanilla run of that model and dataset with the same sampling"):
        scored_rows(scorer, store, "attend_and_excite", manifests=[other_settings, manifest("attend_and_excite")])


def test_experiment_without_vanilla_or_with_a_bad_net_fails_the_check():
    with pytest.raises(ConfigError, match="add vanilla to methods"):
        preflight_scorer({"name": "lpips", "tiny": True}, ["attend_and_excite"])
    with pytest.raises(ConfigError, match="unknown net 'resnet'"):
        preflight_scorer({"name": "lpips", "net": "resnet"}, ["vanilla"])
    preflight_scorer({"name": "lpips", "tiny": True}, ["vanilla", "attend_and_excite"])


def test_real_alexnet_offline_is_one_line_missing_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache

    def no_network(url, destination, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth is not in torch's hub cache") as error:
        SCORERS.build({"name": "lpips", "net": "alex"}, CPU)
    assert "download.pytorch.org" in str(error.value) and "\n" not in str(error.value)


def test_run_without_vanilla_fails_before_generation(tmp_path):
    cfg = compose_config([f"store_root={tmp_path / 'store'}", f"runs_root={tmp_path / 'runs'}", "model=tiny",
                          "methods=[attend_and_excite]", "scorer=[lpips_tiny]"])
    with pytest.raises(ConfigError, match="add vanilla to methods"):
        run_all(cfg)
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()
