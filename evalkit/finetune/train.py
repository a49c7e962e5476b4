"""Separate-and-Enhance's compositional finetuning (Bao et al., SIGGRAPH 2024; arXiv 2312.06712).

Written from the paper and the facts recorded about the released code (adobe/SeperateAndEnhance, whose licence
forbids derivatives). Only the cross-attention key projections (`attn2.to_k.weight`) of the UNet train; the text
encoder, the VAE and every other UNet weight are frozen, and checked unchanged at the end. Training is image-free.
Each step:

1. Draw `batch_size` prompts: `prompt_template` filled with two concepts (a fixed pair, or two distinct concepts
   drawn from the concept lists) and one conjunction for the whole batch.
2. x0 = N(0, I) * vae scaling factor (0.18215), noise N(0, I), t ~ U{0..999} per sample; x_t by DDPM's add_noise.
3. One UNet forward (train mode) with the prompts' embeddings records the cross-attention probabilities of every
   16x16 cross-attention layer; each sample's maps are averaged over those layers, one map per head.
4. For each sample, the two concepts' maps give the Separate loss (max of A1*A2/(A1+A2)) and the Enhance loss
   (1 - min of the smoothed maxima); loss = lambda_sep * mean Separate + lambda_en * mean Enhance.
5. Backward, clip the gradient norm of the trained weights to `max_grad_norm`, one AdamW step (constant LR).
6. With `norm_weight` (large-scale recipe): prompts "a photo of a {A}" with fresh x0, noise and t; the loss
   norm_weight * MSE(finetuned noise prediction, frozen model's) gets its own backward, clip and AdamW step, as in
   the released `train_large.py`.

Two deliberate departures from the released code, which has bugs here:
* Every sample of the batch is used. The released attention store keeps only the second half of the attention
  rows (meant for classifier-free-guidance batches), so of a batch of 4 only samples 2 and 3 get a loss, each split
  into two groups of 4 heads that are treated as two samples.
* The concepts' true token positions are used (`TokenIndexer.locate`). The released large-scale script hard-codes
  positions 6 and 9, which for "a photo of a cat and a dog" are "and" and the end token. A word the tokenizer
  splits into pieces ("urial" -> "uri", "al") contributes every piece, as Attend-and-Excite does with subjects:
  Separate takes the worst pair of pieces, Enhance the weakest piece.

The learning rate is scaled as the released `--scale_lr` does: times the batch size, and times 2 with the norm
term. Random numbers come from one CPU generator per step, seeded from (seed, step), so a resumed run draws what
an uninterrupted one would.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from omegaconf import DictConfig, OmegaConf

from evalkit.errors import ConfigError
from evalkit.finetune.checkpoint import (
    CHECKPOINT_NAME,
    STATE_NAME,
    key_weight_names,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from evalkit.finetune.loop import LOG_NAME, optimizer_step, run_steps, step_generator
from evalkit.finetune.losses import enhance_loss, norm_loss, separate_loss
from evalkit.models.loading import load_pipeline, resolve_device
from evalkit.paths import project_path
from evalkit.prompts import TokenIndexer
from evalkit.registry import from_config
from evalkit.sampling.attention import (
    AttentionHooks,
    CrossAttentionRecorder,
    layers_at_resolution,
)
from evalkit.sampling.smoothing import gaussian_kernel

log = logging.getLogger("evalkit")


@dataclass(frozen=True)
class Recipe:
    """One `conf/finetune/*.yaml`; defaults are the released code's (`config.py`, `run_*.sh`)."""

    name: str
    output_dir: str
    steps: int
    batch_size: int = 4
    learning_rate: float = 2e-6
    scale_lr: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lambda_sep: float = 1.0
    lambda_en: float = 0.5
    norm_weight: float | None = None
    seed: int = 0
    checkpoint_every: int = 50
    prompt_template: str = "a photo of {a} {conjunction} {b}"
    conjunctions: tuple[str, ...] = ("and",)
    concept_pairs: tuple[tuple[str, str], ...] = ()
    concepts_file: str | None = None
    concept_lists: tuple[str, ...] = ()
    norm_template: str = "a photo of a {a}"
    resolution: int | None = None  # training image size (latents are this / the VAE factor); None: the model's
    attention_res: int = 16
    sigma: float = 0.5
    kernel_size: int = 3

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Recipe:
        recipe = from_config(cls, config, f"finetune {config.get('name')}")
        return dataclasses.replace(
            recipe,
            conjunctions=tuple(recipe.conjunctions),
            concept_pairs=tuple(tuple(pair) for pair in recipe.concept_pairs),
            concept_lists=tuple(recipe.concept_lists),
        )

    @property
    def effective_learning_rate(self) -> float:
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.batch_size * (2.0 if self.norm_weight else 1.0)

    def concepts(self) -> list[str]:
        """The pool random pairs are drawn from (concept_lists mode)."""
        path = project_path(self.concepts_file)
        if not path.is_file():
            raise ConfigError(f"finetune {self.name}: concepts_file {path} does not exist")
        lists = json.loads(path.read_text())
        missing = [name for name in self.concept_lists if name not in lists]
        if missing:
            raise ConfigError(f"finetune {self.name}: {path} has no list(s) {missing}; it has {sorted(lists)}")
        return [concept for name in self.concept_lists for concept in lists[name]]


