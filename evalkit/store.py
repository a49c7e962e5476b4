"""The image store: one PNG and one JSON record per (model, method variant, dataset, prompt, seed).

`<root>/<model>/<method>@<config-hash>/<dataset>/<prompt-id>/<seed>.png` and `<seed>.json`. Both are written to
a temporary file in the same folder and renamed into place, the record last: a record therefore means its image
is complete, and a run killed at any point leaves no partial file that a reader would take for a result.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from evalkit.errors import StoreError


@dataclass(frozen=True)
class ImageKey:
    model: str
    variant: str  # "<method>@<config-hash>"
    dataset: str
    prompt_id: str
    seed: int

    @property
    def method(self) -> str:
        return self.variant.split("@", 1)[0]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


class ImageStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, model: str, variant: str, dataset: str) -> Path:
        return self.root / model / variant / dataset

    def image_path(self, key: ImageKey) -> Path:
        return self.folder(key.model, key.variant, key.dataset) / key.prompt_id / f"{key.seed}.png"

    def record_path(self, key: ImageKey) -> Path:
        return self.image_path(key).with_suffix(".json")

    def has(self, key: ImageKey) -> bool:
        """A finished item: a readable record and, unless it records a failure, a readable image."""
        return self.record_path(key).is_file() and self.damage(key) is None  # damaged: generate it again

    def damage(self, key: ImageKey) -> str | None:
        """Why the item at `key` is damaged (a record without its image, an image without its record, either one
        unreadable), or None: finished, or never started."""
        record, image = self.record_path(key), self.image_path(key)
        if not record.is_file():
            return f"{image}: image without its record" if image.is_file() else None
        try:
            if self.read_record(key).get("status") == "failed":
                return None
            if not image.is_file():
                return f"{image}: missing, while its record exists"
            self.read_image(key)
        except StoreError as error:
            return str(error)
        return None

    def put(self, key: ImageKey, image: Image.Image | None, record: dict) -> None:
        """Write the image (None for a failed generation: an earlier image of the key is removed), then its record."""
        if image is not None:
            atomic_write_bytes(self.image_path(key), _png_bytes(image))
        else:
            self.image_path(key).unlink(missing_ok=True)
        atomic_write_json(self.record_path(key), record)

    def read_record(self, key: ImageKey) -> dict:
        path = self.record_path(key)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StoreError(f"unreadable record {path}: {error}") from None

    def read_image(self, key: ImageKey) -> Image.Image:
        path = self.image_path(key)
        try:
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise StoreError(f"corrupt or missing image {path}: {error}") from None

    def orphan_images(self, model: str, variant: str, dataset: str) -> list[Path]:
        """Images of one variant on one dataset without a record (a run killed between the two writes)."""
        folder = self.folder(model, variant, dataset)
        return [png for png in sorted(folder.glob("*/*.png")) if png.stem.isdigit() and not png.with_suffix(".json").is_file()]

    def remove_temporary_files(self, key: ImageKey) -> None:
        """Delete the temporary files that killed writes of `key` left behind (no reader opens them: readers ask for
        final names). Only this key's, so that jobs writing other keys of the folder are left alone."""
        image = self.image_path(key)
        for final in (image, self.record_path(key)):
            for leftover in image.parent.glob(f".{final.name}.*.tmp"):
                leftover.unlink(missing_ok=True)

    def keys(self, model: str, variant: str, dataset: str) -> Iterator[ImageKey]:
        """Finished items of one variant on one dataset, in a stable order."""
        folder = self.folder(model, variant, dataset)
        for record in sorted(folder.glob("*/*.json")):
            if record.stem.isdigit():
                yield ImageKey(model, variant, dataset, record.parent.name, int(record.stem))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
