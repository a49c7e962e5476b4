"""SynGen (Rassin et al., NeurIPS 2023, "Linguistic Binding in Diffusion Models"): before each early denoising
step, push the latent so that each modifier's cross-attention map overlaps its noun's and differs from the maps of
the rest of the prompt.

Follows the official repository (RoyiRa/Linguistic-Binding-in-Diffusion-Models, `syngen_diffusion_pipeline.py`
and `compute_loss.py`). Per image and loop index i < `num_intervention_steps`:

1. A UNet forward with the conditional embedding only (gradients on, no `scale_model_input`) records the 16x16
   cross-attention, averaged over heads and layers, and multiplies it by 100 (no softmax, no smoothing). Every
   token position of the 77 keeps its own map.
2. For each group (modifiers M, noun n) and each m in M, with KLsym(a, b) = (KL(a||b) + KL(b||a)) / 2 of two maps
   each normalised to sum 1, and O = the prompt's token positions 1..len-2 outside the group:
       L_m = KLsym(m, n) - 1/2 [ mean_{o in O} KLsym(n, o) + mean_{o in O} KLsym(m, o) ]
   A word split into several tokens takes the max over its pieces. The loss is the sum of L_m over all groups.
   With `include_entities`, a noun-only group adds -mean_{o in O} KLsym(n, o); without it (the default) a
   noun-only group adds nothing.
3. z <- z - step_size * dL/dz (constant step, no refinement).

The classifier-free-guidance step of the shared loop then uses the updated latent.

The official pipeline guides one image at a time; here one forward runs the whole batch, each image's loss comes
from its own maps, and one backward of their sum gives each image exactly its own gradient (the UNet treats the
samples of a batch independently).

Groups come from the prompt set (`groups`: modifiers then noun, e.g. [["red", "car"], ["blue", "bowl"]]) or,
when it gives none, from a spaCy dependency parse by the official rules (`evalkit.parsing`). Nothing is kept
between prompts: the groups live in the sampling call's state (the official pipeline caches its first parse).
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, replace

import torch
from torch import distributions

from evalkit.errors import ConfigError, PromptError
from evalkit.parsing import parse_groups
from evalkit.sampling.attention import (
    AttentionHooks,
    CrossAttentionRecorder,
    layers_at_resolution,
)
from evalkit.sampling.method import METHODS, Method

log = logging.getLogger("evalkit")

NO_GROUP_NOTE = (
    "no modifier-noun pair in the prompt: sampled as plain Stable Diffusion (the official code still runs its "
    "guidance forward and backward at every intervention step, with a loss of 0)"
)

Word = list[int]  # the token positions of one word (several for a word the tokenizer splits)


def symmetric_kl(map_a: torch.Tensor, map_b: torch.Tensor) -> torch.Tensor:
    """(KL(p||q) + KL(q||p)) / 2 of two (..., res, res) maps, each flattened and normalised to sum 1 (as the official
    code does, through torch.distributions.Categorical, whose logits clamp probabilities to [eps, 1 - eps])."""
    p = distributions.Categorical(probs=map_a.flatten(-2))
    q = distributions.Categorical(probs=map_b.flatten(-2))
    return (distributions.kl_divergence(p, q) + distributions.kl_divergence(q, p)) / 2


def word_distance(maps: torch.Tensor, word_a: Word, word_b: Word) -> torch.Tensor:
    """KLsym of two words: the max over their pieces' maps. `maps` is (..., res, res, tokens)."""
    distances = [symmetric_kl(maps[..., a], maps[..., b]) for a, b in itertools.product(word_a, word_b)]
    # Python's max of the official code, per image: the first of equal maxima (and its gradient) is kept.
    return functools.reduce(lambda kept, distance: torch.where(distance > kept, distance, kept), distances)


def mean_distance_to_outside(maps: torch.Tensor, word: Word, outside: list[int]) -> torch.Tensor:
    """mean over o in O of KLsym(word, o)."""
    return sum(word_distance(maps, word, [o]) for o in outside) / len(outside)


def group_terms(maps: torch.Tensor, group: list[Word], prompt_positions: list[int]) -> tuple:
    """The positive and negative terms of one group (modifiers, then the noun), each summed over its modifiers."""
    *modifiers, noun = group
    in_group = {p for word in group for p in word}
    outside = [p for p in prompt_positions if p not in in_group]

    def negative(word: Word) -> torch.Tensor | float:
        return -mean_distance_to_outside(maps, word, outside) if outside else 0.0

    if not modifiers:
        return 0.0, negative(noun)
    positive = sum(word_distance(maps, m, noun) for m in modifiers)
    return positive, sum((negative(m) + negative(noun)) / 2 for m in modifiers)


