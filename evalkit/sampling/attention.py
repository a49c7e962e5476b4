"""Attention processors through which methods read or edit attention.

`ExplicitAttnProcessor` is diffusers' plain attention with the scores computed explicitly (as
`Attention.get_attention_scores` does), so that a hook can edit the logits before the softmax and read or edit
the probabilities after it. Only the layers a method needs get it, and only for the forwards its hook is `active`
in; every other layer, and every other forward, keeps the layer's own processor (PyTorch's fused attention).
An observer (the loop's attention diagnostics) reads probabilities without changing the forward: where no hook is
active the layer's own processor gives the output and the probabilities are computed beside it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

import torch
from diffusers.models.attention_processor import Attention


class AttentionHook(Protocol):
    """What a method implements to see inside attention. `layer` is the module name, e.g.
    `up_blocks.1.attentions.0.transformer_blocks.0.attn2`; tensors are (batch * heads, queries, keys).

    `active` says whether the coming forwards need the hook: while it is false the hooked layers run their own
    (fused) processors and the hook is not called, so forwards that read and edit nothing pay nothing."""

    active: bool

    def edit_logits(self, layer: str, logits: torch.Tensor, is_cross: bool) -> torch.Tensor: ...

    def edit_probs(self, layer: str, probs: torch.Tensor, is_cross: bool) -> torch.Tensor: ...


class AttentionObserver(Protocol):
    """What reads cross-attention without editing it (evalkit/sampling/diagnostics.py). While `active`, `observe`
    gets each observed layer's probabilities of the last `samples` samples of the forward's batch, (samples * heads,
    queries, keys), after any hook's edits."""

    active: bool
    samples: int

    def observe(self, layer: str, probs: torch.Tensor) -> None: ...


