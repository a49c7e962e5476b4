import json

import pytest

from evalkit.errors import DatasetError, PromptError
from evalkit.models.tokenizer import clip_tokenizer
from evalkit.prompts import PromptSpec, TokenIndexer, load_prompt_set

INDEXER = TokenIndexer(clip_tokenizer())


def test_tokenizer_has_stable_diffusion_ids():
    assert clip_tokenizer()("a cat and a dog").input_ids == [49406, 320, 2368, 537, 320, 1929, 49407]


def test_subject_indices_match_attend_and_excite_convention():
    assert INDEXER.subject_indices(PromptSpec("p", "a cat and a dog", ("cat", "dog"))) == [[2], [5]]


def test_multi_piece_words_and_phrases():
    spec = PromptSpec("p", "a photo of an urial and a teddy bear", ("urial", "teddy bear"))
    assert INDEXER.subject_indices(spec) == [[5, 6], [9, 10]]


def test_repeated_words_take_successive_occurrences():
    assert INDEXER.subject_indices(PromptSpec("p", "a cat and a cat", ("cat", "cat"))) == [[2], [5]]


def test_groups_keep_each_noun_with_its_attribute():
    spec = PromptSpec("p", "a red car and a blue car", groups=(("blue", "car"), ("red", "car")))
    assert INDEXER.group_indices(spec) == [[[6], [7]], [[2], [3]]]


def test_word_not_in_prompt_names_the_prompt():
    with pytest.raises(PromptError, match="p7.*'horse'"):
        INDEXER.subject_indices(PromptSpec("p7", "a cat and a dog", ("cat", "horse")))


def test_prompt_past_77_tokens_is_an_error():
    long = "a cat " + "and a very fluffy dog " * 20
    with pytest.raises(PromptError, match="long-one.*more than the text encoder's 77"):
        INDEXER.subject_indices(PromptSpec("long-one", long, ("cat",)))


def test_loader_names_the_bad_row(tmp_path):
    path = tmp_path / "set.jsonl"
    rows = [{"id": "a", "prompt": "a cat", "subjects": ["cat"]}, {"id": "b", "prompt": "a dog", "subjects": "dog"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError, match=r"set.jsonl:2 \(b\): subjects"):
        load_prompt_set(path)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]))
    with pytest.raises(DatasetError, match="duplicate id 'a'"):
        load_prompt_set(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="set.jsonl:1: not valid JSON"):
        load_prompt_set(path)


def test_demo_set_resolves():
    from evalkit.paths import PROJECT_ROOT

    for spec in load_prompt_set(PROJECT_ROOT / "datasets" / "demo.jsonl"):
        assert len(INDEXER.subject_indices(spec)) == len(spec.subjects)
        INDEXER.group_indices(spec)


def test_exclude_leaves_rows_out_and_refuses_unknown_ids(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"id": "a", "prompt": "a cat"}\n{"id": "b", "prompt": "a dog"}\n')
    assert [s.id for s in load_prompt_set(path, exclude=["a"])] == ["b"]
    with pytest.raises(DatasetError, match="cannot exclude \\['c'\\]"):
        load_prompt_set(path, exclude=["c"])


def test_every_method_refuses_a_prompt_past_77_tokens():
    from evalkit.sampling.method import METHODS

    spec = PromptSpec("long", " ".join(["cat"] * 80))
    with pytest.raises(PromptError, match="'long' has 82 tokens"):
        METHODS.build({"name": "vanilla"}).preflight(spec, INDEXER)
