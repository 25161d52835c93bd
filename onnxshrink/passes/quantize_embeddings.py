"""Embedding tables (the data of a `Gather`) in every quantize mode: int8 per row, or n-bit blocks per row.

Before:                              After (int8, the default):
    ids ──► Gather ◄── E (f32 [V, D])     ids ──► Gather ◄── Eq (int8 [V, D]) ──► Cast(float) ──► Mul ──► rows
                                          ids ──► Gather ◄── Es (f32 [V, 1]) ─────────────────────┘
                                     After (--bits 2/4, blockwise mode):
                                          ids ──► com.microsoft.GatherBlockQuantized(Eq uint8 packed, Es [V, D/block])
                                     A table also read by another node (tied to an output projection,
                                     MatMul(x, Transpose(E)) or Gemm transB, or anything else):
                                          Eq ──► Cast ──► Mul(Es [V, 1]) ──► E' read by every reader (folded_weights)
                                     Tied to output projections only, --bits 2/4 (symmetric): one set of codes
                                          B [V, D/block, block*bits/8], Es [V, D/block] read by GatherBlockQuantized
                                          (then Reshape to ids' shape + [D]) and by MatMulNBits (N = V, K = D)

One scale per row because the rows are what is gathered. Why only the gathered rows are decoded and not the
whole table folded at load (bench/embedding_forms.py; onnxruntime 1.32, [30522, 384], ids [8, 128], 1 thread):
the decoded form loaded 4-15x faster and holds half the memory of the folded one (which rebuilds the fp32
table at load: 33 vs 73 MiB), for +0.1 ms per batch of 8 x 128 ids (0.32 vs 0.21 ms), nothing beside an
encoder's tens of ms. A tied table keeps the folded form, which both readers use from one int8 copy (the
integer-kernel form of the projection would need a second, transposed copy), except in the n-bit mode, where
MatMulNBits' weight layout is the table's own rows cut in blocks, so both ops read the same codes. GatherBlockQuantized ran its
uint8-packed codes 7-20x faster than int4-typed ones (0.6 vs 4.7-13 ms at 8 x 128 ids), so the codes are
written uint8, low bits first, zero point 2^(bits-1) when symmetric (the op's default, as MatMulNBits').

Each quantize pass asks `EmbeddingPlan` which tables it will rewrite before its own layers are chosen (a tied
table's MatMul/Gemm is then left to this module), and calls `apply` after its own rewrite, so no node it holds
moves and unnamed nodes keep the names `inspect` shows.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxshrink.algorithms import gptq as gptq_mod
from onnxshrink.passes.common import (NONFINITE, Names, attr, drop_unused_initializers, ensure_opset,
                                      initializer_owners, nonfinite)
from onnxshrink.passes.folded_weights import FOLDED, add_folded, folded_opset, quantize_folded
from onnxshrink.report import LayerDecision

PER_ROW = "int8 per-row embedding, weight-only (rows decoded after the Gather)"
SHARED = FOLDED + " (table shared with an embedding Gather, stored once)"
MS_DOMAIN = "com.microsoft"


@dataclass
class _Table:
    name: str
    shape: list
    nbytes: int
    gathers: list = field(default_factory=list)  # (node name, output name) of each Gather axis 0 reading it
    others: list = field(default_factory=list)  # (node name, op type, output name) of every other reader
    skip: str = ""  # why the table stays float
    # The tied readers as output projections y = x @ E^T (Gemm transB, or MatMuls reading Transpose(E)):
    # (node name, op type, output, x) each; None when some other reader is not one.
    projections: list | None = None


# An embedding table of fewer rows than this (token types, segments) is gathered by every token: its int8 rounding is
# one offset shared by all of them, for a saving of a few KB. MiniLM's token-type table (2 x 384, one channel 15x
# its rows' rms: 3.4% int8 error) cost static int8 top-5 neighbour overlap 0.951 -> 0.938 and worst cosine
# 0.9968 -> 0.9961 on its own (docs/benchmarks-transformer.md).
FEW_ROWS = 64
FEW_ROWS_REASON = ("{rows}-row table, read by every token: its int8 rounding would shift all of them alike, for a "
                   "saving of a few KB")


class EmbeddingPlan:
    """The 2-D float tables that Gathers read in the main graph, chosen before a pass rewrites anything."""

    def __init__(self, model: onnx.ModelProto, records: dict, exclude: tuple = (), enabled: bool = True, read=None):
        self.tables: dict[str, _Table] = {}
        if not enabled:
            return
        graph = model.graph
        main = {t.name for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        names = [node.name or f"{node.op_type}_{index}" for index, node in enumerate(graph.node)]
        scales = row_scales(graph)
        constant = _constants(graph)
        gathered = set()  # positions of the Gathers that pick rows
        for position, (node, name) in enumerate(zip(graph.node, names)):
            if (node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2
                    or node.input[0] not in main or node.input[0] in scales or node.input[1] in constant
                    or int(attr(node, "axis", 0)) != 0):
                continue  # constant indices: a codebook's decoding, or a lookup onnxruntime folds at load
            record = records.get(node.input[0])
            if record is None or record.dtype not in ("float", "float16", "bfloat16", "double"):
                continue
            table = self.tables.setdefault(record.name, _Table(record.name, record.shape, record.nbytes))
            table.gathers.append((name, node.output[0]))
            gathered.add(position)
        for position, (node, name) in enumerate(zip(graph.node, names)):
            for index, value in enumerate(node.input):
                table = self.tables.get(value)
                if table is not None and not (position in gathered and index == 0):
                    table.others.append((name, node.op_type, node.output[0] if node.output else ""))
        for table in self.tables.values():
            record = records[table.name]
            table.skip = self._judge(table, record, graph, outputs, exclude, read)
            if table.others and not table.skip:
                table.projections = _projections(graph, names, table, outputs)

    @staticmethod
    def _judge(table, record, graph, outputs, exclude, read) -> str:
        if any(fnmatch.fnmatchcase(name, pattern) for name, _ in table.gathers for pattern in exclude):
            return "excluded (--exclude)"
        if record.dtype != "float":
            return f"table is {record.dtype}: only float32 tables are quantized"
        if len(table.shape) != 2:
            return f"table has shape {table.shape}: only 2-D [rows, width] tables are quantized"
        if record.is_graph_input:
            return "table is also a graph input: a caller may override it at run time, so it stays float"
        if table.name in outputs:
            return "table is also a graph output"
        if len(record.consumers) != len(table.gathers) + len(table.others):
            return "also read inside an If/Loop/Scan body"
        if not record.compressible:
            return record.reason
        if table.shape[0] < FEW_ROWS:
            return FEW_ROWS_REASON.format(rows=table.shape[0])
        if read is not None:
            tensor = next(t for t in graph.initializer if t.name == table.name)
            if nonfinite(read(tensor)):
                return NONFINITE
        return ""

    @property
    def tied(self) -> set[str]:
        """Tables some other node reads too: they get the folded form, which serves every reader."""
        return {t.name for t in self.tables.values() if not t.skip and t.others}

    def take_tied(self, sites: list) -> list:
        """The pass's sites less the layers whose weight is a tied table (apply folds those with the table)."""
        tied = self.tied
        return [site for site in sites if site.weight not in tied]

    def drop_skipped(self, skipped: list) -> list:
        """The pass's kept-float decisions less those about a tied table's readers (apply gives theirs)."""
        tied = self.tied
        return [d for d in skipped if d.weight not in tied]

    def apply(self, model: onnx.ModelProto, tensors, bits: int = 8, block_size: int = 0, symmetric: bool = True,
              accuracy_level: int = 4, notes: list | None = None) -> tuple[list[LayerDecision], bool]:
        """Rewrite the planned tables in place (after the pass's own rewrite); one decision per reader.
        `block_size` > 0: the blockwise mode's --bits and --block-size. Returns the decisions and whether anything
        changed."""
        decisions: list[LayerDecision] = []
        if not self.tables:
            return decisions, False
        too_old = folded_opset(model, notes) if any(not t.skip for t in self.tables.values()) else None
        for table in self.tables.values():
            table.skip = table.skip or too_old or ""
        graph = model.graph
        owners = initializer_owners(model)
        names = Names(model)
        changed = False
        replace: dict[str, list] = {}  # Gather output -> nodes that compute it instead
        renamed: dict[str, str] = {}  # tied table -> decoded tensor
        front: list = []  # decoding of tied tables: initializers only, so it goes first
        for table in self.tables.values():
            if table.skip:
                for name, _ in table.gathers:
                    decisions.append(LayerDecision(name, "Gather", table.name, "kept float", table.skip,
                                                   table.nbytes, table.nbytes))
                continue
            if table.name not in owners:
                continue
            w = tensors.read(owners[table.name][1]).astype(np.float32, copy=False)
            before = int(w.nbytes)
            changed = True
            width = table.shape[1]
            if (table.others and table.projections and bits != 8 and block_size and not width % block_size
                    and symmetric):
                decisions.extend(self._shared_blockwise(model, table, w, bits, block_size, accuracy_level, tensors,
                                                        names, front, replace))
                continue
            if table.others:
                q, scale = quantize_folded(w, 0)
                del w
                base = names(table.name + "_int8")
                nodes, after = add_folded(tensors, graph, q, scale, base)
                front.extend(nodes)
                renamed[table.name] = base + "_dq"
                readers = ", ".join(sorted({op for _, op, _ in table.others}))
                why = (f"table also read by {readers}: folded at load into one fp32 table that every reader uses "
                       "(int8 in the file, stored once)")
                if bits != 8:
                    why += (f"; {bits}-bit codes are shared only with output projections (Gemm transB, MatMul of "
                            "Transpose(E)), symmetric, with a width that is a multiple of --block-size")
                first = True
                for name, _ in table.gathers:
                    decisions.append(LayerDecision(name, "Gather", table.name, FOLDED if first else SHARED, why,
                                                   before if first else 0, after if first else 0))
                    first = False
                for name, op, _ in table.others:
                    decisions.append(LayerDecision(name, op, table.name, SHARED, why, 0, 0))
                continue
            reason = ""
            if bits == 8 and block_size:
                reason = ("8 bits: int8 per row, which onnxruntime gathers faster than GatherBlockQuantized's 8-bit "
                          "blocks (bench/embedding_forms.py)")
            elif block_size and width % block_size:
                reason = f"width {width} is not a multiple of --block-size {block_size}: int8 per row instead"
            elif bits != 8:
                codes, scales, zeros = quantize_rows_blockwise(w, bits, block_size, symmetric)
                del w
                base = names(table.name + f"_q{bits}")
                tensors.add(graph, pack_rows(codes, bits), base)
                tensors.add(graph, scales, base + "_scale")
                inputs_extra = [base + "_scale"]
                after = codes.size * bits // 8 + scales.nbytes
                if zeros is not None:
                    packed = pack_rows(zeros, bits, fill=2 ** (bits - 1))
                    tensors.add(graph, packed, base + "_zero_point")
                    inputs_extra.append(base + "_zero_point")
                    after += packed.nbytes
                ensure_opset(model, 1, MS_DOMAIN)
                action = (f"int{bits} block {block_size} embedding" + ("" if symmetric else " asymmetric")
                          + ", weight-only (GatherBlockQuantized)")
                reason = reason or ("com.microsoft.GatherBlockQuantized decodes only the gathered rows "
                                    f"(uint8-packed codes, blocks of {block_size} along each row)")
                for index, (name, output) in enumerate(table.gathers):
                    node = _node_by_output(graph, output)
                    replace[output] = [helper.make_node(
                        "GatherBlockQuantized", [base, node.input[1]] + inputs_extra, [output],
                        name=names(name.replace("/", "_")) + "_GatherBlockQuantized", domain=MS_DOMAIN,
                        bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)]
                    decisions.append(LayerDecision(name, "Gather", table.name, action if index == 0 else action
                                                   + " (shared table)", reason, before if index == 0 else 0,
                                                   int(after) if index == 0 else 0))
                continue
            reason = reason or ("one scale per row, the rows being what is gathered; only the gathered rows are "
                                "decoded, so the table stays int8 in memory too")
            q, scale = quantize_folded(w, 0)  # scale [V, 1]
            del w
            base = names(table.name + "_int8")
            tensors.add(graph, q, base)
            tensors.add(graph, scale, base + "_scale")
            after = int(q.nbytes + scale.nbytes)
            for index, (name, output) in enumerate(table.gathers):
                node = _node_by_output(graph, output)
                stem = names(name.replace("/", "_") + "_rows")
                ids = node.input[1]
                replace[output] = [
                    helper.make_node("Gather", [base, ids], [stem + "_q"], name=stem + "_Gather", axis=0),
                    helper.make_node("Gather", [base + "_scale", ids], [stem + "_scale"], name=stem + "_ScaleGather",
                                     axis=0),
                    helper.make_node("Cast", [stem + "_q"], [stem + "_float"], to=TensorProto.FLOAT, name=stem + "_Cast"),
                    helper.make_node("Mul", [stem + "_float", stem + "_scale"], [output], name=stem + "_Mul")]
                decisions.append(LayerDecision(name, "Gather", table.name, PER_ROW if index == 0 else PER_ROW
                                               + " (shared table)", reason, before if index == 0 else 0,
                                               after if index == 0 else 0))
        if not changed:
            return decisions, False
        rewritten = list(front)
        for node in graph.node:
            if node.output and node.output[0] in replace:
                rewritten.extend(replace[node.output[0]])
                continue
            for index, value in enumerate(node.input):
                if value in renamed:
                    node.input[index] = renamed[value]
            rewritten.append(node)
        del graph.node[:]
        graph.node.extend(rewritten)
        drop_unused_initializers(model)
        return decisions, True

    @staticmethod
    def _shared_blockwise(model, table, w, bits, block_size, accuracy_level, tensors, names, front, replace):
        """One set of n-bit codes and scales for a table tied to output projections: GatherBlockQuantized picks
        rows, MatMulNBits multiplies by E^T, both from B [V, D/block, block*bits/8] (MatMulNBits' layout is the
        table's own rows cut in blocks: N = V, K = D)."""
        graph = model.graph
        rows, width = table.shape
        blocks = width // block_size
        codes, scales, _ = quantize_rows_blockwise(w, bits, block_size, True)
        base = names(table.name + f"_q{bits}")
        packed = pack_rows(codes, bits).reshape(rows, blocks, block_size * bits // 8)
        tensors.add(graph, packed, base)
        tensors.add(graph, scales, base + "_scale")
        tensors.add(graph, np.array([rows, blocks, 1], np.int64), base + "_scale_shape")
        tensors.add(graph, np.array([width], np.int64), base + "_width")
        front.append(helper.make_node("Reshape", [base + "_scale", base + "_scale_shape"], [base + "_scale3"],
                                      name=base + "_ScaleReshape"))
        ensure_opset(model, 1, MS_DOMAIN)
        after = int(packed.nbytes + scales.nbytes)
        before = int(w.nbytes)
        heads = ", ".join(name for name, op, _, x in table.projections if x is not None)
        action = f"int{bits} block {block_size} embedding, weight-only (GatherBlockQuantized, codes shared)"
        why = (f"table tied to {heads}: one set of {bits}-bit codes and scales serves GatherBlockQuantized "
               "(the gathered rows) and MatMulNBits (the projection)")
        decisions = []
        for index, (name, output) in enumerate(table.gathers):
            node = _node_by_output(graph, output)
            stem = names(name.replace("/", "_") + "_rows")
            ids = node.input[1]
            replace[output] = [
                helper.make_node("GatherBlockQuantized", [base, ids, base + "_scale3"], [stem + "_q"],
                                 name=stem + "_GatherBlockQuantized", domain=MS_DOMAIN, bits=bits,
                                 block_size=block_size, gather_axis=0, quantize_axis=2),
                helper.make_node("Shape", [ids], [stem + "_int32"], name=stem + "_Shape"),
                helper.make_node("Concat", [stem + "_int32", base + "_width"], [stem + "_out"], name=stem + "_Concat",
                                 axis=0),
                helper.make_node("Reshape", [stem + "_q", stem + "_out"], [output], name=stem + "_Reshape")]
            decisions.append(LayerDecision(name, "Gather", table.name, action if index == 0 else action + " (shared table)",
                                           why, before if index == 0 else 0, after if index == 0 else 0))
        level = {"accuracy_level": accuracy_level} if accuracy_level else {}
        for name, op, output, x in table.projections:
            if x is None:  # the Transpose: its MatMuls read the codes directly
                replace[output] = []
                continue
            stem = names(name.replace("/", "_"))
            replace[output] = [helper.make_node("MatMulNBits", [x, base, base + "_scale"], [output],
                                                name=stem + "_MatMulNBits", domain=MS_DOMAIN, K=width, N=rows,
                                                bits=bits, block_size=block_size, **level)]
            decisions.append(LayerDecision(name, op, table.name, f"int{bits} block {block_size} (rtn, table shared "
                                           "with the embedding Gather, stored once)", why, 0, 0))
        return decisions


def _projections(graph, names: list, table: _Table, outputs: set) -> list | None:
    """The table's other readers as output projections x @ E^T, or None if one of them is something else."""
    readers: dict[str, list] = {}
    for node, name in zip(graph.node, names):
        for value in node.input:
            readers.setdefault(value, []).append((node, name))
    found = []
    for name, op, output in table.others:
        node = next(n for n, m in zip(graph.node, names) if m == name)
        if (op == "Gemm" and node.domain in ("", "ai.onnx") and len(node.input) == 2 and node.input[1] == table.name
                and node.input[0] != table.name and attr(node, "transB", 0) == 1 and not attr(node, "transA", 0)
                and float(attr(node, "alpha", 1.0)) == 1.0):
            found.append((name, op, output, node.input[0]))
            continue
        users = readers.get(output, []) if op == "Transpose" else []
        if (op != "Transpose" or list(attr(node, "perm", [1, 0])) != [1, 0] or output in outputs or not users
                or any(u.op_type != "MatMul" or u.domain not in ("", "ai.onnx") or list(u.input) != [u.input[0], output]
                       or u.input[0] == output for u, _ in users)):
            return None
        found.append((name, op, output, None))
        found.extend((user_name, "MatMul", user.output[0], user.input[0]) for user, user_name in users)
    return found


def _constants(graph) -> set[str]:
    """Initializers and what nodes compute from them alone (the graph is topologically sorted)."""
    known = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.input and all(not name or name in known for name in node.input) and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            known.update(node.output)
    return known


def row_scales(graph) -> set[str]:
    """The scale tables of this form written by an earlier run: Mul(Cast(Gather(int8 table)), Gather(scales))."""
    int8 = {t.name for t in graph.initializer if t.data_type == TensorProto.INT8}
    producers = {o: n for n in graph.node for o in n.output}

    def source(name: str, op_type: str):
        node = producers.get(name)
        return node if node is not None and node.op_type == op_type and node.input else None

    found = set()
    for node in graph.node:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for rows, scale in (node.input, node.input[::-1]):
            cast = source(rows, "Cast")
            gathered = cast is not None and source(cast.input[0], "Gather")
            picked = source(scale, "Gather")
            if gathered and gathered.input[0] in int8 and picked is not None:
                found.add(picked.input[0])
    return found


def _node_by_output(graph, output: str):
    return next(node for node in graph.node if node.output and node.output[0] == output)


def quantize_rows_blockwise(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """Codes [V, D] (unsigned, 0..2^bits-1), scales [V, D/block] and zero points [V, D/block] (None when symmetric:
    the op's default 2^(bits-1)) of a table cut into blocks along each row, rounded as MatMulNBits' weights are."""
    quantized = gptq_mod.rtn(np.ascontiguousarray(np.asarray(w, np.float32).T), bits, block_size, symmetric)
    codes = np.ascontiguousarray(quantized.q.T)
    scales = np.ascontiguousarray(quantized.scales.T.astype(np.float32))
    zeros = None if symmetric else np.ascontiguousarray(quantized.zeros.T.astype(np.uint8))
    return codes, scales, zeros


def dequantize_rows_blockwise(codes, scales, zeros, bits: int, block_size: int) -> np.ndarray:
    """The table GatherBlockQuantized reads out: (code - zero) * scale, block by block along each row."""
    rows, width = codes.shape
    zero = np.full(scales.shape, 2 ** (bits - 1), np.float32) if zeros is None else zeros.astype(np.float32)
    blocks = codes.reshape(rows, width // block_size, block_size).astype(np.float32)
    return ((blocks - zero[..., None]) * scales[..., None]).reshape(rows, width)


def pack_rows(codes: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Unsigned codes packed along the last axis, low bits first: [V, m] -> uint8 [V, ceil(m*bits/8)]."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    per = 8 // bits
    pad = -codes.shape[-1] % per
    if pad:
        codes = np.concatenate([codes, np.full(codes.shape[:-1] + (pad,), fill, np.uint8)], axis=-1)
    grouped = codes.reshape(codes.shape[:-1] + (-1, per))
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per):
        packed |= (grouped[..., i] << (bits * i)).astype(np.uint8)
    return packed
