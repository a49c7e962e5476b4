"""Which UNet forwards may be replayed from a CUDA graph. (The replays themselves need a GPU: `make bench` there
compares sampling with and without graphs and reports the largest latent difference.)"""

import torch

from evalkit.prompts import PromptSpec
from evalkit.sampling.attention import (
    AttentionHooks,
    CrossAttentionRecorder,
    layers_at_resolution,
)
from evalkit.sampling.cuda_graphs import _attention_setup, plain_forward
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS

SPEC = PromptSpec("p", "a cat and a dog", ("cat", "dog"))


def test_a_forward_with_an_active_hook_is_never_replayed(tiny_pipe):
    unet = tiny_pipe.unet
    own = _attention_setup(unet)
    assert own is not None and len(own) == len(unet.attn_processors)
    recorder = CrossAttentionRecorder(layers_at_resolution(unet, 64, 16), 16)
    hooks = AttentionHooks(unet, recorder.layers, recorder).install()
    try:
        assert _attention_setup(unet) == own  # installed but inactive: the layers run their own processors
        recorder.active = True
        assert _attention_setup(unet) is None
    finally:
        hooks.remove()


def test_without_a_gpu_the_forward_is_the_eager_one(tiny_pipe):
    sample_ = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    embeddings = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    with torch.no_grad():
        eager = tiny_pipe.unet(sample_, t, encoder_hidden_states=embeddings).sample
        assert torch.equal(plain_forward(tiny_pipe.unet, sample_, t, embeddings, use_graphs=True), eager)


def test_sampling_with_graphs_off_is_the_same_on_a_cpu(tiny_pipe):
    settings = SamplingSettings(num_inference_steps=2, guidance_scale=7.5, height=128, width=128)
    vanilla = METHODS.build({"name": "vanilla"})
    on = sample(tiny_pipe, vanilla, SPEC, [0], settings).latents
    off = sample(tiny_pipe, vanilla, SPEC, [0], settings, cuda_graphs=False).latents
    assert torch.equal(on, off)
