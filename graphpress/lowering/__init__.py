"""Lowering: target code shared between the IR and the backends.

The IR (:mod:`graphpress.ir`) defines the graph and the ``graphpress::`` ops with their eager and
fake kernels; what turns those ops into a target's vocabulary lives here, one subpackage per
target family, so that several backends (and the passes' cost models, for :mod:`graphpress.lowering.he`)
share one copy:

* :mod:`graphpress.lowering.onnx` -- the onnxscript translations of every ``graphpress::`` op
  (``custom_translation_table`` of ``torch.onnx.export``), used by the ONNX Runtime backend and
  by anything else that exports ONNX.
* :mod:`graphpress.lowering.he` -- the HE kernels' operation counts and the per-operation
  seconds that price them: pure arithmetic (no HE library), shared by the HE backend and the
  ``circulant-search`` pass's cost model, the one part of this layer passes may import.

Layering (``pyproject.toml``, ``lint-imports``): frontends | backends | passes > lowering > ir.
Code that only one backend uses stays in that backend.
"""
