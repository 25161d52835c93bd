"""The transformer bench's embedding metrics (bench/embedding_metrics.py) on small arrays with known answers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench_module(name: str):
    """A bench/ script as a module (numpy and the metrics only at import: no torch, no download), registered under
    its name, which its dataclasses look their module up by."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


metrics = _bench_module("embedding_metrics")


def test_mean_pool_ignores_padding():
    hidden = np.zeros((2, 3, 2), dtype=np.float32)
    hidden[0] = [[1, 0], [3, 2], [100, 100]]  # the third token is padding
    hidden[1] = [[2, 2], [4, 4], [6, 6]]
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_allclose(metrics.mean_pool(hidden, mask), [[2, 1], [4, 4]])


def test_row_cosines_scale_free_and_signed():
    ref = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    cand = np.array([[5.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(metrics.row_cosines(ref, cand), [1.0, -1.0, np.sqrt(0.5)])


def test_neighbours_exclude_self_and_sort_by_similarity():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    # Sentence 0's nearest is 1, then 3 (45 degrees), then 2 (90 degrees); never itself.
    assert metrics.neighbours(emb, 3)[0].tolist() == [1, 3, 2]


def test_topk_overlap_counts_shared_neighbours():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((30, 8))
    assert metrics.topk_overlap(ref, ref * 3.0, k=5) == 1.0
    # Swapping the embeddings of sentences changes who the neighbours are: overlap must drop, but stay in [0, 1].
    shuffled = ref[rng.permutation(30)]
    overlap = metrics.topk_overlap(ref, shuffled, k=5)
    assert 0.0 <= overlap < 0.5
    with pytest.raises(ValueError):
        metrics.topk_overlap(ref[:5], ref[:5], k=5)


def test_topk_overlap_partial():
    # Four points on a line: under the reference 0's nearest is 1; the candidate moves 3 next to 0.
    ref = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.5], [1.0, 2.0]])
    cand = ref.copy()
    cand[3] = [1.0, -0.05]
    ours, theirs = metrics.neighbours(ref, 1), metrics.neighbours(cand, 1)
    expected = np.mean(ours[:, 0] == theirs[:, 0])
    assert metrics.topk_overlap(ref, cand, k=1) == pytest.approx(expected)
    assert 0.0 < expected < 1.0


def test_ranks_average_ties():
    np.testing.assert_allclose(metrics.ranks(np.array([10.0, 20.0, 10.0, 5.0])), [2.5, 4.0, 2.5, 1.0])


def test_spearman_monotone_and_reversed():
    x = np.array([0.1, 0.4, 0.2, 0.9, 0.5])
    assert metrics.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert metrics.spearman(x, -x) == pytest.approx(-1.0)
    # Textbook example: d = rank differences (0, 1, -1, 0, 0) -> 1 - 6 * 2 / (5 * 24) = 0.9
    assert metrics.spearman(np.array([1, 2, 3, 4, 5.0]), np.array([1, 3, 2, 4, 5.0])) == pytest.approx(0.9)


def test_embedding_quality_identical_and_noisy():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((40, 16))
    same = metrics.embedding_quality(ref, ref.copy())
    assert same["cosine"] == pytest.approx(1.0) and same["topk"] == 1.0 and same["spearman"] == pytest.approx(1.0)
    noisy = metrics.embedding_quality(ref, ref + 0.5 * rng.standard_normal(ref.shape))
    assert noisy["cosine"] < 0.99 and noisy["min_cosine"] <= noisy["cosine"]
    assert noisy["spearman"] < same["spearman"] and noisy["topk"] < 1.0


