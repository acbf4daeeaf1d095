"""The ``torch`` backend: a ``torch.export`` program (``model.pt2``) run by torch itself.

It is the backend for graphpress ops that only torch executes fast, e.g. the activation-sparse
``graphpress::sparse_linear`` (its CPU kernel skips the weight rows of zeroed inputs; ONNX Runtime
runs the same graph densely).
"""

from graphpress.backends.torch.lower import MODEL_FILE, TorchBackend, TorchRunner

__all__ = ["MODEL_FILE", "TorchBackend", "TorchRunner"]
