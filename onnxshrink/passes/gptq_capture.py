"""Layer inputs captured wave after wave by running only the part of the graph not run yet.

GPTQ quantizes a model's layers in graph order, each wave of layers against inputs captured from the model with
every earlier wave already quantized. Capturing by running the graph from its inputs every wave costs one run of
(up to) the whole model per wave: 48 waves on all-mpnet-base-v2, which did not finish in 15 minutes. Here each
wave runs only the nodes between the tensors kept from the waves before (the frontier: tensors computed already
and still read by a node not run yet, such as the residual stream and the attention mask's expansion) and the
wave's inputs, so all waves together run the model about once.

    wave 1:  inputs ─► [embeddings, LayerNorm] ─► X1                     (X1 kept: q, k, v and the residual read it)
    wave 2:  X1, mask ─► [q, k, v quantized, attention] ─► ctx1           (ctx1 kept: the output projection reads it)
    wave 3:  ctx1, X1 ─► [o quantized, Add, LayerNorm] ─► X2 ...

The values are those a run of the whole model gives (optimizations off, as runtime.capture_activations runs it):
a kept tensor is upstream of no layer quantized since it was computed (one that is gets dropped and recomputed).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxshrink.runtime import make_session, outer_names, without_graph


class SegmentCapture:
    """`capture(names)` -> [(batch, {name: value})] over the calibration batches, each call running only the nodes
    that earlier calls did not; `invalidate(outputs)` after rewriting the layers that write `outputs`."""

    def __init__(self, model: onnx.ModelProto, batches: list, threads: int = 1):
        self.model, self.batches, self.threads = model, batches, threads
        self.cache: dict[str, list] = {}  # frontier tensor -> its value for each batch
        self.done: set[tuple] = set()  # nodes run (by their outputs) whose outputs are still valid
        self.runs = 0
        self.nodes_run = 0

    def capture(self, names: list[str]) -> list[tuple[dict, dict]]:
        graph = self.model.graph
        inputs = {i.name for i in graph.input}
        constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        producers = {o: node for node in graph.node for o in node.output if o}
        wanted = [n for n in dict.fromkeys(names) if n not in self.cache and n not in inputs]
        keep, fed, stack, seen = set(), set(), list(wanted), set()
        while stack:
            name = stack.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            if name in self.cache or (name in inputs and name not in constants):
                fed.add(name)
                continue
            node = producers.get(name)
            if node is None or name in constants or id(node) in keep:
                continue
            keep.add(id(node))
            stack.extend(node.input)
            stack.extend(outer_names(node))
        segment = [node for node in graph.node if id(node) in keep]
        done = self.done | {_key(node) for node in segment}
        read_later = set()
        for node in graph.node:
            if _key(node) not in done:
                read_later.update(node.input)
                read_later.update(outer_names(node))
        produced = {o for node in segment for o in node.output if o}
        frontier = {o for node in graph.node if _key(node) in done for o in node.output if o in read_later}
        outputs = sorted((set(wanted) | (frontier & produced)))
        values: list[dict] = []
        if outputs:
            session = make_session(self._segment_model(segment, fed, inputs, outputs), self.threads, optimize=False)
            self.runs += 1
            self.nodes_run += len(segment)
            for index, batch in enumerate(self.batches):
                feed = {n: (self.cache[n][index] if n in self.cache else batch[n]) for n in fed}
                values.append(dict(zip(outputs, session.run(outputs, feed))))
        else:
            values = [{} for _ in self.batches]
        cache = {}
        for name in frontier:
            if name in self.cache:
                cache[name] = self.cache[name]
            elif name in produced and all(isinstance(v[name], np.ndarray) for v in values):
                cache[name] = [v[name] for v in values]
        # A node whose output could not be kept must run again when a later wave reads it.
        lost = frontier - set(cache)
        self.done = {key for key in done if not set(key) & lost}
        result = []
        for index, batch in enumerate(self.batches):
            found = {n: (self.cache[n][index] if n in self.cache else values[index].get(n)) for n in names if n not in inputs}
            result.append((batch, {n: v for n, v in found.items() if v is not None}))
        self.cache = cache
        return result

    def invalidate(self, outputs: set[str]) -> None:
        """Forget every kept tensor (and run node) computed from `outputs`: their layers were just rewritten."""
        graph = self.model.graph
        tainted = set(outputs)
        for node in graph.node:
            if (set(node.input) | outer_names(node)) & tainted:
                tainted.update(o for o in node.output if o)
        self.cache = {name: value for name, value in self.cache.items() if name not in tainted}
        self.done = {key for key in self.done if not set(key) & tainted}

    def _segment_model(self, segment, fed, graph_inputs, outputs) -> onnx.ModelProto:
        model, graph = self.model, self.model.graph
        out = without_graph(model)
        out.graph.name = graph.name
        out.graph.input.extend(i for i in graph.input if i.name in fed)
        for name in sorted(fed - graph_inputs):
            array = self.cache[name][0]
            out.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(array.dtype), [None] * array.ndim))
        out.graph.node.extend(segment)
        needed = {n for node in segment for n in node.input} | {n for node in segment for n in outer_names(node)}
        out.graph.initializer.extend(t for t in graph.initializer if t.name in needed and t.name not in fed)
        out.graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed)
        out.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)  # types: onnxruntime infers
        return out


def _key(node) -> tuple:
    return tuple(node.output)
