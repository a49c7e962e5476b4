import collections
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from evalkit.errors import ConfigError, DatasetError, MissingWeightsError, PromptError
from evalkit.paths import PROJECT_ROOT, config_file
from evalkit.prompts import PromptSpec, load_prompt_set
from evalkit.scoring.base import SCORERS, ScoredImage
from evalkit.scoring.tifa import (
    NearestChoice,
    TifaScorer,
    load_questions,
    score_answers,
    tiny_sentence_encoder,
    type_metric,
)
from tests.conftest import compose_config

CPU = torch.device("cpu")
FIXTURES = Path(__file__).parent / "fixtures" / "tifa"
DEMO_QUESTIONS = PROJECT_ROOT / "datasets" / "demo_tifa_questions.json"
VQA_FIELDS = ("free_form_vqa", "multiple_choice_vqa", "scores")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are too small to gain from intra-op threads; a second one only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> dict:
    config = OmegaConf.to_container(config_file("scorer", "tifa_tiny"))
    return {**config, "questions": str(DEMO_QUESTIONS), **overrides}


def demo_items(seeds=(0,)) -> list[ScoredImage]:
    rng = np.random.default_rng(0)
    return [
        ScoredImage("tiny", "vanilla", "vanilla@0", "demo", spec.id, seed, spec.prompt, spec.subjects,
                    Image.fromarray(rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)), {"status": "ok"})
        for spec in load_prompt_set(PROJECT_ROOT / "datasets" / "demo.jsonl")
        for seed in seeds
    ]


