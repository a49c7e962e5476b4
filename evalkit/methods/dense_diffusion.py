"""DenseDiffusion (Kim et al., ICCV 2023): generate from a caption plus a layout, i.e. segments that each pair a
phrase of the caption with a mask, by modulating the attention logits toward the layout (training-free).

Follows the official repository (naver-ai/DenseDiffusion, `inference.ipynb` / `gradio_app.py`: `mod_forward` and
the text-conditioning cell), which samples with DDIM: run this method with `sampling.scheduler=ddim` to match it.

1. Text conditioning: the caption's embedding, in which each segment phrase's tokens are replaced by the phrase's
   own embedding (the phrase encoded alone, without its start and end tokens). Every step uses it.
2. At every attention layer of the UNet (self and cross, all resolutions), for the conditional half of the batch
   and while the step is in the first `reg_part` of the loop, the logits S = QK^T * scale are moved toward their
   row maximum where the layout says "attend" (M = 1) and toward their row minimum elsewhere:

       S += w * lambda_t * R * M * (max_j S - S)
       S -= w * lambda_t * R * (1 - M) * (S - min_j S)        (max and min taken before the first line)

   with lambda_t = (t / 1000)^5 and R = 1 - sizereg * (area of the query pixel's segment(s)) / (pixels).
   Self-attention: M[p, q] = 1 when pixels p and q share a segment, w = sreg. Cross-attention: M[p, k] = 1 when
   token k belongs to a segment phrase whose mask covers p, w = creg; the start token, padding and words outside
   every phrase have M = 0. Masks are resized to each layer's map with nearest-neighbour sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evalkit.errors import DatasetError, PromptError
from evalkit.prompts import read_mask
from evalkit.sampling.attention import (
    AttentionHooks,
    attention_layers,
    layer_downsampling,
)
from evalkit.sampling.method import METHODS, Method


def modulation_weights(attend: torch.Tensor, size_weight: torch.Tensor, weight: float, time_weight: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """w * lambda_t * R * M and w * lambda_t * R * (1 - M), (queries, keys), multiplied in the official order.

    attend: (queries, keys) bool, M; size_weight: (queries, 1), R; weight: w (creg or sreg); time_weight: lambda_t.
    """
    return attend * size_weight * weight * time_weight, ~attend * size_weight * weight * time_weight


def modulate_logits(logits: torch.Tensor, toward_max: torch.Tensor, toward_min: torch.Tensor) -> torch.Tensor:
    """DenseDiffusion's modulation of (rows, queries, keys) logits, in place: each row moves toward its maximum
    by `toward_max` and toward its minimum by `toward_min` (both from `modulation_weights`)."""
    low = logits.min(-1)[0].unsqueeze(-1)
    high = logits.max(-1)[0].unsqueeze(-1)
    logits += toward_max * (high - logits)
    logits -= toward_min * (logits - low)
    return logits


def self_attention_layout(masks: torch.Tensor, size: tuple[int, int], sizereg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M (pixels, pixels) and R (pixels, 1) for self-attention at a `size` map, from (segments, 1, h, w) masks."""
    flat = F.interpolate(masks, size, mode="nearest").flatten(1)  # (segments, pixels)
    together = flat.T @ flat  # how many segments hold both pixels (0/1 masks: exact)
    pixels = flat.shape[1]
    return together > 0, 1 - sizereg * together.sum(-1, keepdim=True) / pixels


