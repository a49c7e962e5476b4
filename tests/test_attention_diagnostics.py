"""Attention diagnostics from the shared loop (evalkit/sampling/diagnostics.py) and their report sections."""

from dataclasses import dataclass, field

import pandas as pd
import pytest
import torch

from evalkit.errors import ConfigError
from evalkit.prompts import PromptSpec
from evalkit.reporting.diagnostics import (
    _long_frame,
    _outcome_table,
    diagnostics_sections,
)
from evalkit.reporting.render import VariantLabels
from evalkit.sampling.attention import (
    AttentionHooks,
    CrossAttentionRecorder,
    layers_at_resolution,
)
from evalkit.sampling.attention_guidance import subject_maxima, token_maps
from evalkit.sampling.diagnostics import (
    SMOOTHING_KERNEL_SIZE,
    SMOOTHING_SIGMA,
    soft_overlap,
)
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS, Method
from evalkit.sampling.smoothing import gaussian_kernel

SETTINGS = SamplingSettings(num_inference_steps=2, guidance_scale=7.5, height=128, width=128)
SPEC = PromptSpec("p", "a cat and a dog", ("cat", "dog"))


def test_soft_overlap_is_separate_and_enhances_term_and_zero_where_both_maps_are():
    a = torch.tensor([0.5, 0.0, 0.2, 0.0])
    b = torch.tensor([0.5, 0.0, 0.0, 0.4])
    assert torch.equal(soft_overlap(a, b), torch.tensor([0.25, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("config", [
    {"name": "vanilla"},
    {"name": "attention_regulation", "edit_steps": 1, "iterations": 2},  # edits the observed layers at step 0
    {"name": "attend_and_excite", "thresholds": {}},
])
def test_recording_leaves_the_images_bit_for_bit_unchanged(tiny_pipe, config):
    plain = sample(tiny_pipe, METHODS.build(config), SPEC, [0, 1], SETTINGS)
    observed = sample(tiny_pipe, METHODS.build(config), SPEC, [0, 1], SETTINGS, attention_diagnostics=16)
    assert torch.equal(plain.latents, observed.latents)
    assert [image.tobytes() for image in plain.images] == [image.tobytes() for image in observed.images]
    assert plain.attention_diagnostics is None and plain.attention_diagnostics_skipped == "not requested"
    steps = list(range(len(tiny_pipe.scheduler.timesteps)))  # PNDM's extra first step counts
    for record in observed.attention_diagnostics:
        assert record["subjects"] == ["cat", "dog"] and record["pairs"] == [[0, 1]] and record["steps"] == steps
        assert all(len(series) == len(steps) for series in record["subject_peak"] + record["overlap"])


@dataclass
class RecordsConditionalMaps(Method):
    """Before each guided forward, records the conditional maps of the same latents through the methods' own
    recorder: the reference the diagnostics must agree with."""

    name = "records_conditional_maps"
    recorded: list = field(default_factory=list)

    def setup(self, run):
        recorder = CrossAttentionRecorder(layers_at_resolution(run.unet, run.latent_size, 16), 16)
        run.state.update(recorder=recorder, hooks=AttentionHooks(run.unet, recorder.layers, recorder).install())

    def teardown(self, run):
        run.state.pop("hooks").remove()

    def predict_noise(self, run, i, t, latents):
        model_input = run.scheduler.scale_model_input(latents, t)
        self.recorded.append(run.state["recorder"].record(run.unet, model_input, t, run.cond_embeds))
        return run.guided_noise(t, latents)


def test_peaks_and_overlaps_are_those_of_attend_and_excites_maps(tiny_pipe):
    method = RecordsConditionalMaps()
    result = sample(tiny_pipe, method, SPEC, [0, 1], SETTINGS, attention_diagnostics=16)
    kernel = gaussian_kernel(SMOOTHING_KERNEL_SIZE, SMOOTHING_SIGMA)
    cat, dog = (index for word in [[2], [5]] for index in word)  # "a cat and a dog": SOT is 0
    for step, maps in enumerate(method.recorded):
        peaks = subject_maxima(maps, [cat, dog], kernel)  # (images, subjects)
        smoothed = token_maps(maps, [cat, dog], kernel)
        overlap = soft_overlap(smoothed[:, 0], smoothed[:, 1]).flatten(1).amax(dim=1)
        for image, record in enumerate(result.attention_diagnostics):
            # The reference forward runs the conditional half alone and explicitly: float rounding apart.
            assert record["subject_peak"][0][step] == pytest.approx(peaks[image, 0].item(), abs=1e-6)
            assert record["subject_peak"][1][step] == pytest.approx(peaks[image, 1].item(), abs=1e-6)
            assert record["overlap"][0][step] == pytest.approx(overlap[image].item(), abs=1e-6)


def test_without_a_guided_forward_or_subjects_there_are_none_and_the_record_says_why(tiny_pipe):
    composable = sample(tiny_pipe, METHODS.build({"name": "composable_diffusion"}), SPEC, [0], SETTINGS, attention_diagnostics=16)
    assert composable.attention_diagnostics is None
    assert "never ran the prompt's own conditional embedding" in composable.attention_diagnostics_skipped
    no_subjects = sample(tiny_pipe, METHODS.build({"name": "vanilla"}), PromptSpec("q", "a cat"), [0], SETTINGS, attention_diagnostics=16)
    assert no_subjects.attention_diagnostics is None and no_subjects.attention_diagnostics_skipped == "the prompt lists no subjects"


def test_a_resolution_the_model_lacks_is_one_config_error(tiny_pipe):
    with pytest.raises(ConfigError, match=r"no 12x12 cross-attention layers .*its maps are 8x8, 16x16, 32x32, 64x64"):
        sample(tiny_pipe, METHODS.build({"name": "vanilla"}), SPEC, [0], SETTINGS, attention_diagnostics=12)
    assert not any(type(p).__name__ == "ExplicitAttnProcessor" for p in tiny_pipe.unet.attn_processors.values())


def _record(variant: str, seed: int, peaks: list[list[float]], overlap: list[float]) -> dict:
    return {"model": "tiny", "method": variant, "variant": variant, "dataset": "d", "prompt_id": "p", "seed": seed,
            "attention_diagnostics": {"resolution": 16, "subjects": ["cat", "dog"], "steps": [0, 1],
                                      "subject_peak": peaks, "pairs": [[0, 1]], "overlap": [overlap]},
            "attention_diagnostics_skipped": None}


def _scores(variant: str, seed: int, cat: float, dog: float) -> list[dict]:
    keys = {"model": "tiny", "method": variant, "variant": variant, "dataset": "d", "prompt_id": "p", "seed": seed,
            "scorer": "det"}
    return [dict(keys, metric="detection/cat", value=cat), dict(keys, metric="detection/dog", value=dog),
            dict(keys, metric="detection_rate", value=float(cat and dog))]


def test_the_outcome_table_compares_subjects_found_with_those_missed(tmp_path):
    records = pd.DataFrame([
        _record("vanilla", 0, [[0.8, 0.6], [0.2, 0.0]], [0.1, 0.3]),  # cat found (peak 0.7), dog missed (0.1)
        _record("vanilla", 1, [[0.4, 0.4], [0.5, 0.7]], [0.0, 0.2]),  # both found (0.4, 0.6)
        {**_record("composable_diffusion", 0, [], []), "attention_diagnostics": None,
         "attention_diagnostics_skipped": "the method never ran it"},
    ])
    scores = pd.DataFrame(_scores("vanilla", 0, 1.0, 0.0) + _scores("vanilla", 1, 1.0, 1.0))
    labels = VariantLabels([records], "vanilla")
    long = _long_frame(records)
    detections = scores[scores["metric"] != "detection_rate"].assign(
        item=lambda frame: frame["metric"].str[len("detection/"):], detected=lambda frame: frame["value"])
    rates = scores[scores["metric"] == "detection_rate"].assign(detected=lambda frame: frame["value"])
    table = _outcome_table(long, detections[["model", "variant", "dataset", "prompt_id", "seed", "item", "detected"]],
                           rates[["model", "variant", "dataset", "prompt_id", "seed", "detected"]], labels)
    (row,) = table.rows
    assert row[0] == "vanilla"
    assert row[1] == "3" and row[2].startswith("0.567 ")  # (0.7 + 0.4 + 0.6) / 3
    assert row[3] == "1" and row[4] == "0.100 [0.100, 0.100]"
    assert row[5] == "1" and row[6] == "0.100 [0.100, 0.100]"  # image 1's overlap, mean over steps
    assert row[7] == "1" and row[8] == "0.200 [0.200, 0.200]"
    sections = diagnostics_sections(tmp_path, records, scores, labels)
    assert [section.heading for section in sections] == ["Attention diagnostics", "Attention and detection"]
    assert any("composable_diffusion: 1 images without diagnostics (the method never ran it)" in getattr(block, "text", "")
               for block in sections[0].blocks)
    assert (tmp_path / "plots" / "d__attention_diagnostics.png").is_file()
    assert (tmp_path / "plots" / "d__attention_by_detection.png").is_file()


def test_a_split_word_counts_its_weakest_piece_and_pairs_every_piece():
    from evalkit.sampling.diagnostics import AttentionDiagnostics

    subject_tokens = [[2], [4, 5]]  # "cat" and a word the tokenizer splits in two
    diagnostics = AttentionDiagnostics(["layer"], 4, ["cat", "hedgehog"], subject_tokens, steps=1, images=1,
                                       device=torch.device("cpu"))
    probs = torch.rand(1, 16, 77, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)  # one head, 4x4
    with diagnostics.forward():
        diagnostics.observe("layer", probs)
    (record,) = diagnostics.results()
    maps = probs.reshape(1, 4, 4, 77)
    kernel = gaussian_kernel(SMOOTHING_KERNEL_SIZE, SMOOTHING_SIGMA)
    peaks = subject_maxima(maps, [2, 4, 5], kernel)[0]
    smoothed = token_maps(maps, [2, 4, 5], kernel)[0]
    assert record["subject_peak"] == [[pytest.approx(peaks[0].item())], [pytest.approx(min(peaks[1], peaks[2]).item())]]
    overlap = max(soft_overlap(smoothed[0], smoothed[piece]).max().item() for piece in (1, 2))
    assert record["overlap"] == [[pytest.approx(overlap)]] and record["steps"] == [0]
