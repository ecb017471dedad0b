"""Errors a user can act on; the CLI prints them as one line and exits with `exit_code`."""

from __future__ import annotations


class EdgegraphError(Exception):
    """Bad input or usage: a corrupt model, an unknown pass, a bad option, missing data."""

    exit_code = 2


class ModelLoadError(EdgegraphError):
    """The model file is missing, unreadable, or not an ONNX model."""


class UnknownPassError(EdgegraphError):
    """A pass name that is not registered."""


class PassOptionError(EdgegraphError):
    """An option that the pass does not have, or a value of the wrong type."""


class MissingRequirementError(EdgegraphError):
    """A pass needs something the context does not provide (calibration data, a target)."""


class PreconditionError(EdgegraphError):
    """The model is not one a pass can work on (its `requires` check failed)."""


class CalibrationDataError(EdgegraphError):
    """Calibration data that does not fit the model (missing inputs, wrong shapes, unreadable)."""


class UnknownTargetError(EdgegraphError):
    """A target name with no profile in `edgegraph/targets/`."""


class VerificationDataError(EdgegraphError):
    """The input model does not run in onnxruntime on the data it is to be verified on."""


class VerificationError(EdgegraphError):
    """A semantics-preserving pass changed the model's outputs beyond tolerance.

    This is a defect in edgegraph, not in the user's input, hence exit code 1; it still gets a
    one-line message because the pass, output and metric are what a bug report needs.
    """

    exit_code = 1

    def __init__(self, pass_name: str, output: str, metric: str, value: float, threshold: float, seed: int):
        self.pass_name, self.output, self.metric = pass_name, output, metric
        self.value, self.threshold, self.seed = value, threshold, seed
        super().__init__(
            f"pass '{pass_name}' changed output '{output}': {metric}={value:.3g} exceeds {threshold:.3g} "
            f"(verification seed {seed}); no output written. Re-run with --no-verify to skip this check."
        )


class FloorViolation(EdgegraphError):
    """A lossy pass ended below a floor the user asked for (`VerifyConfig.min_*`): exit 1, as the
    pass was to hold it (passes with a strength knob search for a setting that does)."""

    exit_code = 1

    def __init__(self, pass_name: str, metric: str, value: float, bound: float):
        self.pass_name, self.metric, self.value, self.bound = pass_name, metric, value, bound
        super().__init__(f"pass '{pass_name}' ended below the floor: {metric} {value:.4g} < {bound:g} on the "
                         "verification samples; no output written")


class PassFailure(RuntimeError):
    """An unexpected exception inside a pass, re-raised with the pipeline position (keeps the traceback)."""


class PostconditionError(PassFailure):
    """A pass made a model its own `ensures` check rejects: a defect in the pass (exit 1)."""


MAX_LINE = 1000  # characters: an error line holds a whole onnxruntime message (pipeline.ORT_MESSAGE_LIMIT) and advice


NAME_LIMIT = 80  # characters of a user-chosen name or path inside a longer message


def shown(value, limit: int = 200) -> str:
    """`value` for an error message: its repr (str as it is), cut to about `limit` characters,
    so that a hostile name, key or recipe cannot make a megabyte error line."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (what the command line prints), at most about MAX_LINE
    characters whatever the message echoes."""
    return shown(" ".join(str(exc).split()), MAX_LINE) or type(exc).__name__