def write_questions(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path


# (1) tifascore's own sample run: its recorded VQA answers through our scoring reproduce its result exactly.


def test_upstream_sample_result_from_its_recorded_answers():
    expected = json.loads((FIXTURES / "sample_evaluation_result.json").read_text())
    questions = load_questions(FIXTURES / "sample_question_answers.json")
    entries = [entry for text_id in questions for entry in questions[text_id]]
    recorded = [expected["question_details"][e["id"]][e["question"]] for e in entries]
    mapped = []

    def recorded_choice(answer: str, choices: list[str]) -> str:
        (detail,) = [d for d in recorded if d["free_form_vqa"] == answer and d["choices"] == choices]
        mapped.append((answer, choices))
        return detail["multiple_choice_vqa"]

    result = score_answers(entries, [detail["free_form_vqa"] for detail in recorded], recorded_choice)

    # Only the one answer outside its choices ("0" dogs) goes through the mapping (SBERT chose "1").
    assert mapped == [("0", ["1", "2", "3", "4"])]
    assert result.question_details == expected["question_details"]
    assert result.caption_scores == expected["caption_scores"]
    assert result.accuracy_by_type == expected["accuracy_by_type"]
    assert statistics.mean(result.caption_scores.values()) == expected["tifa_average"]
    assert statistics.stdev(result.caption_scores.values()) == expected["tifa_stdev"]


def test_repeated_question_scores_each_time_and_keeps_last_answers():
    entry = {"id": "t", "caption": "c", "question": "is it red?", "choices": ["yes", "no"], "answer": "yes",
             "element_type": "color"}
    other = dict(entry, question="is it big?", element_type="attribute")
    result = score_answers([entry, entry, other], ["yes", "no", "no"], lambda answer, choices: pytest.fail("mapped"))
    assert result.caption_scores == {"t": 1 / 3}
    assert result.accuracy_by_type == {"color": 0.5, "attribute": 0}
    assert result.question_details["t"]["is it red?"] == dict(entry, free_form_vqa="no", multiple_choice_vqa="no", scores=0)


# (2) The answer-to-choice mapping is sentence-transformers' cosine argmax (all-mpnet-base-v2's module stack).


def test_nearest_choice_is_sentence_transformers_cosine_argmax(tmp_path):
    from sentence_transformers import SentenceTransformer, util
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    model, tokenizer = tiny_sentence_encoder()
    mapper = NearestChoice(model, tokenizer, CPU)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    library = SentenceTransformer(
        modules=[Transformer(str(tmp_path)), Pooling(model.config.hidden_size, pooling_mode="mean"), Normalize()],
        device="cpu",
    )
    cases = [
        ("pale green", ["black", "green", "yellow", "brown"]),
        ("0", ["1", "2", "3", "4"]),
        ("a small wooden table by the window", ["table", "chair", "bed", "a desk near a door"]),
        ("yes", ["no", "maybe so", "yes indeed"]),
        ("two", ["1", "2", "3", "4"]),
        ("surfing on a big wave", ["surfing", "swimming", "diving", "skiing"]),
    ]
    for answer, choices in cases:
        similarities = util.cos_sim(library.encode([answer], convert_to_tensor=True), library.encode(choices, convert_to_tensor=True))[0]
        assert mapper(answer, choices) == choices[int(similarities.argmax())]
        torch.testing.assert_close(mapper.embed(choices), library.encode(choices, convert_to_tensor=True), atol=1e-6, rtol=0)
    # The cases are not all decided the same way, so the comparison can tell mappings apart.
    assert len({choices.index(mapper(answer, choices)) for answer, choices in cases}) > 1


# (3) End to end on the tiny stand-ins, against tifascore itself run on the same tiny models (fixtures/tifa/README.md).

TIFASCORE_TINY = json.loads((FIXTURES / "tifascore_tiny.json").read_text())


@pytest.fixture(scope="module")
def tiny_scorer() -> TifaScorer:
    config = tiny_config(batch_size=3)
    return SCORERS.build({**config, "vqa": {**config["vqa"], "max_length": 50}}, CPU)  # tifascore's max_length


def test_tiny_scorer_equals_tifascore_on_the_same_models(tiny_scorer, monkeypatch):
    """Batched answers (the questions of 3 images per VQA call, 3 per generate call, grouped by question length),
    the mapping and the scores equal tifascore's `tifa_score_single`, which asks one question per call, under
    transformers 4.39."""
    items = demo_items()
    asked = []
    answer = tiny_scorer.vqa.answer

    def recording_answer(images, questions):
        asked.append(answer(images, questions))
        return asked[-1]

    monkeypatch.setattr(tiny_scorer.vqa, "answer", recording_answer)
    tiny_scorer.reset()
    tiny_scorer.update(items)
    rows = tiny_scorer.compute()

    expected = TIFASCORE_TINY["tifa_score_single"]
    questions = load_questions(DEMO_QUESTIONS)
    entries = [entry for item in items for entry in questions[item.prompt_id]]
    assert len(asked) == -(-len(items) // 3)  # one call per batch of images
    answers = [answer for call in asked for answer in call]
    result = score_answers(entries, answers, tiny_scorer.to_choice)
    assert result.question_details == {text_id: run["question_details"] for text_id, run in expected.items()}
    assert len(set(answers)) > 5  # the stand-in's answers differ between images and questions
    assert {(r["prompt_id"], r["value"]) for r in rows if r["metric"] == "tifa"} == {
        (text_id, run["tifa_score"]) for text_id, run in expected.items()
    }
    assert {(r["prompt_id"], r["metric"]) for r in rows} == {
        (e["id"], metric) for e in entries for metric in ("tifa", type_metric(e["element_type"]))
    }
    assert {r["scorer"] for r in rows} == {tiny_scorer.provenance}
    assert "tiny" in tiny_scorer.provenance and "demo_tifa_questions.json" in tiny_scorer.provenance


def test_nearest_choice_equals_tifascore_sbert():
    mapper = NearestChoice(*tiny_sentence_encoder(), CPU)
    for case in TIFASCORE_TINY["multiple_choice"]:
        assert mapper(case["answer"], case["choices"]) == case["choice"]
        torch.testing.assert_close(mapper.embed(case["choices"]), torch.tensor(case["choice_embeddings"]), atol=1e-6, rtol=0)


def test_failed_generations_get_no_rows(tiny_scorer):
    item = demo_items()[0]
    tiny_scorer.reset()
    tiny_scorer.update([dataclasses.replace(item, image=None, record={"status": "failed"})])
    assert tiny_scorer.compute() == []


# Bad input: clear errors, before any generation.


def test_prompt_without_questions_is_an_error_naming_it(tiny_scorer):
    specs = [PromptSpec("animals-cat-dog", "a cat and a dog"), PromptSpec("lonely", "a lonely lighthouse")]
    with pytest.raises(PromptError, match="prompt 'lonely' .*no TIFA questions"):
        TifaScorer.preflight(tiny_config(), ["vanilla"], specs)
    item = demo_items()[0]
    with pytest.raises(PromptError, match="prompt 'lonely'"):
        tiny_scorer.update([dataclasses.replace(item, prompt_id="lonely", prompt="a lonely lighthouse")])


def test_questions_about_another_caption_are_an_error():
    with pytest.raises(PromptError, match="about the caption 'a cat and a dog', not the prompt 'a cat and a frog'"):
        TifaScorer.preflight(tiny_config(), ["vanilla"], [PromptSpec("animals-cat-dog", "a cat and a frog")])


def test_generate_checks_tifa_questions_before_any_image(tmp_path):
    from evalkit import stages

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"id": "animals-cat-dog", "prompt": "a cat and a dog"}\n{"id": "lonely", "prompt": "a lighthouse"}\n')
    cfg = compose_config([
        "model=tiny", "scorer=[tifa_tiny]", f"dataset.path={dataset}", f"dataset.tifa_questions={DEMO_QUESTIONS}",
        f"store_root={tmp_path / 'store'}", f"runs_root={tmp_path / 'runs'}", "device=cpu",
    ])
    with pytest.raises(PromptError, match="prompt 'lonely'"):
        stages.generate(cfg)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.pop("choices"), "field 'choices' must be a list"),
        (lambda e: e.update(choices=[]), "choices must be a non-empty list"),
        (lambda e: e.update(element_type="texture"), "unknown element_type 'texture'"),
        (lambda e: e.update(question=3), "field 'question' must be a str"),
    ],
)
def test_bad_question_entries_are_named(tmp_path, change, message):
    entries = json.loads(DEMO_QUESTIONS.read_text())
    change(entries[2])
    with pytest.raises(DatasetError, match=rf"entry 2 \(id .*{message}"):
        load_questions(write_questions(tmp_path / "q.json", entries))


