"""Scaling out: shards that together are exactly the unsharded run, a sweep through submitit's local executor, one
GPU per parallel job, and score/report over partial work."""

import os
import shutil
import subprocess
import sys
from itertools import product

import pandas as pd
import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from evalkit import stages
from evalkit.errors import ConfigError
from evalkit.models import loading
from evalkit.models.loading import multirun_job_number, pick_device, resolve_device
from evalkit.paths import PROJECT_ROOT
from evalkit.reporting import stage as report_stage
from evalkit.sharding import Shard, generation_batches, image_name
from tests.conftest import compose_config

# One prompt, seeds 0-2 in batches of 2: shard 0/2 gets the batch (0, 1), shard 1/2 the batch (2).
TINY = ["model=tiny", "scorer=[overhead]", "limit=1", "seeds=[0,1,2]", "batch_size=2", "sampling.num_inference_steps=2"]


@pytest.mark.parametrize("n", range(1, 8))
def test_generation_shards_partition_the_work_and_keep_batches_whole(n):
    prompts = [f"p{k}" for k in range(5)]
    for seeds, batch_size in product(([0], [3, 1, 2], list(range(7))), (1, 2, 4)):
        batches = generation_batches(prompts, seeds, batch_size)
        shares = [Shard(i, n).deal(batches) for i in range(n)]
        dealt = [batch for share in shares for batch in share]
        assert sorted(dealt) == sorted(batches) and len(dealt) == len(batches)  # each batch in exactly one shard
        items = sorted((prompt, seed) for prompt, batch_seeds in dealt for seed in batch_seeds)
        assert items == sorted(product(prompts, seeds))  # the union is the unsharded (prompt, seed) set
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(len(batch_seeds) <= batch_size for _, batch_seeds in batches)


@pytest.mark.parametrize("n", range(1, 8))
def test_every_image_and_table_belongs_to_exactly_one_scoring_shard(n):
    names = [image_name(f"prompt-{p}", seed) for p in range(20) for seed in range(5)] + ["fid/tiny__vanilla@1__demo"]
    for name in names:
        assert sum(Shard(i, n).owns(name) for i in range(n)) == 1
    if n > 1:  # the hash spreads images: no shard is empty on 101 names
        assert all(any(Shard(i, n).owns(name) for name in names) for i in range(n))


