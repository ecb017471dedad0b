"""Name -> pass class. Built-in passes register themselves when `edgegraph.passes` is imported."""

from __future__ import annotations

import dataclasses
import difflib
import importlib

from edgegraph.errors import UnknownPassError, shown
from edgegraph.passbase import Pass

_PASSES: dict[str, type[Pass]] = {}
_builtins_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to `-p`, recipes and `edgegraph passes`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    if not callable(cls.requires):  # the pre-contract spelling of `needs`
        raise TypeError(f"{cls.__name__}: context needs go in `needs`; `requires(model, ctx)` is a precondition")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__}: a pass is a @dataclass(frozen=True) (per-run state lives in the run)")
    existing = _PASSES.get(cls.name)
    # The class object, not its name: two plugins' `Prune` classes must not replace each other.
    # Re-registering the very same class (a module imported twice) is fine.
    if existing is not None and existing is not cls:
        raise ValueError(f"pass name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}")
    _PASSES[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("edgegraph.passes")


def get_pass(name: str) -> type[Pass]:
    _load_builtins()
    if name not in _PASSES:
        close = difflib.get_close_matches(name, _PASSES, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownPassError(f"unknown pass '{shown(name)}'; {hint}available: {', '.join(sorted(_PASSES))}")
    return _PASSES[name]


def list_passes() -> list[type[Pass]]:
    _load_builtins()
    return [_PASSES[name] for name in sorted(_PASSES)]
