"""The shipped prompt sets: every row loads, and every annotated word is found in its prompt's tokens."""

import collections
import json

import pytest
from omegaconf import OmegaConf

from evalkit.errors import PromptError
from evalkit.models.tokenizer import clip_tokenizer
from evalkit.paths import PROJECT_ROOT
from evalkit.prompts import TokenIndexer, load_prompt_set

INDEXER = TokenIndexer(clip_tokenizer())
UPSTREAM = PROJECT_ROOT.parent / "shared" / "data" / "attend_and_excite" / "a.e_prompts.json"


# The sets in the repository; a config with `build` names a set the user builds from their own data.
DATASET_CONFIGS = [p for p in sorted((PROJECT_ROOT / "conf" / "dataset").glob("*.yaml")) if "build" not in OmegaConf.load(p)]


@pytest.mark.parametrize("config_path", DATASET_CONFIGS, ids=lambda p: p.stem)
def test_every_row_indexes(config_path):
    """Every row a dataset config uses fits the text encoder and its annotations are words of its prompt; what the
    config excludes is excluded for being too long."""
    config = OmegaConf.load(config_path)
    for spec in load_prompt_set(PROJECT_ROOT / config.path, exclude=config.get("exclude", ())):
        INDEXER.check_length(spec.id, spec.prompt)
        INDEXER.subject_indices(spec)
        INDEXER.group_indices(spec)
    excluded = {s.id: s for s in load_prompt_set(PROJECT_ROOT / config.path) if s.id in set(config.get("exclude", ()))}
    for spec in excluded.values():
        with pytest.raises(PromptError, match="more than the text encoder's 77"):
            INDEXER.check_length(spec.id, spec.prompt)


def test_every_prompt_set_has_a_config():
    configured = {OmegaConf.load(p).path for p in DATASET_CONFIGS}
    assert {f"datasets/{p.name}" for p in (PROJECT_ROOT / "datasets").glob("*.jsonl")} <= configured


def test_attend_and_excite_set_counts_and_positions():
    specs = load_prompt_set(PROJECT_ROOT / "datasets" / "attend_and_excite.jsonl")
    assert collections.Counter(s.extra["subset"] for s in specs) == {"animals": 66, "animals_objects": 144, "objects": 66}
    by_prompt = {s.prompt: s for s in specs}
    # A&E's own example: "a cat and a dog" -> token indices [2, 5]
    assert INDEXER.subject_indices(by_prompt["a cat and a dog"]) == [[2], [5]]
    groups = INDEXER.group_indices(by_prompt["a pink crown and a purple bow"])
    assert [len(g) for g in groups] == [2, 2] and groups[0][1][0] == groups[0][0][0] + 1  # colour right before noun
    assert sum("an elephant" in s.prompt for s in specs) == 23 and not any("a elephant" in s.prompt for s in specs)


@pytest.mark.skipif(not UPSTREAM.is_file(), reason="needs ../shared/data beside the checkout")
def test_attend_and_excite_set_is_the_upstream_file_verbatim():
    upstream = json.loads(UPSTREAM.read_text())
    ours = load_prompt_set(PROJECT_ROOT / "datasets" / "attend_and_excite.jsonl")
    assert [s.prompt for s in ours] == [p for subset in upstream.values() for p in subset]


PAPER = PROJECT_ROOT.parent / "shared" / "seeds" / "attention_regulation_2403.06381.txt"


def test_reference_numbers_parse_and_cover_table_1():
    import pandas as pd

    table = pd.read_csv(PROJECT_ROOT / "reports" / "references" / "attention_regulation_2403.06381.csv", dtype={"paper_text": str})
    percent = table.paper_text.str.endswith("%")
    parsed = table.paper_text.str.rstrip("%").astype(float).where(~percent, table.paper_text.str.rstrip("%").astype(float) / 100)
    assert (parsed - table.value).abs().max() < 1e-9
    # 6 methods x (3 metrics x 2 sets) - DenseDiffusion on A&E (3) - the original's LPIPS (2) + 5 overheads
    assert len(table) == 36 and not table.duplicated(["dataset", "method", "paper_metric"]).any()


@pytest.mark.skipif(not PAPER.is_file(), reason="needs ../shared/seeds beside the checkout")
def test_reference_numbers_are_the_papers_table_1_row_by_row():
    import pandas as pd

    table = pd.read_csv(PROJECT_ROOT / "reports" / "references" / "attention_regulation_2403.06381.csv", dtype={"paper_text": str})
    lines = PAPER.read_text().splitlines()
    rows = {line.split()[0]: line for line in lines[153:160] if line.strip()}
    for paper_method, cells in table.groupby("paper_method", sort=False):
        printed = rows[paper_method]
        position = 0
        for text in cells.paper_text:  # each cell in the printed row, in order
            position = printed.index(text, position) + len(text)
