"""FID of each generated set (one method variant on one model and dataset) against a folder of real images
(Attention Regulation: a 3,000-image COCO subset), one value per set.

Features: pytorch-fid's InceptionV3 with the TF-ported FID weights (pt_inception-2015-12-05), pool3 (2048) by
default or one of its earlier blocks (64, 192, 768, spatially averaged as pytorch-fid does).
Resize policy, the same for both sets: centre crop to the largest square, then clean-fid's "clean" resize (PIL
bicubic with antialiasing, per channel in float, no rounding back to uint8) to 299 x 299. pytorch-fid itself
resizes inside the network, bilinearly without antialiasing, and needs one size per batch; COCO's images come in
many sizes and aspect ratios, and aliased resizing moves FID by several points (clean-fid), so one fixed policy is
applied before the network and the network's own resize is off.
Statistics: mean and unbiased covariance of the features, in float64, as pytorch-fid's np.cov.
Distance: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2); see `frechet_distance`.
The real folder's statistics are cached in `cache_dir`, in a file named by a hash of every image's name and bytes
and of the settings above. FID is biased upwards at small N: compare values only at equal set sizes; a set smaller
than the feature dimension (singular covariance) gets a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from unittest import mock

import numpy as np
import pytorch_fid.inception
import torch
import torchvision
from PIL import Image
from pytorch_fid.fid_score import IMAGE_EXTENSIONS
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from tqdm import tqdm

from evalkit.errors import ConfigError
from evalkit.models.torch_hub import torch_hub_checkpoint, weights_only_loads
from evalkit.paths import project_path
from evalkit.prompts import file_sha256
from evalkit.scoring.base import SCORERS, ScoredImage, ScoredSet, Scorer
from evalkit.store import atomic_write_bytes

log = logging.getLogger("evalkit")

INCEPTION_SIZE = 299
RESIZE_POLICY = "centre crop to square, clean-fid clean resize (PIL bicubic, float per channel) to 299"
# Part of the cache key: bump when the features of an image change (policy, network, statistics).
STATISTICS_VERSION = 1


def fid_input(image: Image.Image) -> torch.Tensor:
    """The (3, 299, 299) float tensor in [0, 1] that the resize policy makes of an image."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = rgb[top : top + side, left : left + side]
    channels = [  # float32 arrays become PIL "F" images: resized without rounding
        np.asarray(
            Image.fromarray(square[:, :, channel].astype(np.float32)).resize(
                (INCEPTION_SIZE, INCEPTION_SIZE), resample=Image.Resampling.BICUBIC
            )
        )
        for channel in range(3)
    ]
    return torch.from_numpy(np.stack(channels).clip(0, 255) / 255.0).float()


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (rows are samples), in float64."""
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64 on the tensors' device.

    The eigenvalues of S1 S2 are those of the symmetric positive semi-definite S1^1/2 S2 S1^1/2, so tr sqrt(S1 S2)
    is the sum of the square roots of that matrix's eigenvalues; symmetric eigensolvers make this real and stable,
    also for the singular covariances of sets smaller than the feature dimension. pytorch-fid takes scipy's sqrtm of
    the non-symmetric product and torchmetrics the general eigenvalues; the tests compare all three.
    """
    mu1, sigma1, mu2, sigma2 = (tensor.double() for tensor in (mu1, sigma1, mu2, sigma2))
    values, vectors = torch.linalg.eigh(sigma1)
    root1 = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    product = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


@contextmanager
def _without_fid_weights():
    """pytorch-fid builds its Inception and then downloads and loads the FID weights; skip both, leaving the
    weights as initialised (for the random stand-in only)."""
    with mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url", return_value={}), mock.patch.object(
        torchvision.models.Inception3, "load_state_dict", return_value=None
    ):
        yield


