import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evalkit.parsing
from evalkit.errors import PromptError
from evalkit.methods.syngen import (
    NO_GROUP_NOTE,
    SynGen,
    group_terms,
    symmetric_kl,
    syngen_loss,
    word_distance,
)
from evalkit.parsing import merge_overlapping, modifier_noun_groups
from evalkit.paths import config_file
from evalkit.prompts import PromptSpec, TokenIndexer
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS

FIXTURE = Path(__file__).parent / "fixtures" / "syngen" / "latents.safetensors"
# The official run (fixtures/syngen/README.md): 3 PNDM steps = loop indices 0..3, SynGen at 0..2, step size 1000
# (the default 20 moves this random model's latents by only ~1e-4).
PROMPT = "a small red urial and a blue bowl"  # a(1) small(2) red(3) uri(4) al(5) and(6) a(7) blue(8) bowl(9)
SPEC = PromptSpec("p", PROMPT, subjects=("urial", "bowl"), groups=(("small", "red", "urial"), ("blue", "bowl")))
OFFICIAL_GROUPS = [[[2], [3], [4, 5]], [[8], [9]]]
PROMPT_POSITIONS = list(range(1, 10))
SETTINGS = SamplingSettings(num_inference_steps=3, guidance_scale=7.5, height=128, width=128)
FIXTURE_METHOD = dict(step_size=1000.0, num_intervention_steps=3)
# Elsewhere 64 px: 32x32 latents, whose 16x16 cross-attention is at down_blocks.1 / up_blocks.2 (10x cheaper).
SMALL = SamplingSettings(num_inference_steps=1, guidance_scale=7.5, height=64, width=64)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


def _with_official_embeddings(pipe, golden):
    """Make `pipe.encode_prompt` return the official run's text embeddings (transformers 4.39.3's)."""

    def encode_prompt(prompt, device, n, guidance, *args, **kwargs):
        assert prompt == PROMPT
        return golden["text_embeddings"][1:2].repeat(n, 1, 1), golden["text_embeddings"][0:1].repeat(n, 1, 1)

    pipe.encode_prompt = encode_prompt


def _run(pipe, method, spec, seeds=(0,), settings=SETTINGS):
    """Per loop index: the latents after the SynGen update and after the scheduler step."""
    updated, stepped = [], []
    update_latents = method.update_latents

    def recording_update(run, i, t, latents):
        latents = update_latents(run, i, t, latents)
        updated.append(latents.clone())
        return latents

    method.update_latents = recording_update
    try:
        result = sample(pipe, method, spec, list(seeds), settings, on_step=lambda i, t, z: stepped.append(z.clone()))
    finally:
        del method.update_latents
    return updated, stepped, result


# ---------------------------------------------------------------------------------------------- parity


def test_loss_on_the_official_maps_is_the_official_loss(golden):
    """The official run's step-0 maps (x100, as its loss reads them) give its loss exactly, in either group order
    (the official pipeline orders them [[8, 9], [2, 3, [4, 5]]])."""
    for groups in (OFFICIAL_GROUPS, OFFICIAL_GROUPS[::-1]):
        loss = syngen_loss(golden["maps_0"], groups, PROMPT_POSITIONS)
        assert loss.item() == golden["loss_0"].item()


