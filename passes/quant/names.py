"""Options that name op types or nodes: a name that matches nothing warns, with close matches."""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Iterable

import onnx
import onnx_graphsurgeon as gs

from edgegraph import ir

logger = logging.getLogger(__name__)

MAX_SHOWN = 60  # characters of a user-given name echoed back


def shorten(name: str) -> str:
    """A user- or model-given name, cut to MAX_SHOWN characters for a message."""
    return name if len(name) <= MAX_SHOWN else name[:MAX_SHOWN] + "..."


@functools.cache
def onnx_ops() -> frozenset[str]:
    """Every op type onnx has a schema for (all domains it knows)."""
    return frozenset(schema.name for schema in onnx.defs.get_all_schemas_with_history())


def warn_unmatched(option: str, values: Iterable[str], graph: gs.Graph, *, ops: bool, nodes: bool) -> list[str]:
    """Warn once per value of `option` (e.g. "quant: exclude_ops") that matches no op type
    (`ops`) or node name (`nodes`) of `graph`; returns those values."""
    node_list = list(ir.iter_nodes(graph))
    present_ops = {n.op for n in node_list} if ops else set()
    present_nodes = {n.name for n in node_list if n.name} if nodes else set()
    unmatched = [v for v in dict.fromkeys(values) if v not in present_ops and v not in present_nodes]
    for value in unmatched:
        shown = shorten(value)
        candidates = present_ops | present_nodes
        if ops and not nodes and value not in onnx_ops():
            what, candidates = "is not an ONNX op", onnx_ops()
        else:
            what = "matches no " + " or ".join(k for k, on in (("op type", ops), ("node name", nodes)) if on) + \
                " of the model"
        close = difflib.get_close_matches(value[:200], sorted(candidates), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        logger.warning("%s: %r %s%s; it has no effect", option, shown, what, hint)
    return unmatched


__all__ = ["onnx_ops", "shorten", "warn_unmatched"]
