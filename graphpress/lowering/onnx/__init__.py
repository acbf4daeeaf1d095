"""ONNX translations of the ``graphpress::`` ops: one table for ``torch.onnx.export``.

``torch.onnx.export(ep, dynamo=True, custom_translation_table=table)`` lowers each op of
``table`` (``OpOverload -> onnxscript function``, trace mode) to standard ONNX and
``com.microsoft`` nodes. One module per op family, next to the op's definition in
:mod:`graphpress.ir`:

* :mod:`~graphpress.lowering.onnx.fused` -- ``linear_act``;
* :mod:`~graphpress.lowering.onnx.attention` -- ``gqa_cached``;
* :mod:`~graphpress.lowering.onnx.kv_cache` -- ``kv_quant_write`` (a marker, then packed-code cache storage);
* :mod:`~graphpress.lowering.onnx.circulant` -- ``circulant_linear``, ``circulant_conv2d``;
* :mod:`~graphpress.lowering.onnx.quant` -- ``qlinear``, ``qconv2d``, ``wlinear_nbits``, ``quantize_act``;
* :mod:`~graphpress.lowering.onnx.load` -- ``wlinear_load``, ``wembedding_load``;
* :mod:`~graphpress.lowering.onnx.sparse` -- ``sparse_linear``, ``sparse_linear_pc``;
* :mod:`~graphpress.lowering.onnx.sparse_store` -- ``sparse_unpack``;
* :mod:`~graphpress.lowering.onnx.common` -- constants and ``com.microsoft`` contrib ops, for all of them.

Choices of a lowering are arguments of :func:`translation_table`, never module state: two
exports with different choices can run side by side.
"""

from __future__ import annotations

from collections.abc import Callable

from graphpress.lowering.onnx import attention, circulant, fused, kv_cache, load, quant, sparse, sparse_store


def translation_table(*, circulant_linear: str = circulant.DEFAULT_LINEAR_LOWERING) -> dict[Callable, Callable]:
    """The ``custom_translation_table`` for every ``graphpress::`` op.

    Parameters
    ----------
    circulant_linear
        How ``graphpress::circulant_linear`` lowers: one of
        :data:`graphpress.lowering.onnx.circulant.LINEAR_LOWERINGS` (``"auto"``: the measured
        rule of :func:`graphpress.lowering.onnx.circulant.linear_lowering_for`).

    Returns
    -------
    dict
        A new dict ``OpOverload -> onnxscript function``; the caller may change it.

    Raises
    ------
    ValueError
        For an unknown ``circulant_linear`` lowering.
    """
    table: dict[Callable, Callable] = {}
    table.update(fused.translations())
    table.update(attention.translations())
    table.update(kv_cache.translations())
    table.update(circulant.translations(circulant_linear))
    table.update(quant.translations())
    table.update(load.translations())
    table.update(sparse.translations())
    table.update(sparse_store.translations())
    return table


#: The default table (``translation_table()``), for ``custom_translation_table=ONNX_TRANSLATIONS``.
#: Read-only by convention: build your own with :func:`translation_table` to change a lowering.
ONNX_TRANSLATIONS: dict[Callable, Callable] = translation_table()

__all__ = ["ONNX_TRANSLATIONS", "translation_table"]
