"""Checkpoints that libraries fetch by URL into torch's hub cache (torchvision's ImageNet weights, pytorch-fid's
Inception): fetched up front, so that a missing file is one clear error rather than a urllib traceback deep inside
the library that loads it; and loaded by those libraries in torch's weights-only mode, so that no checkpoint runs
code when it is unpickled."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from evalkit.errors import MissingWeightsError, UnsafeWeightsError

# torch.load reads this at every call and then loads in weights-only mode whatever the caller asked for.
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


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


@contextmanager
def weights_only_loads(what: str) -> Iterator[None]:
    """Within: every `torch.load` unpickles tensors and plain containers only (torch's weights-only unpickler),
    even where a library asks for full unpickling (`torch.hub.load_state_dict_from_url`'s default, which
    torchvision and pytorch-fid use). A checkpoint that needs more is refused as one error naming `what`."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    except pickle.UnpicklingError as error:
        raise UnsafeWeightsError(
            f"{what}: a checkpoint holds more than weights and is not loaded (weights-only unpickling refused it: "
            f"{str(error).splitlines()[0]}); replace it with the original file"
        ) from None
    finally:
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous
