"""Train the shapes-world model (`python -m evalkit train-world`): an SD-shaped VAE, UNet and CLIP text encoder,
from the seeded random initialisation of a model config's architecture (`conf/model/tiny.yaml` by default), on
scenes of the shapes world drawn on the fly. The recipe is diffusers' (examples/text_to_image), in two stages:

1. The VAE (AutoencoderKL) learns to reconstruct renders: L1 between the image and the decoding of a sample of
   its posterior, plus `kl_weight` times the posterior's KL to N(0, I) (LDM's autoencoder loss without the
   perceptual and adversarial terms, which flat colours do not need). Then the latent scaling factor is measured
   as Stable Diffusion's was: 1 / the standard deviation of posterior samples of `scaling_scenes` renders.
2. The UNet and the text encoder train jointly on the frozen VAE's scaled latents: noise and a timestep
   t ~ U{0..T-1} per image, x_t by the DDPM schedule of the model's `scheduler_config` (`add_noise`), MSE between
   the UNet's prediction and the noise (epsilon prediction; the velocity for a v-prediction config). A share
   `proportion_empty_prompts` of captions is replaced by "" so that classifier-free guidance has an
   unconditional model. AdamW, gradients clipped, linear warmup then a constant learning rate; an EMA of the
   weights (diffusers' EMAModel) is what is exported, when `ema_decay` is set.

Scenes come only from the seen split (`evalkit.world.split.is_seen`), in caption forms drawn with the recipe's
shares. Every random number of a step (scenes, posterior samples, noise, timesteps, caption dropout) is drawn
from seeds of (seed, stage, step), so a resumed run trains on what an uninterrupted one would, and the number of
rendering processes changes nothing. Checkpoints, the loss log, the progress bar and the wall-clock budget are
the project's training loop (evalkit/finetune/loop.py); a finished run exports `export_dir` (evalkit/world/export.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from evalkit.errors import ConfigError
from evalkit.finetune.checkpoint import (
    CHECKPOINT_NAME,
    STATE_NAME,
    CheckpointFormat,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from evalkit.finetune.loop import optimizer_step, read_log, run_steps, step_generator
from evalkit.manifest import git_commit, hardware
from evalkit.models.loading import DTYPES, resolve_device
from evalkit.models.random_init import build_random_pipeline
from evalkit.paths import project_path
from evalkit.registry import from_config
from evalkit.world.export import RunFacts, export_pipeline, read_failure_rates
from evalkit.world.scenes import FORMS, Scene, render, sample_scene
from evalkit.world.split import is_seen

log = logging.getLogger("evalkit")

FORMAT = CheckpointFormat(
    "evalkit-world-1", "a shapes-world training state made by `python -m evalkit train-world`", "train_world.output_dir"
)
STAGES = ("vae", "diffusion")
# Seeds of the scenes each use draws, kept apart so that no two uses see the same scenes.
DATA_STREAMS = {"vae": 0, "diffusion": 1, "scaling": 2}
CALLS_NAME = "calls.jsonl"  # one line per stage a call trained: steps, seconds, device, commit (for the model card)


@dataclass(frozen=True)
class StageRecipe:
    """One stage's optimisation (AdamW's defaults are diffusers' train_text_to_image.py's)."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500

    def learning_rate_at(self, step: int) -> float:
        """Linear warmup over `warmup_steps` (from the first update, not from zero), then constant."""
        if step >= self.warmup_steps:
            return self.learning_rate
        return self.learning_rate * (step + 1) / self.warmup_steps


