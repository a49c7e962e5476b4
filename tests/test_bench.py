"""`make bench` on the tiny model at 1 step: what it measures, that every row is on disk as soon as it is measured,
that a failing part becomes a row, narrowing, bad names, and the projection arithmetic. (Times themselves are not
asserted: the targets are ratios the benchmark prints.)"""

import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from evalkit import bench
from evalkit.bench import ROW_COLUMNS, Work, project, run_bench, write_reports
from evalkit.errors import ConfigError, MissingWeightsError
from evalkit.methods.composable_diffusion import ComposableDiffusion
from evalkit.paths import PROJECT_ROOT, config_file, config_names
from tests.conftest import compose_config

CPU_TINY = ["device=cpu", "models=[tiny]", "model_runs.tiny.steps=1", "model_runs.tiny.batch_sizes=all",
            "generation_batch=2", "scoring.cpu.scorers.lpips.images=2"]


def bench_config(tmp_path, *overrides):
    """conf/bench.yaml with these overrides, composed as the command line composes it; no projections (they have a
    test of their own)."""
    cfg = compose_config([f"out_dir={tmp_path}", *CPU_TINY, *overrides], config_name="bench")
    OmegaConf.update(cfg, "reproduce.targets", {}, merge=False)
    return cfg


def rows(tmp_path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "bench-cpu.csv")


def measured(table, measure):
    return table[(table.measure == measure) & table.value.notna()]


@pytest.mark.slow
def test_bench_measures_every_figure_and_writes_its_report(tmp_path):
    cfg = bench_config(tmp_path, "methods=[vanilla,composable_diffusion]", "+official_batch.composable_diffusion=3",
                       "scorers=[clip]", "scoring.cpu.scorers.clip.images=4")
    report = run_bench(cfg)
    table = rows(tmp_path)
    assert list(table.columns) == list(ROW_COLUMNS)
    harness = measured(table, bench.HARNESS_RATIO)
    assert list(harness.batch) == [1, 2] and harness.note.str.startswith("same latents: True").all()
    diagnostics = measured(table, bench.DIAGNOSTICS_RATIO)  # recording leaves the latents as they are
    assert list(diagnostics.batch) == [1, 2] and diagnostics.note.str.startswith("max latent difference 0.0e+00").all()
    throughput = measured(table, bench.IMAGES_PER_SECOND)
    assert set(zip(throughput.method, throughput.batch)) == {
        (method, batch) for method in ("vanilla", "composable_diffusion") for batch in (1, 2, 3)}
    overhead = measured(table, bench.OVERHEAD)
    assert list(zip(overhead.method, overhead.batch)) == [("composable_diffusion", 1), ("composable_diffusion", 3)]
    assert list(measured(table, bench.SPEED_UP).method) == ["vanilla", "composable_diffusion"]
    memory = table[table.measure == bench.PEAK_MEMORY]
    assert len(memory) == 6 and (memory.note == "n/a on a CPU").all()
    assert measured(table, bench.SCORER_THROUGHPUT).value.iloc[0] > 0
    text = report.read_text()
    assert text.startswith("# evalkit benchmark") and "## tiny (1 steps)" in text
    assert "| scorer throughput | clip (clip_tiny) | 32 |" in text  # a stand-in's row says so
    assert (tmp_path / "bench-cpu-overhead.png").stat().st_size > 0
    manifest = OmegaConf.load(tmp_path / "bench-cpu.json")
    assert manifest.finished and manifest.config.methods == ["vanilla", "composable_diffusion"]


def test_narrowing_overrides_measure_only_what_they_name(tmp_path):
    run_bench(bench_config(tmp_path, "methods=[vanilla]", "batch_sizes=[1]", "scorers=[]"))
    table = rows(tmp_path)
    assert set(zip(table.measure, table.method, table.batch)) == {
        (bench.HARNESS_RATIO, "vanilla", 1), (bench.DIAGNOSTICS_RATIO, "vanilla", 1), (bench.IMAGES_PER_SECOND, "vanilla", 1),
        (bench.PEAK_MEMORY, "vanilla", 1)}


def test_profile_writes_the_top_ops_and_counts_host_synchronisations(tmp_path):
    run_bench(bench_config(tmp_path, "methods=[vanilla]", "batch_sizes=[1]", "scorers=[]", "profile=true"))
    syncs = measured(rows(tmp_path), bench.HOST_SYNCS)
    assert list(syncs.method) == ["vanilla"] and syncs.value.iloc[0] >= 0
    assert "aten::_local_scalar_dense" in syncs.note.iloc[0]
    assert "Self CPU" in (tmp_path / "profile-tiny-vanilla.txt").read_text()


