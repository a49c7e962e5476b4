"""The step loop every training of the project shares (Separate-and-Enhance's finetune, the shapes-world model):
per-step random numbers seeded from (seed, step), so a resumed run draws what an uninterrupted one would; a loss
log whose lines after the step a run resumes from are dropped; a progress bar; checkpoints every N steps, at the
last step, and before a wall-clock deadline; and the optimizer step with gradient clipping.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm import tqdm

LOG_NAME = "loss_log.jsonl"


def step_generator(namespace: str, seed: int, step: int) -> torch.Generator:
    """A CPU generator for one step of one training (`namespace`), independent of every other step."""
    digest = hashlib.sha256(f"{namespace}/{seed}/{step}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint a run resumes from (they will be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_log(folder: Path) -> list[dict[str, float]]:
    path = folder / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def optimizer_step(loss: torch.Tensor, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_steps(
    desc: str,
    out: Path,
    start: int,
    steps: int,
    checkpoint_every: int,
    train_step: Callable[[int], dict[str, float]],
    save: Callable[[int], None],
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> int:
    """Steps `start` .. `steps - 1`, each logged to `out/loss_log.jsonl` and shown on a progress bar; `save(done)`
    after every `checkpoint_every`-th step, after the last one, and after the step past which the slowest step so
    far would overrun `deadline` (a `time.monotonic()` value), where the run stops. Returns the steps done."""
    log_path = out / LOG_NAME
    out.mkdir(parents=True, exist_ok=True)
    truncate_log(log_path, start)
    done, slowest = start, 0.0
    with tqdm(total=steps, initial=start, desc=desc, unit="step") as progress, log_path.open("a") as log_file:
        for step in range(start, steps):
            began = time.monotonic()
            losses = train_step(step)
            done = step + 1
            log_file.write(json.dumps({"step": done, **losses}) + "\n")
            log_file.flush()
            progress.set_postfix({k: f"{v:.4f}" for k, v in losses.items() if k != "lr"})
            progress.update(1)
            slowest = max(slowest, time.monotonic() - began)
            out_of_time = deadline is not None and time.monotonic() + slowest > deadline
            if done % checkpoint_every == 0 or done == steps or out_of_time:
                save(done)
            if on_step is not None:
                on_step(done, losses)
            if out_of_time:
                break
    return done
