"""Run any experiment on the tiny random-weight stand-ins (`stand_ins=true`, `make reproduce-* MODEL=tiny`).

One rule names every stand-in: the stand-in of `conf/<group>/<name>.yaml` is `conf/<group>/<name>_tiny.yaml`, for
models, scorers (by their key in `scorers`) and methods alike. Every checkpoint the experiment needs is replaced by its
stand-in, built offline: the diffusion model by its own (a model without one, which is every model today, falls back
to `conf/model/tiny.yaml`), each scorer by its `<key>_tiny` (a scorer that takes `tiny` has one; `overhead` reads only
records), and a method with finetuned weights by its `<name>_tiny` (Separate-and-Enhance's tiny finetune); a config
that is a stand-in already stays as it is. Everything else (methods, dataset, seeds, sampling settings other than the
resolution) stays the experiment's own, so the run exercises the same code paths as the real one in minutes on a
CPU. Results go to `<experiment>_tiny`, apart from real runs, and the report carries `stand_in_notice`: the numbers
mean nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from evalkit.errors import ConfigError
from evalkit.paths import config_file, has_config

STAND_IN_SUFFIX = "_tiny"
FALLBACK_MODEL = "tiny"  # the stand-in of a model without its own


def stand_in(group: str, name: str) -> str | None:
    """The name of `conf/<group>/<name>.yaml`'s stand-in, `<name>_tiny`, or None where there is no such config."""
    candidate = name + STAND_IN_SUFFIX
    return candidate if has_config(group, candidate) else None


def with_stand_ins(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """`cfg` itself when `stand_ins` is off; else a copy on the tiny models. `overrides` are the command line's:
    its `model.*` ones apply to the tiny model too (`model.num_inference_steps=3` is not lost with the model)."""
    if not cfg.get("stand_ins"):
        return cfg
    cfg = cfg.copy()
    model = stand_in("model", cfg.model.name) or FALLBACK_MODEL
    OmegaConf.update(cfg, "model", config_file("model", model), merge=False)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group.startswith("model.") and not override.is_delete():
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True, force_add=True)
    for key, scorer in cfg.scorers.items():
        tiny = stand_in("scorer", key)
        if tiny is not None:
            OmegaConf.update(cfg, f"scorers.{key}", config_file("scorer", tiny), merge=False)
        elif "tiny" in scorer:  # a scorer with a checkpoint must have a stand-in; overhead reads only records
            raise ConfigError(f"scorer {key!r} has no tiny stand-in (conf/scorer/{key}{STAND_IN_SUFFIX}.yaml)")
    cfg.methods = [stand_in("method", name) or name for name in cfg.methods]
    tiny_method = stand_in("method", cfg.method.name)
    if tiny_method is not None:
        OmegaConf.update(cfg, "method", config_file("method", tiny_method), merge=False)
    cfg.experiment_name = f"{cfg.experiment_name}{STAND_IN_SUFFIX}"
    cfg.notice = cfg.stand_in_notice
    return cfg
