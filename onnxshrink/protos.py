"""Walking ONNX protos: graphs and their subgraphs, the tensors they hold, external-data references.

The lowest floor of model handling, with no onnxshrink imports: loading (model.py), packing, streaming and
the runtime all walk graphs, and a shared walker here keeps them from importing one another.
"""

from __future__ import annotations

from typing import Iterator

import onnx

# A tensor of fewer bytes stays in the graph when a model is written with external data (as onnx.save_model's
# size_threshold=1024 decides).
INLINE_LIMIT = 1024


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in If/Loop/Scan attributes, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def all_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and `Constant`-style tensor attributes of a graph and its subgraphs."""
    for g in iter_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point a tensor at `length` bytes at `offset` of the data file `location` (its raw_data is the caller's)."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
