"""CLIP score on the shapes world, by a small dual encoder trained contrastively on rendered scenes
(evalkit/world/dual_encoder.py; weights and model card in weights/shapes-clip/).

The semantics are Attend-and-Excite's (evalkit/scoring/clip.py), on the world's captions:
- `clip_full`: raw cosine between the image and the whole prompt;
- `clip_min_object`: the minimum over the prompt's objects of the cosine between the image and that object's phrase
  ("a red circle and a blue star" -> "a red circle", "a blue star"). For two objects these are A&E's halves (split on
  " and ", else " with "); a three-object caption ("a circle, a star and a heart") gives three phrases where A&E
  would keep "a circle, a star" as one. NaN for a one-object prompt, where A&E skips the prompt.
Unlike A&E the text is embedded as is, without the 80 ImageNet templates: the encoder was trained on world captions
only, and "a photo of ..." is outside its vocabulary. Prompts with other words are refused before generation.
"""

from __future__ import annotations

import hashlib

import torch

from evalkit.errors import PromptError
from evalkit.scoring.base import SCORERS, ScoredImage, Scorer
from evalkit.world.dual_encoder import (
    WEIGHTS_FOLDER,
    WEIGHTS_NAME,
    CaptionTokenizer,
    ShapesClip,
    load_dual_encoder,
    weights_path,
)


@SCORERS.register
class ShapesClipScorer(Scorer):
    name = "shapes_clip"
    metrics = {"clip_full": True, "clip_min_object": True}

    def __init__(self, device: torch.device, weights: str = WEIGHTS_FOLDER, batch_size: int = 64):
        super().__init__(device, batch_size)
        folder = weights_path(weights)
        self.clip = ShapesClip(load_dual_encoder(folder), device)
        digest = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()[:12]
        config = self.clip.model.config
        self.provenance = (
            f"shapes_clip {weights} (sha256 {digest}; a {config.image_side}-px CNN and a {config.text_layers}-layer "
            f"text transformer trained contrastively on shapes-world renders), prompt as is (no templates), raw cosine"
        )

    @classmethod
    def preflight(cls, params, methods, specs) -> None:
        """Every prompt must be made of the world's words and fit the text encoder's context."""
        tokenizer = CaptionTokenizer(load_dual_encoder(weights_path(params.get("weights", WEIGHTS_FOLDER))).config)
        for spec in specs:
            try:
                tokenizer.rows(spec.prompt)
            except PromptError as error:
                raise PromptError(f"scorer shapes_clip: prompt {spec.id}: {error}") from None

    def score_batch(self, items: list[ScoredImage]) -> None:
        self.clip.embed_texts([item.prompt for item in items])  # the prompts not embedded yet, in one call
        image_embeddings = self.clip.image_embeddings([item.image for item in items])
        for item, image_embedding in zip(items, image_embeddings):
            prompt = item.prompt
            self._add_row(item, "clip_full", self.clip.full_similarity(image_embedding, prompt))
            self._add_row(item, "clip_min_object", self.clip.min_object_similarity(image_embedding, prompt))
