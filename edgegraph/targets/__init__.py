"""Target profiles: which ops a deployment runtime supports. One TOML file per target here."""

from __future__ import annotations

import reprlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgegraph.errors import NAME_LIMIT, EdgegraphError, UnknownTargetError, shown

PROFILE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    ops: frozenset[str]  # supported default-domain op types; empty means "everything ONNX Runtime runs"
    quantized_ops: frozenset[str]  # ops with fast int8 kernels (what Q/DQ placement aims at)
    channel_alignment: int = 1  # channel counts the target's kernels like a multiple of (pruned widths)


def available_targets() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


# key -> (type of its value, type of a list's items or None)
_KEYS = {"description": (str, None), "ops": (list, str), "quantized_ops": (list, str), "channel_alignment": (int, None)}


def load_target(name: str) -> Target:
    """The profile `name` from this folder; only these names, never a path to another file."""
    if not isinstance(name, str) or name not in available_targets():
        given = reprlib.repr(name) if isinstance(name, str) else type(name).__name__
        raise UnknownTargetError(f"unknown target {given} (available: {', '.join(available_targets())})")
    path = PROFILE_DIR / f"{name}.toml"
    try:
        with path.open("rb") as handle:
            profile = tomllib.load(handle)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EdgegraphError(f"target profile {path}: {exc}") from None
    for key, value in profile.items():
        if key not in _KEYS:
            raise EdgegraphError(f"target profile {path}: {shown(key, NAME_LIMIT)}: unknown key (keys: {', '.join(_KEYS)})")
        kind, item = _KEYS[key]
        if not isinstance(value, kind) or (item and not all(isinstance(v, item) for v in value)):
            wanted = f"a list of {item.__name__}" if item else kind.__name__
            raise EdgegraphError(f"target profile {path}: {key}: must be {wanted}, got {reprlib.repr(value)}")
    return Target(
        name=name,
        description=profile.get("description", ""),
        ops=frozenset(profile.get("ops", [])),
        quantized_ops=frozenset(profile.get("quantized_ops", [])),
        channel_alignment=_alignment(path, profile.get("channel_alignment", 1)),
    )


def _alignment(path: Path, value: int) -> int:
    if isinstance(value, bool) or not 1 <= value <= 1024:
        raise EdgegraphError(f"target profile {path}: channel_alignment: must be a whole number in 1..1024, got {value!r}")
    return value
