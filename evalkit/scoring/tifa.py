"""TIFA (Hu et al., ICCV 2023) as tifascore computes it (Yushi-Hu/tifa@8e37050: tifa_score.py, vqa_models.py,
mc_sbert.py); CONFORM reports it.

Every prompt has multiple-choice questions about its caption (TIFA v1.0 question/answer JSON format). For each
question a VQA model answers freely; an answer that is one of the question's `choices` (exact string) is kept, any
other is mapped to the choice whose sentence embedding (all-mpnet-base-v2: mean pooling, L2 norm) has the highest
cosine with it. The question scores 1 when that choice equals the gold `answer`, else 0. Every entry of the file
counts, a repeated question as often as it occurs. Per image:

* `tifa`: the mean score over the caption's questions. Its mean over images is TIFA (mean over captions, not over
  questions; with several seeds per prompt each image is one caption sample).
* `tifa_<element type>` (e.g. `tifa_color`, `tifa_animal_human`): the mean score over the caption's questions of
  that type; no row where the caption has none. The report averages these over images; tifascore's
  `accuracy_by_type` pools the questions of all captions instead, which weighs a caption by its number of questions
  of the type (the two agree when every caption has equally many).

Questions link to prompts by id: a question's "id" is the prompt id and its "caption" must be the prompt, so a
question file cannot be paired with the wrong prompt set. A prompt without questions is an error before generation.
The VQA model is pluggable (evalkit/scoring/vqa.py). tifascore's default and recommended mPLUG-large needs
ModelScope, so evalkit's default is tifascore's "blip-large" option; its scores differ from mPLUG's, so compare
TIFA numbers only under the same VQA model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    MPNetConfig,
    MPNetModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from evalkit.errors import ConfigError, DatasetError, PromptError
from evalkit.models.loading import load_from_hub
from evalkit.models.wordpiece import tiny_wordpiece_tokenizer
from evalkit.paths import project_path
from evalkit.prompts import file_sha256
from evalkit.scoring.base import SCORERS, ScoredImage, Scorer
from evalkit.scoring.vqa import VQA_BACKENDS, bert_size_wordpiece_tokenizer

# TIFA's element types: tifascore's question generation keeps only these categories, with animal and human merged
# into "animal/human" (question_gen.py).
ELEMENT_TYPES = (
    "object", "animal/human", "food", "activity", "attribute", "counting", "color", "material", "spatial",
    "location", "shape", "other",
)
_REQUIRED_FIELDS = {"id": str, "caption": str, "question": str, "choices": list, "answer": str, "element_type": str}


def type_metric(element_type: str) -> str:
    """The row metric of one element type: "animal/human" -> "tifa_animal_human"."""
    return "tifa_" + element_type.replace("/", "_")


def load_questions(path: str | Path) -> dict[str, list[dict]]:
    """The entries of a TIFA question/answer JSON file grouped by text id, in file order; each entry validated."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"TIFA question file {path} does not exist; for TIFA v1.0, `python -m evalkit.tifa_questions --out {path}` "
            "downloads it"
        )
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"TIFA question file {path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"TIFA question file {path}: must be a non-empty JSON list of question entries")
    by_id: dict[str, list[dict]] = defaultdict(list)
    for number, entry in enumerate(entries):
        where = f"TIFA question file {path}, entry {number}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: must be an object")
        for field, kind in _REQUIRED_FIELDS.items():
            if not isinstance(entry.get(field), kind):
                raise DatasetError(f"{where} (id {entry.get('id')!r}): field {field!r} must be a {kind.__name__}")
        if not entry["choices"] or not all(isinstance(choice, str) for choice in entry["choices"]):
            raise DatasetError(f"{where} (id {entry['id']!r}): choices must be a non-empty list of strings")
        if entry["element_type"] not in ELEMENT_TYPES:
            raise DatasetError(
                f"{where} (id {entry['id']!r}): unknown element_type {entry['element_type']!r}; TIFA's are {list(ELEMENT_TYPES)}"
            )
        earlier = by_id[entry["id"]]
        if earlier and earlier[0]["caption"] != entry["caption"]:
            raise DatasetError(
                f"{where}: id {entry['id']!r} has two captions, {earlier[0]['caption']!r} and {entry['caption']!r}"
            )
        earlier.append(entry)
    return dict(by_id)


