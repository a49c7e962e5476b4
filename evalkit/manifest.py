"""What every run records about itself: config, package versions, git commit, hardware."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from typing import Any

import torch

from evalkit.paths import PROJECT_ROOT

PACKAGES = [
    "evalkit", "torch", "torchvision", "diffusers", "transformers", "open_clip_torch", "torchmetrics", "lpips",
    "pytorch-fid", "hydra-core", "numpy", "pandas", "pillow",
]


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """HEAD of the project checkout, with "+dirty" when the work tree has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def hardware(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def config_hash(payload: Any, length: int = 10) -> str:
    """A short, stable hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]
