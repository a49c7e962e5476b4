import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from evalkit.methods.conform import Conform, conform_loss, token_embeddings
from evalkit.paths import config_file
from evalkit.prompts import PromptSpec, TokenIndexer
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS
from evalkit.sampling.smoothing import gaussian_kernel

FIXTURE = Path(__file__).parent / "fixtures" / "conform" / "latents.safetensors"
# The official notebook's prompt and groups: green -> 2, glasses -> 3, yellow -> 6, clock -> 7.
SPEC = PromptSpec("p", "a green glasses and a yellow clock", groups=(("green", "glasses"), ("yellow", "clock")))
# PNDM's 3 steps make loop indices 0..3: refinement at 0 (no previous maps yet) and at 2 (with them), a plain
# gradient step at 1, none at 3 (max_iter_to_alter). Fewer refinement iterations keep it fast.
SETTINGS = SamplingSettings(num_inference_steps=3, guidance_scale=7.5, height=128, width=128)
REDUCED = dict(max_iter_to_alter=3, refinement_steps=3)
# fixture key prefix -> our settings for the same official call (see fixtures/conform/README.md)
RUNS = {
    "scaled": dict(REDUCED, iterative_refinement_steps=[0, 2], scale_factor=20000),
    "softmax_normalize": dict(REDUCED, iterative_refinement_steps=[0], softmax_normalize=True),
}
# Measured max |ours - official| over the steps: 2.6e-5 (scaled), 2.5e-5 (softmax_normalize). The official run used diffusers 0.21.4 and transformers
# 4.39.3, whose UNet and text encoder round differently (one guidance forward: noise 1.3e-6, maps 5.6e-9 apart, loss
# gradient 8e-12 of 1.5e-6), and its explicit attention in every layer; guidance 7.5 and PNDM amplify that.
# The softmax_normalize run cannot resolve its sharpening: with softmax(97 x maps) instead of 100 x its latents are
# still within 8.5e-5 of the official ones (2.1e-5 with 100, AVX2 kernels on two threads), because at the notebook's
# step size CONFORM moves them by ~1e-3 only. `test_softmax_normalize_loss_is_the_official_formula` pins it instead.
TOLERANCE = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")


def _per_step(pipe, method, seeds=(0,), spec=SPEC) -> tuple[list[torch.Tensor], object]:
    steps = []
    result = sample(pipe, method, spec, list(seeds), SETTINGS, on_step=lambda i, t, z: steps.append(z.clone()))
    return steps, result


@pytest.mark.parametrize("run, seeds", [("scaled", (0, 1)), ("softmax_normalize", (0,))])
def test_matches_the_official_pipeline(tiny_pipe, run, seeds):
    """Golden latents of the official ConformPipeline for seed 0 (fixtures/conform/README.md). In the scaled run
    seed 0 is guided in a batch with seed 1, against its own previous-step maps."""
    golden = load_file(FIXTURE)
    processors = dict(tiny_pipe.unet.attn_processors)
    steps, result = _per_step(tiny_pipe, Conform(**RUNS[run]), seeds=seeds)
    assert tiny_pipe.unet.attn_processors == processors, "teardown did not restore the attention processors"
    assert result.failed_step == [None] * len(seeds)
    differences = [(latents[0] - golden[f"{run}/step_{i}"][0]).abs().max().item() for i, latents in enumerate(steps)]
    print(f"{run}: max |ours - official| per loop index:", differences)
    assert len(steps) == 4 and max(differences) < TOLERANCE, differences


def test_each_image_of_a_batch_is_guided_alone(tiny_pipe):
    """Seed 1 guided in a batch after seed 0, against its own previous-step maps, as alone (the scaled run moves
    the latents by more than 1e-2, see the next test)."""
    batch, _ = _per_step(tiny_pipe, Conform(**RUNS["scaled"]), seeds=(0, 1))
    alone, _ = _per_step(tiny_pipe, Conform(**RUNS["scaled"]), seeds=(1,))
    differences = [(in_batch[1] - by_itself[0]).abs().max().item() for in_batch, by_itself in zip(batch, alone)]
    print("max |batch - alone| per loop index:", differences)
    assert max(differences) < 1e-4, differences


def test_the_tolerance_resolves_what_conform_changes(tiny_pipe):
    """In the scaled golden run CONFORM moves the latents far more than the parity tolerance, from the first step
    (so a method that did less, or nothing, would fail the parity test)."""
    golden = load_file(FIXTURE)
    vanilla, _ = _per_step(tiny_pipe, METHODS.build({"name": "vanilla"}))
    changes = [(golden[f"scaled/step_{i}"] - latents).abs().max().item() for i, latents in enumerate(vanilla)]
    assert min(changes) > 100 * TOLERANCE, changes


