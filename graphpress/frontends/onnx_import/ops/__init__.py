"""ONNX op converters, one module per op family.  Importing this package registers them all."""

from . import activations, elementwise, linalg, nn, reduce, shape  # noqa: F401
