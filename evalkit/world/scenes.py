"""The shapes world: flat scenes of one to three coloured shapes, drawn by code, with captions and exact labels.

A scene is a list of items (shape, colour, centre, size) and a caption in one of the Attend-and-Excite
benchmark's forms ("a circle and a star", "a red circle and a blue star", "a circle with a star"). Drawing is
deterministic (PIL polygons, 4x supersampled, then reduced with a box filter), so a scene always gives the same
pixels, and the renderer returns each item's mask: every image carries its own ground truth. Items never overlap,
so each mask is one connected object of one colour.

Every shape and colour word is one CLIP token, so the methods' token indexing sees each subject as one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 165, 60),
    "yellow": (240, 205, 30),
    "purple": (140, 55, 180),
    "orange": (245, 135, 25),
}
BACKGROUND: tuple[int, int, int] = (245, 245, 240)

# Caption forms. "_pair" forms name two items, "triple" three; "coloured" forms name each item's colour.
FORMS: dict[str, str] = {
    "shape": "{0}",
    "coloured_shape": "{0}",
    "shape_pair": "{0} and {1}",
    "coloured_pair": "{0} and {1}",
    "shape_with_shape": "{0} with {1}",
    "shape_triple": "{0}, {1} and {2}",
}
COLOURED_FORMS = frozenset({"coloured_shape", "coloured_pair"})
ITEMS_PER_FORM: dict[str, int] = {form: template.count("{") for form, template in FORMS.items()}

SUPERSAMPLING = 4
MIN_SIZE, MAX_SIZE = 0.14, 0.24  # an item's half-width, as a share of the image side
MARGIN = 0.04  # empty space kept between items and around the border, as a share of the image side


@dataclass(frozen=True)
class Item:
    """One drawn object; position and size are shares of the image side, so one scene renders at any resolution."""

    shape: str
    colour: str
    x: float  # centre
    y: float
    size: float  # half-width of the bounding square

    def phrase(self, coloured: bool) -> str:
        """"a circle", "an orange circle": the item as a caption names it."""
        words = f"{self.colour} {self.shape}" if coloured else self.shape
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]
    form: str

    @property
    def caption(self) -> str:
        coloured = self.form in COLOURED_FORMS
        return FORMS[self.form].format(*(item.phrase(coloured) for item in self.items))

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(item.shape for item in self.items)


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """The polygon of `shape` centred at (x, y) within a square of half-width r (pixels, y down)."""
    if shape == "circle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 96, endpoint=False)]
    if shape == "square":
        s = 0.85 * r  # a square filling its box looks larger than the other shapes
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        return points
    if shape == "heart":
        # The classic parametric heart, scaled so that it spans the box.
        t = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        scale = r / 16.5
        return [(x + scale * a, y + scale * (b + 1.5)) for a, b in zip(hx, hy)]
    if shape == "cross":
        w = 0.34 * r
        return [
            (x - w, y - r), (x + w, y - r), (x + w, y - w), (x + r, y - w), (x + r, y + w), (x + w, y + w),
            (x + w, y + r), (x - w, y + r), (x - w, y + w), (x - r, y + w), (x - r, y - w), (x - w, y - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; the world's shapes are {', '.join(SHAPES)}")


def _item_mask(item: Item, side: int) -> Image.Image:
    """The item's coverage at `side` x `side` pixels, as a greyscale image (255 inside)."""
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).polygon(_outline(item.shape, item.x * side, item.y * side, item.size * side), fill=255)
    return canvas


def render(scene: Scene, resolution: int) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene's RGB image and, per item, its boolean mask (pixels at least half covered by the item)."""
    side = resolution * SUPERSAMPLING
    image = Image.new("RGB", (side, side), BACKGROUND)
    masks = []
    for item in scene.items:
        coverage = _item_mask(item, side)
        image.paste(COLOURS[item.colour], mask=coverage)
        reduced = np.asarray(coverage.resize((resolution, resolution), Image.Resampling.BOX))
        masks.append(reduced >= 128)
    return image.resize((resolution, resolution), Image.Resampling.BOX), masks


def _placements(rng: np.random.Generator, count: int) -> list[tuple[float, float, float]]:
    """`count` non-overlapping (x, y, size) boxes inside the image, drawn by rejection."""
    while True:
        boxes: list[tuple[float, float, float]] = []
        for _ in range(200):
            size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
            low, high = size + MARGIN, 1 - size - MARGIN
            x, y = float(rng.uniform(low, high)), float(rng.uniform(low, high))
            # Boxes kept apart on at least one axis never overlap, whatever the shapes inside.
            if all(max(abs(x - bx), abs(y - by)) >= size + bs + MARGIN for bx, by, bs in boxes):
                boxes.append((x, y, size))
                if len(boxes) == count:
                    return boxes
        # Early boxes too large to leave room: start over (rare for three items).


def sample_scene(
    rng: np.random.Generator,
    form: str,
    shapes: tuple[str, ...] | None = None,
    colours: tuple[str, ...] | None = None,
) -> Scene:
    """A random scene of `form`; `shapes` / `colours` fix the items' shapes or colours (else drawn at random).

    Items of one scene have different shapes (captions never repeat a noun), and in coloured forms different
    colours, so that every subject and every colour in a caption names exactly one item.
    """
    if form not in FORMS:
        raise ValueError(f"unknown caption form {form!r}; the forms are {', '.join(FORMS)}")
    count = ITEMS_PER_FORM[form]
    if shapes is None:
        shapes = tuple(str(s) for s in rng.choice(SHAPES, size=count, replace=False))
    if colours is None:
        colours = tuple(str(c) for c in rng.choice(list(COLOURS), size=count, replace=form not in COLOURED_FORMS))
    if len(shapes) != count or len(colours) != count:
        raise ValueError(f"form {form!r} has {count} items; got shapes {shapes} and colours {colours}")
    items = tuple(
        Item(shape, colour, x, y, size)
        for shape, colour, (x, y, size) in zip(shapes, colours, _placements(rng, count))
    )
    return Scene(items, form)
