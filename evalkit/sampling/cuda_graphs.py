"""The UNet's plain forwards replayed as CUDA graphs (and `CapturedCall`, which methods use for their own loops:
Attention Regulation's optimisation).

At batch 1 a full-size Stable Diffusion UNet is bound by the host, not the GPU: on an H200 one 50-step image took
1.5-1.8 s of which the GPU was busy 0.6 s, the rest being the launch of ~1,600 kernels per forward. A CUDA graph
launches a forward's kernels at once. It replays exactly the kernels it recorded, so it serves only forwards in
which no method edits or reads attention (a hook's Python would not run in a replay): every forward where no
installed hook is `active` (vanilla's, and the classifier-free-guidance forwards of the guidance methods).

One graph per input shape and attention setup, kept with the UNet for the life of the process. Weights are read
where they are, so in-place changes (Separate-and-Enhance's keys) are seen; a UNet moved or re-created gets new
graphs. Replays run the kernels the eager forward runs; the first replay of each graph is checked against an eager
forward of the same inputs, and a UNet whose capture fails or differs samples eagerly from then on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from diffusers.models.attention_processor import Attention

from evalkit.sampling.attention import ExplicitAttnProcessor

log = logging.getLogger("evalkit")

_GRAPHS: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()
_FAILED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_MODULES: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()


class CapturedCall:
    """`function(*inputs)` (tensors in, a tensor or a tuple of tensors out) recorded as a CUDA graph for the inputs'
    shapes; calling it copies new inputs in and replays the recorded kernels. Whatever else the function reads
    (weights, tensors its closure holds) is read where it is at replay time."""

    def __init__(self, function: Callable, *inputs: torch.Tensor):
        self.inputs = [tensor.clone() for tensor in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph requires
            for _ in range(2):
                function(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = function(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, tensor in zip(self.inputs, inputs):
            static.copy_(tensor)
        self.graph.replay()
        # The next replay overwrites the outputs.
        if isinstance(self.outputs, tuple):
            return tuple(output.clone() for output in self.outputs)
        return self.outputs.clone()


def _attention_modules(unet) -> list:
    """The UNet's attention modules, found once: `unet.attn_processors` walks every module (~1 ms a call)."""
    if unet not in _MODULES:
        _MODULES[unet] = [module for module in unet.modules() if isinstance(module, Attention)]
    return _MODULES[unet]


def _attention_setup(unet) -> tuple | None:
    """What the plain forward's kernels depend on beyond the shapes: each layer's own processor type. None when a
    hook or an attention observer is active in the coming forward (it must run eagerly)."""
    kinds = []
    for processor in (module.processor for module in _attention_modules(unet)):
        if isinstance(processor, ExplicitAttnProcessor):
            if processor.runs_python:
                return None
            processor = processor.own_processor
        kinds.append(type(processor))
    return tuple(kinds)


def plain_forward(unet, sample: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, use_graphs: bool) -> torch.Tensor:
    """unet(sample, t, embeddings).sample, from a CUDA graph where one can serve (a CUDA device, no gradients, no
    active hook); eagerly otherwise, or after a capture failed on this UNet (logged once)."""
    usable = use_graphs and sample.is_cuda and torch.is_tensor(t) and not torch.is_grad_enabled()
    setup = _attention_setup(unet) if usable else None
    if setup is None or unet in _FAILED:
        return unet(sample, t, encoder_hidden_states=embeddings).sample
    graphs = _GRAPHS.setdefault(unet, {})
    key = (tuple(sample.shape), tuple(embeddings.shape), tuple(t.shape), sample.dtype, sample.device, setup)
    if key not in graphs:
        eager = unet(sample, t, encoder_hidden_states=embeddings).sample
        try:
            captured = CapturedCall(lambda *inputs: unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample,
                                    sample, t, embeddings)
            replayed = captured(sample, t, embeddings)
            # A forward whose kernels depend on more than its inputs' shapes would replay wrongly: check once.
            if not torch.allclose(replayed.float(), eager.float(), rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"the replay differs from the eager forward by {(replayed - eager).abs().max().item():.2e}")
        except Exception as error:  # a UNet whose forward cannot be captured still samples, eagerly
            _FAILED.add(unet)
            log.warning("CUDA graph capture of the UNet failed (%s: %s); sampling without graphs", type(error).__name__, error)
            return eager
        graphs[key] = captured
        return eager
    return graphs[key](sample, t, embeddings)
