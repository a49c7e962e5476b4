"""Train the shapes-world CLIP (evalkit/world/dual_encoder.py) and write weights/shapes-clip/ with its model card.

`python -m evalkit.world.train_shapes_clip` (seeded; about 10 minutes on a CPU, a GPU when there is one).

Data: scenes of every caption form drawn by `sample_scene` and rendered at 128 px, the world model's resolution,
then reduced to the encoder's 64 px as the scorer reduces a generated image. Every pair of shapes is used, the pairs
of the unseen split included: the dual encoder is the instrument that scores the diffusion model on that split, not
a model whose generalisation is tested there, so it must know the unseen pairs as well as the seen ones (one that
had never seen a circle with a star would score that split worse for its own reasons, not the sampler's). The
diffusion model never sees these scorer weights or data.
Loss: CLIP's symmetric InfoNCE over the batch, with hard negative captions added on the image-to-text side (colours
swapped, a colour or a shape replaced, an object the image lacks added): in-batch captions alone rarely differ from
the right one by a binding, and binding is what the methods fix. A caption right about an image is not counted as
its negative, whether it names all of the image's objects ("a circle and a star" for another image of a circle and a
star) or some ("a circle"): clip_min_object scores each object's phrase alone, so "a circle" must score high on
every image with a circle. Trained with partial captions as negatives, clip_min_object preferred images that had
lost an object (39% right, against 100% for clip_full, in a first run).
Augmentations make the encoder robust to a diffusion model's output: a small affine jitter, brightness, contrast,
saturation and channel gains, Gaussian blur and Gaussian noise, each drawn per image.
Held-out evaluation: fresh scenes (another random stream), image-to-caption accuracy against each kind of hard
negative, clean and degraded, and whether a scene missing one of its objects scores lower (object neglect).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from evalkit.manifest import git_commit, hardware
from evalkit.world.dual_encoder import (
    CONFIG_NAME,
    TRAIN_COMMAND,
    WEIGHTS_FOLDER,
    WEIGHTS_NAME,
    CaptionTokenizer,
    DualEncoder,
    DualEncoderConfig,
    ShapesClip,
    image_pixels,
    save_dual_encoder,
    weights_path,
    world_token_ids,
)
from evalkit.world.scenes import (
    COLOURED_FORMS,
    COLOURS,
    FORMS,
    SHAPES,
    Item,
    Scene,
    render,
    sample_scene,
)
from evalkit.world.split import is_seen

RENDER_RESOLUTION = 128  # the world diffusion model's image size; the encoder reduces it as the scorer does
# The form that names a scene with one object fewer, or one more, in the same colouring.
DROPPED_FORM = {
    "coloured_pair": "coloured_shape", "shape_pair": "shape", "shape_with_shape": "shape", "shape_triple": "shape_pair"
}
ADDED_FORM = {"coloured_shape": "coloured_pair", "shape": "shape_pair", "shape_pair": "shape_triple"}
# "object dropped" (the caption less one object) is measured but not trained as a negative: it is still true of the
# image, and clip_min_object needs "a circle" to score high on every image with a circle in it.
TRAINED_NEGATIVE_KINDS = ("colours swapped", "colour replaced", "shape replaced", "object added")
NEGATIVE_KINDS = (*TRAINED_NEGATIVE_KINDS, "object dropped")


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 96
    negatives_per_image: int = 3
    train_scenes: int = 12000
    held_out_per_form: int = 100
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    augmented_share: float = 0.8  # the rest of each batch stays clean


def hard_negatives(scene: Scene) -> dict[str, list[Scene]]:
    """Captions one edit away from `scene`'s, as scenes (positions unchanged; an added object is never drawn), by
    kind. None is right about the image but "object dropped", which says less than the caption."""
    items, coloured = scene.items, scene.form in COLOURED_FORMS
    negatives: dict[str, list[Scene]] = {kind: [] for kind in NEGATIVE_KINDS}

    def edited(kind: str, changes: dict[int, Item]) -> None:
        negatives[kind].append(Scene(tuple(changes.get(index, item) for index, item in enumerate(items)), scene.form))

    used_shapes, used_colours = {item.shape for item in items}, {item.colour for item in items}
    for index, item in enumerate(items):
        for shape in SHAPES:
            if shape not in used_shapes:
                edited("shape replaced", {index: replace(item, shape=shape)})
        for colour in COLOURS if coloured else ():
            if colour not in used_colours:
                edited("colour replaced", {index: replace(item, colour=colour)})
        if len(items) > 1:
            negatives["object dropped"].append(Scene(items[:index] + items[index + 1 :], DROPPED_FORM[scene.form]))
    unused_colours = [colour for colour in COLOURS if colour not in used_colours]
    for shape in SHAPES if scene.form in ADDED_FORM else ():
        if shape not in used_shapes:
            for colour in unused_colours if coloured else unused_colours[:1]:
                added = Item(shape, colour, 0.5, 0.5, 0.0)
                negatives["object added"].append(Scene((*items, added), ADDED_FORM[scene.form]))
    for first, second in combinations(range(len(items)), 2) if coloured else ():
        edited("colours swapped", {first: replace(items[first], colour=items[second].colour),
                                   second: replace(items[second], colour=items[first].colour)})
    return negatives


def content(scene: Scene, coloured: bool) -> frozenset:
    """What a caption says about a scene: its shapes, with their colours when the caption names them."""
    return frozenset((item.shape, item.colour if coloured else None) for item in scene.items)


def true_of(caption_scenes: list[Scene], image_scenes: list[Scene]) -> torch.Tensor:
    """(images, captions) bool: whether each caption is right about each image, naming all of its objects or some
    ("a circle" is right about an image of a circle and a star)."""
    coloured = [caption.form in COLOURED_FORMS for caption in caption_scenes]
    caption_contents = [content(caption, colour) for caption, colour in zip(caption_scenes, coloured)]
    image_contents = [{colour: content(image, colour) for colour in (False, True)} for image in image_scenes]
    return torch.tensor([
        [said <= contents[colour] for said, colour in zip(caption_contents, coloured)] for contents in image_contents
    ])


def render_scenes(scenes: list[Scene], side: int, chunk: int = 256) -> torch.Tensor:
    """uint8 (N, 3, side, side): each scene rendered at RENDER_RESOLUTION, reduced as the scorer reduces images
    (a chunk at a time, so that the full-size renders of a whole training set are never all in memory)."""
    chunks = []
    for start in range(0, len(scenes), chunk):
        images = [render(scene, RENDER_RESOLUTION)[0] for scene in scenes[start : start + chunk]]
        chunks.append((image_pixels(images, side) * 255).round().to(torch.uint8))
    return torch.cat(chunks)


def draw_scenes(rng: np.random.Generator, per_form: int) -> list[Scene]:
    return [sample_scene(rng, form) for form in FORMS for _ in range(per_form)]


def _uniform(generator: torch.Generator, count: int, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, *shape, generator=generator)


def _gaussian_blur(pixels: torch.Tensor, sigmas: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Each image blurred with its own sigma (pixels), edge pixels repeated at the border. The separable blur is a
    (side x side) matrix per image applied to rows and columns: one batched matmul, much faster on a CPU than a
    grouped convolution with a kernel per image."""
    side = pixels.shape[-1]
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-(offsets[None, :].float() ** 2) / (2 * sigmas[:, None] ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)
    sources = (torch.arange(side)[:, None] + offsets[None, :]).clamp(0, side - 1)  # (side, taps)
    blur = torch.zeros(len(sigmas), side, side)
    blur.scatter_add_(2, sources.expand(len(sigmas), -1, -1), weights[:, None, :].expand(-1, side, -1).contiguous())
    blur = blur[:, None]  # one matrix per image, shared by its channels
    return blur @ pixels @ blur.transpose(-1, -2)


