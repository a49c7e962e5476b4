"""OWLv2 detection rate, the "Det.Rate" of Attention Regulation (Zhang et al. 2024), through transformers.

Attention Regulation released no evaluation code and its paper does not give the detector's settings, so these are
our choices (configuration, see conf/scorer/owlv2.yaml):
- detector: `google/owlv2-base-patch16-ensemble` with its own processor (pad to a square, resize to 960 px);
- text queries: the prompt's subject nouns (`subjects` in the dataset), each formatted with `query_template`
  (default "{}", the bare noun), a repeated subject queried once;
- a box counts for the query it scores highest on, with score sigmoid(max logit) above `threshold` (default 0.1):
  exactly transformers' `post_process_object_detection`, with no NMS;
- an image succeeds when every subject has at least one box.

Rows per image: `detection_rate` (1 or 0: every subject found) and, for each of its subjects,
`detection/<subject>` (1 or 0). Their means over images are the detection rate and the per-subject rates; one
metric per subject keeps one row per (image, metric), so paired differences against the baseline work unchanged.

The images of a batch that share their queries are run together: transformers pads shorter query lists of a batch
with " " queries that compete for the boxes, which would make an image's result depend on its batch neighbours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
)

from evalkit.errors import ConfigError, PromptError
from evalkit.models.loading import load_from_hub
from evalkit.models.tokenizer import clip_tokenizer
from evalkit.prompts import PromptSpec
from evalkit.records import RATE_METRIC, SUBJECT_METRIC_PREFIX
from evalkit.scoring.base import SCORERS, ScoredImage, Scorer

TINY_MODEL_CONFIG = Path(__file__).parent / "model_configs" / "tiny-owlv2.json"
# OWL-ViT and OWLv2 checkpoints tokenize queries into 16 positions padded with "!" (token id 0).
QUERY_LENGTH = 16
QUERY_PAD_TOKEN = "!"
FULL_SIZE_IMAGE_SIZE = 960  # google/owlv2-base-patch16-ensemble's config.json and Owlv2ImageProcessor's default


def unique_subjects(subjects: tuple[str, ...]) -> tuple[str, ...]:
    """The subjects in order, each once: one query per distinct noun."""
    return tuple(dict.fromkeys(subjects))


def subject_detections(subjects: tuple[str, ...], box_labels: list[int]) -> dict[str, bool]:
    """Whether each distinct subject has a box: `box_labels` are the query indices of the kept boxes."""
    found = set(box_labels)
    return {subject: index in found for index, subject in enumerate(unique_subjects(subjects))}


def _build_random(config: Owlv2Config) -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    """An OWLv2 of this architecture with seeded random weights, and its processor, built offline."""
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    side = config.vision_config.image_size
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": side, "width": side}),
        tokenizer=clip_tokenizer(QUERY_LENGTH, pad_token=QUERY_PAD_TOKEN),
    )
    return model, processor


def _build_tiny() -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    return _build_random(Owlv2Config(**json.loads(TINY_MODEL_CONFIG.read_text())))


def _build_full_size_random() -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    """owlv2-base-patch16-ensemble's architecture: Owlv2Config's defaults (ViT-B/16 vision, CLIP text) at the
    checkpoint's 960 px (the default, 768, is OWL-ViT's)."""
    return _build_random(Owlv2Config(vision_config={"image_size": FULL_SIZE_IMAGE_SIZE}))


def _load_hub(hub_id: str, revision: str) -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    processor = load_from_hub("scorer owlv2", hub_id, revision, lambda: Owlv2Processor.from_pretrained(hub_id, revision=revision))
    model = load_from_hub("scorer owlv2", hub_id, revision, lambda: Owlv2ForObjectDetection.from_pretrained(hub_id, revision=revision, use_safetensors=True))
    return model, processor


def _require_subjects(spec: PromptSpec) -> None:
    if not spec.subjects:
        raise PromptError(
            f"prompt {spec.id!r}: the owlv2 scorer queries the prompt's subject nouns, and it lists none; "
            f"add \"subjects\" to its dataset row: {spec.prompt!r}"
        )


@SCORERS.register
class Owlv2DetectionScorer(Scorer):
    name = "owlv2"
    metrics = {RATE_METRIC: True, SUBJECT_METRIC_PREFIX: True}

    def __init__(
        self,
        device: torch.device,
        hub_id: str,
        revision: str,
        threshold: float = 0.1,
        query_template: str = "{}",
        tiny: bool = False,
        batch_size: int = 16,
        random_weights: bool = False,
    ):
        super().__init__(device, batch_size)
        self.check_weights(tiny, random_weights)
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"scorer owlv2: threshold is a score in [0, 1), got {threshold}")
        if query_template.count("{}") != 1:
            raise ConfigError(f"scorer owlv2: query_template must contain one {{}} for the noun, got {query_template!r}")
        self.threshold = threshold
        self.query_template = query_template
        if tiny:
            model, self.processor = _build_tiny()
            checkpoint = f"{TINY_MODEL_CONFIG.stem} (random weights, seed 0: a tiny stand-in, detections mean nothing)"
        elif random_weights:
            model, self.processor = _build_full_size_random()
            checkpoint = f"{hub_id}'s architecture (random weights, seed 0, for timing only: detections mean nothing)"
        else:
            model, self.processor = _load_hub(hub_id, revision)
            checkpoint = f"{hub_id}@{revision[:12]} (transformers, fp32)"
        image_processor = self.processor.image_processor
        size = image_processor.size
        self.provenance = (
            f"owlv2 {checkpoint}, {type(image_processor).__name__}: pad to square + resize "
            f"{size['height']}x{size['width']}, "
            f"queries {query_template!r} per subject, box score > {threshold}, success = every subject detected"
        )
        self.model = model.to(device).eval()

    @classmethod
    def preflight(cls, params, methods, specs) -> None:
        for spec in specs:
            _require_subjects(spec)

    def queries(self, subjects: tuple[str, ...]) -> list[str]:
        return [self.query_template.format(subject) for subject in unique_subjects(subjects)]

    @torch.no_grad()
    def box_labels(self, images: list, queries: list[str]) -> list[list[int]]:
        """For each image, the query index of every box scoring above the threshold (all images share `queries`)."""
        inputs = self.processor(text=[queries] * len(images), images=images, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        detections = self.processor.image_processor.post_process_object_detection(outputs, threshold=self.threshold)
        return [detection["labels"].tolist() for detection in detections]

    def score_batch(self, items: list[ScoredImage]) -> None:
        """One model call per set of distinct subjects in the batch (see the module docstring)."""
        by_subjects: dict[tuple[str, ...], list[ScoredImage]] = {}
        for item in items:
            _require_subjects(PromptSpec(item.prompt_id, item.prompt, item.subjects))
            by_subjects.setdefault(unique_subjects(item.subjects), []).append(item)
        for subjects, group in by_subjects.items():
            for item, labels in zip(group, self.box_labels([item.image for item in group], self.queries(subjects))):
                found = subject_detections(subjects, labels)
                self._add_row(item, RATE_METRIC, float(all(found.values())))
                for subject, detected in found.items():
                    self._add_row(item, SUBJECT_METRIC_PREFIX + subject, float(detected))
