"""Streaming compression of decoder LLMs larger than memory: unit by unit from the checkpoint's
shards to an ONNX artifact with external data (see :mod:`graphpress.stream.engine`)."""

from graphpress.stream.engine import StreamOptions, StreamResult, UnitRecord, compress_stream, is_streamable

__all__ = ["StreamOptions", "StreamResult", "UnitRecord", "compress_stream", "is_streamable"]
