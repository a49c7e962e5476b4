"""The command line as a user meets it: one-line errors, multirun, and generate -> score -> report."""

import os
import subprocess
import sys

import pytest

from evalkit.paths import PROJECT_ROOT
from tests.conftest import compose_config

TINY = ["model=tiny", "scorer=[clip_tiny,overhead]", "sampling.num_inference_steps=2"]


def evalkit(*args, tmp_path, env=None):
    places = [f"store_root={tmp_path / 'store'}", f"runs_root={tmp_path / 'runs'}", f"report_dir={tmp_path / 'report'}"]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "evalkit", *args, *places], cwd=PROJECT_ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_missing_weights_offline_is_one_line(tmp_path):
    result = evalkit("generate", "model=sd15", tmp_path=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("evalkit: error:")]
    assert len(error) == 1
    assert "runwayml/stable-diffusion-v1-5" in error[0] and "hf download" in error[0]


@pytest.mark.slow
def test_bad_configuration_fails_before_generation(tmp_path):
    result = evalkit("run", *TINY, "methods=[vanilla,no_such_method]", tmp_path=tmp_path)
    assert result.returncode == 2 and "unknown method 'no_such_method'" in result.stderr
    assert not (tmp_path / "store").exists()
    result = evalkit("generate", *TINY, "seeds=[0,x]", tmp_path=tmp_path)
    assert result.returncode == 2 and "seeds must be a list of integers" in result.stderr


@pytest.mark.slow
def test_multirun_over_seeds_then_score_and_report(tmp_path):
    result = evalkit("generate", "--multirun", *TINY, "limit=1", "seeds=[0],[1]", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    images = sorted(p.name for p in (tmp_path / "store").rglob("*.png"))
    assert images == ["0.png", "1.png"]
    assert evalkit("score", *TINY, tmp_path=tmp_path).returncode == 0
    result = evalkit("report", *TINY, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "report" / "index.html").read_text()
    assert "clip_full" in html and "vanilla" in html
    assert (tmp_path / "report" / "README.md").is_file()


@pytest.mark.slow
def test_lpips_and_fid_run_resume_in_a_multirun_and_reach_the_report(tmp_path):
    tiny = ["model=tiny", "sampling.num_inference_steps=2", "limit=1", "seeds=[0,1]"]
    result = evalkit("run", *tiny, "methods=[vanilla,composable_diffusion]", "scorer=[lpips_tiny,fid_tiny]",
                     tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    scores = tmp_path / "runs" / "default" / "scores"
    lpips_tables = sorted((scores / "lpips").glob("*.csv"))
    assert len(lpips_tables) == 2 and len(list((scores / "fid").glob("*.csv"))) == 2
    assert len(list((tmp_path / "fid_statistics").glob("*.npz"))) == 1  # next to the store
    written = [table.stat().st_mtime_ns for table in lpips_tables]
    for table in (scores / "fid").glob("*.csv"):
        table.unlink()
    result = evalkit("score", "--multirun", *tiny, "scorer=lpips_tiny,fid_tiny", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [table.stat().st_mtime_ns for table in lpips_tables] == written  # finished tables are kept
    assert len(list((scores / "fid").glob("*.csv"))) == 2  # the fid job of the sweep scored again
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "lpips_vs_vanilla ↓" in readme and "## Set-level results" in readme and "| fid ↓ |" in readme


@pytest.mark.slow
def test_bad_places_and_limits_are_one_line_before_any_model_loads(tmp_path):
    result = evalkit("generate", *TINY, "limit=0", tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "evalkit: error: limit must be at least 1, or null for every prompt; got 0"
    (tmp_path / "store").write_text("a file where the store's folder would go")
    result = evalkit("generate", *TINY, tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"evalkit: error: store_root {tmp_path / 'store'} cannot be created: {tmp_path / 'store'} is a file"


@pytest.mark.slow
def test_hydras_own_flags_are_not_taken_for_overrides(tmp_path):
    shown = evalkit("generate", "--cfg", "job", *TINY, tmp_path=tmp_path)
    assert shown.returncode == 0 and "num_inference_steps: 2" in shown.stdout, shown.stderr
    informed = evalkit("generate", "--info", "defaults", *TINY, tmp_path=tmp_path)
    assert informed.returncode == 0 and "model/tiny" in informed.stdout, informed.stderr
    assert not (tmp_path / "store").exists()


def test_model_overrides_survive_the_stand_ins():
    from evalkit.stand_ins import with_stand_ins

    overrides = ["stand_ins=true", "model=sd15", "model.num_inference_steps=3"]
    cfg = with_stand_ins(compose_config(overrides), overrides)
    assert cfg.model.name == "tiny" and cfg.model.num_inference_steps == 3 and cfg.sampling.num_inference_steps == 3


@pytest.mark.slow
def test_a_headline_metric_no_scorer_gives_is_one_line_before_generation(tmp_path):
    result = evalkit("run", *TINY, "headline_metrics=[clip_full,detection_rate]", tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "headline_metrics: no configured scorer gives 'detection_rate'; choose from" in result.stderr
    assert not (tmp_path / "store").exists()
