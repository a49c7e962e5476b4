"""Load the diffusion pipeline a model config names: a hub checkpoint at a pinned revision, a random-weight build,
or a diffusers folder in the project (`kind: local`: the shapes-world model that `python -m evalkit train-world`
makes)."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from evalkit.errors import ConfigError, MissingWeightsError
from evalkit.models.random_init import build_random_pipeline
from evalkit.paths import PROJECT_ROOT

# The schedulers the papers ran; each is built from the checkpoint's own scheduler config.
SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str, cuda_count: int, job_number: int | None) -> torch.device:
    """`name` as a device; "auto" is the CPU without a GPU, one GPU for a single run, and in a multirun GPU
    `job_number mod cuda_count`, so parallel jobs on one machine (hydra/launcher=submitit_local with
    `hydra.launcher.gpus_per_node` set to the machine's GPU count) take different GPUs: Hydra does not place them.
    Under SLURM a job sees only the GPUs it was given (CUDA_VISIBLE_DEVICES), so it counts them and takes its own."""
    if name == "auto":
        if cuda_count == 0:
            return torch.device("cpu")
        return torch.device("cuda", 0 if job_number is None else job_number % cuda_count)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and (device.index or 0) >= cuda_count:
        raise ConfigError(f"device {name}: this machine has {cuda_count} visible GPUs")
    return device


def multirun_job_number() -> int | None:
    """This job's number in a Hydra multirun (hydra.job.num); None outside one."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)


def resolve_device(name: str) -> torch.device:
    """The device a config's `device` names, for this process (see `pick_device`)."""
    return pick_device(name, torch.cuda.device_count() if torch.cuda.is_available() else 0, multirun_job_number())


def resolve_dtype(model_cfg: Mapping[str, Any], device: torch.device) -> torch.dtype:
    """The config's dtype on a GPU; float32 on a CPU, where half precision is slow or unsupported."""
    if model_cfg["dtype"] not in DTYPES:
        raise ConfigError(f"model {model_cfg['name']}: unknown dtype {model_cfg['dtype']!r}; choose from {sorted(DTYPES)}")
    return DTYPES[model_cfg["dtype"]] if device.type == "cuda" else torch.float32


def _load_hub_pipeline(model_cfg: Mapping[str, Any], dtype: torch.dtype) -> StableDiffusionPipeline:
    hub_id, revision = model_cfg["hub_id"], model_cfg["revision"]
    return load_from_hub(
        f"model {model_cfg['name']}",
        hub_id,
        revision,
        lambda: StableDiffusionPipeline.from_pretrained(
            hub_id,
            revision=revision,
            torch_dtype=dtype,
            use_safetensors=True,
            safety_checker=None,
            requires_safety_checker=False,
        ),
    )


def local_weights(model_cfg: Mapping[str, Any]) -> Path:
    """The folder of a `kind: local` model, or MissingWeightsError saying how to make it."""
    path = Path(model_cfg["path"])
    folder = path if path.is_absolute() else PROJECT_ROOT / path
    if not (folder / "model_index.json").is_file():
        raise MissingWeightsError(f"model {model_cfg['name']}: no weights in {folder}; make them with `{model_cfg['made_by']}`")
    return folder


def _load_local_pipeline(model_cfg: Mapping[str, Any], dtype: torch.dtype) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(
        local_weights(model_cfg), dtype=dtype, use_safetensors=True, local_files_only=True,
        safety_checker=None, requires_safety_checker=False,
    )


def model_revision(model_cfg: Mapping[str, Any]) -> str | None:
    """What, beyond its name, identifies a model's weights (images depend on it): the hub revision, or for local
    weights a hash of their files, so that images of retrained weights are not taken for the old ones'."""
    if model_cfg.get("kind") != "local":
        return model_cfg.get("revision")
    folder = local_weights(model_cfg)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def model_source(model_cfg: Mapping[str, Any]) -> str:
    """Where a model's weights come from, for manifests."""
    if model_cfg.get("kind") == "local":
        return f"{model_cfg['path']} (local diffusers folder)"
    return model_cfg.get("hub_id", "tiny (random weights, built offline)")


def set_scheduler(pipe: StableDiffusionPipeline, name: str, options: Mapping[str, Any] | None = None) -> None:
    """The scheduler `name`, built from the checkpoint's scheduler config with `options` overriding its arguments
    (a paper's code on an older diffusers: `final_sigmas_type: sigma_min` is DPM-Solver as diffusers 0.23 ran it)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    scheduler_class = SCHEDULERS[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(inspect.signature(scheduler_class.__init__).parameters) - {"self"})
    if unknown:
        raise ConfigError(f"scheduler {name}: unknown scheduler_options {unknown}; they must be arguments of "
                          f"{scheduler_class.__name__}")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)


def load_pipeline(
    model_cfg: Mapping[str, Any], device: torch.device, scheduler: str | None = None,
    scheduler_options: Mapping[str, Any] | None = None,
) -> StableDiffusionPipeline:
    """The pipeline for `model_cfg` on `device`, with `scheduler` (default: the model config's) and its options."""
    dtype = resolve_dtype(model_cfg, device)
    if model_cfg["kind"] == "random":
        pipe = build_random_pipeline(model_cfg)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif model_cfg["kind"] == "hub":
        pipe = _load_hub_pipeline(model_cfg, dtype)
    elif model_cfg["kind"] == "local":
        pipe = _load_local_pipeline(model_cfg, dtype)
    else:
        raise ConfigError(f"model {model_cfg['name']}: unknown kind {model_cfg['kind']!r} (hub, random or local)")
    set_scheduler(pipe, scheduler or model_cfg["scheduler"], scheduler_options)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_from_hub(what: str, hub_id: str, revision: str, load: Callable[[], Any]) -> Any:
    """`load()`, turning the OSError of weights that are neither cached nor downloadable into MissingWeightsError."""
    try:
        return load()
    except OSError as error:  # huggingface_hub and transformers raise OSError subclasses for missing files
        raise MissingWeightsError(
            f"{what}: weights for {hub_id}@{revision} are not in the local Hugging Face cache and cannot be "
            f"downloaded here; on a machine with network run `hf download {hub_id} --revision {revision}` and copy "
            f"the cache (HF_HOME) here ({type(error).__name__})"
        ) from None
