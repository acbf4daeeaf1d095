"""Cleanup passes: exact graph simplifications (dead code, constant folding).

Importing this package registers ``eliminate-dead-code`` and ``fold-constants``.
"""

from graphpress.passes.cleanup import dead_code, fold_constants  # noqa: F401

__all__ = ["dead_code", "fold_constants"]
