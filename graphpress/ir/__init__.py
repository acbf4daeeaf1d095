"""The graphpress IR: :class:`Graph` over an ATen-level FX graph from ``torch.export``."""

from graphpress.ir.compare import compare_outputs, kl_divergence, sqnr_db, tolerance, top1_agreement
from graphpress.ir.graph import Graph, TensorSpec, op_name
import graphpress.ir.ops  # noqa: F401,E402 -- registers torch.ops.graphpress.* wherever the IR is used
import graphpress.ir.ops_attention  # noqa: F401,E402
import graphpress.ir.ops_kvcache  # noqa: F401,E402

__all__ = ["Graph", "TensorSpec", "op_name", "compare_outputs", "kl_divergence", "sqnr_db", "tolerance", "top1_agreement"]
