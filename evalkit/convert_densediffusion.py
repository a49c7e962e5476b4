"""Convert a prompt set in DenseDiffusion's format (a pickle of captions and phrases, and colour layouts) into an
evalkit prompt set: `<out_dir>/<name>.jsonl` and one mask PNG per segment under `<out_dir>/<name>/masks/`.

    python -m evalkit.convert_densediffusion CAPTIONS.pkl LAYOUTS OUT_DIR [--name NAME] [--id-prefix P] [--overwrite]

CAPTIONS.pkl maps an entry key to {"textual_condition": caption, "segment_descriptions": [phrase, ...]}, as the
official repository's `dataset/testset.pkl` (naver-ai/DenseDiffusion). LAYOUTS is a `.tar.gz` of `<key>.png`
colour layouts (its `dataset/testset_layout.tar.gz`) or a folder of them. The committed `densediffusion_coco`
set was made from those two files (datasets/densediffusion_coco.README.md).

Layouts are read as the official notebook reads them (`inference.ipynb`, cell 7): the layout is resized to
8 x MASK_SIZE pixels a side (PIL's default filter), the len(segment_descriptions) most frequent colours are the
segments, the black or white one goes first (the background), the others follow in order of decreasing area,
paired with the phrases in order. Pixels of any other colour (anti-aliased edges) belong to no segment; the
share of such pixels is reported per row. Masks are sampled at every 8th pixel, as the notebook's
`F.interpolate(..., (64, 64), mode="nearest")` does. A row is left out, and reported, when its layout has fewer
colours than segments or a phrase is not words of its caption. Nothing is written when no row converts, and an
existing output is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from evalkit.errors import EvalkitError, PromptError
from evalkit.models.tokenizer import clip_tokenizer
from evalkit.prompts import TokenIndexer

MASK_SIZE = 64  # SD 1.x's latent side at 512 px, where DenseDiffusion's notebook samples its layouts
LAYOUT_SIDE = 8 * MASK_SIZE
BACKGROUNDS = (0x000000, 0xFFFFFF)


def segment_masks(layout: np.ndarray, count: int) -> tuple[list[np.ndarray], float]:
    """The notebook's `layouts_` for an RGB layout of LAYOUT_SIDE pixels a side: `count` masks, background (black
    or white) first, then by decreasing area; and the share of pixels none of them covers."""
    # colours packed as 0xRRGGBB: the same order as the notebook's np.unique(..., axis=0), much faster
    packed = (layout[..., 0].astype(np.int32) << 16) | (layout[..., 1].astype(np.int32) << 8) | layout[..., 2]
    colours, areas = np.unique(packed, return_counts=True)
    if len(colours) < count:
        raise ValueError(f"{len(colours)} colours for {count} segments")
    order = np.argsort(-areas)  # the notebook's order, ties included
    masks: list[np.ndarray] = []
    for colour in colours[order[:count]]:
        mask = packed == colour
        if colour in BACKGROUNDS:
            masks.insert(0, mask)
        else:
            masks.append(mask)
    uncovered = 1.0 - float(areas[order[:count]].sum()) / packed.size
    return masks, uncovered


class _PlainDataUnpickler(pickle.Unpickler):
    """Reads dicts, lists, strings and numbers only: unpickling any class could run code from the file."""

    def find_class(self, module: str, name: str):
        raise EvalkitError(f"the captions pickle holds a {module}.{name}; only plain data (dicts, lists, strings) is read")


def _read_layouts(source: Path) -> dict[str, bytes]:
    """PNG bytes by file stem, from a .tar.gz archive or a folder."""
    if source.is_dir():
        return {path.stem: path.read_bytes() for path in sorted(source.glob("*.png"))}
    with tarfile.open(source) as tar:
        return {Path(m.name).stem: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")}


def _layout_pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    # The notebook's `np.asarray(Image.open(path).resize([sp_sz*8, sp_sz*8]))[:, :, :3]`
    return np.asarray(image.resize((LAYOUT_SIDE, LAYOUT_SIDE)))[:, :, :3]


def convert(captions: Path, layouts: Path, out_dir: Path, name: str, id_prefix: str, overwrite: bool) -> list[str]:
    """Write the prompt set; returns the report lines (one per row: kept with its uncovered share, or skipped)."""
    out_file = out_dir / f"{name}.jsonl"
    if out_file.exists() and not overwrite:
        raise EvalkitError(f"{out_file} exists; pass --overwrite to replace it")
    with open(captions, "rb") as f:
        entries = _PlainDataUnpickler(f).load()
    pngs = _read_layouts(layouts)
    indexer = TokenIndexer(clip_tokenizer())
    rows, masks_by_path, report = [], {}, []
    for key in sorted(entries):
        entry = entries[key]
        caption, phrases = entry["textual_condition"], list(entry["segment_descriptions"])
        stem = f"{key:03d}" if isinstance(key, int) else str(key)
        row_id = f"{id_prefix}-{stem}"
        if str(key) not in pngs:
            report.append(f"skipped {row_id}: no layout {key}.png")
            continue
        try:
            masks, uncovered = segment_masks(_layout_pixels(pngs[str(key)]), len(phrases))
            objects = [p for p in phrases if p]  # an empty phrase has no tokens: it only shapes self-attention
            indexer.locate(row_id, caption, objects)  # each phrase must be words of the caption
        except (ValueError, PromptError) as error:
            report.append(f"skipped {row_id}: {error}")
            continue
        segments = []
        for number, (phrase, mask) in enumerate(zip(phrases, masks)):
            path = f"{name}/masks/{stem}_{number}.png"
            masks_by_path[path] = mask[:: LAYOUT_SIDE // MASK_SIZE, :: LAYOUT_SIDE // MASK_SIZE]
            segments.append({"phrase": phrase, "mask": path})
        rows.append({"id": row_id, "prompt": caption, "subjects": objects, "segments": segments})
        report.append(f"kept {row_id}: {uncovered:.1%} of pixels in no segment")
    if not rows:
        raise EvalkitError(f"no row of {captions} converted, nothing written: " + "; ".join(report[:3]))
    for path, mask in masks_by_path.items():
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(out_dir / path, optimize=True)
    out_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    skipped = sum(line.startswith("skipped") for line in report)
    report.append(f"{len(rows)} rows written to {out_file}, {skipped} skipped")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m evalkit.convert_densediffusion",
        description="Convert a DenseDiffusion-format prompt set (captions pickle + colour layouts) to evalkit's format.",
    )
    parser.add_argument("captions", type=Path, help="pickle of {key: {textual_condition, segment_descriptions}}")
    parser.add_argument("layouts", type=Path, help="a .tar.gz of <key>.png layouts, or a folder of them")
    parser.add_argument("out_dir", type=Path, help="folder for <name>.jsonl and <name>/masks/")
    parser.add_argument("--name", default=None, help="the prompt set's name (default: the captions file's stem)")
    parser.add_argument("--id-prefix", default=None, help="row ids are <prefix>-<key> (default: the name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <name>.jsonl")
    args = parser.parse_args(argv)
    for path in (args.captions, args.layouts):
        if not path.exists():
            parser.exit(1, f"error: {path} does not exist\n")
    try:
        name = args.name or args.captions.stem
        report = convert(args.captions, args.layouts, args.out_dir, name, args.id_prefix or name, args.overwrite)
    except EvalkitError as error:
        parser.exit(1, f"error: {error}\n")
    print("\n".join(report))


if __name__ == "__main__":
    main(sys.argv[1:])
