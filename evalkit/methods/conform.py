"""CONFORM (Meral et al., CVPR 2024, arXiv 2312.06059): before each denoising step, push the latent so that the
cross-attention maps of the tokens of one object (attribute and noun) look alike and those of different objects
look different, by a contrastive loss over the maps of this and the previous step.

Follows the official repository (gemlab-vt/CONFORM, `pipeline_conform.py`) with the settings of its notebook.
Per image and loop index i (the A&E-style procedure of `evalkit.sampling.attention_guidance`, where the images of
a batch share each forward and backward and each gets exactly its own gradient):

1. A UNet forward with the conditional embedding only (gradients on) records the cross-attention at 16x16,
   averaged over heads and layers.
2. Every token of every group gives an embedding: its smoothed map, flattened; its class is its group. With
   `add_previous_attention_maps`, the same tokens' maps from the last guidance forward of step i-1 are added with
   the same classes. The loss is InfoNCE (pytorch-metric-learning's NTXentLoss, cosine similarity, `temperature`)
   over all same-group pairs as positives and all cross-group pairs as negatives.
3. At the refinement indices: a fixed `refinement_steps` gradient steps (no threshold), then one more forward
   gives the loss used below.
4. While i < `max_iter_to_alter` and loss != 0: z <- z - step_size[i] * dloss/dz, step_size as in A&E.

The classifier-free-guidance step of the shared loop then uses the updated latent.

Differences from the official code, both where it is broken: it multiplies the stored previous-step maps by 100
in place on every loss call when `softmax_normalize` is on (its `__call__` default), which overflows to NaN after
the ~22 calls of a refinement step; here they are left intact, so every call computes softmax(100 x maps). Its
batched path keeps only the first image (it zips the latents with its one token-group list); here every image
of the batch is guided against its own previous maps, as the official run of that seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_metric_learning.losses import NTXentLoss

from evalkit.sampling.attention_guidance import (
    AttentionGuidance,
    softmax_over_text_tokens,
)
from evalkit.sampling.method import METHODS
from evalkit.sampling.smoothing import smooth


def token_embeddings(
    attention_maps: torch.Tensor, token_indices: list[int], kernel: torch.Tensor | None, softmax_normalize: bool
) -> list[torch.Tensor]:
    """Each token's map from (res, res, 77) maps, smoothed and flattened to res * res.

    With `softmax_normalize` the maps are first normalised over the text tokens (softmax of 100 x maps, as A&E);
    otherwise the raw averaged attention of the text tokens is used. Indices count SOT as 0.
    """
    text_attention = softmax_over_text_tokens(attention_maps) if softmax_normalize else attention_maps[:, :, 1:-1]
    embeddings = []
    for index in token_indices:
        token_map = text_attention[:, :, index - 1]
        if kernel is not None:
            token_map = smooth(token_map, kernel)
        embeddings.append(token_map.reshape(-1))
    return embeddings


def conform_loss(
    attention_maps: torch.Tensor,
    previous_maps: torch.Tensor | None,
    token_groups: list[list[int]],
    kernel: torch.Tensor | None,
    temperature: float,
    softmax_normalize: bool,
) -> torch.Tensor:
    """InfoNCE over the token maps of this step (and the previous one), classes = groups.

    Embeddings are ordered as the official code orders them (per token: this step's, then the previous step's),
    which fixes the summation order of the loss. It is 0 when no two embeddings share a group (one token per
    group and no previous maps) or when there is only one group (no negatives).
    """
    embeddings, classes = [], []
    for group, token_indices in enumerate(token_groups):
        current = token_embeddings(attention_maps, token_indices, kernel, softmax_normalize)
        previous = (
            token_embeddings(previous_maps, token_indices, kernel, softmax_normalize) if previous_maps is not None else None
        )
        for k in range(len(token_indices)):
            embeddings.append(current[k])
            classes.append(group)
            if previous is not None:
                embeddings.append(previous[k])
                classes.append(group)
    labels = torch.tensor(classes, device=attention_maps.device)
    return NTXentLoss(temperature=temperature)(torch.stack(embeddings), labels)


@METHODS.register
@dataclass
class Conform(AttentionGuidance):
    """CONFORM with its notebook's settings (the `__call__` defaults differ in `max_iter_to_alter` = 25 and
    `softmax_normalize` = True, which overflows in the official code; see the module docstring).

    Groups come from the prompt set (`groups`: attribute and noun words of one object); a word the tokenizer splits
    into several pieces puts each piece in its group. `iterative_refinement_steps` are loop indices (PNDM's
    extra first step counts).
    """

    name = "conform"
    requires = ("groups",)

    max_iter_to_alter: int = 30
    iterative_refinement_steps: tuple[int, ...] = (0, 10, 20)
    refinement_steps: int = 20
    temperature: float = 0.5
    softmax_normalize: bool = False
    add_previous_attention_maps: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.iterative_refinement_steps = tuple(int(i) for i in self.iterative_refinement_steps)

    def prepare(self, run):
        run.state["token_groups"] = [
            [index for word in group for index in word] for group in run.indexer.group_indices(run.spec)
        ]
        run.state["latest_maps"] = None

    def _alters(self, i: int) -> bool:
        return i < self.max_iter_to_alter or i in self.iterative_refinement_steps

    def guides_at(self, i):
        # Step i's maps are the previous maps of step i + 1.
        return self._alters(i) or (self.add_previous_attention_maps and self._alters(i + 1))

    def refinement(self, i):
        return (self.refinement_steps, float("-inf")) if i in self.iterative_refinement_steps else None

    def update_latents(self, run, i, t, latents):
        # Each image's maps of its last guidance forward at step i - 1 (the official code aggregates them after
        # the guidance of step i - 1, before its classifier-free-guidance forward); none at the first step.
        run.state["previous_maps"] = run.state["latest_maps"] if self.add_previous_attention_maps else None
        run.state["latest_maps"] = None
        return super().update_latents(run, i, t, latents)

    def attention_loss(self, run, images, maps):
        # Each image's maps of its latest forward at this step (the first forward of a step runs every image).
        latest = run.state["latest_maps"]
        run.state["latest_maps"] = maps.detach() if latest is None else latest.index_copy(0, images, maps.detach())
        previous = run.state["previous_maps"]
        previous = None if previous is None else previous[images]
        # A loop over the images: NTXentLoss takes one set of embeddings.
        return torch.stack(
            [
                conform_loss(
                    maps[k],
                    None if previous is None else previous[k],
                    run.state["token_groups"],
                    run.state["kernel"],
                    self.temperature,
                    self.softmax_normalize,
                )
                for k in range(len(maps))
            ]
        )
