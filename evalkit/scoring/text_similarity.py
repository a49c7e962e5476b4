"""Text-text similarity as Attend-and-Excite computes it (metrics/blip_captioning_and_clip_similarity.py), used by
A&E, CONFORM and Separate-and-Enhance.

1. Caption each image with BLIP. A&E runs LAVIS `blip_caption`/`base_coco` with `generate()`'s defaults; we run
   transformers' `BlipForConditionalGeneration` with the same settings, written out below from LAVIS
   (lavis/models/blip_models/blip_caption.py, configs/models/blip_caption_base_coco.yaml):
   prompt "a picture of " (its [CLS] replaced by [DEC], its [SEP] dropped: transformers' BLIP generate does the
   same), beam search with 3 beams, max_length 30 and min_length 10 counting the prompt tokens, repetition
   penalty 1.0, no sampling; the caption is the decoded text without its first len(prompt) characters.
   Images: resized to 384x384 bicubic by PIL and normalised with CLIP's mean and std, as LAVIS's
   `blip_image_eval` (a torchvision Resize on a PIL image) does: hence transformers' PIL image processor.
2. Embed the caption with CLIP ViT-B/16 as given (no templates) and the prompt with the 80-template ensemble
   (evalkit.scoring.clip_score, the same model and code as the CLIP score), both unit norm.
3. Score = their raw cosine; A&E reports the mean (and std) over all images.

Differences from A&E: open_clip's ViT-B-16/openai in fp32 (A&E: the OpenAI clip package, fp16 on CUDA), and the
captioner checkpoint is transformers' conversion `Salesforce/blip-image-captioning-base` (BLIP ViT-B, CapFilt-L,
COCO captioning) rather than LAVIS's `blip_coco_caption_base.pth`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, BertTokenizer, BlipConfig, BlipForConditionalGeneration
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from evalkit.errors import ConfigError
from evalkit.models.loading import hub_weights_missing
from evalkit.scoring.base import ScoredImage, Scorer, register_scorer
from evalkit.scoring.clip_score import ClipScorer

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
TINY_MODEL_CONFIG = MODEL_CONFIGS / "tiny-blip.json"
TINY_VOCABULARY = MODEL_CONFIGS / "tiny-blip-vocab.txt"
METRIC = "text_similarity"

CAPTION_PROMPT = "a picture of "
# LAVIS BlipCaption.generate() defaults (beam search). Every setting is passed explicitly, so that neither a
# checkpoint's generation config nor transformers' defaults can change them.
GENERATION_SETTINGS = {
    "do_sample": False,
    "num_beams": 3,
    "max_length": 30,
    "min_length": 10,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
}


def _blip_tokenizer(vocabulary: dict[str, int]) -> BertTokenizer:
    """BERT's WordPiece tokenizer with BLIP's extra tokens, as LAVIS's BlipBase.init_tokenizer adds them."""
    tokenizer = BertTokenizer(vocab=vocabulary)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _build_tiny_captioner():
    config = BlipConfig(**json.loads(TINY_MODEL_CONFIG.read_text()))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    tokens = TINY_VOCABULARY.read_text().split()
    tokenizer = _blip_tokenizer({token: index for index, token in enumerate(tokens)})
    side = config.vision_config.image_size
    return model, BlipImageProcessorPil(size={"height": side, "width": side}), tokenizer


def _load_hub_captioner(hub_id: str, revision: str):
    try:
        image_processor = BlipImageProcessorPil.from_pretrained(hub_id, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(hub_id, revision=revision)
        model = BlipForConditionalGeneration.from_pretrained(hub_id, revision=revision)
    except OSError as error:  # huggingface_hub raises OSError subclasses for missing files and no network
        raise hub_weights_missing("scorer text_similarity", hub_id, revision, error) from None
    return model, image_processor, tokenizer


@register_scorer("text_similarity")
class TextSimilarityScorer(Scorer):
    metrics = {METRIC: True}

    def __init__(
        self,
        device: torch.device,
        captioner_hub_id: str,
        captioner_revision: str,
        clip_model: str = "ViT-B-16",
        clip_pretrained: str = "openai",
        tiny: bool = False,
        batch_size: int = 16,
    ):
        super().__init__(device)
        if batch_size < 1:
            raise ConfigError(f"scorer text_similarity: batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        if tiny:
            captioner, self.image_processor, self.tokenizer = _build_tiny_captioner()
            checkpoint = f"{TINY_MODEL_CONFIG.stem} (random weights, seed 0: a tiny stand-in, scores mean nothing)"
            clip_checkpoint = "tiny-clip (random weights)"
        else:
            captioner, self.image_processor, self.tokenizer = _load_hub_captioner(captioner_hub_id, captioner_revision)
            checkpoint = f"{captioner_hub_id}@{captioner_revision[:12]} (transformers, fp32)"
            clip_checkpoint = f"{clip_model}/{clip_pretrained} (open_clip, fp32)"
        self.captioner = captioner.to(device).eval()
        # The prompt side is the CLIP score's text embedding: same checkpoint, templates and code.
        self.clip = ClipScorer(device, model=clip_model, pretrained=clip_pretrained, tiny=tiny)
        size = self.image_processor.size
        self.name = (
            f"text_similarity: BLIP caption by {checkpoint}, {size['height']}x{size['width']} bicubic, "
            f"prompt {CAPTION_PROMPT!r}, beam search 3 beams, length 10-30; CLIP {clip_checkpoint} cosine of the "
            f"plain caption to the 80-template prompt"
        )

    @torch.no_grad()
    def captions(self, images: list) -> list[str]:
        """BLIP captions of PIL `images`, as LAVIS's BlipCaption.generate() makes them."""
        pixel_values = self.image_processor(images, return_tensors="pt").pixel_values.to(self.device)
        prompt_ids = self.tokenizer([CAPTION_PROMPT] * len(images), return_tensors="pt").input_ids.to(self.device)
        generated = self.captioner.generate(pixel_values=pixel_values, input_ids=prompt_ids, **GENERATION_SETTINGS)
        return [text[len(CAPTION_PROMPT) :] for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def update(self, items: list[ScoredImage]) -> None:
        """Score the items whose generation succeeded; failed generations have no image and get no rows."""
        scored = [item for item in items if item.record["status"] == "ok"]
        for item in scored:
            if item.image is None:
                raise ValueError(
                    f"text_similarity scorer needs images; {item.prompt_id} seed {item.seed} was passed without one"
                )
        with tqdm(total=len(scored), desc="text similarity", unit="image") as progress:
            for start in range(0, len(scored), self.batch_size):
                batch = scored[start : start + self.batch_size]
                caption_embeddings = self.clip.plain_text_embeddings(self.captions([item.image for item in batch]))
                for item, caption_embedding in zip(batch, caption_embeddings):
                    self._add_row(item, METRIC, float(caption_embedding @ self.clip.text_embedding(item.prompt)))
                progress.update(len(batch))
