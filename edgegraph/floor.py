"""The accuracy-floor loop: the strongest setting of a lossy pass's strength knob that holds a floor.

A lossy pass with a knob (layers kept in float, a prune ratio, codebook bits) lists its settings
strongest first, measures a setting on held-out samples (not the ones it fitted on) and hands
both to `search`, which bisects for the strongest setting whose measurement holds the `Floor`,
recording every step it measured. The user's floors (`--min-agreement`, `--min-sqnr`) reach the
passes through `VerifyConfig`, which also checks every lossy pass's result against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgegraph import verify
from edgegraph.errors import EdgegraphError
from edgegraph.runtime import Feeds

# A floor compared with a measured fraction: float sums of agreements may land an ulp below it.
_SLACK = 1e-12


class FloorNotHeld(EdgegraphError):
    """No setting of a pass's knob holds the user's floor (exit 2: the floor is the user's ask)."""


@dataclass(frozen=True)
class Floor:
    """Lower bounds on a lossy result vs the model it came from: top-1 agreement (a fraction),
    worst-output SQNR (dB) and worst-output cosine. None: no bound."""

    min_agreement: float | None = None
    min_sqnr: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_agreement", "min_sqnr", "min_cosine"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise EdgegraphError(f"{name} must be a finite number, got {value!r}")
        for name, low in (("min_agreement", 0.0), ("min_cosine", -1.0)):
            value = getattr(self, name)
            if value is not None and not low <= value <= 1.0:
                raise EdgegraphError(f"{name} must be in [{low:g}, 1], got {value:g}")

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.min_agreement, self.min_sqnr, self.min_cosine))

    def stricter(self, other: Floor) -> Floor:
        """Both floors at once: the higher bound of each metric."""
        def high(a, b):
            return b if a is None else a if b is None else max(a, b)
        return Floor(high(self.min_agreement, other.min_agreement), high(self.min_sqnr, other.min_sqnr),
                     high(self.min_cosine, other.min_cosine))

    def bounds(self) -> dict[str, float]:
        """{metric: bound} of the bounds set, metrics named as in a measurement."""
        return {metric: bound for metric, bound in (("agreement", self.min_agreement), ("sqnr_db", self.min_sqnr),
                                                    ("cosine", self.min_cosine)) if bound is not None}

    def shortfall(self, measured: Mapping[str, float | None]) -> tuple[str, float, float] | None:
        """The first bound `measured` misses as (metric, value, bound), or None when all hold.
        A metric not measured (None: no output is class scores, for agreement) holds."""
        for metric, bound in self.bounds().items():
            value = measured.get(metric)
            if value is not None and not value >= bound - (_SLACK if metric != "sqnr_db" else 0.0):
                return metric, float(value), bound
        return None

    def holds(self, measured: Mapping[str, float | None]) -> bool:
        return self.shortfall(measured) is None

    def __str__(self) -> str:
        return " and ".join(f"{_FLAG[m]} {b:g}" for m, b in self.bounds().items())


# How each metric is spelled to the user (the CLI's flags, VerifyConfig's fields' meaning).
_FLAG = {"agreement": "min-agreement", "sqnr_db": "min-sqnr", "cosine": "min-cosine"}
_FORMAT = {"agreement": "{:.4f}", "sqnr_db": "{:.2f} dB", "cosine": "{:.6f}"}


def measure(reference: Sequence[Feeds], candidate: Sequence[Feeds]) -> dict[str, float]:
    """What a floor is checked against, a candidate's outputs vs the reference's: argmax
    `agreement`, worst-output `sqnr_db` and worst-output `cosine`.

    Agreement is top-1 for (batch, classes) outputs and the per-position argmax over the last
    axis otherwise (pixels of a segmentation map, anchors of a detector), averaged over float
    outputs with more than one entry on that axis; 1.0 when no output has such an axis.
    """
    metrics = verify.compare_all(reference, candidate)
    agreements, sqnrs, cosines = [], [], []
    for name, m in metrics.items():
        sqnrs.append(m.sqnr_db)
        cosines.append(m.cosine)
        if m.top1 is not None:
            agreements.append(m.top1)
            continue
        ref = [r[name] for r in reference]
        if isinstance(ref[0], np.ndarray) and ref[0].dtype.kind == "f" and ref[0].ndim and ref[0].shape[-1] > 1:
            ref_rows = np.concatenate([r.reshape(-1, r.shape[-1]) for r in ref])
            cand_rows = np.concatenate([c[name].reshape(-1, c[name].shape[-1]) for c in candidate])
            agreements.append(verify.argmax_agreement(ref_rows, cand_rows))
    return {"agreement": float(np.mean(agreements)) if agreements else 1.0,
            "sqnr_db": float(min(sqnrs)) if sqnrs else float("inf"),
            "cosine": float(min(cosines)) if cosines else 1.0}