def test_shard_spelling():
    assert Shard.parse("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    for bad in ("1", "a/b", "2/2", "-1/3"):
        with pytest.raises(ConfigError, match="shard"):
            Shard.parse(bad)
    assert Shard(1, 4).part_suffix == ".shard-1-of-4" and Shard(0, 1).part_suffix == ""
    assert Shard.of_part("tiny__vanilla@ab__demo.shard-1-of-4") == ("tiny__vanilla@ab__demo", Shard(1, 4))
    assert Shard.of_part("tiny__vanilla@ab__demo") == ("tiny__vanilla@ab__demo", Shard(0, 1))


def test_auto_device_gives_each_multirun_job_its_own_gpu():
    assert pick_device("auto", 0, 3) == torch.device("cpu")
    assert pick_device("auto", 2, None) == torch.device("cuda", 0)
    assert [pick_device("auto", 3, job).index for job in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert pick_device("auto", 1, 5) == torch.device("cuda", 0)  # SLURM: the job sees only its own GPU
    assert pick_device("cuda:1", 2, 0) == torch.device("cuda", 1)  # explicit wins over the job number
    assert pick_device("cpu", 4, 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="device cuda:2: this machine has 2 visible GPUs"):
        pick_device("cuda:2", 2, None)
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        pick_device("gpu0", 1, None)


def test_resolve_device_reads_the_hydra_job_number(monkeypatch):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading.torch.cuda, "device_count", lambda: 4)
    assert multirun_job_number() is None and resolve_device("auto") == torch.device("cuda", 0)
    try:
        for mode, expected in (("MULTIRUN", 2), ("RUN", 0)):
            cfg = compose_config([f"hydra.mode={mode}", "hydra.job.num=6"], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            assert resolve_device("auto") == torch.device("cuda", expected)
    finally:
        HydraConfig.instance().cfg = None


def _evalkit(*args, tmp_path):
    places = [f"store_root={tmp_path / 'store'}", f"runs_root={tmp_path / 'runs'}", f"report_dir={tmp_path / 'report'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-m", "evalkit", *args, *places], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _pngs(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """The tiny run twice: unsharded, and as shards 0/2 and 1/2 through submitit's local executor."""
    whole, sharded = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("sharded")
    result = _evalkit("generate", *TINY, tmp_path=whole)
    assert result.returncode == 0, result.stderr
    result = _evalkit("generate", "--multirun", "hydra/launcher=submitit_local", *TINY, "shard=0/2,1/2",
                      tmp_path=sharded)
    assert result.returncode == 0, result.stderr
    return whole, sharded


@pytest.mark.slow
def test_submitit_sweep_of_shards_gives_the_unsharded_images_bitwise(sharded_run):
    whole, sharded = sharded_run
    assert len(list(sharded.glob("runs/default/hydra/multirun-*/.submitit/*/*_result.pkl"))) == 2  # two jobs ran
    images = _pngs(sharded / "store")
    assert sorted(path.rsplit("/", 1)[1] for path in images) == ["0.png", "1.png", "2.png"]
    assert images == _pngs(whole / "store")


def _config(root, *overrides):
    return compose_config([*TINY, f"store_root={root / 'store'}", f"runs_root={root / 'runs'}",
                           f"report_dir={root / 'report'}", "scorer=[overhead,fid_tiny]", *overrides])


@pytest.mark.slow
def test_scoring_shards_assemble_to_the_unsharded_tables_and_report_says_what_is_missing(sharded_run, caplog):
    whole, _ = sharded_run
    stages.score(_config(whole, "experiment_name=default", "shard=1/2"))
    scores = whole / "runs" / "default" / "scores"
    parts = sorted(path.name for path in (scores / "overhead").glob("*.csv"))
    assert len(parts) == 1 and parts[0].endswith(".shard-1-of-2.csv")
    fid_in_shard_1 = Shard(1, 2).owns(f"fid/{parts[0].split('.shard')[0]}")
    assert len(list((scores / "fid").glob("*.csv"))) == int(fid_in_shard_1)
    owned = sum(Shard(1, 2).owns(image_name("animals-cat-dog", seed)) for seed in range(3))

    report_stage.report(_config(whole, "experiment_name=default", "seeds=[0,1,2,3]"))
    readme = (whole / "report" / "README.md").read_text()
    missing = readme.split("## Missing", 1)[1].split("\n## ", 1)[0]
    assert f"| score overhead | {3 - owned} of 3 | " in missing and "shard parts not written: 0/2" in missing
    assert "| generate | 1 of 4 | animals-cat-dog seed 3 |" in missing
    assert ("| score fid |" in missing) != fid_in_shard_1
    assert "missing: score overhead" in caplog.text and "missing: generate" in caplog.text

    stages.score(_config(whole, "experiment_name=default", "shard=0/2"))
    report_stage.report(_config(whole, "experiment_name=default"))
    assert "## Missing" not in (whole / "report" / "README.md").read_text()

    # The same sets scored unsharded, in another experiment with the same manifests: the same rows.
    shutil.copytree(whole / "runs" / "default" / "manifests", whole / "runs" / "unsharded" / "manifests")
    stages.score(_config(whole, "experiment_name=unsharded"))
    for scorer in ("overhead", "fid"):
        sharded_rows = pd.concat(pd.read_csv(path) for path in (scores / scorer).glob("*.csv"))
        unsharded_rows = pd.concat(pd.read_csv(path) for path in (whole / "runs" / "unsharded" / "scores" / scorer).glob("*.csv"))
        key = ["prompt_id", "seed", "metric"]
        pd.testing.assert_frame_equal(sharded_rows.sort_values(key).reset_index(drop=True),
                                      unsharded_rows.sort_values(key).reset_index(drop=True))
