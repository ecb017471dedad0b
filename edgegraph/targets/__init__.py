"""Target profiles: which ops a deployment runtime supports. One TOML file per target here."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgegraph.errors import UnknownTargetError

PROFILE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    ops: frozenset[str]  # supported default-domain op types; empty means "everything ONNX Runtime runs"
    quantized_ops: frozenset[str]  # ops with fast int8 kernels (what Q/DQ placement aims at)

    def supports(self, op_type: str) -> bool:
        return not self.ops or op_type in self.ops


def available_targets() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_target(name: str) -> Target:
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise UnknownTargetError(f"unknown target '{name}' (available: {', '.join(available_targets())})")
    with path.open("rb") as handle:
        profile = tomllib.load(handle)
    return Target(
        name=name,
        description=profile.get("description", ""),
        ops=frozenset(profile.get("ops", [])),
        quantized_ops=frozenset(profile.get("quantized_ops", [])),
    )
