"""Pruning passes: ``prune-weights`` (unstructured / N:M: magnitude, Wanda, SparseGPT, iCBS),
``prune-channels`` (structured, with channel dependency analysis) and ``store-sparse``
(compressed storage of the zeros)."""

from graphpress.passes.prune import (
    store,  # noqa: F401 -- registers store-sparse
    structured,  # noqa: F401 -- registers prune-channels
    weights,  # noqa: F401 -- registers prune-weights
)
