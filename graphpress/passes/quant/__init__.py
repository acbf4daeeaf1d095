"""Quantization: layer-wise mixed precision (``quantize-layerwise``) and activation-aware scaling (``awq-scale``).

Importing this package registers its passes.
"""

from graphpress.passes.quant import awq, layerwise  # noqa: F401
