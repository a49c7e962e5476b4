"""Text-text similarity as Attend-and-Excite computes it (metrics/blip_captioning_and_clip_similarity.py), used by
A&E, CONFORM and Separate-and-Enhance.

1. Caption each image with BLIP. A&E runs LAVIS `blip_caption`/`base_coco` with `generate()`'s defaults
   (lavis/models/blip_models/blip_caption.py, configs/models/blip_caption_base_coco.yaml): prompt "a picture of "
   (its [CLS] replaced by [DEC], its closing [SEP] dropped), beam search with 3 beams, max_length 30 and
   min_length 10 counting the prompt tokens, repetition penalty 1.0, no sampling; the caption is the decoded text
   without its first len(prompt) characters. We run transformers' `BlipForConditionalGeneration` model with that
   beam search written out as transformers 4.33 (LAVIS's pinned version) ran it (`lavis_beam_search`: newer
   transformers rank finished beams differently). Images: resized to 384x384 bicubic by PIL and normalised with
   CLIP's mean and std, as LAVIS's `blip_image_eval` (a torchvision Resize on a PIL image) does: hence
   transformers' PIL image processor.
2. Embed the caption with CLIP ViT-B/16 as given (no templates) and the prompt with the 80-template ensemble
   (evalkit.scoring.clip, the same model and code as the CLIP score), both unit norm.
3. Score = their raw cosine; A&E reports the mean (and std) over all images.

Differences from A&E: open_clip's ViT-B-16/openai in fp32 (A&E: the OpenAI clip package, fp16 on CUDA), and the
captioner checkpoint is the hub's `Salesforce/blip-image-captioning-base` (BLIP ViT-B, CapFilt-L, COCO captioning,
converted to transformers) rather than the file LAVIS downloads, `blip_coco_caption_base.pth`; whether their
weights are identical was not checked (no network here).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from evalkit.models.loading import load_from_hub
from evalkit.scoring.base import SCORERS, ScoredImage, Scorer
from evalkit.scoring.clip import ClipScorer
from evalkit.scoring.vqa import bert_size_wordpiece_tokenizer

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
TINY_MODEL_CONFIG = MODEL_CONFIGS / "tiny-blip.json"
TINY_VOCABULARY = MODEL_CONFIGS / "tiny-blip-vocab.txt"
METRIC = "text_similarity"

CAPTION_PROMPT = "a picture of "
# LAVIS BlipCaption.generate() defaults: beam search, no sampling, repetition penalty 1.0 (no penalty).
NUM_BEAMS = 3
MAX_LENGTH = 30  # tokens, counting the prompt's
MIN_LENGTH = 10


class _Hypotheses:
    """The finished captions of one image, as transformers 4.33's BeamHypotheses keeps them (length penalty 1,
    early_stopping False): score = sum of log-probabilities / number of tokens, prompt included, end token not."""

    def __init__(self, num_beams: int):
        self.num_beams = num_beams
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def add(self, tokens: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / tokens.shape[-1]
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, index) for index, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        return len(self.beams) >= self.num_beams and self.worst_score >= best_sum_logprobs / length

    def best(self) -> torch.Tensor:
        return sorted(self.beams, key=lambda beam: beam[0])[-1][1]


@torch.no_grad()
def lavis_beam_search(
    captioner: BlipForConditionalGeneration, pixel_values: torch.Tensor, prompt_ids: torch.Tensor,
    sep_token_id: int, pad_token_id: int,
) -> list[torch.Tensor]:
    """BLIP captions by beam search exactly as LAVIS ran it, on transformers 4.33 (the version LAVIS pins).

    transformers >= 4.36 divides a finished beam's log-probability by its generated length without the prompt
    (and with the end token) instead of by its whole length without the end token; that changes which caption
    wins whenever beams end at different lengths (12 of 24 tiny-model images in our check), so the search is
    written out here, step for step as transformers 4.33's beam_search with BeamSearchScorer: top 2 x beams
    continuations, an end token only counted from the top `NUM_BEAMS` ranks, end token banned below
    `MIN_LENGTH`. It recomputes the decoder over the whole sequence at each step (no key/value cache).
    Returns each image's best token sequence, prompt included, end token excluded.
    """
    batch_size = pixel_values.shape[0]
    image_embeds = captioner.vision_model(pixel_values=pixel_values)[0].repeat_interleave(NUM_BEAMS, dim=0)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    # LAVIS: the prompt's [CLS] becomes [DEC] (the decoder's start token) and its closing [SEP] is dropped.
    input_ids = prompt_ids.clone()
    input_ids[:, 0] = captioner.config.text_config.bos_token_id
    input_ids = input_ids[:, :-1].repeat_interleave(NUM_BEAMS, dim=0)
    beam_scores = torch.zeros(batch_size, NUM_BEAMS, device=input_ids.device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: only the first one may expand at the first step
    beam_scores = beam_scores.view(-1)
    hypotheses = [_Hypotheses(NUM_BEAMS) for _ in range(batch_size)]
    done = [False] * batch_size
    while True:
        length = input_ids.shape[-1]
        logits = captioner.text_decoder(
            input_ids=input_ids, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
        ).logits[:, -1, :]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if length < MIN_LENGTH:
            log_probs[:, sep_token_id] = -float("inf")
        vocab_size = log_probs.shape[-1]
        candidates = (log_probs + beam_scores[:, None]).view(batch_size, NUM_BEAMS * vocab_size)
        top_scores, top_ids = torch.topk(candidates, 2 * NUM_BEAMS, dim=1, largest=True, sorted=True)
        next_scores = torch.zeros(batch_size, NUM_BEAMS, device=input_ids.device)
        next_tokens = torch.full((batch_size, NUM_BEAMS), pad_token_id, dtype=torch.long, device=input_ids.device)
        next_sources = torch.zeros(batch_size, NUM_BEAMS, dtype=torch.long, device=input_ids.device)
        for image in range(batch_size):
            if done[image]:
                continue
            kept = 0
            for rank, (score, flat_id) in enumerate(zip(top_scores[image].tolist(), top_ids[image].tolist())):
                source = image * NUM_BEAMS + flat_id // vocab_size
                token = flat_id % vocab_size
                if token == sep_token_id:
                    if rank < NUM_BEAMS:
                        hypotheses[image].add(input_ids[source].clone(), score)
                else:
                    next_scores[image, kept], next_tokens[image, kept], next_sources[image, kept] = score, token, source
                    kept += 1
                if kept == NUM_BEAMS:
                    break
            done[image] = done[image] or hypotheses[image].is_done(top_scores[image].max().item(), length)
        beam_scores = next_scores.view(-1)
        input_ids = torch.cat([input_ids[next_sources.view(-1)], next_tokens.view(-1, 1)], dim=-1)
        if all(done) or input_ids.shape[-1] >= MAX_LENGTH:
            break
    for image in range(batch_size):
        if not done[image]:
            for beam in range(image * NUM_BEAMS, (image + 1) * NUM_BEAMS):
                hypotheses[image].add(input_ids[beam], beam_scores[beam].item())
    return [image_hypotheses.best() for image_hypotheses in hypotheses]


def _blip_tokenizer(vocabulary: dict[str, int]) -> BertTokenizer:
    """BERT's WordPiece tokenizer with BLIP's extra tokens, as LAVIS's BlipBase.init_tokenizer adds them."""
    tokenizer = BertTokenizer(vocab=vocabulary)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _build_random_captioner(config: BlipConfig, tokenizer: BertTokenizer):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    side = config.vision_config.image_size
    return model, BlipImageProcessorPil(size={"height": side, "width": side}), tokenizer