def syngen_loss(maps: torch.Tensor, groups: list[list[Word]], prompt_positions: list[int]) -> torch.Tensor:
    """Sum of every group's terms, per image: (...) from (..., res, res, tokens) maps, x100 as the official code
    scales them (KLsym does not depend on the scale); `prompt_positions`: the token positions between SOT and EOT."""
    loss = 0.0
    for group in groups:
        positive, negative = group_terms(maps, group, prompt_positions)
        loss = loss + positive + negative  # the official order of additions
    return loss


@METHODS.register
@dataclass
class SynGen(Method):
    """SynGen with the official defaults (`run.py`, `SynGenDiffusionPipeline.__call__`).

    `parser_model` is the spaCy pipeline that parses prompts the prompt set gives no groups for.
    """

    name = "syngen"

    step_size: float = 20.0
    num_intervention_steps: int = 25
    attention_res: int = 16
    include_entities: bool = False
    parser_model: str = "en_core_web_trf"

    def word_groups(self, spec) -> list[tuple[str, ...]]:
        """The prompt set's groups, or the parser's when it gives none."""
        if spec.groups:
            return list(spec.groups)
        try:
            return parse_groups(spec.prompt, self.parser_model, self.include_entities)
        except ConfigError as error:
            raise PromptError(
                f"method {self.name} needs modifier-noun groups for prompt {spec.id!r} ({spec.prompt!r}): the prompt "
                f"set gives none and they cannot be parsed: {error}; or give groups in the prompt set"
            ) from None

    def token_groups(self, spec, indexer) -> list[list[Word]]:
        """The groups that add a loss term, as token positions per word. A noun-only group adds one only with
        `include_entities`, as in the official code."""
        groups = indexer.group_indices(replace(spec, groups=tuple(tuple(g) for g in self.word_groups(spec))))
        return [g for g in groups if len(g) > 1 or self.include_entities]

    def preflight(self, spec, indexer) -> None:
        super().preflight(spec, indexer)
        self.token_groups(spec, indexer)

    def setup(self, run):
        groups = self.token_groups(run.spec, run.indexer)
        run.state["groups"] = groups
        if not groups:  # the official loss is 0 then, and the latents stay as they are
            log.warning("%s: prompt %r has no modifier-noun group; it runs as plain Stable Diffusion", self.name, run.spec.id)
            # Its time is vanilla's, where the official code still runs (and pays for) its guidance forwards.
            run.notes.append(NO_GROUP_NOTE)
            return
        layers = layers_at_resolution(run.unet, run.latent_size, self.attention_res, places=("up", "down", "mid"))
        if not layers:
            raise ConfigError(
                f"method {self.name}: the UNet has no {self.attention_res}x{self.attention_res} cross-attention "
                f"layers at {run.settings.height}x{run.settings.width} px; set attention_res"
            )
        n_tokens = run.indexer.check_length(run.spec.id, run.spec.prompt)
        run.state.update(recorder=CrossAttentionRecorder(layers, self.attention_res), prompt_positions=list(range(1, n_tokens - 1)))
        # Last, so that nothing can fail between installing the hooks and the loop's try/finally that removes them.
        run.state["hooks"] = AttentionHooks(run.unet, layers, run.state["recorder"]).install()

    def teardown(self, run):
        if "hooks" in run.state:
            run.state.pop("hooks").remove()

    def update_latents(self, run, i, t, latents):
        if i >= self.num_intervention_steps or not run.state["groups"]:
            return latents
        with torch.enable_grad():
            latents = latents.detach().requires_grad_(True)
            # float32 as the official run (fp32 pipeline); in float16 the normalised maps fail Categorical's
            # simplex check (sum within 1e-6). A no-op on a float32 model.
            maps = 100 * run.state["recorder"].record(run.unet, latents, t, run.cond_embeds).float()
            losses = syngen_loss(maps, run.state["groups"], run.state["prompt_positions"])
            if not torch.is_tensor(losses):  # 0.0 only when every group is a lone noun filling the whole prompt
                return latents.detach()
            # The gradient of the sum is each image's own: the images of the forward do not interact.
            (grad,) = torch.autograd.grad(losses.sum(), [latents])
        return (latents - self.step_size * grad).detach()
