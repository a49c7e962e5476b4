"""best_of_n (evalkit/methods/best_of_n.py): n plain samples per (prompt, seed), the verifier's best kept."""

import json
import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from evalkit.errors import ConfigError
from evalkit.methods.best_of_n import BestOfN, best_candidate, candidate_seed
from evalkit.paths import config_file
from evalkit.prompts import PromptSpec
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS
from evalkit.scoring.base import SCORERS, ScoredImage
from tests.test_cli import evalkit

SETTINGS = SamplingSettings(num_inference_steps=2, guidance_scale=7.5, height=128, width=128)
SPEC = PromptSpec("p", "a cat and a dog", ("cat", "dog"))
EXPERIMENT_SCORERS = {"clip": OmegaConf.to_container(config_file("scorer", "clip_tiny")),
                      "overhead": {"name": "overhead"}, "fid": {"name": "fid"}}


def _best_of(n: int) -> BestOfN:
    method = METHODS.build({"name": "best_of_n", "n": n, "verifier": "clip", "verifier_metric": "clip_full"})
    method.configure_for_experiment(EXPERIMENT_SCORERS)
    return method


def test_candidates_start_with_the_seed_and_are_the_same_for_every_n():
    assert [candidate_seed(7, 0), candidate_seed(0, 0)] == [7, 0]
    candidates = {candidate_seed(seed, k) for seed in range(50) for k in range(1, 8)}
    assert len(candidates) == 350 and not candidates & set(range(50))
    assert all(0 <= seed < 2**63 for seed in candidates)
    assert candidate_seed(3, 2) == candidate_seed(3, 2)


def test_the_best_is_the_first_of_the_highest_or_lowest_and_nan_never_wins():
    assert best_candidate([0.2, 0.5, 0.5, 0.1], higher_is_better=True) == 1
    assert best_candidate([0.2, 0.5, 0.1, 0.1], higher_is_better=False) == 2
    assert best_candidate([math.nan, 0.1], higher_is_better=True) == 1
    assert best_candidate([math.nan, math.nan], higher_is_better=True) is None


def test_best_of_one_is_vanilla_bit_for_bit(tiny_pipe):
    vanilla = sample(tiny_pipe, METHODS.build({"name": "vanilla"}), SPEC, [0, 1], SETTINGS)
    method = _best_of(1)
    best = method.sample_images(lambda seeds: sample(tiny_pipe, method, SPEC, seeds, SETTINGS), SPEC, [0, 1])
    assert [image.tobytes() for image in best.images] == [image.tobytes() for image in vanilla.images]
    assert [selection["chosen"] for selection in best.selection] == [0, 0]


