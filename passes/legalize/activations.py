"""Activations rewritten into elementwise ops every runtime has (Mul, Add, Div, Clip, Exp, ...)."""

from __future__ import annotations

import math

import numpy as np

from .rules import Emit, NoMatch, float_input, rewrites


def _float(owner, graph, node, opset):
    """(Emit, x) for a one-input float activation, or a NoMatch."""
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    e = Emit(owner, graph, node, dtype, opset)
    return e, e.take()[0]


@rewrites("HardSigmoid")
def hard_sigmoid(owner, graph, node, opset):
    """HardSigmoid(x) = Clip(alpha * x + beta, 0, 1)."""
    made = _float(owner, graph, node, opset)
    if isinstance(made, NoMatch):
        return made
    e, x = made
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    e.clip(e("Add", e("Mul", x, alpha), beta), 0.0, 1.0, out=e.outputs[0])
    return "HardSigmoid->Mul/Add/Clip"


@rewrites("HardSwish")
def hard_swish(owner, graph, node, opset):
    """HardSwish(x) = x * Clip(x / 6 + 1/2, 0, 1)."""
    made = _float(owner, graph, node, opset)
    if isinstance(made, NoMatch):
        return made
    e, x = made
    e("Mul", x, e.clip(e("Add", e("Mul", x, 1 / 6), 0.5), 0.0, 1.0), out=e.outputs[0])
    return "HardSwish->Mul/Add/Clip"


@rewrites("Gelu")
def gelu(owner, graph, node, opset):
    """Gelu(x) = x/2 * (1 + Erf(x / sqrt 2)); approximate=tanh: x/2 * (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    approximate = node.attrs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        return NoMatch(f"approximate={approximate!r} is neither 'none' nor 'tanh'")
    made = _float(owner, graph, node, opset)
    if isinstance(made, NoMatch):
        return made
    e, x = made
    if approximate == "none":
        inner = e("Erf", e("Mul", x, 1 / math.sqrt(2)))
    else:
        cube = e("Mul", e("Mul", x, x), x)
        inner = e("Tanh", e("Mul", e("Add", x, e("Mul", cube, 0.044715)), math.sqrt(2 / math.pi)))
    e("Mul", e("Mul", x, 0.5), e("Add", inner, 1.0), out=e.outputs[0])
    return f"Gelu({approximate})->{'Erf' if approximate == 'none' else 'Tanh'}/Mul/Add"


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (beyond, erf is +-1 in float32): the rational minimax
# approximation Eigen and XLA use for float32 erf (max error ~4e-7 against math.erf, a few
# float32 units; relative error ~1e-7 near 0, where a 1 - erfc form would lose every digit).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


@rewrites("Erf")
def erf(owner, graph, node, opset):
    """Erf(x) = c P(c^2) / Q(c^2) with c = Clip(x, -4, 4), Horner form (float16 computes in float32)."""
    made = _float(owner, graph, node, opset)
    if isinstance(made, NoMatch):
        return made
    e, x = made
    half = e.dtype == np.float16  # the small coefficients underflow float16
    if half:
        e.dtype = np.dtype(np.float32)
        x = e("Cast", x, to=1)
    c = e.clip(x, -4.0, 4.0)
    c2 = e("Mul", c, c)

    def horner(coefficients):
        acc = e("Add", e("Mul", c2, coefficients[0]), coefficients[1])
        for k in coefficients[2:]:
            acc = e("Add", e("Mul", acc, c2), k)
        return acc

    ratio = e("Div", e("Mul", horner(_ERF_P), c), horner(_ERF_Q), out=None if half else e.outputs[0])
    if half:
        e("Cast", ratio, to=10, out=e.outputs[0])
    return "Erf->rational polynomial"


@rewrites("Softplus")
def softplus(owner, graph, node, opset):
    """Softplus(x) = Relu(x) + Log(1 + Exp(-|x|)) (no overflow for large x, unlike Log(1 + Exp(x)))."""
    made = _float(owner, graph, node, opset)
    if isinstance(made, NoMatch):
        return made
    e, x = made
    tail = e("Log", e("Add", e("Exp", e("Neg", e("Abs", x))), 1.0))
    e("Add", e("Relu", x), tail, out=e.outputs[0])
    return "Softplus->Relu/Exp/Log"


@rewrites("Mish")
def mish(owner, graph, node, opset):
    """Mish(x) = x Tanh(Softplus(x)) = x t / (t + 2), t = n (n + 2), n = Exp(Min(x, m)).

    The rational form keeps full precision for negative x (Log(1 + tiny) would lose it); above
    m (20, float16: 5) Tanh(Softplus(x)) is 1 in that dtype, and the clamp keeps n*n finite.
    """
    made = _float(owner, graph, node, opset)
    if isinstance(made, NoMatch):
        return made
    e, x = made
    n = e("Exp", e("Min", x, 5.0 if e.dtype == np.float16 else 20.0))
    t = e("Mul", n, e("Add", n, 2.0))
    e("Mul", x, e("Div", t, e("Add", t, 2.0)), out=e.outputs[0])
    return "Mish->Exp/Mul/Div"


@rewrites("Swish")
def swish(owner, graph, node, opset):
    """Swish(x) = x Sigmoid(alpha x) (SiLU for alpha = 1)."""
    made = _float(owner, graph, node, opset)
    if isinstance(made, NoMatch):
        return made
    e, x = made
    alpha = float(node.attrs.get("alpha", 1.0))
    e("Mul", x, e("Sigmoid", x if alpha == 1.0 else e("Mul", x, alpha)), out=e.outputs[0])
    return "Swish->Sigmoid/Mul"
