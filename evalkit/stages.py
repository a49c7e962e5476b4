"""The first two stages of a run, each reading only what the previous one wrote, so either can be re-run alone and
re-running a killed stage resumes it: generate (images into the store) and score (per-image rows). The third,
report, is evalkit/reporting/stage.py; nothing here depends on the reporting layer."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from evalkit.errors import ConfigError, StoreError
from evalkit.manifest import config_hash, git_commit, hardware, package_versions
from evalkit.models.loading import (
    load_pipeline,
    model_revision,
    model_source,
    resolve_device,
)
from evalkit.paths import project_path
from evalkit.prompts import PromptSpec, TokenIndexer, file_sha256, load_prompt_set
from evalkit.records import SCORE_COLUMNS, GenerationManifest, ScoringManifest
from evalkit.sampling.diagnostics import missing_resolution
from evalkit.sampling.loop import SamplingSettings, sample
from evalkit.sampling.method import METHODS
from evalkit.scoring.base import SCORERS, ScoredImage, ScoredSet, preflight_scorer
from evalkit.sharding import Shard, generation_batches, image_name
from evalkit.store import ImageKey, ImageStore, atomic_write_bytes, atomic_write_json

log = logging.getLogger("evalkit")


def run_dir(cfg: DictConfig) -> Path:
    return project_path(cfg.runs_root) / cfg.experiment_name


def experiment_seeds(cfg: DictConfig) -> list[int]:
    seeds = OmegaConf.to_container(cfg.seeds) if OmegaConf.is_list(cfg.seeds) else [cfg.seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a list of integers, got {seeds!r}")
    return seeds


def sampling_settings(cfg: DictConfig) -> SamplingSettings:
    s = cfg.sampling
    return SamplingSettings(int(s.num_inference_steps), float(s.guidance_scale), int(s.resolution), int(s.resolution), float(s.eta))


def variant_of(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """`<method>@<hash>`: the hash covers everything that changes the images of a method on a model."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    if method.get("checkpoint"):  # a method that loads finetuned weights: its images change with the file's content
        method["checkpoint_sha256"] = file_sha256(project_path(method["checkpoint"]))
    if method.get("verifier") is not None:  # best_of_n: the verifier's settings decide which images it keeps
        method["verifier_config"] = OmegaConf.to_container(cfg.scorers[method["verifier"]], resolve=True)
    identity = {
        "method": method,
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        "model": {"name": cfg.model.name, "revision": model_revision(cfg.model), "seed": cfg.model.get("seed")},
    }
    return f"{cfg.method.name}@{config_hash(identity)}", identity


def _manifest_path(cfg: DictConfig, model: str, variant: str, dataset: str) -> Path:
    return run_dir(cfg) / "manifests" / f"{model}__{variant}__{dataset}.json"


def read_manifests(cfg: DictConfig) -> list[GenerationManifest]:
    """The generation manifests of the experiment (a StoreError for one that lacks a key or has one unknown)."""
    folder = run_dir(cfg) / "manifests"
    manifests = [GenerationManifest.read(p) for p in sorted(folder.glob("*.json"))]
    if not manifests:
        raise ConfigError(f"no generation has run for experiment {cfg.experiment_name!r} (nothing in {folder}); run `python -m evalkit generate` first")
    return manifests


