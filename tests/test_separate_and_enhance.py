"""Separate-and-Enhance: the losses on hand-built maps, the finetune on the tiny model (only the key weights change,
the losses fall, checkpoints round-trip, a killed run resumes to the same weights) and the `separate_and_enhance` method."""

import json

import pytest
import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf
from safetensors.torch import load_file

from evalkit.errors import ConfigError, PromptError
from evalkit.finetune.checkpoint import KEY_WEIGHT, load_checkpoint, save_checkpoint
from evalkit.finetune.losses import enhance_loss, norm_loss, separate_loss
from evalkit.finetune.train import finetune, separate_and_enhance_losses
from evalkit.models.loading import load_pipeline
from evalkit.paths import PROJECT_ROOT, config_file
from evalkit.prompts import PromptSpec
from evalkit.sampling.attention import (
    AttentionHooks,
    CrossAttentionRecorder,
    layers_at_resolution,
)
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS
from evalkit.sampling.smoothing import gaussian_kernel
from evalkit.stages import variant_of
from tests.conftest import finetune_config as _config

TINY = config_file("model", "tiny")
FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "separate_and_enhance" / "official_maps.safetensors"
KERNEL = gaussian_kernel(3, 0.5)


def _fresh_pipe():
    return load_pipeline(TINY, torch.device("cpu"))


# --- the losses on hand-built maps -------------------------------------------------------------------------------

def test_separate_loss_is_the_largest_overlap():
    a = torch.tensor([[[0.5, 0.1], [0.2, 0.2]]])[None]  # (pieces=1, heads=1, 2, 2)
    b = torch.tensor([[[0.5, 0.3], [0.1, 0.6]]])[None]
    # A*B/(A+B) per position: 0.25, 0.075, 0.0667, 0.15
    assert separate_loss(a, b).item() == pytest.approx(0.25)
    # the maximum runs over heads too, and over every pair of pieces of multi-piece words
    two_heads = torch.cat([a, torch.full_like(a, 0.8)], dim=1)
    assert separate_loss(two_heads, torch.cat([b, torch.full_like(b, 0.8)], dim=1)).item() == pytest.approx(0.4)
    pieces_b = torch.cat([b, torch.full_like(b, 0.9)])  # (pieces=2, heads=1, 2, 2)
    assert separate_loss(a, pieces_b).item() == pytest.approx(0.45 / 1.4)


def test_enhance_loss_is_one_minus_the_weaker_smoothed_peak():
    peak = torch.zeros(1, 1, 5, 5)
    peak[0, 0, 2, 2] = 1.0  # smoothing spreads it: the peak becomes the kernel's centre, 0.3319
    flat = torch.full((1, 1, 5, 5), 0.5)  # smoothing keeps a constant map
    assert KERNEL[1, 1].item() == pytest.approx(0.3319, abs=1e-4)
    assert enhance_loss(peak, flat, KERNEL).item() == pytest.approx(1 - KERNEL[1, 1].item())
    assert enhance_loss(flat, flat * 1.6, KERNEL).item() == pytest.approx(0.5)
    # a word's weakest piece counts
    assert enhance_loss(torch.cat([flat * 1.6, flat * 0.4]), flat * 1.8, KERNEL).item() == pytest.approx(0.8)


def test_norm_loss_is_the_mean_squared_difference():
    assert norm_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])).item() == pytest.approx(2.0)


def test_every_sample_and_the_true_token_positions_count():
    """Per-sample losses from a batch of maps: sample k reads its own concepts' positions (the released code loses
    the first half of the batch and reads fixed positions)."""
    maps = torch.full((3, 2, 4, 4, 77), 0.01)
    maps[0, :, :, :, 2] = 0.6  # sample 0: concepts at 2 and 5 overlap everywhere
    maps[0, :, :, :, 5] = 0.6
    maps[1, :, 0, 0, 3] = 0.9  # sample 1: concepts at 3 and (pieces) 6, 7 apart
    maps[1, :, 3, 3, 6] = 0.9
    maps[1, :, 3, 3, 7] = 0.9
    maps[2, :, :, :, 4] = 0.2  # sample 2: weak concepts at 4 and 8
    maps[2, :, :, :, 8] = 0.2
    separate, enhance = separate_and_enhance_losses(maps, [([2], [5]), ([3], [6, 7]), ([4], [8])], KERNEL)
    expected_separate = [0.3, 0.9 * 0.01 / 0.91, 0.1]
    assert separate.tolist() == pytest.approx(expected_separate)
    assert enhance[0].item() == pytest.approx(0.4) and enhance[2].item() == pytest.approx(0.8)
    assert 0.0 < enhance[1].item() < 0.9  # isolated peaks are smoothed down


