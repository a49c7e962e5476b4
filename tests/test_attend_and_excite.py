import functools

import pytest
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline
from diffusers.models.attention_processor import AttnProcessor
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
    GaussianSmoothing,
)
from omegaconf import OmegaConf

from evalkit.errors import PromptError
from evalkit.manifest import PROJECT_ROOT
from evalkit.models.loading import load_pipeline
from evalkit.prompts import PromptSpec
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import build_method
from evalkit.sampling.smoothing import gaussian_kernel, smooth
from methods.attend_and_excite import AttendAndExcite, attend_and_excite_loss, subject_maxima
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


def _vanilla_latents_after(index: int) -> torch.Tensor:
    latents = {}
    pipe = load_pipeline(TINY, torch.device("cpu"))
    sample(pipe, build_method({"name": "vanilla"}), SPEC, [0], SETTINGS, on_step=lambda i, t, z: latents.__setitem__(i, z))
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
    config = OmegaConf.load(PROJECT_ROOT / "conf" / "method" / "attend_and_excite.yaml")
    method = build_method(config)
    assert method == AttendAndExcite()
    assert method.thresholds == {0: 0.05, 10: 0.5, 20: 0.8}
    assert AttendAndExcite(thresholds={"0": 0.05}).thresholds == {0: 0.05}


def _count_unet_calls(pipe) -> list:
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_prompt_without_subjects_fails_before_any_unet_call(tiny_pipe):
    calls = _count_unet_calls(tiny_pipe)
    with pytest.raises(PromptError, match="a cat and a dog"):
        sample(tiny_pipe, AttendAndExcite(), PromptSpec("p", "a cat and a dog"), [0], SETTINGS)
    assert calls == []


def test_subject_not_in_prompt_fails_before_any_unet_call(tiny_pipe):
    calls = _count_unet_calls(tiny_pipe)
    with pytest.raises(PromptError, match="bird"):
        sample(tiny_pipe, AttendAndExcite(), PromptSpec("p", "a cat and a dog", ("cat", "bird")), [0], SETTINGS)
    assert calls == []


def test_without_guided_steps_it_is_vanilla_bit_for_bit(tiny_pipe):
    """The recorder's layers run their own fused attention in every forward it does not record (here all of them),
    so no explicit attention is computed for the classifier-free-guidance forward."""
    ours = sample(tiny_pipe, AttendAndExcite(max_iter_to_alter=0, thresholds={}), SPEC, [0], SETTINGS).latents
    assert torch.equal(ours, _vanilla_latents_after(STEPS))
