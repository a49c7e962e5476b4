"""Separate-and-Enhance's losses on the 16x16 cross-attention maps of two concepts (Bao et al., SIGGRAPH 2024).

A concept's maps are a (pieces, heads, res, res) stack: one map per BPE piece of its word (most words have one)
and per attention head, each averaged over the cross-attention layers at that resolution, with the softmax over
all 77 text tokens as the UNet computes it. As in the released code the heads stay separate channels: the maxima
run over heads and positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evalkit.sampling.diagnostics import soft_overlap
from evalkit.sampling.smoothing import smooth


def separate_loss(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """max of A*B/(A+B) over heads and positions: large where both concepts attend to the same place. For
    multi-piece words, every piece of one concept is paired with every piece of the other."""
    return soft_overlap(maps_a[:, None], maps_b[None, :]).max()


def enhance_loss(maps_a: torch.Tensor, maps_b: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """1 - the smaller of the two concepts' peaks, each the maximum of its smoothed maps over heads and positions
    (a multi-piece word contributes each piece's peak, so its weakest piece counts, as in Attend-and-Excite)."""
    peaks = torch.cat([smooth(maps, kernel).flatten(1).amax(dim=1) for maps in (maps_a, maps_b)])
    return 1.0 - peaks.min()


def norm_loss(noise_pred: torch.Tensor, frozen_noise_pred: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the finetuned and the frozen model's noise predictions for single-concept
    prompts: keeps what the model does for one object (the large-scale recipe's regulariser)."""
    return F.mse_loss(noise_pred.float(), frozen_noise_pred.float(), reduction="mean")
