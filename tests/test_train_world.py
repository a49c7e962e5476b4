"""The shapes-world training (`python -m evalkit train-world`) on a shrunken recipe: a couple of steps per stage at
32 px on the CPU. Checkpoints are written, a killed run resumes to the uninterrupted run's losses and weights, the
time budget stops a call with a checkpoint, the export loads through conf/model/shapes.yaml and samples through the
harness loop, the size cap holds, and the model card reports failure rates only when they were measured."""

import dataclasses
import json
import shutil
import time
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from evalkit.errors import ConfigError, MissingWeightsError
from evalkit.finetune.checkpoint import load_checkpoint
from evalkit.finetune.loop import run_steps
from evalkit.models.loading import load_pipeline, model_revision
from evalkit.paths import config_file
from evalkit.prompts import PromptSpec
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS
from evalkit.world.export import RunFacts, export_pipeline
from evalkit.world.scenes import COLOURED_FORMS
from evalkit.world.split import is_seen
from evalkit.world.train import (
    FORMAT,
    SceneBatches,
    WorldRecipe,
    draw_training_scene,
    train_world,
)

TINY = config_file("model", "tiny")
SHAPES = config_file("model", "shapes")
RECIPE = config_file("train_world", "shapes")


def _config(tmp_path, max_minutes=None, failure_rates=None, **overrides):
    """The shapes recipe shrunk: 32 px (16x16 latents), batch 2, VAE 2 steps, diffusion 4 steps (saved at 2 and 4)."""
    recipe = OmegaConf.merge(RECIPE, {
        "output_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "export"), "resolution": 32, "scaling_scenes": 4,
        "vae": {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "warmup_steps": 1},
        "diffusion": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "warmup_steps": 2},
        "proportion_empty_prompts": 0.5,
    }, overrides)
    return OmegaConf.create({"device": "cpu", "max_minutes": max_minutes, "num_workers": 0, "failure_rates": failure_rates,
                             "commit": "0123abc", "model": TINY, "train_world": recipe})