def check_recipe(recipe: Recipe, indexer: TokenIndexer) -> list[str]:
    """Every problem is reported before the model trains; returns the concept pool (empty with fixed pairs)."""
    where = f"finetune {recipe.name}"
    if recipe.steps < 1 or recipe.batch_size < 1 or recipe.checkpoint_every < 1:
        raise ConfigError(f"{where}: steps, batch_size and checkpoint_every must be positive")
    if bool(recipe.concept_pairs) == bool(recipe.concept_lists):
        raise ConfigError(f"{where}: give either concept_pairs (fixed pairs) or concepts_file + concept_lists (random pairs)")
    for field in ("{a}", "{b}", "{conjunction}"):
        if field not in recipe.prompt_template:
            raise ConfigError(f"{where}: prompt_template {recipe.prompt_template!r} lacks {field}")
    if recipe.norm_weight and "{a}" not in recipe.norm_template:
        raise ConfigError(f"{where}: norm_template {recipe.norm_template!r} lacks {{a}}")
    if not recipe.conjunctions:
        raise ConfigError(f"{where}: conjunctions must name at least one word")
    if any(len(pair) != 2 for pair in recipe.concept_pairs):
        raise ConfigError(f"{where}: each of concept_pairs must be two concepts, got {list(recipe.concept_pairs)}")
    pool = recipe.concepts() if recipe.concept_lists else []
    if pool and len(pool) < 2 * recipe.batch_size:
        raise ConfigError(f"{where}: {len(pool)} concepts cannot give {recipe.batch_size} pairs of distinct concepts")
    # Each concept must be findable in the prompts it goes into (a typo or an empty name fails here, by name).
    pairs = list(recipe.concept_pairs) or [(concept, pool[(n + 1) % len(pool)]) for n, concept in enumerate(pool)]
    for conjunction in recipe.conjunctions:
        for a, b in pairs:
            if not a.strip() or not b.strip():
                raise ConfigError(f"{where}: empty concept name in pair {[a, b]}")
            prompt = recipe.prompt_template.format(a=a, b=b, conjunction=conjunction)
            indexer.locate(f"{recipe.name}:{a}+{b}", prompt, [a, b])
    return pool


def _draw(generator: torch.Generator, count: int) -> int:
    return int(torch.randint(count, (1,), generator=generator))


def draw_pairs(recipe: Recipe, pool: list[str], generator: torch.Generator) -> tuple[list[tuple[str, str]], str]:
    """The step's concept pairs (distinct concepts across the batch in pool mode, as `random.sample` draws them)
    and its conjunction."""
    conjunction = recipe.conjunctions[_draw(generator, len(recipe.conjunctions))]
    if recipe.concept_pairs:
        pairs = [recipe.concept_pairs[_draw(generator, len(recipe.concept_pairs))] for _ in range(recipe.batch_size)]
    else:
        order = torch.randperm(len(pool), generator=generator)[: 2 * recipe.batch_size].tolist()
        pairs = [(pool[order[2 * n]], pool[order[2 * n + 1]]) for n in range(recipe.batch_size)]
    return pairs, conjunction


