"""What Attend-and-Excite and CONFORM share: before a denoising step, each image's latent takes gradient steps on a
loss over its own cross-attention maps (CONFORM's official pipeline is a copy of A&E's with another loss).

At loop index i (the guidance forward uses the conditional embeddings only, gradients on and no
`scale_model_input`, as both references do):

1. one UNet forward over the batch records the cross-attention at `attention_res`, averaged over heads and layers;
   the method's loss of each image is computed from that image's maps;
2. if the method refines at i, each image whose loss is above the method's target refines: up to n times, while
   its loss is above the target, its latent steps and its loss is recomputed; then one more forward over the
   refined images gives the loss used below;
3. while i < `max_iter_to_alter`, each image whose loss != 0: z <- z - step_size[i] * dloss/dz, with
   step_size = scale_factor * sqrt(linspace(*scale_range, len(timesteps))).

The references guide one image at a time. Here each forward runs every image that needs it, and one backward of
the sum of their losses gives each image exactly its own gradient (the UNet treats the samples of a batch
independently), so every image is guided as it would be alone, its refinement stopping when its own loss
reaches the target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from evalkit.errors import ConfigError
from evalkit.sampling.attention import (
    AttentionHooks,
    CrossAttentionRecorder,
    layers_at_resolution,
)
from evalkit.sampling.method import Method
from evalkit.sampling.smoothing import gaussian_kernel, smooth


def softmax_over_text_tokens(attention_maps: torch.Tensor) -> torch.Tensor:
    """(..., res, res, 75): the softmax of 100 x maps over the tokens without SOT and the last position (EOT and
    padding stay in, as both references do for SD 1.x). Position p of the prompt is at p - 1."""
    return torch.softmax(100 * attention_maps[..., 1:-1], dim=-1)


def token_maps(attention_maps: torch.Tensor, token_indices: list[int], kernel: torch.Tensor | None) -> torch.Tensor:
    """Each token's map as Attend-and-Excite reads it, (..., tokens, res, res), from (..., res, res, 77) maps
    averaged over heads and layers: softmax over the text tokens (`softmax_over_text_tokens`), then smoothed with
    `kernel` (None: not smoothed). Token indices count SOT as 0, hence the -1 shift."""
    text_attention = softmax_over_text_tokens(attention_maps)
    maps = torch.stack([text_attention[..., index - 1] for index in token_indices], dim=-3)
    return maps if kernel is None else smooth(maps, kernel)


def subject_maxima(attention_maps: torch.Tensor, token_indices: list[int], kernel: torch.Tensor | None) -> torch.Tensor:
    """The peak of each token's map (`token_maps`), (..., tokens): what Attend-and-Excite maximises."""
    return token_maps(attention_maps, token_indices, kernel).amax(dim=(-2, -1))


