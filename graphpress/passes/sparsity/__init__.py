"""Activation sparsity: ``sparsify-activations`` (TEAL, CHESS, WINA thresholds on linear-layer inputs).

Importing this package registers its passes.
"""

from graphpress.passes.sparsity import sparsify  # noqa: F401
