"""Fusion passes: exact rewrites that merge adjacent ops (batch-norm folding, linear + activation).

Importing this package registers ``fold-batchnorm`` and ``fuse-linear-activation``.
"""

from graphpress.passes.fusion import fold_batchnorm, linear_activation  # noqa: F401

__all__ = ["fold_batchnorm", "linear_activation"]