def degrade(pixels: torch.Tensor, generator: torch.Generator, share: float) -> torch.Tensor:
    """`share` of the images (floats in [0, 1]) degraded as a diffusion model's output might be; the rest unchanged."""
    count = pixels.shape[0]
    angle, scale = _uniform(generator, count, -0.1, 0.1), _uniform(generator, count, 0.95, 1.05)
    shift = _uniform(generator, count, -0.03, 0.03, 2)
    theta = torch.stack([
        torch.stack([torch.cos(angle) / scale, -torch.sin(angle) / scale, shift[:, 0]], dim=1),
        torch.stack([torch.sin(angle) / scale, torch.cos(angle) / scale, shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)
    grey = (out * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(dim=1, keepdim=True)
    out = grey + (out - grey) * _uniform(generator, count, 0.75, 1.25, 1, 1, 1)  # saturation
    mean = grey.mean(dim=(2, 3), keepdim=True)
    out = mean + (out - mean) * _uniform(generator, count, 0.8, 1.2, 1, 1, 1)  # contrast
    out = out * _uniform(generator, count, 0.85, 1.15, 1, 1, 1) * _uniform(generator, count, 0.95, 1.05, 3, 1, 1)
    out = _gaussian_blur(out, _uniform(generator, count, 0.05, 1.2))
    out = out + torch.randn(out.shape, generator=generator) * _uniform(generator, count, 0.0, 0.06, 1, 1, 1)
    degraded = torch.rand(count, generator=generator) < share
    return torch.where(degraded[:, None, None, None], out.clamp(0, 1), pixels)


def contrastive_loss(
    model: DualEncoder, pixels: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE. Caption i is image i's; captions beyond the batch are extra image-to-text
    negatives; `right` (images, captions) marks captions right about an image, left out of its negatives."""
    count = pixels.shape[0]
    own = torch.zeros_like(right)
    own[:, :count] = torch.eye(count, dtype=torch.bool)
    scale = model.logit_scale.clamp(max=math.log(100)).exp()
    logits = scale * model.encode_images(pixels) @ model.encode_texts(rows, lengths).T
    logits = logits.masked_fill(right & ~own, float("-inf"))
    targets = torch.arange(count, device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :count].T, targets)) / 2


def _training_captions(scenes: list[Scene], rng: np.random.Generator, per_image: int) -> list[Scene]:
    """The batch's own captions, then up to `per_image` hard negatives per image: a kind drawn first (so that the
    one colour swap is as frequent as the many shape replacements), then one of that kind."""
    negatives = []
    for scene in scenes:
        negatives_of_scene = hard_negatives(scene)
        by_kind = [negatives_of_scene[kind] for kind in TRAINED_NEGATIVE_KINDS if negatives_of_scene[kind]]
        for kind in rng.choice(len(by_kind), size=min(per_image, len(by_kind)), replace=False):
            negatives.append(by_kind[kind][rng.integers(len(by_kind[kind]))])
    return scenes + negatives


def _learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def train(recipe: Recipe, device: torch.device) -> tuple[DualEncoder, list[float]]:
    """The trained model (eval mode) and its loss at every step."""
    torch.manual_seed(recipe.seed)
    data_rng = np.random.default_rng([recipe.seed, 0])  # scenes and negatives; held-out scenes use stream 1
    generator = torch.Generator().manual_seed(recipe.seed)  # augmentations
    config = DualEncoderConfig(token_ids=world_token_ids())
    model = DualEncoder(config).to(device).train()
    tokenizer = CaptionTokenizer(config)
    token_rows = {}  # caption -> rows: the world has a few thousand distinct captions

    drawn = draw_scenes(data_rng, recipe.train_scenes // len(FORMS))
    # Each scene with a colour swap (a coloured pair) is trained beside its twin, the same scene with the colours
    # swapped: the two images and the two captions then differ only in which colour goes with which shape. With the
    # swapped caption as the only binding negative, a first run told them apart in 59% of held-out scenes.
    swappable = [index for index, scene in enumerate(drawn) if hard_negatives(scene)["colours swapped"]]
    twin_of = {index: len(drawn) + rank for rank, index in enumerate(swappable)}
    scenes = drawn + [hard_negatives(drawn[index])["colours swapped"][0] for index in swappable]
    started = time.perf_counter()
    pool = render_scenes(scenes, config.image_side)
    print(f"rendered {len(scenes)} training scenes in {time.perf_counter() - started:.0f} s", flush=True)

    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
    )
    losses = []
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        indices = data_rng.choice(len(drawn), size=recipe.batch_size, replace=False)
        indices = np.concatenate([indices, [twin_of[index] for index in indices if index in twin_of]]).astype(int)
        batch_scenes = [scenes[index] for index in indices]
        captions = _training_captions(batch_scenes, data_rng, recipe.negatives_per_image)
        for caption in captions:
            if caption.caption not in token_rows:
                token_rows[caption.caption] = tokenizer([caption.caption])
        rows = torch.cat([token_rows[caption.caption][0] for caption in captions])
        lengths = torch.cat([token_rows[caption.caption][1] for caption in captions])
        pixels = degrade(pool[torch.from_numpy(indices)].float() / 255, generator, recipe.augmented_share)
        loss = contrastive_loss(
            model, pixels.to(device), rows.to(device), lengths.to(device), true_of(captions, batch_scenes).to(device)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == recipe.steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1}/{recipe.steps}  loss {np.mean(losses[-50:]):.4f}  {elapsed:.0f} s", flush=True)
    return model.eval(), losses


def _accuracy(wins: list[bool]) -> float:
    return float(np.mean(wins)) if wins else math.nan


def _pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).numpy()]


def evaluate(clip: ShapesClip, scenes: list[Scene], pixels: torch.Tensor) -> dict[str, float]:
    """Held-out accuracies: for each negative kind, the share of (image, negative) pairs where the image's own caption
    scores higher; `every negative`, the share of images whose caption beats all its negatives."""
    embeddings = clip.image_embeddings(_pil_images(pixels))
    wins: dict[str, list[bool]] = defaultdict(list)
    for scene, embedding in zip(scenes, embeddings):
        own = clip.full_similarity(embedding, scene.caption)
        beats_all = True
        for kind, negatives in hard_negatives(scene).items():
            for negative in negatives:
                won = own > clip.full_similarity(embedding, negative.caption)
                wins[kind].append(won)
                beats_all &= won
        wins["every negative"].append(beats_all)
    return {kind: _accuracy(wins[kind]) for kind in (*NEGATIVE_KINDS, "every negative")}


def evaluate_object_neglect(clip: ShapesClip, scenes: list[Scene], side: int) -> dict[str, float]:
    """For each multi-object scene and each of its objects: the share of (scene, object) pairs in which the prompt's
    clip_full and clip_min_object are higher on the scene's render than on the render without that object."""
    wins: dict[str, list[bool]] = defaultdict(list)
    for scene in scenes:
        partial = hard_negatives(scene)["object dropped"]  # the scene less each object in turn, positions kept
        if not partial:
            continue
        full, *missing = clip.image_embeddings(_pil_images(render_scenes([scene, *partial], side)))
        caption = scene.caption
        for embedding in missing:
            wins["clip_full"].append(clip.full_similarity(full, caption) > clip.full_similarity(embedding, caption))
            wins["clip_min_object"].append(
                clip.min_object_similarity(full, caption) > clip.min_object_similarity(embedding, caption)
            )
    return {**{metric: _accuracy(values) for metric, values in wins.items()}, "pairs": len(wins["clip_full"])}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def model_card(recipe: Recipe, model: DualEncoder, losses: list[float], results: dict, seconds: float, device) -> str:
    parameters = sum(p.numel() for p in model.parameters())
    tenth = max(1, len(losses) // 10)
    curve = " | ".join(f"{np.mean(losses[i : i + tenth]):.3f}" for i in range(0, len(losses), tenth))
    accuracy_rows = "\n".join(
        f"| {kind} | {_percent(results['clean'][kind])} | {_percent(results['clean, unseen pairs'][kind])} | "
        f"{_percent(results['degraded'][kind])} |"
        for kind in (*NEGATIVE_KINDS, "every negative")
    )
    neglect = results["object neglect"]
    return f"""# shapes-clip: a small CLIP for the shapes world

An image-text dual encoder trained contrastively on rendered shapes-world scenes (`evalkit/world/scenes.py`), for
CLIP score on the world (`conf/scorer/shapes_clip.yaml`, `evalkit/scoring/shapes_clip.py`). It knows only the
world: {len(SHAPES)} shapes, {len(COLOURS)} colours, the caption forms {", ".join(FORMS)}.

Made by `{TRAIN_COMMAND}` (seed {recipe.seed}) in {seconds / 60:.1f} minutes on {device}
({hardware(device)["cpu"]}, {torch.get_num_threads()} threads), at git commit {git_commit()} (the training code is
part of the change that adds this folder).

## Model
- Image: 64 x 64 input (the 128-px image reduced with a box filter), six 3x3 convolutions with GroupNorm
  (widths {", ".join(map(str, model.config.image_channels))}, each width's first halving the side), global average
  pooling after a per-location MLP over the features and the location's mean colour, linear projection to
  {model.config.embed_dim} dimensions.
- Text: SD's CLIP tokenizer; embedding rows for the {len(model.config.token_ids)} CLIP ids of the world's words,
  a {model.config.text_layers}-layer pre-norm transformer (width {model.config.text_width}, {model.config.text_heads} heads,
  {model.config.context_length} positions), the end-of-text token's feature, linear projection.
- {parameters:,} parameters, float32; learned temperature ended at {model.logit_scale.exp().item():.1f}.

## Data and recipe
- {recipe.train_scenes} scenes drawn by `sample_scene`, {recipe.train_scenes // len(FORMS)} per caption form, each
  coloured pair with its twin (the same scene, colours swapped) in the same batch, every pair of shapes included (the unseen split's too: this model scores the diffusion model on that split, so it must
  know those pairs; the diffusion model never sees it), rendered at {RENDER_RESOLUTION} px.
- CLIP's symmetric InfoNCE, batch {recipe.batch_size} scenes and their twins, plus up to {recipe.negatives_per_image} hard negative captions
  per image on the image-to-text side (kinds: {", ".join(TRAINED_NEGATIVE_KINDS)}); a caption right about an image,
  naming all of its objects or some ("a circle" for a circle and a star), is not its negative, so that
  `clip_min_object`'s one-object phrases score high on every image holding that object.
- {recipe.augmented_share:.0%} of each batch degraded: affine jitter (rotation 0.1 rad, scale 0.95-1.05, shift
  3%), saturation 0.75-1.25, contrast 0.8-1.2, brightness 0.85-1.15, channel gains 0.95-1.05, Gaussian blur sigma
  0.05-1.2 px, Gaussian noise sigma 0-0.06.
- AdamW, learning rate {recipe.learning_rate} ({recipe.warmup_steps} warm-up steps, cosine decay), weight decay
  {recipe.weight_decay} on matrices, {recipe.steps} steps.

Loss, mean over each tenth of training: {curve}.

## Held-out accuracy
{len(results["scenes"])} fresh scenes ({recipe.held_out_per_form} per form, another random stream than training;
{results["unseen count"]} of them hold an unseen pair). Image to caption: the share of (image, negative caption)
pairs in which the image's own caption has the higher cosine; "every negative": images whose caption beats all of
its negatives. Degraded: the same renders through the training augmentations (fixed seed).

| negative | clean | clean, unseen pairs | degraded |
| --- | --- | --- | --- |
{accuracy_rows}

Object neglect: the prompt scores higher on the scene than on the scene with one object left out, for
{_percent(neglect["clip_full"])} of (scene, object) pairs by `clip_full` and {_percent(neglect["clip_min_object"])} by
`clip_min_object` ({neglect["pairs"]} pairs, clean renders of the multi-object held-out scenes).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=WEIGHTS_FOLDER, help="weights folder, relative to the project root")
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    # One thread by default: the weights then do not depend on the machine's core count, and on a shared CPU two
    # threads mostly wait for each other (ten times slower here while other jobs ran).
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe(seed=args.seed, steps=args.steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model, losses = train(recipe, device)
    seconds = time.perf_counter() - started

    clip = ShapesClip(model, device)
    held_out = draw_scenes(np.random.default_rng([recipe.seed, 1]), recipe.held_out_per_form)
    pixels = render_scenes(held_out, model.config.image_side)
    unseen = [index for index, scene in enumerate(held_out) if not is_seen(scene)]
    degraded = (degrade(pixels.float() / 255, torch.Generator().manual_seed(recipe.seed + 1), share=1.0) * 255).round()
    results = {
        "scenes": held_out,
        "unseen count": len(unseen),
        "clean": evaluate(clip, held_out, pixels),
        "clean, unseen pairs": evaluate(clip, [held_out[index] for index in unseen], pixels[unseen]),
        "degraded": evaluate(clip, held_out, degraded.to(torch.uint8)),
    }
    results["object neglect"] = evaluate_object_neglect(clip, held_out, model.config.image_side)
    print(json.dumps({key: value for key, value in results.items() if key != "scenes"}, indent=2))

    folder = weights_path(args.out)
    save_dual_encoder(model.cpu(), folder)
    (folder / "README.md").write_text(model_card(recipe, model, losses, results, seconds, device))
    print(f"wrote {folder / WEIGHTS_NAME}, {folder / CONFIG_NAME} and the model card in {seconds / 60:.1f} minutes")


if __name__ == "__main__":
    main()
