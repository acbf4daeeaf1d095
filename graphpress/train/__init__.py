"""Recovery fine-tuning: distill a compressed graph from the original on unlabelled inputs.

See :mod:`graphpress.train.distill` and ``docs/finetune.md``.
"""

from graphpress.train.distill import (
    DistillConfig,
    DistillResult,
    distill,
    distill_loss,
    load_inputs,
    resolve_trainable,
    trainable_targets,
)

__all__ = ["DistillConfig", "DistillResult", "distill", "distill_loss", "load_inputs", "resolve_trainable", "trainable_targets"]