@pytest.mark.parametrize("official_text_embeddings", [True, False])
def test_latents_match_the_official_pipeline(tiny_pipe, golden, official_text_embeddings):
    """Golden latents of the official SynGenDiffusionPipeline (diffusers 0.21.4) on the same weights.

    The two diffusers versions' UNet forwards differ by ~1e-6 (the step-0 maps by 7e-7); the guidance-scale-7.5
    PNDM step amplifies that to ~2e-5, also for a plain step from the official updated latent (measured 2.1e-5).
    The SynGen update itself matches to 2.4e-7 while it moves the latent by 7.5e-3. Measured per loop index:
    2.3e-5, 1.4e-5, 1.9e-5, 1.9e-5 with the official text embeddings; 2.0e-5, 1.4e-5, 2.0e-5, 1.9e-5 without.
    """
    if official_text_embeddings:
        _with_official_embeddings(tiny_pipe, golden)
    updated, stepped, _ = _run(tiny_pipe, SynGen(**FIXTURE_METHOD), SPEC)
    assert len(stepped) == 4
    update = (golden["updated_0"] - golden["initial"]).abs().max().item()
    assert update > 5e-3, "the fixture's SynGen update is too small to test"
    update_difference = (updated[0] - golden["updated_0"]).abs().max().item()
    differences = [(latents - golden[f"step_{i}"]).abs().max().item() for i, latents in enumerate(stepped)]
    print("max |ours - official| after the index-0 update:", update_difference, "after each loop index:", differences)
    assert update_difference < 1e-6
    assert max(differences) <= 5e-5, differences
    # No update after num_intervention_steps: index 3 steps from index 2's result unchanged.
    assert torch.equal(updated[3], stepped[2])


def test_the_loop_draws_the_fixtures_initial_noise(tiny_pipe, golden):
    generator = torch.Generator("cpu").manual_seed(0)
    initial = tiny_pipe.prepare_latents(1, 4, 128, 128, torch.float32, torch.device("cpu"), [generator])
    assert torch.equal(initial, golden["initial"])


# ---------------------------------------------------------------------------------------------- the loss


def _kl(p: list[float], q: list[float]) -> float:
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _kl_sym(p, q) -> float:
    return (_kl(p, q) + _kl(q, p)) / 2


UNIFORM, LEFT, RIGHT = [1.0, 1.0], [3.0, 1.0], [1.0, 3.0]


def _maps(columns: dict[int, list[float]], tokens: int = 77) -> torch.Tensor:
    """(1, 2, tokens) maps of two pixels: the given columns, every other token uniform."""
    maps = torch.ones(1, 2, tokens, dtype=torch.float64)
    for position, values in columns.items():
        maps[0, :, position] = torch.tensor(values)
    return maps


def test_symmetric_kl_normalises_each_map_and_is_symmetric():
    a, b = torch.tensor([[1.0, 3.0]], dtype=torch.float64), torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    expected = _kl_sym([1, 3], [2, 2])
    assert symmetric_kl(a, b).item() == pytest.approx(expected, rel=1e-12)
    assert symmetric_kl(100 * a, b).item() == pytest.approx(expected, rel=1e-12)  # the x100 changes nothing
    assert symmetric_kl(b, a).item() == symmetric_kl(a, b).item()
    assert symmetric_kl(a, a).item() == 0.0
    assert _kl_sym(LEFT, RIGHT) == pytest.approx(0.5 * math.log(3))


def test_a_split_word_takes_the_max_over_its_pieces():
    maps = _maps({4: UNIFORM, 5: RIGHT, 3: LEFT})
    assert word_distance(maps, [3], [4, 5]).item() == pytest.approx(_kl_sym(LEFT, RIGHT))
    assert word_distance(maps, [4, 5], [3]).item() == pytest.approx(_kl_sym(LEFT, RIGHT))


def test_bound_modifier_and_noun_give_only_negative_terms():
    """"a red car and a blue bowl": red and car share a map, blue and bowl share another; O of each group is the
    other five prompt tokens (function words included)."""
    positions = list(range(1, 8))  # a red car and a blue bowl
    maps = _maps({2: LEFT, 3: LEFT, 6: RIGHT, 7: RIGHT})
    positive, negative = group_terms(maps, [[2], [3]], positions)
    outside = [_kl_sym(LEFT, UNIFORM)] * 3 + [_kl_sym(LEFT, RIGHT)] * 2  # a, and, a; blue, bowl
    mean_outside = sum(outside) / 5
    assert positive.item() == pytest.approx(0.0, abs=1e-12)
    assert negative.item() == pytest.approx(-(mean_outside + mean_outside) / 2)
    total = syngen_loss(maps, [[[2], [3]], [[6], [7]]], positions)
    assert total.item() == pytest.approx(-2 * mean_outside)


