"""Shared fixtures for pass tests: seeding, capture, numeric before/after checks."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from graphpress.ir.graph import Graph


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def op_count() -> Callable[..., int]:
    """``op_count(graph, *targets)``: number of ``call_function`` nodes calling one of ``targets``."""
    return lambda graph, *targets: sum(1 for _ in graph.call_nodes(*targets))


@pytest.fixture
def tensor_names() -> Callable[[Graph], set[str]]:
    """``tensor_names(graph)``: names of all parameters and buffers on the graph module."""

    def _names(graph: Graph) -> set[str]:
        gm = graph.gm
        return {n for n, _ in gm.named_parameters(remove_duplicate=False)} | {
            n for n, _ in gm.named_buffers(remove_duplicate=False)
        }

    return _names


@pytest.fixture
def capture() -> Callable[..., Graph]:
    """``capture(module, *shape)``: eval-mode capture with a dynamic batch on a random input."""

    def _capture(module: torch.nn.Module, *shape: int, dtype=torch.float32) -> Graph:
        x = torch.randn(*shape, dtype=dtype)
        graph = Graph.capture(module.eval(), (x,))
        assert graph.dynamic_batch, graph.source
        return graph

    return _capture


@pytest.fixture
def assert_same_function() -> Callable[..., None]:
    """``assert_same_function(before, after, batches=(2, 5), exact=False)``: outputs of the two
    graphs agree (allclose, or bit-identical with ``exact``) at every batch size, and ``after``
    passes :meth:`Graph.verify` at each of them."""

    def _check(before: Graph, after: Graph, batches=(2, 5), exact: bool = False, **tol) -> None:
        for i, batch in enumerate(batches):
            inputs = before.random_inputs(seed=100 + i, batch=batch)
            ref = before.run(*inputs)
            out = after.run(*inputs)
            assert len(ref) == len(out)
            for r, o in zip(ref, out):
                assert r.shape[0] == batch
                if exact:
                    torch.testing.assert_close(o, r, rtol=0, atol=0)
                else:
                    torch.testing.assert_close(o, r, **tol)
            after.verify(inputs)
        after.verify()

    return _check
