import functools
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline
from diffusers.models.attention_processor import AttnProcessor
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
    GaussianSmoothing,
)

from evalkit.methods.attend_and_excite import (
    AttendAndExcite,
    attend_and_excite_loss,
    subject_maxima,
)
from evalkit.models.loading import load_pipeline
from evalkit.paths import config_file
from evalkit.prompts import PromptSpec
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS
from evalkit.sampling.smoothing import gaussian_kernel, smooth
from tests.conftest import TINY

SPEC = PromptSpec("p", "a cat and a dog", ("cat", "dog"))  # cat -> 2, dog -> 5
# PNDM's 2 steps make 3 loop indices: refinement at 0 (the random model never reaches the threshold, so it runs all
# its iterations), a plain gradient step at 1, none at 2. Few refinement iterations keep it fast.
STEPS = 2
REDUCED = dict(max_iter_to_alter=2, thresholds={0: 0.05}, scale_factor=20)
MAX_REFINEMENT_STEPS = 2
SETTINGS = SamplingSettings(num_inference_steps=STEPS, guidance_scale=7.5, height=128, width=128)

PAPER_KERNEL = torch.tensor([[0.0449, 0.1221, 0.0449], [0.1221, 0.3319, 0.1221], [0.0449, 0.1221, 0.0449]])

pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")  # raised inside diffusers' GaussianSmoothing


