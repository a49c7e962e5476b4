"""The DenseDiffusion-format converter on layouts drawn here with anti-aliased edges, as a user's own set would be."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from evalkit.convert_densediffusion import LAYOUT_SIDE, MASK_SIZE, main, segment_masks
from evalkit.prompts import load_prompt_set

RED, BLUE = (220, 30, 30), (30, 60, 220)


def antialiased_layout(boxes: list[tuple[tuple[int, int, int], tuple[int, int, int, int]]], side: int = 256) -> Image.Image:
    """Ellipses on white, drawn 4x larger and reduced with a box filter: their edges blend into the background."""
    big = Image.new("RGB", (4 * side, 4 * side), (255, 255, 255))
    draw = ImageDraw.Draw(big)
    for colour, box in boxes:
        draw.ellipse([4 * v for v in box], fill=colour)
    return big.resize((side, side), Image.Resampling.BOX)


@pytest.fixture
def source(tmp_path):
    entries = {
        0: {"textual_condition": "a red ball and a blue cup", "segment_descriptions": ["", "a red ball", "a blue cup"]},
        # A first phrase that is not empty: it takes the background colour's mask, as in the notebook.
        1: {"textual_condition": "a table with a red ball", "segment_descriptions": ["a table", "a red ball"]},
        2: {"textual_condition": "a red ball", "segment_descriptions": ["", "a green ball"]},  # not words of it
    }
    layouts = tmp_path / "layouts"
    layouts.mkdir()
    antialiased_layout([(RED, (20, 30, 130, 140)), (BLUE, (150, 100, 240, 200))]).save(layouts / "0.png")
    antialiased_layout([(RED, (60, 60, 200, 200))]).save(layouts / "1.png")
    antialiased_layout([(RED, (60, 60, 200, 200))]).save(layouts / "2.png")
    captions = tmp_path / "set.pkl"
    captions.write_bytes(pickle.dumps(entries))
    archive = tmp_path / "layouts.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for png in sorted(layouts.iterdir()):
            tar.add(png, arcname=f"set_layout/{png.name}")
    return captions, layouts, archive


def test_antialiased_layouts_follow_the_notebooks_most_frequent_colours(source, tmp_path, capsys):
    captions, layouts, archive = source
    out = tmp_path / "out"
    main([str(captions), str(archive), str(out), "--name", "mine"])
    report = capsys.readouterr().out
    assert "skipped mine-002" in report and "2 rows written" in report
    kept_0 = next(line for line in report.splitlines() if line.startswith("kept mine-000"))
    uncovered = float(kept_0.split(": ")[1].split("%")[0])
    assert 0.5 < uncovered < 5.0  # the blended edge pixels, reported, in no segment

    rows = [json.loads(line) for line in (out / "mine.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["mine-000", "mine-001"]
    assert rows[0]["subjects"] == ["a red ball", "a blue cup"]
    assert [s["phrase"] for s in rows[1]["segments"]] == ["a table", "a red ball"]
    assert rows[1]["subjects"] == ["a table", "a red ball"]

    masks = {s["phrase"]: np.asarray(Image.open(out / s["mask"])) for s in rows[0]["segments"]}
    assert all(mask.shape == (MASK_SIZE, MASK_SIZE) for mask in masks.values())
    # segments follow decreasing area (the red ellipse is the larger); masks are sampled at every 8th pixel of 512
    red = masks["a red ball"]
    assert red[20, 10] and not red[20, 40] and masks["a blue cup"][40, 47] and masks[""][2, 2]
    assert not (masks[""] & red).any() and not (masks["a blue cup"] & red).any()
    # the converted set loads as a prompt set
    assert [spec.id for spec in load_prompt_set(out / "mine.jsonl")] == ["mine-000", "mine-001"]


def test_a_folder_of_layouts_reads_as_the_archive(source, tmp_path):
    captions, layouts, archive = source
    main([str(captions), str(archive), str(tmp_path / "a"), "--name", "s"])
    main([str(captions), str(layouts), str(tmp_path / "b"), "--name", "s"])
    assert (tmp_path / "a" / "s.jsonl").read_text() == (tmp_path / "b" / "s.jsonl").read_text()


def test_existing_output_is_kept_without_overwrite(source, tmp_path):
    captions, layouts, _ = source
    out_file = tmp_path / "set.jsonl"
    out_file.write_text("committed\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(captions), str(layouts), str(tmp_path)])
    assert exit_info.value.code == 1 and out_file.read_text() == "committed\n"
    main([str(captions), str(layouts), str(tmp_path), "--overwrite"])
    assert len(out_file.read_text().splitlines()) == 2


@pytest.mark.slow
def test_zero_rows_writes_nothing_and_fails(tmp_path):
    captions = tmp_path / "bad.pkl"
    captions.write_bytes(pickle.dumps({0: {"textual_condition": "a cat", "segment_descriptions": ["", "a dog"]}}))
    layouts = tmp_path / "layouts"
    layouts.mkdir()
    antialiased_layout([(RED, (10, 10, 90, 90))]).save(layouts / "0.png")
    result = subprocess.run(
        [sys.executable, "-m", "evalkit.convert_densediffusion", str(captions), str(layouts), str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no row of")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_help_and_missing_input_are_one_line(tmp_path):
    helped = subprocess.run([sys.executable, "-m", "evalkit.convert_densediffusion", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--overwrite" in helped.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "evalkit.convert_densediffusion", str(tmp_path / "no.pkl"), str(tmp_path), str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'no.pkl'} does not exist"


def test_fewer_colours_than_segments_is_refused():
    layout = np.zeros((LAYOUT_SIDE, LAYOUT_SIDE, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="1 colours for 2 segments"):
        segment_masks(layout, 2)


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_a_captions_pickle_holding_code_is_refused_unrun(tmp_path, capsys):
    captions = tmp_path / "evil.pkl"
    captions.write_bytes(pickle.dumps({0: {"textual_condition": _RunsCode(), "segment_descriptions": [""]}}))
    with pytest.raises(SystemExit):
        main([str(captions), str(tmp_path), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "unpickling ran code" not in captured.out
    assert captured.err.strip() == "error: the captions pickle holds a builtins.print; only plain data (dicts, lists, strings) is read"
