"""The 3x3 "Gaussian" smoothing of attention maps that Attend-and-Excite, CONFORM and Separate-and-Enhance share.

Reproduced exactly as their code computes it (A&E `utils/gaussian_smoothing.py`): the exponent is
-((x - mu) / (2 sigma))^2, not -(x - mu)^2 / (2 sigma^2), so sigma=0.5 acts as sigma~0.707, and the map is
reflect-padded so it keeps its size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(kernel_size: int, sigma: float) -> torch.Tensor:
    """The normalised 2-D kernel, computed as A&E's `GaussianSmoothing` does."""
    coords = torch.arange(kernel_size, dtype=torch.float32)
    mean = (kernel_size - 1) / 2
    kernel = torch.ones(kernel_size, kernel_size)
    for grid in torch.meshgrid([coords, coords], indexing="ij"):
        kernel = kernel * (1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - mean) / (2 * sigma)) ** 2)))
    return kernel / kernel.sum()


def smooth(attention_map: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Smooth a (res, res) map, or each map of a (..., res, res) stack separately, with reflect padding."""
    pad = kernel.shape[-1] // 2
    maps = attention_map.reshape(-1, 1, *attention_map.shape[-2:])
    padded = F.pad(maps, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, kernel[None, None].to(attention_map)).reshape(attention_map.shape)
