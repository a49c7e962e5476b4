"""A tiny Stable-Diffusion-1-shaped pipeline built offline from a config and a seed.

It has SD-1.x's attention layer names and counts (16 transformer blocks, 32 attention modules) and, with
64x64 latents, 16x16 cross-attention maps at `down_blocks.2` and `up_blocks.1`, so every method hooks into it
exactly as into the real model. Its weights are random: images and scores made with it mean nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from evalkit.models.tokenizer import clip_tokenizer


def _plain(value: Any) -> Any:
    """OmegaConf lists become tuples, as diffusers' constructors expect."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def build_tiny_pipeline(config: Mapping[str, Any]) -> StableDiffusionPipeline:
    """Build the pipeline described by `conf/model/tiny.yaml`; the same config and seed give the same weights."""
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
