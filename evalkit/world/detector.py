"""An analytic detector for the shapes world: which shapes, in which colours, an image shows.

No weights: the world's palette and outlines are known, so detection is measurement.
1. Colour. The image's colour cast (its border's median against the background colour) is taken out, then every
   pixel is matched to the ray from the background colour through each palette colour: a rendered edge pixel is
   a blend of its item's colour and the background, so it lies on its colour's ray (nearest-colour matching
   would call half a red edge orange). A pixel is foreground when it lies at least half-way along its ray (at
   least half covered) and within `MAX_RAY_DISTANCE` of it; farther pixels are no palette colour.
2. Objects. Connected foreground regions (8-connected), whatever their pixels' colours, so that an object whose
   colour drifts from pixel to pixel stays one region; its colour is its pixels' most frequent one. Regions
   smaller than `MIN_AREA_SHARE` of the image (speckles) or larger than `MAX_AREA_SHARE` (a filled background: no
   item of the world is that large) are not objects.
3. Shape. The region, cropped to its bounding box and resized to `TEMPLATE_SIDE` square, is compared with each
   shape's outline drawn the same way (soft IoU), times the agreement of the bounding boxes' aspect ratios (so a
   long bar is no square). The best shape wins if its score reaches `MIN_SHAPE_SCORE`. A region that matches no
   shape is split by colour (objects of different colours that touch) and each part is matched alone; objects of
   one colour that touch stay one region and are missed.

`python -m evalkit.world.detector` measures per-object accuracy on held-out renders (clean, and degraded as a small
diffusion model's images may be: blurred, colour-cast, colour-drifting, noisy) and false detections on images
without objects.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from evalkit.world.scenes import (
    BACKGROUND,
    COLOURS,
    FORMS,
    SHAPES,
    Item,
    Scene,
    render,
    sample_scene,
)

MAX_CAST = 50.0  # RGB units; a larger offset of the border from the background colour is an object, not a cast
FRAME = 2  # pixels of the border whose median is the image's background
MAX_RAY_DISTANCE = 60.0  # RGB units; a pixel farther from every ray is no colour of the world (noise, a stray hue)
MIN_COVERAGE = 0.5  # how far along its colour's ray a pixel must be to be foreground
MIN_AREA_SHARE = 0.005  # the smallest rendered item (a star at the smallest size) covers ~2.5% of the image
MAX_AREA_SHARE = 0.4  # the largest (a circle at the largest size) covers ~18%
TEMPLATE_SIDE = 32
MIN_SHAPE_SCORE = 0.6

# Held-out renders for the accuracy measurement, drawn with a seed of their own.
ACCURACY_SEED = 2_718_281
ACCURACY_SCENES_PER_FORM = 200
ACCURACY_RESOLUTION = 128

_PALETTE = np.array([COLOURS[name] for name in COLOURS], dtype=np.float64)
_COLOUR_NAMES = tuple(COLOURS)
_RAYS = _PALETTE - np.array(BACKGROUND, dtype=np.float64)  # background -> colour, one row per colour


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    score: float  # template IoU x aspect agreement, in [min_shape_score, 1]
    mask: np.ndarray  # boolean, the image's size


def _box_resized(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """`mask` cropped to its bounding box, box-resized to TEMPLATE_SIDE square (coverage in [0, 1]), and the
    box's aspect ratio (width / height)."""
    rows, columns = np.nonzero(mask)
    crop = mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    image = Image.fromarray(crop.astype(np.uint8) * 255).resize((TEMPLATE_SIDE, TEMPLATE_SIDE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64) / 255, crop.shape[1] / crop.shape[0]


def _templates() -> dict[str, tuple[np.ndarray, float]]:
    """Each shape's outline as `_box_resized` sees it, drawn large so that the template has no pixel steps."""
    side = 8 * TEMPLATE_SIDE
    masks = {shape: render(Scene((Item(shape, "red", 0.5, 0.5, 0.45),), "shape"), side)[1][0] for shape in SHAPES}
    return {shape: _box_resized(mask) for shape, mask in masks.items()}


TEMPLATES = _templates()


def colour_cast(pixels: np.ndarray) -> np.ndarray:
    """The image's colour cast: how far the median of its border is from the world's background colour (rendered
    items keep off the border), or zero when that is too far to be a cast of the background."""
    frame = np.concatenate([pixels[:FRAME].reshape(-1, 3), pixels[-FRAME:].reshape(-1, 3),
                            pixels[:, :FRAME].reshape(-1, 3), pixels[:, -FRAME:].reshape(-1, 3)])
    cast = np.median(frame, axis=0) - np.array(BACKGROUND, dtype=np.float64)
    return cast if np.linalg.norm(cast) <= MAX_CAST else np.zeros(3)


def colour_labels(pixels: np.ndarray) -> np.ndarray:
    """Per pixel of an (h, w, 3) uint8 array, the index of its palette colour in COLOURS' order, or -1 for
    background and colours far from every palette ray; the image's colour cast is taken out first."""
    offsets = pixels.astype(np.float64) - colour_cast(pixels) - np.array(BACKGROUND, dtype=np.float64)
    ray_lengths = (_RAYS**2).sum(axis=1)
    along = offsets @ _RAYS.T / ray_lengths  # (h, w, colours): 1 = the palette colour itself
    # Squared distance to each ray (Pythagoras: the offset's length minus its projection's); behind the
    # background (along < 0) the nearest point of the ray is the background itself.
    squared_distance = (offsets**2).sum(axis=-1, keepdims=True) - np.clip(along, 0, None) ** 2 * ray_lengths
    best = squared_distance.argmin(axis=-1)
    coverage = np.take_along_axis(along, best[..., None], axis=-1)[..., 0]
    foreground = (coverage >= MIN_COVERAGE) & (squared_distance.min(axis=-1) <= MAX_RAY_DISTANCE**2)
    return np.where(foreground, best, -1)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose outline best matches the region `mask`, and its score (soft IoU x aspect agreement)."""
    resized, aspect = _box_resized(mask)
    scores = {}
    for shape, (template, template_aspect) in TEMPLATES.items():
        iou = np.minimum(resized, template).sum() / np.maximum(resized, template).sum()
        scores[shape] = float(iou * min(aspect / template_aspect, template_aspect / aspect))
    best = max(scores, key=scores.__getitem__)
    return best, scores[best]


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of `mask` whose area is that of an object of the world."""
    regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    low, high = MIN_AREA_SHARE * mask.size, MAX_AREA_SHARE * mask.size
    return [regions == region for region in range(1, count + 1) if low <= sizes[region] <= high]


def detect(image: Image.Image, min_shape_score: float = MIN_SHAPE_SCORE) -> list[Detection]:
    """The world's objects in `image` (any size; RGB or convertible)."""
    labels = colour_labels(np.asarray(image.convert("RGB")))
    detections = []
    for region in _regions(labels >= 0):
        shape, score = classify_shape(region)
        if score >= min_shape_score:
            colour = _COLOUR_NAMES[np.bincount(labels[region]).argmax()]
            detections.append(Detection(shape, colour, score, region))
            continue
        # No shape: perhaps objects of different colours that touch; each colour's part may be one.
        for index in np.unique(labels[region]):
            for part in _regions(region & (labels == index)):
                shape, score = classify_shape(part)
                if score >= min_shape_score:
                    detections.append(Detection(shape, _COLOUR_NAMES[index], score, part))
    return detections


@dataclass(frozen=True)
class Accuracy:
    objects: int
    correct: int  # found with their shape and colour, the detection covering the item (IoU >= 0.5)
    false_detections: int  # detections that cover no item

    @property
    def rate(self) -> float:
        return self.correct / self.objects


def _degraded(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`image` as a small diffusion model might draw it: blurred edges (Gaussian, sigma 0.3-1.5 px), a colour cast
    (up to 30 per channel), colour drifting across the image (a smooth random field, sigma 15, correlated over ~3
    px) and pixel noise (sigma 8)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5)))), dtype=np.float64)
    drift = ndimage.gaussian_filter(rng.normal(size=blurred.shape), (3, 3, 0))
    noisy = blurred + rng.uniform(-30, 30, size=3) + 15 * drift / drift.std() + rng.normal(0, 8, size=blurred.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def measure_accuracy(
    degraded: bool,
    seed: int = ACCURACY_SEED,
    scenes_per_form: int = ACCURACY_SCENES_PER_FORM,
    resolution: int = ACCURACY_RESOLUTION,
) -> Accuracy:
    """Per-object accuracy of `detect` on `scenes_per_form` random scenes of every caption form."""
    rng = np.random.default_rng(seed)
    objects = correct = false_detections = 0
    for form in FORMS:
        for _ in range(scenes_per_form):
            scene = sample_scene(rng, form)
            image, masks = render(scene, resolution)
            detections = detect(_degraded(image, rng) if degraded else image)
            covering = [[_iou(d.mask, m) >= 0.5 for m in masks] for d in detections]
            objects += len(masks)
            correct += sum(
                any(cover[k] and (d.shape, d.colour) == (item.shape, item.colour) for d, cover in zip(detections, covering))
                for k, item in enumerate(scene.items)
            )
            false_detections += sum(not any(cover) for cover in covering)
    return Accuracy(objects, correct, false_detections)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def blank_and_noise_detections(resolution: int = ACCURACY_RESOLUTION, seed: int = ACCURACY_SEED) -> dict[str, int]:
    """How many objects `detect` finds where there are none: the background alone, one palette colour filling the
    image, uniform RGB noise, and background-coloured noise (sigma 30)."""
    rng = np.random.default_rng(seed)
    blank = np.full((resolution, resolution, 3), BACKGROUND, dtype=np.uint8)
    images = {
        "blank": blank,
        "solid red": np.full((resolution, resolution, 3), COLOURS["red"], dtype=np.uint8),
        "uniform noise": rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8),
        "background noise": np.clip(blank + rng.normal(0, 30, blank.shape), 0, 255).astype(np.uint8),
    }
    return {name: len(detect(Image.fromarray(pixels))) for name, pixels in images.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes-per-form", type=int, default=ACCURACY_SCENES_PER_FORM)
    arguments = parser.parse_args()
    for degraded in (False, True):
        accuracy = measure_accuracy(degraded, scenes_per_form=arguments.scenes_per_form)
        print(f"{'degraded' if degraded else 'clean'} renders: {accuracy.correct}/{accuracy.objects} objects "
              f"found with shape and colour ({accuracy.rate:.2%}), {accuracy.false_detections} false detections")
    for name, count in blank_and_noise_detections().items():
        print(f"{name}: {count} detections")


if __name__ == "__main__":
    main()