def test_a_modifier_attending_to_the_wrong_noun_costs_more():
    positions = list(range(1, 8))
    groups = [[[2], [3]], [[6], [7]]]
    bound = syngen_loss(_maps({2: LEFT, 3: LEFT, 6: RIGHT, 7: RIGHT}), groups, positions)
    swapped = syngen_loss(_maps({2: RIGHT, 3: LEFT, 6: LEFT, 7: RIGHT}), groups, positions)
    assert swapped.item() > bound.item()
    # The positive term of the swapped red-car pair is KLsym(RIGHT, LEFT).
    positive, _ = group_terms(_maps({2: RIGHT, 3: LEFT}), [[2], [3]], positions)
    assert positive.item() == pytest.approx(_kl_sym(RIGHT, LEFT))


def test_terms_add_up_over_modifiers_and_the_noun_term_counts_once_per_modifier():
    """Group [small, red, urial] with urial split into two pieces; O = {1, 6, 7, 8, 9}."""
    maps = _maps({2: LEFT, 3: RIGHT, 4: LEFT, 5: UNIFORM, 8: RIGHT})
    positive, negative = group_terms(maps, [[2], [3], [4, 5]], PROMPT_POSITIONS)
    outside = [1, 6, 7, 8, 9]
    column = {1: UNIFORM, 6: UNIFORM, 7: UNIFORM, 8: RIGHT, 9: UNIFORM}

    def mean_outside(pieces):
        return sum(max(_kl_sym(p, column[o]) for p in pieces) for o in outside) / len(outside)

    urial = [LEFT, UNIFORM]
    expected_positive = max(_kl_sym(LEFT, p) for p in urial) + max(_kl_sym(RIGHT, p) for p in urial)
    expected_negative = sum(-(mean_outside([m]) + mean_outside(urial)) / 2 for m in (LEFT, RIGHT))
    assert positive.item() == pytest.approx(expected_positive)
    assert negative.item() == pytest.approx(expected_negative)


def test_a_noun_alone_gets_only_its_negative_term_and_a_whole_prompt_group_none():
    maps = _maps({3: LEFT})
    positions = [1, 2, 3]
    positive, negative = group_terms(maps, [[3]], positions)
    assert positive == 0.0
    assert negative.item() == pytest.approx(-_kl_sym(LEFT, UNIFORM))  # the mean over two uniform others
    assert group_terms(maps, [[1], [2], [3]], positions)[1] == 0.0  # no token outside the group


def test_the_loss_has_a_gradient_towards_binding():
    """Moving the modifier's map towards its noun's lowers the loss."""
    positions = list(range(1, 8))
    maps = _maps({2: RIGHT, 3: LEFT, 6: RIGHT, 7: RIGHT}).requires_grad_(True)
    (grad,) = torch.autograd.grad(syngen_loss(maps, [[[2], [3]], [[6], [7]]], positions), maps)
    # red (position 2) has more mass on pixel 1 than car; the loss wants pixel 0 up and pixel 1 down.
    assert grad[0, 0, 2] < 0 < grad[0, 1, 2]


# ---------------------------------------------------------------------------------------------- groups


def test_noun_only_groups_add_a_term_only_with_include_entities():
    spec = PromptSpec("q", "a red car and a bowl", groups=(("red", "car"), ("bowl",)))
    indexer = TokenIndexer(_tokenizer())
    assert SynGen().token_groups(spec, indexer) == [[[2], [3]]]
    assert SynGen(include_entities=True).token_groups(spec, indexer) == [[[2], [3]], [[6]]]


def test_prompt_with_only_noun_groups_runs_as_plain_stable_diffusion(tiny_pipe):
    spec = PromptSpec("q", "a cat and a dog", groups=(("cat",), ("dog",)))
    ours = sample(tiny_pipe, SynGen(), spec, [0], SMALL)
    vanilla = sample(tiny_pipe, METHODS.build({"name": "vanilla"}), spec, [0], SMALL)
    assert torch.equal(ours.latents, vanilla.latents)
    # The report says so beside SynGen's overhead: the official code pays for guidance here.
    assert ours.notes == [NO_GROUP_NOTE] and vanilla.notes == []


