"""Method registry. A new method is one module in this package with a `@register` class."""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from ..errors import ConfigError
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Method]]:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(METHODS.items()))


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        close = difflib.get_close_matches(name, methods, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; `semiseg methods` lists: {', '.join(methods)}")
    return methods[name]


__all__ = ["METHODS", "Method", "MethodParams", "NetSpec", "StepContext", "StepOutput", "available_methods",
           "get_method", "register"]
