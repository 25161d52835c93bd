"""Numeric methods on plain arrays, no ONNX: the passes read a layer's weight and statistics out of the graph,
call these, and write the result back; tests drive them with numpy alone.

- reconstruct.py  layer statistics (the Gram matrix X^T X, X^T Y of a layer's inputs and the teacher's outputs)
                  and the least-squares refit of a pruned layer's kept weights
- gptq.py         blockwise round-to-nearest and GPTQ (OBS) rounding to a low-bit grid
- sparsegpt.py    one-shot pruning with OBS weight updates from X^T X (SparseGPT), unstructured and N:M
- codebook.py     weighted 1-D k-means codebooks, GPTQ-style rounding to them, and their least-squares refit
- smoothing.py    SmoothQuant's per-channel scales and their alpha search by fake-quantized int8 error
"""