def _noisy_latents(pipe, noise_scheduler, count: int, latent_size: int, generator: torch.Generator, device):
    shape = (count, pipe.unet.config.in_channels, latent_size, latent_size)
    latents = torch.randn(shape, generator=generator) * pipe.vae.config.scaling_factor
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (count,), generator=generator)
    return noise_scheduler.add_noise(latents, noise, timesteps).to(device), timesteps.to(device)


@torch.no_grad()
def _encode(pipe, prompts: list[str], device) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(device))[0]


def _frozen_fingerprint(modules: list[torch.nn.Module], trained: dict[str, torch.nn.Parameter]) -> str:
    """A hash of every weight that must not change (checked after training)."""
    trained_ids = {id(param) for param in trained.values()}
    digest = hashlib.sha256()
    for module in modules:
        for param in module.parameters():
            if id(param) not in trained_ids:
                digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def freeze_all_but_keys(pipe) -> dict[str, torch.nn.Parameter]:
    """requires_grad only on the UNet's cross-attention key weights; returns them by name (verified)."""
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    params = dict(pipe.unet.named_parameters())
    trained = {name: params[name] for name in key_weight_names(pipe.unet)}
    if not trained:
        raise ConfigError("the UNet has no cross-attention key projections (attn2.to_k) to finetune")
    for param in trained.values():
        param.requires_grad_(True)
    trainable = [n for module in (pipe.unet, pipe.text_encoder, pipe.vae) for n, p in module.named_parameters() if p.requires_grad]
    if sorted(trainable) != sorted(trained):
        raise RuntimeError(f"only the attn2.to_k weights may train, but these do too: {sorted(set(trainable) - set(trained))}")
    return trained


