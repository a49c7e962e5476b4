"""Prompt sets as data: `datasets/*.jsonl` rows become PromptSpecs; words become token indices."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evalkit.errors import ConfigError, DatasetError, PromptError

_KNOWN_FIELDS = {"id", "prompt", "subjects", "groups", "segments", "subprompts", "targets", "extra"}


@dataclass(frozen=True)
class Segment:
    """One layout segment (DenseDiffusion): a phrase of the prompt and the path of its mask PNG.

    In a prompt set, `mask` is relative to the folder of the dataset file and the loader resolves it. Segment 0 is
    the background by convention, with phrase "" (a phrase may be empty: its mask then only shapes
    self-attention).
    """

    phrase: str
    mask: str


def read_mask(path: str | Path) -> np.ndarray:
    """A mask PNG as a boolean array (height, width): a single-channel image ("1" or "L") whose pixels are 0
    (outside) or 255 (inside); any size (methods resize it to the latent with nearest-neighbour sampling)."""
    try:
        with Image.open(path) as image:
            mode, pixels = image.mode, np.array(image.convert("L"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"mask {path}: not a readable image ({error})") from None
    if mode not in ("1", "L") or not np.isin(pixels, (0, 255)).all():
        raise DatasetError(f"mask {path}: must be a binary single-channel image (pixels 0 or 255), got mode {mode}")
    return pixels == 255


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the annotations that methods and scorers read.

    subjects: the objects the prompt asks for ("cat", "dog"); groups: attribute+noun word groups
    ([["red", "car"], ["blue", "bowl"]]); segments: layout segments; subprompts: Composable Diffusion's
    conjuncts, when a prompt set gives them explicitly.
    """

    id: str
    prompt: str
    subjects: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    segments: tuple[Segment, ...] = ()
    subprompts: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def _row_to_spec(row: dict[str, Any], where: str, folder: Path) -> PromptSpec:
    unknown = set(row) - _KNOWN_FIELDS
    if unknown:
        raise DatasetError(f"{where}: unknown field(s) {sorted(unknown)}")
    for key in ("id", "prompt"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DatasetError(f"{where}: field {key!r} must be a non-empty string")
    if "/" in row["id"] or row["id"].startswith("."):
        raise DatasetError(f"{where}: id {row['id']!r} must not contain '/' or start with '.'")

    def words(value: Any, name: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
            raise DatasetError(f"{where} ({row['id']}): {name} must be a list of non-empty strings")
        return tuple(value)

    subjects = words(row.get("subjects", []), "subjects")
    groups_raw = row.get("groups", [])
    if not isinstance(groups_raw, list):
        raise DatasetError(f"{where} ({row['id']}): groups must be a list of word lists")
    groups = tuple(words(g, "each group") for g in groups_raw)
    segments_raw = row.get("segments", [])
    if not isinstance(segments_raw, list) or not all(
        isinstance(s, dict) and isinstance(s.get("phrase"), str) and isinstance(s.get("mask"), str) for s in segments_raw
    ):
        raise DatasetError(f"{where} ({row['id']}): segments must be a list of {{phrase, mask}} objects")
    segments = tuple(Segment(s["phrase"], str(folder / s["mask"])) for s in segments_raw)
    for segment in segments:
        if not Path(segment.mask).is_file():
            raise DatasetError(f"{where} ({row['id']}): mask file of segment {segment.phrase!r} not found: {segment.mask}")
        try:
            read_mask(segment.mask)
        except DatasetError as error:
            raise DatasetError(f"{where} ({row['id']}): {error}") from None
    subprompts = words(row.get("subprompts", []), "subprompts")
    extra = row.get("extra", {})
    if not isinstance(extra, dict):
        raise DatasetError(f"{where} ({row['id']}): extra must be an object")
    return PromptSpec(row["id"], row["prompt"], subjects, groups, segments, subprompts, extra)


def load_prompt_set(path: str | Path, limit: int | None = None, exclude: Sequence[str] = ()) -> list[PromptSpec]:
    """Read and validate every row; a bad row is an error naming the file, line and field.

    `exclude`: ids a dataset config leaves out (each must exist, so a typo cannot pass silently), before `limit`.
    """
    path = Path(path)
    if limit is not None and limit < 1:  # 0 must not read as "no limit"
        raise ConfigError(f"limit must be at least 1, or null for every prompt; got {limit}")
    if not path.is_file():
        raise DatasetError(f"prompt set {path} does not exist")
    specs: list[PromptSpec] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: a row must be a JSON object")
        spec = _row_to_spec(row, where, path.parent)
        if spec.id in seen:
            raise DatasetError(f"{where}: duplicate id {spec.id!r}")
        seen.add(spec.id)
        specs.append(spec)
    unknown = set(exclude) - seen
    if unknown:
        raise DatasetError(f"prompt set {path}: cannot exclude {sorted(unknown)}: no such id")
    specs = [spec for spec in specs if spec.id not in set(exclude)]
    if not specs:
        raise DatasetError(f"prompt set {path} has no rows")
    return specs if limit is None else specs[:limit]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TokenIndexer:
    """Maps words of a prompt to their token positions in the text encoder's input (SOT at position 0).

    CLIP's BPE splits a prompt into words first and then each word into pieces ending in `</w>`, so every
    word owns a contiguous run of positions; a multi-piece word ("urial" -> "uri", "al</w>") owns several.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.max_length = tokenizer.model_max_length

    def _words(self, text: str) -> list[tuple[str, list[int]]]:
        """(word, token positions) for each word of `text`; positions count SOT as 0."""
        words: list[tuple[str, list[int]]] = []
        pieces: list[str] = []
        start = 1
        for position, piece in enumerate(self.tokenizer.tokenize(text), start=1):
            pieces.append(piece)
            if piece.endswith("</w>"):
                word = "".join(pieces)[: -len("</w>")]
                words.append((word, list(range(start, position + 1))))
                pieces, start = [], position + 1
        return words

    def check_length(self, prompt_id: str, prompt: str) -> int:
        """Number of tokens with SOT and EOT; an error if the text encoder would truncate the prompt."""
        n = len(self.tokenizer(prompt).input_ids)
        if n > self.max_length:
            raise PromptError(
                f"prompt {prompt_id!r} has {n} tokens with start and end tokens, more than the text encoder's "
                f"{self.max_length}; shorten it: {prompt!r}"
            )
        return n

    def locate(
        self,
        prompt_id: str,
        prompt: str,
        phrases: Sequence[str],
        claimed: set[int] | None = None,
        in_order: bool = False,
    ) -> list[list[int]]:
        """Token positions of each phrase (one or more words), in order.

        A phrase that occurs several times takes its first occurrence not yet claimed by an earlier phrase, so
        "a cat and a cat" with subjects [cat, cat] gives [[2], [5]]. `claimed` carries claims across calls.
        With `in_order`, each phrase is looked for after the previous one first (the noun after its attribute).
        """
        self.check_length(prompt_id, prompt)
        prompt_words = self._words(prompt)
        claimed = set() if claimed is None else claimed
        located: list[list[int]] = []
        for phrase in phrases:
            target = [w for w, _ in self._words(phrase)]
            if not target:
                raise PromptError(f"prompt {prompt_id!r}: empty target phrase {phrase!r}")
            starts = list(range(len(prompt_words) - len(target) + 1))
            if in_order and located:
                after = next(i for i, (_, ps) in enumerate(prompt_words) if ps[-1] == located[-1][-1]) + 1
                starts = starts[after:] + starts[:after]
            match = None
            for start in starts:
                window = prompt_words[start : start + len(target)]
                positions = [p for _, ps in window for p in ps]
                if [w for w, _ in window] == target and not claimed.intersection(positions):
                    match = positions
                    break
            if match is None:
                raise PromptError(
                    f"prompt {prompt_id!r}: {phrase!r} is not a word of the prompt (or occurs fewer times than "
                    f"it is named): {prompt!r}"
                )
            claimed.update(match)
            located.append(match)
        return located

    def subject_indices(self, spec: PromptSpec) -> list[list[int]]:
        return self.locate(spec.id, spec.prompt, spec.subjects)

    def group_indices(self, spec: PromptSpec) -> list[list[list[int]]]:
        """For each group, the positions of each of its words; words of one group are claimed together."""
        claimed: set[int] = set()
        return [self.locate(spec.id, spec.prompt, group, claimed, in_order=True) for group in spec.groups]