def test_one_id_with_two_captions_is_an_error(tmp_path):
    entries = json.loads(DEMO_QUESTIONS.read_text())
    entries[1]["caption"] = "a cat and a frog"
    with pytest.raises(DatasetError, match="id 'animals-cat-dog' has two captions"):
        load_questions(write_questions(tmp_path / "q.json", entries))


def test_configuration_errors():
    with pytest.raises(ConfigError, match="no question file"):
        SCORERS.build(tiny_config(questions=None), CPU)
    with pytest.raises(ConfigError, match="unknown vqa backend 'mplug'"):
        SCORERS.build(tiny_config(vqa={"backend": "mplug"}), CPU)
    with pytest.raises(DatasetError, match="does not exist"):
        SCORERS.build(tiny_config(questions="datasets/no_such_questions.json"), CPU)


def test_real_checkpoints_offline_are_missing_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache, whatever this machine has downloaded
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    config = OmegaConf.to_container(config_file("scorer", "tifa"))
    with pytest.raises(MissingWeightsError, match="Salesforce/blip-vqa-capfilt-large@c6af15b") as error:
        SCORERS.build({**config, "questions": str(DEMO_QUESTIONS)}, CPU)
    assert "\n" not in str(error.value) and "hf download" in str(error.value)


# The TIFA v1.0 prompt set.

TIFA_V1 = PROJECT_ROOT / "datasets" / "tifa_v1.jsonl"
UPSTREAM_TEXT_INPUTS = PROJECT_ROOT.parent / "shared" / "data" / "tifa" / "tifa_v1.0_text_inputs.json"


def test_tifa_v1_prompt_set_links_to_tifa_questions():
    specs = load_prompt_set(TIFA_V1)
    assert collections.Counter(s.extra["source"] for s in specs) == {"coco": 2000, "partiprompt": 1420, "paintskill": 500, "drawbench": 161}
    sample = load_questions(FIXTURES / "sample_question_answers.json")
    linked = [s for s in specs if s.id in sample]
    assert len(linked) == len(sample) == 2
    TifaScorer.preflight({"questions": str(FIXTURES / "sample_question_answers.json")}, ["vanilla"], linked)


@pytest.mark.skipif(not UPSTREAM_TEXT_INPUTS.is_file(), reason="needs ../shared/data beside the checkout")
def test_tifa_v1_prompt_set_is_the_upstream_file_verbatim():
    upstream = json.loads(UPSTREAM_TEXT_INPUTS.read_text())
    assert [(s.id, s.prompt, s.extra.get("coco_val_id")) for s in load_prompt_set(TIFA_V1)] == [
        (e["id"], e["caption"], e.get("coco_val_id")) for e in upstream
    ]
