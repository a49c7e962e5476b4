"""`make bench`: where generation and scoring time goes, as ratios that hold across machines.

For each model config that runs on this device (the tiny model everywhere; the full-size SD-1.5 and SD-2-base
architectures with random weights on a GPU, at the papers' 512 px and 50 steps):

1. the harness's `vanilla` against diffusers' `StableDiffusionPipeline` at the same settings (same initial noise,
   same outputs: the ratio is pure harness cost);
2. every method's overhead (T - T0) / T0 against `vanilla`, and Attend-and-Excite's time against diffusers'
   `StableDiffusionAttendAndExcitePipeline` on the same inputs (outputs compared too);
3. images per second of each scorer at its default batch size;
4. peak accelerator memory of generation per method (a CPU has no such counter: "n/a").

Each time is the median of `repeats` calls after one warm-up call. Results go to `reports/bench/` as CSV,
Markdown and a plot.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from evalkit.errors import ConfigError, EvalkitError
from evalkit.manifest import PROJECT_ROOT, git_commit, hardware, package_versions
from evalkit.models.loading import load_pipeline, resolve_device
from evalkit.prompts import TokenIndexer, load_prompt_set
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import build_method
from evalkit.scoring.base import ScoredImage, build_scorer
from evalkit.store import atomic_write_bytes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `repeats` calls after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    call()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _method_names(selection) -> list[str]:
    if selection == "all":
        # Methods that sample with finetuned weights (a `checkpoint`, e.g. sepen) cost what vanilla costs and need a
        # checkpoint made for the benchmarked model, so "all" leaves them out.
        paths = sorted((PROJECT_ROOT / "conf" / "method").glob("*.yaml"))
        names = [p.stem for p in paths if "checkpoint" not in OmegaConf.load(p)]
        return ["vanilla"] + [n for n in names if n != "vanilla"]
    return list(selection)


def _method_config(name: str) -> dict:
    path = PROJECT_ROOT / "conf" / "method" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"bench: unknown method {name!r} (no {path.relative_to(PROJECT_ROOT)})")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


class GenerationBench:
    """The generation measurements for one model config on one device; `rows` collects (measure, value) rows."""

    def __init__(self, cfg: DictConfig, model_name: str, steps: int, device: torch.device):
        model_cfg = OmegaConf.load(PROJECT_ROOT / "conf" / "model" / f"{model_name}.yaml")
        self.pipe = load_pipeline(model_cfg, device)
        self.spec = next((s for s in load_prompt_set(PROJECT_ROOT / cfg.dataset) if s.id == cfg.prompt_id), None)
        if self.spec is None:
            raise ConfigError(f"bench: prompt {cfg.prompt_id!r} is not in {cfg.dataset}")
        size = int(model_cfg.resolution)
        self.settings = SamplingSettings(steps, float(model_cfg.guidance_scale), size, size)
        self.call_kwargs = dict(num_inference_steps=steps, guidance_scale=self.settings.guidance_scale, height=size, width=size)
        self.indexer = TokenIndexer(self.pipe.tokenizer)
        self.model_name, self.seed, self.repeats, self.device = model_name, int(cfg.seed), int(cfg.repeats), device
        self.rows: list[dict] = []

    def row(self, measure: str, method: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append({"model": self.model_name, "steps": self.settings.num_inference_steps, "measure": measure,
                          "method": method, "value": value, "unit": unit, "note": note})

    def ours(self, method) -> Callable[[], object]:
        return lambda: sample(self.pipe, method, self.spec, [self.seed], self.settings, self.indexer)

    def generators(self) -> list[torch.Generator]:
        """What the harness's loop seeds the image with, so diffusers' pipelines start from the same noise."""
        return [torch.Generator("cpu").manual_seed(self.seed)]

    def time(self, call: Callable[[], object]) -> float:
        return median_seconds(call, self.repeats, self.device)

    def harness_against_diffusers(self) -> tuple[float, float]:
        """(T0, diffusers' time): our vanilla against `StableDiffusionPipeline` with the same outputs."""
        reference_latents = self.pipe(self.spec.prompt, generator=self.generators(), output_type="latent", **self.call_kwargs).images
        vanilla = self.ours(build_method({"name": "vanilla"}))
        same = torch.allclose(vanilla().latents, reference_latents, atol=1e-5)
        t_reference = self.time(lambda: self.pipe(self.spec.prompt, generator=self.generators(), **self.call_kwargs))
        t_vanilla = self.time(vanilla)
        self.row("harness / diffusers StableDiffusionPipeline", "vanilla", t_vanilla / t_reference, "ratio",
                 f"same latents: {same}; target <= 1.03")
        return t_vanilla, t_reference

    def method_overhead(self, name: str, t_vanilla: float) -> None:
        """(T - T0) / T0 of one method, and its peak memory."""
        method = build_method(_method_config(name))
        try:
            method.check(self.spec, self.indexer)
        except EvalkitError as error:
            self.row("overhead (T - T0) / T0", name, float("nan"), "fraction", f"not run: {error}")
            return
        if name != "vanilla":
            self.row("overhead (T - T0) / T0", name, self.time(self.ours(method)) / t_vanilla - 1.0, "fraction")
        peak = peak_memory_bytes(self.ours(method), self.device)
        self.row("peak generation memory", name, float("nan") if peak is None else peak / 2**20, "MiB",
                 "" if peak is not None else "n/a on a CPU")

    def attend_and_excite_against_diffusers(self, t_reference: float) -> None:
        """Our Attend-and-Excite against diffusers' pipeline on the same inputs: time ratio and latent difference."""
        aae = build_method(_method_config("attend_and_excite"))
        components = {k: self.pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        reference = StableDiffusionAttendAndExcitePipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        reference.set_progress_bar_config(disable=True)
        kwargs = dict(
            token_indices=[i for word in self.indexer.subject_indices(self.spec) for i in word],
            max_iter_to_alter=aae.max_iter_to_alter, thresholds=aae.thresholds, scale_factor=aae.scale_factor,
            attn_res=(aae.attention_res, aae.attention_res), **self.call_kwargs,
        )
        processors = dict(self.pipe.unet.attn_processors)
        try:
            reference_latents = reference(self.spec.prompt, generator=self.generators(), output_type="latent", **kwargs).images
            t_reference_aae = self.time(lambda: reference(self.spec.prompt, generator=self.generators(), **kwargs))
        finally:
            self.pipe.unet.set_attn_processor(processors)  # diffusers' pipeline leaves its processors on every layer
        difference = (self.ours(aae)().latents.float() - reference_latents.float()).abs().max().item()
        self.row("attend_and_excite / diffusers StableDiffusionAttendAndExcitePipeline", "attend_and_excite",
                 self.time(self.ours(aae)) / t_reference_aae, "ratio", f"max latent difference {difference:.2e}; target <= 1")
        self.row("overhead of diffusers' A&E pipeline (T - T0) / T0", "attend_and_excite",
                 t_reference_aae / t_reference - 1.0, "fraction", "against diffusers' StableDiffusionPipeline")


def bench_generation(cfg: DictConfig, model_name: str, steps: int, device: torch.device) -> list[dict]:
    bench = GenerationBench(cfg, model_name, steps, device)
    t_vanilla, t_reference = bench.harness_against_diffusers()
    names = _method_names(cfg.methods)
    for name in names:
        bench.method_overhead(name, t_vanilla)
    if "attend_and_excite" in names:
        bench.attend_and_excite_against_diffusers(t_reference)
    return bench.rows


def bench_scorers(scorers: dict, device: torch.device) -> list[dict]:
    """Images per second of each scorer at its default batch size, on noise images of the demo resolution."""
    from PIL import Image

    rows = []
    generator = torch.Generator().manual_seed(0)
    for scorer_name, count in scorers.items():
        scorer_cfg = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "scorer" / f"{scorer_name}.yaml"))
        batch_size = int(scorer_cfg.get("batch_size", 32))  # as the score stage batches
        scorer = build_scorer(scorer_cfg, device)
        pixels = (torch.rand(int(count), 256, 256, 3, generator=generator) * 255).to(torch.uint8).numpy()
        items = [ScoredImage("bench", "vanilla", "vanilla", "bench", f"p{i}", 0, "a red car and a blue bowl",
                             ("car", "bowl"), Image.fromarray(p), {"status": "ok"}) for i, p in enumerate(pixels)]

        def score_all():
            scorer.reset()
            for start in range(0, len(items), batch_size):
                scorer.update(items[start : start + batch_size])

        seconds = median_seconds(score_all, 1, device)
        rows.append({"model": "-", "steps": None, "measure": "scorer throughput", "method": scorer_name,
                     "value": len(items) / seconds, "unit": "images/s", "note": f"{scorer.name}; batch {batch_size}"})
    return rows


