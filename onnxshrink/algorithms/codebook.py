"""Scalar codebooks in numpy: weighted 1-D k-means and a least-squares refit of the codebook values.
Knows nothing about ONNX (passes/cluster.py writes the graph).

Values come as rows [R, n]: one row per codebook (R = 1 for a whole tensor, R = C for one
codebook per output channel). Each row gets `levels` sorted centroids; with `reserve_zero`
entry 0 is exactly 0.0, every exact zero maps to it and no other value does, so pruned
zeros survive and index 0 is the background symbol `pack` codes as gaps.

k-means (Lloyd) in one dimension, vectorized over rows: each row is sorted once (or, when
long, reduced to a weighted histogram of BINS bins, which keeps the cost linear), and then
a cluster is a contiguous run of the sorted values, so one iteration is a batched
`searchsorted` of the midpoints between centroids plus differences of prefix sums: O(L log n)
per row and iteration, never a Python loop per weight. Two initialisations, the weighted
quantiles and a linear grid over [min, max] (Deep Compression's choice: it keeps the rare
large weights), are run to convergence and the lower weighted squared error wins per row.

Entropy form (`form="entropy"`): `pack` Huffman-codes the indices, so what a codebook costs is the entropy of its
indices, not log2(levels). k-means spends its entries where the values are dense, which evens out their use: the
16-entry codebooks of MiniLM's layers code at 3.6-3.7 bits. Evenly spaced entries (a uniform grid) with a step sized
to the same weighted error use more entries, unevenly: at equal error they code 0.15-0.3 bits a weight smaller at
3-4 bits and up to 0.8 at 6 (entropy-coded uniform quantization is near-optimal at these rates; fixed-rate Lloyd-Max
is not). The grid is kept only where its indices code smaller than k-means' and it fits MAX_GRID_LEVELS entries.
Its entries are the grid's cells that some value rounds to, not every cell between the extremes: a heavy tail is
where the grid gains most, and there the cells between a few far weights are empty (a MiniLM recipe's 8-bit layers:
grids of 317-1082 steps using 122-313 of them, docs/benchmarks-compress.md). MiniLM's FFN output layers (a weight
40-80 standard deviations out) pack into 4.0-5.3 bits where k-means' 32-256 entries packed into 4.6-7.9. (A limit
on the span, as first built, sent an 8-bit layer whose tail reached 1082 steps back to k-means at 7.9 bits where
the grid coded 5.2.) Past 256 entries the pass stores uint16 indices (passes/cluster.wide_grid_order), which `pack`
codes as two byte planes. With exact zeros kept at index 0 (pruned weights, a padding row), the grid is the odd
multiples of half its step, so no small weight rounds to 0.

Refit (with calibration data): with the assignments fixed, a layer's output X W(c) is
linear in the codebook values c, so the values that best reproduce the teacher's outputs Y
solve a (levels x levels) normal equation per codebook, A c = r with A_j = E_j^T G E_j and
r_j = E_j^T X^T y_j, E_j the one-hot assignment of output column j and G = X^T X. With a bias,
X and Y are centred first and the bias is solved afterwards. A small ridge towards the k-means
values keeps unused entries where they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxshrink.algorithms.gptq import inverse_cholesky_upper

LLOYD_ITERATIONS = 300
BINS = 16384  # rows longer than 4 * BINS are fitted on a weighted histogram of this many bins
REFIT_DAMPING = 1e-4
REFIT_FLOPS = 2e10  # K^2 * N * levels budget of a per-channel refit (about a second); larger layers are not refit
SUBSET_FLOPS = 5e9  # a per-layer codebook past this builds its normal equations from a subset of columns
CHUNK_BYTES = 32 * 1024 * 1024
GPTQ_DAMP = 0.01  # ridge added to H's diagonal, as a fraction of its mean (the GPTQ paper's 1%)
GPTQ_LAZY_BLOCK = 128  # inputs rounded before their error is folded into the rest in one matrix product
FORMS = ("kmeans", "entropy")
MAX_LEVELS = 256  # uint8 indices: the most entries a k-means codebook may have
# The most entries (cells used) an entropy-form grid may have (uint16 indices past 256): the refit's normal
# equations are levels x levels (8 MB at 1024) and a layer's subset of columns shrinks as 1/levels.
MAX_GRID_LEVELS = 1024
GRID_FACTORS = np.geomspace(3.0, 0.5, 48)  # grid steps tried, times the step whose uniform error is the target
GRID_BISECTIONS = 8
GRID_MIN_GAIN = 0.02  # bits a weight an entropy-form grid must save over k-means to replace it
# The entropy form's error bound for a layer fitted to data (GPTQ rounding, refit), as a fraction of k-means'
# weighted error. At equal weight error the grids' output errors after GPTQ and refit were higher (MiniLM, a fixed
# 4.40-bit allocation: cosine 0.9900 -> 0.9879 for a 4.4% smaller pack); at 0.65 x the error the model's cosine was
# k-means' own, the layers' indices 2% smaller. Tables and layers without data are coded at nearest entry: 1.0.
DATA_AWARE_GRID_MARGIN = 0.65
UNIFORM_SLICE = 1 << 20  # elements uniform_mse takes to float64 at once
# elements a long row's histogram (_support) and nearest entries (assign) take at once: MPNet's word table (23M
# values) as whole float64 and int64 temporaries held 1.4 GB while it was priced
SLICE = 1 << 20


def fit(values: np.ndarray, levels: int, weights: np.ndarray | None = None, reserve_zero: bool = False,
        iterations: int = LLOYD_ITERATIONS, form: str = "kmeans", margin: float = 1.0) -> np.ndarray:
    """Sorted codebooks [R, levels] (float64) for the rows of `values` [R, n], weighted k-means; `form` "entropy":
    for one row, an evenly spaced codebook [1, L <= 256] of at most `margin` x k-means' weighted error whose
    indices have a lower entropy, where there is one (see the module's docstring)."""
    if form not in FORMS:
        raise ValueError(f"codebook form {form!r}: choose from {', '.join(FORMS)}")
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).copy()
    if reserve_zero:
        w[v == 0] = 0.0
    empty = w.sum(axis=1) <= 0  # every weight of the row is zero (or reserved): fall back to plain counts
    if np.any(empty):
        w[empty] = 1.0 if not reserve_zero else (v[empty] != 0)
    free = levels - 1 if reserve_zero else levels
    points, mass = _support(v, w)
    best, best_sse = None, None
    for init in (_quantile_init, _linear_init):
        centroids = _lloyd(points, mass, init(points, mass, free), iterations)
        sse = _sse(points, mass, centroids)
        if best is None:
            best, best_sse = centroids, sse
        else:
            better = sse < best_sse
            best[better], best_sse[better] = centroids[better], sse[better]
    out = np.zeros((v.shape[0], levels))
    out[:, levels - free:] = best
    if form == "entropy" and v.shape[0] == 1:
        zeros = int(np.count_nonzero(v == 0)) if reserve_zero else 0
        # unweighted, the support's mass is that count already (w: ones, zeros reserved)
        count = mass[0] if weights is None else _support(v, (v != 0).astype(np.float64) if reserve_zero
                                                         else np.ones_like(v))[1][0]
        grid = entropy_grid(points[0], mass[0], count, out[0, levels - free:], zeros, margin)
        if grid is not None:
            return np.concatenate([np.zeros(1), grid])[None, :] if reserve_zero else grid[None, :]
    return out


