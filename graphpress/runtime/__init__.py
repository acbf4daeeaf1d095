"""Artifacts and the runtime: write an artifact folder atomically, load it, run it, time it.

Loading and running an ONNX artifact needs numpy and onnxruntime only; nothing here imports torch.

>>> from graphpress.runtime import load
>>> model = load("out/resnet20")            # doctest: +SKIP
>>> (logits,) = model(images)               # doctest: +SKIP
"""

from graphpress.runtime.artifact import Artifact, IOSpec, Prehashed, make_manifest, read_artifact, sha256_file, write_artifact
from graphpress.runtime.bench import BenchResult, LatencyComparison, benchmark, compare_latency
from graphpress.runtime.generate import Sampling, generate
from graphpress.runtime.load import LoadedModel, load, register_loader

__all__ = [
    "Artifact",
    "BenchResult",
    "IOSpec",
    "LatencyComparison",
    "LoadedModel",
    "Prehashed",
    "Sampling",
    "benchmark",
    "compare_latency",
    "generate",
    "load",
    "make_manifest",
    "read_artifact",
    "register_loader",
    "sha256_file",
    "write_artifact",
]