@pytest.mark.slow
def test_a_failing_part_becomes_a_row_and_the_rest_runs(tmp_path, monkeypatch):
    real_build = bench.SCORERS.build

    def build_scorer(config, device):
        if config["name"] == "clip":
            raise MissingWeightsError("scorer clip: weights for ViT-B-16 are not in the local cache\nsecond line")
        return real_build(config, device)

    def out_of_memory(self, run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(bench.SCORERS, "build", build_scorer)
    monkeypatch.setattr(ComposableDiffusion, "setup", out_of_memory)
    cfg = bench_config(tmp_path, "methods=[vanilla,composable_diffusion,dense_diffusion]", "batch_sizes=[1]",
                       "scorers=[clip,lpips]", "scoring.cpu.scorers.clip.images=2")
    run_bench(cfg)
    table = rows(tmp_path)
    failures = table[table.note.fillna("").str.startswith("failed:")]
    assert list(zip(failures.measure, failures.method, failures.note)) == [
        (bench.SCORER_THROUGHPUT, "clip",
         "failed: MissingWeightsError: scorer clip: weights for ViT-B-16 are not in the local cache"),
        (bench.IMAGES_PER_SECOND, "composable_diffusion",
         "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ]
    assert failures.value.isna().all()
    # what ran before and after each failure is there
    assert set(measured(table, bench.SCORER_THROUGHPUT).method) == {"lpips"}
    assert set(measured(table, bench.IMAGES_PER_SECOND).method) == {"vanilla", "dense_diffusion"}
    assert list(measured(table, bench.OVERHEAD).method) == ["dense_diffusion"]


def test_rows_are_on_disk_when_a_later_part_is_interrupted(tmp_path, monkeypatch):
    def interrupt(self, run):
        raise KeyboardInterrupt

    monkeypatch.setattr(ComposableDiffusion, "setup", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_bench(bench_config(tmp_path, "methods=[vanilla,composable_diffusion]", "batch_sizes=[1]",
                               "scorers=[lpips]"))
    table = rows(tmp_path)
    assert set(measured(table, bench.IMAGES_PER_SECOND).method) == {"vanilla"}
    assert set(measured(table, bench.SCORER_THROUGHPUT).method) == {"lpips"}
    assert not (tmp_path / "bench-cpu.md").exists()
    report = write_reports(tmp_path / "bench-cpu.csv").read_text()  # what a killed run's CSV rebuilds
    assert "stopped before its end" in report and "| images per second | vanilla | 1 |" in report


def test_a_spent_time_budget_leaves_not_run_rows(tmp_path):
    run_bench(bench_config(tmp_path, "methods=[vanilla]", "batch_sizes=[1]", "scorers=[lpips]", "time_budget_s=0"))
    table = rows(tmp_path)
    assert table.value.isna().all() and table.note.str.startswith("not run: the time budget of 0 s").all()


@pytest.mark.parametrize("override, message", [
    ("methods=[vanilla,no_such_method]", "bench: unknown method 'no_such_method'; known: "),
    ("models=[sd99]", "bench: unknown model 'sd99'; known: sd15_random, sd2_base_random, tiny"),
    ("scorers=[clip,nope]", "bench: unknown scorer on cpu 'nope'; known: "),
    ("batch_sizes=[1,0]", "bench: every batch_sizes entry must be a positive integer, got 0"),
])
def test_a_bad_name_is_one_config_error_before_any_model_loads(tmp_path, monkeypatch, override, message):
    monkeypatch.setattr(bench, "load_pipeline", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError) as error:
        run_bench(bench_config(tmp_path, override))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.slow
def test_the_command_line_prints_a_bad_name_as_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "evalkit", "bench", "methods=[nope]", f"out_dir={tmp_path}"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("evalkit:")] == [
        "evalkit: error: bench: unknown method 'nope'; known: " + ", ".join(
            config_names("method"))]


def _table(*rows):
    return pd.DataFrame([dict(zip(ROW_COLUMNS, row)) for row in rows], columns=ROW_COLUMNS)


def test_projection_arithmetic():
    table = _table(
        ("sd2_base_random", 50, bench.IMAGES_PER_SECOND, "vanilla", 1, 0.5, "images/s", ""),
        ("sd2_base_random", 50, bench.IMAGES_PER_SECOND, "vanilla", 8, 2.0, "images/s", ""),
        ("sd2_base_random", 50, bench.IMAGES_PER_SECOND, "syngen", 1, 0.1, "images/s", ""),
        ("sd2_base_random", 50, bench.IMAGES_PER_SECOND, "syngen", 8, float("nan"), "images/s", "failed: X"),
        ("clip", None, bench.SCORER_THROUGHPUT, "clip", 32, 100.0, "images/s", ""),
        ("fid", None, bench.SCORER_THROUGHPUT, "fid", 50, 50.0, "images/s", ""),
        ("owlv2_tiny", None, bench.SCORER_THROUGHPUT, "owlv2", 16, 900.0, "images/s", ""),  # a stand-in: not used
    )
    works = [
        # batch 4 is nearer 1 than 8: 360 images at 0.5/s; batch 6 is nearer 8: 100 images at 2/s
        Work("a", "sd2_base", "sd2_base_random", "vanilla", 4, 50, 360, True, ("clip",)),
        Work("b", "sd21_base", "sd2_base_random", "vanilla", 6, 50, 100, True, ("clip", "fid")),
        # batch 8 failed: batch 1's figure, 36 images at 0.1/s
        Work("a", "sd2_base", "sd2_base_random", "syngen", 8, 50, 36, True, ("clip",)),
        Work("c", "sd2_base", "sd2_base_random", "syngen", 1, 50, 1000, False, ("fid",)),  # images reused: scored only
    ]
    hours, note = project(table, works)
    generation = 360 / 0.5 + 100 / 2.0 + 36 / 0.1
    scoring = (360 + 100 + 36) / 100.0 + (100 + 1000) / 50.0
    assert math.isclose(hours, (generation + scoring) / 3600)
    assert note.startswith("generation 0.3 h (vanilla 460 images 0.2 h, syngen 36 images 0.1 h); scoring 0.01 h")
    for substitution in ("batch 4 timed at batch 1", "batch 6 timed at batch 8", "batch 8 timed at batch 1"):
        assert substitution in note
    assert "sd21_base as sd2_base_random" in note

    hours, note = project(table, [
        Work("a", "sd2", None, "vanilla", 1, 50, 10, True, ()),
        Work("a", "sd2_base", "sd2_base_random", "conform", 1, 50, 10, True, ("owlv2",)),
        Work("a", "sd2_base", "sd2_base_random", "vanilla", 1, 25, 10, True, ()),
    ])
    assert math.isnan(hours)
    assert note == (
        "missing: a benchmarked model with sd2's architecture (no timed_as in conf/model/sd2.yaml); "
        "scorer throughput of owlv2 (full size: conf/scorer/owlv2.yaml); "
        "images per second on sd2_base_random at 50 steps of conform; "
        "images per second on sd2_base_random at 25 steps of vanilla")


def test_projection_counts_each_reproduce_target_as_the_makefile_runs_it():
    cfg = OmegaConf.load(PROJECT_ROOT / "conf" / "bench.yaml").reproduce
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    targets = re.search(r"REPRODUCE_TARGETS :=((?:.*\\\n)*.*)", makefile).group(1).replace("\\\n", " ").split()
    assert list(cfg.targets) == targets
    works = bench.target_works(cfg.targets["reproduce-ar-table1"], dict(cfg.built_dataset_sizes))
    batch = config_file("experiment", "ar_table1").batch_size
    assert [(w.method, w.images, w.timed_as, w.batch, w.generated, w.scorers)
            for w in works if w.run.endswith("attend_and_excite")] == [
        *((method, 276 * 10, "sd2_base_random", batch, True, ("clip", "owlv2", "lpips"))
          for method in ("vanilla", "composable_diffusion", "syngen", "attend_and_excite", "attention_regulation")),
        # best_of_n: four vanilla images per kept image, each rated by its verifier, then the kept ones scored
        ("vanilla", 4 * 276 * 10, "sd2_base_random", batch, True, ("owlv2",)),
        ("vanilla", 276 * 10, "sd2_base_random", batch, False, ("clip", "owlv2", "lpips"))]
    fid = bench.target_works(cfg.targets["reproduce-sepen-fid"], dict(cfg.built_dataset_sizes))
    assert [(w.method, w.images, w.timed_as, w.generated) for w in fid] == [
        ("vanilla", 3000, "sd15_random", True), ("vanilla", 3000, "sd15_random", True)]  # separate_and_enhance samples as vanilla


def test_shipped_config_names_each_models_devices():
    """YAML 1.1 reads a bare `on:` key as the boolean true; the devices key must survive loading."""
    model_runs = OmegaConf.load(PROJECT_ROOT / "conf" / "bench.yaml").model_runs
    assert {name: list(entry.devices) for name, entry in model_runs.items()} == {
        "sd2_base_random": ["cuda"], "sd15_random": ["cuda"], "tiny": ["cpu", "cuda"]}