def test_verdicts_say_met_or_missed_by_how_much():
    bench = _bench_module("transformer_bench")
    method = bench.Method("m", [], targets=[("cosine ≥ 0.997", "cosine", ">=", 0.997), ("b1 ≤ 0.45", "b1", "<=", 0.45),
                                            ("wall ≤ 90 s", "wall", "<=", 90.0)])
    text = bench.verdicts(method, {"cosine": 0.9937, "b1": 0.40, "wall": 131.0})
    assert text == "cosine ≥ 0.997: **missed by 0.0033**; b1 ≤ 0.45: met; wall ≤ 90 s: **missed by 41.0 s**"
    assert bench.verdicts(method, {"wall": 12.0}).startswith("cosine ≥ 0.997: not measured")
    assert bench.verdicts(bench.Method("reference", []), {"cosine": 0.5}) == "-"


def test_doc_command_leaves_out_the_note():
    bench = _bench_module("transformer_bench")
    argv = ["--quick", "--note", "shared machine", "--out", "x.md", "--note=other"]
    assert bench.shown_arguments(argv) == ["--quick", "--out", "x.md"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc")
def test_run_child_measures_its_own_peak_and_kills_past_the_limit(tmp_path):
    bench = _bench_module("transformer_bench")
    grown = bench.run_child([sys.executable, "-c", "import time; x = b'x' * 150_000_000; time.sleep(0.3)"], 30,
                            tmp_path / "grow.log")
    ballast = b"y" * 200_000_000  # a large parent: getrusage/wait4 would hand its high-water mark to the child
    small = bench.run_child([sys.executable, "-c", "import time; time.sleep(0.3)"], 30, tmp_path / "small.log")
    del ballast
    assert grown["rc"] == 0 and not grown["timed_out"]
    assert grown["rss_mb"] >= 140 and small["rss_mb"] < 100
    killed = bench.run_child([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, tmp_path / "killed.log")
    assert killed["timed_out"] and killed["rc"] != 0 and killed["wall"] < 10


def test_detector_boxes_kept_and_the_margin_at_the_cut():
    """bench/conv_tasks.det_score, the detector's task check: a lost or extra box counts unless, with a margin, it
    scores within the margin of the 0.1 cut (a score allowed to move by that much may cross it)."""
    tasks = _bench_module("conv_tasks")
    box = lambda x: np.array([[x, 0.0, x + 10.0, 10.0]])  # noqa: E731
    reference = [(np.concatenate([box(0), box(50), box(100)]), np.array([0.9, 0.12, 0.5]))]
    candidate = [(np.concatenate([box(1), box(100), box(200)]), np.array([0.85, 0.52, 0.13]))]  # 0.12 lost, 0.13 new
    strict = tasks.det_score(reference, candidate)
    assert (strict["boxes"], strict["matched"], strict["extra"], strict["kept"]) == (3, 2, 1, False)
    assert strict["max_score_change"] == pytest.approx(0.05)
    lenient = tasks.det_score(reference, candidate, margin=0.05)
    assert (lenient["boxes"], lenient["matched"], lenient["extra"], lenient["kept"]) == (2, 2, 0, True)
    far = [(np.concatenate([box(1), box(200)]), np.array([0.85, 0.4]))]  # the 0.5 box lost, a 0.4 box new
    assert not tasks.det_score(reference, far, margin=0.05)["kept"]


def test_a_real_models_rerun_keeps_the_sections_written_by_hand():
    """bench/real_models.py rewrites docs/benchmarks-real.md: its own sections are replaced, the others kept."""
    real = _bench_module("real_models")
    old = ("# Benchmarks on real models\n\n## Real models (synthetic inputs)\n\nold table\n\n"
           "## quantize's latency guard\n\nmeasured by hand\n\n## Targets per model\n\nold targets\n")
    new = "# Benchmarks on real models\n\n## Real models (synthetic inputs)\n\nnew table\n\n## Targets per model\n\nnew\n"
    doc = real.with_hand_sections(new, old)
    assert doc == new.rstrip("\n") + "\n\n## quantize's latency guard\n\nmeasured by hand\n"
    assert real.with_hand_sections(new, doc) == doc  # a second rerun changes nothing
    assert real.with_hand_sections(new, "") == new