def entropy_grid(points: np.ndarray, mass: np.ndarray, count: np.ndarray, books: np.ndarray,
                 zeros: int = 0, margin: float = 1.0) -> np.ndarray | None:
    """Evenly spaced codebook values for sorted `points` of weight `mass`, whose weighted squared error is at most
    `margin` x that of `books` (k-means') and whose indices (counted by `count`) have the lower entropy,
    by at least GRID_MIN_GAIN bits; None when no grid of at most MAX_GRID_LEVELS entries does. The values are the
    multiples of a step that some point rounds to (the empty cells between a tail's far weights are left out); with
    `zeros` (exact zeros kept at an entry 0 of their own, not in `points`' counts) they are the odd multiples of
    half a step, so the small weights next to the zeros do not round to 0."""
    used = count > 0
    total = float(np.sum(mass))
    target = margin * float(np.sum(mass * (points - books[_nearest(points, books)]) ** 2))
    if not np.any(used) or total <= 0 or target <= 0:
        return None
    half = 0.5 if zeros else 0.0
    room = MAX_GRID_LEVELS - (1 if zeros else 0)

    def cells(step):
        return np.rint(points / step - half)

    def fits(step):
        q = cells(step)
        entries = 1 + int(np.count_nonzero(np.diff(q[used])))  # points are sorted: the distinct cells used
        return entries <= room and float(np.sum(mass * (points - (q + half) * step) ** 2)) <= target

    base = float(np.sqrt(12.0 * target / total))
    factors = [f for f in GRID_FACTORS if fits(base * f)]
    if not factors:
        return None
    good = factors[0]  # the widest step that fits; the next wider one tried did not (or is the first tried)
    wider = next((f for f in GRID_FACTORS[::-1] if f > good), None)
    if wider is not None:
        lo, hi = good, wider
        for _ in range(GRID_BISECTIONS):
            mid = float(np.sqrt(lo * hi))
            lo, hi = (mid, hi) if fits(base * mid) else (lo, mid)
        good = lo
    step = base * good
    # the cells used, counted without an array over the span: a far outlier puts it past 10^12 steps
    kept, which = np.unique(cells(step)[used], return_inverse=True)
    grid_counts = np.bincount(which.ravel(), weights=count[used])
    kmeans_counts = np.bincount(_nearest(points[used], books), weights=count[used])
    if entropy(np.append(grid_counts, zeros)) > entropy(np.append(kmeans_counts, zeros)) - GRID_MIN_GAIN:
        return None
    return (kept + half) * step


