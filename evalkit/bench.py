"""`make bench`: where generation and scoring time goes, and what reproducing the papers' tables would cost.

For each model entry of `conf/bench.yaml` that runs on this device (the tiny model everywhere; the full-size SD-1.5
and SD-2-base architectures with random weights on a GPU, at 512 px and 50 steps):

1. the harness's `vanilla` against diffusers' `StableDiffusionPipeline` at batch 1 and at the generation batch (same
   initial noise, same latents checked: the ratio is pure harness cost);
2. every method's overhead (T - T0) / T0 against `vanilla` at batch 1 and at the batch its released code samples with;
3. every method's images per second at each batch and its speed-up at the generation batch over batch 1;
4. peak accelerator memory per method and batch (a CPU has no such counter: "n/a");
5. Attend-and-Excite against diffusers' `StableDiffusionAttendAndExcitePipeline` on the same inputs;
6. with `profile`, one profiled batch-1 call per method and its count of host synchronisations.

Before the models, each scorer's images per second at its batch size; after them, the projected GPU-hours of every
`make reproduce-*` target from those figures. A time is the median of `repeats` calls after one untimed warm-up call of the same
(model, method, batch): a first call at a new batch size pays one-time costs (CUDA graph capture, allocator growth).

Every row goes to `reports/bench/bench-<device>.csv` (and stdout) the moment it is measured, so a killed run keeps
what it measured; `write_reports` rebuilds the Markdown and the plot from that CSV (`python -m evalkit.bench <csv>`).
A part that fails becomes a row saying why, and the benchmark goes on.
"""

from __future__ import annotations

import csv
import datetime
import gc
import io
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from evalkit.errors import ConfigError, EvalkitError
from evalkit.manifest import git_commit, hardware, package_versions
from evalkit.models.loading import load_pipeline, resolve_device
from evalkit.paths import (
    CONF,
    config_file,
    config_names,
    has_config,
    project_path,
    unknown_name,
)
from evalkit.prompts import PromptSpec, TokenIndexer, load_prompt_set
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS, Method
from evalkit.scoring.base import SCORERS, ScoredImage, preflight_scorer
from evalkit.scoring.lpips import LpipsScorer
from evalkit.store import atomic_write_bytes, atomic_write_json

ROW_COLUMNS = ("model", "steps", "measure", "method", "batch", "value", "unit", "note")
NO_MODEL = "-"  # the model (or method) column of rows that belong to none (projections; a model's build)

BUILD = "build model"
HARNESS_RATIO = "harness / diffusers StableDiffusionPipeline"
IMAGES_PER_SECOND = "images per second"
PEAK_MEMORY = "peak generation memory"
OVERHEAD = "overhead (T - T0) / T0"
SPEED_UP = "speed-up at the generation batch (images/s against batch 1)"
GRAPHS_RATIO = "vanilla with CUDA graphs / without"
DIAGNOSTICS_RATIO = "vanilla recording attention diagnostics / not"
AAE_RATIO = "attend_and_excite / diffusers StableDiffusionAttendAndExcitePipeline"
AAE_REFERENCE_OVERHEAD = "overhead of diffusers' A&E pipeline (T - T0) / T0"
HOST_SYNCS = "host synchronisations per sampling call"
SCORER_THROUGHPUT = "scorer throughput"
PROJECTED = "projected GPU-hours"

SAME_LATENTS_TOLERANCE = 1e-5
HARNESS_TARGET = 1.00  # no slower than diffusers' own pipeline
AAE_TARGET = 0.8  # our Attend-and-Excite at most 0.8x diffusers' A&E pipeline per image
# Overhead targets by (method, batch): Attention Regulation's paper reports +48.8% (A4000, batch 1); at its official
# batch of 10 the fixed cost per call should mostly vanish.
OVERHEAD_TARGETS = {("attention_regulation", 1): 0.488, ("attention_regulation", 10): 0.20}
SPEED_UP_TARGET = 3.0  # batched sampling should give at least 3x the images per second of batch 1
# Profiler events that make the host wait for the accelerator: the runtime calls themselves, and the ops that read a
# tensor's value on the host (each one a synchronisation on a GPU).
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")
HOST_READS = ("aten::item", "aten::_local_scalar_dense")

T = TypeVar("T")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call: Callable[[], object], repeats: int, device: torch.device, warm_up: bool = True) -> float:
    """Median wall time of `repeats` calls, after one untimed warm-up call unless the caller has just made one."""
    if warm_up:
        call()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class Measurement:
    seconds: float  # median per call
    peak_bytes: int | None  # accelerator peak across the calls; None on a CPU
    output: Any  # the last call's


