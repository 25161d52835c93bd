"""Blockwise low-bit weight quantization of MatMul/Gemm as onnxruntime's MatMulNBits kernel.

Before:                           After:
    X ──► MatMul ◄── W(f32 [K,N])     X ──► com.microsoft.MatMulNBits ──► Y
          [Add(bias)] ──► Y               B       uint8 [N, n_blocks, block_size*bits/8]
                                          scales  f32   [N, n_blocks]
    X ──► Gemm(W, C) ──► Y                [zero_points uint8 [N, ceil(n_blocks*bits/8)]]
                                          [bias f32 [N]: Gemm's beta*C]
                                      (a MatMul's Add stays a node; onnxruntime
                                       folds it into MatMulNBits' bias at load)

Each output column of W is cut along K into blocks of `block_size` weights with one
scale (and, asymmetric, one zero point) each: w = (q - zero) * scale, q in [0, 2^bits).
Codes are packed low bits first, block by block; when K is not a multiple of the block
size the last block is padded (code 0 past K, never read; attribute K keeps the real
size), as onnxruntime's MatMulNBitsQuantizer does, whose codes, scales and zero points
these match (tests). Symmetric writes no zero points: MatMulNBits then uses 2^(bits-1).

Why MatMulNBits written directly and not DequantizeLinear -> MatMul: onnxruntime only
fuses the QDQ form into MatMulNBits in simple cases (a Relu after the MatMul blocked the
fusion; blocks along axis 1 never fuse), and unfused it dequantizes on every run, slower
than fp32. Written directly, every layer runs the kernel; the tests check that on the
graph onnxruntime really runs.

Bit widths: onnxruntime 1.32's CPU MatMulNBits accepts 2, 4 and 8 bits and fails at
session creation for 3, 5, 6 and 7. Those are refused: their codes would have to live in
4- or 8-bit containers (DequantizeLinear int4/int8), the size of --bits 4 or 8 with less
accuracy, and unfused slower than fp32.

accuracy_level (MatMulNBits attribute): 0/1 compute with float32 activations, 4 quantizes
each block of activations to int8 inside the kernel. On onnxruntime 1.32 CPU (2048x2048
layer, 1 thread) 2 and 8 bits at level 0/1 ran 4-11x slower than fp32 (no fast float
kernel for them): they get level 4. At 4 bits the best level depends on the rows a layer
multiplies at once (bench/int4_speed.py, layers of 384x384 to 3072x768): level 4 ran
0.25-0.6x fp32 at 1 row, but at 512 rows (batch 8 x sequence 64) with blocks of 32 or 64
1.1-1.4x, where level 0 ran 0.9-1.0x; with blocks of 128 level 4 ran 0.6-1.0x at every
row count. So, unless accuracy_level is given: level 4 for blocks of 128 or more and for
layers whose input has no sequence axis (one row per sample); level 0 for a layer whose
input has one (a transformer's projections). This is why --bits 4 on all-MiniLM-L6-v2 ran
1.09x / 1.14x fp32 at batch 1 / 8 (level 4, blocks of 32) and onnxruntime's own
MatMulNBitsQuantizer (level 0, same codes, same graph otherwise: bias folded into the node
at load by both, no zero points, no g_idx) 0.98x / 0.85x.

Where no MatMulNBits form is faster than fp32 (4 bits, 131072 to 262143 weights: a 384x384
attention projection ran 1.07-1.3x fp32 at 64 rows in every form), the layer is written as
QuantizeDynamic writes it (int8 per channel, onnxruntime's integer kernel, 0.4x fp32), before
any MatMulNBits so GPTQ's captured inputs include it; its decision says so (integer_below=0
turns this off). Smaller layers keep MatMulNBits (0.85-1.1x fp32, where the integer kernel
was slower at one row).

Embedding tables (Gather data) get the same bits and blocks along each row, run by
com.microsoft.GatherBlockQuantized, which decodes only the gathered rows (passes/quantize_embeddings.py;
rounded to nearest with either algorithm: no layer input to weigh them by).

Algorithms: "rtn" rounds each weight to its block's grid; "gptq" (onnxshrink.algorithms.gptq)
quantizes each layer against the Hessian of its calibration inputs, layers in graph
order, each layer's inputs captured from the model with the layers before it already
quantized (as the GPTQ paper does), so later layers compensate earlier layers' error.
How that stays affordable on a 110M-parameter encoder (bench/gptq_scale.py, docs/benchmarks-int4.md):
each wave of layers runs only the part of the graph no earlier wave ran (passes/gptq_capture.py: the model
about once in all, not once per wave: 48 waves on all-mpnet-base-v2); layers reading one tensor (q, k, v)
share one X^T X, one factorization and one pass over the columns; padding tokens (attention_mask 0) are left
out of X^T X as the cluster and prune passes leave them out (their outputs are masked: fitting them spends
accuracy on nothing); the numerics run on the pass's thread budget of BLAS threads (gptq.blas_threads).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper

from onnxshrink.algorithms import gptq as gptq_mod
from onnxshrink.data import Dataset
from onnxshrink.model import iter_graphs
from onnxshrink.passes.common import (Names, Site, attr, begin_pass, drop_unused_initializers, ensure_opset,
                                      glob_literal, initializer_owners, output_shapes, select_layers)
from onnxshrink.passes.folded_weights import (FOLD_REQUESTED, INTEGER_MIN_MACS, fold_layers, fold_requested,
                                              folded_opset)
from onnxshrink.passes.gptq_capture import SegmentCapture
from onnxshrink.passes.quantize import embed, nothing_to_do
from onnxshrink.passes.prune_common import token_rows
from onnxshrink.passes.quantize_embeddings import EmbeddingPlan
from onnxshrink.progress import step
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.streaming import TensorStore
from onnxshrink.weights import find_tensors

SUPPORTED_OPS = ("MatMul", "Gemm")
# What onnxruntime 1.32's CPU MatMulNBits kernel accepts (3, 5, 6, 7 fail when the session is created).
SUPPORTED_BITS = (2, 4, 8)
ALGORITHMS = ("rtn", "gptq")
# accuracy_level when the config leaves it None (see the module docstring): 4 (int8 activations) for blocks of
# FAST_LEVEL_MIN_BLOCK or more and for 2/8 bits (no fast float kernel), 0 (float activations) for 4-bit smaller blocks.
FAST_LEVEL_MIN_BLOCK = 128
# 4-bit layers with INTEGER_MIN_MACS["dynamic"] <= K*N < INTEGER_BELOW_WEIGHTS run onnxruntime's int8 integer kernel
# instead of MatMulNBits (bench/int4_speed.py, onnxruntime 1.32, 2-core Xeon with AVX-512 VNNI/AMX, 1 thread): every
# MatMulNBits form of a 384x384 layer ran 1.07-1.3x fp32 at 64 rows, the integer kernel 0.4x at 1, 64 and 512 rows;
# from 256x1024 and 384x1536 up MatMulNBits at block 128 ran 0.6-1.0x. Below the floor MatMulNBits ran at fp32's
# speed (128x128, 256x256: 0.83-1.1x) and the integer kernel slower than fp32 at one row (1.34x at 128x128).
INTEGER_BELOW_WEIGHTS = 262144
MS_DOMAIN = "com.microsoft"


@dataclass
class BlockwiseConfig:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "rtn"  # "rtn" or "gptq"
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()  # glob patterns on node names
    keep_float: str | None = None  # "first", "last" or "both"
    accuracy_level: int | None = None  # MatMulNBits accuracy_level; None: by bits and block size (accuracy_level())
    # Layers with fewer weights run int8 integer kernels (QuantizeDynamic's form), not MatMulNBits; 0: never
    integer_below: int = INTEGER_BELOW_WEIGHTS
    act_order: bool = False  # gptq only: quantize columns by decreasing Hessian diagonal
    # Gather tables in blocks along each row, run by com.microsoft.GatherBlockQuantized (quantize_embeddings.py)
    embeddings: bool = True
    embedding_block_size: int | None = None  # the tables' blocks; None: block_size
    # None: asymmetric (all-MiniLM-L6-v2, 4 bits: mean-pooled cosine 0.9815 vs 0.9794 symmetric, 0.9856 vs 0.9830
    # with GPTQ, for 0.1% of fp32's bytes), symmetric when a table is tied to an output projection (its codes are
    # shared with that MatMulNBits only when symmetric; else it would be stored int8)
    embedding_symmetric: bool | None = None
    # Glob patterns on node names: these layers get the folded form (int8 storage, float kernel), not MatMulNBits
    # (the latency guard names the layers it measured slower than float; latency_guard.py).
    fold: tuple = ()


@dataclass
class _Layer:
    """What a site needs, read before any rewrite (rewrites insert nodes; node references may not survive)."""

    graph: onnx.GraphProto
    main_graph: bool
    name: str
    op_type: str
    weight: str
    x: str
    output: str
    key: tuple  # (weight, transposed, alpha): sites with one key share one quantized weight
    bias: str | None  # Gemm's C
    beta: float
    level: int  # MatMulNBits accuracy_level


@dataclass
class _Written:
    b: str
    scales: str
    zero_points: str | None
    k: int
    n: int
    bytes_before: int
    bytes_after: int


class QuantizeBlockwise:
    """MatMul/Gemm weights to 2/4/8-bit blocks along K, run by com.microsoft.MatMulNBits."""

    name = "quantize-blockwise"

    def __init__(self, config: BlockwiseConfig | None = None, calibration: Dataset | None = None, threads: int = 1,
                 tensors: TensorStore | None = None):
        self.config = config = config or BlockwiseConfig()
        self.calibration = calibration
        self.threads = threads
        self.tensors = tensors or TensorStore()
        if config.bits not in SUPPORTED_BITS:
            message = f"--bits {config.bits}: onnxruntime's MatMulNBits runs 2, 4 and 8 bits only"
            if 2 < config.bits < 8:
                container = 4 if config.bits < 4 else 8
                message += (f"; {config.bits}-bit codes would have to be stored in {container}-bit containers, "
                            f"as large as --bits {container} and less accurate")
            raise ValueError(message)
        for size in (config.block_size, config.embedding_block_size or config.block_size):
            if not isinstance(size, (int, np.integer)) or size < 16 or size & (size - 1):
                raise ValueError(f"--block-size {size}: MatMulNBits needs a power of two of at least 16 (16, 32, 64, 128, 256)")
        if config.algorithm not in ALGORITHMS:
            raise ValueError(f"--algorithm {config.algorithm!r}: choose rtn or gptq")
        if config.algorithm == "gptq" and calibration is None:
            raise ValueError("--algorithm gptq needs calibration data (--calibration FILE.npz): GPTQ minimizes each "
                             "layer's output error on those inputs")
        unknown = set(config.op_types) - set(SUPPORTED_OPS)
        if unknown:
            raise ValueError(f"unsupported op types for blockwise quantization: {', '.join(sorted(unknown))} (MatMul, Gemm)")
        if config.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level {config.accuracy_level}: MatMulNBits takes 0 to 4")

    @property
    def streams(self) -> bool:
        """RTN reads one weight at a time through self.tensors (onnxshrink.streaming can run it); GPTQ runs
        the model in onnxruntime to capture each layer's inputs, which needs its weights in memory."""
        return self.config.algorithm == "rtn"

    @property
    def accuracy_level(self) -> int:
        return self._level(self.config.block_size)

    def _level(self, block_size: int) -> int:
        """The configured level, else 4 (int8 activations) where that was measured fastest, else 0 (float)."""
        if self.config.accuracy_level is not None:
            return int(self.config.accuracy_level)
        return 4 if self.config.bits != 4 or block_size >= FAST_LEVEL_MIN_BLOCK else 0

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        model, report = begin_pass(model, self.name, asdict(self.config))
        records = {r.name: r for r in find_tensors(model)}
        owners = initializer_owners(model)
        embeddings = EmbeddingPlan(model, records, self.config.exclude, self.config.embeddings, self.tensors.read)
        sites, skipped = select_layers(model, records, SUPPORTED_OPS, self.config, self._judge(records),
                                       read=self.tensors.read)
        sites, skipped = embeddings.take_tied(sites), embeddings.drop_skipped(skipped)
        report.layers.extend(skipped)
        fold = [site for site in sites if fold_requested(site.name, self.config.fold)]
        if fold:
            report.layers.extend(self._fold(model, fold, records, report))
            records = {r.name: r for r in find_tensors(model)}
            owners = initializer_owners(model)
            embeddings = EmbeddingPlan(model, records, self.config.exclude, self.config.embeddings, self.tensors.read)
            sites = self._reselect(model, records, [site for site in sites if site not in fold])
        integer = {site.name: self._integer_reason(records[site.weight].shape) for site in sites}
        integer = {name: why for name, why in integer.items() if why}
        if integer:
            report.layers.extend(self._integer_layers(model, integer, sites, skipped, report))
            records = {r.name: r for r in find_tensors(model)}
            owners = initializer_owners(model)
            embeddings = EmbeddingPlan(model, records, self.config.exclude, self.config.embeddings, self.tensors.read)
            sites = self._reselect(model, records, [site for site in sites if site.name not in integer])
        table_block = self.config.embedding_block_size or self.config.block_size
        table_symmetric = self.config.embedding_symmetric
        if table_symmetric is None:  # a tied table shares its codes with a MatMulNBits projection only when symmetric
            table_symmetric = bool(embeddings.tied)
        options = {"bits": self.config.bits, "block_size": table_block, "symmetric": table_symmetric,
                   "accuracy_level": self._level(table_block)}
        if not sites:
            if not embed(model, embeddings, self.tensors, report, **options) and not report.changed:
                report.notes.append(nothing_to_do(model, "MatMul/Gemm weight"))
            return model, report
        ensure_opset(model, 1, MS_DOMAIN)
        self._names = Names(model)
        self._owners = owners
        main_outputs = {name for node in model.graph.node for name in node.output}
        shapes = output_shapes(model) if self.config.accuracy_level is None else {}
        layers = [self._layer(site, main_outputs, shapes) for site in sites]
        units: dict[tuple, list[_Layer]] = {}
        for layer in layers:
            units.setdefault(layer.key, []).append(layer)
        decisions: dict[int, LayerDecision] = {}
        if self.config.algorithm == "gptq":
            self._gptq(model, units, decisions, report)
        else:
            for unit in units.values():
                self._write(unit, gptq_mod.rtn(self._weight(unit[0]), self.config.bits, self.config.block_size,
                                               self.config.symmetric), decisions)
        report.layers.extend(decisions[id(layer)] for layer in layers)
        drop_unused_initializers(model)
        embed(model, embeddings, self.tensors, report, **options)
        report.notes.append(self._accuracy_note(layers))
        report.changed = True
        return model, report

    def _accuracy_note(self, layers) -> str:
        levels = sorted({layer.level for layer in layers}) or [self.accuracy_level]
        if self.config.accuracy_level is None and self.config.bits == 4 and self.config.block_size < FAST_LEVEL_MIN_BLOCK:
            rows = sum(layer.level == 0 for layer in layers)
            return (f"MatMulNBits accuracy_level 4 (int8 activations inside the kernel) for {len(layers) - rows} "
                    f"layer(s) with one row per sample, accuracy_level 0 (float32 activations) for {rows} whose input "
                    "has a sequence axis: "
                    f"at blocks under {FAST_LEVEL_MIN_BLOCK}, level 4 ran 0.3-0.6x fp32 at 1 row but 1.1-1.4x at "
                    "512 rows, level 0 0.9-1.0x there (bench/int4_speed.py)")
        level = levels[0]
        if level == 4:
            return ("MatMulNBits accuracy_level 4: onnxruntime quantizes each block of activations to int8 inside "
                    "the kernel (its fast CPU path); accuracy_level 1 keeps activations float32")
        text = f"MatMulNBits accuracy_level {level}: " + (
            "activations stay float32" if level in (0, 1) else f"{'fp16' if level == 2 else 'bf16'} compute where the CPU has it")
        if self.config.bits != 4:
            text += (f"; onnxruntime CPU has no fast kernel for {self.config.bits}-bit weights at this level and "
                     f"runs them several times slower than fp32 (measured 4-11x); accuracy_level 4 is fast")
        return text

    # ---- selection ---------------------------------------------------------------------

    def _judge(self, records):
        bits, block = self.config.bits, self.config.block_size

        def judge(node, record, constants):
            if record.dtype != "float" or len(record.shape) != 2:
                return f"weight is {record.dtype} {record.shape}: only 2-D float32 weights are quantized"
            if node.input[0] in records:
                return f"both {node.op_type} operands are constant"
            if node.op_type == "Gemm":
                if attr(node, "transA", 0):
                    return "Gemm with transA=1"
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
                if bias and float(attr(node, "beta", 1.0)) != 1.0 and bias not in constants:
                    return "Gemm with beta != 1 and a computed bias (the bias cannot be pre-scaled)"
                if bias and bias in records and records[bias].dtype != "float":
                    return f"Gemm bias is {records[bias].dtype}"
            k, n = record.shape[::-1] if node.op_type == "Gemm" and attr(node, "transB", 0) else record.shape
            after = packed_bytes(k, n, bits, block, self.config.symmetric)
            if after >= record.nbytes:
                return f"K={k} is small for blocks of {block}: quantized ({after} B) would not be smaller"
            return None

        return judge

    def _integer_reason(self, shape) -> str | None:
        """Why a [K, N] weight runs an int8 integer kernel instead of MatMulNBits, or None."""
        weights, floor = int(np.prod(shape)), INTEGER_MIN_MACS["dynamic"]
        if self.config.bits != 4 or not floor <= weights < self.config.integer_below:
            return None
        return (f"int8 integer kernel, not MatMulNBits: {floor} <= {weights} weights < {self.config.integer_below}, "
                "where MatMulNBits ran slower than fp32 at 64 rows and the integer kernel faster (bench/int4_speed.py)")

    def _integer_layers(self, model, integer: dict, sites, skipped, report) -> list[LayerDecision]:
        """Rewrite the layers named in `integer` (name -> why) in place as QuantizeDynamic writes int8 layers (before
        any MatMulNBits, so GPTQ's captured inputs see them); their decisions, each saying why not MatMulNBits."""
        from onnxshrink.model import handed_over
        from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic

        others = [site.name for site in sites if site.name not in integer] + [d.node for d in skipped]
        config = QuantizeConfig(op_types=SUPPORTED_OPS, exclude=tuple(glob_literal(name) for name in others),
                                symmetric=True, embeddings=False)
        with handed_over(model):
            rewritten, dynamic = QuantizeDynamic(config, tensors=self.tensors)(model)
        assert rewritten is model
        report.notes.extend(note for note in dynamic.notes if "nothing" not in note)
        decisions = [d for d in dynamic.layers if d.node in integer]
        for decision in decisions:
            decision.reason = "; ".join(r for r in (integer[decision.node], decision.reason) if r)
        return decisions

    def _fold(self, model, sites, records, report) -> list[LayerDecision]:
        """The layers the config's `fold` names, in the folded form (int8 storage, float kernel), before any other
        rewrite; kept float, with the reason, where the model's opset cannot take that form."""
        why = folded_opset(model, report.notes)
        if why:
            return [LayerDecision(site.name, site.node.op_type, site.weight, "kept float", f"{why}: left float instead "
                                  "of folded", records[site.weight].nbytes, records[site.weight].nbytes) for site in sites]
        report.changed = True
        return fold_layers(model, sites, {site.name: FOLD_REQUESTED for site in sites}, self.tensors)

    def _reselect(self, model, records, kept) -> list:
        """`kept` (sites chosen before the int8 rewrite) found again in the rewritten model, by output name;
        the original names stay (an unnamed node's index-based name may have shifted)."""
        from dataclasses import replace

        wanted = {site.node.output[0]: site.name for site in kept}
        again, _ = select_layers(model, records, SUPPORTED_OPS, replace(self.config, keep_float=None), self._judge(records),
                                 read=self.tensors.read)
        return [Site(s.graph, s.node, wanted[s.node.output[0]], s.weight) for s in again if s.node.output[0] in wanted]

    def _layer_level(self, x: str, shapes: dict) -> int:
        """4-bit blocks under 128: level 0 for an input with a sequence axis (many rows per sample, where level 4
        ran slower than fp32), else 4 (one row per sample, where level 4 ran 2x faster than level 0)."""
        level = self.accuracy_level
        if self.config.accuracy_level is None and level == 0 and len(shapes.get(x) or ()) < 3:
            return 4
        return level

    def _layer(self, site, main_outputs, shapes) -> _Layer:
        node = site.node
        gemm = node.op_type == "Gemm"
        transposed = gemm and bool(attr(node, "transB", 0))
        alpha = float(attr(node, "alpha", 1.0)) if gemm else 1.0
        bias = node.input[2] if gemm and len(node.input) > 2 and node.input[2] else None
        return _Layer(site.graph, node.output[0] in main_outputs, site.name, node.op_type, site.weight, node.input[0],
                      node.output[0], (site.weight, transposed, alpha), bias,
                      float(attr(node, "beta", 1.0)) if gemm else 1.0, self._layer_level(node.input[0], shapes))

    def _weight(self, layer: _Layer) -> np.ndarray:
        """The weight as MatMulNBits multiplies it: [K, N], Gemm's transB and alpha applied."""
        _, transposed, alpha = layer.key
        w = self.tensors.read(self._owners[layer.weight][1]).astype(np.float32, copy=False)
        if transposed:
            w = w.T
        if alpha != 1.0:
            w = w * np.float32(alpha)
        return np.ascontiguousarray(w)

    # ---- GPTQ ----------------------------------------------------------------------------

    def _gptq(self, model, units, decisions, report):
        """Waves of layers in graph order: each wave's inputs captured with every earlier wave quantized."""
        with gptq_mod.blas_threads(self.threads):  # the pass's thread budget holds for numpy's BLAS too
            self._gptq_waves(model, units, decisions, report)

    def _gptq_waves(self, model, units, decisions, report):
        config = self.config
        subgraph_units = [u for u in units.values() if not all(layer.main_graph for layer in u)]
        for unit in subgraph_units:
            self._write(unit, gptq_mod.rtn(self._weight(unit[0]), config.bits, config.block_size, config.symmetric),
                        decisions, algorithm="rtn",
                        reason="inside an If/Loop/Scan body, whose inputs cannot be captured: rounded to nearest")
        order = {node.output[0] if node.output else "": i for i, node in enumerate(model.graph.node)}
        pending = sorted((u for u in units.values() if all(layer.main_graph for layer in u)),
                         key=lambda u: min(order.get(layer.output, 0) for layer in u))
        capture = SegmentCapture(model, self.calibration.batches, self.threads)
        waves = errors_gptq = errors_rtn = 0
        units_total = len(pending)
        while pending:
            step("quantize: gptq layers", units_total - len(pending), units_total)
            wave, tainted = [], set()
            for unit in pending:
                if {layer.x for layer in unit} & tainted:
                    break
                wave.append(unit)
                tainted |= _downstream(model.graph, {layer.output for layer in unit})
            pending = pending[len(wave):]
            waves += 1
            # Units reading the same inputs (q, k and v) share one Hessian and are quantized as one [K, N1+N2+N3]
            # weight: GPTQ treats output columns independently, so the codes are those of each alone, for one
            # factorization and one pass over the columns instead of three.
            groups: dict[tuple, list] = {}
            for unit in wave:
                groups.setdefault(tuple(sorted({layer.x for layer in unit})), []).append(unit)
            readers = {layer.x: layer for unit in wave for layer in unit}
            names = sorted(readers)
            hessians = {xs: gptq_mod.Hessian(self._weight(units_[0][0]).shape[0]) for xs, units_ in groups.items()}
            for batch, values in capture.capture(names):
                grams: dict[str, tuple] = {}  # input -> (X^T X of its real-token rows, rows)
                for xs, hessian in hessians.items():
                    for x in xs:
                        if x not in grams:
                            value = values[x] if x in values else batch[x]
                            rows = token_rows(batch, value, readers[x])  # padding left out
                            flat = np.asarray(value, dtype=np.float32).reshape(-1, hessian.k)
                            if rows is not None:
                                flat = flat[rows]
                            grams[x] = (flat.T @ flat, flat.shape[0])
                        hessian.add_gram(*grams[x])
            for xs, units_ in groups.items():
                hessian = hessians[xs]
                weights = [self._weight(unit[0]) for unit in units_]
                joined = np.concatenate(weights, axis=1) if len(weights) > 1 else weights[0]
                result = gptq_mod.gptq(joined, hessian.h, config.bits, config.block_size, config.symmetric,
                                       act_order=config.act_order)
                start = 0
                for unit, w in zip(units_, weights):
                    part = result.columns(start, start + w.shape[1])
                    start += w.shape[1]
                    baseline = gptq_mod.rtn(w, config.bits, config.block_size, config.symmetric)
                    # Every output column counts: on MiniLM every second column gave twice the error (the
                    # residual stream's outlier channels carry most of ||X W||).
                    mine, theirs = hessian_errors(w, [part.dequantize(), baseline.dequantize()], hessian.h)
                    errors_gptq, errors_rtn = errors_gptq + mine, errors_rtn + theirs
                    self._write(unit, part, decisions,
                                reason=f"output error on calibration inputs {mine:.2%} (round-to-nearest: {theirs:.2%})")
            capture.invalidate({layer.output for unit in wave for layer in unit})
        report.notes.append(
            f"gptq: {self.calibration.samples} calibration sample(s), {sum(len(u) for u in units.values())} layer(s) in "
            f"{waves} wave(s); mean relative output error {errors_gptq / max(len(units) - len(subgraph_units), 1):.2%} "
            f"vs {errors_rtn / max(len(units) - len(subgraph_units), 1):.2%} round-to-nearest")

    # ---- writing -------------------------------------------------------------------------

    def _write(self, unit: list[_Layer], quantized: gptq_mod.BlockQuantized, decisions, algorithm=None, reason=""):
        config = self.config
        k, n = quantized.q.shape
        b, scales, zero_points = pack_matmulnbits(quantized, config.symmetric)
        owner_graph = self._owners[unit[0].weight][0]
        base = self._names(unit[0].weight + f"_q{config.bits}")
        self.tensors.add(owner_graph, b, base)
        self.tensors.add(owner_graph, scales, base + "_scale")
        if zero_points is not None:
            self.tensors.add(owner_graph, zero_points, base + "_zero_point")
        written = _Written(base, base + "_scale", base + "_zero_point" if zero_points is not None else None, k, n,
                           k * n * 4, sum(a.nbytes for a in (b, scales, zero_points) if a is not None))
        action = f"int{config.bits} block {config.block_size}" + ("" if config.symmetric else " asymmetric")
        algorithm = algorithm or config.algorithm
        for index, layer in enumerate(unit):
            self._rewrite(layer, written)
            decisions[id(layer)] = LayerDecision(
                layer.name, layer.op_type, layer.weight,
                f"{action} ({algorithm})" if index == 0 else f"{action} ({algorithm}, shared weight, quantized once)", reason,
                written.bytes_before if index == 0 else 0, written.bytes_after if index == 0 else 0)

    def _rewrite(self, layer: _Layer, written: _Written):
        graph = layer.graph
        index = next(i for i, node in enumerate(graph.node) if node.output and node.output[0] == layer.output)
        stem = self._names(layer.name.replace("/", "_"))
        inputs = [layer.x, written.b, written.scales, written.zero_points or ""]
        add = None
        if layer.bias is not None:
            bias = self._bias_vector(layer, written.n)
            if bias is not None:
                self.tensors.add(graph, bias, stem + "_bias")
                inputs += ["", stem + "_bias"]
            else:  # a [M, N] or computed C: Add it after the product
                addend = layer.bias
                if layer.beta != 1.0:
                    scaled = self.tensors.read(self._owners[layer.bias][1]).astype(np.float32) * np.float32(layer.beta)
                    self.tensors.add(graph, scaled, stem + "_bias")
                    addend = stem + "_bias"
                add = helper.make_node("Add", [stem + "_out", addend], [layer.output], name=stem + "_BiasAdd")
        while inputs and not inputs[-1]:
            inputs.pop()
        kwargs = {"accuracy_level": layer.level} if layer.level else {}
        node = helper.make_node("MatMulNBits", inputs, [stem + "_out" if add else layer.output], name=stem + "_MatMulNBits",
                                domain=MS_DOMAIN, K=written.k, N=written.n, bits=self.config.bits,
                                block_size=self.config.block_size, **kwargs)
        graph.node[index].CopyFrom(node)
        if add is not None:
            graph.node.insert(index + 1, add)

    def _bias_vector(self, layer: _Layer, n: int) -> np.ndarray | None:
        """beta * C as the [N] bias MatMulNBits adds, or None when C is computed or not broadcast along rows."""
        if layer.bias not in self._owners:
            return None
        c = self.tensors.read(self._owners[layer.bias][1]).astype(np.float32)
        if c.size == 1:
            c = np.full(n, c.reshape(()), dtype=np.float32)
        elif c.shape not in ((n,), (1, n)):
            return None
        return (c.reshape(n) * np.float32(layer.beta)).astype(np.float32)


