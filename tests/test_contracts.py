"""Contracts every registered method and scorer inherits: the tests are parametrised over `METHODS.names()` and
`SCORERS.names()`, so a new method or scorer is covered by registering (and its `conf/<group>/<name>.yaml`; a
`<name>_tiny.yaml` stand-in is used where there is one).

A method (its config file, the tiny model, 2 steps, on a prompt with subjects, groups and segments):
- leaves the UNet as it found it (attention processors, weights), after sampling and after a sampling that raised;
- refuses a prompt lacking an annotation it `requires` with a PromptError before any UNet forward;
- gives a seed alone what it gives that seed in a batch, within its stated tolerance;
- quarantines NaN: an image whose noise prediction goes NaN is recorded failed and the other stays finite.
A scorer (through its public protocol: reset, begin_set, update, compute):
- `reset` clears: nothing scored before it reaches the rows after it;
- a failed generation (no image) gets no rows and changes no other row;
- `batch_size` does not change the scores.
A contract that cannot apply to a method or scorer is marked so in the parametrisation, with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evalkit.errors import ConfigError, PromptError
from evalkit.paths import PROJECT_ROOT, config_file, has_config, project_path
from evalkit.prompts import load_prompt_set
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS
from evalkit.scoring.base import SCORERS, ScoredImage, ScoredSet
from evalkit.store import ImageKey, ImageStore
from tests.conftest import compose_config, generation_manifest, poison, random_image

# --- methods ----------------------------------------------------------------------------------------------------

# "a red car and a blue bowl": subjects, modifier groups and segments (with masks), so every method can run on it.
SPEC = load_prompt_set(PROJECT_ROOT / "datasets" / "demo.jsonl")[2]
STEPS = 2
# 64 px (32x32 latents, 16x16 cross-attention maps in down_blocks.1 / up_blocks.2) keeps the self-attention cheap;
# Attention Regulation's configured blocks (up_blocks.1, down_blocks.2) need 128 px for 16x16 maps, the least its
# Gaussian basis takes.
RESOLUTION = {"attention_regulation": 128}
# A seed alone against the same seed in a batch of 2: max |difference| of the final latents (magnitude ~9; a
# different seed's differ by ~10). Batched kernels round differently; measured on the tiny model, 2 steps, 2 threads:
# vanilla 1.4e-5, composable_diffusion 2.0e-5, separate_and_enhance 1.3e-5, dense_diffusion 1.3e-5, syngen 1.4e-5,
# attend_and_excite 1.1e-5, conform 1.3e-5, best_of_n 1.4e-5; the default tolerance is 5x the largest. Attention
# Regulation's 20 gradient steps of lr 100 per layer call amplify the rounding: 1.8e-4 at 128 px.
SEED_TOLERANCE = {"attention_regulation": 1e-3}
DEFAULT_SEED_TOLERANCE = 1e-4


def not_applicable(names, reason_for):
    """`names` as parameters; where `reason_for(name)` gives a reason, that parameter is skipped with it."""
    params = []
    for name in names:
        reason = reason_for(name)
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {reason}")) if reason else name)
    return params


def method_config(name: str) -> dict:
    """conf/method/<name>_tiny.yaml where there is one (a stand-in for the tiny model), else <name>.yaml."""
    return OmegaConf.to_container(config_file("method", f"{name}_tiny" if has_config("method", f"{name}_tiny") else name))


@functools.cache
def demo_scorers() -> dict:
    """The demo experiment's scorer configs (tiny stand-ins), for methods that take one as a verifier (best_of_n)."""
    return OmegaConf.to_container(compose_config(["experiment=demo"]).scorers, resolve=True)


@pytest.fixture
def build_method(request):
    """The method `name` from its config file, configured for the demo experiment's scorers; a method that samples
    with a finetuned checkpoint gets the tiny test finetune's (the `trained` fixture)."""

    def build(name: str):
        config = method_config(name)
        if "checkpoint" in config:
            config["checkpoint"] = str(request.getfixturevalue("trained")[0])
        method = METHODS.build(config)
        method.configure_for_experiment(demo_scorers())
        return method

    return build


def settings(name: str) -> SamplingSettings:
    resolution = RESOLUTION.get(name, 64)
    return SamplingSettings(STEPS, 7.5, resolution, resolution)