def measure(call: Callable[[], Any], repeats: int, device: torch.device) -> Measurement:
    """`median_seconds` of `call`, with the accelerator's peak memory across the calls and the last call's output."""
    last = []

    def keeping_output():
        last[:] = [call()]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(keeping_output, repeats, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Measurement(seconds, peak, last[0])


def max_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return (ours.detach().float().cpu() - reference.detach().float().cpu()).abs().max().item()


# --- the plan: every name checked before any model loads ------------------------------------------------------------


@dataclass(frozen=True)
class ModelRun:
    name: str
    steps: int
    repeats: int
    batch_sizes: set[int] | None  # the batches measured on this model (with the top-level batch_sizes); None: all


@dataclass(frozen=True)
class ScorerRun:
    key: str  # the scorer's name, as experiments list it (clip, owlv2, ...)
    config_name: str  # conf/scorer/<config_name>.yaml: <key> is the full-size scorer, <key>_tiny its stand-in
    config: dict  # the resolved scorer config, with the bench's params
    images: int
    note: str


@dataclass(frozen=True)
class BenchPlan:
    device: torch.device
    out_dir: Path
    spec: PromptSpec
    seed: int
    models: list[ModelRun]
    methods: dict[str, dict]  # name -> method config, vanilla first
    generation_batch: int
    official_batch: dict[str, int]
    batch_sizes: set[int] | None  # None: every batch a measurement needs
    scorers: list[ScorerRun]
    scorer_image_size: int
    repeats: int
    profile: bool
    targets: dict[str, DictConfig]
    built_dataset_sizes: dict[str, int]

    def official(self, method: str) -> int:
        return self.official_batch.get(method, 1)


def _names(selection, known: list[str], what: str) -> list[str]:
    """`all` or a list of names, each one of `known`."""
    if selection == "all":
        return known
    if not OmegaConf.is_list(selection):
        raise ConfigError(f"bench: {what}s must be `all` or a list of names, got {selection!r}")
    for name in selection:
        if name not in known:
            raise ConfigError(f"bench: {unknown_name(what, name, known)}")
    return list(selection)


def _positive(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"bench: {what} must be a positive integer, got {value!r}")
    return value


def _batch_sizes(selection, what: str) -> set[int] | None:
    """`all` (None: no limit) or a list of batch sizes."""
    if selection == "all":
        return None
    if not OmegaConf.is_list(selection):
        raise ConfigError(f"bench: {what} must be `all` or a list of batch sizes, got {selection!r}")
    return {_positive(batch, f"every {what} entry") for batch in selection}


def _vanilla_samples(config: DictConfig) -> int | None:
    """How many vanilla images a method costs per image it keeps where it samples as vanilla does: finetuned weights
    (a `checkpoint`, e.g. separate_and_enhance; not loaded here, it need not exist yet) 1, a method that chooses among
    plain samples (best_of_n) its n, besides its verifier; None for a method that changes the sampling."""
    if config.get("checkpoint"):
        return 1
    return METHODS.build(OmegaConf.to_container(config, resolve=True)).plain_samples_per_image()


def _method_configs(selection) -> dict[str, dict]:
    known = config_names("method")
    if selection == "all":
        # A method that samples as vanilla does is timed as vanilla (the projection counts it so), so "all" leaves
        # it out: a checkpoint would have to be made for the benchmarked model.
        names = [name for name in known if _vanilla_samples(config_file("method", name)) is None]
    else:
        names = _names(selection, known, "method")
    names = ["vanilla"] + [name for name in names if name != "vanilla"]  # every overhead is against vanilla
    configs = {name: OmegaConf.to_container(config_file("method", name), resolve=True) for name in names}
    for config in configs.values():
        METHODS.build(config)  # a bad parameter is a ConfigError now, not after the models load
    return configs


def _model_runs(cfg: DictConfig, device: torch.device) -> list[ModelRun]:
    entries = cfg.model_runs
    if cfg.models == "all":
        names = [name for name, entry in entries.items() if device.type in entry.devices]
    else:
        names = _names(cfg.models, list(entries), "model")
    runs = []
    for name in names:
        if not has_config("model", name):
            raise ConfigError(f"bench: model_runs.{name} names no model config (conf/model/{name}.yaml)")
        entry = entries[name]
        runs.append(ModelRun(name, _positive(entry.steps, f"model_runs.{name}.steps"),
                             _positive(entry.get("repeats", cfg.repeats), f"model_runs.{name}.repeats"),
                             _batch_sizes(entry.get("batch_sizes", "all"), f"model_runs.{name}.batch_sizes")))
    return runs


def _scorer_runs(cfg: DictConfig, device: torch.device) -> tuple[list[ScorerRun], int]:
    """The scorers timed on this device and the side of their images."""
    scoring = cfg.scoring.get(device.type)
    if scoring is None:
        if cfg.scorers != "all":
            raise ConfigError(f"bench: no scorers are listed for {device.type} (scoring.{device.type})")
        return [], 0
    runs = []
    for key in _names(cfg.scorers, list(scoring.scorers), f"scorer on {device.type}"):
        entry = scoring.scorers[key]
        if not has_config("scorer", entry.config):
            raise ConfigError(f"bench: scoring.{device.type}.scorers.{key} names no scorer config ({entry.config}.yaml)")
        config = OmegaConf.to_container(OmegaConf.merge(config_file("scorer", entry.config), entry.get("params", {})),
                                        resolve=True)
        preflight_scorer(config, ["vanilla"])
        runs.append(ScorerRun(key, entry.config, config,
                              _positive(entry.images, f"scoring.{device.type}.scorers.{key}.images"),
                              entry.get("note", "")))
    return runs, _positive(scoring.image_size, f"scoring.{device.type}.image_size")


def plan_bench(cfg: DictConfig, device: torch.device) -> BenchPlan:
    """Everything the configuration names, checked: an unknown name is one ConfigError before any model loads."""
    spec = next((s for s in load_prompt_set(project_path(cfg.dataset)) if s.id == cfg.prompt_id), None)
    if spec is None:
        raise ConfigError(f"bench: prompt {cfg.prompt_id!r} is not in {cfg.dataset}")
    methods = _method_configs(cfg.methods)
    official = {name: _positive(batch, f"official_batch.{name}") for name, batch in cfg.official_batch.items()}
    for name in official:
        if not has_config("method", name):
            raise ConfigError(f"bench: official_batch names an unknown method {name!r}")
    batch_sizes = _batch_sizes(cfg.batch_sizes, "batch_sizes")
    scorers, image_size = _scorer_runs(cfg, device)
    return BenchPlan(
        device=device, out_dir=project_path(cfg.out_dir), spec=spec, seed=int(cfg.seed),
        models=_model_runs(cfg, device), methods=methods,
        generation_batch=_positive(cfg.generation_batch, "generation_batch"), official_batch=official,
        batch_sizes=batch_sizes, scorers=scorers, scorer_image_size=image_size,
        repeats=_positive(cfg.repeats, "repeats"), profile=bool(cfg.profile), targets=dict(cfg.reproduce.targets),
        built_dataset_sizes=dict(cfg.reproduce.built_dataset_sizes),
    )


# --- rows, written as measured ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One step of the benchmark; if it fails, its row says so."""

    model: str
    steps: int | None
    measure: str
    method: str
    batch: int | None
    unit: str

    def label(self) -> str:
        model = f"{self.model}: " if self.model != NO_MODEL else ""
        method = f" of {self.method}" if self.method != NO_MODEL else ""
        return f"{model}{self.measure}{method}" + (f" at batch {self.batch}" if self.batch else "")


class Recorder:
    """The rows: each is printed and the whole CSV rewritten (atomically) the moment it is added."""

    def __init__(self, csv_path: Path, time_budget_s: float | None):
        self.csv_path = csv_path
        self.rows: list[dict] = []
        self.start = time.perf_counter()
        self.time_budget_s = time_budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, model: str, steps: int | None, measure: str, method: str, batch: int | None, value: float,
            unit: str, note: str = "") -> None:
        row = {"model": model, "steps": steps, "measure": measure, "method": method, "batch": batch,
               "value": float(value), "unit": unit, "note": note}
        self.rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=ROW_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.csv_path, text.getvalue().encode())
        where = f" batch {batch}" if batch else ""
        print(f"bench row: {model} | {measure} | {method}{where} | {_format_value(value)} {unit} | {note}", flush=True)

    def add_for(self, part: Part, value: float, note: str) -> None:
        self.add(part.model, part.steps, part.measure, part.method, part.batch, value, part.unit, note)

    def attempt(self, part: Part, work: Callable[[], T], budgeted: bool = True) -> T | None:
        """`work()`, or None when it raised (the exception becomes the part's row) or the time budget is spent."""
        if budgeted and self.time_budget_s is not None and self.elapsed() >= self.time_budget_s:
            self.add_for(part, float("nan"), f"not run: the time budget of {self.time_budget_s:g} s was spent")
            return None
        start = time.perf_counter()
        result, out_of_memory = None, False
        try:
            result = work()
        except Exception as error:  # a failing part is a row, and the benchmark goes on (KeyboardInterrupt is not)
            message = str(error).strip().splitlines()
            self.add_for(part, float("nan"), f"failed: {type(error).__name__}" + (f": {message[0]}" if message else ""))
            out_of_memory = isinstance(error, torch.OutOfMemoryError)
        if out_of_memory:  # only now: the exception's traceback held the failed call's tensors
            torch.cuda.empty_cache()
        print(f"bench: {part.label()}: {time.perf_counter() - start:.1f} s (total {self.elapsed():.0f} s)", flush=True)
        return result


