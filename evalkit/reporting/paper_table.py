"""The published table an experiment reproduces (its `paper_table` config), read for the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from evalkit.errors import ConfigError
from evalkit.paths import project_path
from evalkit.reporting.protocol import check_protocol


@dataclasses.dataclass
class PaperTable:
    """The published table an experiment reproduces: its name, and its cells (`reports/references/*.csv` rows:
    model, dataset, method, metric, value, paper_text, source), or why they are not available; and the paper's
    protocol item by item (evalkit/reporting/protocol.py), compared with ours."""

    title: str
    cells: pd.DataFrame | None
    not_available: str | None = None
    protocol: Mapping[str, Any] | None = None

    def __post_init__(self):
        if self.protocol is not None:
            check_protocol(self.protocol)


def load_paper_table(cfg: DictConfig) -> PaperTable | None:
    """The published table `paper_table` names, with its cells read from `reports/references/`, or None."""
    paper = cfg.get("paper_table")
    if paper is None:
        return None
    protocol = OmegaConf.to_container(paper.protocol, resolve=True) if paper.get("protocol") is not None else None
    if paper.cells is None:
        return PaperTable(paper.title, None, paper.not_available, protocol)
    cells = pd.read_csv(project_path(paper.cells), dtype={"paper_text": str, "table": str})
    cells = cells[cells["table"] == str(paper.table)]
    if cells.empty:
        raise ConfigError(f"paper_table: {paper.cells} has no cells of table {paper.table}")
    return PaperTable(paper.title, cells, protocol=protocol)