def generate(pipe, method, seeds, spec=SPEC):
    """The images of `seeds` as the generate stage makes them: through the method's `sample_images`."""
    return method.sample_images(lambda batch: sample(pipe, method, spec, batch, settings(method.name)), spec, seeds)


def unet_state(unet) -> tuple[dict, dict]:
    return dict(unet.attn_processors), {name: p.detach().clone() for name, p in unet.named_parameters()}


def assert_unet_as(unet, state, when: str) -> None:
    processors, weights = state
    now = unet.attn_processors
    assert now.keys() == processors.keys() and all(now[layer] is processors[layer] for layer in now), (
        f"{when}: the attention processors were not restored: "
        f"{sorted(layer for layer in now if now[layer] is not processors.get(layer))[:3]}"
    )
    changed = [name for name, p in unet.named_parameters() if not torch.equal(p, weights[name])]
    assert not changed, f"{when}: UNet weights were not restored: {changed[:3]}"


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("name", METHODS.names())
def test_teardown_leaves_the_unet_as_it_was(tiny_pipe, build_method, monkeypatch, name):
    method, unet = build_method(name), tiny_pipe.unet
    before = unet_state(unet)
    generate(tiny_pipe, method, [0, 1])
    assert_unet_as(unet, before, "after sampling")

    forward, calls = unet.forward, 0

    def fails_second(*args, **kwargs):
        """The second UNet forward raises: inside the first step, with whatever the method installed in place."""
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Interrupted
        return forward(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(unet, "forward", fails_second)
        with pytest.raises(Interrupted):
            generate(tiny_pipe, method, [0, 1])
    assert_unet_as(unet, before, "after a sampling that raised")


def method_annotations():
    params = []
    for name in METHODS.names():
        requires = METHODS[name].requires
        params += [pytest.param(name, annotation, id=f"{name}-{annotation}") for annotation in requires]
        if not requires:
            params.append(pytest.param(name, None, id=name, marks=pytest.mark.skip(
                reason=f"{name}: requires no prompt annotation (Method.requires is empty)")))
    return params


@pytest.mark.parametrize("name, annotation", method_annotations())
def test_a_missing_annotation_fails_before_any_unet_forward(tiny_pipe, build_method, monkeypatch, name, annotation):
    def no_forward(*args, **kwargs):
        raise AssertionError("the UNet ran before the prompt was checked")

    monkeypatch.setattr(tiny_pipe.unet, "forward", no_forward)
    lacking = dataclasses.replace(SPEC, **{annotation: ()})
    with pytest.raises(PromptError, match=annotation):
        generate(tiny_pipe, build_method(name), [0, 1], spec=lacking)


# The methods that read words of the prompt set's annotations, each given one word that is not in the prompt (SynGen
# reads the groups it is given, though it can parse its own).
WORDS_NOT_IN_THE_PROMPT = [
    ("attend_and_excite", {"subjects": ("car", "bird")}, "bird"),
    ("attention_regulation", {"subjects": ("car", "bird")}, "'bird'"),
    ("conform", {"groups": (("red", "car"), ("green", "bowl"))}, "'green'"),
    ("syngen", {"groups": (("red", "car"), ("green", "bowl"))}, "green"),
]


@pytest.mark.parametrize("name, annotations, match", WORDS_NOT_IN_THE_PROMPT, ids=[case[0] for case in WORDS_NOT_IN_THE_PROMPT])
def test_a_word_not_in_the_prompt_fails_before_any_unet_forward(tiny_pipe, build_method, monkeypatch, name,
                                                                 annotations, match):
    def no_forward(*args, **kwargs):
        raise AssertionError("the UNet ran before the prompt was checked")

    monkeypatch.setattr(tiny_pipe.unet, "forward", no_forward)
    with pytest.raises(PromptError, match=f"'{SPEC.id}'.*{match}"):
        generate(tiny_pipe, build_method(name), [0, 1], spec=dataclasses.replace(SPEC, **annotations))


@pytest.mark.parametrize("name", METHODS.names())
def test_a_seed_alone_equals_the_same_seed_in_a_batch(tiny_pipe, build_method, name):
    method = build_method(name)
    batch = generate(tiny_pipe, method, [0, 1])
    alone = generate(tiny_pipe, method, [1])
    difference = (batch.latents[1] - alone.latents[0]).abs().max().item()
    assert difference <= SEED_TOLERANCE.get(name, DEFAULT_SEED_TOLERANCE), difference
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 1.0  # the seeds differ: the comparison means something
    assert batch.failed_step == [None, None] and alone.failed_step == [None]


@pytest.mark.parametrize("name", METHODS.names())
def test_nan_noise_fails_its_image_and_spares_the_other(tiny_pipe, build_method, monkeypatch, name):
    method = build_method(name)
    # The first image of every sampling call (a method sampling candidates, best_of_n, makes several) goes NaN at
    # loop index 1.
    poison(monkeypatch, METHODS[name], "predict_noise", step=1, index=0)
    result = generate(tiny_pipe, method, [0, 1])
    assert result.failed_step == [1, None]
    assert torch.isfinite(result.latents[1]).all()


# --- scorers ----------------------------------------------------------------------------------------------------

# The shapes world's scorers read only its words; every other scorer scores the demo prompts.
SCORER_DATASET = {"shapes_clip": "shapes_unseen", "shapes_detection": "shapes_unseen"}
SAMPLING = {"num_inference_steps": 2, "guidance_scale": 7.5}
SCORED_METHOD = "attend_and_excite"  # the set scored; vanilla's images of the same prompts and seeds exist too
# Scores with batch_size 1 against one batch of every image: |difference| (relative for FID's set row). Measured on
# the stand-ins: shapes_clip 7.8e-7, text_similarity 6.0e-8, clip 3.0e-8, lpips 1.5e-8; fid, owlv2, tifa and
# overhead 0. The tolerance is >10x the largest.
BATCH_TOLERANCE = 1e-5


def scorer_config_name(name: str) -> str:
    return f"{name}_tiny" if has_config("scorer", f"{name}_tiny") else name


def no_batch_size(name: str) -> str | None:
    """Why `batch_size` cannot change `name`'s scores, or None: it has no such parameter."""
    try:
        config = OmegaConf.to_container(config_file("scorer", scorer_config_name(name)), resolve=False)
        SCORERS.resolve({**config, "batch_size": 1}, supplied=1)
    except ConfigError:
        return "takes no batch_size"
    return None


class ScoringContext:
    """Per dataset, a store with vanilla's and attend_and_excite's images of 3 prompts x seeds 0, 1 (random pixels),
    plus one failed attend_and_excite generation (seed 2 of the first prompt, no image); per scorer, its config as
    the experiment composes it (the tiny stand-in) and the built scorer by batch size."""

    def __init__(self, root):
        self.root = root
        self.store = ImageStore(root / "store")
        self._sets: dict[str, tuple] = {}
        self._scorers: dict[tuple, object] = {}

    def config(self, name: str) -> dict:
        cfg = compose_config(["model=tiny", f"dataset={SCORER_DATASET.get(name, 'demo')}", f"scorer=[{scorer_config_name(name)}]",
                              f"store_root={self.root / 'store'}"])
        (config,) = OmegaConf.to_container(cfg.scorers, resolve=True).values()
        return config

    def scorer(self, name: str, batch_size: int | None = None):
        if (name, batch_size) not in self._scorers:
            config = self.config(name)
            if batch_size is not None:
                config["batch_size"] = batch_size
            self._scorers[name, batch_size] = SCORERS.build(config, torch.device("cpu"))
        return self._scorers[name, batch_size]

    def scored_set(self, name: str) -> tuple[ScoredSet, list[ScoredImage], ScoredImage]:
        """The set, its generated items and its failed one."""
        dataset = SCORER_DATASET.get(name, "demo")
        if dataset not in self._sets:
            specs = load_prompt_set(project_path(config_file("dataset", dataset).path))[:3]
            manifests = [generation_manifest(method, SAMPLING, experiment="contracts", dataset=dataset, seeds=[0, 1, 2])
                         for method in ("vanilla", SCORED_METHOD)]
            rng, items, failed = np.random.default_rng(0), [], None
            for index, (spec, seed) in enumerate((spec, seed) for spec in specs for seed in (0, 1, 2)):
                for manifest in manifests:
                    key = ImageKey("tiny", manifest.variant, dataset, spec.id, seed)
                    if manifest.method == SCORED_METHOD and seed == 2:
                        if index == 2:
                            record = {"status": "failed", "failed_step": 1, "seconds_per_image": 9.0, "peak_memory_bytes": None}
                            self.store.put(key, None, record)
                            failed = ScoredImage("tiny", SCORED_METHOD, key.variant, dataset, spec.id, seed, spec.prompt,
                                                 spec.subjects, None, record)
                        continue
                    record = {"status": "ok", "seconds_per_image": 0.5 + index, "peak_memory_bytes": None}
                    image = random_image(rng, (64, 64))
                    self.store.put(key, image, record)
                    if manifest.method == SCORED_METHOD:
                        items.append(ScoredImage("tiny", SCORED_METHOD, key.variant, dataset, spec.id, seed, spec.prompt,
                                                 spec.subjects, image, record))
            self._sets[dataset] = (ScoredSet(manifests[1], manifests, self.store), items, failed)
        return self._sets[dataset]


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    return ScoringContext(tmp_path_factory.mktemp("contracts"))


def score(scorer, scored_set: ScoredSet, items: list[ScoredImage]) -> list[dict]:
    """One set through the score stage's protocol."""
    scorer.reset()
    scorer.begin_set(scored_set)
    scorer.update(items)
    return scorer.compute()


def by_key(rows: list[dict]) -> dict[tuple, dict]:
    """Rows by (prompt_id, seed, metric); a set-level row has no prompt_id or seed."""
    keyed = {(row["prompt_id"], row["seed"], row["metric"]): row for row in rows}
    assert len(keyed) == len(rows), "two rows for one image and metric"
    return keyed


def assert_same_rows(rows: list[dict], expected: list[dict], tolerance: float) -> None:
    """The same rows (identity, metric, provenance, n_images); values within `tolerance` (relative for set-level
    rows, absolute otherwise), NaN where the expected value is NaN."""
    rows, expected = by_key(rows), by_key(expected)
    assert rows.keys() == expected.keys()
    for key, row in rows.items():
        want = expected[key]
        assert {k: v for k, v in row.items() if k != "value"} == {k: v for k, v in want.items() if k != "value"}, key
        if math.isnan(want["value"]):
            assert math.isnan(row["value"]), (key, row["value"])
        elif row["prompt_id"] is None:
            assert row["value"] == pytest.approx(want["value"], rel=tolerance), key
        else:
            assert row["value"] == pytest.approx(want["value"], abs=tolerance, rel=0), key


@pytest.mark.parametrize("name", SCORERS.names())
def test_reset_clears(scoring, name):
    scorer = scoring.scorer(name)
    scored_set, items, _ = scoring.scored_set(name)
    first, second = items[:3], items[3:]
    assert score(scorer, scored_set, first)
    scorer.reset()
    scorer.begin_set(scored_set)
    assert all(row.get("n_images") == 0 for row in scorer.compute()), "rows from before reset"
    scorer.update(second)
    rows = scorer.compute()
    assert rows
    assert {(row["prompt_id"], row["seed"]) for row in rows if row["prompt_id"] is not None} <= {(i.prompt_id, i.seed) for i in second}
    assert all(row["n_images"] == len(second) for row in rows if row["prompt_id"] is None)


@pytest.mark.parametrize("name", SCORERS.names())
def test_a_failed_generation_gets_no_rows(scoring, name):
    scorer = scoring.scorer(name)
    scored_set, items, failed = scoring.scored_set(name)
    with_failed = score(scorer, scored_set, [*items[:2], failed, *items[2:]])
    assert not [row for row in with_failed if (row["prompt_id"], row["seed"]) == (failed.prompt_id, failed.seed)]
    assert_same_rows(with_failed, score(scorer, scored_set, items), tolerance=0)


@pytest.mark.parametrize("name", not_applicable(SCORERS.names(), no_batch_size))
def test_batch_size_does_not_change_scores(scoring, name):
    scored_set, items, _ = scoring.scored_set(name)
    one_at_a_time = score(scoring.scorer(name, batch_size=1), scored_set, items)
    all_at_once = score(scoring.scorer(name, batch_size=len(items)), scored_set, items)
    assert all_at_once
    assert_same_rows(one_at_a_time, all_at_once, BATCH_TOLERANCE)
