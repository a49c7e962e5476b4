"""Convert DenseDiffusion's 250-caption COCO test set into an evalkit prompt set (run once; the output is committed).

    python datasets/convert_densediffusion_coco.py SOURCE_DIR

SOURCE_DIR holds the official repository's `dataset/testset.pkl` and `dataset/testset_layout.tar.gz`
(naver-ai/DenseDiffusion). Writes `datasets/densediffusion_coco.jsonl` and one mask PNG per segment under
`datasets/densediffusion_coco/masks/`. Only this script reads the pickle; nothing does at run time.

Segments are paired with layout colours as the official notebook does (`inference.ipynb`, cell 7): take the
len(segment_descriptions) most frequent colours of the 512x512 layout; the black or white one is segment 0 (the
background, phrase ''), the others follow in order of decreasing area. Masks are stored at 64x64, sampled from the
512x512 layout as the notebook's `F.interpolate(..., (64, 64), mode='nearest')` does (every 8th pixel), i.e. what
SD 1.x at 512 px uses. A row is left out (and reported) when its layout has a different number of colours than
segments (the notebook fails on it) or a phrase is not words of its caption.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from evalkit.models.tokenizer import clip_tokenizer
from evalkit.errors import PromptError
from evalkit.prompts import TokenIndexer

OUT = Path(__file__).parent
NAME = "densediffusion_coco"
MASK_SIZE = 64


def segment_masks(layout: np.ndarray, count: int) -> list[np.ndarray]:
    """The notebook's `layouts_`: `count` masks, background (black or white) first, then by decreasing area."""
    # colours packed as 0xRRGGBB: the same order as the notebook's np.unique(..., axis=0), much faster
    packed = (layout[..., 0].astype(np.int32) << 16) | (layout[..., 1].astype(np.int32) << 8) | layout[..., 2]
    colours, areas = np.unique(packed, return_counts=True)
    order = np.argsort(-areas)
    if len(colours) != count:
        raise ValueError(f"{len(colours)} colours for {count} segments")
    masks: list[np.ndarray] = []
    for colour in colours[order[:count]]:
        mask = packed == colour
        if colour in (0x000000, 0xFFFFFF):
            masks.insert(0, mask)
        else:
            masks.append(mask)
    return masks


def main(source: Path) -> None:
    with open(source / "testset.pkl", "rb") as f:
        entries = pickle.load(f)
    with tarfile.open(source / "testset_layout.tar.gz") as tar:
        layouts = {Path(m.name).stem: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")}
    indexer = TokenIndexer(clip_tokenizer())
    masks_dir = OUT / NAME / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for key in sorted(entries):
        entry = entries[key]
        caption, phrases = entry["textual_condition"], entry["segment_descriptions"]
        row_id = f"coco-{key:03d}"
        layout = np.asarray(Image.open(io.BytesIO(layouts[str(key)])).convert("RGB"))
        try:
            masks = segment_masks(layout, len(phrases))
        except ValueError as error:
            skipped.append(f"{row_id}: layout {key}.png: {error}")
            continue
        if phrases[0] != "":
            raise ValueError(f"{row_id}: expected the background phrase '' first, got {phrases}")
        objects = [p for p in phrases[1:] if p]  # a further '' segment has no tokens, as in the official code
        try:  # each phrase must be words of the caption, as evalkit's methods require
            indexer.locate(row_id, caption, objects)
        except PromptError as error:  # reported, and the row left out
            skipped.append(f"{row_id}: {error}")
            continue
        segments = []
        for number, (phrase, mask) in enumerate(zip(phrases, masks)):
            path = f"{NAME}/masks/{key:03d}_{number}.png"
            step = mask.shape[0] // MASK_SIZE
            Image.fromarray(mask[::step, ::step]).save(OUT / path, optimize=True)
            segments.append({"phrase": phrase, "mask": path})
        rows.append({"id": row_id, "prompt": caption, "subjects": objects, "segments": segments})
    (OUT / f"{NAME}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} rows written, {len(skipped)} skipped")
    for line in skipped:
        print("skipped", line)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
