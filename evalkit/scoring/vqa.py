"""Visual question answering backends for TIFA: free-form answers to (image, question) pairs.

A backend is registered under a name and chosen by the TIFA scorer's `vqa.backend`. TIFA's own default, mPLUG-large,
runs only through ModelScope (plus fairseq), which evalkit does not depend on; `blip` is tifascore's "blip-large"
option (vqa_models.py, class BLIP) through transformers. Another model (mPLUG, GIT, ...) is one more
`@VQA_BACKENDS.register` class with the same `from_params` and `answer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from typing import ClassVar

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipProcessor,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from evalkit.errors import ConfigError
from evalkit.models.loading import load_from_hub
from evalkit.models.wordpiece import SPECIAL_TOKENS, tiny_wordpiece_tokenizer
from evalkit.registry import Registry


class VQABackend(ABC):
    """Answers questions about images; `name`: its registry key (a TIFA config's `vqa.backend`); `provenance`: which
    model, checkpoint and decoding."""

    name: ClassVar[str]
    provenance: str

    @classmethod
    @abstractmethod
    def from_params(cls, device: torch.device, batch_size: int, tiny: bool, random_weights: bool = False,
                    **params) -> VQABackend:
        """The backend its config's parameters describe, its tiny seeded stand-in, or (with `random_weights`) its
        full-size architecture with seeded random weights, for timing."""

    @abstractmethod
    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """The free-form answer to each (images[i], questions[i])."""


VQA_BACKENDS: Registry[VQABackend] = Registry("vqa backend", __name__, key_field="backend")


BERT_VOCABULARY_SIZE = 30522  # bert-base-uncased's, which BLIP's and MPNet's tokenizers extend


def bert_size_wordpiece_tokenizer(extra_tokens: tuple[str, ...] = (), **kwargs) -> BertTokenizer:
    """The tiny WordPiece tokenizer padded with "[unused<i>]" tokens to BERT's vocabulary size, then
    `extra_tokens`: offline, and sized like the real vocabulary for full-size random-weight models."""
    fillers = tuple(f"[unused{i}]" for i in range(BERT_VOCABULARY_SIZE - len(tiny_wordpiece_tokenizer())))
    return tiny_wordpiece_tokenizer(fillers + tuple(extra_tokens), **kwargs)


# The tiny BLIP: BLIP's layout (ViT image encoder, BERT question encoder and answer decoder) at toy sizes, with
# 32 px images so that a CPU test runs in seconds. BlipVisionConfig's default initializer_range (1e-10) would make
# answers ignore the image, and BERT's 0.02 makes a random decoder give one answer to every question; these
# ranges make answers differ between images and questions.
TINY_BLIP_IMAGE_SIZE = 32
TINY_BLIP_DECODER_START = "[DEC]"  # BLIP's bos token, the answer decoder's first input


def _random_blip(
    tokenizer: BertTokenizer, text_config: dict, vision_config: dict, seed: int = 0
) -> tuple[BlipForQuestionAnswering, BlipProcessor]:
    """A BLIP VQA model with seeded random weights whose special token ids are `tokenizer`'s."""
    text_config = dict(
        text_config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"), sep_token_id=SPECIAL_TOKENS.index("[SEP]"),
    )
    torch.manual_seed(seed)
    config = BlipConfig(text_config=text_config, vision_config=vision_config)
    model = BlipForQuestionAnswering(config)
    side = config.vision_config.image_size
    image_processor = BlipImageProcessorPil(size={"height": side, "width": side})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _tiny_blip(seed: int = 0) -> tuple[BlipForQuestionAnswering, BlipProcessor]:
    tokenizer = tiny_wordpiece_tokenizer((TINY_BLIP_DECODER_START,), bos_token=TINY_BLIP_DECODER_START)
    text_config = dict(
        hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.2,
    )
    vision_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=TINY_BLIP_IMAGE_SIZE, patch_size=8, initializer_range=0.02,
    )
    return _random_blip(tokenizer, text_config, vision_config, seed)


def _full_size_random_blip() -> tuple[BlipForQuestionAnswering, BlipProcessor]:
    """Salesforce/blip-vqa-capfilt-large's architecture: its config.json sets no sizes, so BlipConfig's defaults
    (ViT-B/16 at 384 px, BERT-base text encoder and decoder; "capfilt-large" names the bootstrapped training data,
    not the backbone)."""
    # BERT's vocabulary and [DEC]: one token short of BlipTextConfig's default 30524, which counts [ENC] (unused here)
    tokenizer = bert_size_wordpiece_tokenizer((TINY_BLIP_DECODER_START,), bos_token=TINY_BLIP_DECODER_START)
    return _random_blip(tokenizer, {}, {})


@VQA_BACKENDS.register
class BlipVQA(VQABackend):
    """BLIP VQA as tifascore runs it: processor(image, question), greedy `generate(max_length=50)`, special
    tokens dropped from the decoded answer; fp32, PIL image preprocessing (transformers 4's processor).

    tifascore asks one question at a time. BLIP's answer decoder cross-attends to every position of the encoded
    question, padding included, so padded batches would change answers: questions are batched only with questions
    of the same token length.
    """

    name = "blip"

    def __init__(self, model: BlipForQuestionAnswering, processor: BlipProcessor, provenance: str,
                 device: torch.device, max_length: int, batch_size: int):
        self.model = model.to(device).eval()
        self.processor = processor
        self.provenance = provenance
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def from_params(cls, device: torch.device, batch_size: int, tiny: bool, random_weights: bool = False,
                    hub_id: str | None = None, revision: str | None = None, max_length: int = 50) -> BlipVQA:
        max_length = int(max_length)
        if tiny:
            model, processor = _tiny_blip()
            provenance = f"tiny BLIP VQA (random weights, seed 0: a stand-in, answers mean nothing), greedy, max_length {max_length}"
            return cls(model, processor, provenance, device, max_length, batch_size)
        if hub_id is None or revision is None:
            raise ConfigError("scorer tifa: the blip vqa backend needs hub_id and revision")
        if random_weights:
            model, processor = _full_size_random_blip()
            provenance = (
                f"BLIP VQA {hub_id}'s architecture (random weights, seed 0, for timing only: answers mean nothing), "
                f"greedy, max_length {max_length}"
            )
            return cls(model, processor, provenance, device, max_length, batch_size)
        what = "scorer tifa (vqa)"
        model = load_from_hub(what, hub_id, revision, lambda: BlipForQuestionAnswering.from_pretrained(hub_id, revision=revision, use_safetensors=True))
        processor = load_from_hub(what, hub_id, revision, lambda: BlipProcessor(
            image_processor=BlipImageProcessorPil.from_pretrained(hub_id, revision=revision),
            tokenizer=AutoTokenizer.from_pretrained(hub_id, revision=revision),
        ))
        provenance = f"BLIP VQA {hub_id}@{revision[:7]} (transformers, fp32), greedy, max_length {max_length}"
        return cls(model, processor, provenance, device, max_length, batch_size)

    @torch.no_grad()
    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, question in enumerate(questions):
            by_length[len(self.processor.tokenizer(question).input_ids)].append(index)
        answers: list[str | None] = [None] * len(questions)
        for indices in by_length.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                inputs = self.processor(
                    images=[images[i].convert("RGB") for i in chunk], text=[questions[i] for i in chunk],
                    return_tensors="pt",
                ).to(self.device)
                generated = self.model.generate(**inputs, max_length=self.max_length)
                for i, text in zip(chunk, self.processor.batch_decode(generated, skip_special_tokens=True)):
                    answers[i] = text
        return answers