# --- generation -------------------------------------------------------------------------------------------------------


class ModelBench:
    """The generation measurements of one model on one device; a (method, batch) is measured once and every row that
    needs it reads that measurement."""

    def __init__(self, plan: BenchPlan, run: ModelRun, recorder: Recorder):
        model_cfg = config_file("model", run.name)
        self.pipe = load_pipeline(model_cfg, plan.device)
        self.plan, self.run, self.recorder, self.device = plan, run, recorder, plan.device
        size = int(model_cfg.resolution)
        self.settings = SamplingSettings(run.steps, float(model_cfg.guidance_scale), size, size)
        self.indexer = TokenIndexer(self.pipe.tokenizer)
        self.methods: dict[str, Method] = {}
        self.measured: dict[tuple[str, int], Measurement] = {}
        self.reference_seconds: dict[int, float] = {}  # diffusers' StableDiffusionPipeline, per batch

    def row(self, measure: str, method: str, batch: int | None, value: float, unit: str, note: str = "") -> None:
        self.recorder.add(self.run.name, self.run.steps, measure, method, batch, value, unit, note)

    def part(self, measure: str, method: str, batch: int | None, unit: str) -> Part:
        return Part(self.run.name, self.run.steps, measure, method, batch, unit)

    def allowed(self, batches: set[int]) -> list[int]:
        """Those of `batches` that the top-level and this model's batch_sizes let through."""
        for limit in (self.plan.batch_sizes, self.run.batch_sizes):
            batches = batches if limit is None else batches & limit
        return sorted(batches)

    def method_batches(self, method: str) -> list[int]:
        """Batch 1, the method's official batch and the generation batch; vanilla at every batch another method is
        compared with it at."""
        names = self.plan.methods if method == "vanilla" else [method]
        return self.allowed({1, self.plan.generation_batch} | {self.plan.official(name) for name in names})

    def method(self, name: str) -> Method:
        if name not in self.methods:
            self.methods[name] = METHODS.build(self.plan.methods[name])
        return self.methods[name]

    def seeds(self, batch: int) -> list[int]:
        """The harness seeds image k of a batch with seed + k, as a prompt's seeds [seed, seed + 1, ...]."""
        return [self.plan.seed + k for k in range(batch)]

    def generators(self, batch: int) -> list[torch.Generator]:
        """What the harness's loop seeds each image with, so diffusers' pipelines start from the same noise."""
        return [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds(batch)]

    def diffusers_kwargs(self, batch: int) -> dict:
        s = self.settings
        return dict(prompt=self.plan.spec.prompt, num_images_per_prompt=batch,
                    num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, height=s.height,
                    width=s.width)

    def measurement(self, name: str, batch: int) -> Measurement:
        """The method's time at this batch, measured once for every row that needs it."""
        if (name, batch) not in self.measured:
            method, seeds = self.method(name), self.seeds(batch)
            self.measured[(name, batch)] = measure(
                lambda: sample(self.pipe, method, self.plan.spec, seeds, self.settings, self.indexer).latents,
                self.run.repeats, self.device,
            )
        return self.measured[(name, batch)]

    def time_method(self, name: str, batch: int) -> None:
        timed = self.measurement(name, batch)
        self.row(IMAGES_PER_SECOND, name, batch, batch / timed.seconds, "images/s",
                 f"{timed.seconds:.3f} s per call (median of {self.run.repeats})")
        peak = timed.peak_bytes
        self.row(PEAK_MEMORY, name, batch, float("nan") if peak is None else peak / 2**20, "MiB",
                 "n/a on a CPU" if peak is None else "torch.cuda.max_memory_allocated")

    def harness_against_diffusers(self, batch: int) -> None:
        """Our vanilla against `StableDiffusionPipeline` from the same noise: time ratio, and whether the latents agree.
        Diffusers' latents call is its warm-up at this batch."""
        kwargs = self.diffusers_kwargs(batch)
        reference = self.pipe(**kwargs, generator=self.generators(batch), output_type="latent").images
        ours = self.measurement("vanilla", batch)
        seconds = median_seconds(lambda: self.pipe(**kwargs, generator=self.generators(batch)), self.run.repeats,
                                 self.device, warm_up=False)
        self.reference_seconds[batch] = seconds
        difference = max_difference(ours.output, reference)
        note = (f"same latents: {difference <= SAME_LATENTS_TOLERANCE} (max difference {difference:.1e}); "
                f"target <= {HARNESS_TARGET}; harness {ours.seconds:.3f} s, diffusers {seconds:.3f} s per call")
        if not torch.isfinite(reference).all():
            note += "; diffusers' latents are not finite (random weights overflow float16; the harness zeroes those)"
        self.row(HARNESS_RATIO, "vanilla", batch, ours.seconds / seconds, "ratio", note)

    def graphs_against_eager(self, batch: int) -> None:
        """Vanilla with the UNet's plain forwards replayed as CUDA graphs against every forward eager: time ratio and
        whether the latents agree (a replay runs the recorded kernels, so they should be equal)."""
        graphed = self.measurement("vanilla", batch)
        vanilla, seeds = self.method("vanilla"), self.seeds(batch)
        eager = measure(lambda: sample(self.pipe, vanilla, self.plan.spec, seeds, self.settings, self.indexer,
                                       cuda_graphs=False).latents, self.run.repeats, self.device)
        self.row(GRAPHS_RATIO, "vanilla", batch, graphed.seconds / eager.seconds, "ratio",
                 f"max latent difference {max_difference(graphed.output, eager.output):.1e}; "
                 f"with {graphed.seconds:.3f} s, without {eager.seconds:.3f} s per call")

    def diagnostics_against_none(self, batch: int) -> None:
        """Vanilla recording the report's attention diagnostics (16x16 maps) against vanilla without: the cost every
        method pays in a run that records them (on a GPU their forwards cannot replay CUDA graphs)."""
        plain = self.measurement("vanilla", batch)
        vanilla, seeds = self.method("vanilla"), self.seeds(batch)
        recording = measure(lambda: sample(self.pipe, vanilla, self.plan.spec, seeds, self.settings, self.indexer,
                                           attention_diagnostics=16).latents, self.run.repeats, self.device)
        self.row(DIAGNOSTICS_RATIO, "vanilla", batch, recording.seconds / plain.seconds, "ratio",
                 f"max latent difference {max_difference(recording.output, plain.output):.1e}; "
                 f"with {recording.seconds:.3f} s, without {plain.seconds:.3f} s per call")

    def derived_rows(self, name: str) -> None:
        """Overheads against vanilla at batch 1 and the official batch, and the speed-up at the generation batch, from
        what was measured."""
        measured = self.measured
        if name != "vanilla":
            for batch in self.allowed({1, self.plan.official(name)}):
                if (name, batch) in measured and ("vanilla", batch) in measured:
                    t0 = measured[("vanilla", batch)].seconds
                    which = "its official batch" if batch == self.plan.official(name) else "batch 1"
                    target = OVERHEAD_TARGETS.get((name, batch))
                    self.row(OVERHEAD, name, batch, measured[(name, batch)].seconds / t0 - 1.0, "fraction",
                             f"{which}; vanilla {t0:.3f} s per call" + (f"; target <= {target:g}" if target else ""))
        batch = self.plan.generation_batch
        if batch != 1 and (name, batch) in measured and (name, 1) in measured:
            speed_up = measured[(name, 1)].seconds * batch / measured[(name, batch)].seconds
            self.row(SPEED_UP, name, batch, speed_up, "ratio", f"target >= {SPEED_UP_TARGET:g}")

    def attend_and_excite_against_diffusers(self) -> None:
        """Our Attend-and-Excite against diffusers' pipeline on the same inputs at batch 1: time ratio and latent
        difference. Diffusers' latents call is its warm-up."""
        aae = self.method("attend_and_excite")
        ours = self.measurement("attend_and_excite", 1)
        components = {k: self.pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        reference = StableDiffusionAttendAndExcitePipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        reference.set_progress_bar_config(disable=True)
        kwargs = dict(
            self.diffusers_kwargs(1),
            token_indices=[i for word in self.indexer.subject_indices(self.plan.spec) for i in word],
            max_iter_to_alter=aae.max_iter_to_alter, thresholds=aae.thresholds, scale_factor=aae.scale_factor,
            attn_res=(aae.attention_res, aae.attention_res),
        )
        processors = dict(self.pipe.unet.attn_processors)
        try:
            reference_latents = reference(**kwargs, generator=self.generators(1), output_type="latent").images
            seconds = median_seconds(lambda: reference(**kwargs, generator=self.generators(1)), self.run.repeats,
                                     self.device, warm_up=False)
        finally:
            self.pipe.unet.set_attn_processor(processors)  # diffusers' pipeline leaves its processors on every layer
        self.row(AAE_RATIO, "attend_and_excite", 1, ours.seconds / seconds, "ratio",
                 f"max latent difference {max_difference(ours.output, reference_latents):.2e}; target <= {AAE_TARGET:g}")
        if 1 in self.reference_seconds:
            self.row(AAE_REFERENCE_OVERHEAD, "attend_and_excite", 1, seconds / self.reference_seconds[1] - 1.0,
                     "fraction", "against diffusers' StableDiffusionPipeline")

    def profile(self, name: str) -> None:
        """One batch-1 call under torch.profiler: the top ops to profile-<model>-<method>.txt, and a row counting the
        host synchronisations (the figure to drive to ~0)."""
        method, cuda = self.method(name), self.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profiler:
            sample(self.pipe, method, self.plan.spec, self.seeds(1), self.settings, self.indexer)
            _synchronize(self.device)
        events = profiler.key_averages()
        path = self.plan.out_dir / f"profile-{self.run.name}-{name}.txt"
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        atomic_write_bytes(path, events.table(sort_by=sort_by, row_limit=25).encode())
        counts = {op: sum(event.count for event in events if event.key == op) for op in CUDA_SYNCS + HOST_READS}
        # On a GPU the runtime's synchronisations are the count; a CPU has none, so count the host reads of tensor
        # values instead (aten::item calls aten::_local_scalar_dense: each read once).
        value = sum(counts[op] for op in CUDA_SYNCS) if cuda else counts["aten::_local_scalar_dense"]
        what = " + ".join(CUDA_SYNCS) if cuda else "aten::_local_scalar_dense (a sync each on a GPU)"
        counted = ", ".join(f"{op} {count}" for op, count in counts.items())
        self.row(HOST_SYNCS, name, 1, value, "calls", f"{what}; {counted}; {path.name}")


def bench_model(plan: BenchPlan, run: ModelRun, recorder: Recorder) -> None:
    print(f"bench: {run.name} on {plan.device} ({run.steps} steps, {run.repeats} timed calls per figure)", flush=True)
    bench = recorder.attempt(Part(run.name, run.steps, BUILD, NO_MODEL, None, ""),
                             lambda: ModelBench(plan, run, recorder))
    if bench is None:
        return
    comparison_batches = set(bench.allowed({1, plan.generation_batch}))
    for name in plan.methods:
        try:
            bench.method(name).preflight(plan.spec, bench.indexer)
        except EvalkitError as error:
            bench.row(IMAGES_PER_SECOND, name, None, float("nan"), "images/s", f"not run: {error}")
            continue
        for batch in bench.method_batches(name):
            if name == "vanilla" and batch in comparison_batches:
                recorder.attempt(bench.part(HARNESS_RATIO, name, batch, "ratio"),
                                 partial(bench.harness_against_diffusers, batch))
                if plan.device.type == "cuda":
                    recorder.attempt(bench.part(GRAPHS_RATIO, name, batch, "ratio"),
                                     partial(bench.graphs_against_eager, batch))
                recorder.attempt(bench.part(DIAGNOSTICS_RATIO, name, batch, "ratio"),
                                 partial(bench.diagnostics_against_none, batch))
            recorder.attempt(bench.part(IMAGES_PER_SECOND, name, batch, "images/s"),
                             partial(bench.time_method, name, batch))
        bench.derived_rows(name)
    if "attend_and_excite" in plan.methods and bench.allowed({1}):
        recorder.attempt(bench.part(AAE_RATIO, "attend_and_excite", 1, "ratio"),
                         bench.attend_and_excite_against_diffusers)
    if plan.profile:
        for name in plan.methods:
            recorder.attempt(bench.part(HOST_SYNCS, name, 1, "calls"), partial(bench.profile, name))
    bench = None  # both full-size models do not need to be on the accelerator at once
    _free_memory(plan.device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- scorers ----------------------------------------------------------------------------------------------------------


def time_scorer(plan: BenchPlan, run: ScorerRun, recorder: Recorder) -> None:
    """Images per second of one scorer at its batch size, on seeded noise images of the bench prompt, batched as the
    score stage batches them."""
    scorer = SCORERS.build(run.config, plan.device)
    batch_size = int(run.config.get("batch_size", 32))
    side = plan.scorer_image_size
    pixels = np.random.default_rng(plan.seed).integers(0, 256, (run.images, side, side, 3), dtype=np.uint8)
    spec = plan.spec
    items = [ScoredImage("bench", "vanilla", "vanilla", "bench", spec.id, plan.seed + i, spec.prompt, spec.subjects,
                         Image.fromarray(image), {"status": "ok"}) for i, image in enumerate(pixels)]
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    # LPIPS's update reads each image's vanilla partner from a store: time its distances
    if isinstance(scorer, LpipsScorer):
        def score(batch):
            scorer.distances([item.image for item in batch], [item.image for item in batch])
    else:
        score = scorer.update

    def score_all():
        scorer.reset()
        for batch in batches:
            score(batch)

    seconds = median_seconds(score_all, plan.repeats, plan.device)
    partial = " (one partial batch)" if run.images < batch_size else ""
    note = f"{scorer.provenance}; {run.images} images of {side} px{partial}" + (f"; {run.note}" if run.note else "")
    recorder.add(run.config_name, None, SCORER_THROUGHPUT, run.key, batch_size, run.images / seconds, "images/s", note)
    scorer = None  # its model leaves the accelerator before the next scorer's loads
    _free_memory(plan.device)


# --- projection of the `make reproduce-*` targets ---------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """The images one run of a `make reproduce-*` target makes with one method, and the scorers that read them."""

    run: str  # the run's overrides
    model: str  # the experiment's model config
    timed_as: str | None  # the benchmarked model with its architecture (the model config's `timed_as`)
    method: str  # the method as it is timed (a method with finetuned weights samples as vanilla does)
    batch: int
    steps: int
    images: int
    generated: bool  # False: the target reuses another target's images
    scorers: tuple[str, ...]


def _images_per_second(table: pd.DataFrame, work: Work) -> tuple[float, int] | None:
    """The measured images per second of the work's method on its timed model at its steps, at the measured batch
    closest to its batch (the smaller one on a tie), and that batch."""
    rows = table[(table.measure == IMAGES_PER_SECOND) & (table.model == work.timed_as) & (table.method == work.method)
                 & (table.steps == work.steps) & table.value.notna()]
    if rows.empty:
        return None
    best = min(rows.itertuples(), key=lambda r: (abs(r.batch - work.batch), r.batch))
    return float(best.value), int(best.batch)


def _scorer_throughput(table: pd.DataFrame, scorer: str) -> float | None:
    """The measured images per second of the full-size scorer (config conf/scorer/<scorer>.yaml, not the stand-in)."""
    rows = table[(table.measure == SCORER_THROUGHPUT) & (table.method == scorer) & (table.model == scorer)
                 & table.value.notna()]
    return None if rows.empty else float(rows.value.iloc[-1])


def project(table: pd.DataFrame, works: list[Work]) -> tuple[float, str]:
    """(GPU-hours, breakdown) of a target's works from the measured rows; (NaN, the missing figures) when a figure
    the target needs was not measured."""
    generation: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # method -> [images, seconds]
    scored: dict[str, int] = defaultdict(int)
    missing, missing_rates = [], defaultdict(list)  # (model, steps) -> methods
    batch_notes, model_notes = set(), set()
    for work in works:
        for scorer in work.scorers:
            scored[scorer] += work.images
        if not work.generated:
            continue
        if work.timed_as is None:
            missing.append(f"a benchmarked model with {work.model}'s architecture "
                           f"(no timed_as in conf/model/{work.model}.yaml)")
            continue
        model_notes.add(f"{work.model} as {work.timed_as}")
        rate = _images_per_second(table, work)
        if rate is None:
            missing_rates[(work.timed_as, work.steps)].append(work.method)
            continue
        images_per_second, batch = rate
        if batch != work.batch:
            batch_notes.add(f"batch {work.batch} timed at batch {batch}")
        generation[work.method][0] += work.images
        generation[work.method][1] += work.images / images_per_second
    scoring = {}
    for scorer, images in scored.items():
        throughput = _scorer_throughput(table, scorer)
        if throughput is None:
            missing.append(f"{SCORER_THROUGHPUT} of {scorer} (full size: conf/scorer/{scorer}.yaml)")
        else:
            scoring[scorer] = (images, images / throughput)
    missing += [f"{IMAGES_PER_SECOND} on {model} at {steps} steps of {', '.join(dict.fromkeys(methods))}"
                for (model, steps), methods in missing_rates.items()]
    if missing:
        return float("nan"), "missing: " + "; ".join(dict.fromkeys(missing))
    generation_s = sum(seconds for _, seconds in generation.values())
    scoring_s = sum(seconds for _, seconds in scoring.values())
    parts = []
    if generation:
        by_method = ", ".join(f"{method} {images:,} images {seconds / 3600:.1f} h"
                              for method, (images, seconds) in generation.items())
        parts.append(f"generation {generation_s / 3600:.1f} h ({by_method})")
    if scoring:
        by_scorer = ", ".join(f"{scorer} {images:,} images {seconds / 3600:.2f} h"
                              for scorer, (images, seconds) in scoring.items())
        parts.append(f"scoring {scoring_s / 3600:.2f} h ({by_scorer})")
    parts += sorted(model_notes) + sorted(batch_notes)
    return (generation_s + scoring_s) / 3600, "; ".join(parts)


def _composed(overrides: list[str]) -> DictConfig:
    """`conf/config.yaml` with these overrides, as the command line composes it (inside the bench's own Hydra app, or
    without one)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _prompt_count(cfg: DictConfig, built_dataset_sizes: dict[str, int]) -> int:
    path = project_path(cfg.dataset.path)
    if path.is_file():
        return len(load_prompt_set(path, cfg.limit, cfg.dataset.get("exclude", ())))
    if cfg.dataset.name not in built_dataset_sizes:
        raise ConfigError(f"bench: dataset {cfg.dataset.name} is not built ({path}) and reproduce.built_dataset_sizes "
                          f"does not give its size")
    return built_dataset_sizes[cfg.dataset.name]


def target_works(target: DictConfig, built_dataset_sizes: dict[str, int]) -> list[Work]:
    """The images each run of a target makes per method, composed with the overrides the Makefile passes."""
    works = []
    for overrides in target.runs:
        cfg = _composed(list(overrides))
        images = _prompt_count(cfg, built_dataset_sizes) * len(cfg.seeds)
        scorers = tuple(s.name for s in cfg.scorers.values() if SCORERS[s.name].needs_images)
        for name in cfg.methods:
            config = config_file("method", name)
            samples = _vanilla_samples(config)
            for_timing = config.name if samples is None else "vanilla"
            run = (" ".join(overrides), cfg.model.name, cfg.model.get("timed_as"), for_timing, int(cfg.batch_size),
                   int(cfg.sampling.num_inference_steps))
            generated = not target.get("reuses_images", False)
            if config.get("verifier") is not None:  # best_of_n: n plain samples per kept image, each rated by it
                works.append(Work(*run, images * samples, generated, (cfg.scorers[config.verifier].name,)))
                generated = False
            works.append(Work(*run, images, generated, scorers))
    return works


def project_target(name: str, target: DictConfig, plan: BenchPlan, recorder: Recorder, unit: str) -> None:
    works = target_works(target, plan.built_dataset_sizes)
    hours, note = project(pd.DataFrame(recorder.rows, columns=ROW_COLUMNS), works)
    if target.get("note"):
        note += f"; {target.note}"
    recorder.add(NO_MODEL, None, PROJECTED, name, None, hours, unit, note)


# --- reports ----------------------------------------------------------------------------------------------------------


def _format_value(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f}"


def _plot(path: Path, table: pd.DataFrame) -> None:
    """Overhead per method at batch 1 and at its official batch (where that differs), one bar pair per model."""
    overhead = table[(table.measure == OVERHEAD) & table.value.notna()]
    pairs = list(dict.fromkeys(zip(overhead.model, overhead.method)))
    official = {(r.model, r.method): int(r.batch) for r in overhead.itertuples() if r.batch != 1}
    figure = Figure(figsize=(8, 1.2 + 0.5 * max(1, len(pairs))), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    for offset, (label, at_batch_1) in zip((-0.2, 0.2), (("batch 1", True), ("official batch", False))):
        rows = overhead[(overhead.batch == 1) == at_batch_1]
        positions = [pairs.index(pair) + offset for pair in zip(rows.model, rows.method)]
        axis.barh(positions, rows.value * 100, height=0.4, label=label)
    at_official = {pair: f", official batch {batch}" for pair, batch in official.items()}
    axis.set_yticks(range(len(pairs)), [f"{method} ({model}{at_official.get((model, method), '')})"
                                        for model, method in pairs])
    axis.set_xlabel("compute overhead against vanilla (%)")
    axis.invert_yaxis()
    if pairs:
        figure.legend(loc="outside lower center", ncols=2)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def _markdown(table: pd.DataFrame, manifest: dict) -> str:
    versions, hardware_info = manifest.get("versions", {}), manifest.get("hardware", {})
    device = hardware_info.get("gpu", hardware_info.get("device", "unknown"))
    state = "finished" if manifest.get("finished") else "stopped before its end (rows so far)"
    lines = [
        "# evalkit benchmark", "",
        f"Device: {device}. Commit: {manifest.get('git_commit')}. torch {versions.get('torch')}, diffusers "
        f"{versions.get('diffusers')}. Run started {manifest.get('started', 'unknown')}, {state}.", "",
        "All models here have random weights (the full-size ones are SD-1.5's and SD-2-base's architectures): ratios, "
        "overheads and throughputs are meaningful, since random weights time like trained ones; the images are not. "
        "Methods that refine until an attention threshold is met (Attend-and-Excite, CONFORM) run every refinement "
        "iteration on random weights, which never meet it: their overheads are upper bounds.",
    ]
    # One section per model, in the order measured, then the scorers and the projections.
    last = (SCORER_THROUGHPUT, PROJECTED)
    table = table.assign(note=table.note.fillna(""), group=[
        measure if measure in last else model for model, measure in zip(table.model, table.measure)])
    groups = list(dict.fromkeys(table.group))
    groups.sort(key=lambda group: group in last)
    for group in groups:
        rows = table[table.group == group]
        steps = rows.steps.dropna()
        title = f"{group} ({int(steps.iloc[0])} steps)" if len(steps) else group
        lines += ["", f"## {title}", "", "| measure | method | batch | value | unit | note |",
                  "|---|---|---|---|---|---|"]
        for r in rows.itertuples():
            batch = "" if pd.isna(r.batch) else int(r.batch)
            # a scorer timed through another config than its own (a tiny stand-in) says which
            method = f"{r.method} ({r.model})" if r.measure == SCORER_THROUGHPUT and r.model != r.method else r.method
            lines.append(f"| {r.measure} | {method} | {batch} | {_format_value(r.value)} | {r.unit} | {r.note} |")
    return "\n".join(lines) + "\n"


def write_reports(csv_path: Path) -> Path:
    """The Markdown and the overhead plot beside a bench CSV, from it and its JSON: what the end of a run writes, and
    what rebuilds them after a killed run."""
    table = pd.read_csv(csv_path)
    manifest_path = csv_path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    report = csv_path.with_suffix(".md")
    atomic_write_bytes(report, _markdown(table, manifest).encode())
    _plot(csv_path.with_name(f"{csv_path.stem}-overhead.png"), table)
    return report


def run_bench(cfg: DictConfig) -> Path:
    device = resolve_device(cfg.device)
    plan = plan_bench(cfg, device)
    stem = plan.out_dir / f"bench-{device.type}"
    recorder = Recorder(stem.with_suffix(".csv"), cfg.time_budget_s)
    manifest = {"config": OmegaConf.to_container(cfg, resolve=True), "versions": package_versions(),
                "git_commit": git_commit(), "hardware": hardware(device),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "finished": False}
    atomic_write_json(stem.with_suffix(".json"), manifest)
    # Scorers first: they are quick, and every projection needs them.
    for run in plan.scorers:
        recorder.attempt(Part(run.config_name, None, SCORER_THROUGHPUT, run.key, None, "images/s"),
                         partial(time_scorer, plan, run, recorder))
    for run in plan.models:
        bench_model(plan, run, recorder)
    unit = "GPU-hours" if device.type == "cuda" else f"{device.type.upper()}-hours"  # hours of this device's kind
    for name, target in plan.targets.items():
        recorder.attempt(Part(NO_MODEL, None, PROJECTED, name, None, unit),
                         partial(project_target, name, target, plan, recorder, unit), budgeted=False)
    atomic_write_json(stem.with_suffix(".json"), dict(manifest, finished=True, elapsed_s=round(recorder.elapsed(), 1)))
    report = write_reports(stem.with_suffix(".csv"))
    print(report.read_text(), flush=True)
    return report


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m evalkit.bench reports/bench/bench-<device>.csv  (rebuilds its .md and plot)")
    print(write_reports(Path(sys.argv[1])))
