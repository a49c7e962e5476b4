"""CLIP score as Attend-and-Excite computes it (metrics/compute_clip_similarity.py), through open_clip.

Text: the prompt formatted into the 80 ImageNet templates, with A&E's "a a" -> "a" and "the a" -> "a" fixes, each
embedding L2-normalised, averaged and renormalised. Image: open_clip's own preprocess, embedding L2-normalised.
Score: the raw cosine (no x100, no clamp), so values are around 0.3 for ViT-B-16/openai.
`clip_full` uses the whole prompt; `clip_min_object` is min(cosine to first half, cosine to second half) with the
prompt split on " and ", else on " with " (NaN when it has neither, where A&E skips the prompt).
A&E ran the OpenAI `clip` package, in fp16 on CUDA; this runs fp32.
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from evalkit.errors import ConfigError, MissingWeightsError
from evalkit.scoring.base import SCORERS, ScoredImage, Scorer

TINY_MODEL_CONFIG = Path(__file__).parent / "model_configs" / "tiny-clip.json"
TINY_MODEL_NAME = TINY_MODEL_CONFIG.stem


def template_texts(text: str) -> list[str]:
    """The 80 ImageNet-template texts for `text`, with A&E's article fixes (same templates, same order as A&E)."""
    texts = [template(text) for template in OPENAI_IMAGENET_TEMPLATES]
    return [t.replace("a a", "a").replace("the a", "a") for t in texts]


def split_prompt(prompt: str) -> tuple[str, str] | None:
    """A&E's two halves: split on " and ", else on " with "; None when neither occurs.

    As in A&E only the first two parts count, so "a cat and a dog and a frog" gives ("a cat", "a dog").
    """
    for separator in (" and ", " with "):
        if separator in prompt:
            parts = prompt.split(separator)
            return parts[0], parts[1]
    return None


def register_tiny_model_config() -> None:
    """Make the tiny config known to open_clip under its file stem (once per process)."""
    if TINY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(TINY_MODEL_CONFIG)


def _check_model_name(model_name: str) -> None:
    if model_name not in open_clip.list_models():
        raise ConfigError(f"scorer clip: unknown open_clip model {model_name!r}; see open_clip.list_models()")


def _load_pretrained(model_name: str, pretrained: str):
    _check_model_name(model_name)
    pretrained_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not pretrained_cfg:
        raise ConfigError(
            f"scorer clip: unknown checkpoint {pretrained!r} for {model_name}; "
            f"choose from {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    # Fetch (or find in the cache) the checkpoint first, so that a missing file surfaces as its own exception
    # (huggingface_hub's errors wrapped in FileNotFoundError, urllib's URLError: both OSError) rather than the
    # RuntimeError create_model_and_transforms raises for every kind of failure.
    try:
        open_clip.download_pretrained(pretrained_cfg)
    except OSError:
        hub_repo = pretrained_cfg.get("hf_hub", "").split("/")[:2]
        how_to_get = (
            f"run `hf download {'/'.join(hub_repo)}` on a machine with network and copy the cache (HF_HOME) here"
            if len(hub_repo) == 2
            else f"download {pretrained_cfg.get('url')} on a machine with network and copy it here"
        )
        raise MissingWeightsError(
            f"scorer clip: open_clip weights {model_name}/{pretrained} are not in the local cache and cannot be "
            f"downloaded here; {how_to_get}"
        ) from None
    # open_clip only warns when the architecture's activation differs from the one the checkpoint was trained
    # with (OpenAI's checkpoints use QuickGELU, the plain "ViT-B-16" config GELU); follow the checkpoint.
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, force_quick_gelu=bool(pretrained_cfg.get("quick_gelu", False))
    )
    return model, preprocess


def _build_random(model_name: str, quick_gelu: bool = False):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    return model, preprocess


def _build_tiny():
    register_tiny_model_config()
    return _build_random(TINY_MODEL_NAME)


def _build_full_size_random(model_name: str, pretrained: str):
    """The architecture the checkpoint `pretrained` has (its activation included), with seeded random weights."""
    _check_model_name(model_name)
    quick_gelu = bool((open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get("quick_gelu", False))
    return _build_random(model_name, quick_gelu)


@SCORERS.register
class ClipScorer(Scorer):
    name = "clip"
    metrics = {"clip_full": True, "clip_min_object": True}

    def __init__(
        self,
        device: torch.device,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        tiny: bool = False,
        batch_size: int = 32,
        random_weights: bool = False,
    ):
        super().__init__(device, batch_size)
        self.check_weights(tiny, random_weights)
        if tiny:
            clip_model, self.preprocess = _build_tiny()
            self.tokenizer = open_clip.get_tokenizer(TINY_MODEL_NAME)
            self.provenance = (
                f"clip {TINY_MODEL_NAME} (random weights, seed 0: a tiny stand-in, scores mean nothing), "
                f"80 ImageNet templates, raw cosine"
            )
        elif random_weights:
            clip_model, self.preprocess = _build_full_size_random(model, pretrained)
            self.tokenizer = open_clip.get_tokenizer(model)
            self.provenance = (
                f"clip {model} as {pretrained} (random weights, seed 0, for timing only: scores mean nothing), "
                f"80 ImageNet templates, raw cosine"
            )
        else:
            clip_model, self.preprocess = _load_pretrained(model, pretrained)
            self.tokenizer = open_clip.get_tokenizer(model)
            self.provenance = f"clip {model}/{pretrained} (open_clip, fp32), 80 ImageNet templates, raw cosine"
        self.model = clip_model.to(device).eval()
        self._text_embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        """The template-ensemble embedding of `text`, unit norm, shape (embed_dim,); cached per text."""
        if text not in self._text_embeddings:
            mean_embedding = self.plain_text_embeddings(template_texts(text)).mean(dim=0)
            self._text_embeddings[text] = mean_embedding / mean_embedding.norm()
        return self._text_embeddings[text]

    @torch.no_grad()
    def plain_text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings of `texts` as given (no templates), shape (len(texts), embed_dim)."""
        embeddings = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def image_embeddings(self, images: list) -> torch.Tensor:
        """Unit-norm embeddings of PIL `images`, shape (len(images), embed_dim)."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        embeddings = self.model.encode_image(pixels).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    def score_batch(self, items: list[ScoredImage]) -> None:
        image_embeddings = self.image_embeddings([item.image for item in items])
        for item, image_embedding in zip(items, image_embeddings):
            self._add_row(item, "clip_full", self._cosine(image_embedding, item.prompt))
            self._add_row(item, "clip_min_object", self._min_object(image_embedding, item.prompt))

    def _cosine(self, image_embedding: torch.Tensor, text: str) -> float:
        return float(image_embedding @ self.text_embedding(text))

    def _min_object(self, image_embedding: torch.Tensor, prompt: str) -> float:
        halves = split_prompt(prompt)
        if halves is None:
            return math.nan
        return min(self._cosine(image_embedding, half) for half in halves)
