"""Finetuned cross-attention key weights as safetensors: the checkpoint `separate_and_enhance` samples with, and the training
state a killed finetune resumes from. Nothing here is read with pickle.

`checkpoint.safetensors` holds only the `attn2.to_k.weight` tensors, named as in the UNet; its metadata holds the
config that made it (JSON), the step reached and the number of steps of the recipe. `train_state.safetensors`
adds AdamW's moments and step counts. Both are written atomically, the training state first, so the checkpoint
is never ahead of what a resumed run starts from.

The same files hold any named weights: the shapes-world training (evalkit/world/train.py) keeps its stages in
them under its own `CheckpointFormat`, so that neither training reads the other's files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from evalkit.errors import ConfigError
from evalkit.store import atomic_write_bytes

KEY_WEIGHT = "attn2.to_k.weight"  # the cross-attention key projections: the only weights Separate-and-Enhance trains
CHECKPOINT_NAME = "checkpoint.safetensors"
STATE_NAME = "train_state.safetensors"




@dataclass(frozen=True)
class CheckpointFormat:
    """Which training's files these are: `name` is written into their metadata and checked on reading."""

    name: str
    made_by: str  # what the files are, for the error on reading another training's file
    output_setting: str  # the config key that moves a run elsewhere


SEPEN = CheckpointFormat(
    "evalkit-sepen-1", "a Separate-and-Enhance checkpoint made by `python -m evalkit finetune`", "finetune.output_dir"
)


def key_weight_names(unet) -> list[str]:
    return [name for name, _ in unet.named_parameters() if name.endswith(KEY_WEIGHT)]


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    step: int
    steps: int

    @property
    def finished(self) -> bool:
        return self.step >= self.steps


def _metadata(config: dict[str, Any], step: int, steps: int, fmt: CheckpointFormat) -> dict[str, str]:
    return {"format": fmt.name, "config": json.dumps(config, sort_keys=True), "step": str(step), "steps": str(steps)}


def save_checkpoint(folder: Path, weights: dict[str, torch.Tensor], config: dict[str, Any], step: int, steps: int, fmt: CheckpointFormat = SEPEN) -> Path:
    """The weights (as float32) plus a readable sidecar `checkpoint.json` with the same config and step."""
    tensors = {name: weight.detach().to("cpu", torch.float32).contiguous() for name, weight in weights.items()}
    path = folder / CHECKPOINT_NAME
    atomic_write_bytes(path, save_safetensors(tensors, metadata=_metadata(config, step, steps, fmt)))
    sidecar = {"config": config, "step": step, "steps": steps, "tensors": sorted(tensors)}
    atomic_write_bytes(folder / "checkpoint.json", (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
    return path


def _read(path: Path, fmt: CheckpointFormat) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path} is not a readable safetensors file ({error})") from None
    if metadata.get("format") != fmt.name:
        raise ConfigError(f"{path} is not {fmt.made_by}")
    return tensors, metadata


def load_checkpoint(path: Path, fmt: CheckpointFormat = SEPEN) -> Checkpoint:
    tensors, metadata = _read(path, fmt)
    return Checkpoint(tensors, json.loads(metadata["config"]), int(metadata["step"]), int(metadata["steps"]))


def save_train_state(folder: Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.AdamW, config: dict[str, Any], step: int, steps: int, fmt: CheckpointFormat = SEPEN) -> None:
    """Weights and AdamW state (first and second moments, step count per tensor) for resuming exactly; tensors the
    optimizer does not train (an EMA's copies) are saved as weights alone."""
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        tensors[f"weight/{name}"] = weight.detach().to("cpu").contiguous()
        state = optimizer.state.get(weight)
        if state:  # a tensor that has never had a gradient has no state yet
            for key in ("exp_avg", "exp_avg_sq", "step"):
                tensors[f"{key}/{name}"] = torch.as_tensor(state[key]).detach().to("cpu").contiguous()
    atomic_write_bytes(folder / STATE_NAME, save_safetensors(tensors, metadata=_metadata(config, step, steps, fmt)))


def load_train_state(folder: Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.AdamW, fmt: CheckpointFormat = SEPEN) -> tuple[dict[str, Any], int]:
    """Put the saved weights and AdamW state into `weights` / `optimizer`; returns (config, step) it was saved with."""
    path = folder / STATE_NAME
    tensors, metadata = _read(path, fmt)
    if set(f"weight/{name}" for name in weights) != {k for k in tensors if k.startswith("weight/")}:
        raise ConfigError(f"{path} holds the weights of a different model; use another {fmt.output_setting}")
    with torch.no_grad():
        for name, weight in weights.items():
            weight.copy_(tensors[f"weight/{name}"])
            if f"exp_avg/{name}" in tensors:
                device = weight.device
                optimizer.state[weight] = {
                    "step": tensors[f"step/{name}"].clone(),  # AdamW keeps its step count on the CPU
                    "exp_avg": tensors[f"exp_avg/{name}"].to(device),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(device),
                }
    return json.loads(metadata["config"]), int(metadata["step"])
