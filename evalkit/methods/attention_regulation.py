"""Attention Regulation (Zhang et al., ECCV 2024, arXiv 2403.06381): during the first denoising steps, edit the
conditional cross-attention logits of a few layers so that every target word gets a region of high attention.

Follows the official repository (YaNgZhAnG-V5/attention_regulation, commit b66d9db: `attn_processor.py`,
`edit_scheme.py`, `editor.py`, `txt2img.py`). In each regulated cross-attention layer (default: all of
`down_blocks.2` and `up_blocks.1`, the 16x16 layers at 512 px) and at loop index i < `edit_steps` (t_thres):

1. Logits S = QK^T / sqrt(d) (computed explicitly, as the official recomputation does) and P0 = softmax(S); P0's
   start-token column and first end-token column are kept.
2. On the conditional rows only, as (heads, w, w, 77) maps: an additive edit A of the target tokens' logits,
   A_t = sum_k theta_{k,t} G_k (paper Eq. 10-12), where G_k are Gaussian bumps of sigma = w // 16 centred on the
   grid range(2 sigma, w, 2 sigma)^2 (49 centres at 16x16) and theta ~ U[0, 1), drawn afresh for every layer call.
3. `iterations` steps of plain gradient descent on theta (paper Eq. 13, learning rate eta = `lr`) of
   L = gamma * mean_t (q_0.9(M_t) - 0.9)^2 + delta * mean_t (mean(M_t) - mu)^2 + epsilon * mean(theta^2)
   with M = softmax(S + A)[..., targets] and mu = min(1, 0.2 n) / n for n targets. This is the code's form of the
   paper's Eq. 8-9: mean(M_t) where the paper sums (so delta = alpha * w^4), and a penalty on theta where the paper
   penalises beta * ||A' - A||. The A with the lowest loss, evaluated before each update, is kept.
4. Moving average with the previous step (Eq. 14, kappa = `moving_average`): A <- kappa * A_prev + (1 - kappa) * A,
   where A_prev is this layer's optimum at the previous step *before* its averaging (at the first step, the
   random initial A), as the official code does, not a running average.
5. Decay (Eq. 15, lambda = `decay`): S_cond <- float16(S_cond + lambda^i * A). The official code casts the edited
   conditional logits to float16 even in float32 runs; that rounding is part of its numbers and is kept.
6. P = softmax(S) with P's start-token and end-token columns overwritten by P0's (its rows then no longer sum to
   1); the layer's output is P V.

At i == `edit_steps` the regulated layers still compute their attention this way, unedited (the official hooks
are removed after that step); later steps use the UNet's own attention.

Differences from the official code, each so that an image depends only on its prompt and seed:
* Random weights: the official code draws theta for the whole batch, (batch * heads, 49, n), from the global
  (CUDA) RNG. Here each image draws its (heads, 49, n) from its own generator, `run.generators[k]`: the loop's CPU
  generator seeded with the image's seed, continued after the initial noise, one draw per edited layer call in
  forward order (all of a step's draws are made just before its UNet forward, which leaves each stream as it was). For one image on a CPU this is the official stream after `torch.manual_seed(seed)` (initial
  noise, then the draws), which the parity test relies on.
* Best iterate: the official code keeps the iteration with the lowest loss summed over the whole batch; here
  each image keeps its own (over its heads and targets, as the official code does for a batch of one). The
  gradient steps are the same: the official loss is a mean over the batch rows and its step is scaled by their
  number, so each image's step is lr * heads * d(its mean loss)/d(theta).
* Target positions: the prompt's `subjects`, located as whole words by `TokenIndexer.subject_indices` (SOT at 0,
  no shift, as the official indices). The official code looks up each token piece of the target phrase at its
  first occurrence in the prompt; both agree for words that occur once. A subject named twice ("a cat and a
  cat", subjects [cat, cat]) takes two different occurrences here, the first one twice there.
* Models that ask for upcast attention (SD 2.1 at 768 px) get float32 logits here; the official code ignores
  the flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from evalkit.errors import ConfigError
from evalkit.sampling.attention import (
    AttentionHooks,
    attention_layers,
    layer_downsampling,
)
from evalkit.sampling.cuda_graphs import CapturedCall
from evalkit.sampling.method import METHODS, Method

# The Gaussian basis needs sigma = width // BASIS_WIDTH_PER_SIGMA >= 1 (official: `sigma = width // 16`).
BASIS_WIDTH_PER_SIGMA = 16


def gaussian_basis(width: int) -> torch.Tensor:
    """(centres, width, width): G_k[y, x] = exp(-((x - a)^2 + (y - b)^2) / (2 sigma^2)) for the centres (a, b) of
    range(2 sigma, width, 2 sigma)^2, a the outer loop; sigma = width // 16. Centre order fixes which random
    weight belongs to which bump, so it follows the official code."""
    sigma = width // BASIS_WIDTH_PER_SIGMA
    if sigma < 1:
        raise ValueError(f"the Gaussian basis needs attention maps of at least 16x16, got {width}x{width}")
    x = torch.arange(0, width, 1, dtype=torch.float32)
    y = x.view(-1, 1)
    grid = range(2 * sigma, width, 2 * sigma)
    return torch.stack([torch.exp(-((x - a) ** 2 + (y - b) ** 2) / (2 * sigma**2)) for a in grid for b in grid])


def quantile_error(maps: torch.Tensor, level: float, target: float) -> torch.Tensor:
    """(rows, targets): (the `level` quantile of each target's map - target)^2, from maps (rows, w, w, targets)."""
    rows, _, _, targets = maps.shape
    return (torch.quantile(maps.view(rows, -1, targets), level, dim=-2) - target) ** 2


def proportion_error(maps: torch.Tensor, proportion: float) -> torch.Tensor:
    """(rows, targets): (mean attention of each target's map - proportion)^2, from maps (rows, w, w, targets)."""
    width = maps.shape[1]
    return (torch.sum(maps / width**2, dim=(-2, -3)) - proportion) ** 2


def regulation_loss(
    maps: torch.Tensor,
    weights: torch.Tensor,
    images: int,
    proportion: float,
    quantile: float,
    quantile_target: float,
    quantile_weight: float,
    proportion_weight: float,
    regularisation_weight: float,
) -> torch.Tensor:
    """(images,): each image's loss over its rows (heads) and targets. `maps` (images * heads, w, w, targets) are
    the edited probabilities of the target tokens; `weights` (images * heads, ...) the basis weights theta."""
    return (
        quantile_weight * quantile_error(maps, quantile, quantile_target).reshape(images, -1).mean(1)
        + proportion_weight * proportion_error(maps, proportion).reshape(images, -1).mean(1)
        + regularisation_weight * (weights**2).reshape(images, -1).mean(1)
    )


def optimise_edit(
    method: AttentionRegulation, scores: torch.Tensor, weights: torch.Tensor, basis: torch.Tensor,
    targets: torch.Tensor, images: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13 for one layer call: `iterations` gradient steps on the basis weights theta from their random start.
    `scores` (images * heads, w, w, tokens) are the conditional logits, `weights` (images * heads, centres, 1, 1,
    targets) the random start, `basis` (1, centres, w, w, 1). Returns (the start's edit A, each image's best edit),
    both (images * heads, w, w, targets). Pure tensor code with no branch on a tensor's value, so that on a GPU the
    whole optimisation is captured once as a CUDA graph and replayed: eager, one layer call is ~1,200 tiny kernels
    (20 iterations of forward and backward) whose launches, not their arithmetic, set its time."""
    m = method
    heads = scores.shape[0] // images
    n_targets = targets.shape[0]
    proportion = min(1.0, m.proportion * n_targets) / n_targets
    initial = torch.sum(basis * weights, dim=1)
    best = torch.zeros_like(initial)
    best_loss = torch.full((images,), float("inf"), device=scores.device)
    with torch.enable_grad():
        for _ in range(m.iterations):
            weights.requires_grad_(True)
            edit = torch.sum(basis * weights, dim=1)
            additive = torch.zeros_like(scores, dtype=torch.float32)
            additive[..., targets] = edit
            maps = (scores + additive).softmax(dim=-1)[..., targets]
            loss = regulation_loss(
                maps, weights, images, proportion, m.quantile, m.quantile_target,
                m.quantile_weight, m.proportion_weight, m.regularisation_weight,
            )
            better = (loss < best_loss).detach()
            best_loss = torch.where(better, loss.detach(), best_loss)
            best = torch.where(better.repeat_interleave(heads).view(-1, 1, 1, 1), edit.detach(), best)
            (grad,) = torch.autograd.grad(loss.sum(), [weights])
            weights = (weights - heads * m.lr * grad).detach()
    return initial, best


class AttentionRegulationHook:
    """Edits the conditional logits of the regulated layers while `step` < edit_steps (see the module docstring).

    `layers` maps each regulated layer, in forward order, to (heads, width) of its maps. `begin_step` draws the
    step's random weights for every layer at once, before the step's UNet forward (each image's draws in layer
    order, as the per-call draws of the official code), and moves them to the device in one copy."""

    def __init__(self, method: AttentionRegulation, run, targets: list[int], end_token: int, layers: dict[str, tuple[int, int]]):
        self.method = method
        self.images = run.batch_size
        self.halves = 2 if run.do_guidance else 1  # rows are [unconditional; conditional] with guidance
        self.generators = run.generators
        self.device = run.unet.device
        self.target_positions = tuple(targets)
        self.targets = torch.tensor(targets, device=self.device)
        self.end_token = end_token
        self.layers = layers
        self.step = 0
        self.draws: dict[str, torch.Tensor] = {}  # layer -> this step's random start of theta
        self.basis: dict[int, torch.Tensor] = {}  # width -> (1, centres, w, w, 1)
        self.previous: dict[str, torch.Tensor] = {}  # layer -> its optimum A at the previous step, pre-average
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> P0's start/end columns
        self.captured: dict[tuple, CapturedCall] = method.captured_optimisations

    @property
    def active(self) -> bool:
        """The official hooks recompute attention through step `edit_steps` (unedited there), then go."""
        return self.step <= self.method.edit_steps

    def begin_step(self, i: int) -> None:
        self.step = i
        if i >= self.method.edit_steps:
            self.draws = {}
            return
        n_targets = len(self.targets)
        shapes = [(heads, centre_count(width), n_targets) for heads, width in self.layers.values()]
        per_image = torch.stack([torch.cat([torch.rand(shape, generator=g).flatten() for shape in shapes]) for g in self.generators])
        if self.device.type == "cuda":
            per_image = per_image.pin_memory().to(self.device, non_blocking=True)  # no wait for the GPU's queue
        draws = per_image.split([math.prod(shape) for shape in shapes], dim=1)
        self.draws = {
            layer: draw.reshape(-1, shape[1], 1, 1, n_targets)  # (images * heads, centres, 1, 1, targets)
            for layer, draw, shape in zip(self.layers, draws, shapes)
        }

    def edit_logits(self, layer, logits, is_cross):
        if self.step >= self.method.edit_steps:
            return logits
        heads = logits.shape[0] // (self.halves * self.images)
        rows = self.images * heads
        width = math.isqrt(logits.shape[1])
        conditional = logits[-rows:]
        unedited = conditional.softmax(dim=-1)
        self.kept[layer] = (unedited[:, :, 0], unedited[:, :, self.end_token])
        scores = conditional.reshape(rows, width, width, -1)
        additive = torch.zeros_like(scores, dtype=torch.float32)
        additive[..., self.targets] = self._optimum(layer, scores)
        edited = (scores + self.method.decay**self.step * additive).to(torch.float16)
        logits[-rows:] = edited.reshape(conditional.shape)
        return logits

    def edit_probs(self, layer, probs, is_cross):
        if layer not in self.kept:
            return probs
        start, end = self.kept.pop(layer)
        probs[-start.shape[0] :, :, 0] = start
        probs[-end.shape[0] :, :, self.end_token] = end
        return probs

    def _optimum(self, layer: str, scores: torch.Tensor) -> torch.Tensor:
        """The moving-averaged additive edit of the target tokens, (images * heads, w, w, targets)."""
        width = scores.shape[1]
        if width not in self.basis:
            self.basis[width] = gaussian_basis(width).to(scores.device)[None, :, :, :, None]
        basis, weights = self.basis[width], self.draws[layer]
        if scores.is_cuda:
            key = (tuple(scores.shape), scores.dtype, tuple(weights.shape), self.target_positions, self.images, scores.device)
            if key not in self.captured:
                method, targets, images = self.method, self.targets, self.images
                self.captured[key] = CapturedCall(
                    lambda scores, weights: optimise_edit(method, scores, weights, basis, targets, images), scores, weights
                )
            initial, best = self.captured[key](scores, weights)
        else:
            initial, best = optimise_edit(self.method, scores, weights, basis, self.targets, self.images)
        m = self.method
        previous = self.previous.get(layer, initial)
        self.previous[layer] = best
        return previous * m.moving_average + best * (1 - m.moving_average)


def centre_count(width: int) -> int:
    """How many Gaussian bumps `gaussian_basis(width)` has."""
    sigma = width // BASIS_WIDTH_PER_SIGMA
    return len(range(2 * sigma, width, 2 * sigma)) ** 2


@METHODS.register
@dataclass
class AttentionRegulation(Method):
    """Attention Regulation with the official defaults (conf/method/attention_regulation.yaml maps each field to
    the paper's symbol and the official source). The targets are the prompt's `subjects`; `layers` are UNet blocks
    (`down_blocks.2`) whose cross-attention layers are regulated."""

    name = "attention_regulation"
    requires = ("subjects",)

    layers: list[str] = field(default_factory=lambda: ["up_blocks.1", "down_blocks.2"])
    edit_steps: int = 25
    iterations: int = 20
    lr: float = 100.0
    moving_average: float = 0.25
    decay: float = 0.99
    quantile: float = 0.9
    quantile_target: float = 0.9
    proportion: float = 0.2
    quantile_weight: float = 1.0
    proportion_weight: float = 80.0
    regularisation_weight: float = 0.09
    # CUDA graphs of the optimisation by input shape, kept across sampling calls (not a hyperparameter)
    captured_optimisations: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.layers, str):
            raise ValueError(f"layers must be a list of UNet blocks, got the string {self.layers!r}")
        self.layers = [str(block) for block in self.layers]  # YAML / OmegaConf lists
        if not self.layers:
            raise ValueError("layers must name at least one UNet block")
        if self.edit_steps < 0 or self.iterations < 1:
            raise ValueError(f"need edit_steps >= 0 and iterations >= 1, got {self.edit_steps}, {self.iterations}")
        if not 0.0 <= self.moving_average <= 1.0:
            raise ValueError(f"moving_average must be in [0, 1], got {self.moving_average}")

    def regulated_layers(self, run) -> list[str]:
        """The cross-attention layers of `layers`, in forward order; a config error if a block has none or its
        maps are too small for the Gaussian basis."""
        if run.settings.height != run.settings.width:
            raise ConfigError(f"method {self.name}: needs square images (its edit reshapes maps to w x w)")
        cross = attention_layers(run.unet, cross=True)
        chosen = [n for n in cross if any(n.startswith(block + ".") for block in self.layers)]
        empty = [block for block in self.layers if not any(n.startswith(block + ".") for n in chosen)]
        if empty:
            raise ConfigError(f"method {self.name}: the UNet has no cross-attention layers in {empty}")
        for layer in chosen:
            width = run.latent_size // layer_downsampling(run.unet, layer)
            if width < BASIS_WIDTH_PER_SIGMA:
                raise ConfigError(
                    f"method {self.name}: {layer} has {width}x{width} attention maps at {run.settings.height} px; "
                    f"the Gaussian basis needs at least {BASIS_WIDTH_PER_SIGMA}x{BASIS_WIDTH_PER_SIGMA}: "
                    "choose other layers or a larger resolution"
                )
        return chosen

    def setup(self, run):
        layers = self.regulated_layers(run)
        targets = [position for word in run.indexer.subject_indices(run.spec) for position in word]
        # The first end token: the number of tokens with start and end, minus one.
        end_token = run.indexer.check_length(run.spec.id, run.spec.prompt) - 1
        shapes = {
            layer: (run.unet.get_submodule(layer).heads, run.latent_size // layer_downsampling(run.unet, layer))
            for layer in layers
        }
        run.state["hook"] = AttentionRegulationHook(self, run, targets, end_token, shapes)
        run.state["hooks"] = AttentionHooks(run.unet, layers, run.state["hook"]).install()

    def teardown(self, run):
        if "hooks" in run.state:
            run.state.pop("hooks").remove()

    def predict_noise(self, run, i, t, latents):
        run.state["hook"].begin_step(i)
        return run.guided_noise(t, latents)
