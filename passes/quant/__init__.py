"""Quantization passes.

`numerics` holds the Q/DQ arithmetic every quantization pass shares; `static` registers `quant`
(calibrated QDQ int8). Other families (`dynamic`, `weight_only`) register their own passes.
"""

from edgegraph.passes.quant import static  # noqa: F401  (registers `quant`)