def _check_creatable(folder: Path, key: str) -> None:
    """Raise ConfigError unless `folder` is, or can be made as, a writable folder (nothing is created here)."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key} {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {folder} cannot be created: {existing} is not writable")


def generate(cfg: DictConfig) -> None:
    """Generate every (prompt, seed) of this method that the store does not hold yet (this shard's share)."""
    seeds = experiment_seeds(cfg)
    shard = Shard.parse(cfg.shard)
    batch = int(cfg.batch_size)
    if batch < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch}")
    dataset_path = project_path(cfg.dataset.path)
    if not dataset_path.is_file() and cfg.dataset.get("build"):
        raise ConfigError(f"dataset {cfg.dataset.name}: {dataset_path} does not exist; build it with `{cfg.dataset.build}`")
    specs = load_prompt_set(dataset_path, cfg.limit, cfg.dataset.get("exclude", ()))
    for scorer_cfg in cfg.scorers.values():  # what the scorers need of a prompt is checked before any model loads
        preflight_scorer(OmegaConf.to_container(scorer_cfg, resolve=True), list(cfg.methods), specs)
    method = METHODS.build(OmegaConf.to_container(cfg.method, resolve=True))
    method.configure_for_experiment(OmegaConf.to_container(cfg.scorers, resolve=True))
    store = ImageStore(project_path(cfg.store_root))
    _check_creatable(store.root, "store_root")  # before any model loads, not when the first image is written
    settings = sampling_settings(cfg)
    device = resolve_device(cfg.device)
    # scheduler_options: only experiments that set them (a paper's scheduler on an older diffusers) have the key, so
    # every other variant's hash stays as it was.
    options = cfg.sampling.get("scheduler_options")
    pipe = load_pipeline(cfg.model, device, cfg.sampling.scheduler, None if options is None else dict(options))
    indexer = TokenIndexer(pipe.tokenizer)
    diagnostics_resolution, diagnostics_skipped = _attention_diagnostics(cfg, pipe, settings)
    for spec in specs:  # every prompt's annotations are checked before any image is generated
        method.preflight(spec, indexer)
        if diagnostics_resolution is not None and spec.subjects:
            indexer.subject_indices(spec)  # the diagnostics find each subject's tokens

    variant, identity = variant_of(cfg)
    model, dataset = cfg.model.name, cfg.dataset.name
    versions, commit = package_versions(), git_commit()
    manifest = GenerationManifest(
        experiment=cfg.experiment_name, model=model, method=method.name, variant=variant, dataset=dataset,
        dataset_path=str(cfg.dataset.path), dataset_version=cfg.dataset.version,
        dataset_sha256=file_sha256(dataset_path), model_source=model_source(cfg.model),
        model_revision=model_revision(cfg.model), seeds=seeds, limit=cfg.limit,
        config=OmegaConf.to_container(cfg, resolve=True), identity=identity,
        versions=versions, git_commit=commit, hardware=hardware(device),
    )
    atomic_write_json(_manifest_path(cfg, model, variant, dataset), manifest.to_dict())

    # This shard's batches (evalkit/sharding.py). The unit of work is a batch as an uninterrupted run forms it: an
    # image's last bits depend on the size of its batch (BLAS), so a resumed run regenerates each unfinished batch
    # whole rather than batching what is missing.
    work = shard.deal(generation_batches(specs, seeds, batch))
    todo: list[tuple[PromptSpec, list[int]]] = []
    damaged = []
    for spec, batch_seeds in work:
        finished = True
        for seed in batch_seeds:
            key = ImageKey(model, variant, dataset, spec.id, seed)
            store.remove_temporary_files(key)
            problem = store.damage(key)
            if problem is not None:
                damaged.append(problem)
            finished = finished and problem is None and store.record_path(key).is_file()
        if not finished:
            todo.append((spec, batch_seeds))
    if damaged:
        log.warning("regenerating %d damaged items of the store:\n  %s", len(damaged), "\n  ".join(damaged))
    to_generate = sum(len(chunk) for _, chunk in todo)
    log.info("%s on %s/%s, shard %s: %d of %d images to generate", variant, model, dataset, shard, to_generate,
             sum(len(batch_seeds) for _, batch_seeds in work))
    if not todo:
        return

    # Warm-up outside the timings: first calls pay for lazy initialisation and kernel selection.
    warm = SamplingSettings(2, settings.guidance_scale, settings.height, settings.width, settings.eta)
    sample(pipe, METHODS.build({"name": "vanilla"}), todo[0][0], seeds[:1], warm, indexer)

    base_record = {
        "model": model, "model_revision": model_revision(cfg.model), "method": method.name, "variant": variant,
        "method_config": identity["method"], "sampling": identity["sampling"], "dataset": dataset,
        "device": str(device), "dtype": str(pipe.unet.dtype), "git_commit": commit, "versions": versions,
        "random_weights": bool(cfg.model.get("random_weights", False)),
    }
    with tqdm(total=to_generate, desc=f"generate {variant}", unit="img") as progress:
        for spec, chunk in todo:
            sample_call = partial(sample, pipe, method, spec, settings=settings, indexer=indexer,
                                  cuda_graphs=bool(cfg.cuda_graphs), attention_diagnostics=diagnostics_resolution)
            result = method.sample_images(sample_call, spec, chunk)
            for j, (seed, image, failed) in enumerate(zip(chunk, result.images, result.failed_step)):
                record = dict(
                    base_record, prompt_id=spec.id, prompt=spec.prompt, seed=seed,
                    status="ok" if failed is None else "failed", failed_step=failed,
                    seconds_per_image=result.seconds / len(chunk), batch_size=len(chunk),
                    batch_seconds=result.seconds, peak_memory_bytes=result.peak_memory_bytes, method_notes=result.notes,
                    attention_diagnostics=None if result.attention_diagnostics is None else result.attention_diagnostics[j],
                    attention_diagnostics_skipped=diagnostics_skipped or result.attention_diagnostics_skipped,
                    selection=None if result.selection is None else result.selection[j],
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                )
                store.put(ImageKey(model, variant, dataset, spec.id, seed), image if failed is None else None, record)
            progress.update(len(chunk))


