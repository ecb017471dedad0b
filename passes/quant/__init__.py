"""Quantization passes. `numerics` holds the shared Q/DQ arithmetic; `static` registers `quant`."""