def test_the_loop_draws_the_fixtures_initial_noise(tiny_pipe):
    generator = torch.Generator("cpu").manual_seed(0)
    initial = tiny_pipe.prepare_latents(1, 4, 128, 128, torch.float32, torch.device("cpu"), [generator])
    assert torch.equal(initial, load_file(FIXTURE)["initial"])


# Losses on hand-built maps. Maps are (res, res, 77) with SOT at 0; a token's embedding is its res*res map.


def _maps(token_maps: dict[int, list[float]], res: int = 2) -> torch.Tensor:
    maps = torch.zeros(res, res, 77)
    for index, values in token_maps.items():
        maps[:, :, index] = torch.tensor(values).reshape(res, res)
    return maps


E1, E2 = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]
TAU = 0.5


def test_groups_with_alike_maps_give_the_infonce_minimum_for_their_similarities():
    maps = _maps({2: E1, 3: E1, 6: E2, 7: E2})
    loss = conform_loss(maps, None, [[2, 3], [6, 7]], None, TAU, softmax_normalize=False)
    # every positive pair: cosine 1 against two negatives of cosine 0
    assert loss.item() == pytest.approx(-math.log(math.exp(1 / TAU) / (math.exp(1 / TAU) + 2)), rel=1e-6)


def test_maps_bound_across_groups_cost_more():
    maps = _maps({2: E1, 3: E2, 6: E1, 7: E2})  # green looks like yellow, glasses like clock
    loss = conform_loss(maps, None, [[2, 3], [6, 7]], None, TAU, softmax_normalize=False)
    # positive cosine 0; negatives cosine 1 and 0
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(1 / TAU) + 1)), rel=1e-6)


def test_previous_maps_are_the_positives_of_one_token_groups():
    maps = _maps({2: E1, 6: E2})
    assert conform_loss(maps, None, [[2], [6]], None, TAU, softmax_normalize=False).item() == 0.0  # no positives
    previous = _maps({2: E1, 6: E2})
    loss = conform_loss(maps, previous, [[2], [6]], None, TAU, softmax_normalize=False)
    assert loss.item() == pytest.approx(-math.log(math.exp(1 / TAU) / (math.exp(1 / TAU) + 2)), rel=1e-6)


def test_one_group_has_no_negatives_and_no_loss():
    maps = _maps({2: E1, 3: E2})
    assert conform_loss(maps, maps.clone(), [[2, 3]], None, TAU, softmax_normalize=False).item() == 0.0


def _nt_xent(embeddings: torch.Tensor, classes: list[int], temperature: float) -> torch.Tensor:
    """NT-Xent written out: mean over ordered same-class pairs of -log(e^{s_ap/t} / (e^{s_ap/t} + sum_neg e^{s_an/t}))."""
    similarity = F.cosine_similarity(embeddings[:, None], embeddings[None], dim=-1) / temperature
    terms = []
    for a, class_a in enumerate(classes):
        negatives = similarity[a, [n for n, c in enumerate(classes) if c != class_a]]
        for p, class_p in enumerate(classes):
            if p != a and class_p == class_a:
                terms.append(-torch.log_softmax(torch.cat([similarity[a, p : p + 1], negatives]), 0)[0])
    return torch.stack(terms).mean()


def test_loss_is_nt_xent_over_the_smoothed_maps_of_both_steps():
    generator = torch.Generator().manual_seed(0)
    maps, previous = torch.rand(2, 4, 4, 77, generator=generator)
    kernel = gaussian_kernel(3, 0.5)
    groups = [[2, 3], [6, 7, 8]]
    loss = conform_loss(maps, previous, groups, kernel, TAU, softmax_normalize=False)
    embeddings, classes = [], []
    for group, tokens in enumerate(groups):
        for source in (maps, previous):
            embeddings += token_embeddings(source, tokens, kernel, softmax_normalize=False)
            classes += [group] * len(tokens)
    assert loss.item() == pytest.approx(_nt_xent(torch.stack(embeddings), classes, TAU).item(), rel=1e-5)


