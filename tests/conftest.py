import os

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The golden fixtures were made with AVX2 float kernels, and some methods amplify float noise enormously (Attention
# Regulation moves by ~1 when one rounding changes): on a CPU with AVX-512 the tests use the AVX2 kernels too. Set
# before torch is imported, which reads them once.
for variable, isa in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    os.environ.setdefault(variable, isa)
torch.set_num_threads(min(2, os.cpu_count() or 1))

from evalkit.manifest import PROJECT_ROOT  # noqa: E402
from evalkit.models.loading import load_pipeline  # noqa: E402

TINY = OmegaConf.load(PROJECT_ROOT / "conf" / "model" / "tiny.yaml")


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline (methods install attention processors on it)."""
    return load_pipeline(TINY, torch.device("cpu"))


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
