"""Faults and bad input: a run killed at any point, a damaged store, NaN latents, bad configuration.

Kills are simulated in-process (KeyboardInterrupt at a chosen call, as SIGINT would raise there); a real SIGKILL
during generation is tests/test_store.py::test_killed_generation_resumes_to_the_same_images.
"""

import json
import logging
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from evalkit import stages
from evalkit.__main__ import main
from evalkit.paths import PROJECT_ROOT, config_file
from evalkit.prompts import load_prompt_set
from evalkit.reporting import stage as report_stage
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS
from evalkit.scoring.clip import ClipScorer
from evalkit.store import ImageKey, ImageStore
from tests.conftest import compose_config, poison

DEMO = PROJECT_ROOT / "datasets" / "demo.jsonl"
# Cheap settings for the tiny model: 64 px (8x8 maps) and no iterative refinement; Attention Regulation's Gaussian
# basis needs 16x16 maps, so 128 px and one gradient step per layer call.
CHEAP = {
    "attend_and_excite": ({"thresholds": {}, "attention_res": 8}, 64),
    "conform": ({"iterative_refinement_steps": [], "attention_res": 8}, 64),
    "syngen": ({"attention_res": 8}, 64),
    "attention_regulation": ({"iterations": 1}, 128),
}


def config(tmp_path: Path, *overrides: str):
    """A small run of the tiny model: 2 prompts x 2 seeds, 2 steps at 64 px, clip_tiny one image per batch."""
    return compose_config([
        "model=tiny", "scorer=[clip_tiny]", "scorers.clip.batch_size=1", "sampling.num_inference_steps=2",
        "sampling.resolution=64", "limit=2", "seeds=[0,1]", "batch_size=2", "experiment_name=faults",
        f"store_root={tmp_path / 'store'}", f"runs_root={tmp_path / 'runs'}", f"report_dir={tmp_path / 'report'}",
        *overrides,
    ])


def kill_at(monkeypatch, owner, name: str, when) -> None:
    """Make `owner.name` raise KeyboardInterrupt, as a kill would, at the call for which `when(n, *args)` holds
    (n counts calls from 1)."""
    original = getattr(owner, name)
    calls = 0

    def killed(*args, **kwargs):
        nonlocal calls
        calls += 1
        if when(calls, *args):
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, killed)


def results(tmp_path: Path) -> dict[str, bytes]:
    """What a run leaves for its reader: images, score tables, the report (page, README, plots, grids)."""
    paths = [*(tmp_path / "store").rglob("*.png"), *(tmp_path / "runs").rglob("scores/**/*.csv"),
             *(tmp_path / "report").rglob("*")]
    return {str(path.relative_to(tmp_path)): path.read_bytes() for path in sorted(paths) if path.is_file()}


@pytest.mark.slow
def test_a_run_killed_anywhere_and_rerun_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = config(tmp_path, "limit=1")  # one batch of two seeds
    stages.generate(cfg)
    stages.score(cfg)
    report_stage.report(cfg)
    uninterrupted = results(tmp_path)
    assert len([name for name in uninterrupted if name.endswith(".csv")]) == 1
    for folder in ("store", "runs", "report"):
        shutil.rmtree(tmp_path / folder)

    import evalkit.reporting.render
    import evalkit.store

    with monkeypatch.context() as patch:  # killed after the first image of two
        kill_at(patch, ImageStore, "put", lambda n, *args: n == 2)
        with pytest.raises(KeyboardInterrupt):
            stages.generate(cfg)
    assert len(list((tmp_path / "store").rglob("*.json"))) == 1
    with monkeypatch.context() as patch:  # the batch again (whole), killed between its second image and record
        kill_at(patch, evalkit.store, "atomic_write_json", lambda n, *args: n == 2)
        with pytest.raises(KeyboardInterrupt):
            stages.generate(cfg)
    store = ImageStore(tmp_path / "store")
    assert len(list(store.root.rglob("*.png"))) == 2 and len(list(store.root.rglob("*.json"))) == 1
    # What a SIGKILL inside a write leaves: a temporary file of half an image, next to the finished one.
    prompt_folder = next(store.root.rglob("*.json")).parent
    leftover = prompt_folder / ".1.png.k1ll3d.tmp"
    leftover.write_bytes(next(prompt_folder.glob("*.png")).read_bytes()[:50])
    stages.generate(cfg)
    assert not leftover.exists() and len(list(store.root.rglob("*.json"))) == 2

    with monkeypatch.context() as patch:  # scoring killed after its first batch
        kill_at(patch, ClipScorer, "score_batch", lambda n, *args: n == 2)
        with pytest.raises(KeyboardInterrupt):
            stages.score(cfg)
    assert not list((tmp_path / "runs").rglob("*.csv"))
    stages.score(cfg)

    with monkeypatch.context() as patch:  # the report killed after its README, before its page
        kill_at(patch, evalkit.reporting.render, "atomic_write_bytes", lambda n, path, data: path.name == "index.html")
        with pytest.raises(KeyboardInterrupt):
            report_stage.report(cfg)
    assert not (tmp_path / "report" / "index.html").exists()
    report_stage.report(cfg)

    assert results(tmp_path) == uninterrupted
    assert not [path for path in tmp_path.rglob("*.tmp")]


