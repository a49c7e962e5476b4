"""The one denoising loop every method shares.

It owns the scheduler, classifier-free guidance, the initial noise (one seeded CPU generator per image, so a
seed gives the same start on any device and for every method) and timing. Several seeds of one prompt run as
one batch. With method `vanilla` it computes exactly what diffusers' `StableDiffusionPipeline` computes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from evalkit.prompts import PromptSpec, TokenIndexer
from evalkit.sampling.attention import AttentionHooks
from evalkit.sampling.cuda_graphs import plain_forward
from evalkit.sampling.diagnostics import AttentionDiagnostics
from evalkit.sampling.method import Method


@dataclass(frozen=True)
class SamplingSettings:
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    eta: float = 0.0


@dataclass
class DenoisingRun:
    """What a method's hooks may read during one sampling call (one prompt, a batch of seeds)."""

    pipe: StableDiffusionPipeline
    spec: PromptSpec
    indexer: TokenIndexer
    settings: SamplingSettings
    seeds: list[int]
    cond_embeds: torch.Tensor  # (batch, 77, dim)
    uncond_embeds: torch.Tensor  # (batch, 77, dim)
    timesteps: torch.Tensor
    state: dict = field(default_factory=dict)  # a method's per-call state; nothing outlives the call
    # One per image: the CPU generators that drew the initial noise. A method that needs random numbers continues
    # its image's stream, so that an image depends only on its seed (not on the batch or earlier prompts).
    generators: list[torch.Generator] = field(default_factory=list)
    # What a method says about this call that a reader of its timings must know (work it skipped, say).
    notes: list[str] = field(default_factory=list)
    cuda_graphs: bool = True  # replay the UNet's plain forwards as CUDA graphs on a GPU (evalkit/sampling/cuda_graphs.py)
    diagnostics: AttentionDiagnostics | None = None  # reads the guided forwards' attention (evalkit/sampling/diagnostics.py)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @property
    def latent_size(self) -> int:
        return self.settings.height // self.pipe.vae_scale_factor

    @property
    def do_guidance(self) -> bool:
        return self.settings.guidance_scale > 1.0

    def noise(self, model_input: torch.Tensor, t, embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction; where no hook reads or edits attention, replayed from a CUDA graph."""
        return plain_forward(self.unet, model_input, t, embeddings, self.cuda_graphs)

    def guided_noise(self, t, latents, cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance: one UNet forward over [unconditional; conditional]. With the prompt's own
        conditional embeddings, the attention diagnostics (if any) read this forward."""
        observed = self.diagnostics is not None and cond is None
        cond = self.cond_embeds if cond is None else cond
        uncond = self.uncond_embeds if uncond is None else uncond
        with self.diagnostics.forward() if observed else contextlib.nullcontext():
            if not self.do_guidance:
                return self.noise(self.scheduler.scale_model_input(latents, t), t, cond)
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = self.noise(model_input, t, torch.cat([uncond, cond]))
        noise_uncond, noise_cond = noise.chunk(2)
        return noise_uncond + self.settings.guidance_scale * (noise_cond - noise_uncond)


@dataclass
class SampleResult:
    images: list[Image.Image]
    latents: torch.Tensor
    seconds: float  # wall time of the whole call (prompt encoding to decoded images)
    peak_memory_bytes: int | None  # accelerator peak during the call; None on a CPU
    failed_step: list[int | None]  # per image: first loop index with NaN/inf latents, or None
    notes: list[str] = field(default_factory=list)  # the method's notes on this call (`DenoisingRun.notes`)
    # Per image, its attention diagnostics (`AttentionDiagnostics.results`); None with the reason why there are none.
    attention_diagnostics: list[dict] | None = None
    attention_diagnostics_skipped: str | None = None
    selection: list[dict] | None = None  # per image, how a selecting method (best_of_n) chose it among candidates


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quarantine(latents: torch.Tensor, failed_at: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark loop index `i` in `failed_at` (per image, -1 while it is finite) for each image whose latents are newly
    NaN or inf, and zero every failed image's latents: the image is lost, and its NaN must not reach a method's
    loss, where one image's NaN can raise (a distribution of NaN probabilities) and stop the whole batch. Done on
    the device with no branch on its result, so the loop never waits for the GPU."""
    bad = ~torch.isfinite(latents.detach()).flatten(1).all(dim=1)
    failed_at = torch.where(bad & (failed_at < 0), i, failed_at)
    return torch.where(bad.view(-1, *[1] * (latents.dim() - 1)), torch.zeros_like(latents), latents), failed_at


def sample(
    pipe: StableDiffusionPipeline,
    method: Method,
    spec: PromptSpec,
    seeds: list[int],
    settings: SamplingSettings,
    indexer: TokenIndexer | None = None,
    on_step=None,
    cuda_graphs: bool = True,
    attention_diagnostics: int | None = None,
) -> SampleResult:
    """Generate one image per seed for `spec` with `method`. `on_step(i, t, latents)` sees each step's result;
    `cuda_graphs=False` runs every UNet forward eagerly; `attention_diagnostics`: the resolution of the maps whose
    diagnostics to record (None: none)."""
    device = pipe.unet.device
    indexer = indexer or TokenIndexer(pipe.tokenizer)
    method.preflight(spec, indexer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    start = time.perf_counter()

    n = len(seeds)
    cond, uncond = pipe.encode_prompt(spec.prompt, device, n, settings.guidance_scale > 1.0)
    pipe.scheduler.set_timesteps(settings.num_inference_steps, device=device)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = pipe.prepare_latents(
        n, pipe.unet.config.in_channels, settings.height, settings.width, cond.dtype, device, generators
    )
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generators, settings.eta)
    run = DenoisingRun(
        pipe, spec, indexer, settings, list(seeds), cond, uncond, pipe.scheduler.timesteps, generators=generators,
        cuda_graphs=cuda_graphs,
    )
    failed_at = torch.full((n,), -1, dtype=torch.long, device=device)

    observation = None
    try:
        method.setup(run)
        if attention_diagnostics is not None:
            run.diagnostics = AttentionDiagnostics.for_run(run, attention_diagnostics)
        if run.diagnostics is not None:
            # After the method's hooks, so that the diagnostics read the maps its edits give.
            observation = AttentionHooks(run.unet, run.diagnostics.layers, observer=run.diagnostics).install()
        for i, t in enumerate(run.timesteps):
            if run.diagnostics is not None:
                run.diagnostics.step = i
            latents, failed_at = _quarantine(method.update_latents(run, i, t, latents), failed_at, i)
            with torch.no_grad():
                noise = method.predict_noise(run, i, t, latents)
                latents = pipe.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
            latents, failed_at = _quarantine(latents, failed_at, i)
            if on_step is not None:
                on_step(i, t, latents)
    finally:
        if observation is not None:
            observation.remove()
        method.teardown(run)

    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * n)
    failed_step = [None if step < 0 else step for step in failed_at.tolist()]
    diagnostics = None if run.diagnostics is None else run.diagnostics.results()
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return SampleResult(images, latents, seconds, peak, failed_step, run.notes, diagnostics,
                        None if diagnostics is not None else _diagnostics_skipped(attention_diagnostics, run))


def _diagnostics_skipped(resolution: int | None, run: DenoisingRun) -> str:
    """Why a call recorded no attention diagnostics (its records say so)."""
    if resolution is None:
        return "not requested"
    if run.diagnostics is None:
        return "the prompt lists no subjects"
    return "the method never ran the prompt's own conditional embedding through the guided forward (DenoisingRun.guided_noise)"
