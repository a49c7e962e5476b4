import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The golden fixtures were made with AVX2 float kernels, and some methods amplify float noise enormously (Attention
# Regulation moves by ~1 when one rounding changes): on a CPU with AVX-512 the tests use the AVX2 kernels too. Set
# before torch is imported, which reads them once.
for variable, isa in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    os.environ.setdefault(variable, isa)
torch.set_num_threads(min(2, os.cpu_count() or 1))

from evalkit.models.loading import load_pipeline  # noqa: E402
from evalkit.paths import config_file  # noqa: E402

TINY = config_file("model", "tiny")


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline (methods install attention processors on it)."""
    return load_pipeline(TINY, torch.device("cpu"))


@pytest.fixture
def unet_calls(tiny_pipe) -> list:
    """Grows by one with every forward of `tiny_pipe`'s UNet: empty, a check failed before any model call."""
    calls = []
    tiny_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.fixture
def synthetic_coco(tmp_path):
    """A COCO-format captions file for 12 images (annotation ids out of image order, two captions each, one
    image without captions) and the images: (captions path, images folder)."""
    import json

    from PIL import Image

    images = [{"id": 100 + 7 * i, "file_name": f"COCO_val2014_{100 + 7 * i:012d}.jpg"} for i in range(12)]
    captions = []
    for i, image in enumerate(reversed(images)):
        captions.append({"id": 1000 + 2 * i, "image_id": image["id"], "caption": f"A  cat {image['id']}\n"})
        captions.append({"id": 999 - i, "image_id": image["id"], "caption": f"first caption of {image['id']} "})
    path = tmp_path / "coco" / "captions_val2014.json"
    folder = tmp_path / "coco" / "val2014"
    folder.mkdir(parents=True)
    path.write_text(json.dumps({"images": images + [{"id": 5, "file_name": "no_caption.jpg"}], "annotations": captions}))
    for image in images:
        Image.new("RGB", (8, 8), (image["id"], 90, 160)).save(folder / image["file_name"])
    return path, folder


# --- shared helpers -------------------------------------------------------------------------------------------------

def compose_config(overrides=(), config_name: str = "config", **kwargs):
    """`conf/<config_name>.yaml` composed with `overrides` as the command line composes it (`kwargs`: compose's, e.g.
    return_hydra_config)."""
    from hydra import compose, initialize_config_dir

    from evalkit.paths import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), **kwargs)


def poison(monkeypatch, method_class, hook: str, seed: int | None = None, step: int = 1, index: int | None = None) -> None:
    """Make `hook` (update_latents or predict_noise) of `method_class` return NaN at loop index `step` for `seed`'s
    image, or (`index`) for the image at that position of every sampling call's batch: what a diverging
    optimisation (or attention edit) hands the loop."""
    original = getattr(method_class, hook)

    def poisoned(self, run, i, t, latents):
        out = original(self, run, i, t, latents)
        if i == step:
            out = out.clone()
            out[run.seeds.index(seed) if index is None else index] = float("nan")
        return out

    monkeypatch.setattr(method_class, hook, poisoned)


def finetune_config(output_dir, **recipe):
    """A Separate-and-Enhance finetune of the tiny model at 64 px (32x32 latents: a training step takes a fraction of
    a second), batch 2."""
    from omegaconf import OmegaConf

    base = {"name": "test", "output_dir": str(output_dir), "steps": 4, "batch_size": 2, "learning_rate": 0.1,
            "scale_lr": False, "concept_pairs": [["cat", "dog"]], "resolution": 64, "checkpoint_every": 2}
    return OmegaConf.create({"device": "cpu", "model": TINY, "finetune": {**base, **recipe}})


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A finished 4-step finetune at a large learning rate (its keys differ clearly from the base model's): the
    checkpoint's path and the per-step losses."""
    from evalkit.finetune.train import finetune

    out = tmp_path_factory.mktemp("separate_and_enhance")
    log = []
    path = finetune(finetune_config(out), on_step=lambda step, losses: log.append(losses))
    return path, log


def generation_manifest(method: str, sampling: dict | None = None, *, experiment: str = "test", model: str = "tiny",
                        dataset: str = "toy", seeds=(0, 1)):
    """The generation manifest of `method`'s set (variant `<method>@0123456789`); `sampling`: its sampling settings,
    which a scorer comparing with vanilla (lpips) matches."""
    from evalkit.records import GenerationManifest

    identity = {} if sampling is None else {"sampling": sampling, "model": {"name": model}}
    return GenerationManifest(
        experiment=experiment, model=model, method=method, variant=f"{method}@0123456789", dataset=dataset,
        dataset_path=f"{dataset}.jsonl", dataset_version=1, dataset_sha256="0" * 64, model_source="random",
        model_revision=None, seeds=list(seeds), limit=None, config={}, identity=identity, versions={}, git_commit=None,
        hardware={},
    )


def random_image(rng, size=(64, 48)):
    """A PIL image of uniform random pixels, `size` (width, height)."""
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype="uint8"))
