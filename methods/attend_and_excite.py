"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): before each denoising step, push the latent so that every
subject token gets a strong peak in the 16x16 cross-attention maps.

Follows the official repository (yuval-alaluf/Attend-and-Excite) and diffusers'
`StableDiffusionAttendAndExcitePipeline`, which compute bit-identical latents. Per image and loop index i:

1. A UNet forward with the conditional embedding only (batch 1, gradients on, no `scale_model_input`, as the
   reference does) records the cross-attention at 16x16; the maps are averaged over heads and layers.
2. Each subject token's map (softmax over the text tokens of 100 x maps) is smoothed; the loss is
   max_s max(0, 1 - max(map_s)).
3. At the refinement indices (`thresholds`), while loss > 1 - threshold, step the latent and recompute, at most
   `max_refinement_steps` times; then one more forward gives the loss used below.
4. While i < `max_iter_to_alter` and loss != 0: z <- z - step_size[i] * dloss/dz.

The classifier-free-guidance step of the shared loop then uses the updated latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from evalkit.errors import ConfigError
from evalkit.sampling.attention import AttentionHooks, CrossAttentionRecorder, layers_at_resolution
from evalkit.sampling.method import Method, register_method
from evalkit.sampling.smoothing import gaussian_kernel, smooth


def subject_maxima(attention_maps: torch.Tensor, token_indices: list[int], kernel: torch.Tensor | None) -> torch.Tensor:
    """The peak of each subject token's map, from (res, res, 77) maps averaged over heads and layers.

    The softmax runs over the text tokens without SOT and the last position (EOT and padding stay in, as in
    A&E for SD 1.x); the x100 sharpens it. Token indices count SOT as 0, hence the -1 shift.
    """
    text_attention = torch.softmax(100 * attention_maps[:, :, 1:-1], dim=-1)
    maxima = []
    for index in token_indices:
        subject_map = text_attention[:, :, index - 1]
        if kernel is not None:
            subject_map = smooth(subject_map, kernel)
        maxima.append(subject_map.max())
    return torch.stack(maxima)


def attend_and_excite_loss(maxima: torch.Tensor) -> torch.Tensor:
    """max over subjects of max(0, 1 - peak): the most neglected subject sets the loss."""
    return torch.clamp(1.0 - maxima, min=0.0).max()


@register_method
@dataclass
class AttendAndExcite(Method):
    """Attend-and-Excite with the paper's defaults (official `config.py`, diffusers' pipeline).

    `thresholds` maps loop indices to the attention peak every subject must reach there; `scale_range` and
    `scale_factor` give the step size scale_factor * sqrt(linspace(*scale_range, len(timesteps))[i]). A subject
    word that the tokenizer splits into several pieces contributes each piece as a separate token index.
    """

    name = "attend_and_excite"
    requires = ("subjects",)

    max_iter_to_alter: int = 25
    thresholds: dict[int, float] = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})
    scale_factor: float = 20
    scale_range: tuple[float, float] = (1.0, 0.5)
    attention_res: int = 16
    smooth_attentions: bool = True
    sigma: float = 0.5
    kernel_size: int = 3
    max_refinement_steps: int = 20

    def __post_init__(self):
        # YAML (and OmegaConf) may give the loop indices as strings.
        self.thresholds = {int(index): float(value) for index, value in dict(self.thresholds).items()}
        self.scale_range = tuple(float(s) for s in self.scale_range)
        if len(self.scale_range) != 2:
            raise ValueError(f"scale_range must be (start, end), got {self.scale_range}")

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
            token_indices=[index for word in run.indexer.subject_indices(run.spec) for index in word],
            kernel=gaussian_kernel(self.kernel_size, self.sigma).to(run.unet.device) if self.smooth_attentions else None,
        )
        # Last, so that nothing can fail between installing the hooks and the loop's try/finally that removes them.
        run.state["hooks"] = AttentionHooks(run.unet, layers, recorder).install()

    def teardown(self, run):
        if "hooks" in run.state:
            run.state.pop("hooks").remove()

    def update_latents(self, run, i, t, latents):
        if i >= self.max_iter_to_alter and i not in self.thresholds:
            return latents  # nothing below could change the latent
        step_size = run.state["step_sizes"][i]
        updated = []
        with torch.enable_grad():
            for k in range(run.batch_size):
                cond = run.cond_embeds[k : k + 1]
                latent = latents[k : k + 1].detach().requires_grad_(True)
                loss = self._loss(run, t, latent, cond)
                if i in self.thresholds and loss > 1.0 - self.thresholds[i]:
                    latent, loss = self._refine(run, t, latent, cond, loss, self.thresholds[i], step_size)
                if i < self.max_iter_to_alter and loss != 0:
                    latent = self._step(latent, loss, step_size)
                updated.append(latent.detach())
        return torch.cat(updated)

    def _loss(self, run, t, latent, cond) -> torch.Tensor:
        """One guidance forward of a single image (batch 1, conditional only) and its A&E loss."""
        maps = run.state["recorder"].record(run.unet, latent, t, cond)[0]
        return attend_and_excite_loss(subject_maxima(maps, run.state["token_indices"], run.state["kernel"]))

    @staticmethod
    def _step(latent, loss, step_size) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, [latent])
        return latent - step_size * grad

    def _refine(self, run, t, latent, cond, loss, threshold, step_size):
        """Step until every subject's peak reaches `threshold` (or the iterations run out), then measure again."""
        target = max(0.0, 1.0 - threshold)
        for _ in range(self.max_refinement_steps):
            if loss <= target:
                break
            latent = latent.detach().requires_grad_(True)
            loss = self._loss(run, t, latent, cond)
            if loss != 0:
                latent = self._step(latent, loss, step_size)
        latent = latent.detach().requires_grad_(True)
        return latent, self._loss(run, t, latent, cond)