@dataclass
class AttentionGuidance(Method, ABC):
    """Base of methods that optimise each image's latent on a loss over its cross-attention maps.

    Subclasses define `attention_loss`, `refinement` and `guides_at`.
    """

    max_iter_to_alter: int = 25
    scale_factor: float = 20
    scale_range: tuple[float, float] = (1.0, 0.5)
    attention_res: int = 16
    smooth_attentions: bool = True
    sigma: float = 0.5
    kernel_size: int = 3

    def __post_init__(self):
        self.scale_range = tuple(float(s) for s in self.scale_range)
        if len(self.scale_range) != 2:
            raise ValueError(f"scale_range must be (start, end), got {self.scale_range}")

    @abstractmethod
    def attention_loss(self, run, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """The (n,) losses of n images from their (n, res, res, 77) maps of this forward. `images`: their indices
        in the batch (the first forward at a loop index has every image, in order)."""

    @abstractmethod
    def refinement(self, i: int) -> tuple[int, float] | None:
        """At loop index i: None, or (iterations, target): each image whose loss is above target refines, until its
        loss is at most target or the iterations run out."""

    @abstractmethod
    def guides_at(self, i: int) -> bool:
        """Whether step i needs the guidance forwards (elsewhere they are skipped: they could change nothing)."""

    def prepare(self, run) -> None:
        """Per-call state of the subclass (`run.state`), set before the attention hooks are installed."""

    def setup(self, run):
        layers = layers_at_resolution(run.unet, run.latent_size, self.attention_res, places=("up", "down", "mid"))
        if not layers:
            raise ConfigError(
                f"method {self.name}: the UNet has no {self.attention_res}x{self.attention_res} cross-attention "
                f"layers at {run.settings.height}x{run.settings.width} px; set attention_res"
            )
        scale = np.linspace(self.scale_range[0], self.scale_range[1], len(run.timesteps))
        recorder = CrossAttentionRecorder(layers, self.attention_res)
        run.state.update(
            recorder=recorder,
            step_sizes=(self.scale_factor * np.sqrt(scale)).tolist(),
            kernel=gaussian_kernel(self.kernel_size, self.sigma).to(run.unet.device) if self.smooth_attentions else None,
        )
        self.prepare(run)
        # Last, so that nothing can fail between installing the hooks and the loop's try/finally that removes them.
        run.state["hooks"] = AttentionHooks(run.unet, layers, recorder).install()

    def teardown(self, run):
        if "hooks" in run.state:
            run.state.pop("hooks").remove()

    def update_latents(self, run, i, t, latents):
        if not self.guides_at(i):
            return latents
        step_size = run.state["step_sizes"][i]
        alters = i < self.max_iter_to_alter
        refinement = self.refinement(i)
        images = torch.arange(run.batch_size, device=latents.device)
        with torch.enable_grad():
            latents = latents.detach().requires_grad_(True)
            losses = self._losses(run, t, latents, images)
            refined = images[:0] if refinement is None else self._above(losses, refinement[1])
            updated = latents.detach()
            if alters and len(refined) < run.batch_size:  # the images that do not refine step on this forward
                updated = self._step(latents, losses, step_size)
            if len(refined):
                losses = losses.detach()  # frees this forward's graph before the refinement's forwards
                refined_latents, refined_losses = self._refine(
                    run, t, latents.detach()[refined], losses[refined], refined, step_size, *refinement
                )
                if alters:
                    refined_latents = self._step(refined_latents, refined_losses, step_size)
                updated = updated.index_copy(0, refined, refined_latents.detach())
        return updated

    def _losses(self, run, t, latents, images) -> torch.Tensor:
        """One guidance forward of these images (conditional embeddings only) and each one's loss."""
        maps = run.state["recorder"].record(run.unet, latents, t, run.cond_embeds[images])
        return self.attention_loss(run, images, maps)

    @staticmethod
    def _step(latents, losses, step_size) -> torch.Tensor:
        """z <- z - step_size * dloss/dz for each image whose loss != 0. The gradient of the sum of the losses is
        each image's own: the images of a forward do not interact."""
        (grad,) = torch.autograd.grad(losses.sum(), [latents])
        nonzero = (losses != 0).view(-1, *[1] * (latents.dim() - 1))
        return torch.where(nonzero, latents - step_size * grad, latents).detach()

    @staticmethod
    def _above(losses, target) -> torch.Tensor:
        """The indices of the losses above `target`. Reading them is a host sync (the refinement needs their number
        on the CPU); a target of -inf needs none: every loss is above it."""
        if target == float("-inf"):
            return torch.arange(len(losses), device=losses.device)
        return (losses > target).nonzero().flatten()

    def _refine(self, run, t, latents, losses, images, step_size, iterations, target):
        """Step each image until its loss is at most `target` (or the iterations run out), then measure again.

        `images` are the batch indices of the rows. Each iteration's forward runs only the images still above
        their target; an image that reaches it stops stepping, as it would alone.
        """
        for _ in range(iterations):
            refining = self._above(losses, target)
            if not len(refining):
                break
            latent = latents[refining].requires_grad_(True)
            loss = self._losses(run, t, latent, images[refining])
            latents = latents.index_copy(0, refining, self._step(latent, loss, step_size))
            losses = losses.index_copy(0, refining, loss.detach())
        latents.requires_grad_(True)
        return latents, self._losses(run, t, latents, images)