def _attention_diagnostics(cfg: DictConfig, pipe, settings: SamplingSettings) -> tuple[int | None, str | None]:
    """The map resolution whose attention diagnostics generation records (None: none) and why none: `record` is
    auto (where the model has such maps), true (an error where it has none) or false."""
    record, resolution = cfg.attention_diagnostics.record, int(cfg.attention_diagnostics.resolution)
    if record not in (True, False, "auto"):
        raise ConfigError(f"attention_diagnostics.record must be auto, true or false, got {record!r}")
    if record is False:
        return None, "off (attention_diagnostics.record=false)"
    missing = missing_resolution(pipe.unet, settings.height // pipe.vae_scale_factor, resolution)
    if missing is not None and record is True:
        raise ConfigError(f"attention_diagnostics.record=true, but {missing}; set attention_diagnostics.resolution "
                          "to one of them, or attention_diagnostics.record=auto")
    return (None, missing) if missing is not None else (resolution, None)


def scores_folder(cfg: DictConfig, scorer_key: str) -> Path:
    return run_dir(cfg) / "scores" / scorer_key


def scores_stem(manifest: GenerationManifest) -> str:
    return f"{manifest.model}__{manifest.variant}__{manifest.dataset}"


def _table_is_current(path: Path, scorer_name: str, wanted: list[tuple[str, int]]) -> bool:
    """Whether the scores table at `path` was made by this scorer from every wanted (prompt_id, seed): per-image
    rows cover them all, or a set-level table (rows without prompt_id) counts them all in `n_images`."""
    done = pd.read_csv(path, dtype={"prompt_id": str})
    if done.empty:
        return not wanted
    if set(done["scorer"]) != {scorer_name}:
        return False
    if done["prompt_id"].isna().any():
        return bool((done["n_images"] == len(wanted)).all())
    return sorted(set(zip(done.prompt_id, done.seed))) == wanted


def _scoring_manifest_path(cfg: DictConfig, scorer_key: str) -> Path:
    return run_dir(cfg) / "scores" / scorer_key / "manifest.json"


def read_scoring_manifests(cfg: DictConfig) -> list[ScoringManifest]:
    """The manifests of the configured scorers that have scored (the checkpoints behind the numbers)."""
    paths = [_scoring_manifest_path(cfg, key) for key in cfg.scorers]
    return [ScoringManifest.read(path) for path in paths if path.is_file()]


def scoreable_records(store: ImageStore, manifest: GenerationManifest, needs_images: bool) -> tuple[dict[ImageKey, dict], list[str]]:
    """The records a scorer gets for one generated set (with images: the successful ones), and the damaged items of
    the set by path (unreadable records, images without records)."""
    records, damaged = {}, []
    for key in store.keys(manifest.model, manifest.variant, manifest.dataset):
        try:
            record = store.read_record(key)
        except StoreError as error:
            damaged.append(str(error))
            continue
        if record.get("status") == "ok" or not needs_images:
            records[key] = record
    orphans = store.orphan_images(manifest.model, manifest.variant, manifest.dataset)
    damaged += [f"{path}: image without its record" for path in orphans]
    return records, damaged


def _warn_damaged(scorer_key: str, damaged: list[str]) -> None:
    if damaged:
        log.warning("%s: skipped %d damaged items of the store (re-run generate to regenerate them):\n  %s",
                    scorer_key, len(damaged), "\n  ".join(damaged))


class _StoredItems:
    """One set's items for a scorer, each image read from the store only when the scorer reaches it (a set's
    images are never all in memory); an image that cannot be read is skipped and its error added to `damaged`."""

    def __init__(self, store: ImageStore, records: dict[ImageKey, dict], specs: dict[str, PromptSpec],
                 needs_images: bool, damaged: list[str]):
        self.store, self.records, self.specs, self.needs_images, self.damaged = store, records, specs, needs_images, damaged

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ScoredImage]:
        for key, record in self.records.items():
            image = None
            if self.needs_images:
                try:
                    image = self.store.read_image(key)
                except StoreError as error:
                    self.damaged.append(str(error))
                    continue
            spec = self.specs[key.prompt_id]
            yield ScoredImage(key.model, key.method, key.variant, key.dataset, key.prompt_id, key.seed, spec.prompt,
                              spec.subjects, image, record)


