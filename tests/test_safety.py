"""Record and safety: safetensors only, no remote code, no unpickling of code at run time, offline errors that
name the missing model, escaped user text in the report, manifests in the report."""

import ast
import hashlib
import json
import os
import pathlib
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from evalkit import stages
from evalkit.errors import UnsafeWeightsError
from evalkit.manifest import git_commit
from evalkit.paths import PROJECT_ROOT
from evalkit.reporting import stage as report_stage
from evalkit.scoring.lpips import LpipsScorer
from evalkit.scoring.overhead import OverheadScorer
from tests.conftest import compose_config

SOURCES = sorted([*(PROJECT_ROOT / "evalkit").rglob("*.py"), *(PROJECT_ROOT / "methods").rglob("*.py")])
# from_pretrained of these loads no weights (tokenizers, processors, scheduler configs)
WEIGHTLESS = ("Tokenizer", "Processor", "ProcessorPil", "Scheduler")


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, node.func


def keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def test_weights_load_from_safetensors_only_and_never_run_remote_or_pickled_code():
    assert len(SOURCES) > 20
    problems = []
    for path in SOURCES:
        text = path.read_text()
        where = path.relative_to(PROJECT_ROOT)
        if "trust_remote_code" in text:
            problems.append(f"{where}: trust_remote_code")
        for banned in ("pickle.load", "import dill", "import joblib", "allow_pickle=True"):  # np.load: no pickle by default
            if banned in text:
                problems.append(f"{where}: {banned}")
        for call, func in calls(ast.parse(text)):
            owner = ast.unparse(func.value)
            if func.attr == "from_pretrained" and not owner.endswith(WEIGHTLESS):
                if not keyword_is_true(call, "use_safetensors"):
                    problems.append(f"{where}:{call.lineno}: {owner}.from_pretrained without use_safetensors=True")
            if func.attr == "load" and owner == "torch" and not keyword_is_true(call, "weights_only"):
                problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
    assert problems == []


class WritesAFile:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_torch_hub_checkpoints_load_weights_only(tmp_path, monkeypatch):
    """torchvision loads its ImageNet weights with full unpickling by default; a tampered cached file must be
    refused, without running its code."""
    marker = tmp_path / "code-ran"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"features.0.weight": WritesAFile(marker)}, checkpoints / "alexnet-owt-7be5be79.pth")
    with pytest.raises(UnsafeWeightsError, match="scorer lpips .alex.: a checkpoint holds more than weights"):
        LpipsScorer(torch.device("cpu"), net="alex")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is only on while loading


OFFLINE_LOADERS = """
import sys, torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from evalkit.errors import MissingWeightsError
from evalkit.manifest import git_commit
from evalkit.paths import PROJECT_ROOT
from evalkit.scoring.overhead import OverheadScorer
from evalkit.models.loading import load_pipeline
from evalkit.scoring.base import SCORERS

with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
    cfg = compose("config", overrides=["model=sd14", "scorer=[clip,owlv2,text_similarity,tifa,lpips,fid]",
                                       "scorers.fid.reference_dir=" + sys.argv[1]])
loaders = {"sd14": lambda: load_pipeline(cfg.model, torch.device("cpu"))}
for key, scorer in cfg.scorers.items():
    loaders[key] = lambda scorer=scorer: SCORERS.build(OmegaConf.to_container(scorer, resolve=True), torch.device("cpu"))
for key, load in loaders.items():
    try:
        load()
        print(key, "LOADED")
    except MissingWeightsError as error:
        print(key, str(error).replace(chr(10), " | "))
"""


@pytest.mark.slow
def test_offline_without_weights_every_model_is_one_line_naming_it_and_how_to_get_it(tmp_path):
    references = tmp_path / "real"
    references.mkdir()
    for index in range(2):
        from PIL import Image

        Image.new("RGB", (8, 8), (index, 0, 0)).save(references / f"{index}.png")
    unreachable = "http://127.0.0.1:9"  # urllib's downloads (torch hub) fail at once, as offline
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               https_proxy=unreachable, http_proxy=unreachable, HTTPS_PROXY=unreachable, HTTP_PROXY=unreachable,
               PYTHONPATH=str(PROJECT_ROOT))
    result = subprocess.run([sys.executable, "-c", OFFLINE_LOADERS, str(references)], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    expected = {
        "sd14": ["CompVis/stable-diffusion-v1-4", "hf download CompVis/stable-diffusion-v1-4 --revision 133a221"],
        "clip": ["ViT-B-16/openai", "hf download timm/vit_base_patch16_clip_224.openai"],
        "owlv2": ["google/owlv2-base-patch16-ensemble", "hf download google/owlv2-base-patch16-ensemble"],
        "text_similarity": ["Salesforce/blip-image-captioning-base", "hf download"],
        "tifa": ["Salesforce/blip-vqa-capfilt-large", "hf download"],
        "lpips": ["alexnet-owt-7be5be79.pth", "download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"],
        "fid": ["pt_inception-2015-12-05-6726825d.pth", "download https://github.com/mseitzer/pytorch-fid/releases"],
    }
    assert sorted(lines) == sorted(expected)
    for key, words in expected.items():
        assert all(word in lines[key] for word in words), (key, lines[key])
        assert " | " not in lines[key]  # one line


HOSTILE = '<script>alert(1)</script> & "x"'


def test_report_escapes_user_text_and_shows_every_manifest(tmp_path):
    prompts = tmp_path / "hostile.jsonl"
    prompts.write_text(json.dumps({"id": "hostile", "prompt": HOSTILE}) + "\n")
    cfg = compose_config([
        "model=tiny", "scorer=[overhead]", "sampling.num_inference_steps=2", "sampling.resolution=64",
        "seeds=[0]", f"dataset.path={prompts}", "experiment_name=hostile",
        "title='<img src=x onerror=alert(2)> title'", "notice='<b>notice</b> & more'",
        f"store_root={tmp_path / 'store'}", f"runs_root={tmp_path / 'runs'}", f"report_dir={tmp_path / 'report'}",
    ])
    stages.generate(cfg)
    stages.score(cfg)
    page = report_stage.report(cfg).read_text()
    for raw in ("<script>", "<img src=x", "<b>notice"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;x&quot;" in page  # the grid caption
    assert "&lt;img src=x onerror=alert(2)&gt; title" in page and "&lt;b&gt;notice&lt;/b&gt; &amp; more" in page
    variant, _ = stages.variant_of(cfg)
    assert f"generation: tiny / {variant} / demo" in page and "scoring: overhead (" in page
    manifests = [json.loads(path.read_text()) for path in (tmp_path / "runs").rglob("manifest*/*.json")]
    manifests += [json.loads(path.read_text()) for path in (tmp_path / "runs").rglob("scores/*/manifest.json")]
    generation, scoring = sorted(manifests, key=lambda manifest: manifest["stage"])
    assert generation["dataset_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert generation["config"]["title"] == "<img src=x onerror=alert(2)> title"  # the resolved config
    assert scoring["scorer"] == OverheadScorer.provenance and scoring["config"] == {"name": "overhead"}
    for manifest in (generation, scoring):
        assert manifest["versions"]["torch"] == metadata.version("torch") and manifest["hardware"]["device"] == "cpu"
        assert manifest["git_commit"] == git_commit()