@dataclass(frozen=True)
class WorldRecipe:
    """One `conf/train_world/*.yaml`."""

    name: str
    output_dir: str
    export_dir: str
    vae: StageRecipe
    diffusion: StageRecipe
    forms: Mapping[str, float]  # caption form -> share of the training scenes
    seed: int = 0
    resolution: int = 128
    kl_weight: float = 1e-6
    proportion_empty_prompts: float = 0.1
    ema_decay: float | None = 0.999
    mixed_precision: str = "bf16"  # autocast on a GPU ("bf16" or "no"); a CPU always trains in float32
    scaling_scenes: int = 512
    export_dtype: str = "float16"
    max_megabytes: float = 20.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WorldRecipe:
        params = dict(config)
        where = f"train_world {params.get('name')}"
        for stage in STAGES:
            if isinstance(params.get(stage), Mapping):
                params[stage] = from_config(StageRecipe, params[stage], f"{where}.{stage}")
        return from_config(cls, params, where)

    def check(self) -> None:
        """Every problem is reported before anything trains."""
        where = f"train_world {self.name}"
        for stage in STAGES:
            recipe = getattr(self, stage)
            if min(recipe.steps, recipe.batch_size, recipe.checkpoint_every) < 1 or recipe.warmup_steps < 0:
                raise ConfigError(f"{where}.{stage}: steps, batch_size and checkpoint_every must be positive, warmup_steps not negative")
        unknown = sorted(set(self.forms) - set(FORMS))
        if unknown:
            raise ConfigError(f"{where}: unknown caption form(s) {unknown}; the forms are {', '.join(FORMS)}")
        if any(share < 0 for share in self.forms.values()) or sum(self.forms.values()) <= 0:
            raise ConfigError(f"{where}: the forms' shares must be non-negative and not all zero, got {dict(self.forms)}")
        if not 0 <= self.proportion_empty_prompts < 1:
            raise ConfigError(f"{where}: proportion_empty_prompts must be in [0, 1), got {self.proportion_empty_prompts}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"{where}: ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.mixed_precision not in ("bf16", "no"):
            raise ConfigError(f"{where}: mixed_precision must be bf16 or no, got {self.mixed_precision!r}")
        if self.export_dtype not in DTYPES:
            raise ConfigError(f"{where}: export_dtype must be one of {sorted(DTYPES)}, got {self.export_dtype!r}")

    def identity(self, model: Mapping[str, Any]) -> dict[str, Any]:
        """What a stage's weights at step k depend on, saved in its training state. Not the number of steps nor the
        checkpoint interval (the learning rate does not decay to a planned end, so a run can be extended), nor
        where the run and its export are written."""
        recipe = dataclasses.asdict(self)
        for key in ("name", "output_dir", "export_dir", "export_dtype", "max_megabytes"):
            recipe.pop(key)
        for stage in STAGES:
            recipe[stage].pop("steps")
            recipe[stage].pop("checkpoint_every")
        architecture = {key: model[key] for key in ("unet", "vae", "text_encoder", "scheduler_config", "seed")}
        return json.loads(json.dumps({"recipe": recipe, "model": architecture}, sort_keys=True))


# --- data --------------------------------------------------------------------------------------------------------

def draw_training_scene(rng: np.random.Generator, forms: list[str], shares: np.ndarray) -> Scene:
    """A scene of a form drawn with the recipe's shares, redrawn until it is in the seen split."""
    form = forms[int(rng.choice(len(forms), p=shares))]
    while True:
        scene = sample_scene(rng, form)
        if is_seen(scene):
            return scene


class SceneBatches(Dataset):
    """Batch `step` of a data stream: (images in [-1, 1], caption token ids, captions), each scene drawn from its own
    seed (seed, stream, step, index) alone."""

    def __init__(self, recipe: WorldRecipe, stream: str, batch_size: int, tokenizer):
        self.seed, self.stream, self.batch_size, self.resolution = recipe.seed, DATA_STREAMS[stream], batch_size, recipe.resolution
        self.forms = [form for form, share in recipe.forms.items() if share > 0]
        total = sum(recipe.forms[form] for form in self.forms)
        self.shares = np.array([recipe.forms[form] / total for form in self.forms])
        self.tokenizer = tokenizer

    def scenes(self, step: int) -> list[Scene]:
        return [
            draw_training_scene(np.random.default_rng([self.seed, self.stream, step, index]), self.forms, self.shares)
            for index in range(self.batch_size)
        ]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        scenes = self.scenes(step)
        pixels = np.stack([np.asarray(render(scene, self.resolution)[0], dtype=np.float32) for scene in scenes])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
        captions = [scene.caption for scene in scenes]
        return images, tokenize(self.tokenizer, captions), captions


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def _batches(data: SceneBatches, start: int, steps: int, num_workers: int, device: torch.device):
    """The batches of steps start .. steps - 1, in order, rendered ahead by `num_workers` processes."""
    loader = DataLoader(
        data, batch_size=None, sampler=range(start, steps), num_workers=num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
    )
    return iter(loader)


@torch.no_grad()
def measure_scaling_factor(vae, recipe: WorldRecipe, tokenizer, device: torch.device) -> float:
    """1 / the standard deviation of posterior samples of `scaling_scenes` renders, as Stable Diffusion's 0.18215
    was measured (LDM's `scale_by_std`), so that the UNet's latents have unit variance."""
    images = SceneBatches(recipe, "scaling", recipe.scaling_scenes, tokenizer)[0][0]
    generator = _device_generator("world-scaling", recipe.seed, 0, device)
    latents = [vae.encode(chunk.to(device)).latent_dist.sample(generator=generator) for chunk in images.split(recipe.vae.batch_size)]
    return 1.0 / torch.cat(latents).float().std().item()


def _device_generator(namespace: str, seed: int, step: int, device: torch.device) -> torch.Generator:
    """`step_generator`'s seed on `device`: large draws (noise, posterior samples) are made where they are used."""
    return torch.Generator(device).manual_seed(step_generator(namespace, seed, step).initial_seed())


# --- the stages --------------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    """One call of `train-world`: what both stages share."""

    recipe: WorldRecipe
    identity: dict[str, Any]
    out: Path
    device: torch.device
    tokenizer: Any
    num_workers: int
    deadline: float | None  # time.monotonic() by which the call stops, checkpointed
    commit: str | None
    on_step: Callable[[str, int, dict[str, float]], None] | None

    def autocast(self):
        """bf16 autocast for the UNet and text encoder on a GPU (`mixed_precision`); float32 elsewhere."""
        if self.device.type == "cuda" and self.recipe.mixed_precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizer(self, stage: str, params: dict[str, torch.nn.Parameter]) -> torch.optim.AdamW:
        recipe: StageRecipe = getattr(self.recipe, stage)
        return torch.optim.AdamW(
            list(params.values()), lr=recipe.learning_rate, betas=(recipe.adam_beta1, recipe.adam_beta2),
            weight_decay=recipe.adam_weight_decay, eps=recipe.adam_epsilon,
        )

    def resume(self, stage: str, weights: dict[str, torch.Tensor], optimizer: torch.optim.AdamW, identity: dict[str, Any]) -> int:
        """Load the stage's training state into `weights` and `optimizer`, if there is one; returns its step."""
        folder = self.out / stage
        if not (folder / STATE_NAME).is_file():
            return 0
        saved_identity, step = load_train_state(folder, weights, optimizer, FORMAT)
        if saved_identity != identity:
            raise ConfigError(f"{folder} holds a {stage} stage trained with a different config; use another train_world.output_dir or delete {self.out}")
        return step

    def run(self, stage: str, start: int, optimizer: torch.optim.AdamW, params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor], identity: dict[str, Any], step_loss: Callable[[int, Any], dict[str, torch.Tensor]], after_update: Callable[[], None] = lambda: None) -> int:
        """Train `stage` from `start` until its last step or the deadline; returns the step reached. `step_loss(step,
        batch)` gives the step's losses ("loss" is minimised); the training state holds `weights` (`params`, which
        the optimizer trains, and copies such as an EMA's)."""
        recipe: StageRecipe = getattr(self.recipe, stage)
        if start >= recipe.steps or (self.deadline is not None and time.monotonic() >= self.deadline):
            return start
        if start:
            log.info("resuming train-world %s stage from step %d of %d", stage, start, recipe.steps)
        folder = self.out / stage
        batches = _batches(SceneBatches(self.recipe, stage, recipe.batch_size, self.tokenizer), start, recipe.steps, self.num_workers, self.device)

        def train_step(step: int) -> dict[str, float]:
            learning_rate = recipe.learning_rate_at(step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            losses = step_loss(step, next(batches))
            optimizer_step(losses["loss"], params.values(), optimizer, recipe.max_grad_norm)
            after_update()
            return {**{key: value.item() for key, value in losses.items()}, "lr": learning_rate}

        def save(done: int) -> None:
            save_train_state(folder, weights, optimizer, identity, done, recipe.steps, FORMAT)

        def on_step(done: int, losses: dict[str, float]) -> None:
            if self.on_step is not None:
                self.on_step(stage, done, losses)

        began = time.monotonic()
        done = run_steps(f"train-world {stage}", folder, start, recipe.steps, recipe.checkpoint_every, train_step, save, on_step, self.deadline)
        row = {"stage": stage, "from_step": start, "to_step": done, "seconds": round(time.monotonic() - began, 1), "commit": self.commit,
               "hardware": hardware(self.device), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with (self.out / CALLS_NAME).open("a") as calls:
            calls.write(json.dumps(row, sort_keys=True) + "\n")
        return done


def _train_vae(trainer: Trainer, vae) -> int:
    """Stage 1 (in float32 on any device: the VAE is small, and its KL sums over every latent). Returns the step
    reached."""
    recipe, device = trainer.recipe, trainer.device
    params = dict(vae.named_parameters())
    optimizer = trainer.optimizer("vae", params)
    start = trainer.resume("vae", params, optimizer, trainer.identity)

    def step_loss(step: int, batch) -> dict[str, torch.Tensor]:
        images = batch[0].to(device, non_blocking=True)
        generator = _device_generator("world-vae", recipe.seed, step, device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        l1 = F.l1_loss(reconstruction, images)
        kl = posterior.kl().mean()
        return {"loss": l1 + recipe.kl_weight * kl, "l1": l1, "kl": kl}

    vae.train()
    return trainer.run("vae", start, optimizer, params, params, trainer.identity, step_loss)


def _finished_vae(trainer: Trainer, vae, step: int) -> tuple[float, int]:
    """The finished VAE's checkpoint (its weights and measured scaling factor), written once per VAE step reached;
    returns (scaling factor, step)."""
    folder = trainer.out / "vae"
    if (folder / CHECKPOINT_NAME).is_file():
        checkpoint = load_checkpoint(folder / CHECKPOINT_NAME, FORMAT)
        if checkpoint.step == step:
            return checkpoint.config["scaling_factor"], step
    vae.eval()
    scaling_factor = measure_scaling_factor(vae, trainer.recipe, trainer.tokenizer, trainer.device)
    config = {**trainer.identity, "scaling_factor": scaling_factor}
    save_checkpoint(folder, dict(vae.named_parameters()), config, step, trainer.recipe.vae.steps, FORMAT)
    return scaling_factor, step


def _train_diffusion(trainer: Trainer, pipe, scaling_factor: float, vae_step: int) -> tuple[int, EMAModel | None, dict]:
    """Stage 2: the UNet and the text encoder on the frozen VAE's latents. Returns (the step reached, the EMA,
    the trained parameters by name)."""
    recipe, device = trainer.recipe, trainer.device
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    vae.requires_grad_(False).eval()
    identity = {**trainer.identity, "vae": {"step": vae_step, "scaling_factor": scaling_factor}}
    params = {f"unet.{name}": param for name, param in unet.named_parameters()}
    params.update({f"text_encoder.{name}": param for name, param in text_encoder.named_parameters()})
    optimizer = trainer.optimizer("diffusion", params)
    ema = EMAModel(list(params.values()), decay=recipe.ema_decay) if recipe.ema_decay else None
    weights = dict(params)
    if ema is not None:
        weights.update({f"ema/{name}": shadow for name, shadow in zip(params, ema.shadow_params)})
    start = trainer.resume("diffusion", weights, optimizer, identity)
    if ema is not None:
        ema.optimization_step = start  # its decay warms up with the number of updates made

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    empty_caption = tokenize(pipe.tokenizer, [""])

    def step_loss(step: int, batch) -> dict[str, torch.Tensor]:
        images, token_ids, _ = batch
        on_device = _device_generator("world-diffusion", recipe.seed, step, device)
        count = images.shape[0]
        with torch.no_grad():
            latents = vae.encode(images.to(device, non_blocking=True)).latent_dist.sample(generator=on_device) * scaling_factor
        noise = torch.randn(latents.shape, generator=on_device, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (count,), generator=on_device, device=device)
        dropped = torch.rand(count, generator=step_generator("world-captions", recipe.seed, step)) < recipe.proportion_empty_prompts
        token_ids = torch.where(dropped[:, None], empty_caption, token_ids).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        with trainer.autocast():
            prediction = unet(noisy, timesteps, text_encoder(token_ids)[0]).sample
        return {"loss": F.mse_loss(prediction.float(), target.float())}

    unet.train()
    text_encoder.train()
    after_update = (lambda: ema.step(params.values())) if ema is not None else (lambda: None)
    done = trainer.run("diffusion", start, optimizer, params, weights, identity, step_loss, after_update)
    unet.eval()
    text_encoder.eval()
    return done, ema, params


def train_world(cfg: DictConfig, on_step: Callable[[str, int, dict[str, float]], None] | None = None) -> Path | None:
    """Run, resume or find finished the training `cfg.train_world` of `cfg.model`'s architecture; export it when
    finished. Returns the export folder, or None when the call stopped for its time budget (`max_minutes`).
    `on_step(stage, step, losses)` is called after each step (a test can stop the run there)."""
    recipe = WorldRecipe.from_config(OmegaConf.to_container(cfg.train_world, resolve=True))
    recipe.check()
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("kind") != "random":
        raise ConfigError(f"train-world trains a model config's architecture from its seeded random weights: give a kind: random model (model=tiny), not {model['name']}")
    failure_rates = read_failure_rates(project_path(cfg.failure_rates)) if cfg.failure_rates else None
    device = resolve_device(cfg.device)
    pipe = build_random_pipeline(model).to(device)
    trainer = Trainer(
        recipe, recipe.identity(model), project_path(recipe.output_dir), device, pipe.tokenizer, int(cfg.num_workers),
        time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None, cfg.commit or git_commit(), on_step,
    )
    trainer.out.mkdir(parents=True, exist_ok=True)
    vae_step = _train_vae(trainer, pipe.vae)
    if vae_step < recipe.vae.steps:
        return _stopped(trainer, "vae", vae_step)
    scaling_factor, vae_step = _finished_vae(trainer, pipe.vae, vae_step)
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    diffusion_step, ema, params = _train_diffusion(trainer, pipe, scaling_factor, vae_step)
    if diffusion_step < recipe.diffusion.steps:
        return _stopped(trainer, "diffusion", diffusion_step)
    if ema is not None:
        ema.copy_to(params.values())
    facts = _run_facts(trainer, model, scaling_factor, {"vae": vae_step, "diffusion": diffusion_step}, failure_rates)
    folder = export_pipeline(pipe, facts, project_path(recipe.export_dir), DTYPES[recipe.export_dtype], recipe.max_megabytes)
    print(f"train-world {recipe.name} finished: {folder} (model card {folder / 'README.md'})")
    return folder


def _run_facts(trainer: Trainer, model: dict[str, Any], scaling_factor: float, steps: dict[str, int], failure_rates) -> RunFacts:
    calls_path = trainer.out / CALLS_NAME
    calls = [json.loads(line) for line in calls_path.read_text().splitlines() if line.strip()] if calls_path.is_file() else []
    forms = list(trainer.recipe.forms)
    examples = {form: draw_training_scene(np.random.default_rng(0), [form], np.array([1.0])).caption for form in forms}
    logs = {stage: read_log(trainer.out / stage) for stage in STAGES}
    return RunFacts(dataclasses.asdict(trainer.recipe), model, examples, scaling_factor, steps, logs, calls, failure_rates)


def _stopped(trainer: Trainer, stage: str, step: int) -> None:
    steps = getattr(trainer.recipe, stage).steps
    print(f"train-world {trainer.recipe.name}: stopped for the time budget at {stage} step {step} of {steps}, "
          f"checkpointed in {trainer.out}; run the same command again to resume")
    return None
