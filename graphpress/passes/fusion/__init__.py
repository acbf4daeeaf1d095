"""Fusion passes: exact rewrites that merge adjacent ops (batch-norm folding, linear + activation,
linears sharing an input) and the block-region annotations that backends compile as one kernel each.

Importing this package registers ``fold-batchnorm``, ``fuse-linear-activation``,
``fuse-parallel-linears`` and ``fuse-blocks``.
"""

from graphpress.passes.fusion import blocks, fold_batchnorm, linear_activation, parallel_linears  # noqa: F401

__all__ = ["blocks", "fold_batchnorm", "linear_activation", "parallel_linears"]