def _build_tiny_captioner():
    tokens = TINY_VOCABULARY.read_text().split()
    tokenizer = _blip_tokenizer({token: index for index, token in enumerate(tokens)})
    return _build_random_captioner(BlipConfig(**json.loads(TINY_MODEL_CONFIG.read_text())), tokenizer)


def _build_full_size_random_captioner():
    """blip-image-captioning-base's architecture: BlipConfig's defaults (ViT-B/16 at 384 px, BERT-base decoder,
    BERT's vocabulary with [DEC] and [ENC]), seeded random weights and an offline BERT-size WordPiece tokenizer."""
    return _build_random_captioner(BlipConfig(), _blip_tokenizer(bert_size_wordpiece_tokenizer().get_vocab()))


def _load_hub_captioner(hub_id: str, revision: str):
    what = "scorer text_similarity"
    image_processor = load_from_hub(what, hub_id, revision, lambda: BlipImageProcessorPil.from_pretrained(hub_id, revision=revision))
    tokenizer = load_from_hub(what, hub_id, revision, lambda: AutoTokenizer.from_pretrained(hub_id, revision=revision))
    model = load_from_hub(what, hub_id, revision, lambda: BlipForConditionalGeneration.from_pretrained(hub_id, revision=revision, use_safetensors=True))
    return model, image_processor, tokenizer