def test_keeps_the_verifiers_best_candidate_and_times_all_of_them(tiny_pipe):
    method = _best_of(3)
    calls = []

    def sample_call(seeds):
        calls.append(sample(tiny_pipe, method, SPEC, seeds, SETTINGS, attention_diagnostics=16))
        return calls[-1]

    result = method.sample_images(sample_call, SPEC, [0, 1])
    assert [len(call.images) for call in calls] == [2, 2, 2]  # candidate k of both seeds in one batch
    rescorer = SCORERS.build(EXPERIMENT_SCORERS["clip"], torch.device("cpu"))
    for j, (image, selection) in enumerate(zip(result.images, result.selection)):
        scores = selection["candidate_scores"]
        assert selection["chosen"] == best_candidate(scores, higher_is_better=True)
        assert selection["candidate_seeds"] == [candidate_seed([0, 1][j], k) for k in range(3)]
        assert image.tobytes() == calls[selection["chosen"]].images[j].tobytes()
        assert result.attention_diagnostics[j] == calls[selection["chosen"]].attention_diagnostics[j]
        # The kept image's score is its own (scores are matched to candidates by seed), scored afresh.
        rescorer.reset()
        rescorer.update([ScoredImage("", "", "", "", "p", 0, SPEC.prompt, SPEC.subjects, image, {"status": "ok"})])
        fresh = next(row["value"] for row in rescorer.compute() if row["metric"] == "clip_full")
        assert fresh == pytest.approx(scores[selection["chosen"]], abs=1e-6)
        assert selection["verifier_scorer"] == rescorer.provenance and selection["verifier_metric"] == "clip_full"
    sampling = sum(call.seconds for call in calls)
    assert result.selection[0]["sampling_seconds"] * 2 == pytest.approx(sampling)
    assert result.seconds == pytest.approx(sampling + 2 * result.selection[0]["verifier_seconds"])
    assert result.selection[0]["verifier_seconds"] > 0


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="method best_of_n: n must be an integer of at least 1"):
        METHODS.build({"name": "best_of_n", "n": 0})
    with pytest.raises(ConfigError, match="verifier 'owlv2' is not among the experiment's scorers \\(clip, fid, overhead\\)"):
        METHODS.build({"name": "best_of_n"}).configure_for_experiment(EXPERIMENT_SCORERS)
    with pytest.raises(ConfigError, match="gives no metric 'clip_score'; it gives \\['clip_full', 'clip_min_object'\\]"):
        METHODS.build({"name": "best_of_n", "verifier": "clip", "verifier_metric": "clip_score"}).configure_for_experiment(EXPERIMENT_SCORERS)
    for verifier in ("fid", "overhead"):
        with pytest.raises(ConfigError, match="cannot rate one image alone"):
            METHODS.build({"name": "best_of_n", "verifier": verifier, "verifier_metric": "fid"}).configure_for_experiment(EXPERIMENT_SCORERS)


def test_config_file_is_the_methods_defaults():
    assert METHODS.build(config_file("method", "best_of_n")) == BestOfN()


@pytest.mark.slow
def test_bad_inputs_on_the_command_line_are_one_line(tmp_path):
    tiny = ["model=tiny", "scorer=[clip_tiny,overhead]", "sampling.num_inference_steps=2", "limit=1", "seeds=[0]"]
    cases = [
        (["run", *tiny, "methods=[vanilla,best_of_n]"], "method best_of_n: verifier 'owlv2' is not among the experiment's scorers"),
        (["generate", *tiny, "method=best_of_n", "method.verifier=clip", "method.n=0"], "method best_of_n: n must be an integer of at least 1"),
        (["generate", *tiny, "attention_diagnostics.record=true", "sampling.resolution=96"],
         "attention_diagnostics.record=true, but the model has no 16x16 cross-attention layers"),
    ]
    for arguments, message in cases:
        result = evalkit(*arguments, tmp_path=tmp_path)
        errors = [line for line in result.stderr.splitlines() if line.startswith("evalkit: error:")]
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(errors) == 1 and message in errors[0], result.stderr
    assert not list((tmp_path / "store").rglob("*.png"))


@pytest.mark.slow
def test_records_carry_the_selection_and_the_report_the_diagnostics(tmp_path):
    tiny = ["model=tiny", "dataset=demo", "scorer=[clip_tiny,owlv2_tiny,overhead]", "sampling.num_inference_steps=2",
            "limit=1", "seeds=[0]"]
    result = evalkit("run", *tiny, "methods=[vanilla,best_of_n]", "experiment_name=t", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = [p for p in (tmp_path / "store").rglob("*.json") if "best_of_n@" in str(p)]
    record = json.loads(path.read_text())
    selection = record["selection"]
    assert selection["n"] == 4 and selection["verifier"] == "owlv2" and selection["verifier_metric"] == "detection_rate"
    assert record["seconds_per_image"] == pytest.approx(selection["sampling_seconds"] + selection["verifier_seconds"])
    assert record["method_config"]["verifier_config"]["name"] == "owlv2"
    scorer_names = set()
    for table in (tmp_path / "runs" / "t" / "scores" / "owlv2").glob("*.csv"):
        scorer_names |= set(pd.read_csv(table)["scorer"])
    assert scorer_names == {selection["verifier_scorer"]}  # the report can flag the verifier's own metrics
    assert record["attention_diagnostics"]["subjects"] and record["attention_diagnostics_skipped"] is None
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Attention diagnostics" in html and "Attention and detection" in html
