"""How the report names and orders variants."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd


class VariantLabels:
    """Names variants as the method, plus @hash only where a method has several variants, plus the model where
    the report covers several models; orders them baseline first."""

    def __init__(self, frames: Iterable[pd.DataFrame], baseline_method: str):
        variants = pd.concat([frame[["model", "method", "variant"]] for frame in frames]).drop_duplicates()
        variants_per_method = variants.groupby("method")["variant"].nunique()
        several_models = variants["model"].nunique() > 1
        self._labels: dict[tuple[str, str], str] = {}
        self._methods: dict[tuple[str, str], str] = {}
        self._sort_keys: dict[tuple[str, str], tuple] = {}
        for model, method, variant in variants.itertuples(index=False):
            label = variant if variants_per_method[method] > 1 else method
            self._labels[(model, variant)] = f"{label} ({model})" if several_models else label
            self._methods[(model, variant)] = method
            self._sort_keys[(model, variant)] = (model, method != baseline_method, label)

    def knows(self, model: str, variant: str) -> bool:
        return (model, variant) in self._labels

    def label(self, model: str, variant: str) -> str:
        return self._labels[(model, variant)]

    def method(self, model: str, variant: str) -> str:
        return self._methods[(model, variant)]

    def ordered(self, keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return sorted(set(keys), key=self._sort_keys.__getitem__)
