import os

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from evalkit.manifest import PROJECT_ROOT  # noqa: E402
from evalkit.models.loading import load_pipeline  # noqa: E402

TINY = OmegaConf.load(PROJECT_ROOT / "conf" / "model" / "tiny.yaml")


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline (methods install attention processors on it)."""
    return load_pipeline(TINY, torch.device("cpu"))
