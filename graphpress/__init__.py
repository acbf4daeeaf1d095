"""graphpress: capture a model as a graph, run verified compression passes, export an optimized artifact."""

__version__ = "0.1.0"