def _plot(path: Path, table: pd.DataFrame) -> None:
    overhead = table[table.measure == "overhead (T - T0) / T0"].dropna(subset=["value"])
    figure = Figure(figsize=(7, 0.5 + 0.45 * max(1, len(overhead))))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    labels = [f"{m} ({model})" for m, model in zip(overhead.method, overhead.model)]
    axis.barh(labels, overhead.value * 100)
    axis.set_xlabel("compute overhead against vanilla (%)")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _markdown(table: pd.DataFrame, device: torch.device) -> str:
    lines = [
        "# evalkit benchmark", "",
        f"Device: {hardware(device)}. Commit: {git_commit()}. "
        f"torch {package_versions()['torch']}, diffusers {package_versions()['diffusers']}.", "",
        "All models here have random weights: ratios and overheads are meaningful (random weights time like trained "
        "ones), the images are not. On the tiny model, methods that refine until an attention threshold is met "
        "(Attend-and-Excite) run every refinement iteration, since random weights never meet it: their overhead "
        "there is an upper bound.", "",
        "| model | steps | measure | method | value | unit | note |", "|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        value = "n/a" if pd.isna(r.value) else f"{r.value:.3f}"
        lines.append(f"| {r.model} | {'' if pd.isna(r.steps) else int(r.steps)} | {r.measure} | {r.method} | {value} | {r.unit} | {r.note} |")
    return "\n".join(lines) + "\n"


def run_bench(cfg: DictConfig) -> Path:
    device = resolve_device(cfg.device)
    rows: list[dict] = []
    for entry in cfg.models:
        if device.type in entry.devices:
            print(f"bench: {entry.config} on {device} ({entry.steps} steps)", flush=True)
            rows += bench_generation(cfg, entry.config, int(entry.steps), device)
    rows += bench_scorers(dict(cfg.scorers.get(device.type, {})), device)
    table = pd.DataFrame(rows)
    out = PROJECT_ROOT / cfg.out_dir
    stem = f"bench-{device.type}"
    atomic_write_bytes(out / f"{stem}.csv", table.to_csv(index=False).encode())
    text = _markdown(table, device)
    atomic_write_bytes(out / f"{stem}.md", text.encode())
    _plot(out / f"{stem}-overhead.png", table)
    print(text)
    return out / f"{stem}.md"