class ExplicitAttnProcessor:
    """A layer's attention with a hook (may edit, or None) and an observer (reads only, or None)."""

    def __init__(self, layer: str, hook: AttentionHook | None, own_processor, observer: AttentionObserver | None = None):
        self.layer = layer
        self.hook = hook
        self.own_processor = own_processor  # the layer's processor, for the forwards the hook is inactive in
        self.observer = observer

    @property
    def hook_active(self) -> bool:
        return self.hook is not None and self.hook.active

    @property
    def observing(self) -> bool:
        return self.observer is not None and self.observer.active

    @property
    def runs_python(self) -> bool:
        """Whether the coming forward needs this processor's Python (a CUDA graph replay would skip it)."""
        return self.hook_active or self.observing

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        observing = self.observing
        if not self.hook_active:
            output = self.own_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            if observing:
                # The layer's output stays its own processor's (an observed forward computes what an unobserved one
                # does, bit for bit); the observer gets the probabilities computed beside it, for its samples only.
                samples = self.observer.samples
                mask = None if attention_mask is None else attention_mask[-samples:]
                probs = _attention_probs(attn, hidden_states[-samples:], encoder_hidden_states[-samples:], mask, temb)[0]
                self.observer.observe(self.layer, probs)
            return output
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
        is_cross = encoder_hidden_states is not None
        probs, value = _attention_probs(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb,
            edit_logits=lambda logits: self.hook.edit_logits(self.layer, logits, is_cross),
        )
        probs = self.hook.edit_probs(self.layer, probs, is_cross)
        if observing:
            self.observer.observe(self.layer, probs[-(probs.shape[0] // residual.shape[0]) * self.observer.samples :])

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_probs(attn: Attention, hidden_states, encoder_hidden_states, attention_mask, temb, edit_logits=None):
    """(probabilities, values), (batch * heads, queries, keys) and (batch * heads, keys, dim), as diffusers' plain
    attention computes them, the logits passed through `edit_logits` before the softmax."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    query = attn.head_to_batch_dim(query)
    key = attn.head_to_batch_dim(key)
    value = attn.head_to_batch_dim(value)

    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    if attention_mask is None:
        logits = torch.baddbmm(
            torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device),
            query, key.transpose(-1, -2), beta=0, alpha=attn.scale,
        )
    else:
        logits = torch.baddbmm(attention_mask, query, key.transpose(-1, -2), beta=1, alpha=attn.scale)
    if attn.upcast_softmax:
        logits = logits.float()
    if edit_logits is not None:
        logits = edit_logits(logits)
    return logits.softmax(dim=-1).to(dtype), value


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def layer_downsampling(unet, layer: str) -> int:
    """How many times smaller than the latent this attention layer's feature map is (1, 2, 4, 8 for SD)."""
    levels = len(unet.config.block_out_channels)
    match = _BLOCK.match(layer)
    if match is None:
        raise ValueError(f"not a UNet attention layer: {layer}")
    if match.group(1) == "down_blocks":
        return 2 ** int(match.group(2))
    if match.group(1) == "up_blocks":
        return 2 ** (levels - 1 - int(match.group(2)))
    return 2 ** (levels - 1)


def attention_layers(unet, cross: bool | None = None) -> list[str]:
    """Names of the UNet's attention modules in forward order; `cross` keeps only attn2 (True) or attn1 (False)."""
    names = [key[: -len(".processor")] for key in unet.attn_processors]
    if cross is None:
        return names
    return [n for n in names if n.endswith(".attn2") == cross]


def layers_at_resolution(unet, latent_size: int, resolution: int, cross: bool = True, places: Iterable[str] = ("up", "down", "mid")) -> list[str]:
    """Cross- (or self-) attention layers whose maps are `resolution` x `resolution`, grouped by UNet place in the
    order given (A&E's AttentionStore aggregates "up", then "down", then "mid")."""
    layers = [n for n in attention_layers(unet, cross) if latent_size // layer_downsampling(unet, n) == resolution]
    prefix = {"up": "up_blocks.", "down": "down_blocks.", "mid": "mid_block."}
    return [n for place in places for n in layers if n.startswith(prefix[place])]


class AttentionHooks:
    """Installs one hook, or one observer, on some layers (`install`, then `remove`); the rest keep their processors.

    An observer joins a layer's hook where a method installed one (installed after the method's hooks, removed
    before them), so that it reads the probabilities the method's edits give."""

    def __init__(self, unet, layers: Iterable[str], hook: AttentionHook | None = None, observer: AttentionObserver | None = None):
        self.unet = unet
        self.layers = list(layers)
        self.hook = hook
        self.observer = observer
        self._saved: dict | None = None

    def install(self) -> AttentionHooks:
        self._saved = dict(self.unet.attn_processors)
        processors = dict(self._saved)
        for layer in self.layers:
            key = layer + ".processor"
            current = self._saved[key]
            if self.observer is not None and isinstance(current, ExplicitAttnProcessor):
                processors[key] = ExplicitAttnProcessor(layer, current.hook, current.own_processor, self.observer)
            else:
                processors[key] = ExplicitAttnProcessor(layer, self.hook, current, self.observer)
        self.unet.set_attn_processor(processors)
        return self

    def remove(self) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None


class CrossAttentionRecorder:
    """Keeps each layer's cross-attention probabilities from the last forward while it is `active`.

    It is active only during `record`, the forwards whose maps a method reads (the guidance forwards with
    gradients); every other forward (classifier-free guidance) runs the layers' fused attention.
    """

    def __init__(self, layers: list[str], resolution: int):
        self.layers = layers
        self.resolution = resolution
        self.active = False
        self.maps: dict[str, torch.Tensor] = {}

    def edit_logits(self, layer, logits, is_cross):
        return logits

    def edit_probs(self, layer, probs, is_cross):
        if is_cross:
            self.maps[layer] = probs
        return probs

    def record(self, unet, latents: torch.Tensor, t, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """One UNet forward with recording on; returns its maps averaged over heads and layers, (batch, res, res,
        tokens). This is the "guidance forward" of A&E-style methods: with gradients on, the maps carry them."""
        return self._average_heads_and_layers(self._record_layers(unet, latents, t, encoder_hidden_states))

    def record_per_head(self, unet, latents: torch.Tensor, t, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Like `record`, but averaged over layers only: (batch, heads, res, res, tokens), as Separate-and-Enhance's
        training reads the maps (every layer at the resolution must have the same number of heads)."""
        stacked = torch.stack(self._record_layers(unet, latents, t, encoder_hidden_states))
        return stacked.sum(0) / stacked.shape[0]

    def average(self, batch_size: int) -> torch.Tensor:
        """(batch, res, res, tokens): each image's maps averaged over heads and layers, summed in layer order
        and divided once as diffusers' AttentionStore does."""
        return self._average_heads_and_layers(self._per_layer(batch_size))

    def _record_layers(self, unet, latents: torch.Tensor, t, encoder_hidden_states: torch.Tensor) -> list[torch.Tensor]:
        self.active = True
        try:
            unet(latents, t, encoder_hidden_states=encoder_hidden_states)
        finally:
            self.active = False
        per_layer = self._per_layer(batch_size=latents.shape[0])
        self.maps.clear()
        return per_layer

    def _per_layer(self, batch_size: int) -> list[torch.Tensor]:
        """Each layer's maps as (batch, heads, res, res, tokens), in layer order."""
        missing = [n for n in self.layers if n not in self.maps]
        if missing:
            raise RuntimeError(f"no attention recorded at {missing}: was the recorder active during the forward?")
        res = self.resolution
        return [self.maps[n].reshape(batch_size, -1, res, res, self.maps[n].shape[-1]) for n in self.layers]

    @staticmethod
    def _average_heads_and_layers(per_layer: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.cat(per_layer, dim=1)
        return stacked.sum(1) / stacked.shape[1]
