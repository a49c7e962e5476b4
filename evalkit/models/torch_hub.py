"""Checkpoints that libraries fetch by URL into torch's hub cache (torchvision's ImageNet weights, pytorch-fid's
Inception): fetched up front, so that a missing file is one clear error rather than a urllib traceback deep inside
the library that loads it."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from evalkit.errors import MissingWeightsError


def torch_hub_checkpoint(url: str, what: str) -> Path:
    """The cached file of `url` in `$TORCH_HOME/hub/checkpoints`, where `torch.hub.load_state_dict_from_url` looks
    for it; downloaded there first if missing. `what` names the weights (and who needs them) in the error."""
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    path = directory / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except OSError as error:  # urllib's URLError and HTTPError are OSErrors, as are a full or read-only disk
        raise MissingWeightsError(
            f"{what}: {path.name} is not in torch's hub cache ({directory}) and cannot be downloaded here "
            f"({type(error).__name__}); download {url} on a machine with network and put it in that folder "
            f"(or point TORCH_HOME at a copy of the cache)"
        ) from None
    return path