@pytest.fixture(scope="module")
def reference_latents() -> dict[int, torch.Tensor]:
    """diffusers' A&E pipeline on its own tiny pipeline (it installs its processors on every attention layer)."""
    components = load_pipeline(TINY, torch.device("cpu")).components
    reference = StableDiffusionAttendAndExcitePipeline(
        **{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    # Its __call__ does not expose max_refinement_steps.
    reference._perform_iterative_refinement_step = functools.partial(
        reference._perform_iterative_refinement_step, max_refinement_steps=MAX_REFINEMENT_STEPS
    )
    latents: dict[int, torch.Tensor] = {}
    final = reference(
        SPEC.prompt, token_indices=[2, 5], num_inference_steps=STEPS, guidance_scale=7.5, height=128, width=128,
        generator=[torch.Generator("cpu").manual_seed(0)], attn_res=(16, 16), output_type="latent",
        callback=lambda i, t, z: latents.__setitem__(i, z.clone()), **REDUCED,
    ).images
    # Its callback skips loop index 0 (PNDM's warm-up step), so the last index is checked through the output.
    assert sorted(latents) == list(range(1, STEPS + 1))
    assert torch.equal(latents[STEPS], final)
    return latents


def _our_latents(pipe) -> dict[int, torch.Tensor]:
    latents: dict[int, torch.Tensor] = {}
    method = AttendAndExcite(**REDUCED, max_refinement_steps=MAX_REFINEMENT_STEPS)
    sample(pipe, method, SPEC, [0], SETTINGS, on_step=lambda i, t, z: latents.__setitem__(i, z.clone()))
    assert sorted(latents) == list(range(STEPS + 1))
    return latents


def test_latents_equal_diffusers_attend_and_excite_pipeline(tiny_pipe, reference_latents):
    processors = dict(tiny_pipe.unet.attn_processors)
    ours = _our_latents(tiny_pipe)
    assert tiny_pipe.unet.attn_processors == processors, "teardown did not restore the attention processors"
    differences = [(ours[i] - reference_latents[i]).abs().max().item() for i in reference_latents]
    print("max latent difference per loop index 1..:", differences)
    # Not bit-identical only because our other attention layers keep PyTorch's fused attention (next test).
    assert max(differences) < 1e-4, differences
    assert not torch.allclose(ours[1], _vanilla_latents_after(1), atol=1e-3), "A&E did not change the latents"


def test_latents_are_bit_identical_with_the_same_attention_kernels(tiny_pipe, reference_latents):
    tiny_pipe.unet.set_attn_processor(AttnProcessor())  # diffusers' A&E computes every layer's attention explicitly
    ours = _our_latents(tiny_pipe)
    for i, theirs in reference_latents.items():
        assert torch.equal(ours[i], theirs), (i, (ours[i] - theirs).abs().max().item())


def test_each_image_of_a_batch_is_guided_alone(tiny_pipe):
    method = AttendAndExcite(**REDUCED, max_refinement_steps=MAX_REFINEMENT_STEPS)
    batch = sample(tiny_pipe, method, SPEC, [0, 1], SETTINGS)
    alone = sample(tiny_pipe, method, SPEC, [1], SETTINGS)
    assert torch.allclose(batch.latents[1], alone.latents[0], atol=1e-4)


def _recording_losses(method: AttendAndExcite) -> list[list[float]]:
    """Each guidance forward's losses, one per image it ran."""
    losses = []
    attention_loss = method.attention_loss

    def recording(run, images, maps):
        loss = attention_loss(run, images, maps)
        losses.append(loss.tolist())
        return loss

    method.attention_loss = recording
    return losses


def test_an_image_that_reaches_its_threshold_stops_refining_as_it_would_alone(tiny_pipe):
    """A target between seed 0's losses before its 3rd and 4th refinement iterations, which seed 1 never reaches:
    in a batch, seed 0 stops after 3 iterations and seed 1 goes on to 4, each as alone."""
    settings = SamplingSettings(num_inference_steps=1, guidance_scale=7.5, height=128, width=128)
    reduced = dict(max_iter_to_alter=1, max_refinement_steps=4)

    def run(seeds, threshold):
        method = AttendAndExcite(**reduced, thresholds={0: threshold})
        losses = _recording_losses(method)
        return sample(tiny_pipe, method, SPEC, seeds, settings).latents, losses

    # The losses checked before iterations 1..4 are those of the first 4 forwards (the initial one and 3 refining).
    _, unreached_0 = run([0], threshold=0.5)
    alone_1, unreached_1 = run([1], threshold=0.5)
    target = (unreached_0[2][0] + unreached_0[3][0]) / 2
    assert unreached_0[3][0] <= target < unreached_0[2][0] and min(loss for (loss,) in unreached_1[:4]) > target
    alone_0, stopping_0 = run([0], threshold=1.0 - target)
    batch, in_batch = run([0, 1], threshold=1.0 - target)
    print("target", target, "seed 0 alone:", stopping_0, "batch:", in_batch)
    assert len(stopping_0) == 5 and len(unreached_1) == 6  # initial, 3 or 4 iterations, final
    assert [len(losses) for losses in in_batch] == [2, 2, 2, 2, 1, 2]  # the 4th iteration runs seed 1 only
    assert torch.allclose(batch[0], alone_0[0], atol=1e-4)
    assert torch.allclose(batch[1], alone_1[0], atol=1e-4)


class _SquaredLatent(AttendAndExcite):
    """A&E's schedule on a loss with a known course: the recorder stub hands each latent through as its maps, and
    the loss is its square. A step of 0.25 halves the latent: z - 0.25 * 2z."""

    def attention_loss(self, run, images, maps):
        return maps.pow(2).flatten(1).sum(1)


def _guide_once(latents: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Loop index 0 of `_SquaredLatent` (target 0.1, at most 6 iterations); the images each forward ran."""
    forwards = []

    def record(unet, latents, t, encoder_hidden_states):
        forwards.append(encoder_hidden_states.flatten().int().tolist())  # each image's embedding is its index
        return latents

    images = len(latents)
    run = SimpleNamespace(
        batch_size=images,
        unet=None,
        cond_embeds=torch.arange(images, dtype=torch.float32)[:, None],
        state={"recorder": SimpleNamespace(record=record), "step_sizes": [0.25], "kernel": None},
    )
    method = _SquaredLatent(max_iter_to_alter=1, thresholds={0: 0.9}, max_refinement_steps=6)
    return method.update_latents(run, 0, None, latents), forwards


def test_refinement_stops_per_image_and_equals_each_image_alone():
    """Latents 1, 64 and 0.25 (losses 1, 4096, 0.0625; target 0.1): the first stops after 3 iterations, the
    second refines all 6, the third is at its target and only takes the final step on the first forward."""
    latents = torch.tensor([1.0, 64.0, 0.25]).view(3, 1, 1, 1)
    batch, forwards = _guide_once(latents)
    assert forwards == [[0, 1, 2], [0, 1], [0, 1], [0, 1], [1], [1], [1], [0, 1]]
    assert batch.flatten().tolist() == [1 / 16, 1 / 2, 1 / 8]
    for image in range(3):
        alone, _ = _guide_once(latents[image : image + 1])
        assert torch.equal(alone[0], batch[image])


def _vanilla_latents_after(index: int) -> torch.Tensor:
    latents = {}
    pipe = load_pipeline(TINY, torch.device("cpu"))
    sample(pipe, METHODS.build({"name": "vanilla"}), SPEC, [0], SETTINGS, on_step=lambda i, t, z: latents.__setitem__(i, z))
    return latents[index]


def test_kernel_is_the_papers_code_not_sigma_one_half():
    kernel = gaussian_kernel(3, 0.5)
    assert torch.allclose(kernel, PAPER_KERNEL, atol=1e-4)
    assert torch.equal(kernel, GaussianSmoothing().weight[0, 0])


def test_smoothing_a_delta_gives_the_kernel_and_keeps_size():
    image = torch.zeros(5, 5)
    image[2, 2] = 1.0
    smoothed = smooth(image, gaussian_kernel(3, 0.5))
    assert smoothed.shape == (5, 5)
    assert torch.allclose(smoothed[1:4, 1:4], PAPER_KERNEL, atol=1e-4)
    assert smoothed[0].abs().sum() == 0 and smoothed[:, 0].abs().sum() == 0
    # Reflect padding: a constant image stays constant, borders included.
    assert torch.allclose(smooth(torch.full((4, 4), 0.3), gaussian_kernel(3, 0.5)), torch.full((4, 4), 0.3))


def test_subject_maxima_softmax_over_text_tokens_with_shifted_indices():
    maps = torch.zeros(4, 4, 77)
    maps[1, 1, 2] = 1.0  # "cat" peaks at one pixel
    maps[:, :, 0] = 5.0  # SOT and the last position are outside the softmax
    maps[:, :, 76] = 5.0
    maxima = subject_maxima(maps, [2, 5], kernel=None)
    # 75 tokens in the softmax: logit 100 against 74 zeros at the peak, uniform elsewhere.
    assert torch.allclose(maxima, torch.tensor([1.0, 1 / 75]))
    smoothed = subject_maxima(maps, [2, 5], kernel=gaussian_kernel(3, 0.5))
    expected_peak = PAPER_KERNEL[1, 1] * 1.0 + (1 - PAPER_KERNEL[1, 1]) / 75
    assert torch.allclose(smoothed, torch.tensor([expected_peak, 1 / 75]), atol=1e-4)


def test_loss_is_one_minus_the_weakest_subjects_peak():
    maxima = torch.tensor([0.3, 0.8], requires_grad=True)
    loss = attend_and_excite_loss(maxima)
    assert loss.item() == pytest.approx(0.7)
    (grad,) = torch.autograd.grad(loss, maxima)
    assert grad.tolist() == [-1.0, 0.0]  # only the neglected subject is pushed
    assert attend_and_excite_loss(torch.tensor([1.0, 1.2])).item() == 0.0


def test_config_file_gives_the_paper_defaults_with_integer_loop_indices():
    config = config_file("method", "attend_and_excite")
    method = METHODS.build(config)
    assert method == AttendAndExcite()
    assert method.thresholds == {0: 0.05, 10: 0.5, 20: 0.8}
    assert AttendAndExcite(thresholds={"0": 0.05}).thresholds == {0: 0.05}


def test_without_guided_steps_it_is_vanilla_bit_for_bit(tiny_pipe):
    """The recorder's layers run their own fused attention in every forward it does not record (here all of them),
    so no explicit attention is computed for the classifier-free-guidance forward."""
    ours = sample(tiny_pipe, AttendAndExcite(max_iter_to_alter=0, thresholds={}), SPEC, [0], SETTINGS).latents
    assert torch.equal(ours, _vanilla_latents_after(STEPS))
