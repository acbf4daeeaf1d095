"""Polynomial activations for fully encrypted (CKKS) inference: fitted polynomials instead of
ReLU/GELU/SiLU, average- instead of max-pooling.

Importing this package registers ``polynomial-activations``.
"""

from graphpress.passes.polyact import activations, fit

__all__ = ["activations", "fit"]
