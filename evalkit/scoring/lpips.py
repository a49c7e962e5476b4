"""LPIPS against the base model, as Attention Regulation's Table 1 reports it: the distance between each method's
image and the `vanilla` image of the same model, sampling settings, prompt and seed (lower: closer to what the
base model draws). The method's own paper reports "–" for the base model; here vanilla scores 0 against itself.

The `lpips` package (0.1.4): `lpips.LPIPS(net="alex", version="0.1")`, torchvision's ImageNet AlexNet trunk with
the learned linear layers shipped in the package, both images as RGB tensors in [-1, 1] at their native size
(AR: 512 x 512), one value per image pair.
"""

from __future__ import annotations

import logging
import warnings
from importlib import metadata

import lpips
import torch
from PIL import Image
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights
from torchvision.transforms.functional import pil_to_tensor

from evalkit.errors import ConfigError, StoreError
from evalkit.models.torch_hub import torch_hub_checkpoint, weights_only_loads
from evalkit.records import GenerationManifest
from evalkit.scoring.base import SCORERS, ScoredImage, ScoredSet, Scorer
from evalkit.store import ImageKey

log = logging.getLogger("evalkit")

BASELINE_METHOD = "vanilla"
# The torchvision ImageNet weights lpips.LPIPS loads (through the legacy `pretrained=True`) for each trunk.
TRUNK_WEIGHTS = {
    "alex": AlexNet_Weights.IMAGENET1K_V1,
    "vgg": VGG16_Weights.IMAGENET1K_V1,
    "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


def lpips_input(image: Image.Image) -> torch.Tensor:
    """An RGB image as the (3, H, W) float tensor in [-1, 1] that LPIPS takes."""
    return pil_to_tensor(image.convert("RGB")).float() / 127.5 - 1.0


def _baseline_manifest(scored_set: ScoredSet) -> GenerationManifest:
    """The vanilla run of the same model and dataset with the same sampling settings as the set's run."""
    manifest = scored_set.manifest
    for candidate in scored_set.manifests:
        if (
            candidate.method == BASELINE_METHOD
            and candidate.model == manifest.model
            and candidate.dataset == manifest.dataset
            and candidate.identity["sampling"] == manifest.identity["sampling"]
            and candidate.identity["model"] == manifest.identity["model"]
        ):
            return candidate
    raise ConfigError(
        f"scorer lpips compares {manifest.variant} on {manifest.model}/{manifest.dataset} with "
        f"{BASELINE_METHOD}'s images of the same prompts and seeds, but the experiment has no {BASELINE_METHOD} run "
        f"of that model and dataset with the same sampling settings ({manifest.identity['sampling']}); "
        f"generate {BASELINE_METHOD} with those settings first"
    )


def _check_net(net: str) -> None:
    if net not in TRUNK_WEIGHTS:
        raise ConfigError(f"scorer lpips: unknown net {net!r}; choose from {sorted(TRUNK_WEIGHTS)}")


@SCORERS.register
class LpipsScorer(Scorer):
    name = "lpips"
    metrics = {"lpips_vs_vanilla": False}

    def __init__(
        self, device: torch.device, net: str = "alex", tiny: bool = False, batch_size: int = 16,
        random_weights: bool = False,
    ):
        super().__init__(device, batch_size)
        _check_net(net)
        self.check_weights(tiny, random_weights)
        if tiny or random_weights:  # the tiny stand-in is the full-size trunk already; only its label differs
            torch.manual_seed(0)
            purpose = "seed 0: a tiny stand-in" if tiny else "seed 0, for timing only"
            trunk = f"random {net} trunk ({purpose}, scores mean nothing)"
        else:
            weights = TRUNK_WEIGHTS[net]
            torch_hub_checkpoint(weights.url, f"scorer lpips: torchvision's ImageNet {net} weights")
            trunk = f"torchvision {net} {weights.name}"
        with warnings.catch_warnings(), weights_only_loads(f"scorer lpips ({net})"):
            # lpips asks torchvision for weights the pre-0.13 way, which it deprecates
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
            model = lpips.LPIPS(net=net, version="0.1", pnet_rand=tiny or random_weights, verbose=False)
        self.model = model.to(device).eval()
        self.provenance = (
            f"lpips {metadata.version('lpips')} v0.1, {trunk} + the package's linear layers, RGB in [-1, 1] at "
            f"native size, against {BASELINE_METHOD} of the same model, sampling, prompt and seed"
        )
        self._scored_set: ScoredSet | None = None
        self._baseline_variant: str | None = None
        self._missing: list[str] = []  # the items of the current `update` without a vanilla image

    @classmethod
    def preflight(cls, params, methods, specs) -> None:
        _check_net(params.get("net", "alex"))
        if BASELINE_METHOD not in methods:
            raise ConfigError(
                f"scorer lpips compares every method's images with {BASELINE_METHOD}'s of the same prompt and seed; "
                f"add {BASELINE_METHOD} to methods (got {list(methods)})"
            )

    def begin_set(self, scored_set: ScoredSet) -> None:
        self._scored_set = scored_set
        self._baseline_variant = _baseline_manifest(scored_set).variant

    def _baseline_image(self, item: ScoredImage) -> Image.Image | str:
        """The vanilla image paired with `item`, or why there is none."""
        store = self._scored_set.store
        key = ImageKey(item.model, self._baseline_variant, item.dataset, item.prompt_id, item.seed)
        if not store.record_path(key).is_file():
            return f"{store.image_path(key)} was not generated"
        try:
            if store.read_record(key).get("status") != "ok":
                return f"{store.image_path(key)}: its generation failed"
            return store.read_image(key)
        except StoreError as error:
            return str(error)

    @torch.no_grad()
    def distances(self, images: list[Image.Image], baselines: list[Image.Image]) -> torch.Tensor:
        """LPIPS between each image and its baseline, shape (len(images),)."""
        first = torch.stack([lpips_input(image) for image in images]).to(self.device)
        second = torch.stack([lpips_input(image) for image in baselines]).to(self.device)
        return self.model(first, second).flatten()

    def update(self, items) -> None:
        """Score the items whose generation succeeded against their vanilla image; an item without one gets no row
        and a warning that names it (scoring again once it exists fills the row in)."""
        if self._scored_set is None:
            raise RuntimeError("lpips scorer: begin_set must name the set before update")
        self._missing = []
        super().update(items)
        if self._missing:
            manifest = self._scored_set.manifest
            log.warning(
                "lpips: %d images of %s on %s/%s have no %s image to compare with and get no score:\n  %s",
                len(self._missing), manifest.variant, manifest.model, manifest.dataset, self._baseline_variant,
                "\n  ".join(self._missing),
            )

    def score_batch(self, items: list[ScoredImage]) -> None:
        pairs = []
        for item in items:
            baseline = self._baseline_image(item)
            if isinstance(baseline, str):
                self._missing.append(f"{item.prompt_id} seed {item.seed} ({baseline})")
                continue
            if baseline.size != item.image.size:
                raise ValueError(
                    f"lpips scorer: {item.variant} {item.prompt_id} seed {item.seed} is {item.image.size} but its "
                    f"{self._baseline_variant} image is {baseline.size}; LPIPS compares images of one size"
                )
            pairs.append((item, baseline))
        if pairs:
            values = self.distances([item.image for item, _ in pairs], [baseline for _, baseline in pairs])
            for (item, _), value in zip(pairs, values):
                self._add_row(item, "lpips_vs_vanilla", float(value))
