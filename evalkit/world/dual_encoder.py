"""A small CLIP for the shapes world: an image encoder and a text encoder trained contrastively on rendered scenes.

Image side: a six-layer CNN on the image reduced to 64 x 64 (PIL box filter), a per-location MLP over its 8 x 8
features and each location's mean colour, global average pooling, a linear projection. Text side: SD's real CLIP tokenizer (evalkit/models/tokenizer.py); only the CLIP token ids of the
world's words have embedding rows (a 49,408-row table would be most of the file and never trained), followed by a
small pre-norm transformer whose end-of-text token, as in CLIP, is the caption's feature, and a linear projection.
Both embeddings are unit norm; a learned temperature scales their cosine in training (InfoNCE, as CLIP).

Weights are a folder: `model.safetensors`, `config.json` (architecture and vocabulary) and a model card
(`README.md`), made by `python -m evalkit.world.train_shapes_clip`. Loading reads only that folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from evalkit.errors import MissingWeightsError, PromptError
from evalkit.models.tokenizer import clip_tokenizer
from evalkit.paths import PROJECT_ROOT
from evalkit.world.scenes import COLOURS, SHAPES

WEIGHTS_FOLDER = "weights/shapes-clip"  # relative to the project root
TRAIN_COMMAND = "python -m evalkit.world.train_shapes_clip"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# The words the world's captions are made of (evalkit/world/scenes.py's phrases and forms), each one CLIP token.
CAPTION_WORDS = ("a", "an", "and", "with", ",", *SHAPES, *COLOURS)
# How a caption separates its objects' phrases: "a circle, a star and a heart", "a circle with a star".
OBJECT_SEPARATOR = re.compile(r", | and | with ")


@dataclass(frozen=True)
class DualEncoderConfig:
    token_ids: tuple[int, ...]  # the CLIP ids that have an embedding row, in row order (start and end of text last)
    image_side: int = 64
    image_channels: tuple[int, ...] = (24, 48, 96)  # two convolutions per width, the first of each halving the side
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 16  # start + up to 14 tokens + end: the longest world caption has 11
    embed_dim: int = 64

    @classmethod
    def from_json(cls, text: str) -> DualEncoderConfig:
        fields = json.loads(text)
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def world_token_ids() -> tuple[int, ...]:
    """The CLIP token ids of CAPTION_WORDS, then start and end of text."""
    tokenizer = clip_tokenizer()
    ids = []
    for word in CAPTION_WORDS:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(word_ids) != 1:
            raise ValueError(f"the world's word {word!r} is {len(word_ids)} CLIP tokens; captions assume one")
        ids.append(word_ids[0])
    return (*ids, tokenizer.bos_token_id, tokenizer.eos_token_id)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: an image's embedding must not depend on the other images of its batch.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
    )


class ImageEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        layers, in_channels = [], 3
        for channels in config.image_channels:
            layers += [_conv_block(in_channels, channels, stride=2), _conv_block(channels, channels, stride=1)]
            in_channels = channels
        self.trunk = nn.Sequential(*layers)
        # A per-location MLP before the average, fed the trunk's features and the location's mean colour: each
        # location's feature can then be a conjunction of its colour and its shape, which the average keeps (an
        # average of separate colour and shape features loses which colour went with which shape). Binding is still
        # the encoder's weakest skill: see the colour-swap accuracy in the model card.
        self.binding = nn.Sequential(
            nn.Conv2d(in_channels + 3, 2 * in_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * in_channels, in_channels, 1),
        )
        self.projection = nn.Linear(in_channels, config.embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels` (N, 3, side, side) in [0, 1] -> (N, embed_dim), not normalised."""
        centred = (pixels - 0.5) / 0.5
        features = self.trunk(centred)
        colours = nn.functional.adaptive_avg_pool2d(centred, features.shape[-2:])
        return self.projection((features + self.binding(torch.cat([features, colours], dim=1))).mean(dim=(2, 3)))


class TextEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        # CLIP's initialisation; with nn.Embedding's N(0, 1) the positions would be 1% of the signal, and "a red circle
        # and a blue star" would embed as "a blue circle and a red star" does.
        self.token_embedding = nn.Embedding(len(config.token_ids), config.text_width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.position_embedding = nn.Parameter(torch.randn(config.context_length, config.text_width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            config.text_width, config.text_heads, 2 * config.text_width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.text_width)
        self.projection = nn.Linear(config.text_width, config.embed_dim, bias=False)

    def forward(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`rows` (N, context_length): embedding rows, padded after the end of text; `lengths` (N,): tokens
        including start and end. -> (N, embed_dim), not normalised."""
        positions = torch.arange(rows.shape[1], device=rows.device)
        padding = positions[None, :] >= lengths[:, None]
        hidden = self.token_embedding(rows) + self.position_embedding
        hidden = self.final_norm(self.transformer(hidden, src_key_padding_mask=padding))
        end_of_text = hidden[torch.arange(rows.shape[0], device=rows.device), lengths - 1]
        return self.projection(end_of_text)


class DualEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_encoder(pixels), dim=-1)

    def encode_texts(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_encoder(rows, lengths), dim=-1)


class CaptionTokenizer:
    """Texts -> the dual encoder's embedding rows, through SD's CLIP tokenizer; refuses words outside the world."""

    def __init__(self, config: DualEncoderConfig):
        self._tokenizer = clip_tokenizer()
        self._row_of_id = {token_id: row for row, token_id in enumerate(config.token_ids)}
        self._context_length = config.context_length
        self._end_row = self._row_of_id[self._tokenizer.eos_token_id]

    def rows(self, text: str) -> list[int]:
        ids = self._tokenizer(text).input_ids
        unknown = [self._tokenizer.decode([token_id]).strip() for token_id in ids if token_id not in self._row_of_id]
        if unknown:
            raise PromptError(
                f"{text!r}: the shapes-world CLIP knows only the words {', '.join(CAPTION_WORDS)}; "
                f"not {', '.join(unknown)}"
            )
        if len(ids) > self._context_length:
            raise PromptError(f"{text!r} is {len(ids)} tokens; the shapes-world CLIP reads {self._context_length}")
        return [self._row_of_id[token_id] for token_id in ids]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (N, context_length) padded with end of text, lengths (N,)) for `texts`."""
        all_rows = [self.rows(text) for text in texts]
        padded = [rows + [self._end_row] * (self._context_length - len(rows)) for rows in all_rows]
        return torch.tensor(padded), torch.tensor([len(rows) for rows in all_rows])


def image_pixels(images: list[Image.Image], side: int) -> torch.Tensor:
    """PIL images -> (N, 3, side, side) floats in [0, 1]; other sizes are reduced (or enlarged) with a box filter."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.BOX)
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def object_phrases(prompt: str) -> list[str]:
    """The phrase of each object the caption names ("a red circle and a blue star": "a red circle", "a blue star")."""
    return OBJECT_SEPARATOR.split(prompt)


class ShapesClip:
    """The trained dual encoder at inference: unit-norm image and text embeddings, and CLIP score's two cosines."""

    def __init__(self, model: DualEncoder, device: torch.device):
        self.model = model.to(device).eval()
        self.device = device
        self.tokenizer = CaptionTokenizer(model.config)
        self._text_embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, embed_dim), unit norm."""
        return self.model.encode_images(image_pixels(images, self.model.config.image_side).to(self.device))

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> None:
        """Embed, in one batch, the prompts and their objects' phrases not embedded yet (one call per text would be
        most of the scoring time)."""
        texts = {text for prompt in prompts for text in (prompt, *object_phrases(prompt))} - set(self._text_embeddings)
        if texts:
            texts = sorted(texts)
            rows, lengths = self.tokenizer(texts)
            embeddings = self.model.encode_texts(rows.to(self.device), lengths.to(self.device))
            self._text_embeddings.update(zip(texts, embeddings))

    def text_embedding(self, text: str) -> torch.Tensor:
        """(embed_dim,), unit norm; cached per text."""
        if text not in self._text_embeddings:
            self.embed_texts([text])
        return self._text_embeddings[text]

    def full_similarity(self, image_embedding: torch.Tensor, prompt: str) -> float:
        return float(image_embedding @ self.text_embedding(prompt))

    def min_object_similarity(self, image_embedding: torch.Tensor, prompt: str) -> float:
        """The lowest cosine between the image and one object's phrase; NaN for a prompt of one object."""
        phrases = object_phrases(prompt)
        if len(phrases) < 2:
            return math.nan
        return min(self.full_similarity(image_embedding, phrase) for phrase in phrases)


def save_dual_encoder(model: DualEncoder, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(model.config.to_json())


def weights_path(folder: str) -> Path:
    """`folder` when absolute, else relative to the project root (so the committed weights load from anywhere)."""
    path = Path(folder)
    return path if path.is_absolute() else PROJECT_ROOT / path


def load_dual_encoder(folder: Path) -> DualEncoder:
    """The trained dual encoder in `folder` (eval mode, on the CPU); MissingWeightsError when it is not there."""
    weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not weights.is_file() or not config.is_file():
        raise MissingWeightsError(
            f"the shapes-world CLIP is not in {folder} ({WEIGHTS_NAME}, {CONFIG_NAME}); make it with `{TRAIN_COMMAND}`"
        )
    model = DualEncoder(DualEncoderConfig.from_json(config.read_text()))
    model.load_state_dict(load_file(weights))
    return model.eval()