@pytest.mark.slow
def test_damaged_store_items_are_reported_by_path_skipped_by_score_and_regenerated(tmp_path, caplog):
    cfg = config(tmp_path, "seeds=[0,1,2]")
    stages.generate(cfg)
    store = ImageStore(tmp_path / "store")
    pictures = sorted(store.root.rglob("*.png"))
    originals = {path: path.read_bytes() for path in pictures}
    truncated, without_record, without_image, bad_record = pictures[:4]
    truncated.write_bytes(originals[truncated][: len(originals[truncated]) // 2])
    without_record.with_suffix(".json").unlink()
    without_image.unlink()
    bad_record.with_suffix(".json").write_text('{"status": "o')
    damaged = [truncated, without_record, without_image, bad_record.with_suffix(".json")]

    with caplog.at_level(logging.WARNING, logger="evalkit"):
        stages.score(cfg)
    assert all(str(path) in caplog.text for path in damaged)
    table = next((tmp_path / "runs").rglob("*.csv"))
    scored = set(pd.read_csv(table, dtype={"prompt_id": str})[["prompt_id", "seed"]].itertuples(index=False))
    intact = {(path.parent.name, int(path.stem)) for path in pictures[4:]}
    assert scored == intact

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evalkit"):
        stages.generate(cfg)
    assert "regenerating 4 damaged items" in caplog.text and all(str(path) in caplog.text for path in damaged)
    assert {path: path.read_bytes() for path in sorted(store.root.rglob("*.png"))} == originals
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evalkit"):
        stages.score(cfg)
    assert "damaged" not in caplog.text
    scored = set(pd.read_csv(table, dtype={"prompt_id": str})[["prompt_id", "seed"]].itertuples(index=False))
    assert len(scored) == 6


def cheap_method(name: str):
    params, resolution = CHEAP[name]
    config = OmegaConf.to_container(config_file("method", name))
    return METHODS.build({**config, **params}), SamplingSettings(2, 7.5, resolution, resolution)


@pytest.mark.parametrize(
    "name, hook",
    [("attend_and_excite", "update_latents"), ("conform", "update_latents"), ("syngen", "update_latents"),
     ("attention_regulation", "predict_noise")],  # AR optimises attention inside the noise prediction
)
def test_nan_latents_fail_their_image_at_their_step_and_spare_the_batch(tiny_pipe, monkeypatch, name, hook):
    spec = load_prompt_set(DEMO)[2]  # "a red car and a blue bowl": subjects and modifier groups
    method, settings = cheap_method(name)
    poison(monkeypatch, METHODS[name], hook, seed=0, step=1)
    result = sample(tiny_pipe, method, spec, [0, 1], settings)
    assert result.failed_step == [1, None]
    assert torch.isfinite(result.latents[1]).all()  # the method went on optimising the other image


def test_a_failed_image_leaves_the_rest_of_its_batch_unchanged(tiny_pipe, monkeypatch):
    spec = load_prompt_set(DEMO)[2]
    method, settings = cheap_method("attend_and_excite")
    clean = sample(tiny_pipe, method, spec, [0, 1], settings)
    poison(monkeypatch, METHODS["attend_and_excite"], "update_latents", seed=1, step=1)
    result = sample(tiny_pipe, method, spec, [0, 1], settings)
    assert result.failed_step == [None, 1]
    assert torch.equal(result.latents[0], clean.latents[0])
    assert result.images[0].tobytes() == clean.images[0].tobytes()


@pytest.mark.slow
def test_nan_failures_are_recorded_the_run_goes_on_and_the_report_counts_them(tmp_path, monkeypatch):
    cfg = config(tmp_path, "method=attend_and_excite", "method.attention_res=8", "scorer=[clip_tiny,overhead]",
                 "limit=1")
    OmegaConf.update(cfg, "method.thresholds", {}, merge=False)
    poison(monkeypatch, METHODS["attend_and_excite"], "update_latents", seed=0, step=1)
    stages.generate(cfg)
    stages.score(cfg)
    report_stage.report(cfg)

    store = ImageStore(tmp_path / "store")
    variant, _ = stages.variant_of(cfg)
    for spec in load_prompt_set(DEMO, limit=1):
        failed, fine = (ImageKey("tiny", variant, "demo", spec.id, seed) for seed in (0, 1))
        assert store.read_record(failed) | {"status": "failed", "failed_step": 1} == store.read_record(failed)
        assert not store.image_path(failed).exists()
        assert store.read_record(fine)["status"] == "ok" and store.image_path(fine).is_file()
    readme = (tmp_path / "report" / "README.md").read_text()
    failures = readme[readme.index("## Failures per method"):].split("\n## ")[0]
    assert "| attend_and_excite | 1 | 2 | 1 (1) |" in failures
    clip_rows = pd.read_csv(next((tmp_path / "runs").rglob("scores/clip/*.csv")), dtype={"prompt_id": str})
    assert set(clip_rows["seed"]) == {1}  # failed images get no scores


def run_main(monkeypatch, capsys, tmp_path, *arguments: str) -> str:
    """`python -m evalkit <arguments>` in-process; it must exit with status 2 before loading any model. Returns
    what it printed on stderr."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded despite the bad configuration")

    monkeypatch.setattr(stages, "load_pipeline", no_model)
    places = [f"store_root={tmp_path / 'store'}", f"runs_root={tmp_path / 'runs'}", "model=tiny"]
    monkeypatch.setattr(sys, "argv", ["evalkit", *arguments, *places])
    with pytest.raises(SystemExit) as exit_status:
        main()
    assert exit_status.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["generate", "method=attend_and_exite"], "unknown method 'attend_and_exite' (did you mean 'attend_and_excite'?); known: attend_and_excite"),
        (["run", "scorer=[clip_tiny,clip_scroe]"], "unknown scorer 'clip_scroe'; known: clip, clip_tiny"),
        (["score", "--multirun", "model=tiny,sd99"], "unknown model 'sd99'; known: sd14"),
        (["generate", "dataset=dem"], "unknown dataset 'dem'"),
        (["generate", "seeds=[0,x]"], "seeds must be a list of integers, got [0, 'x']"),
        (["generate", "seeds=[0,1.5]"], "seeds must be a list of integers"),
        (["generate", "seeds=[0"], "cannot parse the overrides"),
    ],
)
def test_bad_configuration_is_one_line_before_any_model(monkeypatch, capsys, tmp_path, arguments, words):
    error = run_main(monkeypatch, capsys, tmp_path, *arguments)
    assert error.splitlines() == [error.strip()] and error.startswith("evalkit: error: ")
    assert words in error


def test_a_bad_dataset_row_is_named_by_file_line_and_field(monkeypatch, capsys, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"id": "a", "prompt": "a cat"}) + "\n" + json.dumps({"id": "b", "prompt": ""}) + "\n")
    error = run_main(monkeypatch, capsys, tmp_path, "generate", f"dataset.path={rows}")
    assert error.strip() == f"evalkit: error: {rows}:2: field 'prompt' must be a non-empty string"
