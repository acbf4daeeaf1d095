import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SHARED = Path(os.environ.get("GRAPHPRESS_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture
def shared_models() -> Path:
    models = SHARED / "models"
    if not models.is_dir():
        pytest.skip(f"{models} not found: real pretrained models live in ../shared beside the checkout")
    return models
