"""Build the FID prompt set from the user's COCO: 3,000 captions with their image ids, and the real images.

    python -m evalkit.coco_fid --captions <coco>/annotations/captions_val2014.json --images <coco>/val2014

The rule (version 1), deterministic for a given annotation file:
1. the images that have at least one caption, sorted by image id;
2. `count` of them drawn without replacement by `numpy.random.default_rng(seed).choice`, then sorted by id;
3. each image's caption is its annotation with the smallest annotation id, whitespace collapsed.

Writes `<out>/prompts.jsonl` (one row per image: id `coco-<image id>`, the caption as prompt, the image id and file
name in `extra`), `<out>/images/` (a symbolic link to each chosen real image in the user's COCO folder, the FID
reference) and `<out>/manifest.json` (the rule's version and settings, and the sha256 of the annotation file).
Nothing is downloaded: COCO's licence and size leave that to the user (https://cocodataset.org/#download).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from evalkit.errors import DatasetError
from evalkit.paths import PROJECT_ROOT
from evalkit.prompts import file_sha256
from evalkit.store import atomic_write_bytes, atomic_write_json

RULE_VERSION = 1


def choose_captions(annotations: dict, count: int, seed: int) -> list[dict]:
    """The rows of the set: `count` images by the rule above, each with its first caption."""
    file_names = {image["id"]: image["file_name"] for image in annotations["images"]}
    first_caption: dict[int, dict] = {}
    for caption in annotations["annotations"]:
        kept = first_caption.get(caption["image_id"])
        if kept is None or caption["id"] < kept["id"]:
            first_caption[caption["image_id"]] = caption
    image_ids = sorted(first_caption)
    if count > len(image_ids):
        raise DatasetError(f"the annotation file has captions for {len(image_ids)} images; cannot choose {count}")
    chosen = sorted(image_ids[i] for i in np.random.default_rng(seed).choice(len(image_ids), size=count, replace=False))
    return [
        {
            "id": f"coco-{image_id}",
            "prompt": " ".join(first_caption[image_id]["caption"].split()),
            "extra": {"coco_image_id": image_id, "coco_file_name": file_names[image_id]},
        }
        for image_id in chosen
    ]


def build(captions: Path, images: Path, out: Path, count: int = 3000, seed: int = 0) -> Path:
    """Write the set into `out`; every chosen image must exist in `images`. Returns the prompts file."""
    try:
        annotations = json.loads(captions.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read COCO captions {captions}: {error}") from None
    rows = choose_captions(annotations, count, seed)
    missing = [row["extra"]["coco_file_name"] for row in rows if not (images / row["extra"]["coco_file_name"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} chosen images are not in {images}, e.g. {missing[0]}")
    links = out / "images"
    links.mkdir(parents=True, exist_ok=True)
    for row in rows:
        link = links / row["extra"]["coco_file_name"]
        if not link.is_symlink():
            link.symlink_to((images / row["extra"]["coco_file_name"]).resolve())
    prompts = out / "prompts.jsonl"
    atomic_write_bytes(prompts, "".join(json.dumps(row) + "\n" for row in rows).encode())
    atomic_write_json(out / "manifest.json", {
        "rule_version": RULE_VERSION, "count": count, "seed": seed, "captions_file": str(captions),
        "captions_sha256": file_sha256(captions), "images_dir": str(images), "prompts_sha256": file_sha256(prompts),
    })
    return prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evalkit.coco_fid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=Path, required=True, help="COCO captions JSON, e.g. captions_val2014.json")
    parser.add_argument("--images", type=Path, required=True, help="the folder of that split's images, e.g. val2014/")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "coco_fid3k")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        prompts = build(args.captions, args.images, args.out, args.count, args.seed)
    except DatasetError as error:
        print(f"evalkit: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.count} captions -> {prompts}; real images -> {args.out / 'images'}")


if __name__ == "__main__":
    main()
