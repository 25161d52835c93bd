"""Entropy coding for `onnxshrink pack`: generic byte/short symbol coders that know nothing about ONNX."""