@SCORERS.register
class TextSimilarityScorer(Scorer):
    name = "text_similarity"
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
        random_weights: bool = False,
    ):
        super().__init__(device, batch_size)
        self.check_weights(tiny, random_weights)
        if tiny:
            captioner, self.image_processor, self.tokenizer = _build_tiny_captioner()
            checkpoint = f"{TINY_MODEL_CONFIG.stem} (random weights, seed 0: a tiny stand-in, scores mean nothing)"
            clip_checkpoint = "tiny-clip (random weights)"
        elif random_weights:
            captioner, self.image_processor, self.tokenizer = _build_full_size_random_captioner()
            checkpoint = f"{captioner_hub_id}'s architecture (random weights, seed 0, for timing only: scores mean nothing)"
            clip_checkpoint = f"{clip_model} as {clip_pretrained} (random weights)"
        else:
            captioner, self.image_processor, self.tokenizer = _load_hub_captioner(captioner_hub_id, captioner_revision)
            checkpoint = f"{captioner_hub_id}@{captioner_revision[:12]} (transformers, fp32)"
            clip_checkpoint = f"{clip_model}/{clip_pretrained} (open_clip, fp32)"
        self.captioner = captioner.to(device).eval()
        # The prompt side is the CLIP score's text embedding: same checkpoint, templates and code.
        self.clip = ClipScorer(
            device, model=clip_model, pretrained=clip_pretrained, tiny=tiny, random_weights=random_weights
        )
        size = self.image_processor.size
        self.provenance = (
            f"text_similarity: BLIP caption by {checkpoint}, {size['height']}x{size['width']} bicubic, "
            f"prompt {CAPTION_PROMPT!r}, LAVIS beam search ({NUM_BEAMS} beams, {MIN_LENGTH}-{MAX_LENGTH} tokens); CLIP {clip_checkpoint} cosine of the "
            f"plain caption to the 80-template prompt"
        )

    def captions(self, images: list) -> list[str]:
        """BLIP captions of PIL `images`, as LAVIS's BlipCaption.generate() makes them."""
        pixel_values = self.image_processor(images, return_tensors="pt").pixel_values.to(self.device)
        prompt_ids = self.tokenizer([CAPTION_PROMPT] * len(images), return_tensors="pt").input_ids.to(self.device)
        text = self.captioner.config.text_config
        best = lavis_beam_search(self.captioner, pixel_values, prompt_ids, text.sep_token_id, text.pad_token_id)
        return [self.tokenizer.decode(tokens, skip_special_tokens=True)[len(CAPTION_PROMPT) :] for tokens in best]

    def score_batch(self, items: list[ScoredImage]) -> None:
        caption_embeddings = self.clip.plain_text_embeddings(self.captions([item.image for item in items]))
        for item, caption_embedding in zip(items, caption_embeddings):
            self._add_row(item, METRIC, float(caption_embedding @ self.clip.text_embedding(item.prompt)))
