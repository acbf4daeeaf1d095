"""The peers' own tools, as reference points of ``compress auto``'s Pareto report.

What a user would reach for instead of graphpress, run on the same float ONNX file and data:

* ONNX Runtime ``quantize_static`` -- QDQ, per-channel int8 weights, uint8 activations (U8S8: the
  fast combination on x86; the default S8S8 is slower than float there), min/max calibration on
  the same calibration inputs;
* ONNX Runtime ``quantize_dynamic`` -- int8 weights, activations quantized at run time (convs
  become the slow ``ConvInteger``).

They are measured like every candidate (quality on the evaluation inputs, latency in the same
interleaved timing run, file size) and plotted, never chosen. A peer that fails on a model is
left out with its reason in the record.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def ort_static_u8s8(fp32: Path, out: Path, calibration: Sequence[np.ndarray]) -> Path:
    """``quantize_static`` QDQ, per-channel weights, uint8 activations, on ``calibration`` chunks."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    with _quiet():
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{name: c} for c in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with _quiet():
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def ort_dynamic(fp32: Path, out: Path) -> Path:
    """``quantize_dynamic``: int8 weights per channel, activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


PEERS = {
    "ORT quantize_static U8S8": "static",
    "ORT quantize_dynamic": "dynamic",
}


def make_peers(fp32: Path, folder: Path, calibration: tuple[Any, ...]) -> tuple[dict[str, Path], dict[str, str]]:
    """Quantize ``fp32`` with each peer tool into ``folder``; ``(paths, failures)`` by peer name.

    Single-input models only (the calibration reader feeds one tensor)."""
    x = calibration[0].numpy() if hasattr(calibration[0], "numpy") else np.asarray(calibration[0])
    chunks = [x[i:i + 32] for i in range(0, len(x), 32)]
    paths: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for name, kind in PEERS.items():
        out = folder / f"peer-{kind}.onnx"
        try:
            paths[name] = ort_static_u8s8(fp32, out, chunks) if kind == "static" else ort_dynamic(fp32, out)
        except Exception as err:  # noqa: BLE001 -- a peer that cannot handle the model is a finding, not a failure
            failed[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    return paths, failed


__all__ = ["PEERS", "make_peers", "ort_dynamic", "ort_static_u8s8"]