def _logged(folder):
    return [json.loads(line) for line in (folder / "loss_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted shrunken run: (tmp folder, export folder, the losses each step reported). What a run killed
    after diffusion step 3 would leave is kept in tmp/killed: the state saved at step 2, the log up to step 3."""
    tmp = tmp_path_factory.mktemp("world")
    losses = []

    def record(stage, step, step_losses):
        losses.append((stage, step, step_losses["loss"]))
        if stage == "diffusion" and step == 2:
            shutil.copytree(tmp / "run", tmp / "killed" / "run")
        if stage == "diffusion" and step == 3:  # the log has step 3; the state is still step 2's
            shutil.copy(tmp / "run" / "diffusion" / "loss_log.jsonl", tmp / "killed" / "run" / "diffusion")

    folder = train_world(_config(tmp), on_step=record)
    return tmp, folder, losses


def _shapes_model(folder):
    return OmegaConf.merge(SHAPES, {"path": str(folder)})


@pytest.mark.slow
def test_stages_write_checkpoints_logs_and_calls(trained):
    tmp, folder, losses = trained
    assert folder == tmp / "export"
    assert [(stage, step) for stage, step, _ in losses] == [("vae", 1), ("vae", 2)] + [("diffusion", step) for step in (1, 2, 3, 4)]
    vae = load_checkpoint(tmp / "run" / "vae" / "checkpoint.safetensors", FORMAT)
    assert vae.step == 2 and vae.config["scaling_factor"] > 0
    assert [row["step"] for row in _logged(tmp / "run" / "diffusion")] == [1, 2, 3, 4]
    state = load_file(tmp / "run" / "diffusion" / "train_state.safetensors")
    assert any(name.startswith("weight/ema/unet.") for name in state) and any(name.startswith("exp_avg/text_encoder.") for name in state)
    calls = [json.loads(line) for line in (tmp / "run" / "calls.jsonl").read_text().splitlines()]
    assert [(c["stage"], c["from_step"], c["to_step"], c["commit"]) for c in calls] == [("vae", 0, 2, "0123abc"), ("diffusion", 0, 4, "0123abc")]
    exported = json.loads((folder / "vae" / "config.json").read_text())
    assert exported["scaling_factor"] == pytest.approx(vae.config["scaling_factor"])


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_same_data_and_losses(trained):
    """Killed after diffusion step 3 (saved at step 2): the re-run redoes steps 3 and 4 on the same batches, to the
    uninterrupted run's losses and exported weights; the log's step 3 from before the kill is replaced."""
    tmp, uninterrupted, expected_losses = trained
    killed = tmp / "killed"
    assert [row["step"] for row in _logged(killed / "run" / "diffusion")] == [1, 2, 3]
    resumed_losses = []
    folder = train_world(_config(killed), on_step=lambda stage, step, losses: resumed_losses.append((stage, step, losses["loss"])))
    assert resumed_losses == expected_losses[-2:]
    assert [row["loss"] for row in _logged(killed / "run" / "diffusion")] == [loss for stage, _, loss in expected_losses if stage == "diffusion"]
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        ours, theirs = load_file(folder / part), load_file(uninterrupted / part)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    with pytest.raises(ConfigError, match="different config"):
        train_world(_config(killed, diffusion={"learning_rate": 1e-3}))


def test_a_spent_time_budget_starts_no_stage(tmp_path, capsys):
    assert train_world(_config(tmp_path, max_minutes=1e-9)) is None
    assert "stopped for the time budget at vae step 0 of 2" in capsys.readouterr().out
    assert not (tmp_path / "run" / "vae").exists() and not (tmp_path / "export").exists()


def test_the_step_loop_checkpoints_and_stops_before_its_deadline(tmp_path):
    """Steps of about 0.1 s and a deadline 0.35 s away: the loop stops after the step past which the slowest step
    would overrun it, and saves there (checkpoint_every alone would save only at step 10)."""
    saves = []

    def slow_step(step):
        time.sleep(0.1)
        return {"loss": float(step)}

    done = run_steps("test", tmp_path, 0, 10, 10, slow_step, saves.append, deadline=time.monotonic() + 0.35)
    assert 1 <= done < 10 and saves == [done]
    assert [row["step"] for row in _logged(tmp_path)] == list(range(1, done + 1))


@pytest.mark.slow
def test_the_export_loads_through_the_shapes_config_and_samples(trained):
    _, folder, _ = trained
    pipe = load_pipeline(_shapes_model(folder), torch.device("cpu"))
    tiny = load_pipeline(TINY, torch.device("cpu"))
    assert list(pipe.unet.attn_processors) == list(tiny.unet.attn_processors)  # methods find the same layers
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.unet.dtype == torch.float32
    assert pipe.tokenizer("a red circle and a blue star").input_ids == tiny.tokenizer("a red circle and a blue star").input_ids
    result = sample(pipe, METHODS.build({"name": "vanilla"}), PromptSpec("pair", "a circle and a square", ("circle", "square")), [0], SamplingSettings(2, 7.5, 64, 64))
    assert result.images[0].size == (64, 64) and result.failed_step == [None]
    assert model_revision(_shapes_model(folder)).startswith("sha256:")


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(MissingWeightsError, match="no weights in .*absent; make them with `python -m evalkit train-world"):
        load_pipeline(_shapes_model(tmp_path / "absent"), torch.device("cpu"))


@pytest.mark.slow
def test_the_size_cap_keeps_the_previous_export(tmp_path, trained):
    _, folder, _ = trained
    pipe = load_pipeline(_shapes_model(folder), torch.device("cpu"))
    target = tmp_path / "shapes-sd"
    target.mkdir()
    (target / "previous").write_text("kept")
    with pytest.raises(ConfigError, match="over the cap of 1 MB"):
        export_pipeline(pipe, _facts(tmp_path), target, torch.float16, max_megabytes=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shapes-sd"]  # no staging folder left behind
    assert (target / "previous").read_text() == "kept"


def _recipe(tmp_path):
    return WorldRecipe.from_config(OmegaConf.to_container(_config(tmp_path).train_world, resolve=True))


def _facts(tmp_path):
    recipe = _recipe(tmp_path)
    logs = {"vae": [{"step": 1, "loss": 0.5}], "diffusion": [{"step": 1, "loss": 1.0}]}
    return RunFacts(dataclasses.asdict(recipe), OmegaConf.to_container(TINY), {form: "a star" for form in recipe.forms}, 0.5,
                    {"vae": 1, "diffusion": 1}, logs, [], None)


@pytest.mark.slow
def test_the_model_card_reports_failure_rates_only_when_measured(tmp_path, trained):
    tmp, folder, _ = trained
    card = (folder / "README.md").read_text()
    assert "Not measured yet." in card and "| diffusion | 0..4 |" in card and "0123abc" in card
    assert "| coloured_pair |" in card and "seed 0" in card and (folder / "loss_curve.png").stat().st_size > 1000
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"source": "vanilla, 20 unseen pairs x 8 seeds", "rates": {"an object lost": 0.375}}))
    before = {path: path.read_bytes() for path in folder.rglob("*.safetensors")}
    assert train_world(_config(tmp, failure_rates=str(rates))) == folder  # finished: exported again, nothing trained
    card = (folder / "README.md").read_text()
    assert "Not measured yet." not in card and "| an object lost | 37.5% |" in card and "20 unseen pairs x 8 seeds" in card
    assert {path: path.read_bytes() for path in folder.rglob("*.safetensors")} == before
    rates.write_text(json.dumps({"source": "x", "rates": {"an object lost": 37.5}}))
    with pytest.raises(ConfigError, match="fraction in \\[0, 1\\]"):
        train_world(_config(tmp, failure_rates=str(rates)))


def test_training_scenes_are_seen_drawn_with_the_shares_and_fixed_by_step(tmp_path):
    recipe = _recipe(tmp_path)
    forms = list(recipe.forms)
    shares = np.array([recipe.forms[form] for form in forms]) / sum(recipe.forms.values())
    rng = np.random.default_rng(0)
    scenes = [draw_training_scene(rng, forms, shares) for _ in range(3000)]
    assert all(is_seen(scene) for scene in scenes)
    counts = Counter(scene.form for scene in scenes)
    for form, share in zip(forms, shares):
        assert abs(counts[form] / len(scenes) - share) < 0.03, (form, counts)
    assert all(len({item.colour for item in scene.items}) == len(scene.items) for scene in scenes if scene.form in COLOURED_FORMS)
    tokenizer = load_pipeline(TINY, torch.device("cpu")).tokenizer
    data = SceneBatches(recipe, "diffusion", 4, tokenizer)
    first, again, other = data[7], data[7], data[8]
    assert torch.equal(first[0], again[0]) and first[2] == again[2] and first[2] != other[2]
    assert first[0].shape == (4, 3, 32, 32) and -1 <= first[0].min() and first[0].max() <= 1


def test_bad_recipes_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown caption form"):
        train_world(_config(tmp_path, forms={"shape_quadruple": 1.0}))
    with pytest.raises(ConfigError, match="unknown parameter"):
        train_world(_config(tmp_path, diffusion={"lr": 1.0}))
    with pytest.raises(ConfigError, match="kind: random"):
        train_world(OmegaConf.merge(_config(tmp_path), {"model": SHAPES}))
    assert not (tmp_path / "run").exists()
