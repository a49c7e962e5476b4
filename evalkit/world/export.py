"""The trained shapes-world model as a diffusers folder (`weights/shapes-sd/`), with its model card.

The folder is what `StableDiffusionPipeline.save_pretrained` writes (model_index.json; unet/, vae/, text_encoder/
as config.json + safetensors; tokenizer/; scheduler/), in the recipe's `export_dtype`, plus README.md (the model
card) and loss_curve.png. It is written beside the old one and swapped in only when complete and within the size
cap, so a failed export leaves the previous one in place.

The card says what made the weights: data mix, recipe, steps, seed, losses, the commits and devices of the calls
that trained them and how long each took. Failure rates of vanilla sampling are measured after training, by a
separate run; the card shows them only when given (`failure_rates=<json>`), and otherwise says they are not
measured yet.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evalkit.errors import ConfigError
from evalkit.world.split import UNSEEN_PAIRS

MEGABYTE = 1_000_000
CARD_NAME = "README.md"
CURVE_NAME = "loss_curve.png"
LOSS_WINDOWS = 8  # rows of the card's loss table per stage


def read_failure_rates(path: Path) -> dict[str, Any]:
    """A measurement of vanilla sampling's failures for the card: {"source": how and on what they were measured,
    "rates": {failure: fraction in [0, 1]}}."""
    if not path.is_file():
        raise ConfigError(f"failure_rates: {path} does not exist")
    try:
        measured = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"failure_rates: {path} is not JSON ({error})") from None
    rates = measured.get("rates") if isinstance(measured, dict) else None
    if not isinstance(measured.get("source") if isinstance(measured, dict) else None, str) or not isinstance(rates, dict) or not rates:
        raise ConfigError(f'failure_rates: {path} must be {{"source": "<how they were measured>", "rates": {{"<failure>": <fraction>}}}}')
    for name, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ConfigError(f"failure_rates: {path}: the rate of {name!r} must be a fraction in [0, 1], got {rate!r}")
    return measured


@dataclass(frozen=True)
class RunFacts:
    """What the model card reports about a finished training run."""

    recipe: dict[str, Any]
    model: dict[str, Any]
    examples: dict[str, str]  # caption form -> a training caption of that form
    scaling_factor: float
    steps: dict[str, int]
    logs: dict[str, list[dict[str, float]]]
    calls: list[dict[str, Any]]
    failure_rates: dict[str, Any] | None


def export_pipeline(pipe, facts: RunFacts, folder: Path, dtype: torch.dtype, max_megabytes: float) -> Path:
    """Write `pipe` in `dtype` with its card to `folder`, replacing what is there; ConfigError if it would be larger
    than `max_megabytes` (10^6 bytes) in all."""
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    staging = folder.parent / f".{folder.name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    for name in counts:
        # nn.Module's own `to`: diffusers' warns of modules to keep in float32 even when it names none.
        torch.nn.Module.to(getattr(pipe, name), "cpu", dtype)
    pipe.save_pretrained(staging, safe_serialization=True)
    write_loss_curve(facts.logs, staging / CURVE_NAME)
    weights_bytes = _size(staging)
    (staging / CARD_NAME).write_text(model_card(facts, counts, str(dtype).removeprefix("torch."), weights_bytes))
    size = _size(staging)
    if size > max_megabytes * MEGABYTE:
        shutil.rmtree(staging)
        raise ConfigError(
            f"the export would be {size / MEGABYTE:.1f} MB, over the cap of {max_megabytes:g} MB; "
            f"export in float16 (train_world.export_dtype) or train a smaller architecture"
        )
    retired = folder.parent / f".{folder.name}.old"
    shutil.rmtree(retired, ignore_errors=True)
    if folder.exists():
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)
    return folder


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_loss_curve(logs: dict[str, list[dict[str, float]]], path: Path) -> None:
    """One panel per stage: the loss per step (faint) and its moving average, log scale."""
    figure = Figure(figsize=(7, 2.6), dpi=90)
    FigureCanvasAgg(figure)
    for index, (stage, rows) in enumerate(logs.items()):
        axes = figure.add_subplot(1, len(logs), index + 1)
        steps = np.array([row["step"] for row in rows])
        losses = np.array([row["loss"] for row in rows])
        axes.plot(steps, losses, color="0.75", linewidth=0.5)
        window = max(1, len(losses) // 50)
        if len(losses) >= window:
            smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
            axes.plot(steps[window - 1 :], smoothed, color="C0", linewidth=1.2)
        axes.set_yscale("log")
        axes.set_title(f"{stage} loss", fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.tight_layout()
    figure.savefig(path)


def loss_windows(rows: list[dict[str, float]], windows: int = LOSS_WINDOWS) -> list[tuple[int, int, float]]:
    """(first step, last step, mean loss) of up to `windows` equal runs of consecutive logged steps."""
    chunks = [chunk for chunk in np.array_split(np.arange(len(rows)), min(windows, len(rows))) if len(chunk)]
    return [(int(rows[c[0]]["step"]), int(rows[c[-1]]["step"]), float(np.mean([rows[i]["loss"] for i in c]))) for c in chunks]


def model_card(facts: RunFacts, counts: dict[str, int], dtype: str, weights_bytes: int) -> str:
    recipe, model = facts.recipe, facts.model
    vae, diffusion = recipe["vae"], recipe["diffusion"]
    schedule = model["scheduler_config"]
    total = sum(recipe["forms"].values())
    lines = [
        f"# {Path(recipe['export_dir']).name}: a Stable-Diffusion-shaped model of the shapes world",
        "",
        f"Trained from scratch by `python -m evalkit train-world train_world={recipe['name']} model={model['name']}` "
        "(evalkit/world/train.py); loaded offline by `conf/model/shapes.yaml`. Its images are flat scenes of coloured "
        "shapes: a place to see what a method does to a diffusion model, not evidence about Stable Diffusion.",
        "",
        "## Model",
        "",
        f"The architecture of `conf/model/{model['name']}.yaml`, with SD-1.x's attention layer names and counts and the "
        "real CLIP tokenizer, so every method hooks into it as into Stable Diffusion:",
        "",
        "| component | parameters |",
        "| --- | ---: |",
        *(f"| {name} | {count:,} |" for name, count in counts.items()),
        "",
        f"Weights in {dtype}, {weights_bytes / MEGABYTE:.1f} MB in all (safetensors). {recipe['resolution']} px images; "
        f"latent scaling factor {facts.scaling_factor:.5f} (measured: 1 / std of VAE latents of "
        f"{recipe['scaling_scenes']} renders).",
        "",
        "## Data",
        "",
        "Scenes drawn on the fly by `evalkit/world/scenes.py`, seeded by (seed, stage, step, index), from the seen "
        "split only: these pairs of shapes never appear together in training (`evalkit/world/split.py`): "
        + ", ".join(" + ".join(sorted(pair)) for pair in sorted(UNSEEN_PAIRS, key=sorted)) + ".",
        "",
        "| caption form | example | share |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| {form} | \"{facts.examples[form]}\" | {share / total:.0%} |" for form, share in recipe["forms"].items() if share > 0]
    lines += [
        "",
        "## Recipe",
        "",
        f"diffusers' text-to-image recipe, seed {recipe['seed']}.",
        "",
        f"1. VAE: {facts.steps['vae']} steps, batch {vae['batch_size']}, AdamW lr {vae['learning_rate']:g} "
        f"({vae['warmup_steps']} warmup steps), loss L1 + {recipe['kl_weight']:g} x KL, float32.",
        f"2. UNet + text encoder, jointly: {facts.steps['diffusion']} steps, batch {diffusion['batch_size']}, AdamW lr "
        f"{diffusion['learning_rate']:g} ({diffusion['warmup_steps']} warmup steps, then constant), betas "
        f"({diffusion['adam_beta1']}, {diffusion['adam_beta2']}), weight decay {diffusion['adam_weight_decay']:g}, "
        f"gradient norm clipped to {diffusion['max_grad_norm']:g}; noise-prediction MSE with the DDPM schedule "
        f"({schedule['beta_schedule']}, betas {schedule['beta_start']}..{schedule['beta_end']}, "
        f"{schedule['num_train_timesteps']} steps); {recipe['proportion_empty_prompts']:.0%} of captions dropped to \"\" "
        f"for classifier-free guidance; EMA decay {recipe['ema_decay'] if recipe['ema_decay'] else 'none'} "
        f"(the EMA weights are these); mixed precision {recipe['mixed_precision']} on a GPU.",
        "",
        "## Training",
        "",
    ]
    if facts.calls:
        lines += ["| stage | steps | seconds | device | commit |", "| --- | --- | ---: | --- | --- |"]
        for call in facts.calls:
            device = call["hardware"].get("gpu") or call["hardware"]["cpu"]
            lines.append(f"| {call['stage']} | {call['from_step']}..{call['to_step']} | {call['seconds']:.0f} | {device} | {call['commit'] or 'unknown'} |")
        minutes = sum(call["seconds"] for call in facts.calls) / 60
        lines += ["", f"Training time: {minutes:.1f} minutes in {len(facts.calls)} stage runs."]
    else:
        lines.append("No record of the calls that trained these weights (calls.jsonl was missing).")
    lines += ["", "## Loss", "", f"![loss curve]({CURVE_NAME})", "", "| stage | steps | mean loss |", "| --- | --- | ---: |"]
    for stage, rows in facts.logs.items():
        lines += [f"| {stage} | {first}..{last} | {mean:.4f} |" for first, last, mean in loss_windows(rows)]
    lines += ["", "## Failure rates of vanilla sampling", ""]
    if facts.failure_rates is None:
        lines.append("Not measured yet.")
    else:
        lines += [f"Measured by: {facts.failure_rates['source']}", "", "| failure | rate |", "| --- | ---: |"]
        lines += [f"| {name} | {rate:.1%} |" for name, rate in facts.failure_rates["rates"].items()]
    return "\n".join(lines) + "\n"