def _official_embedding(maps: torch.Tensor, index: int) -> torch.Tensor:
    """One token's embedding as the official `_compute_contrastive_loss` computes it with `softmax_normalize` (see
    fixtures/conform/README.md), written out independently of evalkit: softmax over the text tokens (positions
    1..75) of 100 x maps, the token's map (index shifted by the removed SOT), reflect-padded by one pixel and
    convolved with A&E's 3x3 GaussianSmoothing kernel (sigma 0.5, exp(-((x - mean) / (2 sigma))^2), normalised)."""
    text = torch.softmax(100 * maps[:, :, 1:-1], dim=-1)[:, :, index - 1]
    profile = torch.exp(-(((torch.arange(3.0) - 1) / (2 * 0.5)) ** 2))
    kernel = torch.outer(profile, profile) / torch.outer(profile, profile).sum()
    padded = F.pad(text[None, None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel[None, None])[0, 0].reshape(-1)


def test_softmax_normalize_loss_is_the_official_formula():
    """The sharpened embeddings and the loss of `softmax_normalize` against the official formula written out.

    Maps in [0, 0.05) put the softmax logits in [0, 5), where the sharpening factor matters. Measured: embeddings
    within 2.1e-7 of the written-out ones (relative to their maximum), loss within 1.5e-7 (relative); with a
    sharpening of 97 instead of 100 they are 2.3e-2 and 1.5e-4 away. (The end-to-end softmax_normalize run cannot
    tell 97 from 100, see TOLERANCE.)"""
    generator = torch.Generator().manual_seed(2)
    maps, previous = torch.rand(2, 16, 16, 77, generator=generator) / 20
    groups, kernel = [[2, 3], [6, 7]], gaussian_kernel(3, 0.5)
    tokens = [index for group in groups for index in group]
    for ours, index in zip(token_embeddings(maps, tokens, kernel, softmax_normalize=True), tokens):
        expected = _official_embedding(maps, index)
        assert (ours - expected).abs().max() <= 1e-6 * expected.abs().max(), index
    embeddings, classes = [], []
    for group, indices in enumerate(groups):
        for index in indices:  # official order: per token, this step's embedding, then the previous step's
            embeddings += [_official_embedding(maps, index), _official_embedding(previous, index)]
            classes += [group, group]
    expected_loss = _nt_xent(torch.stack(embeddings), classes, TAU).item()
    loss = conform_loss(maps, previous, groups, kernel, TAU, softmax_normalize=True).item()
    assert loss == pytest.approx(expected_loss, rel=1e-6)


def test_token_embedding_is_the_smoothed_map_of_the_shifted_index():
    maps = torch.zeros(5, 5, 77)
    maps[2, 2, 3] = 1.0
    (embedding,) = token_embeddings(maps, [3], gaussian_kernel(3, 0.5), softmax_normalize=False)
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = gaussian_kernel(3, 0.5)
    assert torch.allclose(embedding, expected.reshape(-1))
    # softmax over the 75 text tokens of 100 x maps: the peak pixel puts ~all its mass on token 3
    (normalised,) = token_embeddings(maps, [3], None, softmax_normalize=True)
    assert normalised.reshape(5, 5)[2, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert normalised.reshape(5, 5)[0, 0].item() == pytest.approx(1 / 75)


def test_softmax_normalize_leaves_the_stored_previous_maps_intact():
    """The official code multiplies the previous-step maps by 100 in place on every call, so the 22 calls of a
    refinement step overflow to inf and NaN; here every call sees the same maps and gives the same loss."""
    generator = torch.Generator().manual_seed(1)
    maps, previous = torch.rand(2, 4, 4, 77, generator=generator) / 77
    stored = previous.clone()
    losses = [conform_loss(maps, previous, [[2, 3], [6, 7]], None, TAU, softmax_normalize=True) for _ in range(30)]
    assert torch.equal(previous, stored)
    assert torch.isfinite(torch.stack(losses)).all() and len({loss.item() for loss in losses}) == 1


def test_softmax_normalize_run_with_refinement_after_the_first_step_stays_finite(tiny_pipe):
    """Where the official `__call__` defaults give NaN latents (README): 20 refinement iterations at a step that has
    previous maps, with softmax_normalize on."""
    method = Conform(softmax_normalize=True, iterative_refinement_steps=[1], refinement_steps=20, max_iter_to_alter=2)
    # 64 px (32x32 latents; 16x16 cross-attention at down_blocks.1 / up_blocks.2) keeps the 22 forwards cheap
    settings = SamplingSettings(num_inference_steps=2, guidance_scale=7.5, height=64, width=64)
    result = sample(tiny_pipe, method, SPEC, [0], settings)
    assert result.failed_step == [None] and torch.isfinite(result.latents).all()


def test_config_file_gives_the_notebook_settings():
    config = config_file("method", "conform")
    method = METHODS.build(config)
    assert method == Conform()
    assert (method.max_iter_to_alter, method.iterative_refinement_steps, method.refinement_steps) == (30, (0, 10, 20), 20)
    assert (method.temperature, method.softmax_normalize, method.add_previous_attention_maps) == (0.5, False, True)
    assert (method.scale_factor, method.attention_res, method.sigma, method.kernel_size) == (20, 16, 0.5, 3)


def test_multi_piece_words_put_every_piece_in_their_group(tiny_pipe):
    spec = PromptSpec("q", "a green urial and a yellow clock", groups=(("green", "urial"), ("yellow", "clock")))
    run = SimpleNamespace(indexer=TokenIndexer(tiny_pipe.tokenizer), spec=spec, state={})
    Conform().prepare(run)  # "urial" is two pieces, "uri" and "al"
    assert run.state["token_groups"] == [[2, 3, 4], [7, 8]]
