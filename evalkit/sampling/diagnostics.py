"""Attention diagnostics: per image and denoising step, the statistics the attention papers argue about.

- **Subject peak**, for each subject of the prompt (`subjects`): the maximum of its smoothed cross-attention map,
  what Attend-and-Excite maximises, read as A&E reads it (`token_maps`): the `resolution` x `resolution`
  cross-attention of the up, down and mid layers averaged over heads and layers, the softmax of 100 x maps over the
  text tokens without SOT, A&E's 3x3 Gaussian (sigma 0.5 as coded). A word the tokenizer splits counts its weakest
  piece, as A&E's loss reads every piece.
- **Overlap**, for each pair of subjects: max over positions of A*B / (A+B), the term Separate-and-Enhance's
  Separate loss minimises (`soft_overlap`), on the same maps as the peaks (SepEn's finetune computes it per head
  on the UNet's own softmax over all 77 tokens; here it describes the maps the peaks describe). 0 where the maps
  never meet; it grows where both subjects take the same position.

They are read in the forward whose noise prediction the scheduler steps with (`DenoisingRun.guided_noise`, its
conditional half): after the method's latent update of that step, with its attention edits (Attention Regulation,
DenseDiffusion). A method that never runs the prompt's own conditional embedding there (Composable Diffusion runs
its sub-prompts) has none.

The observed forward computes exactly what an unobserved one does: where no method hook edits the layer, its own
(fused) processor gives the output and the probabilities of the conditional samples are computed beside it. The
statistics stay on the device during the call (no host synchronisation in the loop) and move to the CPU once, at
its end. Cost: README, "Attention diagnostics"; on a GPU an observed forward runs eagerly, not from a CUDA graph.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch

from evalkit.errors import ConfigError
from evalkit.sampling.attention import (
    CrossAttentionRecorder,
    attention_layers,
    layer_downsampling,
    layers_at_resolution,
)
from evalkit.sampling.attention_guidance import token_maps
from evalkit.sampling.smoothing import gaussian_kernel

# Attend-and-Excite's smoothing (official config.py): the peaks are those its loss reads.
SMOOTHING_KERNEL_SIZE = 3
SMOOTHING_SIGMA = 0.5


def soft_overlap(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """A*B / (A+B) at every position (broadcast): Separate-and-Enhance's overlap of two attention maps; 0 where both
    are 0 (a division by zero otherwise)."""
    total = maps_a + maps_b
    return torch.where(total > 0, maps_a * maps_b / total, 0)


def missing_resolution(unet, latent_size: int, resolution: int) -> str | None:
    """Why the UNet has no cross-attention maps of `resolution` x `resolution` at this latent size (None: it has)."""
    if layers_at_resolution(unet, latent_size, resolution):
        return None
    sizes = sorted({latent_size // layer_downsampling(unet, layer) for layer in attention_layers(unet, cross=True)})
    return (f"the model has no {resolution}x{resolution} cross-attention layers at a {latent_size}x{latent_size} "
            f"latent (its maps are {', '.join(f'{size}x{size}' for size in sizes)})")


class AttentionDiagnostics:
    """The observer of one sampling call (`AttentionObserver`): collects the conditional samples' maps of each
    observed forward and keeps each step's peaks and overlaps on the device until `results`."""

    def __init__(self, layers: list[str], resolution: int, subjects: list[str], subject_tokens: list[list[int]],
                 steps: int, images: int, device: torch.device):
        self.layers = layers
        self.resolution = resolution
        self.subjects = subjects
        self.pairs = [(a, b) for a in range(len(subjects)) for b in range(a + 1, len(subjects))]
        self.token_indices = [index for pieces in subject_tokens for index in pieces]
        # Each subject's pieces are consecutive in `token_indices`: slices, not index lists (a list index is copied
        # to the device on every use).
        ends = itertools.accumulate(len(pieces) for pieces in subject_tokens)
        self.spans = [slice(end - len(pieces), end) for end, pieces in zip(ends, subject_tokens)]
        self.kernel = gaussian_kernel(SMOOTHING_KERNEL_SIZE, SMOOTHING_SIGMA).to(device)
        self.recorder = CrossAttentionRecorder(layers, resolution)  # keeps each layer's maps and averages them
        self.values = torch.full((steps, images, len(subjects) + len(self.pairs)), math.nan, device=device)
        self.observed_steps: list[int] = []
        self.step = 0  # the loop index the coming forwards belong to (set by the loop)
        self.samples = images
        self.active = False

    @classmethod
    def for_run(cls, run, resolution: int) -> AttentionDiagnostics | None:
        """The observer of a sampling call; None for a prompt without subjects (nothing to measure)."""
        missing = missing_resolution(run.unet, run.latent_size, resolution)
        if missing is not None:
            raise ConfigError(f"attention diagnostics: {missing}; set attention_diagnostics.resolution to one of them, "
                              "or attention_diagnostics.record=false")
        layers = layers_at_resolution(run.unet, run.latent_size, resolution)
        if not run.spec.subjects:
            return None
        return cls(layers, resolution, list(run.spec.subjects), run.indexer.subject_indices(run.spec),
                   len(run.timesteps), run.batch_size, run.unet.device)

    def observe(self, layer: str, probs: torch.Tensor) -> None:
        self.recorder.maps[layer] = probs

    @contextlib.contextmanager
    def forward(self):
        """Observe the forward run inside: its last `samples` samples are the prompt's conditional ones."""
        self.active = True
        try:
            yield
        finally:
            self.active = False
        maps = self.recorder.average(self.samples).float()
        self.recorder.maps.clear()
        tokens = token_maps(maps, self.token_indices, self.kernel)  # (images, tokens, res, res)
        token_peaks = tokens.amax(dim=(-2, -1))
        peaks = [token_peaks[:, span].amin(dim=1) for span in self.spans]
        overlaps = [
            soft_overlap(tokens[:, self.spans[a], None], tokens[:, None, self.spans[b]]).flatten(1).amax(dim=1)
            for a, b in self.pairs
        ]
        self.values[self.step] = torch.stack(peaks + overlaps, dim=1)
        if not self.observed_steps or self.observed_steps[-1] != self.step:
            self.observed_steps.append(self.step)

    def results(self) -> list[dict] | None:
        """Per image, what its record stores (one transfer to the CPU); None when no forward was observed."""
        if not self.observed_steps:
            return None
        values = self.values.cpu()[self.observed_steps]
        n_subjects = len(self.subjects)

        def series(column: torch.Tensor) -> list[float | None]:
            return [None if math.isnan(v) else v for v in column.tolist()]  # a failed image's NaN: JSON has none

        return [
            {
                "resolution": self.resolution,
                "subjects": self.subjects,
                "steps": list(self.observed_steps),
                "subject_peak": [series(values[:, image, k]) for k in range(n_subjects)],
                "pairs": [list(pair) for pair in self.pairs],
                "overlap": [series(values[:, image, n_subjects + k]) for k in range(len(self.pairs))],
            }
            for image in range(values.shape[1])
        ]