def cross_attention_layout(token_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """M (pixels, tokens) for cross-attention at a `size` map, from (tokens, h, w) per-token masks."""
    return F.interpolate(token_masks[None], size, mode="nearest").flatten(2)[0].T > 0


class LayoutModulation:
    """The attention hook: modulates the logits of the conditional rows while a step's lambda_t is set.

    M and R depend only on the map size, so every layer of one size shares them, and within a step their products
    with w and lambda_t too: those are computed once per step, size and attention kind.
    """

    def __init__(self, layer_sizes: dict[str, tuple[int, int]], masks: torch.Tensor, token_masks: torch.Tensor,
                 sizereg: float, creg: float, sreg: float, guided: bool):
        self.layer_sizes = layer_sizes
        self.layouts = {
            size: (self_attention_layout(masks, size, sizereg), cross_attention_layout(token_masks, size))
            for size in set(layer_sizes.values())
        }
        self.creg = creg
        self.sreg = sreg
        self.guided = guided
        self.time_weight: torch.Tensor | None = None
        self._weights: dict[tuple[tuple[int, int], bool], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def active(self) -> bool:
        """Outside the window the official code computes the same attention unmodulated: the fused kernel does."""
        return self.time_weight is not None

    def start_step(self, time_weight: torch.Tensor | None) -> None:
        """lambda_t for the coming UNet forward, or None outside the modulation window."""
        self.time_weight = time_weight
        self._weights.clear()

    def edit_logits(self, layer, logits, is_cross):
        if self.time_weight is None:
            return logits
        size = self.layer_sizes[layer]
        if logits.shape[1] != size[0] * size[1]:
            raise RuntimeError(f"{layer}: {logits.shape[1]} queries, but its layout was made for a {size[0]}x{size[1]} map")
        if (size, is_cross) not in self._weights:
            (self_attend, size_weight), cross_attend = self.layouts[size]
            attend, weight = (cross_attend, self.creg) if is_cross else (self_attend, self.sreg)
            self._weights[size, is_cross] = modulation_weights(attend, size_weight, weight, self.time_weight)
        # With classifier-free guidance the batch is [unconditional; conditional]: only the conditional half moves.
        conditional = logits[logits.shape[0] // 2 :] if self.guided else logits
        modulate_logits(conditional, *self._weights[size, is_cross])
        return logits

    def edit_probs(self, layer, probs, is_cross):
        return probs


@METHODS.register
@dataclass
class DenseDiffusion(Method):
    """DenseDiffusion with the official defaults (gradio sliders, notebook).

    `creg` and `sreg` are w^c and w^s; `sizereg` scales the segment-size term R; `reg_part` is the fraction of the
    loop during which the logits are modulated: loop index i is modulated while i / len(timesteps) < reg_part. The
    official code hard-codes 50 DDIM steps and tests `COUNT/32 < 50*reg_part` with a global count of attention
    calls (32 per UNet forward on SD 1.x), i.e. steps 0..14; this is the same rule for any step count and model,
    except that where reg_part * steps is not an integer the official modulates part of the UNet's layers in the
    boundary step and this modulates none of them.

    A segment phrase must be words of the prompt; it takes its first occurrence not taken by an earlier segment
    (the official takes the first exact token match, so two segments with the same phrase both map to it). An
    empty phrase (the background) has no tokens.
    """

    name = "dense_diffusion"
    requires = ("segments",)

    creg: float = 1.0
    sreg: float = 0.3
    sizereg: float = 1.0
    reg_part: float = 0.3

    def _spans(self, spec, indexer) -> list[list[int]]:
        """Token positions of each non-empty segment phrase, in segment order."""
        return indexer.locate(spec.id, spec.prompt, [s.phrase for s in spec.segments if s.phrase])

    def _masks(self, spec, size: tuple[int, int]) -> torch.Tensor:
        """(segments, 1, h, w) float masks at the latent size (nearest, as the official `preprocess_mask`)."""
        masks = []
        for segment in spec.segments:
            try:
                mask = torch.from_numpy(read_mask(segment.mask)).float()[None, None]
            except DatasetError as error:  # unreadable or not binary (a missing file included)
                raise PromptError(f"method {self.name}: prompt {spec.id!r}, segment {segment.phrase!r}: {error}") from None
            masks.append(F.interpolate(mask, size, mode="nearest"))
        return torch.cat(masks)

    def preflight(self, spec, indexer) -> None:
        super().preflight(spec, indexer)
        self._spans(spec, indexer)
        self._masks(spec, (1, 1))  # every mask file is readable and binary

    def setup(self, run):
        device = run.unet.device
        scale = run.pipe.vae_scale_factor
        latent = (run.settings.height // scale, run.settings.width // scale)
        masks = self._masks(run.spec, latent).to(device)
        phrased = [(segment.phrase, mask) for segment, mask in zip(run.spec.segments, masks) if segment.phrase]
        spans = self._spans(run.spec, run.indexer)

        cond = run.cond_embeds.clone()
        token_masks = torch.zeros(cond.shape[1], *latent, device=device)
        for (phrase, mask), span in zip(phrased, spans):
            own = run.pipe.encode_prompt(phrase, device, 1, False)[0]
            cond[:, span] = own[:, 1 : 1 + len(span)]
            token_masks[span] = mask[0]
        run.cond_embeds = cond

        layer_sizes = {}
        for layer in attention_layers(run.unet):
            down = layer_downsampling(run.unet, layer)
            layer_sizes[layer] = (latent[0] // down, latent[1] // down)
        hook = LayoutModulation(layer_sizes, masks, token_masks, self.sizereg, self.creg, self.sreg, run.do_guidance)
        run.state["modulation"] = hook
        # Last, so that nothing can fail between installing the hooks and the loop's try/finally that removes them.
        run.state["hooks"] = AttentionHooks(run.unet, layer_sizes, hook).install()

    def teardown(self, run):
        if "hooks" in run.state:
            run.state.pop("hooks").remove()

    def predict_noise(self, run, i, t, latents):
        inside_window = i / len(run.timesteps) < self.reg_part
        run.state["modulation"].start_step(torch.pow(t / 1000, 5) if inside_window else None)
        return run.guided_noise(t, latents)
