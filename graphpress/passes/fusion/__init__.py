"""Fusion passes: exact rewrites that merge adjacent ops (batch-norm folding, linear + activation)
and the block-region annotations that backends compile as one kernel each.

Importing this package registers ``fold-batchnorm``, ``fuse-linear-activation`` and ``fuse-blocks``.
"""

from graphpress.passes.fusion import blocks, fold_batchnorm, linear_activation  # noqa: F401

__all__ = ["blocks", "fold_batchnorm", "linear_activation"]
