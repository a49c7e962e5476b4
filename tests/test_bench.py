"""`make bench` end to end on the tiny model with few steps: it measures what it says and writes its files.
(Times themselves are not asserted: targets are ratios the benchmark prints.)"""

import pandas as pd
from omegaconf import OmegaConf

from evalkit.bench import run_bench
from evalkit.manifest import PROJECT_ROOT


def test_bench_writes_ratios_for_the_selected_methods_and_scorers(tmp_path):
    cfg = OmegaConf.load(PROJECT_ROOT / "conf" / "bench.yaml")
    cfg.pop("hydra")
    cfg.merge_with({"device": "cpu", "out_dir": str(tmp_path), "repeats": 1,
                    "methods": ["vanilla", "composable_diffusion"],
                    "models": [{"config": "tiny", "steps": 1, "devices": ["cpu"]}], "scorers": {"cpu": {"clip_tiny": 4}}})
    report = run_bench(cfg)
    table = pd.read_csv(tmp_path / "bench-cpu.csv")
    harness = table[table.measure == "harness / diffusers StableDiffusionPipeline"].iloc[0]
    assert harness.value > 0 and "same latents: True" in harness.note
    overhead = table[table.measure == "overhead (T - T0) / T0"]
    assert list(overhead.method) == ["composable_diffusion"] and overhead.value.notna().all()
    assert set(table[table.measure == "peak generation memory"].method) == {"vanilla", "composable_diffusion"}
    assert table[table.measure == "scorer throughput"].value.iloc[0] > 0
    assert report.read_text().startswith("# evalkit benchmark") and (tmp_path / "bench-cpu-overhead.png").stat().st_size > 0


def test_shipped_config_names_each_models_devices():
    """YAML 1.1 reads a bare `on:` key as the boolean true; the devices key must survive loading."""
    models = OmegaConf.load(PROJECT_ROOT / "conf" / "bench.yaml").models
    assert [list(entry.devices) for entry in models][0] == ["cpu", "cuda"]