def build_inception(dims: int, tiny: bool) -> InceptionV3:
    """pytorch-fid's InceptionV3 up to the block giving `dims` features, with its resize off (see the module
    docstring) and its [0, 1] -> [-1, 1] scaling on. `tiny`: seeded random weights, He-initialised convolutions so
    that activations keep their scale through the network (PyTorch's default init makes them vanish)."""
    blocks = [InceptionV3.BLOCK_INDEX_BY_DIM[dims]]
    if not tiny:
        torch_hub_checkpoint(FID_WEIGHTS_URL, "scorer fid: pytorch-fid's Inception FID weights")
        with weights_only_loads("scorer fid"):
            return InceptionV3(blocks, resize_input=False, normalize_input=True).eval()
    torch.manual_seed(0)
    with _without_fid_weights():
        model = InceptionV3(blocks, resize_input=False, normalize_input=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


def image_files(folder: Path) -> list[Path]:
    """The images directly in `folder` (pytorch-fid's extensions), sorted by name."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower()[1:] in IMAGE_EXTENSIONS)


def _check_parameters(reference_dir: str, dims: int) -> list[Path]:
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ConfigError(f"scorer fid: dims must be one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
    folder = project_path(reference_dir)
    if not folder.is_dir():
        raise ConfigError(
            f"scorer fid: the real-image folder {folder} does not exist; put the reference images there or set "
            f"scorers.fid.reference_dir"
        )
    files = image_files(folder)
    if len(files) < 2:
        raise ConfigError(f"scorer fid: the real-image folder {folder} holds {len(files)} images; FID needs at least 2")
    return files


def _warn_if_small(what: str, n_images: int, dims: int) -> None:
    if n_images < dims:
        log.warning(
            "fid: %s has %d images, fewer than the %d feature dimensions: its covariance is singular and FID is "
            "strongly biased; compare only values computed at the same set sizes",
            what, n_images, dims,
        )


@SCORERS.register
class FidScorer(Scorer):
    name = "fid"
    metrics = {"fid": False}
    set_level = True

    def __init__(
        self,
        device: torch.device,
        reference_dir: str,
        reference_label: str,
        dims: int = 2048,
        tiny: bool = False,
        batch_size: int = 50,
        cache_dir: str = "outputs/fid_statistics",
        random_weights: bool = False,
    ):
        super().__init__(device, batch_size)
        self.check_weights(tiny, random_weights)
        files = _check_parameters(reference_dir, dims)
        self.dims = dims
        self.model = build_inception(dims, tiny or random_weights).to(device)
        if tiny:
            weights = "random weights, seed 0: a tiny stand-in, scores mean nothing"
        elif random_weights:
            weights = "random weights, seed 0, for timing only: scores mean nothing"
        else:
            weights = "pt_inception-2015-12-05"
        settings = {"weights": weights, "dims": dims, "resize": RESIZE_POLICY, "version": STATISTICS_VERSION}
        self.reference_mu, self.reference_sigma, key = self._reference_statistics(files, settings, cache_dir)
        self.provenance = (
            f"fid pytorch-fid {metadata.version('pytorch-fid')} InceptionV3 ({weights}), {dims} features, "
            f"{RESIZE_POLICY}; real images: {reference_label} ({len(files)} images, {key[:12]})"
        )
        self._features: list[torch.Tensor] = []
        self._scored_set: ScoredSet | None = None

    @classmethod
    def preflight(cls, params, methods, specs) -> None:
        for required in ("reference_dir", "reference_label"):
            if required not in params:
                raise ConfigError(f"scorer fid: set {required} (the folder of real images and what they are)")
        _check_parameters(params["reference_dir"], params.get("dims", 2048))

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """Inception features of `images`, shape (len(images), dims), on the scorer's device."""
        pixels = torch.stack([fid_input(image) for image in images]).to(self.device)
        output = self.model(pixels)[0]
        if output.shape[2:] != (1, 1):  # blocks before pool3 give maps; pytorch-fid averages them
            output = torch.nn.functional.adaptive_avg_pool2d(output, (1, 1))
        return output.flatten(start_dim=1)

    def _reference_statistics(
        self, files: list[Path], settings: dict, cache_dir: str
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for path in files:
            digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
        key = digest.hexdigest()
        cache = project_path(cache_dir) / f"fid_reference_{key[:32]}.npz"
        _warn_if_small(f"the real-image folder {files[0].parent}", len(files), self.dims)
        if cache.is_file():
            with np.load(cache) as cached:
                return torch.from_numpy(cached["mu"]), torch.from_numpy(cached["sigma"]), key
        features = []
        for start in tqdm(range(0, len(files), self.batch_size), desc="fid real images", unit="batch"):
            images = []
            for path in files[start : start + self.batch_size]:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            features.append(self.features(images))
        mu, sigma = gaussian_statistics(torch.cat(features))
        buffer = io.BytesIO()
        np.savez(buffer, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n_images=len(files),
                 settings=json.dumps({**settings, "folder": str(files[0].parent)}))
        atomic_write_bytes(cache, buffer.getvalue())
        return mu.cpu(), sigma.cpu(), key

    def reset(self) -> None:
        super().reset()
        self._features = []

    def begin_set(self, scored_set: ScoredSet) -> None:
        self._scored_set = scored_set

    def score_batch(self, items: list[ScoredImage]) -> None:
        """Keep the batch's features; the distance is taken in `compute`."""
        self._features.append(self.features([item.image for item in items]))

    def compute(self) -> list[dict]:
        """One row: the FID of every image passed to `update` since `reset` against the real images (NaN for a set
        of fewer than 2 images, where there is no covariance)."""
        if self._scored_set is None:
            raise RuntimeError("fid scorer: begin_set must name the set before compute")
        manifest = self._scored_set.manifest
        features = torch.cat(self._features) if self._features else torch.empty(0, self.dims)
        what = f"the generated set {manifest.model}/{manifest.variant}/{manifest.dataset}"
        if len(features) < 2:
            log.warning("fid: %s has %d images; FID needs at least 2", what, len(features))
            value = float("nan")
        else:
            _warn_if_small(what, len(features), self.dims)
            mu, sigma = gaussian_statistics(features)
            value = frechet_distance(mu, sigma, self.reference_mu.to(mu.device), self.reference_sigma.to(mu.device))
        return [self._set_row(self._scored_set, "fid", value, len(features)).as_dict()]