def questions_for(questions: Mapping[str, list[dict]], source: Path, prompt_id: str, prompt: str) -> list[dict]:
    """The questions of one prompt; an error when there are none or they are about another caption."""
    if prompt_id not in questions:
        raise PromptError(
            f"prompt {prompt_id!r} ({prompt!r}) has no TIFA questions in {source}; TIFA needs questions for every "
            f"prompt, as entries whose \"id\" is the prompt id"
        )
    caption = questions[prompt_id][0]["caption"]
    if caption.strip() != prompt.strip():
        raise PromptError(
            f"prompt {prompt_id!r}: its TIFA questions in {source} are about the caption {caption!r}, not the "
            f"prompt {prompt!r}"
        )
    return questions[prompt_id]


@dataclass(frozen=True)
class TifaResult:
    """tifascore's per-caption outputs: caption_scores and accuracy_by_type as in `tifa_score_benchmark`'s result,
    question_details[text id][question] = the entry plus free_form_vqa, multiple_choice_vqa and scores."""

    caption_scores: dict[str, float]
    accuracy_by_type: dict[str, float]
    question_details: dict[str, dict[str, dict]]


def score_answers(
    entries: Sequence[dict], free_form_answers: Sequence[str], to_choice: Callable[[str, list[str]], str]
) -> TifaResult:
    """Score the VQA model's free-form answer to each question entry as tifascore does.

    `to_choice(answer, choices)` is asked only for answers that are not one of the choices. A repeated question of
    a caption scores each time; its details keep the first entry's fields and the last answers.
    """
    if len(entries) != len(free_form_answers):
        raise ValueError(f"{len(entries)} questions but {len(free_form_answers)} answers")
    scores: dict[str, list[int]] = defaultdict(list)
    type_scores: dict[str, list[int]] = defaultdict(list)
    details: dict[str, dict[str, dict]] = defaultdict(dict)
    for entry, free_form in zip(entries, free_form_answers):
        choice = free_form if free_form in entry["choices"] else to_choice(free_form, entry["choices"])
        score = int(choice == entry["answer"])
        detail = details[entry["id"]].setdefault(entry["question"], dict(entry))
        detail.update(free_form_vqa=free_form, multiple_choice_vqa=choice, scores=score)
        scores[entry["id"]].append(score)
        type_scores[entry["element_type"]].append(score)
    return TifaResult(
        caption_scores={text_id: mean(values) for text_id, values in scores.items()},
        accuracy_by_type={element_type: mean(values) for element_type, values in type_scores.items()},
        question_details=dict(details),
    )


class NearestChoice:
    """Maps a free-form answer to the choice nearest in sentence-embedding cosine, as tifascore's SBERTModel does
    (mc_sbert.py): the checkpoint through transformers' AutoModel, mean pooling over the attention mask, L2 norm;
    the answer and the choices embedded in separate calls; the first choice on ties. That is what the
    sentence-transformers library computes for all-mpnet-base-v2 (Transformer, mean Pooling, Normalize)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings, shape (len(texts), hidden_size)."""
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        token_embeddings = self.model(**encoded)[0]
        mask = encoded["attention_mask"].unsqueeze(-1).to(token_embeddings.dtype)
        pooled = (token_embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def __call__(self, answer: str, choices: list[str]) -> str:
        similarities = self.embed(choices) @ self.embed([answer])[0]
        return choices[int(torch.argmax(similarities))]


def tiny_sentence_encoder(seed: int = 0) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """A tiny seeded BERT and its WordPiece tokenizer, built offline: the stand-in for all-mpnet-base-v2."""
    tokenizer = tiny_wordpiece_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False), tokenizer


def full_size_random_sentence_encoder(seed: int = 0) -> tuple[MPNetModel, PreTrainedTokenizerBase]:
    """all-mpnet-base-v2's architecture (MPNet-base: MPNetConfig's defaults, with the checkpoint's 514 positions
    and its tokenizer's 512-token truncation) with seeded random weights and a BERT-size WordPiece tokenizer, built
    offline: for timing only."""
    tokenizer = bert_size_wordpiece_tokenizer(model_max_length=512)
    torch.manual_seed(seed)
    config = MPNetConfig(max_position_embeddings=514)
    return MPNetModel(config, add_pooling_layer=False), tokenizer


def _answer_mapper(
    config: Mapping[str, Any], device: torch.device, tiny: bool, random_weights: bool
) -> tuple[NearestChoice, str]:
    unknown = sorted(set(config) - {"hub_id", "revision"})
    if unknown:
        raise ConfigError(f"scorer tifa: unknown answer_mapper parameters {unknown}; it takes hub_id, revision")
    if tiny:
        return NearestChoice(*tiny_sentence_encoder(), device), "tiny SBERT (random weights, seed 0)"
    hub_id, revision = config["hub_id"], config["revision"]
    if random_weights:
        encoder = NearestChoice(*full_size_random_sentence_encoder(), device)
        return encoder, f"SBERT {hub_id}'s architecture (random weights, seed 0)"
    what = "scorer tifa (answer mapper)"
    model = load_from_hub(what, hub_id, revision, lambda: AutoModel.from_pretrained(hub_id, revision=revision, use_safetensors=True))
    tokenizer = load_from_hub(what, hub_id, revision, lambda: AutoTokenizer.from_pretrained(hub_id, revision=revision))
    return NearestChoice(model, tokenizer, device), f"SBERT {hub_id}@{revision[:7]} (mean pooling)"


def _questions_path(questions: str | None) -> Path:
    if not questions:
        raise ConfigError(
            "scorer tifa: no question file; set scorers.tifa.questions (or the dataset's tifa_questions) to a file "
            "in the TIFA v1.0 question/answer format"
        )
    return project_path(questions)


@SCORERS.register
class TifaScorer(Scorer):
    name = "tifa"
    metrics = {"tifa": True, **{type_metric(element_type): True for element_type in ELEMENT_TYPES}}

    def __init__(
        self,
        device: torch.device,
        questions: str | None,
        vqa: Mapping[str, Any],
        answer_mapper: Mapping[str, Any],
        tiny: bool = False,
        batch_size: int = 32,
        random_weights: bool = False,
    ):
        super().__init__(device, batch_size)
        self.check_weights(tiny, random_weights)
        self.questions_path = _questions_path(questions)
        self.questions = load_questions(self.questions_path)
        self.vqa = VQA_BACKENDS.build(vqa, device=device, batch_size=batch_size, tiny=tiny, random_weights=random_weights)
        self.to_choice, mapper_name = _answer_mapper(answer_mapper, device, tiny, random_weights)
        self.provenance = (
            f"tifa {self.vqa.provenance}; free-form answers to choices by {mapper_name} cosine; questions "
            f"{self.questions_path.name} (sha256 {file_sha256(self.questions_path)[:12]})"
        )
        if tiny:
            self.provenance += " (tiny stand-ins: scores mean nothing)"
        if random_weights:
            self.provenance += " (random weights, for timing only: scores mean nothing)"

    @classmethod
    def preflight(cls, params, methods, specs) -> None:
        path = _questions_path(params.get("questions"))
        questions = load_questions(path)
        for spec in specs:
            questions_for(questions, path, spec.id, spec.prompt)

    def score_batch(self, items: list[ScoredImage]) -> None:
        """The questions of the batch's images go to the VQA model together (it batches them by `batch_size`)."""
        item_entries = [questions_for(self.questions, self.questions_path, item.prompt_id, item.prompt) for item in items]
        images = [item.image for item, entries in zip(items, item_entries) for _ in entries]
        answers = iter(self.vqa.answer(images, [entry["question"] for entries in item_entries for entry in entries]))
        for item, entries in zip(items, item_entries):
            result = score_answers(entries, [next(answers) for _ in entries], self.to_choice)
            self._add_row(item, "tifa", result.caption_scores[item.prompt_id])
            for element_type, accuracy in result.accuracy_by_type.items():
                self._add_row(item, type_metric(element_type), accuracy)
