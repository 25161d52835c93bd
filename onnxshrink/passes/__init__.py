"""Graph-rewrite passes: each is configured at construction and called on a model -> (model, PassReport)."""

from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic

__all__ = ["QuantizeConfig", "QuantizeDynamic"]