def _downstream(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Every tensor of the (topologically sorted) graph computed from `names`, subgraph reads included."""
    tainted = set(names)
    for node in graph.node:
        reads = set(node.input)
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for sub in subgraphs:
                reads.update(name for g in iter_graphs(sub) for inner in g.node for name in inner.input)
        if reads & tainted:
            tainted.update(node.output)
    return tainted


def hessian_error(w: np.ndarray, w_q: np.ndarray, h: np.ndarray) -> float:
    """||X W - X W_q|| / ||X W|| from H = 2 X^T X / n alone: sqrt(tr(D^T H D) / tr(W^T H W))."""
    return hessian_errors(w, [w_q], h)[0]


def hessian_errors(w: np.ndarray, candidates: list, h: np.ndarray) -> list[float]:
    """hessian_error of each candidate for w, from one product of H with [W, D1, D2, ...].

    A reported figure, not a decision: float32 (the float64 products of a K=3072 layer took seconds)."""
    w = np.asarray(w, dtype=np.float32)
    n = w.shape[1]
    stacked = np.concatenate([w] + [w - np.asarray(c, dtype=np.float32) for c in candidates], axis=1)
    quadratic = np.sum(stacked * (np.asarray(h, dtype=np.float32) @ stacked), axis=0, dtype=np.float64)
    den = float(quadratic[:n].sum())
    if den <= 0:
        return [0.0 for _ in candidates]
    return [float(np.sqrt(max(float(quadratic[(i + 1) * n:(i + 2) * n].sum()), 0.0) / den)) for i in range(len(candidates))]


def packed_bytes(k: int, n: int, bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes of B, scales and zero points for a [K, N] weight."""
    blocks = -(-k // block_size)
    size = n * blocks * (block_size * bits // 8) + n * blocks * 4
    if not symmetric:
        size += n * (-(-blocks * bits // 8))
    return size


def pack_codes(codes: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Pack unsigned codes along the last axis, low bits first: [..., m] -> uint8 [..., ceil(m*bits/8)].

    A last byte left partly empty gets `fill` in its unused slots.
    """
    per = 8 // bits
    codes = np.asarray(codes, dtype=np.uint8)
    pad = -codes.shape[-1] % per
    if pad:
        codes = np.concatenate([codes, np.full(codes.shape[:-1] + (pad,), fill, dtype=np.uint8)], axis=-1)
    grouped = codes.reshape(codes.shape[:-1] + (-1, per))
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per):
        packed |= (grouped[..., i] << (bits * i)).astype(np.uint8)
    return packed


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 [..., bytes] -> codes [..., count]."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count].astype(np.uint8)


def pack_matmulnbits(quantized: gptq_mod.BlockQuantized, symmetric: bool):
    """MatMulNBits inputs from [K, N] codes: B [N, n_blocks, blob], scales [N, n_blocks], zero points or None."""
    bits, block = quantized.bits, quantized.block_size
    k, n = quantized.q.shape
    blocks = -(-k // block)
    codes = quantized.q.T  # [N, K]
    if blocks * block != k:  # rows past K are never read; code 0 there, as onnxruntime's quantizer writes
        codes = np.concatenate([codes, np.zeros((n, blocks * block - k), dtype=np.uint8)], axis=1)
    b = pack_codes(codes.reshape(n, blocks, block), bits)
    scales = np.ascontiguousarray(quantized.scales.T.astype(np.float32))
    # Unused zero-point slots hold the default zero point, as onnxruntime's quantizer writes them.
    zero_points = None if symmetric else pack_codes(np.ascontiguousarray(quantized.zeros.T), bits, 2 ** (bits - 1))
    return b, scales, zero_points
