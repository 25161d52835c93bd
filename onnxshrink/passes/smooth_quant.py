"""SmoothQuant before static int8: a LayerNorm's activation outliers moved into the weights that read it.

Before:                                              After:
    X ──► LayerNorm(γ, β) ──┬──► MatMul(W1)              X ──► LayerNorm(γ/s, β/s) ──┬──► MatMul(diag(s) W1)
                            ├──► MatMul(W2)                                          ├──► MatMul(diag(s) W2)
                            └──► Add (residual)                                      └──► Mul(s) ──► Add (residual)

Exact in float: every MatMul reading the norm's output gets the same s (one tensor feeds them,
and one uint8 scale quantizes it), and any other reader (a transformer's residual Add) reads
the output times s again, one elementwise Mul per norm. Why: MiniLM's LayerNorm outputs hold a
few channels 16x the median channel's maximum; with one per-tensor uint8 scale they cost most
of static int8's remaining error once MatMul outputs stay float. The numerics
(algorithms/smoothing.py) pick alpha per norm on the calibration data by the fake-quantized
layers' error, and leave a norm alone where no alpha measures better than none.

An attention's context (the input of its output projection) takes 1/s in the value projection
before it, exactly: each context channel is one value channel, moved by the heads' Reshape/Transpose
and mixed only across positions by softmax(QKᵀ)·V:

    X ──► MatMul(Wv) ──► Add(bv) ──► Reshape ──► Transpose ──► MatMul(P, ·) ──► Transpose ──► Reshape ──► MatMul(Wo)
    X ──► MatMul(Wv/s) ─► Add(bv/s) ─► ... (unchanged) ...                                      ──► MatMul(diag(s) Wo)

Any other activation read by such MatMuls (a GELU output) has no parameter to take 1/s, so a
Mul(1/s) is inserted before them, only where the error falls at least MUL_GAIN times (on MiniLM
the GELU outputs: cosine of mean-pooled embeddings 0.9964 -> 0.9981). Only the MatMuls the static
pass will run as integer kernels take a scale (`layers`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.algorithms.smoothing import ALPHAS, search_alpha
from onnxshrink.model import iter_graphs
from onnxshrink.passes.common import Names, begin_pass
from onnxshrink.passes.fold_layernorm import norm_parameters
from onnxshrink.report import PassReport
from onnxshrink.runtime import capture_activations


# Where no LayerNorm can absorb 1/s, a Mul is inserted (one elementwise pass over the tensor); it is written only
# where the fake-quantized error falls at least this many times.
MUL_GAIN = 1.5


@dataclass
class SmoothQuantConfig:
    alphas: tuple = ALPHAS
    rows: int = 2048  # calibration rows (tokens) per norm kept for the alpha search; the maxima use all rows
    seed: int = 0


@dataclass
class _Site:
    tensor: str  # the activation the MatMuls read
    norm: onnx.NodeProto | None  # the LayerNormalization that writes it and takes 1/s, else a Mul(1/s) is inserted
    matmuls: list  # MatMul nodes reading it as their activation, each with its own weight
    others: list  # any other reader: of a norm's output it gets the output times s back; else it reads it as before
    source: tuple = ()  # (weight, bias or None): a value projection whose output columns take 1/s (attention context)


class SmoothQuant:
    """Divide a LayerNorm's output channels by s and multiply the rows of the weights reading it by s."""

    name = "smooth-quant"

    def __init__(self, config: SmoothQuantConfig | None = None, calibration=None, threads: int = 1,
                 layers: set | None = None):
        """`layers`: output names of the MatMuls that may take a scale (those that will run integer kernels);
        None: every MatMul with a constant 2-D weight."""
        self.config = config or SmoothQuantConfig()
        self.layers = layers
        if calibration is None or not getattr(calibration, "batches", None):
            raise ValueError("SmoothQuant needs calibration data (a Dataset with at least one batch)")
        self.calibration = calibration
        self.threads = threads

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        model, report = begin_pass(model, self.name, asdict(self.config))
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        nested = {name for g in iter_graphs(graph) if g is not graph for n in g.node for name in n.input}
        sites = [site for site in _sites(graph, inits, self.layers) if site.tensor not in nested]
        if not sites:
            report.notes.append("smooth-quant: no LayerNormalization read by MatMuls with constant weights")
            return model, report
        samples, maxima = self._statistics(model, [site.tensor for site in sites])
        names = Names(model)
        inserted: dict[str, onnx.NodeProto] = {}  # tensor -> the Mul that goes right after its producer
        smoothed = 0
        for site in sites:
            out = site.tensor
            if out not in samples:
                continue  # no finite calibration row
            weights = [numpy_helper.to_array(inits[m.input[1]]).astype(np.float32) for m in site.matmuls]
            search = search_alpha(samples[out], weights, maxima[out], self.config.alphas)
            label = site.norm.name if site.norm is not None and site.norm.name else out
            # An inserted Mul costs a pass over the tensor at run time: it must buy a clear gain.
            needed = 1.0 if site.norm is not None or site.source else MUL_GAIN
            if search.alpha is None or search.error * needed >= search.baseline:
                report.notes.append(f"smooth-quant: {label} left as it is: no alpha in {list(self.config.alphas)} "
                                    f"beat none{'' if needed == 1.0 else f' {needed:g}x'} (fake-quantized error "
                                    f"{search.baseline:.3g})")
                continue
            s = search.scales.astype(np.float64)
            for matmul, w in zip(site.matmuls, weights):
                name = matmul.input[1]
                inits[name].CopyFrom(numpy_helper.from_array((w.astype(np.float64) * s[:, None]).astype(np.float32), name))
            base = names(out.replace("/", "_") + ("_unsmoothed" if site.norm is not None else "_smoothed"))
            if site.norm is not None:
                for index in (1, 2):
                    if len(site.norm.input) > index and site.norm.input[index]:
                        name = site.norm.input[index]
                        value = numpy_helper.to_array(inits[name]).astype(np.float64) / s
                        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
                moved, factor = site.others, search.scales
                how = f" (+1 Mul restoring it for {len(site.others)} other reader(s))" if site.others else ""
            elif site.source:
                weight, bias = site.source
                value = numpy_helper.to_array(inits[weight]).astype(np.float64) / s[None, :]
                inits[weight].CopyFrom(numpy_helper.from_array(value.astype(np.float32), weight))
                if bias is not None:
                    value = numpy_helper.to_array(inits[bias]).astype(np.float64)
                    value = value / s.reshape(value.shape)
                    inits[bias].CopyFrom(numpy_helper.from_array(value.astype(np.float32), bias))
                moved, factor = [], None
                how = " (1/s folded into the value projection's columns, through the attention)"
            else:
                moved, factor = site.matmuls, (1.0 / s).astype(np.float32)
                how = " (+1 Mul by 1/s before them)"
            if moved:
                graph.initializer.append(numpy_helper.from_array(factor, base + "_scale"))
                inserted[out] = helper.make_node("Mul", [out, base + "_scale"], [base + "_out"], name=base + "_Mul")
                for node in moved:
                    for i, name in enumerate(node.input):
                        if name == out:
                            node.input[i] = base + "_out"
            smoothed += 1
            report.notes.append(f"smooth-quant: {label} alpha {search.alpha:g} for {len(site.matmuls)} MatMul(s){how}: "
                                f"fake-quantized error {search.baseline:.3g} -> {search.error:.3g}")
        if inserted:
            ordered = [inserted[name] for name in [i.name for i in graph.input] if name in inserted]
            for node in graph.node:
                ordered.append(node)
                ordered.extend(inserted[name] for name in node.output if name in inserted)
            del graph.node[:]
            graph.node.extend(ordered)
        report.changed = smoothed > 0
        return model, report

    def _statistics(self, model, names):
        """Per norm output: a seeded sample of its rows and the per-channel max |x| over all calibration rows."""
        rng = np.random.default_rng(self.config.seed)
        batches = getattr(self.calibration, "batches", self.calibration)
        per_batch = max(1, -(-self.config.rows // max(len(batches), 1)))
        samples: dict[str, list] = {name: [] for name in names}
        maxima: dict[str, np.ndarray] = {}
        for values in capture_activations(model, names, batches, self.threads):
            for name in names:
                rows = np.asarray(values[name], np.float32)
                rows = rows.reshape(-1, rows.shape[-1])
                rows = rows[np.isfinite(rows).all(axis=1)]
                if not len(rows):
                    continue
                peak = np.abs(rows).max(axis=0)
                maxima[name] = peak if name not in maxima else np.maximum(maxima[name], peak)
                pick = rng.choice(len(rows), size=min(per_batch, len(rows)), replace=False)
                samples[name].append(rows[np.sort(pick)])
            del values
        return ({name: np.concatenate(parts) for name, parts in samples.items() if parts}, maxima)


def _sites(graph, inits, layers=None) -> list[_Site]:
    """Every activation some MatMuls with constant weights read: a norm's output (over the last axis, with γ/β its
    own constants) takes 1/s in γ and β; any other tensor gets a Mul(1/s) before those MatMuls."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    public = {v.name for v in graph.output}
    producers = {o: n for n in graph.node for o in n.output}

    def smoothable(reader, tensor) -> bool:
        weight = reader.input[1] if reader.op_type == "MatMul" and len(reader.input) == 2 else None
        value = inits.get(weight)
        return (reader.domain in ("", "ai.onnx") and reader.input[0] == tensor and value is not None
                and value.data_type == onnx.TensorProto.FLOAT and len(value.dims) == 2
                and len(readers.get(weight, [])) == 1 and (layers is None or reader.output[0] in layers))

    sites, seen = [], set()
    for node in graph.node:
        for tensor in node.input[:1]:
            if tensor in seen or tensor in inits or not smoothable(node, tensor):
                continue
            seen.add(tensor)
            matmuls = [r for r in readers[tensor] if smoothable(r, tensor)]
            taken = {id(m) for m in matmuls}
            others = list({id(r): r for r in readers[tensor] if id(r) not in taken}.values())
            channels = {inits[m.input[1]].dims[0] for m in matmuls}
            if len(channels) != 1:
                continue
            count = channels.pop()
            norm = next((n for n in graph.node if tensor in n.output), None)
            if norm is not None and not _takes_scale(norm, inits, readers, public, count):
                norm = None
            source = () if norm is not None or others else _value_projection(tensor, producers, readers, inits, public, count)
            sites.append(_Site(tensor, norm, matmuls, others, source or ()))
    return sites


def _value_projection(tensor, producers, readers, inits, public, channels):
    """(weight, bias) of the value projection whose output channels are `tensor`'s channels, through an attention
    (Reshape, Transpose(0,2,1,3), MatMul(P, V), Transpose(0,2,1,3), Reshape back), each step read by nothing else;
    None where the graph is anything else."""

    def step(name, op_type, perm=None):
        node = producers.get(name)
        values_read = [r for r in readers.get(name, []) if r.op_type not in ("Shape", "Size")]  # not the values
        if (node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx")
                or len(values_read) != 1 or name in public):
            return None
        if perm is not None:
            found = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if found != perm:
                return None
        return node

    heads = [0, 2, 1, 3]
    merge = producers.get(tensor)
    if merge is None or merge.op_type != "Reshape" or merge.domain not in ("", "ai.onnx"):
        return None
    back = step(merge.input[0], "Transpose", heads)
    mix = back and step(back.input[0], "MatMul")
    split_t = mix and step(mix.input[1], "Transpose", heads)
    split = split_t and step(split_t.input[0], "Reshape")
    if not split:
        return None
    current, bias = split.input[0], None
    add = step(current, "Add")
    if add is not None:
        constant = [name for name in add.input if name in inits]
        if len(constant) != 1 or len(readers.get(constant[0], [])) != 1:
            return None
        value = inits[constant[0]]
        if value.data_type != onnx.TensorProto.FLOAT or int(np.prod(value.dims)) != channels:
            return None
        bias = constant[0]
        current = next(name for name in add.input if name != bias)
    projection = step(current, "MatMul")
    if projection is None or len(projection.input) != 2 or projection.input[1] not in inits:
        return None
    weight = inits[projection.input[1]]
    if (weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 2 or weight.dims[1] != channels
            or len(readers.get(projection.input[1], [])) != 1):
        return None
    return projection.input[1], bias


def _takes_scale(norm, inits, readers, public, channels) -> bool:
    """Whether 1/s folds into this node exactly: a LayerNormalization over the last axis with its own fp32 γ (and β)."""
    params = norm_parameters(norm, inits, readers, public)
    return params is not None and all(inits[name].data_type == onnx.TensorProto.FLOAT
                                      and list(inits[name].dims) == [channels] for name in params)