def test_maps_and_losses_match_the_released_code(tiny_pipe):
    """One training batch on the tiny model: the released code's aggregated maps and losses (fixture README) equal
    ours for the samples and heads it keeps (its "sample" ii is our sample 2 + ii // 2, four of the eight heads)."""
    official = load_file(FIXTURE)
    prompts = ["a photo of a cat and a dog", "a photo of a owl and a lamp", "a photo of a horse and a chair", "a photo of a fish and a cup"]
    ids = tiny_pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 64, 64, generator=generator) * 0.18215
    noise = torch.randn(4, 4, 64, 64, generator=generator)
    t = torch.randint(0, 1000, (4,), generator=generator)
    noisy = DDPMScheduler.from_config(tiny_pipe.scheduler.config).add_noise(x0, noise, t)
    layers = layers_at_resolution(tiny_pipe.unet, 64, 16)
    recorder = CrossAttentionRecorder(layers, 16)
    hooks = AttentionHooks(tiny_pipe.unet, layers, recorder).install()
    with torch.no_grad():
        maps = recorder.record_per_head(tiny_pipe.unet, noisy, t, tiny_pipe.text_encoder(ids)[0])
    hooks.remove()
    for ii in range(4):
        kept = maps[2 + ii // 2, 4 * (ii % 2) : 4 * (ii % 2) + 4]  # (4 heads, 16, 16, 77)
        assert (kept[..., [5, 8]] - official["amap_5_8"][ii]).abs().max() < 1e-6
        for (first, second), which in (((5, 8), "true"), ((6, 9), "released")):
            a, b = kept[None, ..., first], kept[None, ..., second]
            assert separate_loss(a, b).item() == pytest.approx(official[f"sep_{which}"][ii].item(), abs=1e-6)
            assert enhance_loss(a, b, KERNEL).item() == pytest.approx(official[f"en_{which}"][ii].item(), abs=1e-6)


# --- the finetune -------------------------------------------------------------------------------------------------

def test_only_key_weights_train_and_change(tmp_path):
    pipe = _fresh_pipe()
    before = {f"{m}.{n}": p.detach().clone() for m in ("unet", "text_encoder", "vae") for n, p in getattr(pipe, m).named_parameters()}
    finetune(_config(tmp_path, steps=2), pipe=pipe)
    trainable = [n for m in ("unet", "text_encoder", "vae") for n, p in getattr(pipe, m).named_parameters() if p.requires_grad]
    assert len(trainable) == 16 and all(n.endswith(KEY_WEIGHT) for n in trainable)
    after = {f"{m}.{n}": p for m in ("unet", "text_encoder", "vae") for n, p in getattr(pipe, m).named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("unet.") and n.endswith(KEY_WEIGHT) for n in changed)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert sorted(checkpoint.weights) == sorted(n for n, _ in pipe.unet.named_parameters() if n.endswith(KEY_WEIGHT))
    assert all(torch.equal(w, after[f"unet.{n}"]) for n, w in checkpoint.weights.items())


@pytest.mark.parametrize(
    "settings, falls, factor",
    [({"steps": 8, "lambda_sep": 1.0, "lambda_en": 0.0, "learning_rate": 0.01}, "separate", 0.85),
     ({"steps": 8, "lambda_sep": 0.0, "lambda_en": 0.5}, "enhance", 0.85),
     ({"steps": 12}, "loss", 0.9)],
)
def test_losses_fall(tmp_path, settings, falls, factor):
    """Each loss falls when it alone is trained (seeded); with the paper's weights 1.0 / 0.5 the total falls (on
    the random tiny model Separate first rises there, as both concepts' maps grow)."""
    log = []
    finetune(_config(tmp_path, **settings), on_step=lambda step, losses: log.append(losses[falls]))
    assert sum(log[-3:]) / 3 < factor * sum(log[:3]) / 3, log


def test_large_scale_recipe_runs_with_the_norm_term(tmp_path):
    cfg = _config(tmp_path, steps=1, batch_size=2, norm_weight=0.5, concept_pairs=[], prompt_template="a photo of a {a} {conjunction} a {b}",
                  conjunctions=["and", "with"], concepts_file="datasets/sepen_concepts.json", concept_lists=["animal_train", "object_train"])
    log = []
    finetune(cfg, on_step=lambda step, losses: log.append(losses))
    assert log[0]["norm"] >= 0.0 and log[0]["lr"] == pytest.approx(0.1)  # scale_lr off: as given


def test_checkpoint_round_trips(tmp_path, trained):
    path, _ = trained
    checkpoint = load_checkpoint(path)
    assert checkpoint.finished and checkpoint.step == 4 and checkpoint.config["finetune"]["learning_rate"] == 0.1
    assert checkpoint.config["model"]["name"] == "tiny"
    assert json.loads((path.parent / "checkpoint.json").read_text())["step"] == 4
    again = save_checkpoint(tmp_path, checkpoint.weights, checkpoint.config, checkpoint.step, checkpoint.steps)
    reloaded = load_checkpoint(again)
    assert reloaded.config == checkpoint.config and (reloaded.step, reloaded.steps) == (4, 4)
    assert all(torch.equal(reloaded.weights[n], w) for n, w in checkpoint.weights.items())


class _Killed(Exception):
    pass


def test_a_killed_finetune_resumes_to_the_same_weights(tmp_path, trained):
    """Killed after step 3 (the last save was at step 2), re-run: bitwise the uninterrupted run's weights."""
    uninterrupted, uninterrupted_log = trained

    def kill_at_3(step, losses):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        finetune(_config(tmp_path), on_step=kill_at_3)
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").step == 2
    path = finetune(_config(tmp_path))
    resumed, expected = load_checkpoint(path), load_checkpoint(uninterrupted)
    assert resumed.step == 4 and all(torch.equal(resumed.weights[n], w) for n, w in expected.weights.items())
    logged = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]
    assert [row["loss"] for row in logged] == [row["loss"] for row in uninterrupted_log]
    assert finetune(_config(tmp_path)) == path  # finished: nothing more to do
    with pytest.raises(ConfigError, match="different config"):
        finetune(_config(tmp_path, learning_rate=0.2))