def test_config_file_gives_the_official_defaults():
    config = config_file("method", "syngen")
    assert METHODS.build(config) == SynGen()
    assert SynGen() == SynGen(step_size=20.0, num_intervention_steps=25, attention_res=16, include_entities=False)


# ---------------------------------------------------------------------------------------------- no state leaks


def test_one_method_object_keeps_nothing_between_prompts(tiny_pipe):
    """The official pipeline caches the first prompt's groups; here a second prompt through the same object gives
    what a fresh object gives, and differs from what the first prompt's groups would give."""
    second = PromptSpec("q", "a blue bowl and a small red urial", groups=(("blue", "bowl"), ("small", "red", "urial")))
    method = SynGen(step_size=1000.0)
    processors = dict(tiny_pipe.unet.attn_processors)
    sample(tiny_pipe, method, SPEC, [0], SMALL)
    assert tiny_pipe.unet.attn_processors == processors, "teardown did not restore the attention processors"
    reused = sample(tiny_pipe, method, second, [0], SMALL).latents
    fresh = sample(tiny_pipe, SynGen(step_size=1000.0), second, [0], SMALL).latents
    assert torch.equal(reused, fresh)
    stale_method = SynGen(step_size=1000.0)  # the official cache: the first prompt's token positions
    stale_method.token_groups = lambda spec, indexer: OFFICIAL_GROUPS
    stale = sample(tiny_pipe, stale_method, second, [0], SMALL).latents
    assert not torch.allclose(fresh, stale, atol=1e-4)


def test_each_image_of_a_batch_is_guided_alone(tiny_pipe):
    method = SynGen(step_size=1000.0)
    batch = sample(tiny_pipe, method, SPEC, [0, 1], SMALL).latents
    alone = sample(tiny_pipe, method, SPEC, [1], SMALL).latents
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input


