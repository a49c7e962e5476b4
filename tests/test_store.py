import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from evalkit.paths import PROJECT_ROOT
from evalkit.store import ImageKey, ImageStore, atomic_write_bytes

KEY = ImageKey("tiny", "vanilla@abc", "demo", "p1", 3)


def test_put_then_read(tmp_path):
    store = ImageStore(tmp_path)
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    store.put(KEY, image, {"status": "ok"})
    assert store.has(KEY)
    assert store.read_image(KEY).tobytes() == image.tobytes()
    assert store.image_path(KEY) == tmp_path / "tiny" / "vanilla@abc" / "demo" / "p1" / "3.png"
    assert list(store.keys("tiny", "vanilla@abc", "demo")) == [KEY]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "a" / "x.png"

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"data")
    assert list(target.parent.iterdir()) == []


def test_image_without_record_or_corrupt_image_is_not_finished(tmp_path):
    store = ImageStore(tmp_path)
    store.put(KEY, Image.new("RGB", (8, 8)), {"status": "ok"})
    store.record_path(KEY).unlink()
    assert not store.has(KEY)  # killed between image and record: generated again
    store.put(KEY, Image.new("RGB", (8, 8)), {"status": "ok"})
    store.image_path(KEY).write_bytes(store.image_path(KEY).read_bytes()[:20])  # truncated PNG
    assert not store.has(KEY)


def _generate(store: Path, runs: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "evalkit", "generate", f"store_root={store}", f"runs_root={runs}",
               "model=tiny", "sampling.num_inference_steps=3", "seeds=[0,1,2]", "batch_size=1", "experiment_name=resume"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.mark.slow
def test_killed_generation_resumes_to_the_same_images(tmp_path):
    complete = _generate(tmp_path / "complete", tmp_path / "runs")
    assert complete.wait(timeout=300) == 0, complete.stderr.read().decode()

    interrupted_root = tmp_path / "interrupted"
    job = _generate(interrupted_root, tmp_path / "runs")
    deadline = time.time() + 300
    while not list(interrupted_root.rglob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = list(interrupted_root.rglob("*.json"))
    assert 0 < len(finished) < 9, "the kill should land mid-way"

    resumed = _generate(interrupted_root, tmp_path / "runs")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert _files(interrupted_root) == _files(tmp_path / "complete")
    assert len(_files(interrupted_root)) == 9
    assert not [p for p in interrupted_root.rglob("*") if p.name.endswith(".tmp")]
