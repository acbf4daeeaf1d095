"""Quantization: layer-wise mixed precision (``quantize-layerwise``), activation-aware scaling
(``awq-scale``), k-bit embedding tables (``quantize-embeddings``) and float compute on stored
k-bit weights (``dequantize-at-load``).

Importing this package registers its passes.
"""

from graphpress.passes.quant import at_load, awq, embeddings, layerwise  # noqa: F401
