"""The quantizers users would pick instead of graphpress, run on the same fp32 ONNX file / module.

* ONNX Runtime ``quantize_static`` (QDQ, per-channel weights) with int8 (S8S8, the default) or
  uint8 (U8S8) activations, calibrated (min/max) on the same calibration inputs graphpress uses,
  after ``quant_pre_process`` (``skip_symbolic_shape=True``: needed on transformer graphs);
* ONNX Runtime ``quantize_dynamic`` (int8 weights, per-tensor or per-channel; uint8 dynamic
  activations): MatMuls become ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``, convs
  ``ConvInteger``;
* torch.ao ``quantize_dynamic`` (deprecated in torch 2.13 but still what many users reach for):
  ``nn.Linear`` -> ``DynamicQuantizedLinear``, run in torch eager.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def ort_quantize_dynamic(fp32: Path, out: Path, *, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


def _preprocessed(fp32: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = fp32.with_name(fp32.stem + ".pre.onnx")
    if not pre.exists():
        with quiet():
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    return pre


def ort_quantize_static(fp32: Path, out: Path, calibration: Sequence[np.ndarray], *, activations: str) -> Path:
    """Per-channel QDQ with ``activations`` ``"int8"`` (S8S8) or ``"uint8"`` (U8S8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    pre = _preprocessed(fp32)
    import onnx

    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: x} for x in calibration])

        def get_next(self):
            return next(self.it, None)

    act = QuantType.QInt8 if activations == "int8" else QuantType.QUInt8
    with quiet():
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8)
    return out


def torch_ao_dynamic(module: torch.nn.Module) -> torch.nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with quiet():
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def torch_runner(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), quiet():
            return module(torch.from_numpy(x)).float().numpy()

    return run


__all__ = ["ort_quantize_dynamic", "ort_quantize_static", "quiet", "torch_ao_dynamic", "torch_runner"]