def score(cfg: DictConfig) -> None:
    """Score every generated variant of the experiment with every configured scorer (this shard's share: its images,
    or for a set-level scorer its whole sets; evalkit/sharding.py); finished tables are kept. Damaged store items
    are skipped and listed by path (the next `generate` regenerates them)."""
    shard = Shard.parse(cfg.shard)
    store = ImageStore(project_path(cfg.store_root))
    device = resolve_device(cfg.device)
    manifests = read_manifests(cfg)
    versions, commit = package_versions(), git_commit()
    for scorer_key, scorer_cfg in cfg.scorers.items():
        config = OmegaConf.to_container(scorer_cfg, resolve=True)
        scorer = SCORERS.build(config, device)
        scoring = ScoringManifest(experiment=cfg.experiment_name, scorer_key=scorer_key, scorer=scorer.provenance,
                                  config=config, versions=versions, git_commit=commit, hardware=hardware(device))
        atomic_write_json(_scoring_manifest_path(cfg, scorer_key), scoring.to_dict())
        for manifest in manifests:
            records, damaged = scoreable_records(store, manifest, scorer.needs_images)
            if scorer.set_level:
                if not shard.owns(f"{scorer_key}/{scores_stem(manifest)}"):
                    continue
                out = scores_folder(cfg, scorer_key) / f"{scores_stem(manifest)}.csv"
            else:
                records = {key: record for key, record in records.items() if shard.owns(image_name(key.prompt_id, key.seed))}
                out = scores_folder(cfg, scorer_key) / f"{scores_stem(manifest)}{shard.part_suffix}.csv"
            wanted = sorted((k.prompt_id, k.seed) for k in records)
            if out.is_file() and _table_is_current(out, scorer.provenance, wanted):
                _warn_damaged(scorer_key, damaged)
                continue
            specs = {s.id: s for s in load_prompt_set(project_path(manifest.dataset_path))}
            scorer.reset()
            scorer.begin_set(ScoredSet(manifest, manifests, store))
            scorer.update(_StoredItems(store, records, specs, scorer.needs_images, damaged))  # it batches them
            _warn_damaged(scorer_key, damaged)
            computed = scorer.compute()
            # No images (all failed, or none in this shard): the empty table still records that the part ran.
            rows = pd.DataFrame(computed) if computed else pd.DataFrame(columns=SCORE_COLUMNS)
            atomic_write_bytes(out, rows.to_csv(index=False).encode())