def separate_and_enhance_losses(maps: torch.Tensor, concept_tokens: list[tuple[list[int], list[int]]], kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Separate and Enhance losses from (batch, heads, res, res, tokens) maps and each sample's two
    concepts' token positions."""
    separate, enhance = [], []
    for sample_maps, (tokens_a, tokens_b) in zip(maps, concept_tokens):
        maps_a = sample_maps[..., tokens_a].permute(3, 0, 1, 2)  # (pieces, heads, res, res)
        maps_b = sample_maps[..., tokens_b].permute(3, 0, 1, 2)
        separate.append(separate_loss(maps_a, maps_b))
        enhance.append(enhance_loss(maps_a, maps_b, kernel))
    return torch.stack(separate), torch.stack(enhance)


def _identity(cfg: DictConfig, recipe: Recipe) -> dict[str, Any]:
    """What the weights depend on: the recipe and the base model (saved in every checkpoint)."""
    return {"finetune": dataclasses.asdict(recipe), "model": OmegaConf.to_container(cfg.model, resolve=True)}


def finetune(cfg: DictConfig, on_step: Callable[[int, dict[str, float]], None] | None = None, pipe=None) -> Path:
    """Run (or resume, or find finished) the finetune `cfg.finetune` on `cfg.model`; returns the checkpoint path.

    `on_step(step, losses)` is called after each step's update (a test can stop the run there); `pipe`, if given,
    is `cfg.model` already loaded in float32 (it is trained in place)."""
    recipe = Recipe.from_config(OmegaConf.to_container(cfg.finetune, resolve=True))
    out = project_path(recipe.output_dir)
    identity = _identity(cfg, recipe)
    device = resolve_device(cfg.device)
    # Weights train in float32 whatever dtype the model config samples in (the released code's default).
    if pipe is None:
        pipe = load_pipeline(OmegaConf.merge(cfg.model, {"dtype": "float32"}), device)
    indexer = TokenIndexer(pipe.tokenizer)
    pool = check_recipe(recipe, indexer)
    latent_size = int(recipe.resolution or cfg.model.resolution) // pipe.vae_scale_factor
    layers = layers_at_resolution(pipe.unet, latent_size, recipe.attention_res)
    if not layers:
        raise ConfigError(
            f"finetune {recipe.name}: model {cfg.model.name} has no {recipe.attention_res}x{recipe.attention_res} "
            f"cross-attention layers with {latent_size}x{latent_size} latents; set finetune.resolution (now {recipe.resolution})"
        )

    trained = freeze_all_but_keys(pipe)
    frozen_modules = [pipe.unet, pipe.text_encoder, pipe.vae]
    fingerprint = _frozen_fingerprint(frozen_modules, trained)
    frozen_unet = copy.deepcopy(pipe.unet).eval() if recipe.norm_weight else None  # the base model, before any resume
    optimizer = torch.optim.AdamW(
        list(trained.values()), lr=recipe.effective_learning_rate, betas=(recipe.adam_beta1, recipe.adam_beta2),
        weight_decay=recipe.adam_weight_decay, eps=recipe.adam_epsilon,
    )
    start = 0
    if (out / STATE_NAME).is_file():
        saved_identity, start = load_train_state(out, trained, optimizer)
        if saved_identity != json.loads(json.dumps(identity, sort_keys=True)):
            raise ConfigError(f"{out} holds a finetune made with a different config; use another finetune.output_dir or delete {out}")
    if start >= recipe.steps:
        if not (out / CHECKPOINT_NAME).is_file():  # killed between the two writes of the last save
            save_checkpoint(out, trained, identity, start, recipe.steps)
        print(f"finetune {recipe.name} is finished: {out / CHECKPOINT_NAME}")
        return out / CHECKPOINT_NAME

    if start:
        log.info("resuming finetune %s from step %d of %d", recipe.name, start, recipe.steps)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    kernel = gaussian_kernel(recipe.kernel_size, recipe.sigma).to(device)
    recorder = CrossAttentionRecorder(layers, recipe.attention_res)
    hooks = AttentionHooks(pipe.unet, layers, recorder).install()

    def save(done: int) -> None:
        save_train_state(out, trained, optimizer, identity, done, recipe.steps)
        save_checkpoint(out, trained, identity, done, recipe.steps)

    def train_step(step: int) -> dict[str, float]:
        return _train_step(pipe, frozen_unet, recipe, pool, trained, optimizer, noise_scheduler, recorder, indexer, kernel, latent_size, step, device)

    pipe.unet.train()
    try:
        run_steps(f"finetune {recipe.name}", out, start, recipe.steps, recipe.checkpoint_every, train_step, save, on_step)
    finally:
        hooks.remove()
        pipe.unet.eval()
    if _frozen_fingerprint(frozen_modules, trained) != fingerprint:
        raise RuntimeError("a frozen weight changed during the finetune")
    print(f"finetune {recipe.name} finished: {out / CHECKPOINT_NAME} (loss log {out / LOG_NAME})")
    return out / CHECKPOINT_NAME


def _train_step(pipe, frozen_unet, recipe, pool, trained, optimizer, noise_scheduler, recorder, indexer, kernel, latent_size, step, device) -> dict[str, float]:
    generator = step_generator("sepen", recipe.seed, step)
    pairs, conjunction = draw_pairs(recipe, pool, generator)
    prompts = [recipe.prompt_template.format(a=a, b=b, conjunction=conjunction) for a, b in pairs]
    concept_tokens = [tuple(indexer.locate(f"step {step}", prompt, [a, b])) for prompt, (a, b) in zip(prompts, pairs)]
    noisy, timesteps = _noisy_latents(pipe, noise_scheduler, recipe.batch_size, latent_size, generator, device)
    maps = recorder.record_per_head(pipe.unet, noisy, timesteps, _encode(pipe, prompts, device))
    separate, enhance = separate_and_enhance_losses(maps, concept_tokens, kernel)
    loss = recipe.lambda_sep * separate.mean() + recipe.lambda_en * enhance.mean()
    # The released code clips over every attn2 parameter; only the key weights have gradients, so this is the same.
    optimizer_step(loss, trained.values(), optimizer, recipe.max_grad_norm)
    losses = {"loss": loss.item(), "separate": separate.mean().item(), "enhance": enhance.mean().item()}
    if recipe.norm_weight:
        single = [recipe.norm_template.format(a=a) for a, _ in pairs]
        embeds = _encode(pipe, single, device)
        noisy, timesteps = _noisy_latents(pipe, noise_scheduler, recipe.batch_size, latent_size, generator, device)
        with torch.no_grad():
            target = frozen_unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        norm = norm_loss(pipe.unet(noisy, timesteps, encoder_hidden_states=embeds).sample, target)
        optimizer_step(recipe.norm_weight * norm, trained.values(), optimizer, recipe.max_grad_norm)
        losses["norm"] = norm.item()
    losses["lr"] = optimizer.param_groups[0]["lr"]
    return losses
