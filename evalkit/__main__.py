"""`python -m evalkit <generate|score|report|run|bench|finetune|train-world> [hydra overrides]`.

`run` does all three stages for every method the experiment lists (`methods=[...]`); `generate` does one method
(`method=<name>`), so `--multirun method=a,b seeds=[0],[1]` sweeps methods and seeds. `bench` reads
`conf/bench.yaml` instead of `conf/config.yaml`; `finetune` (Separate-and-Enhance's training) reads
`conf/finetune.yaml`; `train-world` (the shapes-world model, evalkit/world/train.py) reads `conf/train_world.yaml`.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from evalkit import stages
from evalkit.bench import run_bench
from evalkit.errors import ConfigError, EvalkitError
from evalkit.finetune.train import finetune
from evalkit.paths import CONF, config_file
from evalkit.reporting import stage as report_stage
from evalkit.reporting.paper_table import load_paper_table
from evalkit.sampling.method import METHODS
from evalkit.scoring.base import preflight_scorer
from evalkit.stand_ins import with_stand_ins
from evalkit.world.train import train_world

COMMANDS = ("generate", "score", "report", "run", "bench", "finetune", "train-world")
USAGE = f"usage: python -m evalkit {{{','.join(COMMANDS)}}} [overrides...] [--multirun]"


CONFIG_GROUPS = ("model", "method", "dataset", "scorer", "experiment")


def _group_choices(override) -> list[str]:
    """The option names an override of a config group picks: one, a list (`scorer=[a,b]`) or a sweep (`a,b`)."""
    if override.is_choice_sweep():
        values = list(override.sweep_iterator())
    elif override.is_sweep_override():  # range() or glob(): nothing named to check
        return []
    else:
        values = [override.value()]
    return [str(name) for value in values for name in (value if isinstance(value, list) else [value]) if name is not None]


# Hydra's own flags that take a value as the next argument (`--cfg job`, `--info defaults`): not overrides.
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}


def command_line_overrides(arguments: list[str]) -> list[str]:
    """The overrides among the arguments: what is left without Hydra's flags and their values."""
    overrides, after_flag = [], None
    for argument in arguments:
        if argument.startswith("-"):
            after_flag = argument if argument in FLAGS_WITH_VALUE else None
        elif after_flag is not None and "=" not in argument:
            after_flag = None  # the flag's value (`--info` takes one optionally: an override has an "=")
        else:
            overrides.append(argument)
    return overrides


def check_group_choices(arguments: list[str]) -> None:
    """Raise ConfigError naming an unknown model, method, dataset, scorer or experiment in the command line's
    overrides, before Hydra composes (whose miss is a multi-line error) and before any model loads."""
    overrides = command_line_overrides(arguments)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        raise ConfigError(f"cannot parse the overrides {overrides}: {str(error).splitlines()[0]}") from None
    for override in parsed:
        if override.key_or_group not in CONFIG_GROUPS or override.is_delete():
            continue
        for name in _group_choices(override):
            config_file(override.key_or_group, name)


def run_all(cfg: DictConfig) -> None:
    method_configs = [config_file("method", name) for name in cfg.methods]  # all known before any image is made
    for method in method_configs:
        METHODS.build(OmegaConf.to_container(method, resolve=True)).configure_for_experiment(
            OmegaConf.to_container(cfg.scorers, resolve=True))
    for scorer in cfg.scorers.values():
        preflight_scorer(OmegaConf.to_container(scorer, resolve=True), list(cfg.methods))
    load_paper_table(cfg)  # the published table the report compares with is readable, its protocol well-formed
    report_stage.headline_metrics(cfg)  # and the report's first table names metrics the scorers give
    for method in method_configs:
        run_cfg = cfg.copy()
        OmegaConf.update(run_cfg, "method", method, merge=False)
        stages.generate(run_cfg)
    stages.score(cfg)
    report_stage.report(cfg)


STAGES = {
    "generate": stages.generate, "score": stages.score, "report": report_stage.report, "run": run_all, "bench": run_bench,
    "finetune": finetune, "train-world": train_world,
}
# every other command reads conf/config.yaml
CONFIG_NAMES = {"bench": "bench", "finetune": "finetune", "train-world": "train_world"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    try:
        check_group_choices(sys.argv[1:])
    except EvalkitError as error:
        print(f"evalkit: error: {error}", file=sys.stderr)
        sys.exit(2)

    config_name = CONFIG_NAMES.get(command, "config")

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name=config_name)
    def entry(cfg: DictConfig) -> None:
        logging.getLogger("evalkit").setLevel(logging.INFO)
        try:
            STAGES[command](with_stand_ins(cfg, HydraConfig.get().overrides.task))  # this job's own, in a multirun
        except EvalkitError as error:
            print(f"evalkit: error: {error}", file=sys.stderr)
            sys.exit(2)
        except OSError as error:  # a folder that cannot be made or written (store_root, report_dir), a full disk
            print(f"evalkit: error: {error}", file=sys.stderr)
            sys.exit(2)

    entry()


if __name__ == "__main__":
    main()
