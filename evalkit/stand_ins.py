"""Run any experiment on the tiny random-weight stand-ins (`stand_ins=true`, `make reproduce-* MODEL=tiny`).

Every checkpoint the experiment needs is replaced by its tiny seeded stand-in, built offline: the diffusion model
by `conf/model/tiny.yaml`, each scorer `<name>` by `conf/scorer/<name>_tiny.yaml`, and a method with finetuned
weights by `conf/method/<name>_tiny.yaml` (Separate-and-Enhance's tiny finetune). Everything else (methods,
dataset, seeds, sampling settings other than the resolution) stays the experiment's own, so the run exercises the
same code paths as the real one in minutes on a CPU. Results go to `<experiment>_tiny`, apart from real runs, and
the report carries `stand_in_notice`: the numbers mean nothing.
"""

from __future__ import annotations

from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from evalkit.errors import ConfigError
from evalkit.manifest import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"


def _stand_in_config(group: str, name: str):
    path = CONF / group / f"{name}.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def with_stand_ins(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """`cfg` itself when `stand_ins` is off; else a copy on the tiny models. `overrides` are the command line's:
    its `model.*` ones apply to the tiny model too (`model.num_inference_steps=3` is not lost with the model)."""
    if not cfg.get("stand_ins"):
        return cfg
    cfg = cfg.copy()
    OmegaConf.update(cfg, "model", _stand_in_config("model", "tiny"), merge=False)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group.startswith("model.") and not override.is_delete():
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True, force_add=True)
    for key, scorer in cfg.scorers.items():
        tiny = _stand_in_config("scorer", f"{key}_tiny")
        if tiny is not None:
            OmegaConf.update(cfg, f"scorers.{key}", tiny, merge=False)
        elif "tiny" in scorer:  # a scorer with a checkpoint must have a stand-in; overhead reads only records
            raise ConfigError(f"scorer {key!r} has no tiny stand-in (conf/scorer/{key}_tiny.yaml)")
    cfg.methods = [name + "_tiny" if _stand_in_config("method", f"{name}_tiny") else name for name in cfg.methods]
    tiny_method = _stand_in_config("method", f"{cfg.method.name}_tiny")
    if tiny_method is not None:
        OmegaConf.update(cfg, "method", tiny_method, merge=False)
    cfg.experiment_name = f"{cfg.experiment_name}_tiny"
    cfg.notice = cfg.stand_in_notice
    return cfg