def _nearest(points: np.ndarray, books: np.ndarray) -> np.ndarray:
    return np.searchsorted((books[1:] + books[:-1]) / 2, points)


def entropy(counts: np.ndarray) -> float:
    """Bits a symbol that Huffman coding of symbols with these counts approaches (order-0 entropy)."""
    counts = counts[counts > 0]
    p = counts / np.sum(counts)
    return float(-np.sum(p * np.log2(p)))


def assign(values: np.ndarray, codebooks: np.ndarray, reserve_zero: bool = False) -> np.ndarray:
    """Index of the nearest codebook entry for every value of each row: int64 [R, n] (SLICE values at a time)."""
    values = np.asarray(values)
    start = 1 if reserve_zero else 0
    free = codebooks[:, start:]
    search = _RowSearch((free[:, 1:] + free[:, :-1]) / 2)
    idx = np.empty(values.shape, dtype=np.int64)
    width = max(1, SLICE // max(values.shape[0], 1))
    for first in range(0, values.shape[1], width):
        v = np.asarray(values[:, first:first + width], dtype=np.float64)
        found = search(v) + start
        if reserve_zero:
            found[v == 0] = 0
        idx[:, first:first + width] = found
    return idx


def gptq_assign(values: np.ndarray, codebooks: np.ndarray, hessian: np.ndarray, reserve_zero: bool = False,
                damp: float = GPTQ_DAMP, lazy_block: int = GPTQ_LAZY_BLOCK, keep: np.ndarray | None = None):
    """Indices [K, N] of a [K, N] weight (K inputs) into `codebooks` (one row for the layer, or one per output
    column), rounded as GPTQ rounds to its grid: input by input, each input's rounding error on the layer's
    outputs folded into the inputs not yet rounded, through the inverse of H = X^T X [K, K]. Nearest-entry
    rounding ignores that errors on correlated inputs can cancel; this is what lets 3-bit codebooks keep
    accuracy that 4 bits needed. With `reserve_zero`, exact zeros (pruned) stay at entry 0 and only they do;
    the error of keeping them there is compensated like any rounding (SparseGPT's mask). With `keep` ([K, N] bool:
    outliers stored exactly beside the codebook, SqueezeLLM's dense-and-sparse), those weights keep their own values
    and the updates folded into them count as their error, compensated on the inputs not yet rounded like any other;
    (indices, those values [K, N], 0 elsewhere) is returned. Letting them absorb the updates instead let them grow
    without bound where H is singular (MPNet's FFN outputs: 3072 inputs, 1530 calibration tokens): cosine 0.57."""
    k, n = values.shape
    kept = None if keep is None else np.asarray(keep, dtype=bool).T
    exact = None if keep is None else np.zeros((n, k))
    original = None if keep is None else np.asarray(values, dtype=np.float64).T
    books = np.asarray(codebooks, dtype=np.float64)
    per_column = books.shape[0] > 1
    w = np.asarray(values, dtype=np.float64).T.copy()  # [N, K]: inputs as columns, as in the paper
    pruned = (w == 0) if reserve_zero else np.zeros(w.shape, dtype=bool)
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0  # an input never nonzero: its weights cannot change the outputs
    h[dead, dead] = 1.0
    start = 1 if reserve_zero else 0
    free = books[:, start:]
    mid = (free[:, 1:] + free[:, :-1]) / 2  # [R, L-1] decision boundaries
    rows = np.arange(n)
    upper = inverse_cholesky_upper(h, damp)
    idx = np.empty((n, k), dtype=np.int64)
    for i1 in range(0, k, lazy_block):
        i2 = min(i1 + lazy_block, k)
        block, errors, u = w[:, i1:i2].copy(), np.zeros((n, i2 - i1)), upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            x = block[:, i]
            if per_column:
                choice = np.sum(x[:, None] > mid, axis=1) + start
                q = books[rows, choice]
            else:
                choice = np.searchsorted(mid[0], x) + start
                q = books[0, choice]
            choice = np.where(pruned[:, i1 + i], 0, choice)
            q = np.where(pruned[:, i1 + i], 0.0, q)
            if kept is not None:  # their own values: the updates they would absorb are compensated further on
                q = np.where(kept[:, i1 + i], original[:, i1 + i], q)
                exact[:, i1 + i] = np.where(kept[:, i1 + i], original[:, i1 + i], 0.0)
            idx[:, i1 + i] = choice
            err = (x - q) / u[i, i]
            block[:, i:] -= np.outer(err, u[i, i:])
            errors[:, i] = err
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return idx.T if keep is None else (idx.T, exact.T)


def decode(idx: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Values of [R, n] indices, each row read from its own codebook."""
    return np.take_along_axis(codebooks, idx, axis=1)


def uniform_mse(values: np.ndarray, levels: int) -> float:
    """Mean squared error of round-to-nearest on `levels` evenly spaced values over each row's [min, max].

    Summed in float64 over column slices of about UNIFORM_SLICE elements: a word table (MiniLM's, 11.7 M weights)
    in float64 at once took 100+ MB for a report statistic."""
    v = np.asarray(values)
    lo = v.min(axis=1, keepdims=True).astype(np.float64)
    hi = v.max(axis=1, keepdims=True).astype(np.float64)
    step = np.where(hi > lo, (hi - lo) / max(levels - 1, 1), 1.0)
    width = max(1, UNIFORM_SLICE // max(v.shape[0], 1))
    total = 0.0
    for start in range(0, v.shape[1], width):
        part = v[:, start:start + width].astype(np.float64)
        total += float(np.sum((part - (lo + np.clip(np.rint((part - lo) / step), 0, levels - 1) * step)) ** 2))
    return total / max(v.size, 1)


# ---------------------------------------------------------------- k-means internals

def _support(v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's points sorted ascending with their weights; long rows as a weighted histogram."""
    rows, n = v.shape
    if n <= 4 * BINS:
        order = np.argsort(v, axis=1, kind="stable")
        return np.take_along_axis(v, order, axis=1), np.take_along_axis(w, order, axis=1)
    lo, hi = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    offsets = np.arange(rows)[:, None] * BINS
    mass, total = np.zeros(rows * BINS), np.zeros(rows * BINS)
    width = max(1, SLICE // rows)
    for first in range(0, n, width):
        part, weight = v[:, first:first + width], w[:, first:first + width]
        bins = (np.clip(((part - lo) / span * BINS).astype(np.int64), 0, BINS - 1) + offsets).ravel()
        mass += np.bincount(bins, weights=weight.ravel(), minlength=rows * BINS)
        total += np.bincount(bins, weights=(weight * part).ravel(), minlength=rows * BINS)
    mass, total = mass.reshape(rows, BINS), total.reshape(rows, BINS)
    centres = lo + (np.arange(BINS) + 0.5) / BINS * span
    points = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), centres)
    return points, mass


class _RowSearch:
    """np.searchsorted of each row of needles in the same (sorted) row of `haystack`, all rows in one call.

    Rows are mapped into disjoint intervals (row r into [4r + 0.3, 4r + 2.7]) by a monotone, clipped
    transform, so one search over the concatenated haystack answers every row; the haystack's keys
    are computed once, for searches repeated with new needles (Lloyd iterations)."""

    def __init__(self, haystack: np.ndarray):
        self.rows, self.width = haystack.shape
        if self.rows == 1:
            self.keys = haystack[0]
            return
        lo, hi = haystack.min(axis=1, keepdims=True), haystack.max(axis=1, keepdims=True)
        self.lo, self.span = lo, np.where(hi > lo, hi - lo, 1.0)
        self.offset = 4.0 * np.arange(self.rows)[:, None] + 0.5
        self.keys = self._map(haystack).ravel()

    def _map(self, x: np.ndarray) -> np.ndarray:
        # Clipping keeps rows apart and does not change the answer: clipped needles stay beyond the haystack.
        return np.clip((x - self.lo) / self.span, -0.1, 1.1) * 2 + self.offset

    def __call__(self, needles: np.ndarray) -> np.ndarray:
        if self.rows == 1:
            return np.searchsorted(self.keys, needles[0])[None, :]
        found = np.searchsorted(self.keys, self._map(needles).ravel()).reshape(needles.shape)
        return found - np.arange(self.rows)[:, None] * self.width


def _prefix(a: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(a, axis=1)], axis=1)


def _quantile_init(points, mass, k):
    cumulative = _prefix(mass)[:, 1:]
    targets = cumulative[:, -1:] * (np.arange(k) + 0.5) / k
    pos = np.minimum(_RowSearch(cumulative)(targets), points.shape[1] - 1)
    return np.take_along_axis(points, pos, axis=1)


def _linear_init(points, mass, k):
    used = mass > 0
    lo = np.where(used, points, np.inf).min(axis=1, keepdims=True)
    hi = np.where(used, points, -np.inf).max(axis=1, keepdims=True)
    lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
    return lo + (hi - lo) * (np.arange(k) if k > 1 else np.array([0.5])) / max(k - 1, 1)


def _bounds(search, points, centroids):
    """Cluster i of each row is points[b[i]:b[i+1]] (`search` looks up in the sorted points)."""
    rows, n = points.shape
    inner = search((centroids[:, 1:] + centroids[:, :-1]) / 2)
    return np.concatenate([np.zeros((rows, 1), dtype=np.int64), inner, np.full((rows, 1), n)], axis=1)


def _lloyd(points, mass, centroids, iterations):
    s0, s1 = _prefix(mass), _prefix(mass * points)
    search = _RowSearch(points)
    centroids = np.sort(centroids, axis=1)
    previous = None
    for _ in range(iterations):
        bounds = _bounds(search, points, centroids)
        if previous is not None and np.array_equal(bounds, previous):
            break
        previous = bounds
        m0 = np.diff(np.take_along_axis(s0, bounds, axis=1), axis=1)
        m1 = np.diff(np.take_along_axis(s1, bounds, axis=1), axis=1)
        # An empty cluster keeps its centroid (sorted order is kept: means of consecutive runs are sorted).
        centroids = np.sort(np.where(m0 > 0, m1 / np.where(m0 > 0, m0, 1.0), centroids), axis=1)
    return centroids


def _sse(points, mass, centroids):
    idx = _RowSearch((centroids[:, 1:] + centroids[:, :-1]) / 2)(points)
    return np.sum(mass * (points - np.take_along_axis(centroids, idx, axis=1)) ** 2, axis=1)


# ---------------------------------------------------------------- refit against the teacher

@dataclass
class CodebookRefit:
    codebooks: np.ndarray  # [R, levels], effective (as the layer multiplies)
    bias: np.ndarray | None  # [N] when the Gram has a bias input
    error_before: float  # relative output error with the k-means codebooks (and the old bias)
    error_after: float
    columns: int  # output columns the normal equations were built from


def refit(idx: np.ndarray, codebooks: np.ndarray, gram, bias0: np.ndarray | None = None, keep_zero: bool = False,
          damping: float = REFIT_DAMPING, max_flops: float = REFIT_FLOPS,
          column_scale: np.ndarray | None = None, exact: np.ndarray | None = None,
          coded: np.ndarray | None = None) -> CodebookRefit | None:
    """Least-squares codebook values for a [K, N] layer whose weight is codebooks[idx] (one codebook,
    or one per output column when codebooks has N rows), fitted to the teacher outputs in `gram`
    (onnxshrink.algorithms.reconstruct.Gram: X^T X, X^T Y, ||Y||^2). None when a per-column refit
    would exceed `max_flops`; a per-layer codebook past SUBSET_FLOPS uses an even subset of the columns
    (a 16-entry codebook is well determined by a few dozen). `column_scale` [N]: the weight is codebooks[idx] x
    column_scale (cluster's channel scales), and the values are solved for as they are multiplied. `exact` [K, N]:
    values stored beside the codebook (outliers), which replace the decoded weight where `coded` [K, N] is false.
    Never worse than the k-means codebooks on the calibration data."""
    k, n = idx.shape
    levels = codebooks.shape[1]
    per_column = codebooks.shape[0] > 1 or n == 1
    g, p = gram.xtx[:k, :k], gram.xty[:k]
    if gram.bias:
        rows, s, t = gram.xtx[k, k], gram.xtx[:k, k], gram.xty[k]
        g = g - np.outer(s, s) / rows
        p = p - np.outer(s, t) / rows
    if exact is not None:  # the outliers' share of the outputs is fixed: the codebook fits what is left
        p = p - g @ exact
    cols = np.arange(n)
    cost = float(k) * k * n * levels
    if per_column and cost > max_flops:
        return None
    if not per_column and cost > SUBSET_FLOPS:
        cols = np.unique(np.linspace(0, n - 1, max(1, int(SUBSET_FLOPS // (float(k) * k * levels)))).astype(np.int64))
    a = np.zeros((len(cols) if per_column else 1, levels, levels))
    r = np.zeros((a.shape[0], levels))
    step = max(1, CHUNK_BYTES // (8 * k * levels * 2))
    for start in range(0, len(cols), step):
        part = cols[start:start + step]
        onehot = (idx[:, part, None] == np.arange(levels)).astype(np.float64)  # [K, c, L]
        if coded is not None:
            onehot *= coded[:, part, None]
        if column_scale is not None:  # d(weight)/d(value) is the column's scale, not 1
            onehot *= np.asarray(column_scale, dtype=np.float64)[None, part, None]
        ge = np.tensordot(g, onehot, axes=(1, 0))  # [K, c, L]
        if per_column:
            a[start:start + len(part)] = np.einsum("kcl,kcm->clm", onehot, ge)
            r[start:start + len(part)] = np.einsum("kcl,kc->cl", onehot, p[:, part])
        else:  # the same sums over k and c as one matrix product: the einsum did not use BLAS (256 levels: minutes)
            flat = onehot.reshape(-1, levels)
            a[0] += flat.T @ ge.reshape(-1, levels)
            r[0] += flat.T @ p[:, part].reshape(-1)
    free = np.arange(1 if keep_zero else 0, levels)
    af = a[:, free][:, :, free]
    lam = damping * max(float(np.mean(np.diagonal(af, axis1=1, axis2=2))), 1e-30)
    rhs = r[:, free] + lam * codebooks[:, free]
    new = codebooks.copy()
    new[:, free] = np.linalg.solve(af + lam * np.eye(len(free)), rhs[..., None])[..., 0]

    def weights(books):
        w = decode(idx.T, books).T if per_column else books[0][idx]
        w = w if column_scale is None else w * np.asarray(column_scale, dtype=np.float64)[None, :]
        return w if exact is None else np.where(coded, w, 0.0) + exact

    def augmented(w, b):
        return np.concatenate([w, b.reshape(1, n)], axis=0) if gram.bias else w

    w_old, w_new = weights(codebooks), weights(new)
    bias_old = np.zeros(n) if bias0 is None else np.asarray(bias0, dtype=np.float64).reshape(n)
    bias_new = (t - s @ w_new) / rows if gram.bias else None
    before = gram.error(augmented(w_old, bias_old))
    after = gram.error(augmented(w_new, bias_new)) if gram.bias else gram.error(w_new)
    if not after <= before:
        return CodebookRefit(codebooks, bias0 if gram.bias else None, before, before, len(cols))
    return CodebookRefit(new, bias_new, before, after, len(cols))


def outlier_mask(view: np.ndarray, fraction: float) -> np.ndarray | None:
    """[K, N] bool: the `fraction` of the weights largest in magnitude (ties included), or None (none asked, too few
    weights for one, or exact zeros: a pruned layer keeps its zeros at index 0 and gets no outliers)."""
    count = int(round(fraction * view.size))
    if count < 1 or np.any(view == 0):
        return None
    magnitude = np.abs(view)
    return magnitude >= np.partition(magnitude.ravel(), -count)[-count]