def test_prompt_without_groups_and_without_spacy_fails_before_any_unet_call(tiny_pipe, unet_calls, monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy raises ImportError
    evalkit.parsing.load_parser.cache_clear()
    spec = PromptSpec("no-groups", "a red car and a blue bowl")
    with pytest.raises(PromptError) as error:
        sample(tiny_pipe, SynGen(), spec, [0], SETTINGS)
    message = str(error.value)
    assert "'no-groups'" in message and "a red car and a blue bowl" in message and "groups" in message
    assert "pip install evalkit[parse]" in message and "give groups in the prompt set" in message
    assert unet_calls == []
    evalkit.parsing.load_parser.cache_clear()


def test_missing_spacy_model_names_the_download(monkeypatch):
    pytest.importorskip("spacy")
    evalkit.parsing.load_parser.cache_clear()
    with pytest.raises(PromptError, match="python -m spacy download evalkit_no_such_model"):
        SynGen(parser_model="evalkit_no_such_model").preflight(PromptSpec("r", "a red car"), TokenIndexer(_tokenizer()))
    evalkit.parsing.load_parser.cache_clear()


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(eq=False)
class Token:
    """The part of spaCy's Token the rules read."""

    i: int
    text: str
    pos_: str
    dep_: str
    children: list = field(default_factory=list)


def _doc(prompt: str, pos: list[str], deps: list[str], heads: list[int]) -> list[Token]:
    tokens = [Token(i, w, p, d) for i, (w, p, d) in enumerate(zip(prompt.split(), pos, deps))]
    for token, head in zip(tokens, heads):
        if head != token.i:
            tokens[head].children.append(token)
    return tokens


# The hand-annotated parse the official run used (fixtures/syngen/README.md).
FIXTURE_PARSE = (
    PROMPT,
    ["DET", "ADJ", "ADJ", "NOUN", "CCONJ", "DET", "ADJ", "NOUN"],
    ["det", "amod", "amod", "ROOT", "cc", "det", "amod", "conj"],
    [3, 3, 3, 3, 3, 7, 7, 3],
)


def test_parse_of_the_fixture_prompt_gives_the_official_groups():
    """The official run aligned them to [[8, 9], [2, 3, [4, 5]]]: the same groups (its order comes from the
    relative-clause rule that stops after the first noun, see the next test)."""
    groups = modifier_noun_groups(_doc(*FIXTURE_PARSE))
    assert groups == [("small", "red", "urial"), ("blue", "bowl")]
    positions = SynGen().token_groups(PromptSpec("p", PROMPT, groups=tuple(groups)), TokenIndexer(_tokenizer()))
    assert sorted(positions) == sorted(OFFICIAL_GROUPS)


def test_relative_clause_of_a_later_noun_is_found():
    """"a cat and a dog that is brown": the official rule returns after the first noun (cat) and misses it."""
    doc = _doc(
        "a cat and a dog that is brown",
        ["DET", "NOUN", "CCONJ", "DET", "NOUN", "PRON", "AUX", "ADJ"],
        ["det", "ROOT", "cc", "det", "conj", "nsubj", "relcl", "acomp"],
        [1, 1, 1, 4, 1, 6, 4, 6],
    )
    assert modifier_noun_groups(doc) == [("brown", "dog")]


def test_coordinated_modifiers_and_copulas():
    red_and_blue = _doc(
        "a red and blue car", ["DET", "ADJ", "CCONJ", "ADJ", "NOUN"], ["det", "amod", "cc", "conj", "ROOT"], [4, 4, 1, 1, 4]
    )
    assert modifier_noun_groups(red_and_blue) == [("red", "blue", "car")]
    copula = _doc("the car is red", ["DET", "NOUN", "AUX", "ADJ"], ["det", "nsubj", "ROOT", "acomp"], [1, 2, 2, 2])
    assert modifier_noun_groups(copula) == [("red", "car")]  # noun last (the official leaves it first)


def test_entities_join_only_with_include_entities():
    doc = _doc(
        "a red car and a bowl",
        ["DET", "ADJ", "NOUN", "CCONJ", "DET", "NOUN"],
        ["det", "amod", "ROOT", "cc", "det", "conj"],
        [2, 2, 2, 2, 5, 2],
    )
    assert modifier_noun_groups(doc) == [("red", "car")]
    assert modifier_noun_groups(doc, include_entities=True) == [("red", "car"), ("bowl",)]


def test_merge_overlapping_groups():
    assert merge_overlapping([[1, 2], [5, 6], [1, 2], [2], [6]]) == [[1, 2], [5, 6]]
    assert merge_overlapping([[1, 3], [2, 3], [4]]) == [[1, 3, 2], [4]]
    assert merge_overlapping([[1, 2], [3, 4], [2, 3]]) == [[3, 4, 1, 2]]  # second pass: [3, 4] meets [1, 2, 3]


def test_prompt_without_groups_is_parsed(monkeypatch):
    monkeypatch.setattr(evalkit.parsing, "load_parser", lambda model: lambda prompt: _doc(*FIXTURE_PARSE))
    spec = PromptSpec("p", PROMPT)
    assert SynGen().token_groups(spec, TokenIndexer(_tokenizer())) == OFFICIAL_GROUPS


def test_rules_read_a_spacy_doc():
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import Doc

    words, pos, deps, heads = FIXTURE_PARSE
    doc = Doc(spacy.blank("en").vocab, words=words.split(), pos=pos, deps=deps, heads=heads)
    assert modifier_noun_groups(doc) == [("small", "red", "urial"), ("blue", "bowl")]


def _tokenizer():
    from evalkit.models.tokenizer import clip_tokenizer

    return clip_tokenizer()


def test_half_precision_model_takes_the_loss_in_float32(tiny_pipe):
    """On a float16 pipeline (GPU runs) the maps are normalised in float32, as the official float32 run does;
    float16 maps fail Categorical's simplex check."""
    pipe = tiny_pipe.to(torch.float16)
    latents = sample(pipe, SynGen(num_intervention_steps=1), SPEC, [0], SamplingSettings(1, 7.5, 128, 128)).latents
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
