"""Stable Diffusion pipelines with random weights, built offline from an architecture config and a seed.

`conf/model/tiny.yaml` is the one tests and the demo use: it has SD-1.x's attention layer names and counts
(16 transformer blocks, 32 attention modules) and, with 64x64 latents, 16x16 cross-attention maps at `down_blocks.2` and `up_blocks.1`, so every method hooks into it
exactly as into the real model. `sd15_random` and `sd2_base_random` are the full-size architectures, for timing
on a GPU (`make bench`). Their weights are random: images and scores made with them mean nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from evalkit.models.tokenizer import clip_tokenizer


def _plain(value: Any) -> Any:
    """OmegaConf lists become tuples, as diffusers' constructors expect."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def build_random_pipeline(config: Mapping[str, Any]) -> StableDiffusionPipeline:
    """Build the pipeline a `kind: random` model config describes; the same config and seed give the same weights."""
    seed = int(config["seed"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_plain(config["unet"]))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**_plain(config["vae"]))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_plain(config["text_encoder"])))
    scheduler = PNDMScheduler(**_plain(config["scheduler_config"]))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
