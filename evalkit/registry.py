"""One registry for what a config names by key (methods, scorers, VQA backends), and one way from a config to an
object: its keys are the constructor's parameters, an unknown one is a one-line ConfigError.

A registry imports every module of its package the first time it is asked for a name, so a plugin registers by
existing: a new method is one file in `evalkit/methods/` (with `@METHODS.register`) plus its `conf/method/*.yaml`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from evalkit.errors import ConfigError
from evalkit.paths import unknown_name

T = TypeVar("T")


def check_params(factory: Callable[..., Any], config: Mapping[str, Any], where: str, supplied: int = 0,
                 context: Mapping[str, Any] | None = None) -> None:
    """ConfigError, starting with `where`, for a config key `factory` does not take (its first `supplied`
    positional parameters and the `context` keywords come from the caller, never the config)."""
    parameters = list(inspect.signature(factory).parameters.values())[supplied:]
    accepted = [p.name for p in parameters if p.name not in (context or {}) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {unknown}; it takes {sorted(accepted)}")


def from_config(factory: Callable[..., T], config: Mapping[str, Any], where: str, *args: Any, **context: Any) -> T:
    """`factory(*args, **config, **context)`. A config key the factory does not take, or a missing or bad value
    (TypeError, ValueError), is a ConfigError that starts with `where`. `args` and `context`: what the caller
    supplies (a device), never the config."""
    check_params(factory, config, where, len(args), context)
    try:
        return factory(*args, **config, **context)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


class Registry(Generic[T]):
    """Classes by key. `kind` names them in errors ("method"); `package`: the package whose modules register them
    (or the one module that does).
    A class's key is its `name` class attribute; `build` makes one from a config `{key_field: <key>, ...}` through
    the class, or through its `from_params` classmethod where the constructor takes more than the config."""

    def __init__(self, kind: str, package: str, key_field: str = "name"):
        self.kind, self.package, self.key_field = kind, package, key_field
        self._classes: dict[str, type[T]] = {}
        self._imported = False

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator; a second class under the same key is an error, never a silent replacement."""
        key = cls.name
        if key in self._classes and self._classes[key] is not cls:
            raise RuntimeError(f"{self.kind} {key!r} registered twice: {self._classes[key].__qualname__} and {cls.__qualname__}")
        self._classes[key] = cls
        return cls

    def _import_plugins(self) -> None:
        if not self._imported:
            self._imported = True
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
                importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        self._import_plugins()
        return sorted(self._classes)

    def classes(self) -> dict[str, type[T]]:
        self._import_plugins()
        return dict(self._classes)

    def __getitem__(self, key: str) -> type[T]:
        """The class registered as `key`, or ConfigError: "unknown method 'x'; did you mean 'y'?; known: ..."."""
        self._import_plugins()
        if key not in self._classes:
            raise unknown_name(self.kind, key, list(self._classes))
        return self._classes[key]

    def __contains__(self, key: str) -> bool:
        self._import_plugins()
        return key in self._classes

    def resolve(self, config: Mapping[str, Any], supplied: int = 0) -> tuple[type[T], dict[str, Any]]:
        """The class `config` names and its parameters, checked as `build` checks them, without building (no model
        loads): what a pre-flight check needs."""
        params = dict(config)
        key = params.pop(self.key_field, None)
        cls = self[key]
        check_params(self._factory(cls), params, f"{self.kind} {key}", supplied)
        return cls, params

    def build(self, config: Mapping[str, Any], *args: Any, **context: Any) -> T:
        """The object `config` describes: its `key_field` picks the class, its other keys are parameters; `args`
        and `context` are the caller's (a scorer's device)."""
        params = dict(config)
        key = params.pop(self.key_field, None)
        cls = self[key]
        return from_config(self._factory(cls), params, f"{self.kind} {key}", *args, **context)

    @staticmethod
    def _factory(cls: type[T]) -> Callable[..., T]:
        return getattr(cls, "from_params", cls)
