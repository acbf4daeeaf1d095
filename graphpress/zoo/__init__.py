"""Reference models for tests, benchmarks and examples.

Every factory is a plain function ``factory(**kwargs) -> nn.Module`` returning a module
in eval mode with a method ``example_inputs(batch=2) -> tuple[Tensor, ...]`` that gives
deterministic inputs. Users refer to them as ``"package.module:factory"``, e.g.
``graphpress.zoo.resnet20:resnet20``.

* :data:`MODELS` - randomly initialised factories by short name (no files needed);
* :data:`PRETRAINED` - loaders of the real checkpoints in ``../shared/models``
  (see :mod:`graphpress.zoo.paths`; they raise ``FrontendError`` when absent).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from graphpress.zoo.digits import DigitsCNN, accuracy, digits_cnn, digits_data, train_digits_cnn
from graphpress.zoo.hf_tiny import HFLogits, save_tiny_hf, tiny_bert, tiny_gpt2, tiny_llama, wrap_hf_model
from graphpress.zoo.llama2c import (
    Llama2c,
    ModelArgs,
    is_llama2c_file,
    llama2c_tiny,
    load_llama2c,
    next_token_cross_entropy,
    sample,
)
from graphpress.zoo.paths import resnet20_checkpoint_path, shared_models_dir, stories260k_path
from graphpress.zoo.resnet20 import ResNet20, load_resnet20, resnet20

#: Randomly initialised reference models by short name.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "digits-cnn": digits_cnn,
    "llama2c-tiny": llama2c_tiny,
    "tiny-bert": tiny_bert,
    "tiny-gpt2": tiny_gpt2,
    "tiny-llama": tiny_llama,
}

#: Loaders of the pretrained checkpoints in ``../shared/models``.
PRETRAINED: dict[str, Callable[..., nn.Module]] = {
    "resnet20-cifar10": load_resnet20,
    "stories260k": load_llama2c,
}

__all__ = [
    "MODELS",
    "PRETRAINED",
    "DigitsCNN",
    "HFLogits",
    "Llama2c",
    "ModelArgs",
    "ResNet20",
    "accuracy",
    "digits_cnn",
    "digits_data",
    "is_llama2c_file",
    "llama2c_tiny",
    "load_llama2c",
    "load_resnet20",
    "next_token_cross_entropy",
    "resnet20",
    "resnet20_checkpoint_path",
    "sample",
    "save_tiny_hf",
    "shared_models_dir",
    "stories260k_path",
    "tiny_bert",
    "tiny_gpt2",
    "tiny_llama",
    "train_digits_cnn",
    "wrap_hf_model",
]
