"""Checks of arguments that the command line (while parsing) and the library calls share.

Light module: no onnx or numpy, so that the command line can use it before its heavy imports.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping

from edgegraph.errors import NAME_LIMIT, EdgegraphError, shown

# The most elements a fixed input shape may have (`--fix-shape`, `fix_shapes`, `--image-size`):
# 2**31 float32 values are 8 GiB per sample already, and far larger shapes only make every
# later step (inference, verification inputs) run for minutes before failing.
MAX_INPUT_ELEMENTS = 2**31


def whole_number(value, what: str) -> int:
    """`value` if it is an int >= 0 (bools are not numbers here), else EdgegraphError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EdgegraphError(f"{what} must be a whole number >= 0, got {reprlib.repr(value)}")
    return value


def flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise EdgegraphError(f"{what} must be True or False, got {reprlib.repr(value)}")
    return value


def dims(value, what: str) -> list[int]:
    """A static shape: positive ints, MAX_INPUT_ELEMENTS elements at most."""
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise EdgegraphError(f"{what} must be a list of sizes, got {reprlib.repr(value)}")
    sizes = list(value)
    if not sizes or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in sizes):
        raise EdgegraphError(f"{what} must be positive sizes like [1, 3, 224, 224], got {reprlib.repr(value)}")
    elements = 1
    for d in sizes:
        elements *= d
    if elements > MAX_INPUT_ELEMENTS:
        raise EdgegraphError(f"{what}: {shown('x'.join(map(str, sizes)), NAME_LIMIT)} is {elements:.3g} elements, "
                             f"more than the {MAX_INPUT_ELEMENTS} an input may have")
    return sizes


def input_shapes(value, what: str = "fix_shapes") -> dict[str, list[int]]:
    """{input name: static shape}."""
    if not isinstance(value, Mapping):
        raise EdgegraphError(f"{what} must be a mapping {{input name: [sizes]}}, got {reprlib.repr(value)}")
    shapes = {}
    for name, shape in value.items():
        if not isinstance(name, str):
            raise EdgegraphError(f"{what}: input names must be strings, got {reprlib.repr(name)}")
        shapes[name] = dims(shape, f"{what}['{shown(name, NAME_LIMIT)}']")
    return shapes
