"""Quantization: layer-wise mixed precision (``quantize-layerwise``), activation-aware scaling
(``awq-scale``), k-bit embedding tables (``quantize-embeddings``), float compute on stored
k-bit weights (``dequantize-at-load``) and k-bit KV caches per layer (``quantize-kv-cache``).

Importing this package registers its passes.
"""

from graphpress.passes.quant import at_load, awq, embeddings, kv_cache, layerwise  # noqa: F401