def test_bad_recipes_fail_before_training(tmp_path):
    with pytest.raises(PromptError, match="'cat' is not a word of the prompt"):  # the template pluralises it
        finetune(_config(tmp_path, prompt_template="a photo of {a}s {conjunction} {b}"))
    with pytest.raises(ConfigError, match="empty concept"):
        finetune(_config(tmp_path, concept_pairs=[["cat", " "]]))
    with pytest.raises(ConfigError, match="lacks \\{b\\}"):
        finetune(_config(tmp_path, prompt_template="a photo of {a} {conjunction}"))
    with pytest.raises(ConfigError, match="either concept_pairs"):
        finetune(_config(tmp_path, concept_lists=["animal_train"], concepts_file="datasets/sepen_concepts.json"))
    with pytest.raises(ConfigError, match="no list"):
        finetune(_config(tmp_path, concept_pairs=[], concept_lists=["plants"], concepts_file="datasets/sepen_concepts.json"))
    with pytest.raises(ConfigError, match="unknown parameter"):
        finetune(_config(tmp_path, lr=1.0))
    assert not (tmp_path / "checkpoint.safetensors").exists()


# --- the separate_and_enhance method ---------------------------------------------------------------------------------------------

def test_sepen_samples_with_the_finetuned_keys_and_restores_the_model(tiny_pipe, trained):
    path, _ = trained
    spec = PromptSpec("cat-dog", "a cat and a dog")
    settings = SamplingSettings(2, 7.5, 64, 64)
    original = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    vanilla = sample(tiny_pipe, METHODS.build({"name": "vanilla"}), spec, [0], settings)
    separate_and_enhance = sample(tiny_pipe, METHODS.build({"name": "separate_and_enhance", "checkpoint": str(path)}), spec, [0], settings)
    assert torch.isfinite(separate_and_enhance.latents).all()
    assert (separate_and_enhance.latents - vanilla.latents).abs().max() > 1e-3
    assert all(torch.equal(p, original[n]) for n, p in tiny_pipe.unet.named_parameters())  # teardown restored them


def test_sepen_errors_name_the_checkpoint_and_the_command(tmp_path, trained):
    with pytest.raises(ConfigError, match="outputs/finetune/tiny/tiny_demo/checkpoint.safetensors does not exist.*python -m evalkit finetune model=tiny finetune=tiny_demo"):
        METHODS.build({"name": "separate_and_enhance", "checkpoint": str(tmp_path / "outputs/finetune/tiny/tiny_demo/checkpoint.safetensors")})
    path, _ = trained
    checkpoint = load_checkpoint(path)
    unfinished = save_checkpoint(tmp_path, checkpoint.weights, checkpoint.config, 2, 4)
    with pytest.raises(ConfigError, match="unfinished finetune \\(step 2 of 4\\)"):
        METHODS.build({"name": "separate_and_enhance", "checkpoint": str(unfinished)})
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        METHODS.build({"name": "separate_and_enhance", "checkpoint": str(tmp_path / "junk.safetensors")})


def test_store_variant_changes_with_the_checkpoint(tmp_path, trained):
    path, _ = trained
    checkpoint = load_checkpoint(path)
    copy = save_checkpoint(tmp_path, checkpoint.weights, checkpoint.config, 4, 4)
    cfg = OmegaConf.create({"method": {"name": "separate_and_enhance", "checkpoint": str(copy)}, "sampling": {"num_inference_steps": 2},
                            "model": {"name": "tiny", "seed": 0}})
    first, identity = variant_of(cfg)
    assert identity["method"]["checkpoint_sha256"]
    assert variant_of(cfg)[0] == first
    weights = {n: w + 1e-3 for n, w in checkpoint.weights.items()}
    save_checkpoint(tmp_path, weights, checkpoint.config, 4, 4)  # same path, other weights
    assert variant_of(cfg)[0] != first
