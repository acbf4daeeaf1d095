"""ONNX Runtime GenAI as the tests drive it: greedy generation from an artifact folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def genai_greedy(folder: str | Path, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """The tokens ONNX Runtime GenAI generates greedily from ``folder`` (its genai_config.json):
    the prompt then ``new_tokens`` more; the test is skipped where the wheel is not installed."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'graphpress[llm]')")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(prompt.shape[1]) + int(new_tokens), do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]
