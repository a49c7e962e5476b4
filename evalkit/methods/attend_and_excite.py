"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): before each denoising step, push the latent so that every
subject token gets a strong peak in the 16x16 cross-attention maps.

Follows the official repository (yuval-alaluf/Attend-and-Excite) and diffusers'
`StableDiffusionAttendAndExcitePipeline`, which compute bit-identical latents. Per image and loop index i:

1. A UNet forward with the conditional embedding only (gradients on, no `scale_model_input`, as the reference
   does) records the cross-attention at 16x16; the maps are averaged over heads and layers.
2. Each subject token's map (softmax over the text tokens of 100 x maps) is smoothed; the loss is
   max_s max(0, 1 - max(map_s)).
3. At the refinement indices (`thresholds`), while loss > 1 - threshold, step the latent and recompute, at most
   `max_refinement_steps` times; then one more forward gives the loss used below.
4. While i < `max_iter_to_alter` and loss != 0: z <- z - step_size[i] * dloss/dz.

The classifier-free-guidance step of the shared loop then uses the updated latent.

The reference guides one image at a time; here the images of a batch share each forward and backward
(`evalkit.sampling.attention_guidance`), and each still gets exactly its own gradient and stops refining when its
own loss reaches the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from evalkit.sampling.attention_guidance import AttentionGuidance, subject_maxima
from evalkit.sampling.method import METHODS


def attend_and_excite_loss(maxima: torch.Tensor) -> torch.Tensor:
    """max over subjects of max(0, 1 - peak): the most neglected subject sets the loss. `maxima`: (..., subjects)."""
    return torch.clamp(1.0 - maxima, min=0.0).amax(dim=-1)


@METHODS.register
@dataclass
class AttendAndExcite(AttentionGuidance):
    """Attend-and-Excite with the paper's defaults (official `config.py`, diffusers' pipeline).

    `thresholds` maps loop indices to the attention peak every subject must reach there; `scale_range` and
    `scale_factor` give the step size scale_factor * sqrt(linspace(*scale_range, len(timesteps))[i]). A subject
    word that the tokenizer splits into several pieces contributes each piece as a separate token index.
    """

    name = "attend_and_excite"
    requires = ("subjects",)

    thresholds: dict[int, float] = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})
    max_refinement_steps: int = 20

    def __post_init__(self):
        super().__post_init__()
        # YAML (and OmegaConf) may give the loop indices as strings.
        self.thresholds = {int(index): float(value) for index, value in dict(self.thresholds).items()}

    def prepare(self, run):
        run.state["token_indices"] = [index for word in run.indexer.subject_indices(run.spec) for index in word]

    def guides_at(self, i):
        return i < self.max_iter_to_alter or i in self.thresholds

    def refinement(self, i):
        # The reference refines the images whose loss > 1 - threshold, towards max(0, 1 - threshold). Refining those
        # above the target is the same, but for a threshold above 1 and a loss of 0, which it refines for no
        # iteration and measures again unchanged.
        return (self.max_refinement_steps, max(0.0, 1.0 - self.thresholds[i])) if i in self.thresholds else None

    def attention_loss(self, run, images, maps):
        return attend_and_excite_loss(subject_maxima(maps, run.state["token_indices"], run.state["kernel"]))