def describe(measured: Mapping[str, float | None]) -> str:
    """A measurement in a few words: 'agreement 0.9700, sqnr_db 31.20 dB'."""
    return ", ".join(f"{m} {_FORMAT.get(m, '{:.4g}').format(v)}" for m, v in measured.items() if v is not None)


@dataclass
class Step:
    """One setting measured: its position in the list (0 = strongest), the setting, what was
    measured, and whether that holds the floor; `usable` False for a setting that meets any floor
    but is no result (quant with every layer in float)."""

    index: int
    setting: Any
    measured: dict[str, float | None]
    held: bool
    usable: bool = True

    def as_dict(self) -> dict:
        return {"index": self.index, "setting": self.setting, "held": self.held, "usable": self.usable,
                **{k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                   for k, v in self.measured.items()}}


@dataclass
class SearchResult:
    """The strongest setting found (`best` None when none held), what its `measure` returned
    beside the numbers (`artefact`, e.g. the model built), and every step in the order measured."""

    floor: Floor
    best: Step | None = None
    artefact: Any = None
    steps: list[Step] = field(default_factory=list)

    @property
    def closest(self) -> Step | None:
        """The usable step that came nearest to the floor when none held (the weakest usable one
        measured: settings are monotone)."""
        usable = [s for s in self.steps if s.usable]
        return max(usable, key=lambda s: s.index) if usable else None

    def as_dict(self) -> dict:
        return {"floor": self.floor.bounds(), "best": self.best.index if self.best else None,
                "steps": [s.as_dict() for s in self.steps]}


# What `measure` returns: the numbers, and whatever the caller wants back for the best setting
# (None as numbers: the setting is no result at all, see Step.usable).
Measurement = tuple[Mapping[str, float | None] | None, Any]


def search(settings: Sequence[Any], measure: Callable[[Any], Measurement], floor: Floor, *,
           progress: Callable | None = None, desc: str = "floor search") -> SearchResult:
    """The strongest of `settings` (ordered strongest first; monotone: a setting that holds the
    floor means every weaker one does) whose measurement holds `floor`.

    The strongest setting is measured first (often it holds and nothing else is needed); then a
    bisection over the rest. A setting measured as unusable (numbers None) counts as too weak.
    `progress` is `PassContext.progress_bar`: one step of the bar per measurement, with what was
    measured as its postfix (a stage line of its own where no bar is shown). Only the artefact of the best step so far is kept (they may be whole models).
    """
    result = SearchResult(floor)
    bar = progress(total=None, desc=desc) if progress else None

    def probe(index: int) -> bool:
        measured, artefact = measure(settings[index])
        step = Step(index, settings[index], dict(measured or {}), measured is not None and floor.holds(measured),
                    usable=measured is not None)
        result.steps.append(step)
        if step.held and (result.best is None or index < result.best.index):
            result.best, result.artefact = step, artefact
        if bar is not None:  # on a terminal the bar's postfix, else a stage line per step
            bar.update(1)
            bar.set_postfix_str(f"setting {str(step.setting)[:40]}: "
                                + (f"{describe(step.measured)}, {'holds' if step.held else 'below the floor'}"
                                   if step.usable else "no result"))
        return step.held or not step.usable

    try:
        if settings and not probe(0):
            low, high = 1, len(settings) - 1
            while low <= high:
                middle = (low + high) // 2
                if probe(middle):
                    high = middle - 1
                else:
                    low = middle + 1
    finally:
        if bar is not None:
            bar.close()
    return result


def not_held(what: str, result: SearchResult) -> FloorNotHeld:
    """The error for a floor no setting holds: 'the floor ... cannot be held: best reached ...'."""
    closest = result.closest
    reached = describe(closest.measured) if closest else "nothing measurable"
    return FloorNotHeld(f"{what}: the floor {result.floor} cannot be held: best reached {reached} "
                        f"({len(result.steps)} setting(s) measured)")


__all__ = ["Floor", "FloorNotHeld", "SearchResult", "Step", "describe", "measure", "not_held", "search"]
