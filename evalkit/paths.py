"""Where things are: the project root, paths in configs, and the config files (`conf/<group>/<name>.yaml`).

A leaf module: everything may import it, and it imports nothing of evalkit but its errors.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from evalkit.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF = PROJECT_ROOT / "conf"


def project_path(path: str | Path) -> Path:
    """Relative paths in configs are relative to the project root, wherever the command runs."""
    return Path(path) if Path(path).is_absolute() else PROJECT_ROOT / path


def did_you_mean(name: str, known: list[str]) -> str:
    """"; did you mean 'x'?" for the nearest known name, or nothing."""
    close = difflib.get_close_matches(str(name), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(what: str, name: str, known: list[str]) -> ConfigError:
    """The one-line error for a name that is not among `known`: the nearest one, then all of them."""
    return ConfigError(f"unknown {what} {name!r}{did_you_mean(name, known)}; known: {', '.join(sorted(known))}")


def config_names(group: str) -> list[str]:
    """The names of `conf/<group>/*.yaml`, sorted."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def has_config(group: str, name: str) -> bool:
    return (CONF / group / f"{name}.yaml").is_file()


def config_file(group: str, name: str) -> DictConfig:
    """`conf/<group>/<name>.yaml`, or a ConfigError naming the known ones (`group` "method": "unknown method ...")."""
    if not has_config(group, name):
        raise unknown_name(group, name, config_names(group))
    return OmegaConf.load(CONF / group / f"{name}.yaml")
