"""The registry of adapter methods: name -> frozen dataclass. Methods register themselves.

Every module in this package is imported once on first lookup, so adding a method is
adding one file that decorates its class with `@register("name")`. Modules that register
nothing (the contract, shared helpers, the insertion pass) are simply imported too.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

_METHODS: dict[str, type] = {}
_DISCOVERED = False


def register(name: str):
    """Make the decorated class a frozen dataclass (its fields are the hyperparameters) and
    register it under the spec name `name`."""

    def decorate(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"adapter method {name!r} is registered twice")
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def _discover() -> None:
    import passes.adapters as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"passes.adapters.{info.name}")


def methods() -> dict[str, type]:
    """All registered methods by name."""
    global _DISCOVERED
    if not _DISCOVERED:  # not `if not _METHODS`: importing one method module registers it early
        _discover()
        _DISCOVERED = True
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> type:
    known = methods()
    if name not in known:
        raise KeyError(f"unknown adapter method {name!r}; known methods: {', '.join(known)}")
    return known[name]
