"""What Attend-and-Excite and CONFORM share: before a denoising step, each image's latent takes gradient steps on a
loss over its own cross-attention maps (CONFORM's official pipeline is a copy of A&E's with another loss).

Per image and loop index i (the guidance forward uses the conditional embedding only, batch 1, gradients on and no
`scale_model_input`, as both references do):

1. a UNet forward records the cross-attention at `attention_res`, averaged over heads and layers; the method's
   loss is computed from it;
2. if the method refines at i: up to n times (fewer if the loss reaches the method's target) step the latent and
   recompute the loss, then one more forward gives the loss used below;
3. while i < `max_iter_to_alter` and loss != 0: z <- z - step_size[i] * dloss/dz, with
   step_size = scale_factor * sqrt(linspace(*scale_range, len(timesteps))).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from evalkit.errors import ConfigError
from evalkit.sampling.attention import AttentionHooks, CrossAttentionRecorder, layers_at_resolution
from evalkit.sampling.method import Method
from evalkit.sampling.smoothing import gaussian_kernel


def softmax_over_text_tokens(attention_maps: torch.Tensor) -> torch.Tensor:
    """(res, res, 75): the softmax of 100 x maps over the tokens without SOT and the last position (EOT and padding
    stay in, as both references do for SD 1.x). Position p of the prompt is at p - 1."""
    return torch.softmax(100 * attention_maps[:, :, 1:-1], dim=-1)


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
    def attention_loss(self, run, image: int, maps: torch.Tensor) -> torch.Tensor:
        """The loss of image `image` (index in the batch) from its (res, res, 77) maps of this forward."""

    @abstractmethod
    def refinement(self, i: int, loss: torch.Tensor) -> tuple[int, float] | None:
        """At loop index i with this loss: None, or (iterations, the loss at or below which refinement stops)."""

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
        updated = []
        with torch.enable_grad():
            for image in range(run.batch_size):
                latent = latents[image : image + 1].detach().requires_grad_(True)
                loss = self._loss(run, image, t, latent)
                refinement = self.refinement(i, loss)
                if refinement is not None:
                    latent, loss = self._refine(run, image, t, latent, loss, step_size, *refinement)
                if i < self.max_iter_to_alter and loss != 0:
                    latent = self._step(latent, loss, step_size)
                updated.append(latent.detach())
        return torch.cat(updated)

    def _loss(self, run, image, t, latent) -> torch.Tensor:
        """One guidance forward of a single image (batch 1, conditional only) and the method's loss."""
        maps = run.state["recorder"].record(run.unet, latent, t, run.cond_embeds[image : image + 1])[0]
        return self.attention_loss(run, image, maps)

    @staticmethod
    def _step(latent, loss, step_size) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, [latent])
        return latent - step_size * grad

    def _refine(self, run, image, t, latent, loss, step_size, iterations, target):
        """Step until the loss is at most `target` (or the iterations run out), then measure again."""
        for _ in range(iterations):
            if loss <= target:
                break
            latent = latent.detach().requires_grad_(True)
            loss = self._loss(run, image, t, latent)
            if loss != 0:
                latent = self._step(latent, loss, step_size)
        latent = latent.detach().requires_grad_(True)
        return latent, self._loss(run, image, t, latent)
